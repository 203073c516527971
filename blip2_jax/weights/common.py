"""Helpers shared by the per-component converters: a checking tensor reader (one error lists every
missing tensor), layer stacking for `nn.scan`, and writers of torch Linear / LayerNorm tensors."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np


class TensorShapeError(ValueError):
    """A checkpoint tensor whose shape or type does not fit the configuration (`name` says which)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


class Reader:
    """Reads tensors `prefix + name` from a state dict, checking shapes; collects missing names so
    that one KeyError lists all of them (`check()`), raises TensorShapeError on a shape mismatch.

    Arrays are returned as the state dict gives them (views of a memory map stay views). A
    missing tensor is stood in for by a zero-byte broadcast placeholder, only so that conversion
    can go on to name every missing tensor: `check()` then fails; nothing invented is returned."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str = ""):
        self.sd, self.prefix, self.missing = state_dict, prefix, []

    def has(self, name: str) -> bool:
        return self.prefix + name in self.sd

    def get(self, name: str, shape: Sequence[int]) -> np.ndarray:
        key = self.prefix + name
        if key not in self.sd:
            self.missing.append(key)
            return np.broadcast_to(np.zeros((), np.float32), tuple(shape))
        x = self.sd[key]
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if tuple(x.shape) != tuple(shape):
            raise TensorShapeError(key, f"checkpoint shape {tuple(x.shape)} != expected {tuple(shape)}")
        if not is_float(x.dtype) and not (x.dtype == np.int8 and getattr(self.sd, "allows_int8", False)):
            raise TensorShapeError(key, f"checkpoint dtype {x.dtype} where a floating-point tensor is expected")
        return x

    def dense(self, name: str, d_in: int, d_out: int, bias: bool = True, transposed: bool = False) -> dict:
        """torch Linear (out, in) -> our Dense {kernel (in, out), bias}; with `transposed` the
        kernel stays (out, in) (`layers.Dense(transposed=True)`: the frozen towers)."""
        w = self.get(name + ".weight", (d_out, d_in))
        p = {"kernel": w if transposed else w.T}
        if bias:
            p["bias"] = self.get(name + ".bias", (d_out,))
        return p

    def linear(self, name: str, d_in: int, d_out: int, bias: bool = True) -> dict:
        """torch Linear -> a `Dense(transposed=True)`'s {kernel (out, in), bias}, as stored."""
        return self.dense(name, d_in, d_out, bias, transposed=True)

    def norm(self, name: str, d: int) -> dict:
        return {"scale": self.get(name + ".weight", (d,)), "bias": self.get(name + ".bias", (d,))}

    def check(self) -> None:
        if self.missing:
            raise KeyError(f"{len(self.missing)} tensor(s) missing from the checkpoint: {self.missing}")


def is_float(dtype) -> bool:
    """numpy floats and ml_dtypes' (bfloat16, float8), which numpy sees as void types."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or (dt.kind == "V" and "float" in dt.name)


def same_values(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """np.array_equal for large (memory-mapped) arrays, a block of rows at a time (no
    whole-tensor temporaries)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.ndim == 0:
        return bool(a == b)
    for i in range(0, len(a), rows):
        if not np.array_equal(a[i:i + rows], b[i:i + rows]):
            return False
    return True


def stack_layers(layers: Sequence[dict]) -> dict:
    """Per-layer trees -> one tree with a leading layer axis (the `nn.scan` layout)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def unstack_layers(tree: dict, n: int) -> list[dict]:
    return [jax.tree.map(lambda x: np.asarray(x)[i], tree) for i in range(n)]


def dense_to_hf(params: Mapping, name: str, out: dict, transposed: bool = False) -> None:
    """Our Dense -> torch Linear tensors (inverse of `Reader.dense`)."""
    kernel = np.asarray(params["kernel"])
    out[name + ".weight"] = kernel if transposed else kernel.T
    if "bias" in params:
        out[name + ".bias"] = np.asarray(params["bias"])


def linear_to_hf(params: Mapping, name: str, out: dict) -> None:
    """A `Dense(transposed=True)` -> torch Linear tensors (inverse of `Reader.linear`)."""
    dense_to_hf(params, name, out, transposed=True)


def norm_to_hf(params: Mapping, name: str, out: dict) -> None:
    out[name + ".weight"] = np.asarray(params["scale"])
    out[name + ".bias"] = np.asarray(params["bias"])
