"""`capfilt_pairs`: image-text pairs whose captions CapFilt chose (paper §3.4, `data/capfilt.py`).

Written by `python -m blip2_jax.capfilt` (never built from raw files): for each image of an input
dataset, the `keep` captions with the highest ITC similarity among its web captions and the
captioner's sampled ones.

  image, image_id, file_name   as in the input dataset (the image bytes untouched)
  captions                     the kept captions, best first (what training samples from)
  caption_scores               their ITC similarity (max over queries of the cosine)   float32
  caption_sources              "web" or "synthetic", one per kept caption
  web_captions                 the input's captions, unchanged
  web_caption_scores           their ITC similarity                                      float32
metadata.json: the run's settings (input dataset, models, K, N, top-p, seed), images kept and
skipped by reason, and how many kept captions are web / synthetic.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from blip2_jax.data.builders.base import Builder, DatasetError, caption_features

NAME = "capfilt_pairs"


def capfilt_features() -> tfds.features.FeaturesDict:
    text_list = tfds.features.Sequence(tfds.features.Text())
    scores = tfds.features.Sequence(tfds.features.Scalar(np.float32))
    return caption_features(encoding="jpeg", caption_scores=scores, caption_sources=text_list,
                            web_captions=text_list, web_caption_scores=scores)


class CapfiltPairs(Builder):
    """Reads the dataset `python -m blip2_jax.capfilt` wrote into data_dir/capfilt_pairs/1.0.0."""

    name = NAME
    DESCRIPTION = __doc__

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=capfilt_features(), metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        raise DatasetError(f"{NAME} is written by `python -m blip2_jax.capfilt --output_dir DATA_DIR` "
                           f"(it is not built from files); no finished CapFilt output in {self.data_dir}")

    def _generate_examples(self, **kwargs):
        raise NotImplementedError
