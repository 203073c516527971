"""CapFilt over a prepared dataset: K sampled captions per image, the best N (with the web ones) kept.

    python -m blip2_jax.capfilt --input image_text_pairs:train --input_data_dir DATA \\
        --captioner DIR|ID|WORKDIR --scorer DIR|ID|WORKDIR --output_dir OUT \\
        [--num_captions 10] [--keep 2] [--top_p 0.9] [--batch_size 16] [--shard_size 1000] \\
        [--engine beam|jax] [--if_exists refuse|resume|overwrite] [Beam pipeline options]

Writes the `capfilt_pairs` dataset into OUT (train with --config.input.dataset=capfilt_pairs
--config.input.data_dir=OUT). `--engine beam` (default) runs an Apache Beam pipeline: any
further flags are Beam pipeline options (default --runner=DirectRunner; e.g. --runner=
DataflowRunner --project=... --region=... --temp_location=gs://...). `--engine jax` runs the
same step as a plain JAX job: on a TPU slice every host runs the command (or pass
--coordinator_address/--num_processes/--process_id) and takes its own shards, on its own devices
(--mesh). Existing output is refused unless --if_exists says resume (finished shards are kept)
or overwrite. Prints a JSON summary line. See `blip2_jax.data.capfilt`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from blip2_jax.cli import common

PROG = "blip2_jax.capfilt"


def build_parser():
    p = common.OneLineParser(prog=PROG, description="CapFilt: bootstrap captions of an image-text dataset.")
    p.add_argument("--input", required=True, help="a prepared TFDS dataset NAME[/CONFIG]:SPLIT")
    p.add_argument("--input_data_dir", help="its TFDS data directory")
    p.add_argument("--captioner", required=True, help="captioning model: directory, Hub id or training workdir")
    p.add_argument("--scorer", required=True, help="retrieval model (ITC): directory, Hub id or stage-1 workdir")
    p.add_argument("--output_dir", required=True, help="TFDS data directory of the output (capfilt_pairs)")
    p.add_argument("--engine", default="beam", choices=("beam", "jax"))
    p.add_argument("--if_exists", default="refuse", choices=("refuse", "resume", "overwrite"))
    p.add_argument("--dtype", default="float32", choices=common.DTYPES)
    p.add_argument("--num_captions", type=common.positive_int, default=10, help="K sampled captions per image")
    p.add_argument("--keep", type=common.positive_int, default=2, help="N captions kept per image")
    p.add_argument("--top_p", type=common.positive_float, default=0.9)
    p.add_argument("--top_k", type=common.nonnegative_int, default=0, help="0: nucleus sampling alone")
    p.add_argument("--temperature", type=common.positive_float, default=1.0)
    p.add_argument("--max_new_tokens", type=common.positive_int, default=30)
    p.add_argument("--min_new_tokens", type=common.nonnegative_int, default=0)
    p.add_argument("--prompt", help="text the captions continue (default: none)")
    p.add_argument("--max_text_len", type=common.positive_int, default=32, help="Q-Former tokens when scoring")
    p.add_argument("--batch_size", type=common.positive_int, default=16, help="images per step")
    p.add_argument("--shard_size", type=common.positive_int, default=1000, help="images per output shard")
    p.add_argument("--seed", type=common.nonnegative_int, default=0)
    p.add_argument("--workers", type=common.positive_int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--max_pixels", type=common.positive_int, help="larger images are skipped")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--mesh", default="-1,1,1", help="jax engine: data,fsdp,tensor over this process's devices")
    p.add_argument("--coordinator_address", help="jax engine: host:port of process 0")
    p.add_argument("--num_processes", type=common.positive_int)
    p.add_argument("--process_id", type=common.nonnegative_int)
    return p


def options(args):
    from blip2_jax.data import capfilt
    return capfilt.Options(num_captions=args.num_captions, keep=args.keep, top_p=args.top_p, top_k=args.top_k,
                           temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                           min_new_tokens=args.min_new_tokens, prompt=args.prompt, max_text_len=args.max_text_len,
                           batch_size=args.batch_size, seed=args.seed).validate()


def run_config(args, opts) -> dict:
    """What must match for a resumed run to continue the same output."""
    def where(name):  # a path, or a Hub id as given
        return os.path.abspath(name) if name and os.path.exists(name) else name
    return {"input": args.input, "input_data_dir": where(args.input_data_dir), "captioner": where(args.captioner),
            "scorer": where(args.scorer), "dtype": args.dtype, "options": dataclasses.asdict(opts),
            "shard_size": args.shard_size, "max_pixels": args.max_pixels}


def run_beam(args, beam_args, opts, inputs, output) -> dict:
    from blip2_jax.data import capfilt_beam
    beam = capfilt_beam.beam
    from apache_beam.options.pipeline_options import PipelineOptions
    output.prepare(args.if_exists)
    done = output.done_shards()
    todo = [s.index for s in inputs.shards if s.index not in done]
    spec = capfilt_beam.Spec(input=args.input, input_data_dir=args.input_data_dir, shard_size=args.shard_size,
                             captioner=args.captioner, scorer=args.scorer, dtype=args.dtype, options=opts,
                             output_dir=args.output_dir, num_shards=len(inputs.shards), config=output.config,
                             workers=args.workers, max_pixels=args.max_pixels or capfilt_beam.capfilt.annotation.MAX_IMAGE_PIXELS)
    pipeline_options = PipelineOptions(beam_args or ["--runner=DirectRunner"])
    t0 = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options)
    capfilt_beam.build(pipeline, spec, todo)
    result = pipeline.run()
    result.wait_until_finish()
    counts = capfilt_beam.counters(result)
    images = counts.pop("images", 0)
    seconds = time.perf_counter() - t0
    return {"images": images, "shards": len(todo), "already_done_shards": len(done),
            "skipped": dict(sorted(counts.items())), "seconds": round(seconds, 2),
            "images_per_second": round(images / seconds, 2) if seconds else 0.0}


def run_jax(args, opts, inputs, output) -> dict:
    from blip2_jax import cache, sharding
    from blip2_jax.cli.annotate import barrier, init_distributed, parse_mesh
    from blip2_jax.data import capfilt

    shape = parse_mesh(args.mesh)
    output.prepare(args.if_exists, leader=False)  # refusals come before the models load
    init_distributed(args)
    import jax
    cache.enable()
    pi, pc = jax.process_index(), jax.process_count()
    mesh = sharding.make_mesh(shape, devices=jax.local_devices())
    captioner, cp = capfilt.load_model(args.captioner, dtype=args.dtype, mesh=mesh)
    scorer, sp = capfilt.load_model(args.scorer, dtype=args.dtype, mesh=mesh)
    step = capfilt.CapfiltStep(captioner, scorer, opts)  # bad options fail before the output is touched
    if pi == 0:
        output.prepare(args.if_exists)
    barrier("blip2_capfilt_start", 600)
    if pi != 0:
        output.prepare("resume", leader=False)  # the leader's folder: this run's settings
    summary = capfilt.run_shards(inputs, step, capfilt.TwoViews(cp, sp), output, process_index=pi,
                                 process_count=pc, workers=args.workers,
                                 max_pixels=args.max_pixels or capfilt.annotation.MAX_IMAGE_PIXELS,
                                 progress=not args.no_progress)
    barrier("blip2_capfilt_end", 7 * 24 * 3600)
    return {"process": pi, **summary.as_dict()}


def main(argv=None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)

    def go():
        if args.engine == "jax" and beam_args:
            raise ValueError(f"unknown flags for --engine jax: {' '.join(beam_args)}")
        from blip2_jax.data import capfilt, capfilt_output
        opts = options(args)
        inputs = capfilt.InputShards(args.input, args.input_data_dir, args.shard_size)
        output = capfilt_output.Output(args.output_dir, len(inputs.shards), run_config(args, opts))
        if args.engine == "beam":
            summary = run_beam(args, beam_args, opts, inputs, output)
        else:
            summary = run_jax(args, opts, inputs, output)
        totals = output.finalize() if summary.get("process", 0) == 0 else None
        print(json.dumps({"engine": args.engine, **summary, "complete": output.complete(),
                          "output": str(output.dir), **({"totals": totals} if totals else {})}), flush=True)

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
