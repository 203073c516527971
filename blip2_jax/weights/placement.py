"""Lean loading: a lazily read parameter tree cast and placed one tensor at a time.

The converters (`convert_*.to_flax`) run over memory-mapped views, so their output is a tree of
views (transposes and slices of the file's bytes) in which nothing has been read yet. `place`
then takes one leaf at a time: copies it into a fresh host buffer in its target dtype (read from
the file with `pread`, not through the map's page faults; a blocked copy when the view is a
transpose), hands that buffer to `jax.device_put` with the leaf's
sharding (on a CPU device the 64-byte-aligned buffer becomes the array without a copy), and
drops the file pages it read. With a mesh, each device's shard is cut from the views directly
(`jax.make_array_from_callback`), so no host copy of a whole sharded tensor is made; layers
stacked for `nn.scan` are assembled shard by shard the same way. Peak host memory is the placed
weights plus one tensor, never a whole-model copy.

The dtype policy (`target_dtype`) depends on the parameter, not on the file: the frozen towers'
matrices and embeddings in the requested dtype; their biases and norms, `ln_vision`, the query
tokens, the Q-Former and the projection in float32 (transformers keeps `query_tokens` and
`qformer` in float32 too).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from blip2_jax import quant, train_state
from blip2_jax.models import streaming
from blip2_jax.weights import safetensors_io

_FROZEN = [re.compile(p) for p in train_state.frozen_patterns()]
_NORM = re.compile(train_state.NORM_PATTERN)
_LAYER_KEY = re.compile(r"^layers_(\d+)$")
_ALIGN = 64  # XLA's CPU client adopts host buffers with this alignment instead of copying them
_BLOCK = 512  # rows/columns per block of a transposing copy (cache-friendly)
_STAGE_BYTES = 8 << 20  # file bytes read per step when a view is cast or rearranged on the way

Path = tuple[str, ...]


def target_dtype(path: Path, dtype: Any) -> np.dtype:
    """The dtype a parameter is held in when the frozen towers run in `dtype` (module docstring)."""
    name = "/".join(path)
    frozen = any(r.search(name) for r in _FROZEN)
    if frozen and path[-1] not in ("bias", "scale") and not _NORM.search(name):
        return np.dtype(dtype)
    return np.dtype(np.float32)


class LayerStack(NamedTuple):
    """One scanned parameter: the per-layer arrays (views) to stack along a new leading axis."""
    layers: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layers),) + tuple(self.layers[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return self.layers[0].dtype


def stack_lazily(tree: dict) -> dict:
    """A tree with unrolled `layers_{i}` subtrees -> the scanned layout (`layers`, leaves are
    `LayerStack`s); nothing is copied."""
    out, layers = {}, {}
    for k, v in tree.items():
        m = _LAYER_KEY.match(k)
        if m:
            layers[int(m.group(1))] = v
        else:
            out[k] = stack_lazily(v) if isinstance(v, dict) else v
    if layers:
        ordered = [layers[i] for i in range(len(layers))]
        out["layers"] = jax.tree.map(lambda *xs: LayerStack(xs), *ordered,
                                     is_leaf=lambda x: isinstance(x, np.ndarray))
    return out


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts -> {path: leaf} (leaves: arrays and LayerStacks)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[Path, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


# ------------------------------------------------------------------------------ host copies
def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def copy_into(out: np.ndarray, src: np.ndarray) -> None:
    """out[...] = src with a dtype cast; a 2-D strided source (a transposed view) is copied in
    square blocks, which is several times faster than numpy's element order. Same-dtype copies
    go through unsigned views: numpy copies ml_dtypes' bfloat16 element by element otherwise
    (~0.35 GB/s, most of a full-size load). A view of a safetensors file is read from the file
    (`_read_file`)."""
    if _read_file(out, src):
        return
    if src.dtype == out.dtype and src.dtype.itemsize in (1, 2, 4, 8):
        raw = np.dtype(f"u{src.dtype.itemsize}")
        out, src = out.view(raw), src.view(raw)
    if src.ndim == 2 and not src.flags.c_contiguous and src.size > _BLOCK * _BLOCK:
        r, c = src.shape
        for i in range(0, r, _BLOCK):
            for j in range(0, c, _BLOCK):
                np.copyto(out[i:i + _BLOCK, j:j + _BLOCK], src[i:i + _BLOCK, j:j + _BLOCK], casting="unsafe")
    else:
        np.copyto(out, src, casting="unsafe")


def _read_file(out: np.ndarray, src: np.ndarray) -> bool:
    """out[...] = src for a view `src` of a safetensors file, read with `pread`: straight into
    `out` when src is contiguous and of out's dtype, else through a staging buffer (row blocks
    of a contiguous view, or the whole span of a rearranged one up to a few blocks). False when
    src is not such a view (or too scattered to stage)."""
    span = safetensors_io.file_span(src) if safetensors_io.can_read_spans else None
    if span is None or not out.flags.c_contiguous or out.shape != src.shape:
        return False
    fm, offset, nbytes = span
    if src.flags.c_contiguous:
        if src.dtype == out.dtype:
            safetensors_io.read_span(fm, offset, out)
            return True
        flat_src, flat_out = src.reshape(-1), out.reshape(-1)
        step = _STAGE_BYTES // src.dtype.itemsize
        stage = np.empty(min(nbytes, _STAGE_BYTES), np.uint8)
        for i in range(0, flat_src.size, step):
            n = min(step, flat_src.size - i)
            buf = stage[:n * src.dtype.itemsize]
            safetensors_io.read_span(fm, offset + i * src.dtype.itemsize, buf)
            np.copyto(flat_out[i:i + n], buf.view(src.dtype), casting="unsafe")
        return True
    if nbytes > 4 * _STAGE_BYTES:
        return False
    stage = np.empty(nbytes, np.uint8)
    safetensors_io.read_span(fm, offset, stage)
    start = src.__array_interface__["data"][0] - (fm.address + offset)
    copy_into(out, np.ndarray(src.shape, src.dtype, buffer=stage, offset=start, strides=src.strides))
    return True


def host_copy(src: np.ndarray, dtype: Any) -> np.ndarray:
    """A fresh, aligned, C-contiguous copy of `src` in `dtype`."""
    out = aligned_empty(tuple(src.shape), dtype)
    copy_into(out, src)
    return out


@contextlib.contextmanager
def small_pages():
    """numpy's large arrays without its request for 2 MiB pages (madvise), while weights are
    placed: where free memory is fragmented (a page cache holding the checkpoint), each such page
    waits on the kernel compacting memory. Full-size OPT-2.7B, same machine: load 10.6-13.8 s
    with them, 4.5-8.5 s without; a batch-1 decoding step 156-166 ms against 161-176."""
    try:
        from numpy._core import multiarray
        previous = multiarray._set_madvise_hugepage(False)
    except (ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        multiarray._set_madvise_hugepage(previous)


# ------------------------------------------------------------------------------ placing
DtypeFn = Callable[[Path, Any], Any]
Release = Callable[[list], None]


def materialize(tree: dict, dtype_of: DtypeFn, release: Release = lambda arrays: None) -> dict:
    """A lazy tree -> numpy arrays, one leaf at a time (pages released as they are copied), on
    small pages as `place`."""
    with small_pages():
        return _materialize(tree, dtype_of, release)


def _materialize(tree: dict, dtype_of: DtypeFn, release: Release) -> dict:
    out = {}
    for path, leaf in flatten(tree).items():
        dt = dtype_of(path, leaf)
        if isinstance(leaf, LayerStack):
            arr = aligned_empty(leaf.shape, dt)
            for i, layer in enumerate(leaf.layers):
                copy_into(arr[i], layer)
                release([layer])
        else:
            arr = host_copy(leaf, dt)
            release([leaf])
        out[path] = arr
    return unflatten(out)


def place(tree: dict, shardings: dict, dtype_of: DtypeFn, release: Release = lambda arrays: None,
          quantize: str = "none", bands: Callable[[Path, Any, Any], int] | None = None) -> dict:
    """A lazy tree -> jax.Arrays with `shardings` (same structure), one leaf at a time: each
    device's shard is copied out of the views into its own host buffer (only that slice) and
    put on the device; then the leaf's file pages are released. `quantize` ("int8", "int4"):
    the kernels `quant.rules` selects become `qwix.QArray`s (their shardings: `quant.shard_like`),
    quantized on the host one block at a time; stored `Quantized` leaves are placed as they are.
    `bands(path, leaf, dtype)` > 1: the leaf is laid out as that many input bands on the way
    (`streaming.Banded`, one device only)."""
    with small_pages():
        return _place(tree, shardings, dtype_of, release, quantize, bands)


def _place(tree, shardings, dtype_of, release, quantize, bands) -> dict:
    flat_sh = flatten(shardings)
    flat = flatten(tree)
    if set(flat) != set(flat_sh):
        extra, lacking = sorted(set(flat) - set(flat_sh)), sorted(set(flat_sh) - set(flat))
        raise ValueError(f"parameters do not match the model: unexpected {['/'.join(p) for p in extra[:3]]}, "
                         f"missing {['/'.join(p) for p in lacking[:3]]}")
    out = {}
    for path, leaf in flat.items():
        qtype = quant.qtype_of(path, quantize)
        if qtype is not None:
            out[path] = place_quantized(leaf, flat_sh[path], qtype, release)
            continue
        dt = dtype_of(path, leaf)
        nb = bands(path, leaf, dt) if bands is not None else 1
        if nb > 1:
            out[path] = place_banded(leaf, flat_sh[path], dt, nb, release)
            continue
        cols = _column_shares(leaf, flat_sh[path], dt)
        if cols is not None:
            out[path] = place_columns(leaf, flat_sh[path], dt, cols, release)
            continue
        shard = functools.partial(_host_shard, leaf, dt, release)
        out[path] = jax.make_array_from_callback(tuple(leaf.shape), flat_sh[path], shard)
    return unflatten(out)


def place_banded(leaf, sh, dtype, nb: int, release: Release) -> streaming.Banded:
    """A 2-D leaf (or a `LayerStack` of them) copied straight into its `nb` input bands: blocks
    [nb, out, in / nb] ([L, nb, out, in / nb] for a stack), on the device of `sh`, or on each
    device its share of the output channels where `sh` splits them (and nothing else)."""
    stacked = isinstance(leaf, LayerStack)
    srcs = [np.asarray(x) for x in (leaf.layers if stacked else (leaf,))]
    o, d_in = srcs[0].shape
    ib = d_in // nb
    shape = (len(srcs), o, d_in) if stacked else (o, d_in)
    shares = sh.devices_indices_map(shape)
    whole = lambda i, n: i.indices(n)[:2] == (0, n)
    if any(not whole(i, n) for index in shares.values() for i, n in zip(index[:-2] + index[-1:], shape[:-2] + shape[-1:])):
        raise ValueError(f"input bands are laid out split by output channel only, not {sh.spec}")
    rows = max(1, _STAGE_BYTES // max(1, srcs[0][:1].nbytes))
    placed = []
    for device, index in shares.items():
        lo, hi, _ = index[-2].indices(o)
        host = aligned_empty((len(srcs), nb, hi - lo, ib), dtype)
        for out, src in zip(host, srcs):
            if _straight_read(src, out.dtype):  # straight from the file
                fm, offset, _ = safetensors_io.file_span(src[lo:hi])
                safetensors_io.read_rows_into_bands(fm, offset, out)
                release([src])
                continue
            for r in range(lo, hi, rows):  # a block of rows read once, then dealt out to the bands
                block = host_copy(src[r:min(r + rows, hi)], dtype)
                for b in range(nb):
                    copy_into(out[b, r - lo:r - lo + len(block)], block[:, b * ib:(b + 1) * ib])
                release([src[r:r + len(block)]])
        placed.append(jax.device_put(host if stacked else host[0], device))
    for src in srcs:
        release([src])
    if len(placed) == 1:
        return streaming.Banded(placed[0])
    P = jax.sharding.PartitionSpec
    split = tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))
    blocks = P(*((None,) * stacked), None, split[-2], None)
    return streaming.Banded(jax.make_array_from_single_device_arrays(
        (len(srcs),) * stacked + (nb, o, ib), jax.sharding.NamedSharding(sh.mesh, blocks), placed))


def _column_shares(leaf, sh, dtype) -> list[tuple[int, int]] | None:
    """The column ranges, in order, of a 2-D leaf (or a `LayerStack` of them) stored as `dtype`
    in a file, whose sharding `sh` splits its last (input) axis only, into equal parts: what
    `place_columns` reads in one pass. None for any other leaf or sharding."""
    stacked = isinstance(leaf, LayerStack)
    first = np.asarray(leaf.layers[0] if stacked else leaf)
    if first.ndim != 2 or not _straight_read(first, np.dtype(dtype)):
        return None
    shape = ((len(leaf.layers),) if stacked else ()) + first.shape
    index = sh.devices_indices_map(shape).values()
    if any(i.indices(n)[:2] != (0, n) for ix in index for i, n in zip(ix[:-1], shape[:-1])):
        return None
    cols = sorted({ix[-1].indices(shape[-1])[:2] for ix in index})
    widths = {hi - lo for lo, hi in cols}
    tiled = all(a[1] == b[0] for a, b in zip(cols, cols[1:])) and cols[0][0] == 0 and cols[-1][1] == shape[-1]
    return cols if len(cols) > 1 and len(widths) == 1 and tiled else None


def place_columns(leaf, sh, dtype, cols: list[tuple[int, int]], release: Release) -> jax.Array:
    """A leaf split by its input columns `cols` across devices (`_column_shares`): each layer's
    rows are read once, scattered straight into every device's columns (`read_rows_into_bands`),
    instead of each device reading the whole rows to keep its part."""
    stacked = isinstance(leaf, LayerStack)
    srcs = [np.asarray(x) for x in (leaf.layers if stacked else (leaf,))]
    shape = ((len(srcs),) if stacked else ()) + srcs[0].shape
    hosts = {c: aligned_empty((len(srcs), shape[-2], c[1] - c[0]), dtype) for c in cols}
    for layer, src in enumerate(srcs):
        fm, offset, _ = safetensors_io.file_span(src)
        safetensors_io.read_rows_into_bands(fm, offset, [hosts[c][layer] for c in cols])
        release([src])
    placed, taken = [], set()
    for device, ix in sh.devices_indices_map(shape).items():
        c = ix[-1].indices(shape[-1])[:2]
        host = hosts[c] if c not in taken else host_copy(hosts[c], dtype)  # a replica: its own buffer
        taken.add(c)
        placed.append(jax.device_put(host if stacked else host[0], device))
    return jax.make_array_from_single_device_arrays(shape, sh, placed)


# ------------------------------------------------------------------------------ quantized kernels
class Quantized(NamedTuple):
    """A stored quantized kernel not read yet: `qvalue` [out, in] and `scale` [out, 1] views
    (`LayerStack`s when scanned), as `weights/hf.py` finds them in a quantized checkpoint."""
    qvalue: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape)


def place_quantized(leaf, sh, qtype, release: Release):
    """A kernel -> `qwix.QArray` placed with `sh` (a QArray of shardings, `quant.shard_like`).
    A float view [out, in] (or LayerStack) is quantized here on the host, a block of output
    channels at a time (`quant.host_quantize`: Qwix's numerics); a `Quantized` leaf is copied."""
    import qwix
    stored = isinstance(leaf, Quantized)
    layers = leaf.qvalue.layers if stored and isinstance(leaf.qvalue, LayerStack) else (
        leaf.layers if isinstance(leaf, LayerStack) else None)
    kernels = layers if layers is not None else (leaf.qvalue if stored else leaf,)
    d_out, d_in = kernels[0].shape[-2:]
    if stored:
        scales = leaf.scale.layers if isinstance(leaf.scale, LayerStack) else (leaf.scale,)
        scales = [np.asarray(x, np.float32) for x in scales]
    else:  # filled as the quantization reads each block of channels: one pass over the kernel
        scales = [np.empty((d_out, 1), np.float32) for _ in kernels]
        filled = [np.zeros(d_out, bool) for _ in kernels]
    lead = () if layers is None else (len(kernels),)
    host_dtype = quant.HOST_QTYPES[quant.mode_of_qtype(qtype)]

    def one(i, rows, cols, out):
        k, scale = kernels[i], scales[i]
        if stored:
            copy_into(out, np.asarray(k[rows, cols]))
        elif cols == slice(0, d_in):
            quant.host_quantize(k[rows], scale[rows], qtype, out, release, _f32, fill_scale=True)
        else:  # the input axis is split too: quantize whole channels, keep this shard's inputs
            full = np.empty((rows.stop - rows.start, d_in), host_dtype)
            quant.host_quantize(k[rows], scale[rows], qtype, full, release, _f32, fill_scale=True)
            out[...] = full[:, cols]
        if not stored:
            filled[i][rows] = True
        release([k])

    def qvalue_shard(index):
        layer_rows = range(len(kernels))[index[0]] if lead else [0]
        rows, cols = (_full(i, n) for i, n in zip(index[len(lead):], (d_out, d_in)))
        out = aligned_empty(tuple(len(layer_rows) for _ in lead) + (rows.stop - rows.start, cols.stop - cols.start),
                            host_dtype)
        for j, i in enumerate(layer_rows):
            one(i, rows, cols, out[j] if lead else out)
        return out

    qvalue = jax.make_array_from_callback(lead + (d_out, d_in), sh.qvalue, qvalue_shard)
    if not stored:  # channels no local shard holds (other hosts'): their scales read apart
        for k, scale, done in zip(kernels, scales, filled):
            if not done.all():
                scale[...] = quant.host_scale(k, qtype, release, _f32)
    scale_all = np.stack(scales) if lead else scales[0]
    scale = jax.make_array_from_callback(scale_all.shape, sh.scale, lambda index: np.ascontiguousarray(scale_all[index]))
    return qwix.QArray(qvalue, scale, None, qtype)


def _f32(view: np.ndarray) -> np.ndarray:
    """A float32 copy of a kernel block (`pread` from its file when it is a file view)."""
    return host_copy(view, np.float32)


def _full(index: slice, n: int) -> slice:
    """A shard's slice with its bounds filled in."""
    start, stop, _ = index.indices(n)
    return slice(start, stop)


def _copy_releasing(out: np.ndarray, src: np.ndarray, release: Release, block_bytes: int = 4 << 20) -> None:
    """out[...] = src; a C-contiguous source is copied in blocks of rows, each block's pages
    released once copied (so one large tensor's file pages are never all resident at once). A
    view read from its file (`_read_file`) maps no pages: it is read whole, in `read_span`'s
    parallel parts."""
    readable = safetensors_io.can_read_spans and safetensors_io.file_span(src) is not None
    if src.ndim == 0 or not src.flags.c_contiguous or readable:
        copy_into(out, src)
        return
    step = max(1, block_bytes // max(1, src[:1].nbytes))
    for i in range(0, src.shape[0], step):
        copy_into(out[i:i + step], src[i:i + step])
        release([src[i:i + step]])


def _host_shard(leaf, dtype, release: Release, index: tuple) -> np.ndarray:
    """The part `index` (a tuple of slices) of a leaf, as a fresh aligned host array in `dtype`;
    the file pages it was copied from are released at once (layer by layer for a stack)."""
    if not isinstance(leaf, LayerStack):
        src = np.asarray(leaf[index])
        out = aligned_empty(tuple(src.shape), dtype)
        _copy_releasing(out, src, release)
        release([leaf])
        return out
    rows = range(len(leaf.layers))[index[0]]
    rest = index[1:]
    first = np.asarray(leaf.layers[0][rest])
    out = aligned_empty((len(rows),) + first.shape, dtype)

    def one(j, i):
        copy_into(out[j], np.asarray(leaf.layers[i][rest]))
        release([leaf.layers[i]])
    if _straight_read(first, out.dtype):  # no staging buffer: two layers at a time
        list(_layer_pool(os.getpid()).map(one, range(len(rows)), rows))
    else:
        for j, i in enumerate(rows):
            one(j, i)
    return out


def _straight_read(src: np.ndarray, dtype: np.dtype) -> bool:
    """Whether `copy_into` reads `src` from its file straight into the output (same dtype,
    contiguous): nothing staged, so copies may run side by side within the memory bound."""
    return (safetensors_io.can_read_spans and src.dtype == dtype and src.flags.c_contiguous
            and safetensors_io.file_span(src) is not None)


@functools.cache
def _layer_pool(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """Threads of process `pid` copying a stack's layers two at a time (each layer's reads
    are parted again among `safetensors_io`'s readers): full-size OPT-2.7B on 2 cores loaded in
    5.0 s against 5.5-6.0 one layer at a time."""
    return concurrent.futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1), thread_name_prefix="place-layer")
