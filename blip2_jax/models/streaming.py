"""Decoding's few-row matrix products on CPU, streaming the weights.

Decoding at batch 1 multiplies one row by every matrix of the language model, so a step costs
the weights' bytes over the memory bandwidth. XLA's CPU dot does not get there with a bfloat16
(or int8) weight and one row: the optimized HLO converts the whole matrix to float32 first
(`wrapped_convert`), then runs a float32 matrix-vector product (about 0.5 GB/s of weights, and a
float32 temporary the size of the matrix). With two rows or more its dot reads bfloat16 as it is.

`streaming_dot` takes a weight stored [out, in] (torch's Linear layout, the frozen towers'
layout: `layers.Dense(transposed=True)`, and Qwix's int8 values) and loops (`lax.scan`) over
chunks of output channels; within a chunk, each row of x and each block of fewer than 4096
inputs is one matrix-vector `dot`, which XLA's CPU backend fuses with the chunk's conversion to
float32 (it fuses a dot into its operands' loop when the vector is under 16 KiB), so each
weight is converted in registers as it streams past. Measured on full-size OPT-2.7B layers:
about the machine's read bandwidth, against 0.3-0.5 GB/s for the plain dot.

A weight whose inputs need several blocks (OPT's `fc2`, [2560, 10240]) is read in strided
bands that way, at about half the rate of the others. Serving on one CPU device stores such
language-model kernels as their input bands, each contiguous (`Banded`, laid out while the
weights are placed: `band_count`), and `banded_dot` streams each band as a whole matrix.

Scanned layers: a slice of a stacked weight handed to a loop is copied first (XLA's CPU
backend materialises every loop operand), so a decoding layer loop passes each layer's kernel
as `LayerOf(stack, index)` and the products cut their chunks straight out of the stack
(`streaming_dot(..., layer=)`, `banded_dot(..., layer=)`); with a few more rows than streaming
takes, `stacked_dot` runs XLA's dot on larger chunks of the stack; from COPY_ROWS rows (prefill)
the layer's kernel is copied for one product, which is faster there.

CPUs without half-precision units (x86 without AVX-512 BF16 or AMX): XLA's bfloat16 products
run slower there than its float32 ones, conversion included (2 cores of an AVX2-only EPYC:
1.2-1.8x at 8-384 rows), so serving's many-row products run in float32 (`serving_products`,
`product_dtype`); one-row streaming converts in registers either way.

Both cores: XLA's CPU runtime runs one device's products one after another on one thread. On a
mesh of host devices whose one split axis is "tensor" (`split_mesh`), each streamed product is
`per_device`: every device streams its share of the output channels (the weights are placed
split that way, `serving.split_kernels`), concurrently with the others.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
CHUNK_BYTES = 128 * 1024   # weights per loop step: in L2 with the input rows
VECTOR_BYTES = 16 * 1024   # XLA CPU fuses a matrix-vector dot into its operands below this
FLOAT_ROWS = 1             # bfloat16 weights: XLA's dot reads 2+ rows without converting the weight
INT8_ROWS = 1              # int8: from 2 rows Qwix's dequantize-then-dot is faster ([10240, 2560], 2 rows: 2.8 against 4.1 ms)
INT4_ROWS = 4              # int4: its unpacking keeps Qwix's dot slower to 4 rows at least (16.7 against 14.2 ms)

_ENABLED = contextvars.ContextVar("blip2_jax_streaming", default=None)
SPLIT_AXIS = "tensor"


@contextlib.contextmanager
def streaming(enabled: bool | None):
    """Whether few-row products stream their weights (None, the default: on the CPU backend).
    Planning for a TPU on a CPU host turns it off."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether streaming is on (`streaming(...)`; by default on the CPU backend)."""
    on = _ENABLED.get()
    return jax.default_backend() == "cpu" if on is None else on


def applies(rows: int, weight_dtype) -> bool:
    """Whether a product of `rows` rows with a weight of `weight_dtype` streams (float32
    weights never need to: XLA's float32 matrix-vector product reads them as they are)."""
    dt = np.dtype(weight_dtype)
    if not enabled() or dt == np.float32:
        return False
    if jnp.issubdtype(dt, jnp.floating):
        return rows <= FLOAT_ROWS
    return rows <= (INT8_ROWS if dt.itemsize == 1 and dt.name != "int4" else INT4_ROWS)


HALF_ENV = "BLIP2_JAX_CPU_HALF_PRODUCTS"  # auto (default) | half | float32
_F32_PRODUCTS = contextvars.ContextVar("blip2_jax_f32_products", default=False)
_HALF_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; aarch64's Features


@functools.cache
def cpu_has_half_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (where /proc/cpuinfo is unreadable: assumed)."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return True
    words = {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for w in line.split(":", 1)[1].split()}
    return bool(words & _HALF_FLAGS)


def half_products_as_f32() -> bool:
    """Whether serving runs half-precision many-row products in float32 here: on the CPU backend
    without half-precision units, unless `BLIP2_JAX_CPU_HALF_PRODUCTS` says half or float32."""
    choice = os.environ.get(HALF_ENV, "auto")
    if choice not in ("auto", "half", "float32"):
        raise ValueError(f"{HALF_ENV} must be auto, half or float32, got {choice!r}")
    if choice != "auto":
        return choice == "float32" and jax.default_backend() == "cpu"
    return enabled() and not cpu_has_half_units()


def serving_products(fn):
    """fn traced with `product_dtype` in force (inference only: a float32 copy of a frozen kernel
    would be kept for the backward pass in training)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        token = _F32_PRODUCTS.set(half_products_as_f32())
        try:
            return fn(*args, **kwargs)
        finally:
            _F32_PRODUCTS.reset(token)
    return traced


def product_dtype(dtype):
    """The dtype a many-row product of `dtype` runs in: float32 for a half dtype inside
    `serving_products` on a CPU without half-precision units, else `dtype`."""
    dt = np.dtype(dtype)
    half = dt.itemsize == 2 and jnp.issubdtype(dt, jnp.floating)
    return np.dtype(np.float32) if half and _F32_PRODUCTS.get() else dtype


def split_mesh(mesh=None):
    """The mesh (default: the one set for tracing) over which streamed products split their
    output channels: host devices (CPU) on a mesh whose only axis of size > 1 is SPLIT_AXIS;
    else None."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if jax.default_backend() != "cpu" or mesh.empty:
        return None
    sizes = dict(mesh.shape)
    if sizes.get(SPLIT_AXIS, 1) == 1 or any(n != 1 for a, n in sizes.items() if a != SPLIT_AXIS):
        return None
    return mesh


def per_device(product, x: jax.Array, weight, *args) -> jax.Array:
    """product(x, weight, *args) -> [..., out], each device of `split_mesh()` running it on its
    share of `weight`'s output channels (axis -2 of every leaf: a kernel [.., out, in], `Banded`
    blocks, a quantized kernel's values and scales) -> [..., out] split on its last axis. Without
    a split mesh (or with channels it does not divide), `product` as it is."""
    mesh = split_mesh()
    leaves, tree = jax.tree.flatten(weight)
    n = mesh.shape[SPLIT_AXIS] if mesh is not None else 1
    if n == 1 or any(a.ndim < 2 or a.shape[-2] % n for a in leaves):
        return product(x, weight, *args)
    P = jax.sharding.PartitionSpec
    split = lambda ndim, at: P(*(SPLIT_AXIS if i == at % ndim else None for i in range(ndim)))

    def local(x, args, *leaves):
        return product(x, jax.tree.unflatten(tree, leaves), *args)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), *(split(a.ndim, -2) for a in leaves)),
                         out_specs=split(x.ndim, -1), check_vma=False)(x, args, *leaves)


def _input_blocks(d_in: int) -> int:
    """The fewest equal blocks of the input axis whose float32 vector XLA still fuses."""
    return next(n for n in range(1, d_in + 1) if d_in % n == 0 and (d_in // n) * 4 < VECTOR_BYTES)


def _chunk_rows(out: int, width: int, dtype) -> int:
    """Output channels per loop step: CHUNK_BYTES of a `width`-wide weight (at least 8)."""
    return min(out, max(8, CHUNK_BYTES // (width * np.dtype(dtype).itemsize)))


def _over_chunks(product, rows: int, out: int, chunk: int) -> jax.Array:
    """float32 [rows, out] from `product(start)` -> [rows, chunk] for output channels [start,
    start + chunk), in a loop over the chunks (the last may overlap the one before)."""
    def step(y, j):
        start = jnp.minimum(j * chunk, out - chunk)
        return jax.lax.dynamic_update_slice_in_dim(y, product(start), start, axis=1), None

    y, _ = jax.lax.scan(step, jnp.zeros((rows, out), F32), jnp.arange(-(-out // chunk)))
    return y


def _rows_of(w: jax.Array, layer, start, count: int) -> jax.Array:
    """Output channels [start, start + count) of w [out, in], or of layer `layer` of a stack
    w [L, out, in] (a slice of the stack, never a copy of the layer)."""
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(w, start, count, axis=0)
    return jax.lax.dynamic_slice(w, (layer, start, 0), (1, count, w.shape[-1]))[0]


@jax.jit
def streaming_dot(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, layer=None) -> jax.Array:
    """x [..., in] @ w.T for w [out, in] (any float or integer dtype), times `scale` [out, 1]
    per output channel when given (int8 / int4 weights) -> float32 [..., out]. `layer`: w is a
    stack [L, out, in] (`scale` [L, out, 1]) and this layer's channels are read from it. Jitted,
    so that its loops are traced once per shape, not once per layer (a full-size model's first
    call)."""
    out, d_in = w.shape[-2:]
    if layer is not None and scale is not None:
        scale = jax.lax.dynamic_index_in_dim(scale, layer, keepdims=False)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).astype(F32)
    rows = x2.shape[0]
    nb = _input_blocks(d_in)
    ib = d_in // nb
    chunk = _chunk_rows(out, d_in, w.dtype)
    xb = x2.reshape(rows * nb, ib)  # (row, input block) pairs

    def product(start):  # output channels [start, start + chunk) -> [rows, chunk]
        w_chunk = _rows_of(w, layer, start, chunk)
        if rows * nb == 1:
            return jnp.dot(x2, w_chunk.astype(F32).T)

        def one(_, i):  # a loop (not unrolled dots) keeps each dot fused with its conversion
            xv = jax.lax.dynamic_slice_in_dim(xb, i, 1, axis=0)
            wk = jax.lax.dynamic_slice_in_dim(w_chunk, (i % nb) * ib, ib, axis=1)
            return None, jnp.dot(xv, wk.astype(F32).T)[0]

        _, y = jax.lax.scan(one, None, jnp.arange(rows * nb))
        return y.reshape(rows, nb, chunk).sum(axis=1)

    y = _over_chunks(product, rows, out, chunk)
    if scale is not None:
        y = y * scale[:, 0].astype(F32)
    return y.reshape(lead + (out,))


@functools.partial(jax.jit, static_argnames=("dtype", "precision"))
def stacked_dot(x: jax.Array, w: jax.Array, layer, dtype, precision=None) -> jax.Array:
    """x [..., in] @ w[layer].T in `dtype` for a stack w [L, out, in] (or a `Banded` stack's
    blocks [L, nb, out, in / nb]), with more rows than streaming takes: XLA's dot over chunks of
    STACK_CHUNK_BYTES of output channels, each read from the stack in place (band by band)
    -> float32 [..., out]."""
    nb, (out, ib) = (w.shape[1] if w.ndim == 4 else 1), w.shape[-2:]
    x2 = x.reshape(-1, nb, ib).astype(dtype)
    chunk = max(64, STACK_CHUNK_BYTES // (nb * ib * np.dtype(w.dtype).itemsize))
    if np.dtype(dtype) != np.dtype(w.dtype):  # converted chunks: a power of two of channels (2560 wide,
        chunk = 1 << round(math.log2(chunk))   # 8-48 rows: 256 channels 1.5x faster than 204 or 192)
    chunk = min(out, chunk)
    dims = (((1,), (1,)), ((), ()))

    def product(start):
        if w.ndim == 3:
            wk = _rows_of(w, layer, start, chunk).astype(dtype)
            return jax.lax.dot_general(x2[:, 0], wk, dims, precision=precision, preferred_element_type=F32)
        return sum(jax.lax.dot_general(
            x2[:, b], jax.lax.dynamic_slice(w, (layer, b, start, 0), (1, 1, chunk, ib))[0, 0].astype(dtype),
            dims, precision=precision, preferred_element_type=F32) for b in range(nb))

    return _over_chunks(product, x2.shape[0], out, chunk).reshape(x.shape[:-1] + (out,))


# A stacked product's chunk of weights. Full size on 2 cores: a batch-1 prefill 0.44-0.45 s with
# 1 MiB against 0.57 with 4 and 0.74 with 32; a batch-8 step 237-284 ms against 270-335 with 4.
STACK_CHUNK_BYTES = 1 << 20
# From this many rows a layer's kernel is copied out of its stack for one product. Full size, a
# batch-1 prefill (48 rows) on 2 cores: 0.56-0.63 s with chunks of the stack, 0.72-0.79 with copies
# (one device: 0.70 against 0.74); batch 8 (384 rows) copies.
COPY_ROWS = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerOf:
    """Layer `index` of a stacked [L, out, in] kernel `stack` (an array, a `Banded` of stacked
    blocks, or a quantized kernel's stack), not sliced out: its products read it in place."""
    stack: Any
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self):
        return self.stack.dtype


def layer_linear(x: jax.Array, w: LayerOf, dtype, precision=None) -> jax.Array:
    """x [..., in] @ layer `w.index` of a float (or `Banded`) stack, in `dtype`: one row streamed,
    more rows by `stacked_dot` -> float32 [..., out]. Where the stack's dtype is neither `dtype`
    nor exactly widened to it, the layer's kernel is cast first (a copy), as an unrolled one is."""
    s, rows = w.stack, math.prod(x.shape[:-1])
    dtype = product_dtype(dtype)
    if isinstance(s, Banded):
        if applies(rows, s.dtype):
            return per_device(lambda x, b, i: banded_dot(x, b.blocks, i), x.astype(dtype), s, w.index)
        if rows < COPY_ROWS and np.dtype(dtype) in (np.dtype(s.dtype), np.dtype(np.float32)):
            return per_device(lambda x, b, i: stacked_dot(x, b.blocks, i, np.dtype(dtype), precision), x, s, w.index)
        blocks = jax.lax.dynamic_index_in_dim(s.blocks, w.index, keepdims=False)
        return banded_linear(x, Banded(blocks), dtype).astype(F32)
    if np.dtype(s.dtype) != np.dtype(dtype) and np.dtype(dtype) != np.float32:
        s = jax.lax.dynamic_index_in_dim(s, w.index, keepdims=True).astype(dtype)
        w = LayerOf(s, jnp.int32(0))
    if applies(rows, s.dtype):
        return per_device(lambda x, k, i: streaming_dot(x, k, layer=i), x.astype(dtype), s, w.index)
    if rows >= COPY_ROWS:  # prefill: one product over a copy of the layer beats chunks of it
        k = jax.lax.dynamic_index_in_dim(s, w.index, keepdims=False).astype(dtype)
        return jax.lax.dot_general(x.astype(dtype), k, (((x.ndim - 1,), (1,)), ((), ())),
                                   precision=precision, preferred_element_type=F32)
    return per_device(lambda x, k, i: stacked_dot(x, k, i, np.dtype(dtype), precision), x, s, w.index)


# ------------------------------------------------------------------------------ banded weights
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Banded:
    """An [out, in] weight stored as its input bands `blocks` [nb, out, in / nb], each band a
    contiguous [out, in / nb] matrix (w[:, b * ib:(b + 1) * ib])."""
    blocks: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, nb, out, ib = self.blocks.shape
        return (*lead, out, nb * ib)

    @property
    def dtype(self):
        return self.blocks.dtype


def band_count(shape: tuple[int, ...], dtype) -> int:
    """How many input bands a CPU-served [out, in] weight is stored as (1: as it is)."""
    if len(shape) != 2 or np.dtype(dtype) == np.float32 or not jnp.issubdtype(np.dtype(dtype), jnp.floating):
        return 1
    return _input_blocks(shape[1])


@jax.jit
def banded_dot(x: jax.Array, blocks: jax.Array, layer=None) -> jax.Array:
    """x [..., in] @ w.T for a `Banded` w's blocks, one row, each band streamed -> float32.
    `layer`: blocks [L, nb, out, in / nb] of a stack, this layer's read from it."""
    nb, out, ib = blocks.shape[-3:]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, nb, ib).astype(F32)
    chunk = _chunk_rows(out, ib, blocks.dtype)

    def band(b):
        def product(start):
            at = (b, start, 0) if layer is None else (layer, b, start, 0)
            wk = jax.lax.dynamic_slice(blocks, at, (1,) * (len(at) - 2) + (chunk, ib)).reshape(chunk, ib)
            return jnp.dot(x2[:, b], wk.astype(F32).T)
        return _over_chunks(product, x2.shape[0], out, chunk)

    return sum(band(b) for b in range(nb)).reshape(lead + (out,))


def banded_linear(x: jax.Array, w: Banded, dtype) -> jax.Array:
    """x [..., in] @ w.T in `dtype` for a `Banded` w: streamed for a few rows on CPU, else one
    product per band in a loop (a band a step: faster than one batched product over the bands
    here), accumulated in float32."""
    nb, out, ib = w.blocks.shape
    rows = math.prod(x.shape[:-1])
    if applies(rows, w.dtype):
        return per_device(lambda x, b: banded_dot(x, b.blocks), x.astype(dtype), w).astype(dtype)
    compute = product_dtype(dtype)
    if compute != dtype and rows < COPY_ROWS:  # as a one-layer stack: a chunk converted at a time
        return layer_linear(x, LayerOf(Banded(w.blocks[None]), jnp.int32(0)), dtype).astype(dtype)
    xb = x.reshape(rows, nb, ib).astype(compute)
    blocks = w.blocks.astype(compute)

    def band(b, acc):
        xv = jax.lax.dynamic_index_in_dim(xb, b, 1, keepdims=False)
        wb = jax.lax.dynamic_index_in_dim(blocks, b, 0, keepdims=False)
        return acc + jax.lax.dot_general(xv, wb, (((1,), (1,)), ((), ())), preferred_element_type=F32)

    y = jax.lax.fori_loop(0, nb, band, jnp.zeros((rows, out), F32))
    return y.reshape(x.shape[:-1] + (out,)).astype(dtype)
