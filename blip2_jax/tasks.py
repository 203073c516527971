"""Training objectives: which model passes run and which losses combine, per task.

A task is chosen by name (`config.task`):
  "stage1"  ITC + ITM + ITG against the frozen image encoder (paper §3.2); with
            `config.losses.same_image_positives` (retrieval fine-tuning) captions of the same
            image are all positives.
  "lm"      the LLM loss on the soft visual prompt (§3.3): stage 2 (OPT LM loss / T5 prefix LM),
            captioning and VQA fine-tuning. With `config.losses.question_to_qformer` the question
            also enters the Q-Former (paper Fig. 7, VQA fine-tuning). The LLM's vocabulary-wide
            head runs only where labels can be (the text, not the soft prompt; with
            `config.losses.lm_loss_tokens = K`, each row's first K labelled positions).
Each task's `loss(params, batch, rng) -> (scalar, metrics)` takes the merged parameter tree.
Batches of `input.image_dtype="uint8"` carry raw 0-255 pixels (4x less to send to the devices);
the task normalises them on the device (`ImageInput`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip2_jax import losses


class ImageInput:
    """`batch["image"]` as the towers take it: CLIP-normalised float pixels."""

    def __init__(self, input_config):
        self.raw = input_config.image_dtype == "uint8"
        self.mean, self.std = tuple(input_config.mean), tuple(input_config.std)

    def __call__(self, batch):
        if not self.raw:
            return batch["image"]
        from blip2_jax.data.pipeline import normalize_on_device
        return normalize_on_device(batch["image"], self.mean, self.std)


def _qf(name: str, **kw):
    """A method for `model.apply` that calls `Q-Former.<name>`."""
    return lambda m, *a: getattr(m.qformer, name)(*a, **kw)


class Stage1:
    """Q-Former representation learning: ITC + ITM (hard negatives) + ITG."""

    def __init__(self, model, config):
        self.model = model
        lc = config.losses
        self.image = ImageInput(config.input)
        self.itc_smoothing = float(lc.itc_label_smoothing)
        self.itg_smoothing = float(lc.itg_label_smoothing)
        self.same_image_positives = bool(lc.same_image_positives)
        self.weights = {k: float(lc[f"{k}_weight"]) for k in ("itc", "itm", "itg")}
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
        image = apply(v, self.image(batch), method="encode_image").astype(jnp.float32)
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
        lc = config.losses
        self.image = ImageInput(config.input)
        self.question_to_qformer = bool(lc.question_to_qformer)
        self.label_smoothing = float(lc.lm_label_smoothing)
        # 0: the LM head runs at every text position; K > 0: at the first K labelled positions
        # of each row only (K must cover the longest target, see `losses.labelled_positions`)
        self.loss_tokens = int(lc.lm_loss_tokens)
        self.encoder_decoder = model.config.is_encoder_decoder
        keys = ["image", "llm_input_ids", "llm_attention_mask", "llm_labels"]
        if self.encoder_decoder:
            keys += ["llm_decoder_input_ids", "llm_decoder_attention_mask"]
        if self.question_to_qformer:
            keys += ["qformer_input_ids", "qformer_attention_mask"]
        self.batch_keys = tuple(keys)

    def soft_prompt(self, v, batch, rng):
        apply = self.model.apply
        image = apply(v, self.image(batch), method="encode_image")
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
        apply = lambda *a, **k: self.model.apply(v, *a, rngs={"dropout": r_lm}, **k)  # noqa: E731
        if self.encoder_decoder:  # decoder outputs are already aligned with the labels
            hidden = apply(prompt, batch["llm_input_ids"], batch["llm_attention_mask"],
                           batch["llm_decoder_input_ids"], batch.get("llm_decoder_attention_mask"), False,
                           method="lm_hidden")
            targets = batch["llm_labels"]
        else:  # the soft prompt is never labelled: only the text's predictors are kept
            hidden = apply(prompt, batch["llm_input_ids"], batch["llm_attention_mask"], method="lm_hidden")
            hidden, targets = losses.next_token_alignment(hidden, batch["llm_labels"])
        metrics = {}
        if self.loss_tokens:
            all_targets = targets
            if self.loss_tokens < targets.shape[1]:
                positions, targets = losses.labelled_positions(all_targets, self.loss_tokens)
                hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
            left_out = jnp.sum(all_targets != losses.IGNORE_INDEX) - jnp.sum(targets != losses.IGNORE_INDEX)
            metrics["lm_tokens_left_out"] = left_out.astype(jnp.float32)
        # the vocabulary-wide LM head only where a label is (or may be)
        logits = self.model.apply(v, hidden, method="lm_head")
        loss, n = losses.token_loss(logits, targets, label_smoothing=self.label_smoothing)
        return loss, dict(metrics, lm_loss=loss, lm_tokens=n.astype(jnp.float32))


TASKS = {"stage1": Stage1, "lm": LanguageModeling}


def get(name: str, model, config):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](model, config)
