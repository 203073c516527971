"""Decoding speed of int8 frozen towers against bfloat16, one process, same checkpoint, same run.

    python tools/bench_quant.py [--config small] [--batches 1,8] [--new-tokens 21] [--repeats 3]
        [--dir DIR]   # a transformers-format BLIP-2 OPT checkpoint (default: a random one of --config)

Per (batch, dtype): seconds per greedy decoding step = (time for N new tokens - time for 1) / (N - 1),
best of --repeats alternating runs; tokens/s = batch / that; bytes per step = every language-model
weight a step reads (layers, final norm, the tied output head; not the position table) in its
stored form; bandwidth = bytes per step / seconds per step. Also times the output head alone and
one layer's FFN matmul alone (the ops a CPU decoding step spends its time in).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# the small configuration of tools/bench_generate.py: ViT 224/14 12x384, Q-Former 6x384, OPT 12x768
SMALL = dict(vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                         image_size=224, patch_size=14),
             qformer=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6),
             text=dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                       word_embed_proj_dim=768, max_position_embeddings=512))


def write_random(directory: str) -> None:
    import jax
    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.models.configs import Blip2Config, OPTConfig, QFormerConfig, VisionConfig
    from blip2_jax.weights import hf
    cfg = Blip2Config(vision=VisionConfig(**SMALL["vision"]),
                      qformer=QFormerConfig(encoder_hidden_size=384, **SMALL["qformer"]),
                      text=OPTConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, **SMALL["text"]),
                      num_query_tokens=32)
    abstract = sharding.unbox(build.abstract_params(Blip2(cfg, scan_layers=False), cfg))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02), abstract)
    here = os.path.dirname(os.path.abspath(__file__))
    hf.save(directory, cfg, params, side_files_from=os.path.join(here, "..", "tests", "golden", "blip2_opt"),
            dtype=np.float32)


def step_bytes(params) -> int:
    """Bytes of the language-model weights one decoding step reads (stored form)."""
    from blip2_jax import quant
    from blip2_jax.weights import placement
    lm = params["language_model"]
    flat = placement.flatten(lm)
    return sum(quant.tree_bytes([x]) for p, x in flat.items() if p[0] != "embed_positions")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import jax
    import blip2_jax

    directory = args.dir or tempfile.mkdtemp(prefix="blip2_bench_quant_")
    if not args.dir:
        write_random(directory)
    models = {q: blip2_jax.load(directory, dtype="bfloat16", quantize=q) for q in ("none", "int8")}
    photo = np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)
    rows = []
    for batch in map(int, args.batches.split(",")):
        times = {q: {1: 1e9, args.new_tokens: 1e9} for q in models}
        for q, m in models.items():  # compile
            for n in times[q]:
                m.generate_ids([photo] * batch, max_new_tokens=n, min_new_tokens=n)
        for _ in range(args.repeats):
            for q, m in models.items():
                for n in times[q]:
                    t = time.perf_counter()
                    m.generate_ids([photo] * batch, max_new_tokens=n, min_new_tokens=n)
                    times[q][n] = min(times[q][n], time.perf_counter() - t)
        for q, m in models.items():
            step = (times[q][args.new_tokens] - times[q][1]) / (args.new_tokens - 1)
            nbytes = step_bytes(m.params)
            rows.append(dict(batch=batch, frozen="bfloat16" if q == "none" else "int8", step_ms=step * 1e3,
                             tokens_per_s=batch / step, bytes_per_step=nbytes, gb_per_s=nbytes / step / 1e9))
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["frozen"] == "bfloat16"}
    bw = read_bandwidth()
    print(f"machine read bandwidth (same run, a reduction over 1 GiB): {bw / 1e9:.1f} GB/s")
    print("| batch | frozen towers | ms / step | tokens/s | vs bfloat16 | MB / step | GB/s | of bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['frozen']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base[r['batch']]:.2f}x | {r['bytes_per_step'] / 1e6:.0f} | {r['gb_per_s']:.2f} | "
              f"{r['gb_per_s'] * 1e9 / bw:.0%} |")
    print(json.dumps(dict(rows=rows, bandwidth=bw, load_average=os.getloadavg()[0])))
    for batch in map(int, args.batches.split(",")):
        print(json.dumps({"batch": batch, "ops_ms": op_times(models, batch, args.repeats)}))


def read_bandwidth() -> float:
    """Bytes/s of a float32 sum over 1 GiB (best of 5): the machine's read bandwidth."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((2**28,), jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(x))
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def op_times(models, batch: int, repeats: int) -> dict:
    """Milliseconds of the decoding step's big ops alone at `batch` rows: the tied output head
    (bfloat16 token embeddings in both models) and one layer's fc1, bfloat16 and int8."""
    import jax
    import jax.numpy as jnp

    from blip2_jax import quant
    from blip2_jax.models import layers

    def best(f, *a):
        f = jax.jit(f)
        jax.block_until_ready(f(*a))
        t = 1e9
        for _ in range(repeats * 3):
            s = time.perf_counter()
            jax.block_until_ready(f(*a))
            t = min(t, time.perf_counter() - s)
        return round(t * 1e3, 3)

    lm = {q: m.params["language_model"] for q, m in models.items()}
    emb = lm["none"]["embed_tokens"]["embedding"]
    x = jnp.ones((batch, emb.shape[1]), jnp.bfloat16)
    fc1 = {q: p["layers_0"]["fc1"]["kernel"] for q, p in lm.items()}
    return {"output head (bfloat16)": best(lambda h, e: layers.linear(h, e, jnp.bfloat16, transposed=True,
                                                                     out_dtype=jnp.float32), x, emb),
            "fc1 bfloat16": best(lambda h, k: layers.linear(h, k, jnp.bfloat16, transposed=True), x, fc1["none"]),
            "fc1 int8": best(lambda h, k: quant.dense(h, k, jnp.bfloat16), x, fc1["int8"])}


if __name__ == "__main__":
    main()
