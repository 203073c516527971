"""Reading and writing `.safetensors` files (single or sharded), validated, memory-mapped.

Our own small reader so that bfloat16 tensors load (numpy has no bf16; `ml_dtypes` does), no
pickled code is ever executed, and an untrusted file is checked before anything is allocated:
the header is a bounded UTF-8 JSON object whose entries have a known dtype, a shape of
non-negative integers and integer offsets that tile the data region exactly (no gap, no overlap,
nothing past the end: the format's own rules), and only regular files are opened. A sharded
index must name shards inside the model directory, and every tensor must sit in exactly the
shard the index names. Tensors come back as read-only views of the file's memory map;
`LazyStateDict.release` drops the pages a view touched, so reading a model tensor by tensor never
accumulates the files in memory. A view's bytes can also be read with `pread` (`file_span`,
`read_span`): copying through the map faults each 4 KiB page of the file in (2.3-7.3 GB/s on a
virtual machine, measured), reading copies from the page cache (10-13 GB/s there).
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np
from numpy.lib.array_utils import byte_bounds

from blip2_jax import files
from blip2_jax.models.configs import LIMITS_ENV, Limits

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the format's own bound
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
_PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # absent where mmap has no madvise (Windows)


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded as asked (missing/unexpected keys, shapes, types)."""


class TensorEntry(NamedTuple):
    """One header entry: dtype, shape, and [start, end) in the data region."""
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


# ----------------------------------------------------------------------------------------------
# Headers
# ----------------------------------------------------------------------------------------------
def read_header(path: str, max_tensors: int | None = None) -> tuple[dict[str, TensorEntry], int]:
    """A safetensors file's validated header -> ({name: TensorEntry}, byte offset of the data)."""
    with files.open_regular(path, WeightsError, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{path}: not a safetensors file (too short: {size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: not a safetensors file (header length {n} > {MAX_HEADER_BYTES})")
        if 8 + n > size:
            raise WeightsError(f"{path}: header length {n} runs past the end of the file ({size} bytes): truncated?")
        raw = f.read(n)
    header = _parse_header(raw, path, max_tensors or Limits.from_env().max_tensors)
    entries = {name: _entry(name, info, path) for name, info in header.items()}
    _check_layout(entries, size - 8 - n, path)
    return entries, 8 + n


def _parse_header(raw: bytes, path: str, max_tensors: int) -> dict:
    """Header bytes -> the JSON object without `__metadata__`. The bracket and comma counts bound
    how many Python objects parsing can create (a legitimate entry has one object, two lists and
    a few commas), so a hostile header cannot take more memory than a large honest one."""
    if not raw.lstrip().startswith(b"{"):
        raise WeightsError(f"{path}: corrupt safetensors header: not a JSON object")
    if raw.count(b"{") + raw.count(b"[") > 3 * max_tensors + 16 or raw.count(b",") > 16 * max_tensors + 64:
        raise WeightsError(f"{path}: safetensors header has more than {max_tensors} entries' worth of JSON "
                           f"(limit max_tensors; see {LIMITS_ENV})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: corrupt safetensors header: not UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise WeightsError(f"{path}: corrupt safetensors header: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate names, over-long integers
        raise WeightsError(f"{path}: corrupt safetensors header: {' '.join(str(e).split())}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WeightsError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    return header


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"name {dup!r:.80} appears twice")
    return d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, info, path: str) -> TensorEntry:
    """One header entry, checked: a known dtype, a shape of non-negative integers, integer
    offsets [start, end] whose span is exactly the tensor's bytes."""
    where = f"{path}: tensor {name!r:.120}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where}: entry is {files.json_type(info)}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise WeightsError(f"{where}: entry has no {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise WeightsError(f"{where}: unknown dtype {dtype!r:.40} (known: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightsError(f"{where}: shape {shape!r:.60} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(f"{where}: data_offsets {offsets!r:.60} are not two integers 0 <= start <= end")
    dt = np.dtype(_DTYPES[dtype])
    nbytes = math.prod(shape) * dt.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise WeightsError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but its data_offsets "
                           f"{offsets} span {offsets[1] - offsets[0]}")
    return TensorEntry(dt, tuple(shape), offsets[0], offsets[1])


def _check_layout(entries: dict[str, TensorEntry], data_bytes: int, path: str) -> None:
    """The tensors tile the data region [0, data_bytes) exactly, as the format requires."""
    end, last = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start < end:
            raise WeightsError(f"{path}: tensor {name!r} overlaps tensor {last!r} (bytes {e.start}..{end})")
        if e.start > end:
            raise WeightsError(f"{path}: {e.start - end} bytes before tensor {name!r} belong to no tensor")
        if e.end > data_bytes:
            raise WeightsError(f"{path}: tensor {name!r} ends at byte {e.end} of a {data_bytes}-byte data "
                               "region: the file is truncated")
        end, last = e.end, name
    if end != data_bytes:
        raise WeightsError(f"{path}: {data_bytes - end} bytes after the last tensor belong to no tensor")


# ----------------------------------------------------------------------------------------------
# Lazy, memory-mapped state dicts
# ----------------------------------------------------------------------------------------------
class _Mapped(NamedTuple):
    path: str
    data_start: int
    size: int


class FileMap:
    """A file's read-only memory map that numpy views keep as their base (`__buffer__`), so a
    view knows the file it came from and can be read with `pread` instead (`file_span`)."""

    def __init__(self, fh, path: str):
        self.path = path
        self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.fd = os.dup(fh.fileno())
        weakref.finalize(self, os.close, self.fd)
        self.address = np.frombuffer(self.mm, np.uint8, count=1).ctypes.data if len(self.mm) else 0

    def __buffer__(self, flags: int) -> memoryview:
        return memoryview(self.mm)

    def __len__(self) -> int:
        return len(self.mm)


def file_span(a: np.ndarray) -> tuple[FileMap, int, int] | None:
    """(file map, file offset, byte count) of the bytes spanned by `a`, a view of a `FileMap`
    (None for other arrays)."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, FileMap) or a.size == 0:
        return None
    lo, hi = byte_bounds(a)
    return base, lo - base.address, hi - lo


def read_span(fm: FileMap, offset: int, out: np.ndarray) -> None:
    """Fills the C-contiguous `out` with the file's bytes from `offset` (`pread`, no mapping).
    A large span is read in parts by a few threads: filling fresh memory is bound by its page
    faults, which the cores take in parallel."""
    if not out.flags.c_contiguous:
        raise ValueError("read_span fills C-contiguous arrays only")
    view = memoryview(out.reshape(-1).view(np.uint8))
    step = _part_bytes(len(view))
    parts = [(i, min(i + step, len(view))) for i in range(0, len(view), step)]
    if len(parts) == 1:
        _read_vectors(fm, offset, [view])
    else:
        list(_readers(os.getpid()).map(lambda p: _read_vectors(fm, offset + p[0], [view[p[0]:p[1]]]), parts))


def read_rows_into_bands(fm: FileMap, offset: int, bands) -> None:
    """Fills the bands, C-contiguous arrays [rows, w] of one shape (or a [nb, rows, w] array),
    with the file's rows of nb * w elements from `offset`, row r's b-th run of w into
    bands[b][r]: one `preadv` per batch of rows, scattering straight into the bands (no staging
    copy), batches read by the reading threads."""
    bands = list(bands)
    if any(not b.flags.c_contiguous or b.shape != bands[0].shape for b in bands):
        raise ValueError("read_rows_into_bands fills C-contiguous arrays of one shape only")
    flat = [b.view(np.uint8).reshape(b.shape[0], -1) for b in bands]
    nb, rows = len(flat), flat[0].shape[0]
    row_bytes = nb * flat[0].shape[1]
    per = max(1, min(_IOV_MAX // nb, _MAX_PART // max(row_bytes, 1)))

    def batch(r0: int) -> None:
        views = [memoryview(f[r]) for r in range(r0, min(r0 + per, rows)) for f in flat]
        _read_vectors(fm, offset + r0 * row_bytes, views)

    list(_readers(os.getpid()).map(batch, range(0, rows, per)))


def _read_vectors(fm: FileMap, offset: int, views: list[memoryview]) -> None:
    """Consecutive file bytes from `offset` into `views` in order (`preadv`, going on after a
    short read); a file that ends first is a one-line error."""
    done, i = 0, 0
    while i < len(views):
        n = os.preadv(fm.fd, views[i:], offset + done)
        if n <= 0:
            raise WeightsError(f"{fm.path}: ended at byte {offset + done} while reading a tensor: "
                               "the file changed or was truncated while loading")
        done += n
        while i < len(views) and n >= len(views[i]):  # a short read: go on from where it stopped
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


def _part_bytes(n: int) -> int:
    """Bytes per reading thread's part: a span is dealt out in at least two parts per thread
    (a full-size checkpoint's per-device shards are a few MB: read whole by one thread, loading
    ran at a third of the machine's file-reading rate), none under 1 MiB nor over 16 MiB."""
    threads = min(4, os.cpu_count() or 1)
    return int(min(_MAX_PART, max(_MIN_PART, -(-n // (2 * threads)))))


_MIN_PART, _MAX_PART = 1 << 20, 16 << 20


@functools.cache
def _readers(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """The reading threads of process `pid` (a forked child makes its own: threads do not fork)."""
    return concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="safetensors-read")


can_read_spans = hasattr(os, "preadv")


class LazyStateDict(Mapping):
    """A read-only mapping name -> np.ndarray over one or more validated safetensors files.

    Values are read-only views of the files' memory maps (nothing is read until used). A name
    in two files is an error; with `weight_map` (name -> file path, from a sharded index) every
    tensor must be in the file the index names, and every indexed name in some file."""

    def __init__(self, paths: Iterable[str], *, weight_map: Mapping[str, str] | None = None,
                 max_tensors: int | None = None):
        self._files: list[_Mapped] = []
        self._index: dict[str, tuple[int, TensorEntry]] = {}
        for path in paths:
            entries, data_start = read_header(path, max_tensors)
            i = len(self._files)
            self._files.append(_Mapped(path, data_start, data_start + (max((e.end for e in entries.values()),
                                                                          default=0))))
            for name, e in entries.items():
                if name in self._index:
                    other = self._files[self._index[name][0]].path
                    raise WeightsError(f"tensor {name!r} is in two files: {other} and {path}")
                self._index[name] = (i, e)
        if weight_map is not None:
            self._check_index(weight_map)
        self._maps: dict[int, FileMap] = {}

    def _check_index(self, weight_map: Mapping[str, str]) -> None:
        for name, (i, _) in self._index.items():
            path = self._files[i].path
            want = weight_map.get(name)
            if want is None:
                raise WeightsError(f"{path}: tensor {name!r} is not listed in {INDEX_FILE}")
            if os.path.normpath(want) != os.path.normpath(path):
                raise WeightsError(f"{path}: tensor {name!r} is in this shard but {INDEX_FILE} puts it in "
                                   f"{os.path.basename(want)}")
        absent = [n for n in weight_map if n not in self._index]
        if absent:
            more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
            raise WeightsError(f"{INDEX_FILE} lists tensors no shard holds: "
                               f"{', '.join(f'{n} ({os.path.basename(weight_map[n])})' for n in absent[:5])}{more}")

    def _map(self, i: int) -> FileMap:
        if i not in self._maps:
            f = self._files[i]
            with files.open_regular(f.path, WeightsError, "safetensors file") as fh:
                if os.fstat(fh.fileno()).st_size != f.size:
                    raise WeightsError(f"{f.path}: the file changed while it was being read")
                self._maps[i] = FileMap(fh, f.path)
        return self._maps[i]

    def __getitem__(self, name: str) -> np.ndarray:
        i, e = self._index[name]
        n = math.prod(e.shape)
        if n == 0:
            return np.zeros(e.shape, e.dtype)
        return np.frombuffer(self._map(i), e.dtype, count=n, offset=self._files[i].data_start + e.start).reshape(e.shape)

    def __contains__(self, name) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][1].shape

    def dtype(self, name: str) -> np.dtype:
        return self._index[name][1].dtype

    def file_of(self, name: str) -> str:
        return self._files[self._index[name][0]].path

    def release(self, arrays: Iterable[np.ndarray] | None = None) -> None:
        """Drops the mapped pages under `arrays` (views from this mapping; None: every page) from
        this process's memory; they are read again from the file if used again."""
        if not _DONTNEED:
            return
        if arrays is None:
            for fm in self._maps.values():
                fm.mm.madvise(_DONTNEED)
            return
        for a in arrays:
            span = file_span(a) if isinstance(a, np.ndarray) else None
            if span is None or all(span[0] is not fm for fm in self._maps.values()):
                continue
            fm, lo, n = span
            start = lo // _PAGE * _PAGE
            stop = min(len(fm), -(-(lo + n) // _PAGE) * _PAGE)
            fm.mm.madvise(_DONTNEED, start, stop - start)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


# ----------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------
def checkpoint_index(directory: str) -> tuple[list[str], dict[str, str] | None]:
    """(safetensors files, name -> file path from the sharded index or None) of a
    transformers-format directory. Shard names must stay inside the directory."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.lexists(index):
        raw = files.read_json_object(index, WeightsError, "checkpoint index")
        wm = raw.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise WeightsError(f"{index}: weight_map must be a non-empty object (tensor name -> shard file), "
                               f"not {files.json_type(wm)}")
        paths: dict[str, str] = {}
        for shard in wm.values():
            if shard not in paths:
                paths[shard] = files.inside(directory, shard, WeightsError, "shard")
        missing = sorted({s for s, p in paths.items() if not os.path.exists(p)})
        if missing:
            raise WeightsError(f"{directory}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return sorted(set(paths.values())), {k: paths[v] for k, v in wm.items()}
    if os.path.lexists(os.path.join(directory, SINGLE_FILE)):
        return [os.path.join(directory, SINGLE_FILE)], None
    raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} "
                       "(pickled .bin checkpoints are not loaded; convert them to safetensors)")


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a transformers-format directory (single or sharded)."""
    return checkpoint_index(directory)[0]


def open_checkpoint(directory: str, max_tensors: int | None = None) -> LazyStateDict:
    """The validated, memory-mapped tensors of a transformers-format directory."""
    paths, weight_map = checkpoint_index(directory)
    return LazyStateDict(paths, weight_map=weight_map, max_tensors=max_tensors)


def save_state_dict(tensors: Mapping[str, np.ndarray], directory: str,
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write tensors as `model.safetensors`, or as shards plus an index when larger than
    `max_shard_bytes` (the transformers layout). Returns the written file names."""
    os.makedirs(directory, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        n = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, keys in zip(names, shards):
        _write_file(os.path.join(directory, fname), {k: tensors[k] for k in keys})
        weight_map.update({k: fname for k in keys})
    if len(shards) > 1:
        total = sum(np.asarray(tensors[k]).nbytes for k in tensors)
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _write_file(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    arrays = {}
    for name in tensors:
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise WeightsError(f"tensor {name}: dtype {a.dtype} cannot be saved")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays[name] = a
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(a.tobytes())
    os.replace(tmp, path)
