"""The device mesh and the one table of logical-axis rules.

Parameters are annotated with logical names where they are created (`models/layers.py`);
activations are pinned with `nn.with_logical_constraint`. This table maps both to mesh axes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). The only place this mapping lives.
RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv", None),
    ("position", None),
    ("relpos", None),
    ("queries", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices. Auto axes (linen)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"{len(devices)} are available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


@contextlib.contextmanager
def use(mesh: Mesh | None, rules=RULES):
    """The mesh and the logical-axis rules for tracing: activations pinned with `constrain` and
    params annotated in `models/` resolve to this mesh. `None`: nothing set."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def single_device_mesh(device=None) -> Mesh:
    """A (1, 1, 1) mesh of one device (default: the first): one code path for one device and many."""
    return make_mesh((1, 1, 1), devices=[device or jax.devices()[0]])


def logical_to_sharding(logical_specs, mesh: Mesh, rules=RULES):
    """A pytree of logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def param_shardings(abstract_variables, mesh: Mesh, rules=RULES):
    """Shardings for the boxed (`nn.Partitioned`) output of `jax.eval_shape(model.init, ...)`."""
    return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x, names: Sequence[str | None]):
    """Pin an activation's layout by logical names (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, tuple(names))


def unbox(tree):
    """Strip flax's logical-axis metadata (`nn.Partitioned`) without applying constraints."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total
