"""What every corpus builder shares: feature specs, manual-file checks, image ids, preparing.

Builders are TFDS `GeneratorBasedBuilder`s (curated corpora) or `ShardBasedBuilder`s (web-scale
pairs) that write array_record files. Images are handed to TFDS as the encoded bytes found on
disk (JPEG/PNG/...), so building needs neither TensorFlow nor an image decoder; decoding (and
counting bad images) happens in the input pipeline. The files are read back with
`tfds.data_source` (random access) and fed to grain. Files named by untrusted manifests are
read through `resolve_inside` and `read_regular_file` (inside manual_dir, regular, size-capped).
"""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from blip2_jax import files

VERSION = tfds.core.Version("1.0.0")
_GQA_LETTER_OFFSET = 10**9  # "n161313" -> 1_000_161_313, apart from the numeric ids


def image_feature(encoding: str = "jpeg") -> tfds.features.Image:
    """Any-size RGB image; bytes given to it are stored untouched (no re-encoding)."""
    return tfds.features.Image(shape=(None, None, 3), encoding_format=encoding)


def caption_features(encoding: str = "jpeg", **extra) -> tfds.features.FeaturesDict:
    """image, image_id, file_name, captions (list of str) + `extra` features."""
    return tfds.features.FeaturesDict({
        "image": image_feature(encoding),
        "image_id": np.int64,
        "file_name": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        **extra,
    })


def vqa_features(**extra) -> tfds.features.FeaturesDict:
    """image, image_id, file_name, question_id, question, answers (list of str) + `extra`."""
    return tfds.features.FeaturesDict({
        "image": image_feature("jpeg"),
        "image_id": np.int64,
        "file_name": tfds.features.Text(),
        "question_id": np.int64,
        "question": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        **extra,
    })


def image_id_from_name(name: str) -> int:
    """The integer id in a file name or id string: COCO_val2014_000000391895.jpg -> 391895,
    '1000092795.jpg' -> 1000092795, GQA's 'n161313' -> 1_000_161_313."""
    stem = Path(str(name)).stem
    m = re.search(r"(\d+)$", stem)
    if m is None:
        raise ValueError(f"no numeric id in image name {name!r}")
    number = int(m.group(1))
    return number + _GQA_LETTER_OFFSET if stem[: m.start()] == "n" else number


class DatasetError(ValueError):
    """The manual files cannot give this dataset (missing, unusable): reported as one line."""


class ManualFileMissing(DatasetError, FileNotFoundError):
    """An expected file under `manual_dir` is not there (the message names it)."""


class _ClassFileCodePath:
    """`code_path` is the class's file.

    tfds 4.9's own `code_path` reaches for the `importlib_resources` backport, which it only
    declares as a dependency for Python < 3.9; this keeps building free of it.
    """

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


class Builder(_ClassFileCodePath, tfds.core.GeneratorBasedBuilder):
    """GeneratorBasedBuilder whose `code_path` is the class's file."""

    VERSION = VERSION


class _ManualFiles:
    """What the builders reading a corpus from local files under `manual_dir` share.

    Subclasses set MANUAL_DOWNLOAD_INSTRUCTIONS (the expected layout) and implement `_features`;
    `manual_file` gives an existing path or names the missing file.
    """

    HOMEPAGE = ""
    DESCRIPTION = ""

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _metadata(self) -> tfds.core.Metadata | None:
        """Extra metadata saved with the dataset (metadata.json), e.g. counts of skips."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files beside the class.
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=self._features(), homepage=self.HOMEPAGE,
                                     metadata=self._metadata())

    def manual_root(self, dl_manager) -> Path:
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError:  # tfds: the folder is missing or empty
            return Path(getattr(dl_manager, "_manual_dir", None) or "<manual_dir>")

    def manual_file(self, dl_manager, *candidates: str) -> Path:
        """The first existing `manual_dir/candidate`; else ManualFileMissing naming it."""
        root = self.manual_root(dl_manager)
        for rel in candidates:
            if (root / rel).exists():
                return root / rel
        raise ManualFileMissing(
            f"{self.name}: expected file {root / candidates[0]} is missing. "
            f"Expected layout of manual_dir:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")


class ManualBuilder(_ManualFiles, Builder):
    """Base of the curated-corpus builders (a GeneratorBasedBuilder over `manual_dir`)."""


class ShardedManualBuilder(_ManualFiles, _ClassFileCodePath, tfds.core.ShardBasedBuilder):
    """Base of the builders over large local corpora: a `ShardBasedBuilder` writes each output
    shard from its own generator, so nothing passes through TFDS's shuffler (which holds a
    split in memory and spills it through TensorFlow past 1 GB). TFDS keeps one shard's
    examples in memory while writing it: subclasses plan shards small enough for that. The
    input pipeline shuffles at read time."""

    VERSION = VERSION


class Skip(Exception):
    """An input record that cannot be used: `reason` (stats.BUILD_SKIP_REASONS) and detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def resolve_inside(root: Path, rel: str) -> str:
    """`root/rel` for a path a manifest names; Skip("outside_root") when it is absolute, has a
    ".." or resolves (symlinks followed) outside `root`. Nothing is opened."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise Skip("malformed_line", f"bad path {rel!r}")
    return files.inside(str(root), rel, lambda _: Skip("outside_root", f"{rel!r} leads outside manual_dir"))


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (FIFOs cannot block the open); else
    Skip with the reason: missing_image, not_a_file, too_large, empty_image, unreadable."""
    name = os.path.basename(path)
    if not os.path.lexists(path):
        raise Skip("missing_image", f"{name} does not exist")
    try:
        with files.open_regular(path, lambda msg: Skip("not_a_file", msg), "file") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise Skip("too_large", f"{name}: {size} bytes > {max_bytes}")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise Skip("unreadable", f"{name}: {e.strerror}") from None
    if len(data) > max_bytes:  # it grew after fstat
        raise Skip("too_large", f"{name}: over {max_bytes} bytes")
    if not data:
        raise Skip("empty_image", f"{name} is empty")
    return data


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def read_image(path: Path, *, builder: str) -> bytes:
    """The file's encoded bytes; a missing image of a curated corpus names the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManualFileMissing(f"{builder}: expected image file {path} is missing") from None


def prepare(builder_cls, data_dir: str | Path | None, manual_dir: str | Path | None = None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Builds (once) the array_record files of `builder_cls` under `data_dir` (None: TFDS's
    default folder); returns the builder."""
    builder = builder_cls(data_dir=None if data_dir is None else str(data_dir),
                          file_format="array_record", **builder_kwargs)
    if not builder.is_prepared():
        config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else str(manual_dir))
        builder.download_and_prepare(download_config=config)
    return builder
