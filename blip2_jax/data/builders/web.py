"""Web image-text pairs (CC3M, CC12M, SBU, LAION style) from local files.

Three layouts are recognised in `manual_dir`, tried in this order:
  *.tar        webdataset shards: members `<key>.<jpg|jpeg|png|webp>` with `<key>.txt` (the
               caption) and optionally `<key>.json` (its "caption" is used when no .txt).
  pairs.jsonl  one object per line: "image" (path relative to manual_dir) and "caption" (str)
               or "captions" (list of str).
  pairs.tsv    tab-separated with a header row naming the columns "image" and "caption".
Web crawls have holes: pairs whose image file is missing or empty, or whose caption is empty,
are skipped and counted (logged), never fatal. One split, "train"; image_id is the running
index of the pair.
"""
from __future__ import annotations

import collections
import csv
import json
import logging
import tarfile
from pathlib import Path

from blip2_jax.data.builders.base import ManualBuilder, caption_features, log_skipped

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ImageTextPairs(ManualBuilder):
    """A folder of images with captions (JSONL/TSV), or webdataset tar shards."""

    name = "image_text_pairs"
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _features(self):
        return caption_features(encoding="jpeg")

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        shards = sorted(root.glob("*.tar"))
        if shards:
            pairs = self._from_tars(shards)
        elif (root / "pairs.jsonl").exists():
            pairs = self._from_files(root, self._read_jsonl(root / "pairs.jsonl"))
        else:
            path = self.manual_file(dl_manager, "pairs.tsv", "pairs.jsonl")
            pairs = self._from_files(root, self._read_tsv(path))
        return {"train": self._generate_examples(pairs)}

    @staticmethod
    def _read_jsonl(path: Path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    caps = row.get("captions", row.get("caption", row.get("text", "")))
                    yield row["image"], [caps] if isinstance(caps, str) else list(caps)

    @staticmethod
    def _read_tsv(path: Path):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: the header must name 'image' and 'caption' columns, "
                                 f"got {reader.fieldnames}")
            for row in reader:
                yield row["image"], [row["caption"] or ""]

    def _from_files(self, root: Path, rows):
        for rel, caps in rows:
            path = root / rel
            data = path.read_bytes() if path.is_file() else b""
            yield rel, data, caps

    def _from_tars(self, shards):
        """Streams each shard; a sample's members are consecutive (webdataset convention)."""
        for shard in shards:
            with tarfile.open(shard) as tar:
                key, group = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    name = f"{folder}/{stem}" if folder else stem
                    if name != key and key is not None:
                        yield self._sample(shard, key, group)
                        group = {}
                    key = name
                    group["." + ext.lower()] = tar.extractfile(member).read()
                if key is not None:
                    yield self._sample(shard, key, group)

    @staticmethod
    def _sample(shard: Path, key: str, group: dict[str, bytes]):
        image = next((group[e] for e in IMAGE_EXTS if e in group), b"")
        caption = group[".txt"].decode("utf-8") if ".txt" in group else ""
        if not caption and ".json" in group:
            caption = json.loads(group[".json"]).get("caption") or ""
        return f"{shard.name}/{key}", image, [caption]

    def _generate_examples(self, pairs):
        skipped = collections.Counter()
        index = 0
        for name, image, caps in pairs:
            caps = [c.strip() for c in caps if c and c.strip()]
            if not image:
                skipped["missing_image"] += 1
                continue
            if not caps:
                skipped["empty_caption"] += 1
                continue
            yield index, {"image": image, "image_id": index, "file_name": name,
                          "captions": caps}
            index += 1
        log_skipped(self.name, dict(skipped))
        if skipped:
            logging.info("%s: kept %d pairs", self.name, index)
