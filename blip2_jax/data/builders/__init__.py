"""TFDS builders (array_record) for the corpora BLIP-2 trains and is evaluated on.

Name (as in `config.input.dataset`, optionally "name/config") -> builder:
  synthetic_shapes     offline shape scenes; configs default, tiny, large (synthetic_shapes.py)
  coco_karpathy        COCO captions, Karpathy split       (captions.py)
  flickr30k_karpathy   Flickr30k, Karpathy split           (captions.py)
  nocaps               NoCaps validation                   (captions.py)
  vg_regions           Visual Genome region captions       (captions.py)
  vqav2                VQAv2 with all 10 answers           (vqa.py)
  okvqa                OK-VQA                              (vqa.py)
  gqa_balanced         GQA balanced                        (vqa.py)
  image_text_pairs     web image-text pairs (CC3M/CC12M/SBU/LAION style)  (web.py; with Apache
                       Beam: web_beam.py, not registered, the same dataset)
  capfilt_pairs        CapFilt's output: kept captions and their scores   (capfilt.py; written by
                       `python -m blip2_jax.capfilt`)
Each real-corpus builder documents the files it expects under `manual_dir`
(its MANUAL_DOWNLOAD_INSTRUCTIONS). Importing this package registers them with TFDS, so
`tfds.data_source(name, data_dir=...)` finds them too.
"""
from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from blip2_jax.data.builders.base import prepare
from blip2_jax.data.builders.capfilt import CapfiltPairs
from blip2_jax.data.builders.captions import CocoKarpathy, Flickr30kKarpathy, NoCaps, VgRegions
from blip2_jax.data.builders.vqa import GqaBalanced, OkVqa, Vqav2
from blip2_jax.data.builders.web import ImageTextPairs
from blip2_jax.data.builders.synthetic_shapes import SyntheticShapes

BUILDERS = {cls.name: cls for cls in (
    SyntheticShapes, CocoKarpathy, Flickr30kKarpathy, NoCaps, VgRegions, Vqav2, OkVqa,
    GqaBalanced, ImageTextPairs, CapfiltPairs)}


def builder_class(name: str):
    """The builder class and config name (or None) of "name[/config]"."""
    base, _, config = name.partition("/")
    if base not in BUILDERS:
        raise ValueError(f"unknown dataset {base!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[base], (config or None)


def get_builder(name: str, data_dir: str | Path | None = None) -> tfds.core.DatasetBuilder:
    """An array_record builder for "name[/config]" (not prepared by this call)."""
    cls, config = builder_class(name)
    kwargs = {"config": config} if config else {}
    return cls(data_dir=None if data_dir is None else str(data_dir),
               file_format="array_record", **kwargs)


def prepare_dataset(name: str, data_dir: str | Path | None = None,
                    manual_dir: str | Path | None = None) -> tfds.core.DatasetBuilder:
    """Builds "name[/config]" under `data_dir` if it is not there yet; returns the builder."""
    cls, config = builder_class(name)
    kwargs = {"config": config} if config else {}
    return prepare(cls, data_dir, manual_dir, **kwargs)


__all__ = ["BUILDERS", "builder_class", "get_builder", "prepare_dataset"]
