"""Image captioning (paper §4.2): one beam-searched caption per image, COCO caption metrics."""
from __future__ import annotations

from typing import Iterator

from blip2_jax.evaluators import metrics
from blip2_jax.evaluators.base import Evaluator, gather_objects, valid_rows


class CaptionEvaluator(Evaluator):
    """Image captioning: one beam-searched caption per image, COCO caption metrics."""

    def evaluate(self, predictor) -> Iterator[tuple[str, float]]:
        c = self.config
        records = []
        for batch in self.batches():
            prompts = [c.prompt] * len(batch["mask"])
            captions = predictor.generate(batch["image"], prompts, max_prompt_len=c.max_prompt_len,
                                          **dict(c.generation))
            for i in valid_rows(batch):
                records.append((int(batch["image_id"][i]), captions[i].strip(),
                                list(batch["texts"][i] or [])))
        records = gather_objects(records)
        preds = {k: cap for k, cap, _ in records}
        refs = {k: r for k, _, r in records}
        self.write("predictions", [{"image_id": k, "caption": v} for k, v in preds.items()])
        if not preds or not all(refs.values()):
            yield from self.finish({}, len(preds))
            return
        yield from self.finish(metrics.caption_scores(preds, refs, spice=c.get("spice")),
                               len(preds))


