"""Image-text retrieval (paper §4.4): ITC similarity for every pair, the top k re-ranked by
ITM + ITC, Recall@1/5/10 both ways (plus the ITC-only recalls as "itc_*")."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from blip2_jax.data import text as text_lib
from blip2_jax.evaluators import metrics
from blip2_jax.evaluators.base import Evaluator, gather_objects, gather_rows, host_map

TOP_WRITTEN = 10  # ranked candidates written per retrieval query


class RetrievalEvaluator(Evaluator):
    """Image-text retrieval: ITC for all pairs, the top k re-ranked with ITM + ITC."""

    def evaluate(self, predictor) -> Iterator[tuple[str, float]]:
        from blip2_jax.serving import itc_similarity
        c = self.config
        vit, feats, masks, image_ids, texts = [], [], [], [], []
        for batch in self.batches():
            f = predictor.image_features(batch["image"])
            vit.append(np.asarray(f["image_embeds"]))
            feats.append(np.asarray(f["image_feats"]))
            masks.append(np.asarray(batch["mask"]))
            image_ids.extend(int(i) for i in np.asarray(batch["image_id"]))
            texts.extend(list(t or []) for t in batch["texts"])
        keep = gather_rows(np.concatenate(masks))
        vit = gather_rows(np.concatenate(vit))[keep]
        feats = gather_rows(np.concatenate(feats))[keep]
        image_ids = [i for i, k in zip(gather_objects(image_ids), keep) if k]
        per_image = [t for t, k in zip(gather_objects(texts), keep) if k]

        captions, txt2img, img2txt = [], [], []
        for i, caps in enumerate(per_image):
            img2txt.append(list(range(len(captions), len(captions) + len(caps))))
            captions.extend(text_lib.normalize_caption(t, c.max_words) for t in caps)
            txt2img.extend([i] * len(caps))
        if not captions:
            raise ValueError(f"{self.name}: no captions to retrieve")
        ids, mask = predictor.qformer_tokens(captions, c.max_text_len)
        text_feats = host_map(lambda idx: predictor.text_features(ids[idx], mask[idx]),
                              len(captions), c.text_batch_size, self._desc("texts"))
        sim_i2t = itc_similarity(feats, text_feats)

        bank = bool(c.image_bank_on_device) and hasattr(predictor, "set_image_bank")
        if bank:
            predictor.set_image_bank(vit)

        def itm(images, texts):  # (image, text) pairs given by index -> ITM match logits
            if bank:
                return predictor.itm_scores_bank(images, ids[texts], mask[texts])
            return predictor.itm_scores(vit[images], ids[texts], mask[texts])

        def itm_i2t(rows, cand):  # image rows x their candidate texts
            return itm(np.repeat(rows, cand.shape[1]), cand.reshape(-1)).reshape(cand.shape)

        def itm_t2i(rows, cand):  # text rows x their candidate images
            return itm(cand.reshape(-1), np.repeat(rows, cand.shape[1])).reshape(cand.shape)

        score_i2t = self._rerank(sim_i2t, itm_i2t, "ITM image->text")
        score_t2i = self._rerank(sim_i2t.T, itm_t2i, "ITM text->image")
        if bank:
            predictor.set_image_bank(None)
        scores = metrics.retrieval_recall(score_i2t, txt2img, img2txt, sim_t2i=score_t2i)
        itc = metrics.retrieval_recall(sim_i2t, txt2img, img2txt)
        scores.update({f"itc_{k}": v for k, v in itc.items() if k != "agg_metrics"})
        top = min(TOP_WRITTEN, len(captions))
        self.write("predictions", {
            "image_ids": image_ids, "texts": captions, "txt2img": txt2img,
            "i2t_top": np.argsort(-score_i2t, axis=1, kind="stable")[:, :top].tolist(),
            "t2i_top": np.argsort(-score_t2i, axis=1, kind="stable")[:, :min(
                TOP_WRITTEN, len(image_ids))].tolist()})
        yield from self.finish(scores, len(image_ids))

    def _desc(self, what: str) -> str | None:
        return f"{self.name} {what}" if self.config.progress else None

    def _rerank(self, sim: np.ndarray, itm_fn, what: str) -> np.ndarray:
        """metrics.rerank_topk with the rows split over the processes."""
        c = self.config
        rows_per_call = int(c.itm_rows_per_call)

        def block(rows):  # rows [rows_per_call] of `sim` -> their re-ranked score rows
            return metrics.rerank_topk(sim[rows], lambda r, cand: itm_fn(rows[r], cand), int(c.k),
                                       fill_value=float(c.fill_value),
                                       rows_per_call=rows_per_call)

        return host_map(block, sim.shape[0], rows_per_call, self._desc(what))
