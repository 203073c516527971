"""Helpers shared by the per-component converters: a checking tensor reader (one error lists every
missing tensor), layer stacking for `nn.scan`, and writers of torch Linear / LayerNorm tensors."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np


class Reader:
    """Reads tensors `prefix + name` from a state dict, checking shapes; collects missing names so
    that one KeyError lists all of them (`check()`), raises ValueError on a shape mismatch."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str = ""):
        self.sd, self.prefix, self.missing = state_dict, prefix, []

    def has(self, name: str) -> bool:
        return self.prefix + name in self.sd

    def get(self, name: str, shape: Sequence[int]) -> np.ndarray:
        key = self.prefix + name
        if key not in self.sd:
            self.missing.append(key)
            return np.zeros(shape, np.float32)
        x = np.asarray(self.sd[key])
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(x.shape)} != expected {tuple(shape)}")
        return x

    def dense(self, name: str, d_in: int, d_out: int, bias: bool = True) -> dict:
        """torch Linear (out, in) -> our Dense {kernel (in, out), bias}."""
        p = {"kernel": self.get(name + ".weight", (d_out, d_in)).T}
        if bias:
            p["bias"] = self.get(name + ".bias", (d_out,))
        return p

    def norm(self, name: str, d: int) -> dict:
        return {"scale": self.get(name + ".weight", (d,)), "bias": self.get(name + ".bias", (d,))}

    def check(self) -> None:
        if self.missing:
            raise KeyError(f"{len(self.missing)} tensor(s) missing from the checkpoint: {self.missing}")


def stack_layers(layers: Sequence[dict]) -> dict:
    """Per-layer trees -> one tree with a leading layer axis (the `nn.scan` layout)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def unstack_layers(tree: dict, n: int) -> list[dict]:
    return [jax.tree.map(lambda x: np.asarray(x)[i], tree) for i in range(n)]


def dense_to_hf(params: Mapping, name: str, out: dict) -> None:
    out[name + ".weight"] = np.asarray(params["kernel"]).T
    if "bias" in params:
        out[name + ".bias"] = np.asarray(params["bias"])


def norm_to_hf(params: Mapping, name: str, out: dict) -> None:
    out[name + ".weight"] = np.asarray(params["scale"])
    out[name + ".bias"] = np.asarray(params["bias"])
