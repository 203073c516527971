"""Building blocks shared by every tower: dense layers and norms with logical axis names,
activations by name, and the attention core.

Logical axis names used on parameters (mapped to mesh axes by `blip2_jax.sharding.RULES`):
  "embed" model width, "mlp" FFN width, "heads" attention heads, "kv" head dim, "vocab",
  "layers" scanned layer axis, "norm" norm scales/biases, "conv" patch-conv spatial/channel dims,
  "position" position tables, "relpos" T5 relative buckets.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax import quant
from blip2_jax.models import streaming

Dtype = Any
Array = jax.Array

NEG_INF = -1e9  # additive mask value; finite so fully-masked rows stay NaN-free


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def precision(dtype: Dtype):
    """float32 parity with the reference needs full-precision matmuls on TPU/GPU too;
    half-precision compute is chosen with `dtype`, not by silently lowering float32 matmuls."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def logical(init: Callable, names: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(names))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def half_dot_f32(x: Array, kernel: Array, dims) -> Array:
    """dot_general of half-precision operands with a float32 result (the LM head's logits), whose
    backward rounds the float32 cotangent to the operands' dtype first, as a half-precision
    reference's backward does. Without that, the transposed product mixes float32 and half
    operands and XLA makes a float32 copy of the whole [V, D] embedding (0.5 GB for OPT-2.7B)."""
    return jax.lax.dot_general(x, kernel, dims, preferred_element_type=jnp.float32)


def _half_dot_f32_fwd(x, kernel, dims):
    return half_dot_f32(x, kernel, dims), (x, kernel)


def _half_dot_f32_bwd(dims, res, g):
    x, kernel = res
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), x, kernel)
    return vjp(g.astype(x.dtype))


half_dot_f32.defvjp(_half_dot_f32_fwd, _half_dot_f32_bwd)


def linear(x: Array, kernel: Array, dtype: Dtype, transposed: bool = False,
           out_dtype: Dtype | None = None) -> Array:
    """x [..., in] times a kernel [in, out] (or [out, in] when `transposed`), computed in `dtype`
    -> [..., out] in `out_dtype` (default `dtype`). A few rows against a half-precision [out, in]
    kernel on CPU (decoding) stream it (`models/streaming.py`)."""
    out_dtype = dtype if out_dtype is None else out_dtype
    if isinstance(kernel, streaming.Banded):  # [out, in] as its input bands (CPU serving)
        return streaming.banded_linear(x, kernel, dtype).astype(out_dtype)
    rows = math.prod(x.shape[:-1])
    if transposed and kernel.ndim == 2 and streaming.applies(rows, kernel.dtype):
        return streaming.per_device(streaming.streaming_dot, x.astype(dtype), kernel.astype(dtype)).astype(out_dtype)
    dims = (((x.ndim - 1,), (1 if transposed else 0,)), ((), ()))
    compute = streaming.product_dtype(dtype)
    if compute != dtype:  # serving on a CPU without half-precision units
        if transposed and kernel.ndim == 2:  # as a one-layer stack: few rows convert a chunk at a time
            # (a float32 copy of the whole kernel would be hoisted out of decoding's loop)
            y = streaming.layer_linear(x, streaming.LayerOf(kernel[None], jnp.int32(0)), dtype)
        else:
            y = jax.lax.dot_general(x.astype(compute), kernel.astype(compute), dims, precision=precision(compute))
        return y.astype(out_dtype)
    if jnp.dtype(dtype).itemsize == 2 and jnp.dtype(out_dtype) == jnp.float32:
        return half_dot_f32(x.astype(dtype), kernel.astype(dtype), dims)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), dims, precision=precision(dtype),
                            preferred_element_type=None if out_dtype == dtype else out_dtype)
    return y.astype(out_dtype)


def layer_linear(x: Array, kernel: streaming.LayerOf, dtype: Dtype, precision=None) -> Array:
    """x [..., in] times layer `kernel.index` of a stacked [L, out, in] kernel (float, `Banded` or
    quantized), the layer read in place (`models/streaming.py`) -> [..., out] in `dtype`."""
    stack, rows = kernel.stack, math.prod(x.shape[:-1])
    if quant.is_quantized(stack):
        if streaming.applies(rows, stack.qvalue.dtype):
            return streaming.per_device(lambda x, k, i: quant.streaming_dot(x, k, layer=i), x.astype(dtype),
                                        stack, kernel.index).astype(dtype)
        one = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, kernel.index, keepdims=False), stack)
        return quant.dense(x, one, dtype, precision)
    return streaming.layer_linear(x, kernel, dtype, precision).astype(dtype)


def layer_params(stacked: dict, index: Array) -> dict:
    """A scanned layer's params from the stacked tree: kernels as `streaming.LayerOf` their
    stack (read in place), every other leaf (biases, norms) sliced."""
    def one(path, leaf):
        if getattr(path[-1], "key", None) == "kernel":
            return streaming.LayerOf(leaf, index)
        return jax.lax.dynamic_index_in_dim(leaf, index, keepdims=False)
    stop = lambda x: quant.is_quantized(x) or isinstance(x, streaming.Banded)
    return jax.tree_util.tree_map_with_path(one, stacked, is_leaf=stop)


class CheapParams:
    """`param` without flax's shape check by `jax.eval_shape` of the initialiser, which runs for
    every existing parameter on every trace (about 1 ms each: ~2 s of a full-size model's first
    caption, even with the compilation cache warm). The stored shape is compared with the shape
    argument directly, with flax's error."""

    def param(self, name, init_fn, *init_args, unbox: bool = True, **init_kwargs):
        if self.scope is None or not self.has_variable("params", name) or \
                self.is_mutable_collection("params"):
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        value = self.get_variable("params", name)
        plain = nn.meta.unbox(value)
        shape = init_args[0] if init_args else init_kwargs.get("shape")
        if isinstance(shape, (tuple, list)) and hasattr(plain, "shape") and \
                tuple(plain.shape) != tuple(shape):
            raise flax.errors.ScopeParamShapeError(name, self.scope.path_text, tuple(plain.shape),
                                                   tuple(shape))
        return plain if unbox else value


class LayerNorm(CheapParams, nn.LayerNorm):
    """flax's LayerNorm (`CheapParams`)."""


class Embed(CheapParams, nn.Embed):
    """flax's Embed (`CheapParams`)."""


class Dense(CheapParams, nn.Module):
    """y = x @ W + bias for W [in, out], annotated `axes=(in_axis, out_axis)`.

    `transposed`: the kernel is stored [out, in], as torch's Linear stores it (names
    `(out_axis, in_axis)`). The frozen towers (ViT, OPT, T5) use it: their checkpoints are read
    without a transposition, and decoding streams each output channel's contiguous weights."""
    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    transposed: bool = False

    @nn.compact
    def __call__(self, x):
        stored = self.get_variable("params", "kernel")
        if isinstance(stored, streaming.LayerOf):  # a scanned layer's kernel, read in its stack
            y = layer_linear(x, stored, self.dtype, precision(self.dtype))
        elif quant.is_quantized(stored):  # a frozen tower's int8/int4 kernel (blip2_jax/quant.py)
            y = quant.dense(x, stored, self.dtype, precision(self.dtype))
        elif isinstance(stored, streaming.Banded):  # a CPU-served kernel in input bands
            y = linear(x, stored, self.dtype, transposed=True)
        else:
            shape, names = (x.shape[-1], self.features), self.axes
            if self.transposed:
                shape, names = shape[::-1], names[::-1]
            kernel = self.param("kernel", logical(self.kernel_init, names), shape, self.param_dtype)
            y = linear(x, kernel, self.dtype, self.transposed)
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
               use_bias: bool = True, use_scale: bool = True) -> nn.LayerNorm:
    return LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
        scale_init=logical(nn.initializers.ones, ("norm",)),
        bias_init=logical(nn.initializers.zeros, ("norm",)), name=name)


def split_heads(x: Array, num_heads: int) -> Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def merge_heads(x: Array) -> Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def attention(q: Array, k: Array, v: Array, mask: Array | None = None, bias: Array | None = None,
              scale: float | None = None) -> Array:
    """Softmax attention with float32 logits and softmax.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; mask: bool, broadcastable to [B, H, Tq, Tk]
    (True = may attend); bias: additive float, broadcastable to [B, H, Tq, Tk].
    `scale` defaults to D**-0.5 (T5 passes 1.0). Returns [B, Tq, H, D] in q's dtype.
    """
    out_dtype, compute = q.dtype, streaming.product_dtype(v.dtype)  # float32 on CPUs without bf16
    q, k, v = (a.astype(compute) for a in (q, k, v))
    prec = precision(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec, preferred_element_type=jnp.float32)
    probs = attention_probs(logits, q.shape[-1], mask, bias, scale).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec).astype(out_dtype)


def attention_probs(logits: Array, head_dim: int, mask: Array | None = None, bias: Array | None = None,
                    scale: float | None = None) -> Array:
    """float32 logits [B, H, Tq, Tk] -> float32 softmax probabilities: scaled (default
    head_dim**-0.5), plus `bias`, masked (`mask` True = may attend)."""
    logits = logits * (head_dim ** -0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def padding_mask(key_mask: Array) -> Array:
    """[B, Tk] (1 = real token) -> bool [B, 1, 1, Tk]."""
    return key_mask.astype(bool)[:, None, None, :]


def causal_mask(tq: int, tk: int, offset: int | Array = 0) -> Array:
    """bool [1, 1, Tq, Tk]: query i (at absolute position offset+i) sees keys 0..offset+i."""
    qpos = jnp.arange(tq)[:, None] + offset
    return (jnp.arange(tk)[None, :] <= qpos)[None, None]


# Rematerialisation policies, chosen by name in the config (`model.remat_policy`).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat(block: type[nn.Module], policy: str, scan_layers: bool, static_argnums: tuple[int, ...]):
    """Wrap a layer class in nn.remat by policy name ("none" leaves it as is)."""
    if policy == "none":
        return block
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r} (one of 'none', {sorted(REMAT_POLICIES)})")
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not scan_layers,
                    static_argnums=static_argnums)
