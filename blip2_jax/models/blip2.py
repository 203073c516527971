"""The composite BLIP-2 model: frozen image encoder -> Q-Former -> projection -> frozen LLM.

Parameter tree (top level): "vision_model" (frozen, except its `post_layernorm` = ln_vision),
"qformer" (query tokens, Q-Former, retrieval/ITG heads), "language_projection",
"language_model" (frozen). `Blip2ForRetrieval`-style models (config.text is None) stop at the
Q-Former. Each method is one step of the paper's pipeline so the trainer, generation and
retrieval call exactly what they need (`model.apply(vars, ..., method="...")`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax import sharding
from blip2_jax.models import layers
from blip2_jax.models.configs import Blip2Config, OPTConfig, T5Config
from blip2_jax.models.opt import OPTForCausalLM
from blip2_jax.models.qformer import QFormer
from blip2_jax.models.t5 import T5ForConditionalGeneration
from blip2_jax.models.vit import VisionTransformer


def opt_position_ids(attention_mask: jax.Array) -> jax.Array:
    """OPT positions: cumsum(mask) - 1, pads get 0 (the model adds OPT's offset of 2)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


class Blip2(nn.Module):
    """BLIP-2. Pixel inputs are NHWC. `vision_dtype`/`text_dtype` are the compute dtypes of the
    frozen towers; the Q-Former always computes in float32 like the reference."""
    config: Blip2Config
    vision_dtype: jnp.dtype = jnp.float32
    text_dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    qformer_lm_head: bool = False  # the ITG head of stage 1 (LAVIS `Qformer.cls`)
    vision_scan_layers: bool | None = None  # the image tower's own choice (None: scan_layers)

    def setup(self):
        c = self.config
        vision_scan = self.scan_layers if self.vision_scan_layers is None else self.vision_scan_layers
        self.vision_model = VisionTransformer(c.vision, dtype=self.vision_dtype, param_dtype=self.param_dtype,
                                              scan_layers=vision_scan, remat_policy=self.remat_policy)
        self.qformer = QFormer(c.qformer, num_query_tokens=c.num_query_tokens,
                               image_text_hidden_size=c.image_text_hidden_size,
                               with_lm_head=self.qformer_lm_head and c.qformer.use_qformer_text_input,
                               dtype=jnp.float32, param_dtype=jnp.float32, remat_policy=self.remat_policy)
        if c.text is not None:
            self.language_projection = layers.Dense(c.text.hidden_size, axes=(None, "embed"),
                                                    dtype=jnp.float32, param_dtype=jnp.float32)
            kw = dict(dtype=self.text_dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                      remat_policy=self.remat_policy)
            if isinstance(c.text, OPTConfig):
                self.language_model = OPTForCausalLM(c.text, **kw)
            elif isinstance(c.text, T5Config):
                self.language_model = T5ForConditionalGeneration(c.text, **kw)
            else:
                raise ValueError(f"unsupported language model config {type(c.text).__name__}")

    # --- image side ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """[B,H,W,3] -> image embeddings [B, 1+N, Dv] (after ln_vision)."""
        x = sharding.constrain(pixel_values, ("act_batch", None, None, None))
        return self.vision_model(x)

    def query_output(self, image_embeds: jax.Array, deterministic: bool = True) -> jax.Array:
        """Image embeddings -> Q-Former query outputs [B, Q, Dq] (queries cross-attend to the image)."""
        return self.qformer.query_features(image_embeds.astype(jnp.float32), deterministic=deterministic)

    def project(self, query_output: jax.Array) -> jax.Array:
        """Query outputs -> soft visual prompts for the LLM [B, Q, D_llm] (paper Fig. 3)."""
        return self.language_projection(query_output)

    def soft_prompt(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.project(self.query_output(self.encode_image(pixel_values), deterministic))

    # --- language side ------------------------------------------------------------------------
    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(input_ids)

    def __call__(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                 qformer_input_ids=None, qformer_attention_mask=None, deterministic: bool = True):
        """Runs every part the config has (used by `init` to create all parameters).

        Returns a dict: "image_embeds", "query_output", the Q-Former heads' outputs when it has
        text input, and "logits" (see `forward`) when there is an LLM."""
        image_embeds = self.encode_image(pixel_values)
        out = {"image_embeds": image_embeds}
        if self.config.qformer.use_qformer_text_input and qformer_input_ids is not None:
            out.update(self.qformer(image_embeds.astype(jnp.float32), qformer_input_ids, qformer_attention_mask,
                                    deterministic=deterministic))
        else:
            out["query_output"] = self.query_output(image_embeds, deterministic)
        if self.config.text is not None and input_ids is not None:
            out["logits"] = self.lm_logits(self.project(out["query_output"]), input_ids, attention_mask,
                                           decoder_input_ids, None, deterministic)
        return out

    def forward(self, pixel_values, input_ids, attention_mask, decoder_input_ids=None,
                decoder_attention_mask=None, deterministic: bool = True):
        """The reference forward pass (HF `Blip2ForConditionalGeneration`): logits, float32.

        OPT: [B, Q+T, V] over [soft prompt; text]. T5: [B, Td, V] over the decoder inputs, the
        encoder reading [soft prompt; text]. `input_ids` carry no image placeholders.
        """
        prompt = self.soft_prompt(pixel_values, deterministic)
        return self.lm_logits(prompt, input_ids, attention_mask, decoder_input_ids,
                              decoder_attention_mask, deterministic)

    def lm_logits(self, prompt, input_ids, attention_mask, decoder_input_ids=None,
                  decoder_attention_mask=None, deterministic: bool = True):
        """LLM logits given already projected soft prompts [B,Q,D] (so the image side can be
        computed once and reused, e.g. for scoring many candidate texts)."""
        return self.lm_head(self.lm_hidden(prompt, input_ids, attention_mask, decoder_input_ids,
                                           decoder_attention_mask, deterministic))

    def lm_hidden(self, prompt, input_ids, attention_mask, decoder_input_ids=None,
                  decoder_attention_mask=None, deterministic: bool = True):
        """The LLM's final hidden states (before the LM head): OPT [B, Q+T, D] over
        [soft prompt; text]; T5 [B, Td, D] over the decoder inputs. Training applies `lm_head`
        only where labels are, instead of over the whole vocabulary at every position."""
        embeds, mask = self.prepend_prompt(prompt, input_ids, attention_mask)
        lm = self.language_model
        if self.config.is_encoder_decoder:
            enc = lm.encode(embeds, mask, deterministic=deterministic)
            hidden, _ = lm.decode(decoder_input_ids, enc, mask, decoder_attention_mask=decoder_attention_mask,
                                  deterministic=deterministic, return_hidden=True)
            return hidden
        hidden, _ = lm.hidden_states(embeds, mask, opt_position_ids(mask), deterministic=deterministic)
        return hidden

    def lm_head(self, hidden):
        """LLM hidden states [..., D] -> float32 logits [..., V]."""
        return self.language_model.logits(hidden)

    def prepend_prompt(self, prompt, input_ids, attention_mask):
        """[soft prompt; token embeddings] and the matching mask (prompt positions always 1)."""
        tok = self.embed_tokens(input_ids)
        embeds = jnp.concatenate([prompt.astype(tok.dtype), tok], axis=1)
        ones = jnp.ones(prompt.shape[:2], attention_mask.dtype)
        return embeds, jnp.concatenate([ones, attention_mask], axis=1)
