"""Image-conditioned generation and scoring as pure functions of (model, params, arrays).

Everything here is traced once per shape by `jax.jit` (the options are static): the image side
(ViT -> Q-Former -> projection) runs once per image, the language model is prefilled once into a
preallocated KV cache, and `decoding` extends it inside one `lax.while_loop`.

Input layouts follow transformers' `Blip2ForConditionalGeneration` (see the reference notes):
- OPT: `[soft prompt x Q][left pads][BOS][prompt]`, positions `cumsum(mask) - 1`; the repetition
  penalty counts the placeholders (the image token id), the pads between them and the text, BOS
  and the prompt.
- T5: encoder `[soft prompt x Q][prompt][</s>][right pads]`; the decoder starts from
  `decoder_start_token_id`, whose id is the only history the repetition penalty counts.
Prompt ids arrive padded to a length bucket; `counted_mask` says which positions the reference
would have (its batch padding counts for the penalty, our extra bucket padding does not).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from blip2_jax import decoding
from blip2_jax.models import kv_cache, opt, t5
from blip2_jax.models.blip2 import Blip2, opt_position_ids

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """What `generate` does (transformers' names and defaults). Hashable: a static jit argument."""
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0

    def validate(self) -> GenerationOptions:
        """Raises ValueError naming the first bad option."""
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        need(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(self.num_return_sequences >= 1,
             f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        need(self.early_stopping in (False, True, "never"),
             f"early_stopping must be False, True or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1:
            need(not self.do_sample, "sampling with beams (do_sample with num_beams > 1) is not supported")
            need(self.num_return_sequences <= self.num_beams,
                 f"num_return_sequences={self.num_return_sequences} must be <= num_beams={self.num_beams}")
        elif not self.do_sample:
            need(self.num_return_sequences == 1,
                 "num_return_sequences > 1 needs beam search (num_beams > 1) or sampling (do_sample)")
        if self.do_sample:
            need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
            need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
            need(self.top_k is None or self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        return self


# ----------------------------------------------------------------------------------------------
# The image side
# ----------------------------------------------------------------------------------------------
def soft_prompts(model: Blip2, params, pixel_values: Array) -> Array:
    """[B, H, W, 3] -> projected query outputs [B, Q, D_llm] in the LLM's compute dtype (the
    Q-Former runs in float32 and its output is cast down, as the reference does)."""
    prompt = model.apply({"params": params}, pixel_values, method=Blip2.soft_prompt)
    return prompt.astype(model.text_dtype)


def _lm(model: Blip2, params, fn, *args, **kwargs):
    """Runs fn(language_model, *args) inside `apply` (so the cache plumbing stays here)."""
    return model.apply({"params": params}, *args, method=lambda m, *a: fn(m.language_model, *a, **kwargs))


# ----------------------------------------------------------------------------------------------
# Prefill + one-token step for each language model family
# ----------------------------------------------------------------------------------------------
def _opt_prefill(model: Blip2, params, prompt, input_ids, attention_mask, max_new_tokens):
    """-> first_logits [B, V], cache, step_fn(rows_repeat) factory.

    The prompt's keys/values stay at batch B, outside the loop state, shared by the beams (or
    samples) of each row; the loop carries only the generated tokens' slots."""
    cfg = model.config.text
    b = input_ids.shape[0]
    embeds, mask = model.apply({"params": params}, prompt, input_ids, attention_mask,
                               method=Blip2.prepend_prompt)
    length = embeds.shape[1]
    positions = opt_position_ids(mask)
    prompt_cache = opt.init_cache(cfg, b, length, dtype=model.text_dtype)
    hidden, prompt_cache = _lm(model, params, lambda lm, *a: lm(*a, return_hidden=True), embeds, mask,
                               positions, prompt_cache, jnp.int32(0))
    first_logits = _lm(model, params, lambda lm, h: lm.logits(h), hidden[:, -1])
    next_position = positions[:, -1] + 1  # the prompt's last token is real (left padding)
    # Generated token i (fed back at step i) takes slot length + i; the last one is never fed
    # back. Causality hides the slots not written yet.
    new_slots = max(max_new_tokens - 1, 1)
    cache = opt.init_cache(cfg, b, new_slots, dtype=model.text_dtype)
    cache_mask = jnp.concatenate([mask, jnp.ones((b, new_slots), mask.dtype)], axis=1)

    def make_step(repeat: int):
        mask_r = decoding.repeat_for_beams(cache_mask, repeat)
        pos_r = decoding.repeat_for_beams(next_position, repeat)

        def step_fn(tokens, cache_, step):
            def run(lm, tok, c):
                c = kv_cache.with_prefix(c, prompt_cache)
                h, c = lm(lm.embed(tok[:, None]), mask_r, (pos_r + step)[:, None], c, length + step,
                          return_hidden=True)
                return _materialize(lm.logits(h[:, 0])), kv_cache.without_prefix(c)
            return _lm(model, params, run, tokens, cache_)
        return step_fn

    return first_logits, cache, make_step


def _t5_prefill(model: Blip2, params, prompt, input_ids, attention_mask, max_new_tokens,
                decoder_start_token_id: int):
    cfg = model.config.text
    b = input_ids.shape[0]
    embeds, mask = model.apply({"params": params}, prompt, input_ids, attention_mask,
                               method=Blip2.prepend_prompt)
    encoded = _lm(model, params, lambda lm, e, m: lm.encode(e, m), embeds, mask)
    start = jnp.full((b, 1), decoder_start_token_id, jnp.int32)
    cache = t5.init_cache(cfg, b, max_new_tokens, dtype=model.text_dtype)
    logits, cache = _lm(model, params, lambda lm, *a: lm.decode(*a), start, encoded, mask, cache,
                        jnp.int32(0))
    # The cross-attention keys/values never change: keep them out of the loop state (beam search
    # would otherwise reorder them every step), at batch B: the beams (samples) of a row share
    # them in the attention (`kv_cache.attend` groups the query rows) instead of copies.
    cross = {k: cache.pop(k) for k in ("cross_k", "cross_v")}

    def make_step(repeat: int):
        mask_r = decoding.repeat_for_beams(mask, repeat)

        def step_fn(tokens, cache_, step):
            def run(lm, tok, c):
                out, c = lm.decode(tok[:, None], None, mask_r, dict(c, **cross), step + 1)
                return _materialize(out[:, 0]), {"k": c["k"], "v": c["v"]}
            return _lm(model, params, run, tokens, cache_)
        return step_fn

    return logits[:, -1], cache, make_step


def _materialize(logits: Array) -> Array:
    """Keeps the LM head's matmul out of the fusions of the score processing that follows (XLA
    on CPU otherwise fuses the [B, V] dot into its consumers and runs it 2x slower)."""
    return jax.lax.optimization_barrier(logits)


def _presence(model: Blip2, input_ids, counted_mask, decoder_start_token_id):
    """The token history the reference's repetition penalty counts, as a bitmap [B, V]."""
    vocab = model.config.text.vocab_size
    b = input_ids.shape[0]
    if model.config.is_encoder_decoder:
        return decoding.token_presence(jnp.full((b, 1), decoder_start_token_id, jnp.int32), vocab)
    presence = decoding.token_presence(input_ids, vocab, counted_mask)
    image_token = model.config.image_token_index
    if image_token is not None and 0 <= image_token < vocab:
        presence = presence.at[:, image_token].set(True)
    return presence


def generate_tokens(model: Blip2, params, prompt: Array, input_ids: Array, attention_mask: Array,
                    counted_mask: Array, rng: Array, *, options: GenerationOptions,
                    decoder_start_token_id: int = 0) -> Array:
    """Soft prompts + text prompts -> new token ids int32 [B, R, max_new_tokens]
    (R = num_return_sequences, best first for beam search; positions after EOS hold the pad id).

    prompt [B, Q, D_llm] from `soft_prompts` (the image side is a separate program, shared by
    every set of options); input_ids / attention_mask [B, T] prompt tokens without image
    placeholders (OPT: left-padded; T5: right-padded); counted_mask [B, T] (see module doc).
    """
    o = options
    if model.config.is_encoder_decoder:
        first, cache, make_step = _t5_prefill(model, params, prompt, input_ids, attention_mask,
                                              o.max_new_tokens, decoder_start_token_id)
    else:
        first, cache, make_step = _opt_prefill(model, params, prompt, input_ids, attention_mask,
                                               o.max_new_tokens)
    presence = None
    if o.repetition_penalty != 1.0:
        presence = _presence(model, input_ids, counted_mask, decoder_start_token_id)
    common = dict(max_new_tokens=o.max_new_tokens, min_new_tokens=o.min_new_tokens,
                  eos_token_id=o.eos_token_id or None, pad_token_id=o.pad_token_id,
                  repetition_penalty=o.repetition_penalty)
    b = input_ids.shape[0]
    if o.num_beams > 1:
        tokens, _ = decoding.beam_search(first, cache, make_step(o.num_beams), num_beams=o.num_beams,
                                         length_penalty=o.length_penalty, early_stopping=o.early_stopping,
                                         num_return_sequences=o.num_return_sequences,
                                         presence=presence, **common)
        return tokens
    if not o.do_sample:
        return decoding.greedy_search(first, cache, make_step(1), presence=presence, **common)[:, None]
    # Sampling several sequences per row: rows repeated after the prefill, [b0, b0, b1, b1, ...].
    r = o.num_return_sequences

    def rep(x, axis=0):
        return decoding.repeat_for_beams(x, r, axis)

    tokens = decoding.sample(rep(first), jax.tree.map(lambda c: rep(c, 1), cache), make_step(r),
                             rng=rng, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                             presence=None if presence is None else rep(presence), **common)
    return tokens.reshape(b, r, -1)


# ----------------------------------------------------------------------------------------------
# Scoring: log-likelihood of candidate texts
# ----------------------------------------------------------------------------------------------
def log_likelihood(model: Blip2, params, prompts: Array, image_index: Array, input_ids: Array,
                   attention_mask: Array, target_ids: Array, target_mask: Array,
                   decoder_input_ids: Array | None = None) -> Array:
    """Summed log-probability of each row's target tokens, float32 [R].

    prompts [N, Q, D_llm] soft prompts of each image once; image_index int [R] (each row's image).
    OPT: input_ids [R, T] = `[BOS][prompt][text]` right-padded; token j is predicted by the
    position before it (the last soft prompt for j = 0); target_ids = input_ids.
    T5: input_ids = the encoder prompt, decoder_input_ids [R, Td] = `[start] + text[:-1]`,
    target_ids [R, Td] = `text`. target_mask marks the text tokens to sum.
    """
    prompt = prompts[image_index]
    if model.config.is_encoder_decoder:
        logits = model.apply({"params": params}, prompt, input_ids, attention_mask, decoder_input_ids,
                             method=Blip2.lm_logits)
    else:
        logits = model.apply({"params": params}, prompt, input_ids, attention_mask, method=Blip2.lm_logits)
        logits = logits[:, prompt.shape[1] - 1:-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, target_ids[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_mask != 0, picked, 0.0), axis=-1)
