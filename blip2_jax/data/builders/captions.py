"""Caption corpora from local files: COCO and Flickr30k (Karpathy splits), NoCaps val,
Visual Genome region captions. One example per image with all its captions."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from blip2_jax.data.builders.base import (ManualBuilder, caption_features, image_id_from_name,
                                          read_image, read_json)

# Karpathy's "split" field -> our split; "restval" joins train (as in LAVIS and BLIP)
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


class _Karpathy(ManualBuilder):
    """Reads a Karpathy `dataset_*.json` ({"images": [{"filename", "split", "sentences":
    [{"raw"}], ...}]})."""

    ANNOTATIONS = ""

    def _features(self):
        return caption_features()

    def _image_path(self, root: Path, entry: dict) -> Path:
        raise NotImplementedError

    def _image_id(self, entry: dict) -> int:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        ann = read_json(self.manual_file(dl_manager, self.ANNOTATIONS))
        root = self.manual_root(dl_manager)
        by_split = collections.defaultdict(list)
        for entry in ann["images"]:
            by_split[_KARPATHY_SPLITS[entry["split"]]].append(entry)
        return {s: self._generate_examples(root, by_split[s])
                for s in ("train", "validation", "test")}

    def _generate_examples(self, root, entries):
        for entry in entries:
            path = self._image_path(root, entry)
            image_id = self._image_id(entry)
            yield image_id, {
                "image": read_image(path, builder=self.name),
                "image_id": image_id,
                "file_name": str(path.relative_to(root)),
                "captions": [s["raw"].strip() for s in entry["sentences"]],
            }


class CocoKarpathy(_Karpathy):
    """COCO captions with Karpathy's train (+restval) / val / test split (113287/5000/5000)."""

    name = "coco_karpathy"
    HOMEPAGE = "https://cs.stanford.edu/people/karpathy/deepimagesent/"
    ANNOTATIONS = "dataset_coco.json"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  dataset_coco.json            Karpathy's split file (from caption_datasets.zip)
  train2014/COCO_train2014_000000XXXXXX.jpg   COCO 2014 train images
  val2014/COCO_val2014_000000XXXXXX.jpg       COCO 2014 val images
Each entry's "filepath" (train2014/val2014) + "filename" names its image."""

    def _image_path(self, root, entry):
        return root / entry["filepath"] / entry["filename"]

    def _image_id(self, entry):
        return int(entry["cocoid"])


class Flickr30kKarpathy(_Karpathy):
    """Flickr30k with Karpathy's split (29000/1014/1000)."""

    name = "flickr30k_karpathy"
    HOMEPAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"
    ANNOTATIONS = "dataset_flickr30k.json"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  dataset_flickr30k.json       Karpathy's split file (from caption_datasets.zip)
  flickr30k-images/NNNNNNNNNN.jpg             the Flickr30k images"""

    def _image_path(self, root, entry):
        return root / "flickr30k-images" / entry["filename"]

    def _image_id(self, entry):
        return image_id_from_name(entry["filename"])


class NoCaps(ManualBuilder):
    """NoCaps validation (4500 Open Images with 10 captions each, and their domain)."""

    name = "nocaps"
    HOMEPAGE = "https://nocaps.org"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  nocaps_val_4500_captions.json   COCO-format: "images" [{"id", "file_name", "domain"}],
                                  "annotations" [{"image_id", "caption"}]
  validation/<file_name>          the Open Images validation images named as in "file_name\""""

    def _features(self):
        return caption_features(domain=tfds.features.Text())

    def _split_generators(self, dl_manager):
        ann = read_json(self.manual_file(dl_manager, "nocaps_val_4500_captions.json"))
        return {"validation": self._generate_examples(self.manual_root(dl_manager), ann)}

    def _generate_examples(self, root, ann):
        caps = collections.defaultdict(list)
        for a in ann.get("annotations", []):
            caps[a["image_id"]].append(a["caption"].strip())
        for img in ann["images"]:
            path = root / "validation" / img["file_name"]
            yield img["id"], {
                "image": read_image(path, builder=self.name),
                "image_id": img["id"],
                "file_name": img["file_name"],
                "captions": caps[img["id"]],
                "domain": img.get("domain", ""),
            }


class VgRegions(ManualBuilder):
    """Visual Genome: each image with its region descriptions as captions (+ region boxes)."""

    name = "vg_regions"
    HOMEPAGE = "https://homes.cs.washington.edu/~ranjay/visualgenome/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  region_descriptions.json     [{"id": image_id, "regions": [{"phrase", "x", "y", "width",
                               "height", ...}]}]
  image_data.json              [{"image_id", "url", ...}]; the url's last two parts name the
                               file, e.g. VG_100K_2/1.jpg
  VG_100K/*.jpg, VG_100K_2/*.jpg   the images (both parts of the download)"""

    def _features(self):
        return caption_features(
            boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32))  # x, y, w, h (px)

    def _split_generators(self, dl_manager):
        regions = read_json(self.manual_file(dl_manager, "region_descriptions.json"))
        meta = read_json(self.manual_file(dl_manager, "image_data.json"))
        return {"train": self._generate_examples(self.manual_root(dl_manager), regions, meta)}

    def _generate_examples(self, root, regions, meta):
        urls = {m["image_id"]: m["url"] for m in meta}
        for entry in regions:
            image_id = entry["id"]
            rel = "/".join(urls[image_id].split("/")[-2:])
            phrases, boxes = [], []
            for r in entry["regions"]:
                phrase = r["phrase"].strip()
                if phrase and phrase not in phrases:
                    phrases.append(phrase)
                    boxes.append([r["x"], r["y"], r["width"], r["height"]])
            if not phrases:
                continue
            yield image_id, {
                "image": read_image(root / rel, builder=self.name),
                "image_id": image_id,
                "file_name": rel,
                "captions": phrases,
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            }
