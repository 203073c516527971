r"""Ahead-of-time memory plans: compile the real train step for a TPU slice on this (CPU) host.

  python -m blip2_jax.plan --config=configs/stage2_t5.py:xxl --topology=v5e-16 \
      [--config.mesh_shape=(1,16,1) --config.model.remat_policy=full ...] [--nocompile]
  python -m blip2_jax.plan --table          # the paper's configurations x v4-32, v5e-16, v5p-8

A TPU topology ("v5e:4x4", or a slice name such as "v5e-16") needs libtpu (the `tpu` extra);
nothing runs on a TPU: `jax.experimental.topologies` describes the chips and XLA compiles for
them. "cpu:N" plans on N local CPU devices instead (tests; `--hbm_gib` sets their "HBM").

Printed per device: trainable and frozen parameter bytes and optimizer bytes (from the
shardings of the abstract state), the activations the backward pass keeps (the residuals of
`jax.vjp` of the loss, batch-split), XLA's argument / output / temporary bytes and peak, the
FLOPs of one step (XLA's HLO cost analysis of the step with unrolled layers), and whether the
peak fits in HBM. When it does not, other mesh shapes, remat policies and gradient
accumulation are tried until one fits. Compiling a large model takes minutes per setting;
`--nocompile` only traces, and estimates the temporaries as gradients + kept activations.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

from absl import app, flags

from blip2_jax import main as trainer

_CONFIG = trainer._CONFIG  # the trainer's --config flag (and its --config.x=... overrides)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology (v5e:4x4) or slice (v5e-16), or cpu:N.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB (default: the chip's HBM).")
_SUGGEST = flags.DEFINE_bool("suggest", True, "When the step does not fit, search for a setting that does.")
_TABLE = flags.DEFINE_bool("table", False, "Print the markdown table of the paper's configurations.")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile with XLA (minutes per setting for large models); "
                             "--nocompile traces only and estimates (seconds).")

GIB = 1024 ** 3

# Slice names (accelerator types) -> topologies; vN-<cores> for v4/v5p (2 cores per chip).
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
}
# HBM per chip (JAX device), by device kind prefix.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v6 lite": 32,
           "TPU v6e": 32}
# What the search tries, in order, when a step does not fit (each on top of the last).
MAX_ACCUM = 16

# The paper's configurations (§3.4 batch sizes, in the configs) for `--table`.
PAPER_CONFIGS = (("stage 1, ViT-g", "configs/stage1_pretrain.py", "vitg"),
                 ("ViT-g + OPT-2.7B", "configs/stage2_opt.py", "2.7b"),
                 ("ViT-g + OPT-6.7B", "configs/stage2_opt.py", "6.7b"),
                 ("ViT-g + FlanT5-XL", "configs/stage2_t5.py", "xl"),
                 ("ViT-g + FlanT5-XXL", "configs/stage2_t5.py", "xxl"))
PAPER_TOPOLOGIES = ("v4-32", "v5e-16", "v5p-8")
_SLICES = flags.DEFINE_list("slices", list(PAPER_TOPOLOGIES), "With --table: the slices to plan for.")
# Inference plans (blip2_jax/plan_inference.py): serving's programs instead of the train step.
_INFER = flags.DEFINE_string("infer", None, "A preset (e.g. vitg_flant5xxl): plan its inference programs.")
_INFER_TABLE = flags.DEFINE_bool("infer_table", False, "The inference table: released models x dtypes x slices.")
_QUANTIZE = flags.DEFINE_string("quantize", "none", "With --infer: frozen towers none | int8 | int4.")
_BATCH = flags.DEFINE_integer("batch", 8, "With --infer: images per call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "With --infer: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "With --infer: generated tokens (greedy).")


@dataclasses.dataclass
class Plan:
    """Bytes are per device; flops are per device per step."""
    topology: str
    devices: int
    device_kind: str
    mesh: tuple
    batch: int
    remat: str
    accum: int
    trainable_bytes: int
    frozen_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    hbm_bytes: int
    flops: float
    peak_flops: float | None
    compile_s: float
    # "compiled": XLA's numbers; "oom": the compiler refused it for memory (temp_bytes is what
    # it asked for); "estimate": traced only (temporaries = gradients + kept activations)
    source: str = "compiled"

    @property
    def compiled(self) -> bool:
        return self.source == "compiled"

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def overrides(self) -> str:
        """The config overrides that select this setting."""
        mesh = "(" + ",".join(map(str, self.mesh)) + ")"
        return (f"--config.mesh_shape={mesh} --config.model.remat_policy={self.remat} "
                f"--config.grad_accum_steps={self.accum}")


# ------------------------------------------------------------------ devices
def topology_devices(name: str):
    """(devices, device kind, HBM bytes per device or None) of a topology name."""
    import jax
    if name.startswith("cpu:"):
        n = int(name.split(":", 1)[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(f"{name}: only {len(devices)} CPU devices (set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={n})")
        return devices[:n], "cpu", None
    topo = SLICES.get(name, name)
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", topo):
        raise ValueError(f"unknown topology {name!r}: use e.g. v5e:4x4, v5e-16, v4-32 or cpu:8")
    from jax.experimental import topologies
    # Compiling only: no metadata-server queries off Google Cloud, and no lock on the TPU (a
    # training job may hold it while a plan is made on the same VM).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"chip_config_name": "megacore"} if topo.startswith("v4:") else {}  # one device per v4 chip
    try:
        devices = topologies.get_topology_desc(topo, "tpu", **kwargs).devices
    except Exception as e:  # no libtpu, or a shape the chip does not come in
        raise RuntimeError(f"cannot describe TPU topology {topo}: {e}. TPU plans need libtpu "
                           "(pip install -e '.[tpu]'); cpu:N plans run anywhere") from None
    kind = devices[0].device_kind
    hbm = next((v for k, v in HBM_GIB.items() if kind.startswith(k)), None)
    return list(devices), kind, None if hbm is None else int(hbm * GIB)


# ------------------------------------------------------------------ abstract inputs
def batch_shapes(config, task, batch: int) -> dict:
    """ShapeDtypeStructs (global) of the train batch the pipeline produces for `task`."""
    import jax
    import numpy as np
    ic = config.input
    s = int(ic.image_size)
    lengths = {"qformer": int(ic.max_text_len), "llm": int(ic.max_llm_len), "target": int(ic.max_target_len)}
    out = {}
    for key in task.batch_keys:
        if key == "image":
            dtype = np.uint8 if ic.image_dtype == "uint8" else np.float32
            out[key] = jax.ShapeDtypeStruct((batch, s, s, 3), dtype)
        elif key == "image_id":
            out[key] = jax.ShapeDtypeStruct((batch,), np.int32)
        elif key.startswith("qformer_"):
            out[key] = jax.ShapeDtypeStruct((batch, lengths["qformer"]), np.int32)
        elif key.startswith("llm_decoder_") or (key == "llm_labels" and getattr(task, "encoder_decoder", False)):
            out[key] = jax.ShapeDtypeStruct((batch, lengths["target"]), np.int32)
        elif key.startswith("llm_"):
            out[key] = jax.ShapeDtypeStruct((batch, lengths["llm"]), np.int32)
        else:
            raise ValueError(f"plan: no shape known for batch key {key!r}")
    return out


def abstract_step_inputs(config, mesh):
    """(train step, its abstract arguments (state, frozen, batch, rng), task) on `mesh`: the
    trainer's own functions, with ShapeDtypeStructs instead of arrays (nothing allocated)."""
    import jax

    from blip2_jax import sharding

    task, schedule, state, frozen = trainer.abstract_train_state(config, mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, len(v.shape)))
             for k, v in batch_shapes(config, task, int(config.input.batch_size)).items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    step = trainer.make_train_step(task, schedule, int(config.grad_accum_steps))
    return step, (state, frozen, batch, rng), task


def activation_bytes(task, state, frozen, batch, rng, accum: int, batch_shards: int) -> int:
    """Per-device bytes of what the backward pass keeps: the residuals of `jax.vjp` of the
    loss for one micro-batch (so the remat policy shows). Those that grow with the batch
    (found by tracing twice the micro-batch too) are split over the `batch_shards` devices of
    (data, fsdp); the rest (weights the backward pass reads) are parameters, not counted."""
    import jax
    import numpy as np

    from blip2_jax import train_state

    def residual_shapes(b):
        mb = jax.tree.map(lambda x: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype), batch)

        def residuals(p, f, mb, r):
            _, vjp_fn, _ = jax.vjp(lambda q: task.loss(train_state.merge_params(q, f), mb, r), p, has_aux=True)
            return vjp_fn

        return jax.tree.leaves(jax.eval_shape(residuals, state.params, frozen, mb, rng))

    b = next(iter(batch.values())).shape[0] // accum
    total = 0
    for x, x2 in zip(residual_shapes(b), residual_shapes(2 * b), strict=True):
        if x.shape != x2.shape:
            total += int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize // batch_shards
    return total


# ------------------------------------------------------------------ one plan
def plan(config, devices, device_kind: str, hbm_bytes: int, topology: str = "", compile: bool = True) -> Plan:
    """Compiles the train step of `config` (mesh, remat, batch, accumulation as configured) for
    `devices` and measures it. `compile=False` only traces it: an estimate in seconds instead
    of XLA's numbers in minutes (see `Plan.source`)."""
    import flax.linen as nn
    import jax

    from blip2_jax import sharding

    mesh = sharding.make_mesh(tuple(config.mesh_shape), devices=devices)
    accum = int(config.grad_accum_steps)
    batch_size = int(config.input.batch_size)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (shards * accum):
        raise ValueError(f"batch {batch_size} does not split into {accum} micro-batches over "
                         f"{shards} devices")
    step, (state, frozen, batch, rng), task = abstract_step_inputs(config, mesh)
    # An abstract mesh only: the devices may exist for the compiler alone (TPU topologies).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(sharding.RULES):
        acts = activation_bytes(task, state, frozen, batch, rng, accum, shards)
        t0 = time.time()
        source, oom = "estimate", None
        if compile:
            try:
                lowered = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch, rng)
                compiled, source = lowered.compile(), "compiled"
            except jax.errors.JaxRuntimeError as e:
                oom, source = _compile_oom(str(e)), "oom"
                if oom is None:
                    raise
        compile_s = time.time() - t0
    args = sharding.per_device_bytes((state, frozen, batch))
    if source == "compiled":
        mem = compiled.memory_analysis()
        args, out, alias, temp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                                  int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes))
        peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
        peak = max(peak, args + out - alias + temp + int(mem.generated_code_size_in_bytes))
    elif source == "oom":  # the TPU compiler refuses programs that do not fit; it says what they need
        temp, hbm_bytes = oom
        out = alias = sharding.per_device_bytes(state)
        peak = args + temp
    else:  # traced only: gradients and kept activations, not XLA's other temporaries
        out = alias = sharding.per_device_bytes(state)
        temp = sharding.per_device_bytes(state.params) + acts
        peak = args + temp
    flops = step_flops(config) / len(devices)
    peak_flops = next((v for k, v in trainer.PEAK_FLOPS.items() if device_kind.startswith(k)), None)
    return Plan(topology=topology, devices=len(devices), device_kind=device_kind,
                mesh=tuple(int(v) for v in mesh.shape.values()), batch=batch_size,
                remat=str(config.model.remat_policy), accum=accum,
                trainable_bytes=sharding.per_device_bytes(state.params),
                frozen_bytes=sharding.per_device_bytes(frozen),
                optimizer_bytes=sharding.per_device_bytes(state.opt_state), activation_bytes=acts,
                argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                peak_bytes=peak, hbm_bytes=int(hbm_bytes), flops=flops, peak_flops=peak_flops,
                compile_s=compile_s, source=source)


def step_flops(config) -> float:
    """FLOPs of one train step (the whole batch, all devices together): the trainer's count,
    XLA's cost analysis of the step traced with unrolled layers (`main.unrolled_step_flops`),
    once per model (the search varies only the mesh)."""
    from blip2_jax import tasks
    from blip2_jax.models import build

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.mesh_shape, c.grad_accum_steps = (1, 1, 1), 1
    key = c.to_json_best_effort(sort_keys=True)
    if key not in _FLOPS:
        task = tasks.get(c.task, build.build_model(c.model)[0], c)
        _FLOPS[key] = trainer.unrolled_step_flops(c, batch_shapes(c, task, int(c.input.batch_size)))
    return _FLOPS[key]


_FLOPS: dict[str, float] = {}


def _compile_oom(message: str) -> tuple[int, int] | None:
    """(temporary bytes needed, HBM bytes available) from the TPU compiler's out-of-memory
    error, or None for other errors."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message)
    if not m:
        return None
    unit = {"K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 * GIB}
    return int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)])


def candidates(config, n_devices: int):
    """Settings to try when the configured one does not fit, least disruptive first: every
    device on fsdp (parameters and optimizer split), then full remat, then gradient
    accumulation (smaller micro-batches, same global batch: the divisors of the per-device
    batch, up to MAX_ACCUM). Each is a full compile, so the list is short."""
    remat = str(config.model.remat_policy)
    fsdp = (1, n_devices, 1)
    accum = int(config.grad_accum_steps)
    per_device = int(config.input.batch_size) // n_devices
    out = [(fsdp, remat, accum), (fsdp, "full", accum)]
    out += [(fsdp, "full", a) for a in range(accum + 1, min(per_device, MAX_ACCUM) + 1) if per_device % a == 0]
    seen, configured = set(), (tuple(config.mesh_shape), remat, accum)
    return [c for c in out if c != configured and not (c in seen or seen.add(c))]


def search(config, devices, device_kind, hbm_bytes, topology="", log=print,
           compile: bool = True) -> tuple[Plan, Plan | None]:
    """(the configured plan, the first candidate that fits or None). Each candidate is traced
    first (seconds); only those whose estimate fits are compiled (minutes) to confirm."""
    first = plan(config, devices, device_kind, hbm_bytes, topology, compile)
    if first.fits:
        return first, None
    for mesh, remat, accum in candidates(config, len(devices)):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.mesh_shape, c.model.remat_policy, c.grad_accum_steps = mesh, remat, accum
        try:
            p = plan(c, devices, device_kind, hbm_bytes, topology, compile=False)
            if p.fits and compile:
                p = plan(c, devices, device_kind, hbm_bytes, topology, compile=True)
        except ValueError as e:  # e.g. the batch does not split into the micro-batches
            log(f"  skip mesh={mesh} remat={remat} accum={accum}: {e}")
            continue
        log(f"  tried mesh={mesh} remat={remat} accum={accum}: peak {p.peak_bytes / GIB:.2f} GiB "
            f"({SOURCES[p.source]})")
        if p.fits:
            return first, p
    return first, None


# ------------------------------------------------------------------ printing
def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 1024 ** 2:.1f} MiB"


def describe(p: Plan) -> str:
    lines = [f"{p.topology or p.device_kind}: {p.devices} x {p.device_kind}, mesh (data, fsdp, tensor) = "
             f"{p.mesh}, batch {p.batch}, remat {p.remat}, grad accumulation {p.accum}",
             "per device:",
             f"  parameters, trainable   {_gib(p.trainable_bytes)}",
             f"  parameters, frozen      {_gib(p.frozen_bytes)}",
             f"  optimizer state         {_gib(p.optimizer_bytes)}",
             f"  activations (residuals) {_gib(p.activation_bytes)}  (part of the temporaries)"]
    if p.source == "compiled":
        lines += [f"  XLA arguments / outputs {_gib(p.argument_bytes)} / {_gib(p.output_bytes)}"
                  f" (donated: {_gib(p.alias_bytes)})",
                  f"  XLA temporaries         {_gib(p.temp_bytes)}"]
    elif p.source == "oom":
        lines += [f"  arguments               {_gib(p.argument_bytes)}",
                  f"  XLA temporaries         {_gib(p.temp_bytes)} needed (the compiler ran out of memory)"]
    else:
        lines += [f"  arguments               {_gib(p.argument_bytes)}",
                  f"  temporaries (estimate)  {_gib(p.temp_bytes)} = gradients + kept activations "
                  "(not compiled: XLA's other buffers not counted)"]
    lines.append(f"  peak                    {_gib(p.peak_bytes)} of {_gib(p.hbm_bytes)}: "
                 + ("fits" if p.fits else "does NOT fit") + (" (estimate)" if p.source == "estimate" else ""))
    lines.append(f"FLOPs per step: {p.flops:.3e} per device, {p.flops * p.devices:.3e} in all")
    if p.peak_flops:
        lines.append(f"  at 100% of peak ({p.peak_flops / 1e12:.0f} TFLOP/s per chip): "
                     f"{p.flops / p.peak_flops * 1e3:.0f} ms per step")
    return "\n".join(lines)


TABLE_HEADER = ("| configuration | slice | batch | mesh (d,f,t) | remat | accum | params+opt / dev | "
                "activations / dev | peak / dev | HBM | fits | TFLOPs / step | from |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
SOURCES = {"compiled": "XLA", "oom": "XLA (refused: out of memory)", "estimate": "estimate (traced)"}


def table_row(name: str, p: Plan) -> str:
    flops = f"{p.flops * p.devices / 1e12:.0f}"
    return (f"| {name} | {p.topology} | {p.batch} | {','.join(map(str, p.mesh))} | {p.remat} | {p.accum} | "
            f"{(p.trainable_bytes + p.frozen_bytes + p.optimizer_bytes) / GIB:.1f} GiB | "
            f"{p.activation_bytes / GIB:.1f} GiB | {p.peak_bytes / GIB:.1f} GiB | {p.hbm_bytes / GIB:.0f} GiB | "
            f"{'yes' if p.fits else 'no'} | {flops} | {SOURCES[p.source]} |")


def _load_config(path: str, arg: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("plan_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def paper_table(topologies=PAPER_TOPOLOGIES, configs=PAPER_CONFIGS, log=print, compile: bool = True) -> str:
    """Markdown rows: each paper configuration as configured and, where that does not fit,
    the first setting found that does."""
    rows = [TABLE_HEADER]
    for topo in topologies:
        devices, kind, hbm = topology_devices(topo)
        for name, path, arg in configs:
            first, fix = search(_load_config(path, arg), devices, kind, hbm, topo, log=log, compile=compile)
            rows.append(table_row(name, first))
            if fix is not None:
                rows.append(table_row(name + " (suggested)", fix))
            log(rows[-1])
    return "\n".join(rows)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _TABLE.value:
        print(paper_table(topologies=tuple(_SLICES.value), compile=_COMPILE.value))
        return
    if _INFER.value or _INFER_TABLE.value:
        _infer()
        return
    if _CONFIG.value is None or not _TOPOLOGY.value:
        print("error: --config and --topology are required (or --table)", file=sys.stderr)
        sys.exit(2)
    try:
        devices, kind, hbm = topology_devices(_TOPOLOGY.value)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if _HBM_GIB.value is not None:
        hbm = int(_HBM_GIB.value * GIB)
    if hbm is None:
        print("error: --hbm_gib is needed for this topology", file=sys.stderr)
        sys.exit(2)
    config = _CONFIG.value
    if _SUGGEST.value:
        first, fix = search(config, devices, kind, hbm, _TOPOLOGY.value, compile=_COMPILE.value)
    else:
        first, fix = plan(config, devices, kind, hbm, _TOPOLOGY.value, _COMPILE.value), None
    print(describe(first))
    if not first.fits:
        if fix is None:
            print("suggestion: none of the tried settings fits; use a larger slice or a smaller batch")
        else:
            print(f"suggestion: {fix.overrides}")
            print(describe(fix))


def _infer() -> None:
    from blip2_jax import plan_inference, quant
    kw = dict(batch=_BATCH.value, prompt_len=_PROMPT_LEN.value, new_tokens=_NEW_TOKENS.value, compile=_COMPILE.value)
    try:
        quant.check_mode(_QUANTIZE.value)
        if _INFER_TABLE.value:
            slices = tuple(_SLICES.value) if flags.FLAGS["slices"].present else plan_inference.SLICES
            print(plan_inference.table(topology_devices, slices=slices, **kw))
            return
        if not _TOPOLOGY.value:
            raise ValueError("--infer needs --topology (e.g. v5e-1)")
        devices, _, hbm = topology_devices(_TOPOLOGY.value)
        hbm = int(_HBM_GIB.value * GIB) if _HBM_GIB.value is not None else hbm
        name = dict((p, n) for n, p in plan_inference.RELEASED).get(_INFER.value, _INFER.value)
        print(plan_inference.describe(plan_inference.plan(name, _INFER.value, _TOPOLOGY.value, devices, hbm or 0,
                                                          _QUANTIZE.value, **kw)))
    except (ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
