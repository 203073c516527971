"""Full-size generation benchmark: blip2_jax against transformers on a released architecture.

    python tools/bench_fullsize.py --config full-opt-2.7b --torch-python PY [--int8]

1. Writes (once) a random checkpoint with the released architecture as the release does
   (tools/make_full_checkpoint.py, run by the PyTorch interpreter; cached outside the repository).
2. Measures this machine's limits in the same run: read bandwidth (a reduction over 1 GiB) and
   the matmul peak in bfloat16 and float32 (a large matmul), in JAX and in PyTorch (the larger
   counts as the machine's).
3. Runs each side in a child process of its own (one at a time: each holds the whole model):
   load seconds, first caption (compilation included), steady caption, tokens/s at batch 1 and
   8, the image side, prefill and one decoding step, peak RSS, and the generated ids. One
   640x480 photo, prompt "Question: what is in the picture? Answer:", 20 greedy new tokens
   (min_new_tokens = max_new_tokens, so both sides generate exactly 20).
4. Prints both sides side by side with ratios, and each of our phases as a fraction of its
   roofline: decoding max(bytes read / bandwidth, FLOPs / peak); image side and prefill FLOPs /
   peak (FLOPs from XLA's cost analysis of our programs, bytes from the parameter tree).
`--int8`: also our int8 weight-only row.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from torch_child import torch_env  # noqa: E402
from make_full_checkpoint import CONFIGS, default_dir  # noqa: E402  (imports torch lazily)

PROMPT = "Question: what is in the picture? Answer:"
NEW_TOKENS = 20


def _child(cmd: list[str], env: dict, what: str) -> dict:
    """Runs a child that prints one JSON line last; its stderr passes through."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{what} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


OURS = r'''
import json, os, resource, sys, time
t_start = time.perf_counter()
import jax, jax.numpy as jnp, numpy as np
from skimage import data
import blip2_jax
from blip2_jax import sharding
d, dtype, quant = sys.argv[1], sys.argv[2], sys.argv[3]
N, PROMPT = int(sys.argv[4]), sys.argv[5]
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
out = {"import_s": time.perf_counter() - t_start, "rss_before_load": rss()}
t = time.perf_counter()
kw = {} if quant == "none" else {"quantize": quant}
model = blip2_jax.load(d, dtype=dtype, **kw)
jax.block_until_ready(model.params)
out["load_s"], out["rss_after_load"], out["hwm_after_load"] = time.perf_counter() - t, rss(), hwm()
out["weight_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(model.params)))
fresh = np.empty(1 << 30, np.uint8)  # pages the process never had: what loading must fill
t = time.perf_counter(); fresh.fill(1); out["first_touch_bw"] = fresh.nbytes / (time.perf_counter() - t)
del fresh
p = model.predictor
photo = data.chelsea()  # 300x451 photo, resized to 640x480 as a user's picture
from PIL import Image
photo = np.asarray(Image.fromarray(photo).resize((640, 480)))
def caption(batch, n=N):
    return model.generate_ids([photo] * batch, PROMPT, max_new_tokens=n, min_new_tokens=n)
def timed(f, reps=3, warm=True):
    if warm: f()
    best = 1e9
    for _ in range(reps):
        s = time.perf_counter(); f(); best = min(best, time.perf_counter() - s)
    return best
t = time.perf_counter(); ids = caption(1); out["first_s"] = time.perf_counter() - t
out["steady_s"] = timed(lambda: caption(1), warm=False)
out["ids"] = ids
pix1 = model.pixel_values([photo])
for b in (1, 8):
    pix = np.repeat(pix1, b, 0)
    sp = lambda: jax.block_until_ready(p._soft_prompts(p.params, jnp.asarray(pix)))
    one = lambda: model.generate_from_pixels(pix, [PROMPT] * b, max_new_tokens=1)
    full = lambda: model.generate_from_pixels(pix, [PROMPT] * b, max_new_tokens=N, min_new_tokens=N)
    img, t1, tn = timed(sp), timed(one), timed(full, 2)
    out[f"b{b}"] = {"image_s": img, "prefill_s": max(t1 - img, 0.0), "step_s": (tn - t1) / (N - 1), "total_s": tn,
                    "tok_per_s": b * N / tn}
# FLOPs of the image side and prefill from XLA's cost analysis (lowered, not compiled)
from blip2_jax import generation
ids_row = p.prompt_tokens(PROMPT)
length = p.bucket(len(ids_row))
def flops(fn, *args):
    return float(jax.jit(fn).lower(*args).cost_analysis().get("flops", 0.0))
for b in (1, 8):
    pix = jnp.asarray(np.repeat(pix1, b, 0))
    out[f"b{b}"]["image_flops"] = flops(lambda pr, x: generation.soft_prompts(p.model, pr, x), p.params, pix)
    prompt = p._soft_prompts(p.params, pix)
    ids_a = jnp.zeros((b, length), jnp.int32); mask = jnp.ones((b, length), jnp.int32)
    out[f"b{b}"]["prefill_flops"] = flops(lambda pr, s, i, m: p.model.apply({"params": pr}, s, i, m, method="lm_logits")[:, -1],
                                          p.params, prompt, ids_a, mask)
lm = p.params["language_model"]
leaves = jax.tree.leaves(lm)
out["llm_bytes"] = int(sum(x.size * x.dtype.itemsize for x in leaves))
out["llm_params"] = int(sum(x.size for x in leaves))
out["peak_rss"] = hwm()
print(json.dumps(out), flush=True)
'''

THEIRS = r'''
import json, sys, time
t_start = time.perf_counter()
import numpy as np, torch
from PIL import Image
from skimage import data
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from transformers.utils import logging
logging.set_verbosity_error(); logging.disable_progress_bar()
d, dtype = sys.argv[1], sys.argv[2]
N, PROMPT = int(sys.argv[3]), sys.argv[4]
def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
out = {"import_s": time.perf_counter() - t_start, "rss_before_load": rss(), "threads": torch.get_num_threads()}
t = time.perf_counter()
model = Blip2ForConditionalGeneration.from_pretrained(d, dtype=getattr(torch, dtype)).eval()
proc = Blip2Processor.from_pretrained(d)
out["load_s"], out["rss_after_load"], out["hwm_after_load"] = time.perf_counter() - t, rss(), hwm()
photo = Image.fromarray(data.chelsea()).resize((640, 480))
def inputs(b):
    x = proc(images=[photo] * b, text=[PROMPT] * b, return_tensors="pt")
    x["pixel_values"] = x["pixel_values"].to(model.dtype if dtype != "float32" else torch.float32)
    return x
q = model.config.num_query_tokens
def gen(b, n=N):
    with torch.inference_mode():
        return model.generate(**inputs(b), max_new_tokens=n, min_new_tokens=n, do_sample=False)
def timed(f, reps=3):
    best = 1e9
    for _ in range(reps):
        s = time.perf_counter(); f(); best = min(best, time.perf_counter() - s)
    return best
t = time.perf_counter(); seq = gen(1); out["first_s"] = time.perf_counter() - t
out["steady_s"] = timed(lambda: gen(1))
out["ids"] = seq[:, -N:].tolist()
for b in (1, 8):
    x = inputs(b)
    with torch.inference_mode():
        img = timed(lambda: model.get_image_features(pixel_values=x["pixel_values"]))
    t1 = timed(lambda: gen(b, 1))
    tn = timed(lambda: gen(b), 2)
    out[f"b{b}"] = {"image_s": img, "prefill_s": max(t1 - img, 0.0), "step_s": (tn - t1) / (N - 1), "total_s": tn,
                    "tok_per_s": b * N / tn}
out["peak_rss"] = hwm()
print(json.dumps(out), flush=True)
'''

LIMITS_JAX = r'''
import json, time, jax, jax.numpy as jnp
def best(f, *a, n=5):
    jax.block_until_ready(f(*a)); b = 1e9
    for _ in range(n):
        s = time.perf_counter(); jax.block_until_ready(f(*a)); b = min(b, time.perf_counter() - s)
    return b
x = jnp.ones((2**28,), jnp.float32)
bw = x.nbytes / best(jax.jit(jnp.sum), x)
del x
out = {"bandwidth": bw}
for dt in ("bfloat16", "float32"):
    a = jnp.ones((2048, 2048), dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    out[f"peak_{dt}"] = 2 * 2048**3 / best(f, a, a)
print(json.dumps(out))
'''

LIMITS_TORCH = r'''
import json, time, torch
def best(f, n=5):
    f(); b = 1e9
    for _ in range(n):
        s = time.perf_counter(); f(); b = min(b, time.perf_counter() - s)
    return b
x = torch.ones(2**28)
out = {"bandwidth": x.numel() * 4 / best(lambda: x.sum())}
del x
for dt in ("bfloat16", "float32"):
    a = torch.ones(2048, 2048, dtype=getattr(torch, dt))
    out[f"peak_{dt}"] = 2 * 2048**3 / best(lambda: a @ a)
print(json.dumps(out))
'''


def limits(torch_python: str) -> dict:
    """The machine's read bandwidth and matmul peaks: the larger of JAX's and PyTorch's."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    ours = _child([sys.executable, "-c", LIMITS_JAX], env, "the JAX limits")
    theirs = _child([torch_python, "-c", LIMITS_TORCH], torch_env(), "the PyTorch limits")
    return {k: max(ours[k], theirs[k]) for k in ours} | {"jax": ours, "torch": theirs}


def run_ours(d: str, dtype: str, quant: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=str(ROOT / "tools"))
    return _child([sys.executable, "-c", OURS, d, dtype, quant, str(NEW_TOKENS), PROMPT], env,
                  f"blip2_jax ({dtype}, {quant})")


def run_theirs(python: str, d: str, dtype: str) -> dict:
    env = torch_env()
    env["PYTHONPATH"] = str(ROOT / "tools")
    return _child([python, "-c", THEIRS, d, dtype, str(NEW_TOKENS), PROMPT], env,
                  f"transformers ({dtype})")


def roofline(ours: dict, lim: dict, dtype: str) -> dict:
    """Each phase's roofline seconds and the fraction of it reached."""
    peak, bw = lim[f"peak_{dtype}"], lim["bandwidth"]
    out = {}
    for b in (1, 8):
        r = ours[f"b{b}"]
        step_flops = 2.0 * ours["llm_params"] * b
        step_roof = max(ours["llm_bytes"] / bw, step_flops / peak)
        image_roof, prefill_roof = r["image_flops"] / peak, r["prefill_flops"] / peak
        out[b] = {"step": (step_roof, step_roof / r["step_s"]),
                  "image": (image_roof, image_roof / r["image_s"]),
                  "prefill": (prefill_roof, prefill_roof / max(r["prefill_s"], 1e-9))}
    return out


def report(name: str, dtype: str, lim: dict, ours: dict, theirs: dict, extra: dict) -> None:
    gb = 1e9
    print(f"# {name}, {dtype}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"# limits (same run): read bandwidth {lim['bandwidth'] / gb:.1f} GB/s; matmul peak bf16 "
          f"{lim['peak_bfloat16'] / gb:.0f}, f32 {lim['peak_float32'] / gb:.0f} GFLOP/s "
          f"(JAX {lim['jax']['bandwidth'] / gb:.1f} GB/s, {lim['jax']['peak_bfloat16'] / gb:.0f}/"
          f"{lim['jax']['peak_float32'] / gb:.0f}; PyTorch {lim['torch']['bandwidth'] / gb:.1f} GB/s, "
          f"{lim['torch']['peak_bfloat16'] / gb:.0f}/{lim['torch']['peak_float32'] / gb:.0f})")
    if "first_touch_bw" in ours:
        rate = ours["weight_bytes"] / ours["load_s"]
        print(f"# loading: {rate / gb:.2f} GB/s into fresh memory, whose first touch runs at "
              f"{ours['first_touch_bw'] / gb:.2f} GB/s on this machine (same run): {rate / ours['first_touch_bw']:.0%}")
    rows = [("load (s)", "load_s"), ("first caption, compile included (s)", "first_s"),
            ("next caption (s)", "steady_s")]
    sides = {"blip2_jax": ours, "transformers": theirs, **extra}
    print("| | " + " | ".join(sides) + " | ours / theirs |")
    print("|---|" + "---|" * (len(sides) + 1))
    for label, key in rows:
        vals = [f"{s[key]:.1f}" for s in sides.values()]
        print(f"| {label} | " + " | ".join(vals) + f" | {ours[key] / theirs[key]:.2f}x |")
    for b in (1, 8):
        vals = [f"{s[f'b{b}']['tok_per_s']:.2f}" for s in sides.values()]
        print(f"| tokens/s, batch {b} | " + " | ".join(vals)
              + f" | {ours[f'b{b}']['tok_per_s'] / theirs[f'b{b}']['tok_per_s']:.2f}x |")
    vals = [f"{s['peak_rss'] / 2**30:.1f}" for s in sides.values()]
    print(f"| peak RSS (GiB) | " + " | ".join(vals) + f" | {ours['peak_rss'] / theirs['peak_rss']:.2f}x |")
    same = ["yes" if s.get("ids") == theirs["ids"] else "no" for s in sides.values()]
    print(f"| same ids as transformers | " + " | ".join(same) + " | |")
    rf = roofline(ours, lim, dtype)
    print(f"\n# ours, per phase (ms; theirs in brackets) and the fraction of the roofline reached; "
          f"LLM weights {ours['llm_bytes'] / 2**30:.2f} GiB read per decoding step")
    print("| batch | phase | ours ms | transformers ms | roofline ms | fraction of roofline |")
    print("|---|---|---|---|---|---|")
    for b in (1, 8):
        for phase, key in (("image side", "image"), ("prefill", "prefill"), ("decode step", "step")):
            roof, frac = rf[b][key]
            print(f"| {b} | {phase} | {ours[f'b{b}'][f'{key}_s'] * 1e3:.0f} | {theirs[f'b{b}'][f'{key}_s'] * 1e3:.0f} "
                  f"| {roof * 1e3:.0f} | {frac:.0%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="full-opt-2.7b", choices=sorted(CONFIGS))
    p.add_argument("--torch-python", required=True, help="a Python interpreter with torch + transformers")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--checkpoint", help="the checkpoint folder (default: the cache folder; written if absent)")
    p.add_argument("--int8", action="store_true", help="also our int8 weight-only row")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args()
    d = pathlib.Path(args.checkpoint) if args.checkpoint else default_dir(args.config)
    if not (d / "model.safetensors.index.json").exists():
        subprocess.run([args.torch_python, str(ROOT / "tools" / "make_full_checkpoint.py"), args.config,
                        "--out", str(d)], check=True, env=torch_env())
    lim = limits(args.torch_python)
    ours = run_ours(str(d), args.dtype, "none")
    theirs = run_theirs(args.torch_python, str(d), args.dtype)
    extra = {"blip2_jax int8": run_ours(str(d), args.dtype, "int8")} if args.int8 else {}
    lim_after = limits(args.torch_python)
    lim = {k: max(lim[k], lim_after[k]) for k in ("bandwidth", "peak_bfloat16", "peak_float32")} | {
        "jax": lim["jax"], "torch": lim["torch"]}
    report(args.config, args.dtype, lim, ours, theirs, extra)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"limits": lim, "ours": ours, "theirs": theirs, **extra}, indent=1))


if __name__ == "__main__":
    main()
