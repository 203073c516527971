"""Zero-shot / fine-tuned VQA (paper §4.1): one generated answer per question, scored with the
official VQAv2 accuracy, OK-VQA's lemmatised accuracy, GQA exact match or normalised exact match."""
from __future__ import annotations

from typing import Iterator

import logging

import numpy as np

from blip2_jax.data import text as text_lib
from blip2_jax.evaluators import metrics
from blip2_jax.evaluators.base import Evaluator, gather_objects, valid_rows

VQA_METRICS = ("vqav2", "okvqa", "gqa", "exact")


class VqaEvaluator(Evaluator):
    """Zero-shot / fine-tuned VQA: one generated answer per question."""

    def evaluate(self, predictor) -> Iterator[tuple[str, float]]:
        c = self.config
        if c.metric not in VQA_METRICS:
            raise ValueError(f"unknown VQA metric {c.metric!r}; known: {', '.join(VQA_METRICS)}")
        template = self.llm_option(c.prompt, "prompt", "prompt_by_llm", predictor)
        options = dict(c.generation)
        options["length_penalty"] = self.llm_option(
            c.generation.length_penalty, "generation.length_penalty", "length_penalty_by_llm",
            predictor)
        records = []
        for batch in self.batches():
            rows = valid_rows(batch)
            prompts = [template.format(text_lib.normalize_question(q or "", c.max_words))
                       for q in batch["question"]]
            answers = predictor.generate(batch["image"], prompts, max_prompt_len=c.max_prompt_len,
                                         **options)
            written = batch.get("question_key") or [None] * len(batch["question_id"])
            for i in rows:
                qid, as_written = batch["question_id"][i], written[i]
                # synthetic_shapes has one question per image and no question ids; GQA's ids are
                # strings with leading zeros
                key = (as_written if c.metric == "gqa" and as_written else
                       int(qid) if qid is not None and qid >= 0 else int(batch["image_id"][i]))
                records.append((key, answers[i].strip(), list(batch["answers"][i] or [])))
        records = gather_objects(records)
        preds = {k: a for k, a, _ in records}
        truth = {k: g for k, _, g in records}
        if c.metric == "gqa":
            self.write("predictions", [{"questionId": str(k), "prediction": a}
                                       for k, a in preds.items()])
        else:
            self.write("predictions", [{"question_id": k, "answer": a} for k, a in preds.items()])
        if not preds or not all(truth.values()):  # e.g. VQAv2 test-dev: no answers to score
            logging.info("%s: %d questions without answers: predictions only", self.name,
                         sum(not g for g in truth.values()))
            yield from self.finish({}, len(preds))
            return
        if c.metric == "vqav2":
            score = metrics.vqa_score(preds, truth, protocol=c.vqa_protocol)
        elif c.metric == "okvqa":
            score = metrics.okvqa_score(preds, truth, protocol=c.vqa_protocol)
        elif c.metric == "gqa":
            score = metrics.gqa_score(preds, {k: g[0] for k, g in truth.items()})
        else:
            score = 100.0 * np.mean([metrics.normalize_answer(preds[k])
                                     == metrics.normalize_answer(truth[k][0]) for k in preds])
        yield from self.finish({"accuracy": score}, len(preds))


