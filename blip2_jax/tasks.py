"""Training objectives: which model passes run and which losses combine, per task.

A task is chosen by name (`config.task`):
  "stage1"  ITC + ITM + ITG against the frozen image encoder (paper §3.2); with
            `config.losses.same_image_positives` (retrieval fine-tuning) captions of the same
            image are all positives.
  "lm"      the LLM loss on the soft visual prompt (§3.3): stage 2 (OPT LM loss / T5 prefix LM),
            captioning and VQA fine-tuning. With `config.losses.question_to_qformer` the question
            also enters the Q-Former (paper Fig. 7, VQA fine-tuning).
Each task's `loss(params, batch, rng) -> (scalar, metrics)` takes the merged parameter tree.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip2_jax import losses


def _qf(name: str, **kw):
    """A method for `model.apply` that calls `Q-Former.<name>`."""
    return lambda m, *a: getattr(m.qformer, name)(*a, **kw)


class Stage1:
    """Q-Former representation learning: ITC + ITM (hard negatives) + ITG."""

    def __init__(self, model, config):
        self.model = model
        lc = config.get("losses", {})
        self.itc_smoothing = float(lc.get("itc_label_smoothing", 0.1))
        self.itg_smoothing = float(lc.get("itg_label_smoothing", 0.1))
        self.same_image_positives = bool(lc.get("same_image_positives", False))
        self.weights = {k: float(lc.get(f"{k}_weight", 1.0)) for k in ("itc", "itm", "itg")}
        self.batch_keys = ("image", "image_id", "qformer_input_ids", "qformer_attention_mask",
                           "qformer_dec_input_ids")

    def loss(self, params, batch, rng):
        apply = self.model.apply
        v = {"params": params}
        r_drop, r_neg = jax.random.split(rng)
        drop = lambda i: {"dropout": jax.random.fold_in(r_drop, i)}  # noqa: E731
        ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
        image_ids = batch.get("image_id") if self.same_image_positives else None

        # Only ln_vision (the tower's last norm) is trainable, so autodiff stops there.
        image = apply(v, batch["image"], method="encode_image").astype(jnp.float32)
        query, cache = apply(v, image, method=_qf("query_features", deterministic=False, return_cache=True),
                             rngs=drop(0))
        text = apply(v, ids, mask, method=_qf("text_features", deterministic=False), rngs=drop(1))

        # ITC: image-text contrastive, max over queries (uni-modal masks)
        img_emb = apply(v, query, method=_qf("image_embeds"))
        txt_emb = apply(v, text, method=_qf("text_embeds"))
        temp = apply(v, method=_qf("temperature"))
        sim_i2t, sim_t2i = losses.itc_similarities(img_emb, txt_emb, temp)
        itc = losses.itc_loss(sim_i2t, sim_t2i, image_ids, self.itc_smoothing)

        # ITM: image-text matching on positives + hard negatives (bi-directional mask)
        neg_img, neg_txt = losses.sample_hard_negatives(r_neg, sim_i2t, sim_t2i, image_ids)
        img_idx, txt_idx, labels = losses.itm_pairs(neg_img, neg_txt)
        mm = apply(v, image[img_idx], ids[txt_idx], mask[txt_idx],
                   method=_qf("multimodal_features", deterministic=False), rngs=drop(2))
        itm = losses.itm_loss(apply(v, mm, method=_qf("itm_logits")), labels)

        # ITG: image-grounded text generation ([DEC] first, multimodal causal mask)
        dec_ids = batch["qformer_dec_input_ids"]
        lm_logits = apply(v, dec_ids, mask, cache, method=_qf("causal_lm", deterministic=False), rngs=drop(3))
        itg = losses.itg_loss(lm_logits, dec_ids, mask, self.itg_smoothing)

        w = self.weights
        total = w["itc"] * itc + w["itm"] * itm + w["itg"] * itg
        return total, {"itc_loss": itc, "itm_loss": itm, "itg_loss": itg, "temperature": temp}


class LanguageModeling:
    """Stage 2 and LLM fine-tuning: soft visual prompt -> frozen LLM -> LM loss."""

    def __init__(self, model, config):
        self.model = model
        lc = config.get("losses", {})
        self.question_to_qformer = bool(lc.get("question_to_qformer", False))
        self.label_smoothing = float(lc.get("lm_label_smoothing", 0.0))
        self.encoder_decoder = model.config.is_encoder_decoder
        keys = ["image", "llm_input_ids", "llm_attention_mask", "llm_labels"]
        if self.encoder_decoder:
            keys += ["llm_decoder_input_ids", "llm_decoder_attention_mask"]
        if self.question_to_qformer:
            keys += ["qformer_input_ids", "qformer_attention_mask"]
        self.batch_keys = tuple(keys)

    def soft_prompt(self, v, batch, rng):
        apply = self.model.apply
        image = apply(v, batch["image"], method="encode_image")
        if self.question_to_qformer:  # instruction-aware queries: [queries; question] bi-directional
            q = apply(v, image.astype(jnp.float32), batch["qformer_input_ids"], batch["qformer_attention_mask"],
                      method=_qf("multimodal_features", deterministic=False), rngs={"dropout": rng})
            query = q[:, :self.model.config.num_query_tokens]
        else:
            query = apply(v, image, False, method="query_output", rngs={"dropout": rng})
        return apply(v, query, method="project")

    def loss(self, params, batch, rng):
        v = {"params": params}
        r_q, r_lm = jax.random.split(rng)
        prompt = self.soft_prompt(v, batch, r_q)
        if self.encoder_decoder:
            logits = self.model.apply(v, prompt, batch["llm_input_ids"], batch["llm_attention_mask"],
                                      batch["llm_decoder_input_ids"], batch.get("llm_decoder_attention_mask"),
                                      False, method="lm_logits", rngs={"dropout": r_lm})
            loss, n = losses.seq2seq_loss(logits, batch["llm_labels"], label_smoothing=self.label_smoothing)
        else:
            logits = self.model.apply(v, prompt, batch["llm_input_ids"], batch["llm_attention_mask"],
                                      method="lm_logits", rngs={"dropout": r_lm})
            q = prompt.shape[1]
            labels = jnp.concatenate(  # no loss on the soft-prompt positions
                [jnp.full((prompt.shape[0], q), losses.IGNORE_INDEX, batch["llm_labels"].dtype), batch["llm_labels"]], 1)
            loss, n = losses.lm_loss(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {"lm_loss": loss, "lm_tokens": n.astype(jnp.float32)}


TASKS = {"stage1": Stage1, "lm": LanguageModeling}


def get(name: str, model, config):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](model, config)
