"""Quantized frozen towers: weight-only post-training quantization through Qwix.

The frozen image encoder and LLM (paper §3.1) never train, so their matrices can be stored in
int8 (or int4) with one scale per output channel; activations stay in the compute dtype.

What is quantized (`RULES`: Qwix rules matched against module paths of the parameter tree):
every Dense kernel of `vision_model` and `language_model` (attention projections, FFN, OPT's
project_in/out). Never the Q-Former, the projection, norms, biases, embeddings (patch, position,
token, T5's relative buckets) or the LLM's output head.

A quantized kernel is a `qwix.QArray` in the kernel's place: `qvalue` [out, in] int8 (the float
kernel's own layout: the frozen towers store theirs as torch's Linear does, each output channel
contiguous over the input, which the CPU decoding dot streams), `scale` [out, 1] float32 = max |w| over the input / 127.5 (Qwix's
symmetric absmax calibration; int4: / 7.5). Scanned layers add a leading layer axis to both.
w[i, o] ~= qvalue[o, i] * scale[o, 0].
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from blip2_jax import frozen
from blip2_jax.models import streaming as streaming_lib

MODES = ("none", "int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
HOST_QTYPES = {"int8": np.dtype(np.int8), "int4": np.dtype(ml_dtypes.int4)}
_NOT_QUANTIZED = ("patch_embedding", "lm_head")  # embeddings and the output head keep their dtype


def rules(mode: str) -> list[qwix.QuantizationRule]:
    """The Qwix rules of `mode`: weight-only, absmax, per output channel, frozen towers only."""
    qtype = QTYPES[check_mode(mode)]
    towers = "|".join(map(re.escape, frozen.FROZEN_TOWERS))
    skip = "|".join(_NOT_QUANTIZED + tuple(t.split("/", 1)[1] for t in frozen.TRAINED_IN_TOWERS))
    return [qwix.QuantizationRule(module_path=rf"({towers})/(?!(.*/)?({skip})(/|$)).*", weight_qtype=qtype,
                                  weight_calibration_method="absmax")]


def check_mode(mode: str | None) -> str:
    """'int8' / 'int4' (None and 'none' -> 'none'); anything else is a one-line ValueError."""
    mode = "none" if mode is None else str(mode)
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (one of {', '.join(MODES)})")
    return mode


def check_towers(towers) -> None:
    """Only the frozen towers are quantized; naming anything else is a one-line ValueError."""
    for t in towers:
        if t not in frozen.FROZEN_TOWERS:
            raise ValueError(f"cannot quantize {t!r}: only the frozen towers "
                             f"({', '.join(frozen.FROZEN_TOWERS)}) are quantized; the Q-Former and "
                             "the projection train and stay in float32")


def check_backend(mode: str, backend: str | None = None) -> None:
    """int4 needs a backend whose compiler handles 4-bit integers: compile a tiny int4 dot."""
    if check_mode(mode) != "int4":
        return
    backend = backend or jax.default_backend()
    try:
        sh = jax.sharding.SingleDeviceSharding(jax.devices(backend)[0])
        x = jax.ShapeDtypeStruct((2, 8), jnp.float32, sharding=sh)
        w = jax.ShapeDtypeStruct((8, 8), jnp.int4, sharding=sh)
        jax.jit(lambda a, b: a @ b.astype(jnp.float32)).lower(x, w).compile()
    except Exception as e:  # noqa: BLE001  (any compiler refusal means the same to the user)
        raise ValueError(f"int4 quantization is not supported on the {backend} backend "
                         f"({' '.join(str(e).split())[:120]}); use int8") from None


def qtype_of(path: tuple[str, ...], mode: str):
    """The qtype a parameter is stored in under `mode`, or None when it keeps its dtype."""
    if check_mode(mode) == "none" or path[-1] != "kernel":
        return None
    module = "/".join(path[:-1])
    rule = next((r for r in rules(mode) if re.fullmatch(r.module_path, module)), None)
    return None if rule is None else rule.weight_qtype


def mode_of_qtype(qtype) -> str:
    return {np.dtype(v).name: k for k, v in QTYPES.items()}[np.dtype(qtype).name]


def is_quantized(x) -> bool:
    return isinstance(x, qwix.QArray)


# ------------------------------------------------------------------------------ on devices
def quantize_kernel(kernel: jax.Array, qtype) -> qwix.QArray:
    """A frozen tower's kernel [..., out, in] -> QArray (qvalue [..., out, in], scale [..., out, 1] float32)."""
    w = kernel.astype(jnp.float32)
    return qwix.quantize(w, qtype, channelwise_axes=tuple(range(w.ndim - 1)))


def quantize_params(params: Mapping, mode: str, shardings: Mapping | None = None) -> dict:
    """Every kernel `rules(mode)` selects replaced by its QArray (quantized on its devices, one
    leaf at a time). `shardings`: the float tree's NamedShardings (default: each leaf's own);
    the quantized leaves get the matching ones (`shard_like`)."""
    flat = traverse_util.flatten_dict(params)
    flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    out = {}
    for path, leaf in flat.items():
        qtype = qtype_of(path, mode)
        if qtype is None or is_quantized(leaf):
            out[path] = leaf
            continue
        if isinstance(leaf, jax.core.Tracer):  # inside a trace (eval_shape, jit): no placement
            out[path] = quantize_kernel(leaf, qtype)
            continue
        sh = flat_sh.get(path, getattr(leaf, "sharding", None))
        out_sh = shard_like(sh, leaf.ndim, qtype) if isinstance(sh, NamedSharding) else None
        out[path] = jax.jit(quantize_kernel, static_argnums=1, out_shardings=out_sh)(leaf, qtype)
    return traverse_util.unflatten_dict(out)


def shard_like(kernel_sharding: NamedSharding, ndim: int, qtype) -> qwix.QArray:
    """The kernel's NamedSharding ([..., out, in]) -> a QArray of shardings for its qvalue
    (the same) and scale ([..., out, 1])."""
    spec = tuple(kernel_sharding.spec) + (None,) * (ndim - len(kernel_sharding.spec))
    lead, a_out, a_in = spec[:-2], spec[-2], spec[-1]
    mesh = kernel_sharding.mesh
    return qwix.QArray(NamedSharding(mesh, P(*lead, a_out, a_in)), NamedSharding(mesh, P(*lead, a_out, None)),
                       None, qtype)


def quantized_shardings(shardings: Mapping, abstract: Mapping, mode: str) -> dict:
    """A float tree's shardings -> the quantized tree's (QArrays of shardings where quantized)."""
    flat_a = traverse_util.flatten_dict(abstract)
    return traverse_util.unflatten_dict(
        {p: (shard_like(s, len(flat_a[p].shape), q) if (q := qtype_of(p, mode)) is not None else s)
         for p, s in traverse_util.flatten_dict(shardings).items()})


def abstract(tree: Mapping, mode: str) -> dict:
    """ShapeDtypeStructs of a float tree -> those of its quantized form (shardings kept)."""
    def one(path, x):
        qtype = qtype_of(path, mode)
        if qtype is None:
            return x
        shape = tuple(x.shape)
        sh = getattr(x, "sharding", None)
        qs = shard_like(sh, len(shape), qtype) if isinstance(sh, NamedSharding) else None
        return qwix.QArray(jax.ShapeDtypeStruct(shape, qtype, sharding=qs and qs.qvalue),
                           jax.ShapeDtypeStruct(shape[:-1] + (1,), jnp.float32, sharding=qs and qs.scale), None, qtype)
    return traverse_util.unflatten_dict({p: one(p, x) for p, x in traverse_util.flatten_dict(tree).items()})


# ------------------------------------------------------------------------------ on the host
def host_scale(kernel: np.ndarray, qtype, release=lambda arrays: None, read=None) -> np.ndarray:
    """Per-output-channel scales of a kernel view [out, in] -> float32 [out, 1], exactly as
    `qwix.quantize` computes them from the float32 values. Read in blocks of rows: `read(view)`
    gives a block's own float32 copy (`placement` reads file views with `pread`), then the
    view's file pages go to `release`."""
    read = read or _copy_f32
    absmax = np.empty((kernel.shape[0], 1), np.float32)
    step = block_rows(kernel.shape[-1])
    for j in range(0, kernel.shape[0], step):
        block = read(kernel[j:j + step])
        release([kernel[j:j + step]])
        absmax[j:j + step, 0] = np.abs(block, out=block).max(axis=1)
    return _scale_of(absmax, qtype)


def _scale_of(absmax: np.ndarray, qtype) -> np.ndarray:
    """Qwix's own per-channel scales [rows, 1] from the channels' absolute maxima [rows, 1]."""
    scale, _ = _qwix_scale({"absmax": jax.device_put(absmax, jax.devices("cpu")[0])}, qtype)
    return np.asarray(scale)


def host_quantize(kernel: np.ndarray, scale: np.ndarray, qtype, out: np.ndarray,
                  release=lambda arrays: None, read=None, fill_scale: bool = False) -> None:
    """out [out, in] = Qwix's quantization of a kernel view [out, in] with `scale` [out, 1], a
    block of output channels at a time (on the host's CPU device), each block a copy of its own
    (`read`, as in `host_scale`): the CPU device may alias a host array, so it is never handed a
    view of the file, whose pages would then come back after `release`. `fill_scale`: `scale`
    is written here, from each block as it is read (a channel's scale needs only its own row),
    so the kernel is read once instead of twice."""
    read = read or _copy_f32
    cpu = jax.devices("cpu")[0]
    step = block_rows(kernel.shape[-1])
    for j in range(0, kernel.shape[0], step):
        block = read(kernel[j:j + step])
        release([kernel[j:j + step]])
        if fill_scale:
            scale[j:j + step] = _scale_of(np.abs(block).max(axis=1, keepdims=True), qtype)
        q = _qwix_quantize(jax.device_put(block, cpu), jax.device_put(scale[j:j + step], cpu), qtype)
        out[j:j + step] = np.asarray(q)
        del q, block


def block_rows(d_in: int) -> int:
    """Rows of a kernel quantized at once: about 2 MiB of float32 (a fixed, small transient)."""
    return max(1, _BLOCK_BYTES // (4 * d_in))


def _copy_f32(view: np.ndarray) -> np.ndarray:
    return np.array(view, np.float32, order="C")


_BLOCK_BYTES = 2 << 20
_qwix_quantize = jax.jit(lambda w, scale, qtype: qwix._src.core.qarray.quantize_with_scale_zero_point(  # noqa: SLF001
    w, qtype, scale, None).qvalue, static_argnums=2)
_qwix_scale = jax.jit(qwix._src.core.qarray.compute_scale_zero_point, static_argnums=1)  # noqa: SLF001


# ------------------------------------------------------------------------------ the matmul
streaming = streaming_lib.streaming  # the switch for few-row streaming products (models/streaming.py)


def dense(x: jax.Array, kernel: qwix.QArray, dtype, precision=None) -> jax.Array:
    """x [..., in] @ w with w the dequantized kernel -> [..., out] in `dtype`.

    Many rows (prefill, training, the image side): Qwix's dot (dequantize then dot; XLA fuses the
    dequantization into the matmul on TPU/GPU). The kernel passes an optimization barrier with x,
    so that it is dequantized only once x exists: on CPU, XLA otherwise dequantized every kernel
    of the program first, all at once (a full-size caption held the int8 and the bfloat16
    weights: 9.3 GiB for 3.9 GiB of int8 weights). One row on CPU (int8; int4 up to 4, see
    `streaming.applies`): `streaming_dot`."""
    rows = int(np.prod(x.shape[:-1]))
    if kernel.qvalue.ndim == 2 and streaming_lib.applies(rows, kernel.qvalue.dtype):
        return streaming_lib.per_device(streaming_dot, x, kernel).astype(dtype)
    x, kernel = jax.lax.optimization_barrier((x, kernel))
    dims = (((x.ndim - 1,), (kernel.qvalue.ndim - 1,)), ((), ()))
    return qwix.dot_general(x.astype(dtype), kernel.astype(dtype), dims, precision=precision).astype(dtype)


def streaming_dot(x: jax.Array, kernel: qwix.QArray, layer=None) -> jax.Array:
    """The decoding dot on CPU (`models/streaming.py`, shared with bfloat16 kernels): int8 rows
    converted to float32 chunk by chunk while in cache, one byte per weight read from memory; the
    scale applied to the result. `layer`: the kernel is a stack, this layer's read in place.
    -> float32 [..., out]."""
    return streaming_lib.streaming_dot(x, kernel.qvalue, kernel.scale, layer=layer)


# ------------------------------------------------------------------------------ trees
def tree_bytes(tree) -> int:
    """Bytes of a params tree, quantized leaves counted at their storage size (int4: half a byte)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        bits = 4 if np.dtype(leaf.dtype).name == "int4" else 8 * np.dtype(leaf.dtype).itemsize
        total += int(np.prod(leaf.shape, dtype=np.int64)) * bits // 8
    return total
