"""Throughput of the web-data pipelines on this machine, and CapFilt's cost at the paper's scale.

    python tools/bench_capfilt.py builder [--images 2000]        # image_text_pairs: single process, Beam
    python tools/bench_capfilt.py capfilt [--config small] [--images 32]   # CapFilt: JAX job, Beam
    python tools/bench_capfilt.py capfilt --config full [--checkpoint DIR] [--images 8]  # full size
    python tools/bench_capfilt.py estimate [--images 129e6] [--chips 64]   # OPT-2.7B on TPU v5e

builder: webdataset tars of 256x256 JPEGs (img2dataset's default size) with captions, built by the
single-process builder (web.py, reads and writes, decodes nothing) and by the Beam builder on the
DirectRunner (web_beam.py: also checks every image decodes, hashes it for duplicates), in one
process and with 2 worker processes. Best of --repeats; images/s.
capfilt: random checkpoints (captioner: tools/bench_annotate.py's configurations; scorer: the
same vision tower and Q-Former as a retrieval model), K = 10 nucleus samples of exactly
--new-tokens tokens each, N = 2 kept, batch 16; the JAX job and the Beam pipeline (DirectRunner)
on the same prepared input, in this process.
`--config full`: the captioner is a released-architecture checkpoint (default: the cache folder
of `tools/make_full_checkpoint.py full-opt-2.7b`), loaded in bfloat16; the scorer a random
retrieval model with its ViT-g and Q-Former (bfloat16); the JAX job only (the Beam workers would
each hold both models: ~10 GB apiece).
(The JAX job is timed after a first run that compiles; the Beam row is end to end, the
models loaded by its worker, their programs read from the persistent compilation cache.)
estimate: the arithmetic of docs/data.md (FLOPs and HBM traffic per image from the preset
configurations; efficiencies are assumptions, printed with the result).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


# ------------------------------------------------------------------------------ builder
def write_corpus(folder: str, n: int, per_tar: int = 500) -> None:
    from PIL import Image
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    for t in range(0, n, per_tar):
        with tarfile.open(os.path.join(folder, f"{t // per_tar:05d}.tar"), "w") as tar:
            for i in range(t, min(t + per_tar, n)):
                a, b = rs.rand(2) * 0.05
                img = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(a * (xx + yy))], -1) * 100 + 128
                buf = io.BytesIO()
                Image.fromarray(np.clip(img + rs.randn(256, 256, 3) * 12, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                for ext, data in ((".jpg", buf.getvalue()), (".txt", f"a photo number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def bench_builder(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        write_corpus(raw, args.images)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        runs = {
            "single process (web.py)": [sys.executable, "-c", "import sys; from blip2_jax.data import builders; "
                                        "builders.prepare_dataset('image_text_pairs', sys.argv[1], sys.argv[2])"],
            "Beam DirectRunner, 1 worker": [sys.executable, "-m", "blip2_jax.build_pairs", "--runner=DirectRunner",
                                            "--direct_num_workers=1", "--direct_running_mode=in_memory"],
            "Beam DirectRunner, 2 worker processes": [sys.executable, "-m", "blip2_jax.build_pairs",
                                                      "--runner=DirectRunner", "--direct_num_workers=2",
                                                      "--direct_running_mode=multi_processing"]}
        best = {}
        for r in range(args.repeats):
            for name, cmd in runs.items():
                out = os.path.join(tmp, f"out{r}{len(best)}{name[:4]}")
                full = cmd + [out, raw] if "-c" in cmd else cmd + ["--manual_dir", raw, "--data_dir", out]
                t = time.perf_counter()
                subprocess.run(full, cwd=ROOT, env=env, check=True, capture_output=True)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        print(f"| builder | images | seconds (incl. start-up) | images/s |\n|---|---|---|---|")
        for name, sec in best.items():
            print(f"| {name} | {args.images} | {sec:.1f} | {args.images / sec:.1f} |")
        print(f"# 256x256 JPEGs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


# ------------------------------------------------------------------------------ capfilt
GOLDEN_ITM = ROOT / "tests" / "golden" / "blip2_itm"  # the retrieval layout, tokenizer and processor


def save_random_scorer(cfg, raw: dict, out: str, dtype=None) -> None:
    """A random retrieval (ITM/ITC) checkpoint of `cfg` in transformers format (`raw`: the golden
    config.json whose other fields are kept), stored in `dtype` (None: as initialised)."""
    import jax

    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.preprocess import ImageProcessor
    from blip2_jax.weights import hf

    model = Blip2(cfg, scan_layers=False)
    params = sharding.unbox(jax.jit(lambda r: model.init(r, **build.init_inputs(cfg)))(jax.random.key(1))["params"])
    raw = {k: v for k, v in raw.items() if k not in ("vision_config", "qformer_config", "text_config")}
    hf.save(out, cfg, params, raw_config=raw, side_files_from=str(GOLDEN_ITM), dtype=dtype)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(ImageProcessor(size=cfg.vision.image_size).to_dict(), f)


def make_scorer(name: str, out: str) -> None:
    """A random retrieval checkpoint with `name`'s vision tower and Q-Former."""
    import bench_annotate
    from blip2_jax.weights import hf

    c = bench_annotate.CONFIGS[name]
    im, patch, vh, vl, vheads, vmlp = c["vision"]
    qh, ql, qheads, qffn, queries = c["qformer"]
    cfg, raw = hf.read_config(str(GOLDEN_ITM))
    cfg = dataclasses.replace(
        cfg, num_query_tokens=queries,
        vision=dataclasses.replace(cfg.vision, image_size=im, patch_size=patch, hidden_size=vh, num_hidden_layers=vl,
                                   num_attention_heads=vheads, intermediate_size=vmlp),
        qformer=dataclasses.replace(cfg.qformer, hidden_size=qh, num_hidden_layers=ql, num_attention_heads=qheads,
                                    intermediate_size=qffn, encoder_hidden_size=vh))
    save_random_scorer(cfg, raw, out)


def make_scorer_like(captioner: str, out: str) -> None:
    """A random retrieval checkpoint (bfloat16) with `captioner`'s vision tower and Q-Former."""
    import ml_dtypes

    from blip2_jax.weights import hf

    cap, _ = hf.read_config(captioner)
    cfg, raw = hf.read_config(str(GOLDEN_ITM))
    cfg = dataclasses.replace(cfg, num_query_tokens=cap.num_query_tokens, vision=cap.vision,
                              qformer=dataclasses.replace(cfg.qformer, **{
                                  f.name: getattr(cap.qformer, f.name) for f in dataclasses.fields(cap.qformer)
                                  if f.name not in ("vocab_size", "pad_token_id", "use_qformer_text_input")}),
                              image_text_hidden_size=256)
    save_random_scorer(cfg, raw, out, dtype=ml_dtypes.bfloat16)


def bench_capfilt_full(args) -> None:
    """The JAX job with a full-size captioner (see the module docstring)."""
    from make_full_checkpoint import default_dir

    from blip2_jax import cache
    from blip2_jax.data import builders, capfilt, capfilt_output

    cache.enable()
    cap = args.checkpoint or str(default_dir("full-opt-2.7b"))
    if not os.path.isfile(os.path.join(cap, "config.json")):
        sys.exit(f"error: no checkpoint in {cap} (tools/make_full_checkpoint.py full-opt-2.7b writes it)")
    with tempfile.TemporaryDirectory() as tmp:
        score, raw, data = (os.path.join(tmp, d) for d in ("scorer", "raw", "data"))
        make_scorer_like(cap, score)
        write_corpus(raw, args.images)
        builders.prepare_dataset("image_text_pairs", data, raw)
        opts = capfilt.Options(batch_size=args.images, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        s = time.perf_counter()
        captioner, cp = capfilt.load_model(cap, dtype="bfloat16")
        scorer, sp = capfilt.load_model(score, dtype="bfloat16")
        load_s = time.perf_counter() - s
        step, views = capfilt.CapfiltStep(captioner, scorer, opts), capfilt.TwoViews(cp, sp)
        inputs = capfilt.InputShards("image_text_pairs:train", data, shard_size=args.images)
        runs = []
        for r in range(args.repeats + 1):  # the first run compiles
            out = capfilt_output.Output(os.path.join(tmp, f"jax{r}"), len(inputs.shards), {})
            out.prepare("refuse")
            summary = capfilt.run_shards(inputs, step, views, out, workers=2, progress=False)
            runs.append(summary.seconds)
        rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**20
        print("| captioner | engine | images/s (K = 10, N = 2) |\n|---|---|---|")
        print(f"| {os.path.basename(cap.rstrip('/'))} (bfloat16) | JAX job, after compilation | "
              f"{args.images / min(runs[1:]):.3f} |")
        print(f"# {args.images} images in one batch, {args.new_tokens} new tokens per caption; models loaded in "
              f"{load_s:.1f} s, first run (compiling) {runs[0]:.1f} s, then {', '.join(f'{x:.1f}' for x in runs[1:])} s; "
              f"peak RSS {rss:.1f} GiB; CPU ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}")


def bench_capfilt(args) -> None:
    if args.config == "full":
        args.images = args.images or 8
        return bench_capfilt_full(args)
    args.images = args.images or 32
    import contextlib

    import bench_annotate
    from blip2_jax import cache
    from blip2_jax.cli import capfilt as cli
    from blip2_jax.data import builders, capfilt, capfilt_output

    cache.enable()
    with tempfile.TemporaryDirectory() as tmp:
        cap, score, raw, data = (os.path.join(tmp, d) for d in ("captioner", "scorer", "raw", "data"))
        bench_annotate.make_checkpoint(args.config, cap)
        make_scorer(args.config, score)
        write_corpus(raw, args.images)
        builders.prepare_dataset("image_text_pairs", data, raw)
        opts = capfilt.Options(batch_size=16, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        # the JAX job in this process: models loaded and compiled once, then timed
        captioner, cp = capfilt.load_model(cap)
        scorer, sp = capfilt.load_model(score)
        step, views = capfilt.CapfiltStep(captioner, scorer, opts), capfilt.TwoViews(cp, sp)
        inputs = capfilt.InputShards("image_text_pairs:train", data, shard_size=args.images)
        rates = {}
        for r in range(args.repeats + 1):  # the first run compiles
            out = capfilt_output.Output(os.path.join(tmp, f"jax{r}"), len(inputs.shards), {})
            out.prepare("refuse")
            summary = capfilt.run_shards(inputs, step, views, out, workers=2, progress=False)
            if r:
                rates["jax job, after compilation"] = max(rates.get("jax job, after compilation", 0.0),
                                                          summary.images / summary.seconds)
        # the Beam pipeline (DirectRunner), end to end: workers load the models and compile (from
        # the persistent compilation cache the JAX job filled)
        argv = ["--input", "image_text_pairs:train", "--input_data_dir", data, "--captioner", cap, "--scorer", score,
                "--batch_size", "16", "--shard_size", str(args.images), "--max_new_tokens", str(args.new_tokens),
                "--min_new_tokens", str(args.new_tokens), "--workers", "2", "--no_progress", "--engine", "beam",
                "--runner=DirectRunner"]
        for r in range(args.repeats):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                cli.main(argv + ["--output_dir", os.path.join(tmp, f"beam{r}")])
            summary = json.loads(buf.getvalue().splitlines()[-1])
            rates["Beam DirectRunner, incl. model load"] = max(rates.get("Beam DirectRunner, incl. model load", 0.0),
                                                               summary["images_per_second"])
        print("| captioner | engine | images/s (K = 10, N = 2) |\n|---|---|---|")
        for engine, rate in rates.items():
            print(f"| {args.config} | {engine} | {rate:.2f} |")
        print(f"# {args.images} images, batch 16, {args.new_tokens} new tokens per caption, float32, CPU "
              f"({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}")


# ------------------------------------------------------------------------------ the estimate
def estimate(args) -> dict:
    """CapFilt with ViT-g + OPT-2.7B (captioner) and ViT-g + Q-Former (scorer) per image."""
    from blip2_jax.models import presets
    cfg = presets.preset("vitg_opt2.7b")
    v, q, t = cfg.vision, cfg.qformer, cfg.text
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    vit = 2 * v.num_hidden_layers * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
                                              + 2 * tokens * v.hidden_size)
    llm_params = t.num_hidden_layers * (4 * t.hidden_size ** 2 + 2 * t.hidden_size * t.ffn_dim)
    llm_token = 2 * (llm_params + t.hidden_size * t.vocab_size)
    prefill = (cfg.num_query_tokens + 1) * llm_token            # once per image (rows repeated after)
    decode = args.captions * args.tokens * llm_token
    qformer = 2 * q.num_hidden_layers * (4 * q.hidden_size ** 2 + 2 * q.hidden_size * q.intermediate_size)
    texts = (args.captions + 1) * 32 * qformer                  # K + 1 texts of 32 tokens, scored
    compute = 2 * vit + prefill + texts                          # two ViT-g passes (captioner, scorer)
    # decoding reads the LLM weights (bf16) once per step for the whole batch, plus the KV cache
    rows = args.batch * args.captions
    kv_token = 2 * t.num_hidden_layers * t.hidden_size * 2      # bytes per cached token (bf16)
    context = cfg.num_query_tokens + 1 + args.tokens // 2
    step_bytes = 2 * llm_params + rows * context * kv_token
    peak, hbm = 197e12, 819e9                                  # v5e chip: bf16 FLOP/s, HBM bytes/s
    t_compute = args.batch * compute / (peak * args.mfu)
    t_decode = args.tokens * max(step_bytes / (hbm * args.bw), rows * llm_token / (peak * args.mfu))
    per_chip = args.batch / (t_compute + t_decode)
    vit_params = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    weights = 2 * (llm_params + t.hidden_size * t.vocab_size) + 2 * 2 * vit_params + 2 * 4 * 188e6  # Q-Formers fp32
    hbm_gib = (weights + rows * context * kv_token) / 2**30
    chip_hours = args.images / per_chip / 3600
    out = {"tflop_per_image": (compute + decode) / 1e12, "images_per_second_per_chip": per_chip,
           "hbm_gib_weights_and_kv_cache": hbm_gib,
           "chip_hours": chip_hours, "hours_on": {n: chip_hours / n for n in (args.chips, 4 * args.chips)},
           "assumptions": dict(captions=args.captions, tokens=args.tokens, batch=args.batch, mfu=args.mfu,
                               hbm_utilisation=args.bw)}
    print(json.dumps(out, indent=1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("builder")
    b.add_argument("--images", type=int, default=2000)
    b.add_argument("--repeats", type=int, default=2)
    c = sub.add_parser("capfilt")
    c.add_argument("--config", default="small", choices=("tiny", "small", "full"))
    c.add_argument("--checkpoint", help="--config full: the captioner (default: the full-opt-2.7b cache folder)")
    c.add_argument("--images", type=int, help="images (default 32; --config full: 8, in one batch)")
    c.add_argument("--new-tokens", type=int, default=20)
    c.add_argument("--repeats", type=int, default=1)
    e = sub.add_parser("estimate")
    e.add_argument("--images", type=float, default=129e6)
    e.add_argument("--chips", type=int, default=64)
    e.add_argument("--captions", type=int, default=10)
    e.add_argument("--tokens", type=int, default=20, help="decoding steps per caption batch")
    e.add_argument("--batch", type=int, default=16, help="images per step (K x batch sequences decoded)")
    e.add_argument("--mfu", type=float, default=0.4, help="assumed share of peak FLOP/s in the dense parts")
    e.add_argument("--bw", type=float, default=0.6, help="assumed share of HBM bandwidth while decoding")
    args = p.parse_args()
    {"builder": bench_builder, "capfilt": bench_capfilt, "estimate": estimate}[args.what](args)


if __name__ == "__main__":
    main()
