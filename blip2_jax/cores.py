"""Serving on every core of a CPU host: one host device per core, decoding's products split.

XLA's CPU runtime runs one device's products one after another on one thread, so a decoding
step (matrix-vector products, bound by reading the weights) used one core. With the host split
into one JAX device per core (`jax_num_cpu_devices`, set before JAX starts) and a mesh whose
"tensor" axis spans them, each streamed product runs on all of them at once, every device
reading its share of the output channels (`streaming.per_device`; the language model's kernels
are placed split that way, `serving.split_kernels`). Full-size OPT-2.7B on 2 cores: a batch-1
decoding step of 88-136 ms (with the machine's bandwidth) against 157-164 on one device, the same
tokens.

    model = blip2_jax.load(dir, dtype="bfloat16", mesh="cores")   # or mesh=cores.mesh(2)
"""
from __future__ import annotations

import os


def available() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def request(n: int | None = None) -> int:
    """Asks JAX for `n` host devices (default: `available()`) when its backends have not started
    yet (later, the count it started with stays). -> the host devices JAX has or will have."""
    import jax
    from jax._src import xla_bridge

    n = available() if n is None else n
    if n < 1:
        raise ValueError(f"cores: need at least 1, got {n}")
    if not xla_bridge.backends_are_initialized() and jax.config.jax_num_cpu_devices in (-1, None) \
            and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", n)
        return n
    return len(jax.devices("cpu"))


def mesh(n: int | None = None):
    """A (data 1, fsdp 1, tensor k) mesh over k = min(n or `available()`, JAX's host devices) CPU
    devices (asking JAX for n first, `request`), or None where k is 1 or JAX's default backend is
    not the CPU (an accelerator serves on its own mesh)."""
    import jax

    from blip2_jax import sharding

    n = available() if n is None else n
    k = min(n, request(n))
    if jax.default_backend() != "cpu" or k <= 1:
        return None
    return sharding.make_mesh((1, 1, k), devices=jax.devices("cpu")[:k])
