"""VQA corpora from local files: VQAv2 (all 10 answers), OK-VQA, GQA balanced.

One example per question, carrying its image's bytes. A split is built when its question file
is present (so zero-shot evaluation needs only the validation files); a present split whose
annotation or image files are missing fails naming the missing file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import tensorflow_datasets as tfds

from blip2_jax.data.builders.base import (ManualBuilder, image_id_from_name, read_image,
                                          read_json, vqa_features)


class _VqaFormat(ManualBuilder):
    """The official VQA json format: a questions file {"questions": [{"image_id", "question",
    "question_id"}]} and an annotations file {"annotations": [{"question_id", "answers":
    [{"answer"}], "answer_type", "question_type"}]}; COCO images."""

    # split -> (questions file, annotations file or None, COCO image folder)
    SPLITS: dict[str, tuple[str, str | None, str]] = {}

    def _features(self):
        return vqa_features(answer_type=tfds.features.Text(),
                            question_type=tfds.features.Text())

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        present = {s: v for s, v in self.SPLITS.items() if (root / v[0]).exists()}
        if not present:
            first = next(iter(self.SPLITS.values()))[0]
            self.manual_file(dl_manager, first)  # raises, naming the file
        missing = sorted(set(self.SPLITS) - set(present))
        if missing:
            logging.warning("%s: no question file for splits %s; building %s", self.name,
                            missing, sorted(present))
        out = {}
        for split, (qfile, afile, folder) in present.items():
            questions = read_json(root / qfile)["questions"]
            answers = {}
            if afile is not None:
                ann = read_json(self.manual_file(dl_manager, afile))["annotations"]
                answers = {a["question_id"]: a for a in ann}
            out[split] = self._generate_examples(root, folder, questions, answers)
        return out

    def _extra(self, ann: dict) -> dict:
        return {"answer_type": ann.get("answer_type", ""),
                "question_type": ann.get("question_type", "")}

    def _generate_examples(self, root: Path, folder: str, questions, answers):
        for q in questions:
            ann = answers.get(q["question_id"], {})
            rel = f"{folder}/COCO_{folder}_{q['image_id']:012d}.jpg"
            yield q["question_id"], {
                "image": read_image(root / rel, builder=self.name),
                "image_id": q["image_id"],
                "file_name": rel,
                "question_id": q["question_id"],
                "question": q["question"],
                "answers": [a["answer"] for a in ann.get("answers", [])],
                **self._extra(ann),
            }


class Vqav2(_VqaFormat):
    """VQAv2: train / validation with the 10 human answers; test_dev questions (no answers)."""

    name = "vqav2"
    HOMEPAGE = "https://visualqa.org"
    SPLITS = {
        "train": ("v2_OpenEnded_mscoco_train2014_questions.json",
                  "v2_mscoco_train2014_annotations.json", "train2014"),
        "validation": ("v2_OpenEnded_mscoco_val2014_questions.json",
                       "v2_mscoco_val2014_annotations.json", "val2014"),
        "test_dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015}_questions.json
  v2_mscoco_{train2014,val2014}_annotations.json
  train2014/COCO_train2014_000000XXXXXX.jpg, val2014/..., test2015/...   COCO images
A split is built when its questions file is present."""


class OkVqa(_VqaFormat):
    """OK-VQA: train / validation (the COCO val2014 questions, the usual test set)."""

    name = "okvqa"
    HOMEPAGE = "https://okvqa.allenai.org"
    SPLITS = {
        "train": ("OpenEnded_mscoco_train2014_questions.json",
                  "mscoco_train2014_annotations.json", "train2014"),
        "validation": ("OpenEnded_mscoco_val2014_questions.json",
                       "mscoco_val2014_annotations.json", "val2014"),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  OpenEnded_mscoco_{train2014,val2014}_questions.json
  mscoco_{train2014,val2014}_annotations.json
  train2014/COCO_train2014_000000XXXXXX.jpg, val2014/...   COCO images
A split is built when its questions file is present."""

    def _features(self):
        return vqa_features(answer_type=tfds.features.Text(),
                            question_type=tfds.features.Text(),
                            raw_answers=tfds.features.Sequence(tfds.features.Text()))

    def _extra(self, ann):
        raw = [a.get("raw_answer", a["answer"]) for a in ann.get("answers", [])]
        return {**super()._extra(ann), "raw_answers": raw}


class GqaBalanced(ManualBuilder):
    """GQA balanced: train / validation / testdev, one answer (+ the full-sentence answer)."""

    name = "gqa_balanced"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "question_key: the question id string as GQA writes it (leading zeros)."}
    HOMEPAGE = "https://cs.stanford.edu/people/dorarad/gqa/"
    SPLITS = {"train": "train_balanced_questions.json",
              "validation": "val_balanced_questions.json",
              "testdev": "testdev_balanced_questions.json"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  {train,val,testdev}_balanced_questions.json   from questions1.2.zip: {question_id:
                                                {"imageId", "question", "answer", "fullAnswer"}}
  images/<imageId>.jpg                          the GQA images
A split is built when its questions file is present. Image ids: numeric names as is,
'n123' -> 1000000123. Question ids: `question_id` as an integer, `question_key` as written."""

    def _features(self):
        return vqa_features(full_answer=tfds.features.Text(), question_key=tfds.features.Text())

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        present = {s: f for s, f in self.SPLITS.items() if (root / f).exists()}
        if not present:
            self.manual_file(dl_manager, self.SPLITS["train"])  # raises, naming the file
        return {s: self._generate_examples(root, read_json(root / f))
                for s, f in present.items()}

    def _generate_examples(self, root, questions):
        for qid, q in questions.items():
            rel = f"images/{q['imageId']}.jpg"
            yield qid, {
                "image": read_image(root / rel, builder=self.name),
                "image_id": image_id_from_name(q["imageId"]),
                "file_name": rel,
                "question_id": int(qid),
                "question_key": qid,  # submissions use the string: int() drops leading zeros
                "question": q["question"],
                "answers": [q["answer"]] if "answer" in q else [],
                "full_answer": q.get("fullAnswer", ""),
            }
