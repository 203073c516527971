r"""Ahead-of-time inference plans: compile serving's programs for a TPU slice on this (CPU) host.

  python -m blip2_jax.plan --infer=vitg_flant5xxl --topology=v5e-1 --quantize=int8 \
      [--batch=8 --prompt_len=32 --new_tokens=64] [--nocompile]
  python -m blip2_jax.plan --infer_table   # every released model x {bfloat16, int8} x slices

The programs are the serving core's (`serving.Predictor`): the image side (ViT -> Q-Former ->
projection, or the ITC features of a retrieval model) and `generation.generate_tokens` (the LLM's
prefill and the greedy decoding loop over `new_tokens`), each lowered with abstract weights
(bfloat16 frozen towers, or their int8 form from `quant.abstract`) sharded on a (1, n, 1) mesh
(n = the slice's devices: weights split on fsdp, the batch on data x fsdp), then compiled by
XLA's TPU compiler (libtpu). Per device: weights (every program's parameters stay resident), the
KV cache (self-attention keys and values for prompt + generated tokens, and T5's cross-attention
keys and values: part of the decoding loop's temporaries), XLA's temporaries of the larger
program and the peak = weights + that program's outputs and temporaries; `fits` compares the
peak with the chip's HBM. `--nocompile` traces only (estimate = weights + KV cache + outputs).
"""
from __future__ import annotations

import dataclasses
import time

GIB = 1024 ** 3
RELEASED = (("OPT-2.7B", "vitg_opt2.7b"), ("OPT-6.7B", "vitg_opt6.7b"), ("FlanT5-XL", "vitg_flant5xl"),
            ("FlanT5-XXL", "vitg_flant5xxl"), ("ITM ViT-g", "pretrain_vitg"))
SLICES = ("v5e-1", "v6e-1", "v5p-8")


@dataclasses.dataclass
class InferencePlan:
    """Bytes are per device."""
    model: str
    topology: str
    quantize: str
    batch: int
    prompt_len: int
    new_tokens: int
    weight_bytes: int
    kv_cache_bytes: int
    temp_bytes: int
    peak_bytes: int
    hbm_bytes: int
    compile_s: float
    source: str  # "compiled" (XLA's numbers) or "estimate" (traced only)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes


def abstract_inputs(preset: str, mesh, quantize: str, dtype="bfloat16"):
    """(model, abstract params with shardings): bfloat16 frozen towers, or quantized."""
    import jax

    from blip2_jax import quant, sharding
    from blip2_jax.models import build, presets
    from blip2_jax.models.blip2 import Blip2

    cfg = presets.preset(preset) if isinstance(preset, str) else preset  # a name or a Blip2Config
    dt = build.dtype(dtype)
    model = Blip2(cfg, vision_dtype=dt, text_dtype=dt, scan_layers=True)
    boxed = build.abstract_params(model, cfg)  # no mesh context: the devices may exist for the compiler only
    shardings = sharding.param_shardings(boxed, mesh)
    from blip2_jax.weights import placement
    flat = placement.flatten(sharding.unbox(boxed))
    flat_sh = placement.flatten(shardings)
    params = placement.unflatten({p: jax.ShapeDtypeStruct(x.shape, placement.target_dtype(p, dt), sharding=flat_sh[p])
                                  for p, x in flat.items()})
    return model, cfg, quant.abstract(params, quantize)


def kv_cache_bytes(cfg, batch: int, prompt_len: int, new_tokens: int, devices: int, itemsize: int = 2) -> int:
    """Per device: the decoding loop's keys and values (batch split over the devices)."""
    text = cfg.text
    if text is None:
        return 0
    rows = -(-batch // devices)
    if cfg.is_encoder_decoder:
        enc = cfg.num_query_tokens + prompt_len
        per_layer = text.num_heads * text.d_kv * (new_tokens + enc)
        layers = text.num_decoder_layers
    else:
        per_layer = text.hidden_size * (cfg.num_query_tokens + prompt_len + new_tokens)
        layers = text.num_hidden_layers
    return 2 * layers * rows * per_layer * itemsize


def programs(model, cfg, params, mesh, batch: int, prompt_len: int, new_tokens: int):
    """(name, jitted function, abstract arguments) of the serving programs to compile."""
    import functools

    import jax
    import jax.numpy as jnp

    from blip2_jax import generation, serving, sharding

    def rows(*shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    s = cfg.vision.image_size
    out = [("image side", jax.jit(functools.partial(serving._image_side, model)),  # noqa: SLF001
            (params, rows(batch, s, s, 3, dtype=jnp.float32)))]
    if cfg.text is not None:
        opts = generation.GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            eos_token_id=(1,), pad_token_id=0)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
        gen = jax.jit(functools.partial(generation.generate_tokens, model, options=opts))
        prompt = rows(batch, cfg.num_query_tokens, cfg.text.hidden_size, dtype=model.text_dtype)
        ids = rows(batch, prompt_len)
        out.append(("generate", gen, (params, prompt, ids, ids, ids, key)))
    return out


def plan(name: str, preset: str, topology: str, devices, hbm: int, quantize: str = "none", batch: int = 8,
         prompt_len: int = 32, new_tokens: int = 64, compile: bool = True, log=print) -> InferencePlan:
    """Compiles (or traces) the serving programs of `preset` for `devices` (a topology's, from
    `plan.topology_devices`); see the module doc."""
    import flax.linen as nn
    import jax

    from blip2_jax import quant, sharding

    mesh = sharding.make_mesh((1, len(devices), 1), devices=devices)
    model, cfg, params = abstract_inputs(preset, mesh, quantize)
    weights = sharding.per_device_bytes(params)
    kv = kv_cache_bytes(cfg, batch, prompt_len, new_tokens, len(devices))
    peak = temp = 0
    t0 = time.time()
    source = "compiled" if compile else "estimate"
    with quant.streaming(False), jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules(sharding.RULES):
        for what, fn, args in programs(model, cfg, params, mesh, batch, prompt_len, new_tokens):
            lowered = fn.lower(*args)
            if not compile:  # the decoding loop's state (KV cache) is its main temporary
                outs = sharding.per_device_bytes(jax.eval_shape(fn, *args))
                peak = max(peak, weights + (kv if what == "generate" else 0) + outs)
                continue
            try:
                mem = lowered.compile().memory_analysis()
            except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what cannot fit
                oom = _compile_oom(str(e))
                if oom is None:
                    raise
                source, temp, peak = "oom", max(temp, oom[0]), max(peak, weights + oom[0])
                log(f"  {name} {quantize} {topology} {what}: out of memory ({oom[0] / GIB:.2f} GiB of temporaries)")
                continue
            args_b, out_b, temp_b = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                                     int(mem.temp_size_in_bytes))
            # every program's weights stay on the device (XLA counts only those a program reads)
            program_peak = weights + out_b + temp_b + int(mem.generated_code_size_in_bytes)
            log(f"  {name} {quantize} {topology} {what}: arguments {args_b / GIB:.2f} GiB, temporaries "
                f"{temp_b / GIB:.2f} GiB, peak {program_peak / GIB:.2f} GiB ({time.time() - t0:.0f} s)")
            temp, peak = max(temp, temp_b), max(peak, program_peak)
    return InferencePlan(name, topology, quantize, batch, prompt_len, new_tokens, weights, kv, temp, peak,
                         int(hbm or 0), time.time() - t0, source)


SOURCES = {"compiled": "XLA (libtpu)", "oom": "XLA: out of memory", "estimate": "estimate (traced)"}
TABLE_HEADER = ("| model | slice | frozen towers | batch x new tokens | weights / device | KV cache / device | "
                "temporaries / device | peak / device | HBM | fits | from |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _compile_oom(message: str):
    """(bytes the program needs, 0) from the TPU compiler's out-of-memory error, else None."""
    import re
    unit = {"K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 * GIB}
    for pattern in (r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm",
                    r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM"):
        m = re.search(pattern, message)
        if m:
            return int(float(m.group(1)) * unit[m.group(2)]), 0
    return (0, 0) if "RESOURCE_EXHAUSTED" in message else None


def table_row(p: InferencePlan) -> str:
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    mode = "bfloat16" if p.quantize == "none" else f"{p.quantize} (weight-only)"
    work = f"{p.batch} x {p.new_tokens}" if p.kv_cache_bytes else f"{p.batch} images"
    temp = gib(p.temp_bytes) if p.source != "estimate" else "–"
    return (f"| {p.model} | {p.topology} | {mode} | {work} | {gib(p.weight_bytes)} | {gib(p.kv_cache_bytes)} | "
            f"{temp} | {gib(p.peak_bytes)} | {p.hbm_bytes / GIB:.0f} GiB | {'yes' if p.fits else 'no'} | "
            f"{SOURCES[p.source]} |")


def table(topology_devices, models=RELEASED, slices=SLICES, modes=("none", "int8"), compile: bool = True,
          log=print, **kw) -> str:
    """Markdown rows for every model x slice x mode; `topology_devices`: `plan.topology_devices`."""
    rows = [TABLE_HEADER]
    for name, preset in models:
        for topo in slices:
            devices, _, hbm = topology_devices(topo)
            for mode in modes:
                rows.append(table_row(plan(name, preset, topo, devices, hbm, mode, compile=compile, log=log, **kw)))
                log(rows[-1])
    return "\n".join(rows)


def describe(p: InferencePlan) -> str:
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    return "\n".join([
        f"{p.model} on {p.topology}, frozen towers {p.quantize if p.quantize != 'none' else 'bfloat16'}, "
        f"batch {p.batch}, prompt {p.prompt_len} tokens, {p.new_tokens} new tokens (greedy)", "per device:",
        f"  weights                 {gib(p.weight_bytes)}",
        f"  KV cache                {gib(p.kv_cache_bytes)}",
        f"  XLA temporaries         {gib(p.temp_bytes) if p.source == 'compiled' else 'not compiled'}",
        f"  peak                    {gib(p.peak_bytes)} of {gib(p.hbm_bytes)}: "
        + ("fits" if p.fits else "does NOT fit") + (" (estimate)" if p.source == "estimate" else "")])

