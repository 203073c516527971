"""Reading and writing `.safetensors` files (single or sharded) with numpy memory maps.

Our own small reader so that bfloat16 tensors load (numpy has no bf16; `ml_dtypes` does), tensors
are materialised one at a time (peak host memory ≈ one copy of the weights), and no pickled code
is ever executed.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded as asked (missing/unexpected keys, shapes, types)."""


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise WeightsError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: corrupt safetensors header: {e}") from None
    return header, 8 + n


class LazyStateDict(Mapping):
    """A read-only mapping name -> np.ndarray over one or more safetensors files.

    Tensors are read on access (memory-mapped, then copied so the file can be closed) and,
    if `cast` is given, converted with `cast(name, array)` at that moment.
    """

    def __init__(self, files: list[str], cast: Callable[[str, np.ndarray], np.ndarray] | None = None):
        self._index: dict[str, tuple[str, dict, int]] = {}
        for path in files:
            header, offset = _read_header(path)
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._index[name] = (path, info, offset)
        self._cast = cast
        self._maps: dict[str, np.memmap] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, offset = self._index[name]
        if info["dtype"] not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        buf = self._maps[path][offset + start: offset + end]
        arr = np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        arr = self._cast(name, arr) if self._cast else arr
        return np.array(arr, copy=True) if arr.base is not None else arr

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name][1]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a transformers-format directory (single or sharded)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise WeightsError(f"{directory}: shard(s) listed in model.safetensors.index.json are missing: "
                               f"{', '.join(missing)}")
        return [os.path.join(directory, f) for f in files]
    if os.path.exists(single):
        return [single]
    raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                       "(pickled .bin checkpoints are not loaded; convert them to safetensors)")


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
