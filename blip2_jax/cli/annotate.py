"""Captions, answers or embeddings for a whole image collection, sharded and resumable.

    python -m blip2_jax.annotate --model DIR --input (FOLDER | 'data/*.tar' | NAME:SPLIT)
        --task (caption | vqa --question TEXT [--question TEXT ...] | embed) --output OUT
        [--format jsonl|parquet] [--batch_size 32] [--shard_size 1000] [--num_beams 5] ...

Writes OUT/part-NNNNN.{jsonl|parquet} (+ .npy embeddings with jsonl) per input shard, atomically;
rerun the same command to resume (finished shards are skipped). Several processes (TPU pod
hosts, or --coordinator_address/--num_processes/--process_id) split the shards between them;
each runs on its own devices (`--mesh` over them). Prints a progress bar (images/s, ETA) and
a JSON summary line (images, shards, skipped by reason, seconds). See `blip2_jax.annotation`.
"""
from __future__ import annotations

import json
import os
import sys

from blip2_jax.cli import common

PROG = "blip2_jax.annotate"
TASKS = ("caption", "vqa", "embed")
GENERATION_FLAGS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty")


def build_parser():
    p = common.parser(PROG, "Annotate an image collection (captions, VQA answers, embeddings) with BLIP-2.",
                      cores=False)
    p.add_argument("--input", required=True, help="image folder, webdataset .tar files (glob), or TFDS name:split")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--question", action="append", default=[], help="vqa: a question (repeatable)")
    p.add_argument("--prompt", help="caption: text the caption continues (default: none)")
    p.add_argument("--prompt_template", "--prompt-template", default="Question: {} Answer:", help="vqa prompt")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"))
    p.add_argument("--batch_size", "--batch-size", type=common.positive_int, default=32, help="images per step")
    p.add_argument("--shard_size", "--shard-size", type=common.positive_int, default=1000,
                   help="images per output shard (folders, TFDS; a tar is one shard)")
    p.add_argument("--workers", type=common.positive_int, default=min(8, os.cpu_count() or 1),
                   help="decoding threads")
    p.add_argument("--max_pixels", "--max-pixels", type=common.positive_int, help="larger images are skipped")
    p.add_argument("--data_dir", "--data-dir", help="TFDS data directory")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor over this process's devices")
    p.add_argument("--overwrite", action="store_true", help="replace another run's outputs in --output")
    p.add_argument("--no_progress", "--no-progress", action="store_true")
    for flag in ("num_beams", "max_new_tokens", "min_new_tokens"):
        p.add_argument(f"--{flag}", type=common.nonnegative_int if flag == "min_new_tokens" else common.positive_int)
    p.add_argument("--length_penalty", type=float)
    p.add_argument("--repetition_penalty", type=common.positive_float)
    p.add_argument("--coordinator_address", help="host:port of process 0 (multi-process runs off TPU pods)")
    p.add_argument("--num_processes", type=common.positive_int)
    p.add_argument("--process_id", type=common.nonnegative_int)
    return p


def run_config(args) -> dict:
    """What must match for a resumed run to continue the same outputs."""
    def where(name):  # a path, or a Hub id / TFDS name as given
        return os.path.abspath(name) if os.path.exists(name) or name.endswith(".tar") else name
    return {"model": where(args.model), "dtype": args.dtype, "input": where(args.input), "task": args.task,
            "questions": args.question if args.task == "vqa" else [],
            "prompt": args.prompt if args.task == "caption" else None,
            "prompt_template": args.prompt_template if args.task == "vqa" else None,
            "generation": {k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None},
            "shard_size": args.shard_size, "format": args.format, "max_pixels": args.max_pixels}


def init_distributed(args) -> None:
    """jax.distributed on TPU pods (automatic) or with the three flags given."""
    import jax
    given = [args.coordinator_address, args.num_processes, args.process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()


def barrier(name: str, timeout_s: int) -> None:
    """All processes meet here (the coordination service; no device collective)."""
    import jax
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def parse_mesh(text: str) -> list[int]:
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3:
        raise ValueError(f"--mesh takes three sizes data,fsdp,tensor (one may be -1), got {text!r}")
    return shape


def make_task(args, predictor):
    from blip2_jax import annotation
    opts = {k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None}
    if args.task == "vqa":
        return annotation.VqaTask(predictor, args.question, args.prompt_template, **opts)
    if args.question:
        raise ValueError("--question is for --task vqa")
    if args.task == "caption":
        return annotation.CaptionTask(predictor, args.prompt, **opts)
    return annotation.EmbedTask(predictor)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        if args.task == "vqa" and not [q for q in args.question if q.strip()]:
            raise ValueError("--task vqa needs --question TEXT (non-empty; repeatable)")
        from blip2_jax import annotation, sharding
        max_pixels = args.max_pixels or annotation.MAX_IMAGE_PIXELS
        shards = annotation.list_shards(args.input, args.shard_size, args.data_dir)
        shape = parse_mesh(args.mesh)
        init_distributed(args)
        import jax

        from blip2_jax.inference import load
        pi, pc = jax.process_index(), jax.process_count()
        model = load(args.model, dtype=args.dtype, mesh=sharding.make_mesh(shape, devices=jax.local_devices()),
                     quantize=args.quantize)
        task = make_task(args, model.predictor)  # bad options fail before the output is touched
        config = run_config(args)
        annotation.prepare_output(args.output, config, overwrite=args.overwrite, leader=pi == 0)
        barrier("blip2_annotate_start", 600)
        annotation.prepare_output(args.output, config, overwrite=False, leader=False)  # all see the same
        summary = annotation.annotate(
            shards, task, model.image_processor.one, args.output, fmt=args.format, batch_size=args.batch_size,
            workers=args.workers, process_index=pi, process_count=pc, max_pixels=max_pixels,
            progress=not args.no_progress)
        print(json.dumps({"process": pi, **summary.as_dict()}), flush=True)
        barrier("blip2_annotate_end", 7 * 24 * 3600)  # the coordinator (process 0) leaves last

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
