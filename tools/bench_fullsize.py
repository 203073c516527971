"""Full-size generation benchmark: blip2_jax against transformers on a released architecture.

    python tools/bench_fullsize.py --config full-opt-2.7b --torch-python PY [--int8]
    python tools/bench_fullsize.py --device gpu --torch-python python3 --checkpoint /tmp/full-opt-2.7b

1. Writes (once) a random checkpoint with the released architecture as the release does
   (tools/make_full_checkpoint.py, run by the PyTorch interpreter; cached outside the repository).
2. Measures this machine's limits in the same run: loading's (a bare process reading the files
   into fresh memory, `FILL`), read bandwidth (a reduction over 1 GiB) and
   the matmul peak in bfloat16 and float32 (a large matmul), in JAX and in PyTorch (the larger
   counts as the machine's); on a CPU also one core's read bandwidth (one device's products run
   one after another on one thread; ours serves on every core, one device each: `--cores`).
3. Runs each side in a child process of its own (one at a time: each holds the whole model):
   load seconds, first caption (compilation included), steady caption, tokens/s at batch 1 and
   8, the image side, prefill and one decoding step, peak RSS, and the generated ids. One
   640x480 photo, prompt "Question: what is in the picture? Answer:", 20 greedy new tokens
   (min_new_tokens = max_new_tokens, so both sides generate exactly 20).
   Ours starts with an empty persistent compilation cache; a second process of ours then loads
   and captions with the cache the first one filled (first caption against the next).
4. Prints each figure to stderr as it is measured, then both sides side by side with ratios,
   and each of our phases as a fraction of its roofline: decoding max(bytes read / bandwidth,
   FLOPs / peak); image side and prefill FLOPs / peak (FLOPs from XLA's cost analysis of our
   programs, bytes from the parameter tree; for bfloat16 weights the peak is the faster of the
   bfloat16 and float32 products: a CPU without bfloat16 units serves in float32).
`--int8`: also our int8 weight-only row.
`--torch-dtype float32` (with `--dtype bfloat16`): transformers in float32, its fastest on a CPU
without bfloat16 units (where its bfloat16 matmul is a plain loop), against ours in bfloat16.
`--device gpu`: both sides on the GPU (JAX's CUDA platform without up-front memory reservation,
PyTorch's cuda device), the limits measured there (a reduction over 4 GiB, an 8192^3 matmul),
and each side's peak device memory beside its RSS; about 3 minutes on an H200, plus ~1.5 to
write the checkpoint there first.
`--train` (instead of the above): one stage-2 training step at full size (OPT configs), batch
`--batch` (2), `--text-len` (32) text tokens after the 32-query soft prompt, labels on the text:
ours is the trainer's jitted step (`main.create_state` from the checkpoint, frozen towers in
bfloat16, AdamW over the trainable part only), theirs transformers' forward + backward +
`torch.optim.AdamW` over the same trainable part (Q-Former, query tokens, projection, the
ViT's post-layernorm), towers frozen (`requires_grad_(False)`). Per side: load/initialise
seconds, first step (our compilation included), best of 3 steps, peak RSS; our step's FLOPs
(XLA's cost analysis of the unrolled step) as a fraction of the measured matmul peak. `--scan`:
our layers scanned (the trainer's default) instead of unrolled. Ours follows the config's
learning-rate warm-up, theirs a constant 1e-4: the losses show that both learn, not a race.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from torch_child import torch_env  # noqa: E402
from make_full_checkpoint import CONFIGS, default_dir, processor_side_files  # noqa: E402  (torch lazily)

PROMPT = "Question: what is in the picture? Answer:"
NEW_TOKENS = 20


def _child(cmd: list[str], env: dict, what: str) -> dict:
    """Runs a child that prints one JSON line last; its stderr passes through."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{what} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


# The start of a side's child: its figures go in `out`, a dict that prints each to stderr as it
# is set (a run cut short still shows them; `WHO` names the side).
PROGRESS = r'''
import sys
class Progress(dict):
    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        if k != "ids":
            print(f"[{WHO}] {k}: {v if not isinstance(v, float) else round(v, 4)}", file=sys.stderr, flush=True)
'''

OURS = PROGRESS + r'''
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
WHO = "blip2_jax " + quant
out = Progress(import_s=time.perf_counter() - t_start, rss_before_load=rss())
# pages the process never had: what loading must fill (before loading, so that this 1 GiB is
# not on top of the weights in the process's peak RSS)
# (4 KiB pages, as loading fills them: placement.small_pages)
from blip2_jax.weights import placement
with placement.small_pages():
    fresh = np.empty(1 << 30, np.uint8)
t = time.perf_counter(); fresh.fill(1); out["first_touch_bw"] = fresh.nbytes / (time.perf_counter() - t)
del fresh
t = time.perf_counter()
kw = {} if quant == "none" else {"quantize": quant}
from blip2_jax import cores
CORES = int(os.environ.get("BENCH_CORES", "1"))
model = blip2_jax.load(d, dtype=dtype, mesh=cores.mesh(CORES), **kw)
jax.block_until_ready(model.params)
out["load_s"], out["rss_after_load"], out["hwm_after_load"] = time.perf_counter() - t, rss(), hwm()
out["weight_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(model.params)))
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
out["hwm_caption"] = hwm()  # load + batch-1 captions: one image-side and one generation program
out["ids"] = ids
pix1 = model.pixel_values([photo])
for b in (1, 8):
    pix = np.repeat(pix1, b, 0)
    def sp():
        with sharding.use(p.mesh):
            return jax.block_until_ready(p._soft_prompts(p.params, jnp.asarray(pix)))
    one = lambda: model.generate_from_pixels(pix, [PROMPT] * b, max_new_tokens=1)
    full = lambda: model.generate_from_pixels(pix, [PROMPT] * b, max_new_tokens=N, min_new_tokens=N)
    img, t1, tn = timed(sp), timed(one), timed(full, 2)
    out[f"b{b}"] = {"image_s": img, "prefill_s": max(t1 - img, 0.0), "step_s": (tn - t1) / (N - 1), "total_s": tn,
                    "tok_per_s": b * N / tn}
out["hwm_phases"] = hwm()  # every serving phase; the FLOP analysis below is the benchmark's own
# FLOPs of the image side and prefill from XLA's cost analysis (lowered, not compiled)
from blip2_jax import generation
ids_row = p.prompt_tokens(PROMPT)
length = p.bucket(len(ids_row))
from blip2_jax.models import streaming
# FLOPs counted on the plain [out, in] layout: XLA counts a loop's body once, and a kernel laid
# out in input bands (streaming.Banded) is multiplied band by band in a loop
plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, streaming.Banded) else x,
                     p.params, is_leaf=lambda x: isinstance(x, streaming.Banded))
# and with the layers unrolled: XLA counts a scanned layer loop's body once
def unrolled(tree):
    out = {}
    for k, v in tree.items():
        if k == "layers":
            n = jax.tree.leaves(v)[0].shape[0]
            out.update({f"layers_{i}": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), v)
                        for i in range(n)})
        else:
            out[k] = unrolled(v) if isinstance(v, dict) else v
    return out
import dataclasses
flat_model = dataclasses.replace(p.model, scan_layers=False, vision_scan_layers=False, parent=None)
plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unrolled(plain))  # one device's program
def flops(fn, *args):  # None where the backend has no count before compilation (GPU: the compiled
    cost = jax.jit(fn).lower(*args).cost_analysis()  # one leaves out its cuBLAS products)
    return None if not cost else float(cost.get("flops", 0.0))
for b in (1, 8):
    pix = jnp.asarray(np.repeat(pix1, b, 0))
    out[f"b{b}"]["image_flops"] = flops(lambda pr, x: generation.soft_prompts(flat_model, pr, x), plain, pix)
    with sharding.use(p.mesh):
        prompt = jax.device_get(p._soft_prompts(p.params, pix))
    ids_a = jnp.zeros((b, length), jnp.int32); mask = jnp.ones((b, length), jnp.int32)
    out[f"b{b}"]["prefill_flops"] = flops(lambda pr, s, i, m: flat_model.apply({"params": pr}, s, i, m, method="lm_logits")[:, -1],
                                          plain, prompt, ids_a, mask)
lm = p.params["language_model"]
leaves = jax.tree.leaves(lm)
out["llm_bytes"] = int(sum(x.size * x.dtype.itemsize for x in leaves))
out["llm_params"] = int(sum(x.size for x in leaves))
out["peak_rss"] = hwm()
stats = jax.devices()[0].memory_stats() or {}
if jax.devices()[0].platform != "cpu" and "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
print(json.dumps(out), flush=True)
'''

THEIRS = PROGRESS + r'''
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
dev = sys.argv[5] if len(sys.argv) > 5 else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
WHO = "transformers"
out = Progress(import_s=time.perf_counter() - t_start, rss_before_load=rss(), threads=torch.get_num_threads())
t = time.perf_counter()
model = Blip2ForConditionalGeneration.from_pretrained(d, dtype=getattr(torch, dtype)).eval().to(dev)
proc = Blip2Processor.from_pretrained(d)
sync()
out["load_s"], out["rss_after_load"], out["hwm_after_load"] = time.perf_counter() - t, rss(), hwm()
photo = Image.fromarray(data.chelsea()).resize((640, 480))
def inputs(b):
    x = proc(images=[photo] * b, text=[PROMPT] * b, return_tensors="pt")
    x["pixel_values"] = x["pixel_values"].to(model.dtype if dtype != "float32" else torch.float32)
    return x.to(dev)
q = model.config.num_query_tokens
def gen(b, n=N):
    with torch.inference_mode():
        return model.generate(**inputs(b), max_new_tokens=n, min_new_tokens=n, do_sample=False)
def timed(f, reps=3):
    best = 1e9
    for _ in range(reps):
        s = time.perf_counter(); f(); sync(); best = min(best, time.perf_counter() - s)
    return best
t = time.perf_counter(); seq = gen(1); out["first_s"] = time.perf_counter() - t
out["steady_s"] = timed(lambda: gen(1))
out["hwm_caption"] = hwm()
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
if dev == "cuda":
    out["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
print(json.dumps(out), flush=True)
'''

LIMITS_JAX = r'''
import json, os, sys, time
elements, n = int(sys.argv[1]), int(sys.argv[2])  # summed float32s; the matmul's size
one_core = len(sys.argv) > 3  # read bandwidth from one core only (before jax sizes its threads)
if one_core:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jax, jax.numpy as jnp
def best(f, *a, n=5):
    jax.block_until_ready(f(*a)); b = 1e9
    for _ in range(n):
        s = time.perf_counter(); jax.block_until_ready(f(*a)); b = min(b, time.perf_counter() - s)
    return b
x = jnp.ones((elements,), jnp.float32)
bw = x.nbytes / best(jax.jit(jnp.sum), x)
del x
out = {"bandwidth": bw}
for dt in () if one_core else ("bfloat16", "float32"):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    out[f"peak_{dt}"] = 2 * n**3 / best(f, a, a)
print(json.dumps(out))
'''

LIMITS_TORCH = r'''
import json, sys, time, torch
elements, n, dev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
one_core = len(sys.argv) > 4
if one_core:
    torch.set_num_threads(1)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def best(f, n=5):
    f(); sync(); b = 1e9
    for _ in range(n):
        s = time.perf_counter(); f(); sync(); b = min(b, time.perf_counter() - s)
    return b
x = torch.ones(elements, device=dev)
out = {"bandwidth": x.numel() * 4 / best(lambda: x.sum())}
del x
for dt in () if one_core else ("bfloat16", "float32"):
    # a probe first: without AVX-512 BF16 or AMX, PyTorch's bfloat16 CPU matmul is a plain loop
    # at ~1.5 GFLOP/s (minutes at size n); the benchmark then stops (main)
    m = 256
    a = torch.randn(m, m, dtype=getattr(torch, dt), device=dev)
    probe = 2 * m**3 / best(lambda: a @ a, 2)
    if probe < 20e9 and dev == "cpu" and dt == "bfloat16":
        out[f"peak_{dt}"] = probe
        continue
    a = torch.randn(n, n, dtype=getattr(torch, dt), device=dev)
    out[f"peak_{dt}"] = 2 * n**3 / best(lambda: a @ a)
print(json.dumps(out))
'''


TRAIN_OURS = r'''
import json, sys, time
import jax, numpy as np
from blip2_jax import config_lib, main, sharding
d, preset, b, t, scan = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
cfg = config_lib.base(task="lm", preset=preset)
cfg.init.source, cfg.init.hf_dir = "hf", d
cfg.model.vision_dtype = cfg.model.text_dtype = cfg.model.frozen_param_dtype = "bfloat16"
cfg.model.scan_layers = scan
cfg.model.remat_policy = "none"
cfg.input.batch_size, cfg.input.max_text_len, cfg.input.image_size = b, t, 224
out = {"rss_before_load": hwm()}
mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
with sharding.use(mesh):
    s = time.perf_counter()
    model, _, task, state, frozen, schedule = main.create_state(cfg, mesh)
    jax.block_until_ready((state, frozen))
    out["load_s"], out["hwm_after_load"] = time.perf_counter() - s, hwm()
    out["trainable"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
    out["frozen_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(frozen)))
    out["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(state)))
    rng = np.random.default_rng(0)
    size = model.config.vision.image_size
    text = rng.integers(3, 30000, (b, t)).astype(np.int32)
    batch = {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32), "llm_input_ids": text,
             "llm_attention_mask": np.ones_like(text), "llm_labels": text}
    assert set(task.batch_keys) == set(batch), task.batch_keys
    s = time.perf_counter()
    step = jax.jit(main.make_train_step(task, schedule), donate_argnums=(0,)).lower(
        state, frozen, batch, jax.random.key(0)).compile()
    out["compile_s"] = time.perf_counter() - s
    out["flops"] = main.unrolled_step_flops(cfg, batch)  # a scanned stack's loop body counts once
    times, losses = [], []
    for i in range(4):
        s = time.perf_counter()
        state, m = step(state, frozen, batch, jax.random.key(i))
        losses.append(float(m["loss"])); times.append(time.perf_counter() - s)
out["first_s"] = out["compile_s"] + times[0]
out["step_s"], out["losses"], out["peak_rss"] = min(times[1:]), losses, hwm()
print(json.dumps(out), flush=True)
'''

TRAIN_THEIRS = r'''
import json, sys, time
import torch
from transformers import Blip2ForConditionalGeneration
from transformers.utils import logging
logging.set_verbosity_error(); logging.disable_progress_bar()
d, b, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
out = {"rss_before_load": hwm(), "threads": torch.get_num_threads()}
s = time.perf_counter()
model = Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).train()
model.vision_model.requires_grad_(False)
model.vision_model.post_layernorm.requires_grad_(True)  # ln_vision is trained with the Q-Former
model.language_model.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
out["load_s"], out["hwm_after_load"] = time.perf_counter() - s, hwm()
out["trainable"] = sum(p.numel() for p in params)
q, image_token = model.config.num_query_tokens, model.config.image_token_index
g = torch.Generator().manual_seed(0)
size = model.config.vision_config.image_size
pixels = torch.randn(b, 3, size, size, generator=g).to(torch.bfloat16)
text = torch.randint(3, 30000, (b, t), generator=g)
ids = torch.cat([torch.full((b, q), image_token), text], 1)
labels = torch.cat([torch.full((b, q), -100), text], 1)
batch = dict(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
times, losses = [], []
for i in range(4):
    s = time.perf_counter()
    loss = model(**batch).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(loss.item()); times.append(time.perf_counter() - s)
out["first_s"], out["step_s"], out["losses"], out["peak_rss"] = times[0], min(times[1:]), losses, hwm()
print(json.dumps(out), flush=True)
'''

PRESETS = {"full-opt-2.7b": "vitg_opt2.7b", "full-opt-6.7b": "vitg_opt6.7b"}


def run_train(args, d: str, lim: dict) -> dict:
    """Ours and theirs, one training step each side (see the module docstring); prints the table."""
    if args.config not in PRESETS:
        sys.exit(f"--train: OPT configs only ({', '.join(PRESETS)}), got {args.config}")
    env = jax_env()
    ours = _child([sys.executable, "-c", TRAIN_OURS, d, PRESETS[args.config], str(args.batch), str(args.text_len),
                   str(int(args.scan))], env, "blip2_jax training step")
    theirs = _child([args.torch_python, "-c", TRAIN_THEIRS, d, str(args.batch), str(args.text_len)], torch_env(),
                    "transformers training step")
    gib = 2**30
    print(f"# {args.config}, stage-2 training step, batch {args.batch}, {args.text_len} text tokens; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; frozen towers bfloat16, "
          f"our layers {'scanned' if args.scan else 'unrolled'}")
    print(f"# matmul peak bf16 {lim['peak_bfloat16'] / 1e9:.0f} GFLOP/s (same run); our step "
          f"{ours['flops'] / 1e9:.0f} GFLOP (XLA's count) runs at {ours['flops'] / ours['step_s'] / lim['peak_bfloat16']:.0%} "
          f"of it; transformers' step, which does at least that work, at >= "
          f"{ours['flops'] / theirs['step_s'] / lim['peak_bfloat16']:.0%}; a step at 0.8x theirs would need "
          f"{ours['flops'] / (0.8 * theirs['step_s']) / lim['peak_bfloat16']:.0%}")
    print(f"# trainable parameters: ours {ours['trainable'] / 1e6:.1f}M, theirs {theirs['trainable'] / 1e6:.1f}M; "
          f"our optimizer state + trainable {ours['state_bytes'] / gib:.2f} GiB, frozen {ours['frozen_bytes'] / gib:.2f} GiB")
    print("| | blip2_jax | transformers | ours / theirs |\n|---|---|---|---|")
    for label, key, scale in (("load + set-up (s)", "load_s", 1), ("first step, compile included (s)", "first_s", 1),
                              ("step (s), best of 3", "step_s", 1), ("peak RSS (GiB)", "peak_rss", gib)):
        print(f"| {label} | {ours[key] / scale:.2f} | {theirs[key] / scale:.2f} | {ours[key] / theirs[key]:.2f}x |")
    print(f"| losses (random weights) | {', '.join(f'{x:.3f}' for x in ours['losses'])} "
          f"| {', '.join(f'{x:.3f}' for x in theirs['losses'])} | |")
    return {"ours": ours, "theirs": theirs}


RESTART = r'''
import json, sys, time
t_start = time.perf_counter()
import jax, numpy as np
from PIL import Image
from skimage import data
import os
import blip2_jax
from blip2_jax import cores
d, dtype, N, PROMPT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import_s = time.perf_counter() - t_start
t = time.perf_counter()
model = blip2_jax.load(d, dtype=dtype, mesh=cores.mesh(int(os.environ.get("BENCH_CORES", "1"))))
jax.block_until_ready(model.params)
load_s = time.perf_counter() - t
photo = np.asarray(Image.fromarray(data.chelsea()).resize((640, 480)))
caption = lambda: model.generate_ids([photo], PROMPT, max_new_tokens=N, min_new_tokens=N)
t = time.perf_counter(); caption(); first = time.perf_counter() - t
steady = 1e9
for _ in range(2):
    t = time.perf_counter(); caption(); steady = min(steady, time.perf_counter() - t)
print(json.dumps({"first_s": first, "steady_s": steady, "import_s": import_s, "load_s": load_s}), flush=True)
'''


# --device: JAX's platform, PyTorch's device, (summed float32s, matmul size) of the limits
DEVICES = {"cpu": ("cpu", "cpu", (2**28, 2048)), "gpu": ("cuda", "cuda", (2**30, 8192))}
DEVICE = "cpu"
CORES = 1  # --cores: our side's host devices on a CPU (blip2_jax/cores.py)


def jax_env(**extra) -> dict:
    """The environment of a JAX child: this device's platform, the project and tools/ importable."""
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tools"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", DEVICES[DEVICE][0]), PYTHONPATH=path,
               BENCH_CORES=str(CORES))
    env.update(extra)
    if DEVICE != "cpu":  # device memory as used, not XLA's up-front reservation
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def run_restart(d: str, dtype: str, cache_dir: str) -> dict:
    """A second process of ours with the compilation and tokenizer caches the first one filled."""
    env = jax_env(BLIP2_JAX_COMPILATION_CACHE=cache_dir, BLIP2_JAX_TOKENIZER_CACHE=cache_dir + "/tokenizers")
    return _child([sys.executable, "-c", RESTART, d, dtype, str(NEW_TOKENS), PROMPT], env, "blip2_jax (second process)")


def limits(torch_python: str) -> dict:
    """The machine's read bandwidth and matmul peaks: the larger of JAX's and PyTorch's."""
    _, dev, (elements, n) = DEVICES[DEVICE]
    ours = _child([sys.executable, "-c", LIMITS_JAX, str(elements), str(n)], jax_env(), "the JAX limits")
    theirs = _child([torch_python, "-c", LIMITS_TORCH, str(elements), str(n), dev], torch_env(), "the PyTorch limits")
    out = {k: max(ours[k], theirs[k]) for k in ours} | {"jax": ours, "torch": theirs}
    if dev == "cpu":  # one core's: a decoding step's products run one after another on one thread
        one = [_child([sys.executable, "-c", LIMITS_JAX, str(elements), str(n), "one"], jax_env(), "the JAX limits"),
               _child([torch_python, "-c", LIMITS_TORCH, str(elements), str(n), dev, "one"], torch_env(),
                      "the PyTorch limits")]
        out["bandwidth_one_core"] = max(x["bandwidth"] for x in one)
    return out


FILL = r'''
import json, os, sys, time
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from numpy._core import multiarray
multiarray._set_madvise_hugepage(False)  # 4 KiB pages, as loading fills them
def part(fd, view, offset):
    done = 0
    while done < len(view):
        done += os.preadv(fd, [view[done:]], offset + done)
keep, total, step = [], 0, 16 << 20
t = time.perf_counter()
with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    for path in sys.argv[1:]:
        fd = os.open(path, os.O_RDONLY)
        n = os.fstat(fd).st_size
        buf = np.empty(n, np.uint8)
        view = memoryview(buf)
        list(pool.map(lambda o: part(fd, view[o:o + step], o), range(0, n, step)))
        os.close(fd)
        keep.append(buf)
        total += n
print(json.dumps({"fill_bytes": total, "fill_s": time.perf_counter() - t}))
'''


def run_fill(d: str) -> dict:
    """Loading's limit on this machine: a bare process reading the checkpoint's files into fresh
    memory (all of it at once, as loading holds it), with loading's threads and page size."""
    shards = sorted(str(f) for f in pathlib.Path(d).glob("*.safetensors"))
    return _child([sys.executable, "-c", FILL, *shards], jax_env(), "the fill limit")


def run_ours(d: str, dtype: str, quant: str, cache_dir: str | None = None) -> dict:
    env = jax_env()
    if cache_dir:  # empty caches: a first process
        env["BLIP2_JAX_COMPILATION_CACHE"] = cache_dir
        env["BLIP2_JAX_TOKENIZER_CACHE"] = cache_dir + "/tokenizers"
    return _child([sys.executable, "-c", OURS, d, dtype, quant, str(NEW_TOKENS), PROMPT], env,
                  f"blip2_jax ({dtype}, {quant})")


def run_theirs(python: str, d: str, dtype: str) -> dict:
    env = torch_env()
    env["PYTHONPATH"] = str(ROOT / "tools")
    return _child([python, "-c", THEIRS, d, dtype, str(NEW_TOKENS), PROMPT, DEVICES[DEVICE][1]], env,
                  f"transformers ({dtype})")


def matmul_peak(lim: dict, dtype: str) -> float:
    """The matmul peak a phase of ours in `dtype` is measured against (see roofline)."""
    return lim["peak_float32"] if dtype == "float32" else max(lim["peak_bfloat16"], lim["peak_float32"])


def roofline(ours: dict, lim: dict, dtype: str) -> dict:
    """Each phase's roofline seconds and the fraction of it reached. Half-precision weights: the
    matmul peak is the machine's faster of bfloat16 and float32 (on a CPU without bfloat16 units
    serving multiplies in float32, `streaming.product_dtype`)."""
    peak, bw = matmul_peak(lim, dtype), lim["bandwidth"]
    out = {}
    for b in (1, 8):
        r = ours[f"b{b}"]
        step_flops = 2.0 * ours["llm_params"] * b
        step_roof = max(ours["llm_bytes"] / bw, step_flops / peak)
        out[b] = {"step": (step_roof, step_roof / r["step_s"])}
        for key in ("image", "prefill"):
            roof = None if r[f"{key}_flops"] is None else r[f"{key}_flops"] / peak
            out[b][key] = (roof, None if roof is None else roof / max(r[f"{key}_s"], 1e-9))
    return out


def report(name: str, dtype: str, lim: dict, ours: dict, theirs: dict, extra: dict, torch_dtype: str) -> None:
    gb = 1e9
    dtypes = dtype if torch_dtype == dtype else f"ours {dtype}, transformers {torch_dtype}"
    print(f"# {name}, {dtypes}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; ours on {CORES} host device(s)")
    print(f"# limits (same run): read bandwidth {lim['bandwidth'] / gb:.1f} GB/s; matmul peak bf16 "
          f"{lim['peak_bfloat16'] / gb:.0f}, f32 {lim['peak_float32'] / gb:.0f} GFLOP/s "
          f"(JAX {lim['jax']['bandwidth'] / gb:.1f} GB/s, {lim['jax']['peak_bfloat16'] / gb:.0f}/"
          f"{lim['jax']['peak_float32'] / gb:.0f}; PyTorch {lim['torch']['bandwidth'] / gb:.1f} GB/s, "
          f"{lim['torch']['peak_bfloat16'] / gb:.0f}/{lim['torch']['peak_float32'] / gb:.0f})")
    if "first_touch_bw" in ours:
        rate = ours["weight_bytes"] / ours["load_s"]
        print(f"# loading: {rate / gb:.2f} GB/s into fresh memory, whose first touch runs at "
              f"{ours['first_touch_bw'] / gb:.2f} GB/s for 1 GiB on this machine (same run)")
    if "fill_s" in lim:
        print(f"# loading's limit (same run): a bare process reads the {lim['fill_bytes'] / gb:.2f} GB of files into "
              f"fresh memory in {lim['fill_s']:.1f} s ({lim['fill_bytes'] / lim['fill_s'] / gb:.2f} GB/s); our load "
              f"{ours['load_s']:.1f} s: {lim['fill_s'] / ours['load_s']:.0%} of that rate")
    rows = [("imports (s)", "import_s"), ("load (s)", "load_s"),
            ("imports + load: a fresh process until the model is ready (s)", "ready_s"),
            ("first caption, compile included (s)", "first_s"), ("next caption (s)", "steady_s")]
    for side in (ours, theirs, *extra.values()):  # theirs imports torch + transformers before
        side["ready_s"] = side["import_s"] + side["load_s"]  # its timer; ours in load (tokenizer)
    r = ours["restart"]
    print(f"# a second process of ours, compilation and tokenizer caches warm: imports + load "
          f"{r['import_s'] + r['load_s']:.1f} s, first caption {r['first_s']:.1f} s, "
          f"next {r['steady_s']:.1f} s ({r['first_s'] / r['steady_s']:.2f}x); first process "
          f"{ours['first_s'] / ours['steady_s']:.2f}x")
    sides = {"blip2_jax": ours, "transformers": theirs, **extra}
    print("| | " + " | ".join(sides) + " | ours / theirs |")
    print("|---|" + "---|" * (len(sides) + 1))
    for label, key in rows:
        vals = [f"{s[key]:.3g}" for s in sides.values()]
        print(f"| {label} | " + " | ".join(vals) + f" | {ours[key] / theirs[key]:.2f}x |")
    for b in (1, 8):
        vals = [f"{s[f'b{b}']['tok_per_s']:.2f}" for s in sides.values()]
        print(f"| tokens/s, batch {b} | " + " | ".join(vals)
              + f" | {ours[f'b{b}']['tok_per_s'] / theirs[f'b{b}']['tok_per_s']:.2f}x |")
    vals = [f"{x['hwm_caption'] / 2**30:.2f}" for x in sides.values()]
    print(f"| peak RSS after load and batch-1 captions (GiB) | " + " | ".join(vals)
          + f" | {ours['hwm_caption'] / theirs['hwm_caption']:.2f}x |")
    phases = {name: x.get("hwm_phases", x["peak_rss"]) for name, x in sides.items()}
    vals = [f"{v / 2**30:.1f}" for v in phases.values()]
    mine = phases["blip2_jax"]
    print(f"| peak RSS, all phases (GiB) | " + " | ".join(vals) + f" | {mine / theirs['peak_rss']:.2f}x |")
    print(f"# our peak RSS over the placed weights ({ours['weight_bytes'] / 2**30:.2f} GiB): after load "
          f"{ours['hwm_after_load'] / ours['weight_bytes']:.2f}x, after batch-1 captions "
          f"{ours['hwm_caption'] / ours['weight_bytes']:.2f}x, all phases {mine / ours['weight_bytes']:.2f}x "
          f"({ours['peak_rss'] / ours['weight_bytes']:.2f}x with the benchmark's own FLOP analysis after them)")
    if "device_peak_bytes" in ours and "device_peak_bytes" in theirs:
        vals = [f"{s.get('device_peak_bytes', 0) / 2**30:.1f}" for s in sides.values()]
        print(f"| peak device memory (GiB) | " + " | ".join(vals)
              + f" | {ours['device_peak_bytes'] / theirs['device_peak_bytes']:.2f}x |")
    same = ["yes" if s.get("ids") == theirs["ids"] else "no" for s in sides.values()]
    print(f"| same ids as transformers | " + " | ".join(same) + " | |")
    rf = roofline(ours, lim, dtype)
    print(f"\n# ours, per phase (ms; theirs in brackets) and the fraction of the roofline reached; "
          f"LLM weights {ours['llm_bytes'] / 2**30:.2f} GiB read per decoding step; matmul peak "
          f"{matmul_peak(lim, dtype) / 1e9:.0f} GFLOP/s")
    print("| batch | phase | ours ms | transformers ms | roofline ms | fraction of roofline |")
    print("|---|---|---|---|---|---|")
    for b in (1, 8):
        for phase, key in (("image side", "image"), ("prefill", "prefill"), ("decode step", "step")):
            roof, frac = rf[b][key]
            roof, frac = ("-", "-") if roof is None else (f"{roof * 1e3:.1f}", f"{frac:.0%}")
            print(f"| {b} | {phase} | {ours[f'b{b}'][f'{key}_s'] * 1e3:.1f} | {theirs[f'b{b}'][f'{key}_s'] * 1e3:.1f} "
                  f"| {roof} | {frac} |")
    if "bandwidth_one_core" in lim:
        rate = ours["llm_bytes"] / ours["b1"]["step_s"]
        print(f"# batch-1 decoding streams the weights at {rate / 1e9:.1f} GB/s on {CORES} host device(s): "
              f"{rate / lim['bandwidth']:.0%} of all cores' read bandwidth, {rate / lim['bandwidth_one_core']:.0%} "
              f"of one core's ({lim['bandwidth_one_core'] / 1e9:.1f} GB/s, same run)")


def _progress(what: str, figures: dict) -> None:
    """A measured phase on stderr at once (the report comes at the end)."""
    print(f"[{what}] " + ", ".join(f"{k}: {v:.4g}" for k, v in figures.items()), file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="full-opt-2.7b", choices=sorted(CONFIGS))
    p.add_argument("--torch-python", required=True, help="a Python interpreter with torch + transformers")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--torch-dtype", choices=("bfloat16", "float32"),
                   help="transformers' dtype where it differs from ours (default: --dtype)")
    p.add_argument("--device", default="cpu", choices=sorted(DEVICES),
                   help="where both sides run (gpu: JAX's CUDA platform, PyTorch's cuda device)")
    p.add_argument("--checkpoint", help="the checkpoint folder (default: the cache folder; written if absent)")
    p.add_argument("--int8", action="store_true", help="also our int8 weight-only row")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--cores", type=int, default=None,
                   help="CPU: our side serves on this many cores, one device each (default: every core, as the "
                        "CLIs; 1: one device)")
    p.add_argument("--train", action="store_true", help="time one stage-2 training step instead (see above)")
    p.add_argument("--batch", type=int, default=2, help="--train: images per step")
    p.add_argument("--text-len", type=int, default=32, help="--train: text tokens per image")
    p.add_argument("--scan", action="store_true", help="--train: our layers scanned (default unrolled)")
    args = p.parse_args()
    global DEVICE, CORES
    DEVICE = args.device
    CORES = (args.cores or len(os.sched_getaffinity(0))) if DEVICE == "cpu" else 1
    d = pathlib.Path(args.checkpoint) if args.checkpoint else default_dir(args.config)
    if not (d / "model.safetensors.index.json").exists():
        subprocess.run([args.torch_python, str(ROOT / "tools" / "make_full_checkpoint.py"), args.config,
                        "--out", str(d)], check=True, env=torch_env())
    cfg = json.loads((d / "config.json").read_text())  # checkpoints cached before the processor fix
    processor_side_files(d, cfg["vision_config"]["image_size"], cfg["num_query_tokens"])
    lim = limits(args.torch_python)
    torch_dtype = args.torch_dtype or args.dtype
    slow = lim["torch"][f"peak_{torch_dtype}"] if torch_dtype == "bfloat16" and DEVICE == "cpu" else None
    if slow is not None and slow < 0.05 * lim["torch"]["peak_float32"]:
        sys.exit(f"error: PyTorch's bfloat16 matmul runs at {slow / 1e9:.1f} GFLOP/s on this CPU against "
                 f"{lim['torch']['peak_float32'] / 1e9:.0f} in float32 (no AVX-512 BF16 or AMX), so transformers' "
                 f"side would take hours; use --torch-dtype float32 (or --dtype float32), or a CPU with "
                 f"bfloat16 units")
    if args.train:
        figures = run_train(args, str(d), lim)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"limits": lim, **figures}, indent=1))
        return
    _progress("limits", {k: v for k, v in lim.items() if not isinstance(v, dict)})
    lim.update(run_fill(str(d)))
    _progress("loading's limit", {k: lim[k] for k in ("fill_bytes", "fill_s")})
    with tempfile.TemporaryDirectory() as cache_dir:  # an empty compilation cache: compile included
        ours = run_ours(str(d), args.dtype, "none", cache_dir)
        ours["restart"] = run_restart(str(d), args.dtype, cache_dir)
    theirs = run_theirs(args.torch_python, str(d), torch_dtype)
    extra = {"blip2_jax int8": run_ours(str(d), args.dtype, "int8")} if args.int8 else {}
    lim_after = limits(args.torch_python)
    lim = {k: max(lim[k], lim_after[k]) for k in ("bandwidth", "peak_bfloat16", "peak_float32", "bandwidth_one_core")
           if k in lim} | {
        "jax": lim["jax"], "torch": lim["torch"], "fill_bytes": lim["fill_bytes"], "fill_s": lim["fill_s"]}
    report(args.config, args.dtype, lim, ours, theirs, extra, torch_dtype)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"limits": lim, "ours": ours, "theirs": theirs,
                                                     "torch_dtype": torch_dtype, **extra}, indent=1))


if __name__ == "__main__":
    main()
