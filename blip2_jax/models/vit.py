"""The frozen image encoders of BLIP-2: EVA ViT-g/14 and CLIP ViT-L/14 (paper §3.1).

Both are pre-LN vision transformers; they differ only in small details chosen by `config.kind`:

| | `eva` (HF `Blip2VisionModel`) | `clip` (HF `CLIPVisionModel`) |
|---|---|---|
| patch conv bias | yes | no |
| LayerNorm before the blocks | no | yes (`pre_layernorm`, HF `pre_layrnorm`) |
| attention biases | q, (zero) k and v | q, k and v |
| activation | exact erf-GELU | QuickGELU |

`num_hidden_layers` blocks run (BLIP-2 uses the second-to-last block's output, i.e. 39 of 40 or
23 of 24), followed by `post_layernorm` = BLIP-2's `ln_vision` (outside the frozen ViT in LAVIS,
so it is trainable). Pixels are NHWC. A picture whose size differs from `config.image_size` gets
bicubically interpolated position embeddings (`interpolate_positions`), numerically the same as
transformers' `interpolate_pos_encoding=True` (PyTorch `F.interpolate(mode="bicubic",
align_corners=False)`, no antialiasing).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models.configs import VisionConfig
from blip2_jax.models.layers import (Dense, activation, attention, layer_norm, logical, merge_heads,
                                     precision, remat, split_heads)
from blip2_jax.sharding import constrain

Dtype = Any


# PyTorch's bicubic kernel uses the cubic-convolution coefficient a = -0.75 (Keys uses -0.5).
TORCH_BICUBIC_A = -0.75

ACT = ("act_batch", "act_length", "act_embed")


# ----------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ----------------------------------------------------------------------------------------------
def _cubic_weights(t: np.ndarray, a: float = TORCH_BICUBIC_A) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t: [n] -> [n, 4]."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix M such that M @ x is PyTorch's 1-D bicubic resize of x
    (align_corners=False, no antialias, border taps clamped), computed in float64."""
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), weights[:, k])
    return m


def interpolate_positions(table: jax.Array, new_grid: int) -> jax.Array:
    """Position table [1 + g*g, D] (CLS first, then a row-major g x g grid) -> [1 + n*n, D]."""
    grid = int(round((table.shape[0] - 1) ** 0.5))
    if grid * grid != table.shape[0] - 1:
        raise ValueError(f"position table of {table.shape[0] - 1} patches is not a square grid")
    if new_grid == grid:
        return table
    m = jnp.asarray(bicubic_resize_matrix(grid, new_grid), table.dtype)
    patches = table[1:].reshape(grid, grid, -1)
    patches = jnp.einsum("ij,jkd,lk->ild", m, patches, m, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:1], patches.reshape(new_grid * new_grid, -1)], axis=0)


def resize_position_embeddings(params: dict, cfg: VisionConfig, new_image_size: int) -> dict:
    """Resize a loaded checkpoint's position table once for a new image size (LAVIS does this
    when fine-tuning at 364 or 490 px). Returns a new params tree; use it with
    `dataclasses.replace(cfg, image_size=new_image_size)`."""
    table = params["embeddings"]["position_embedding"]
    new = interpolate_positions(jnp.asarray(table), new_image_size // cfg.patch_size)
    embeddings = dict(params["embeddings"], position_embedding=np.asarray(new).astype(table.dtype)
                      if isinstance(table, np.ndarray) else new)
    return dict(params, embeddings=embeddings)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class VisionEmbeddings(nn.Module):
    """Patchify (conv with stride = patch), prepend CLS, add absolute positions.

    pixel_values [B, H, W, 3] -> [B, 1 + (H/p)*(W/p), D]."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        b, h, w, _ = pixel_values.shape
        if h != w:
            raise ValueError(f"non-square images ({h}x{w}) are not supported")
        patches = nn.Conv(
            d, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.kind == "eva",
            dtype=self.dtype, param_dtype=self.param_dtype, precision=precision(self.dtype),
            kernel_init=logical(nn.initializers.normal(0.02), (None, None, "conv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)), name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, d)
        cls = self.param("class_embedding", logical(nn.initializers.normal(0.02), ("embed",)),
                         (d,), self.param_dtype)
        positions = self.param(
            "position_embedding", logical(nn.initializers.truncated_normal(0.02), ("position", "embed")),
            (cfg.num_patches + 1, d), self.param_dtype)
        positions = interpolate_positions(positions, h // p)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches], axis=1)
        return x + positions.astype(self.dtype)[None]


class VisionAttention(nn.Module):
    """Multi-head self-attention. EVA's k-bias is zero in LAVIS and cancels in the softmax; it is
    kept as a parameter so that any transformers checkpoint round-trips exactly."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        dense = functools.partial(Dense, d, dtype=self.dtype, param_dtype=self.param_dtype, transposed=True)
        q = dense(axes=("embed", "heads"), use_bias=cfg.qkv_bias, name="query")(x)
        k = dense(axes=("embed", "heads"), use_bias=cfg.qkv_bias, name="key")(x)
        v = dense(axes=("embed", "heads"), use_bias=cfg.qkv_bias, name="value")(x)
        out = attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
        return dense(axes=("heads", "embed"), name="out")(merge_heads(out))


class VisionBlock(nn.Module):
    """Pre-LN transformer block. Signature (carry, _) -> (carry, None) so it can be scanned."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _=None):
        cfg = self.config
        norm = functools.partial(layer_norm, cfg.layer_norm_eps, self.dtype, self.param_dtype)
        h = VisionAttention(cfg, self.dtype, self.param_dtype, name="self_attn")(norm(name="layer_norm1")(x))
        x = constrain(x + h, ACT)
        h = norm(name="layer_norm2")(x)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  transposed=True, name="fc1")(h)
        h = activation(cfg.hidden_act)(h)
        h = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  transposed=True, name="fc2")(h)
        return constrain(x + h, ACT), None


class VisionTransformer(nn.Module):
    """EVA / CLIP ViT followed by BLIP-2's `ln_vision` (`post_layernorm`).

    `__call__(pixel_values [B, H, W, 3]) -> [B, 1 + (H/p)^2, D]`; `encode` gives the blocks' output
    before `post_layernorm` (what HF CLIP calls `hidden_states[num_hidden_layers]`).
    Params: `embeddings` {patch_embedding, class_embedding, position_embedding}, `pre_layernorm`
    (clip only), `layers` (scanned, leading axis = layer) or `layers_{i}`, `post_layernorm`.
    """
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        if cfg.kind not in ("eva", "clip"):
            raise ValueError(f"unknown vision tower kind {cfg.kind!r} (eva or clip)")
        self.embeddings = VisionEmbeddings(cfg, self.dtype, self.param_dtype)
        if cfg.kind == "clip":
            self.pre_layernorm = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype)
        block = remat(VisionBlock, self.remat_policy, self.scan_layers, static_argnums=())
        if self.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype)
        else:
            self.layers = [block(cfg, self.dtype, self.param_dtype) for _ in range(cfg.num_hidden_layers)]
        self.post_layernorm = layer_norm(cfg.post_layernorm_eps, self.dtype, self.param_dtype)

    def encode(self, pixel_values):
        """[B, H, W, 3] -> the last configured block's output [B, 1 + N, D] (no ln_vision)."""
        x = self.embeddings(pixel_values)
        if self.config.kind == "clip":
            x = self.pre_layernorm(x)
        x = constrain(x, ACT)
        if self.scan_layers:
            x, _ = self.layers(x, None)
        else:
            for layer in self.layers:
                x, _ = layer(x, None)
        return x

    def __call__(self, pixel_values):
        """[B, H, W, 3] -> image features for the Q-Former [B, 1 + N, D] (after ln_vision)."""
        return self.post_layernorm(self.encode(pixel_values))
