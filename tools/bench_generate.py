"""Generation speed: blip2_jax against transformers' PyTorch `generate`, side by side, one run.

    python tools/bench_generate.py --torch-python /path/to/python-with-torch [--configs tiny,small]
        [--batch 8] [--new-tokens 30] [--beams 5] [--repeats 3] [--dtypes float32,bfloat16] [--profile]

The PyTorch side runs in a separate interpreter (`--torch-python`, needs torch + transformers):
it first creates random BLIP-2 OPT checkpoints with transformers in a temporary directory (the
tokenizer files come from tests/golden/blip2_opt), then stays up and times one
`Blip2ForConditionalGeneration.generate` per request, alternating run by run with ours so that
both see the same machine load. Both sides load the same files, start from the same preprocessed
pixel values, caption without a prompt, and generate exactly `--new-tokens` tokens per sequence
(min_new_tokens = max_new_tokens, so EOS never ends a row early). Timings exclude the first call
(our compilation, their warm-up; ours reported as "1st call") and take the best of `--repeats`.
tokens/s = batch x new tokens / seconds (beam search counts the returned sequence, not the beams).
Each `--dtypes` row runs both sides' frozen towers in that precision (the reference loaded with
`dtype=torch.bfloat16` for the bfloat16 rows; both keep the Q-Former in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "golden" / "blip2_opt"
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from torch_child import JsonLineChild, torch_env  # noqa: E402  (next to this script)

# vision (image, patch, hidden, layers, heads, mlp), Q-Former (hidden, layers, heads, ffn, queries),
# OPT (hidden, layers, heads, ffn); every OPT vocabulary is the real 50272-row one.
CONFIGS = {
    "tiny": dict(vision=(64, 16, 64, 2, 4, 256), qformer=(64, 2, 4, 256, 8), opt=(64, 2, 4, 256)),
    "small": dict(vision=(224, 14, 384, 12, 6, 1536), qformer=(384, 6, 6, 1536, 32), opt=(768, 12, 12, 3072)),
}

TORCH_SIDE = r'''
import json, os, shutil, sys, time
import numpy as np
import torch

mode, workdir, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          OPTConfig)
from transformers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()

def create(name, c):
    im, patch, vh, vl, vheads, vmlp = c["vision"]
    qh, ql, qheads, qffn, queries = c["qformer"]
    oh, ol, oheads, offn = c["opt"]
    tok = json.load(open(os.path.join(spec["tokenizer_dir"], "tokenizer_config.json")))
    text = OPTConfig(vocab_size=50272, hidden_size=oh, num_hidden_layers=ol, ffn_dim=offn, num_attention_heads=oheads,
                     max_position_embeddings=512, word_embed_proj_dim=oh, dropout=0.0, attention_dropout=0.0,
                     bos_token_id=50256, eos_token_id=50118, pad_token_id=50256)
    vision = Blip2VisionConfig(image_size=im, patch_size=patch, hidden_size=vh, num_hidden_layers=vl,
                               num_attention_heads=vheads, intermediate_size=vmlp)
    qformer = Blip2QFormerConfig(hidden_size=qh, num_hidden_layers=ql, num_attention_heads=qheads,
                                 intermediate_size=qffn, cross_attention_frequency=2, encoder_hidden_size=vh)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=queries, image_token_index=50257)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF's vision init (std 1e-10) would run on denormals: use std 0.02
        for n, p in model.named_parameters():
            if "norm" in n.lower():
                p.copy_(torch.ones_like(p) if n.endswith("weight") else torch.zeros_like(p))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    out = os.path.join(workdir, name)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(spec["tokenizer_dir"], f), out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "BlipImageProcessor", "size": {"height": im, "width": im},
                   "resample": 3, "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True,
                   "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}, f)

def serve():
    """Answers "<config> <dtype> <mode> [new tokens]" lines with one timed generate each (JSON),
    until "quit". bfloat16: transformers' own half-precision load (`dtype=torch.bfloat16`; it
    keeps the Q-Former and the query tokens in float32, as ours does)."""
    models, pixels = {}, {}
    for name in spec["configs"]:
        d = os.path.join(workdir, name)
        for dtype in spec["dtypes"]:
            models[name, dtype] = Blip2ForConditionalGeneration.from_pretrained(
                d, attn_implementation=spec["attn"], dtype=getattr(torch, dtype)).eval()
        pixels[name] = torch.from_numpy(np.load(os.path.join(d, "pixel_values.npy"))).permute(0, 3, 1, 2).contiguous()
    n = spec["new_tokens"]
    print(json.dumps({"torch_threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        name, dtype, label, *rest = line.split()
        model = models[name, dtype]
        n_new = int(rest[0]) if rest else n
        if label == "image":  # ViT + Q-Former + projection only
            with torch.inference_mode():
                t = time.perf_counter()
                model.get_image_features(pixel_values=pixels[name])
                seconds = time.perf_counter() - t
            print(json.dumps({"seconds": seconds, "tokens": []}), flush=True)
            continue
        beams = 1 if label == "greedy" else spec["beams"]
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, num_beams=beams, do_sample=False)
        with torch.inference_mode():
            t = time.perf_counter()
            seqs = model.generate(pixel_values=pixels[name], **kw)
            seconds = time.perf_counter() - t
        print(json.dumps({"seconds": seconds, "tokens": seqs[:, -n_new:].tolist()}), flush=True)

if mode == "create":
    for name in spec["configs"]:
        create(name, spec["all"][name])
else:
    serve()
'''


def torch_create(python: str, workdir: str, spec: dict):
    proc = subprocess.run([python, _script(workdir), "create", workdir, json.dumps(spec)], capture_output=True,
                          text=True, env=torch_env(), check=False)
    if proc.returncode != 0:
        sys.exit(f"the PyTorch side failed to create the checkpoints:\n{proc.stderr[-4000:]}")


class TorchServer(JsonLineChild):
    """The PyTorch side as a child process timing one `generate` per request."""

    def __init__(self, python: str, workdir: str, spec: dict, omp_wait: str):
        super().__init__([python, _script(workdir), "serve", workdir, json.dumps(spec)], torch_env(omp_wait))

    def run(self, name: str, dtype: str, label: str, new_tokens: int | None = None) -> dict:
        extra = "" if new_tokens is None else f" {new_tokens}"
        return self.request(f"{name} {dtype} {label}{extra}")


def _script(workdir: str) -> str:
    script = os.path.join(workdir, "torch_side.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(TORCH_SIDE)
    return script


class OurSide:
    def __init__(self, workdir: str, name: str, dtype: str, args):
        import blip2_jax

        self.model = blip2_jax.load(os.path.join(workdir, name), dtype=dtype)
        rng = np.random.default_rng(0)
        size = self.model.image_processor.size
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.batch)]
        self.pixels = self.model.pixel_values(images)
        np.save(os.path.join(workdir, name, "pixel_values.npy"), self.pixels)  # the same for every dtype
        self.n, self.beams = args.new_tokens, args.beams
        self.compile_seconds = {label: self.run(label)["seconds"] for label in ("greedy", "beam")}
        if args.profile:
            for label in ("image", "greedy", "beam"):
                self.run(label, 1)  # compile the pieces of the breakdown

    def run(self, label: str, new_tokens: int | None = None) -> dict:
        if label == "image":  # ViT + Q-Former + projection only
            import jax

            m = self.model
            t = time.perf_counter()
            jax.block_until_ready(m.predictor._soft_prompts(m.params, self.pixels))
            return {"seconds": time.perf_counter() - t, "tokens": []}
        n = self.n if new_tokens is None else new_tokens
        beams = 1 if label == "greedy" else self.beams
        t = time.perf_counter()
        tokens = self.model.generate_from_pixels(self.pixels, max_new_tokens=n, min_new_tokens=n,
                                                 num_beams=beams)
        return {"seconds": time.perf_counter() - t, "tokens": tokens}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--torch-python", required=True, help="a Python interpreter with torch + transformers")
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16", help="the frozen towers' dtypes (both sides), one row each")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers' attention")
    p.add_argument("--torch-omp-wait", default="passive", choices=("passive", "default"),
                   help="OMP_WAIT_POLICY of the PyTorch side (passive: robust on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="also print where the time goes: image side, prefill (1 new token minus the "
                        "image side), and the cost of each further token, for both sides")
    args = p.parse_args()
    names = [c for c in args.configs.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [c for c in names if c not in CONFIGS] + [d for d in dtypes if d not in ("float32", "bfloat16")]
    if unknown:
        sys.exit(f"unknown config(s) / dtype(s) {unknown}; configs: {', '.join(CONFIGS)}; dtypes: float32, bfloat16")
    spec = dict(configs=names, all=CONFIGS, tokenizer_dir=str(TOKENIZER_DIR), new_tokens=args.new_tokens,
                beams=args.beams, repeats=args.repeats, attn=args.attn, dtypes=dtypes)
    import jax

    ours, theirs = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        torch_create(args.torch_python, workdir, spec)
        sides = {(name, d): OurSide(workdir, name, d, args) for name in names for d in dtypes}
        server = TorchServer(args.torch_python, workdir, spec, args.torch_omp_wait)
        for name in names:
            for label in ("greedy", "beam"):
                for d in dtypes:
                    warm = server.run(name, d, label)
                    theirs[name, d, label] = dict(warm, warmup_seconds=warm["seconds"], seconds=float("inf"))
                    ours[name, d, label] = dict(tokens=None, seconds=float("inf"),
                                                warmup_seconds=sides[name, d].compile_seconds[label])
                for _ in range(args.repeats):  # alternate: both sides see the same load
                    for d in dtypes:
                        r = sides[name, d].run(label)
                        o = ours[name, d, label]
                        o["seconds"], o["tokens"] = min(o["seconds"], r["seconds"]), r["tokens"]
                        r = server.run(name, d, label)
                        theirs[name, d, label]["seconds"] = min(theirs[name, d, label]["seconds"], r["seconds"])
        if args.profile:
            profile = {name: _profile(name, {d: sides[name, d] for d in dtypes}, server, args)
                       for name in names}
        server.close()
        info = server.info

    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"ours: jax {jax.__version__}; theirs: torch {info['torch']} "
          f"({info['torch_threads']} threads, OMP wait {args.torch_omp_wait}, {args.attn} attention)")
    print(f"# batch {args.batch}, {args.new_tokens} new tokens per sequence, beam = {args.beams} beams; best of "
          f"{args.repeats} alternating runs; dtype = both sides' frozen towers (the Q-Former is float32)")
    head = (f"{'config':7} {'mode':6} {'dtype':8} {'ours tok/s':>10} {'torch tok/s':>11} {'speedup':>8} "
            f"{'ours s':>7} {'torch s':>8} {'1st call s':>10} {'same ids':>8}")
    print(head)
    print("-" * len(head))
    total = args.batch * args.new_tokens
    for name in names:
        for label in ("greedy", "beam"):
            for d in dtypes:
                t, o = theirs[name, d, label], ours[name, d, label]
                same = "yes" if [list(x) for x in o["tokens"]] == t["tokens"] else "no"
                print(f"{name:7} {label:6} {d:8} {total / o['seconds']:10.1f} {total / t['seconds']:11.1f} "
                      f"{t['seconds'] / o['seconds']:7.2f}x {o['seconds']:7.3f} {t['seconds']:8.3f} "
                      f"{o['warmup_seconds']:10.1f} {same:>8}")
    if args.profile:
        _print_profile(profile, names, dtypes, args)


def _profile(name: str, ours: dict, server: TorchServer, args) -> dict:
    """Best-of-repeats seconds of the pieces, alternating sides: {(side, piece): s}; side is
    (dtype, "ours" | "torch"); pieces: image, greedy/beam with 1 and with `--new-tokens` tokens."""
    pieces = [("image", None)] + [(m, n) for m in ("greedy", "beam") for n in (1, args.new_tokens)]
    best: dict = {}
    for label, n in pieces:
        for d in ours:
            server.run(name, d, label, n)  # warm-up
        for _ in range(args.repeats):
            runs = {}
            for d, side in ours.items():
                runs[d, "ours"] = side.run(label, n)
                runs[d, "torch"] = server.run(name, d, label, n)
            for side, r in runs.items():
                best[side, label, n] = min(best.get((side, label, n), float("inf")), r["seconds"])
    return best


def _print_profile(profile: dict, names, dtypes, args):
    """image | prefill = (1 new token) - image | per token = (N - 1 tokens) / (N - 1), in ms."""
    n = args.new_tokens
    print(f"\n# breakdown, ms (best of {args.repeats}): image = ViT + Q-Former + projection; prefill = "
          f"generate 1 token - image; step = (generate {n} - generate 1) / {n - 1}")
    head = (f"{'config':7} {'side':8} {'image':>8} {'greedy prefill':>14} {'greedy step':>11} "
            f"{'beam prefill':>12} {'beam step':>9}")
    print(head)
    print("-" * len(head))
    for name in names:
        b = profile[name]
        for side in [(d, who) for d in dtypes for who in ("ours", "torch")]:
            image = b[side, "image", None]
            row = [image]
            for m in ("greedy", "beam"):
                one, full = b[side, m, 1], b[side, m, n]
                row += [one - image, (full - one) / max(n - 1, 1)]
            label = f"{side[1]} {side[0][:4]}"
            print(f"{name:7} {label:8} {row[0] * 1e3:8.1f} {row[1] * 1e3:14.1f} {row[2] * 1e3:11.2f} "
                  f"{row[3] * 1e3:12.1f} {row[4] * 1e3:9.2f}")


if __name__ == "__main__":
    main()
