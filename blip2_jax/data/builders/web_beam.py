"""The `image_text_pairs` dataset built with Apache Beam, for corpora one machine cannot hold.

Input in `manual_dir`, as img2dataset writes it (tried in this order):
  *.tar      webdataset shards: `<key>.jpg` (or png/webp/...) with `<key>.txt` (the caption) or
             `<key>.json` ("caption"); read exactly as the single-process builder reads them (web.py).
  *.parquet  img2dataset's Parquet: a "caption" column and the image either inline (a binary
             "jpg" / "png" / "webp" / "image" column: output_format="parquet") or by "key" in the
             image shard beside it (`<stem>/<key>.jpg`: output_format="files"). "url" and any
             other columns are ignored.
On top of the single-process builder it drops images whose shorter side is under
`min_image_size` ("too_small"), keeps one image of each exact duplicate (same SHA-256 of the
bytes; the lowest image_id stays, the others count as "duplicate") and checks that every image
decodes ("undecodable_image", "truncated_image", "too_large" over `max_image_pixels`).
Everything that cannot be used is skipped and counted by reason, never fatal: the reasons of
web.py plus "outside_root" for tar members named with an absolute path or "..",
"missing_columns" (a Parquet file without the columns above, once per file) and
"bad_parquet" (not Parquet, or unreadable from some point on). Counts are Beam counters
(namespace "image_text_pairs"), saved in metadata.json like the single-process builder's.

The dataset has the same name, version and features as the single-process builder (this class
is not registered: `tfds.data_source("image_text_pairs")` and the input pipeline read either).
image_id is the record's position in the input (samples across the sorted tars, rows across
the sorted Parquet files), so on clean input the records equal the single-process builder's.
TFDS's Beam writer writes the ArrayRecord shards (records ordered by a hash of image_id).

    builder = ImageTextPairsBeam(data_dir=..., min_image_size=64)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=..., beam_options=PipelineOptions(["--runner=DirectRunner"])))
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

# Beam logs a notice about Google Cloud client libraries when imported; they are not used here.
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
import apache_beam as beam  # noqa: E402
import tensorflow_datasets as tfds
from apache_beam.metrics import Metrics
from etils import epath
from apache_beam.metrics.metric import MetricsFilter

from blip2_jax import files
from blip2_jax.data.builders import web
from blip2_jax.data.builders.base import (DatasetError, Skip, _ClassFileCodePath, _ManualFiles,
                                          caption_features, read_regular_file, resolve_inside, VERSION)
from blip2_jax.data.stats import SkipLog

NAMESPACE = "image_text_pairs"   # Beam counters: one per skip reason, and "kept"
MIN_IMAGE_SIZE = 64              # pixels on the shorter side
MAX_IMAGE_PIXELS = 64_000_000    # decoded size budget (decompression bombs)
IMAGE_COLUMNS = ("jpg", "png", "webp", "image")
MAX_ROW_GROUP_BYTES = 1 << 30    # a Parquet row group is decoded whole: larger ones are skipped
# reasons this builder adds to stats.BUILD_SKIP_REASONS
BEAM_SKIP_REASONS = ("too_small", "duplicate", "undecodable_image", "truncated_image",
                     "missing_columns", "bad_parquet")


class ImageTextPairsBeam(_ManualFiles, _ClassFileCodePath, tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
    """`image_text_pairs` from webdataset tars or img2dataset Parquet, built by a Beam pipeline."""

    name = "image_text_pairs"
    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    MAX_FILE_BYTES = web.ImageTextPairs.MAX_FILE_BYTES
    MAX_TEXT_BYTES = web.ImageTextPairs.MAX_TEXT_BYTES

    def __init__(self, *, min_image_size: int = MIN_IMAGE_SIZE, dedup: bool = True,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, **kwargs):
        super().__init__(**kwargs)
        self.settings = {"min_image_size": int(min_image_size), "dedup": bool(dedup),
                         "max_image_pixels": int(max_image_pixels)}
        self._counts: dict[str, int] = {}

    def _features(self):
        return caption_features(encoding="jpeg")

    def _metadata(self):
        return tfds.core.MetadataDict()

    def manual_root(self, dl_manager) -> str:
        """manual_dir as given: a local folder or a remote one (gs://...) read through epath."""
        try:
            return str(dl_manager.manual_dir)
        except AssertionError:  # tfds: the folder is missing or empty
            return str(getattr(dl_manager, "_manual_dir", None) or "<manual_dir>")

    def _download_and_prepare(self, dl_manager, download_config=None):
        root = self.manual_root(dl_manager)
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except ValueError as e:  # TFDS's Beam writer refuses a split without examples
            if "generated examples is 0" not in str(e):
                raise
            raise DatasetError(f"{self.name}: no usable pairs in {root} (the first skips of each "
                               "reason are in the log)") from None
        kept = self._counts.pop("kept", 0)
        logging.warning("%s (beam): kept %d records, skipped %d: %s", self.name, kept,
                        sum(self._counts.values()), dict(sorted(self._counts.items())))
        self.info.metadata.update(kept=kept, skipped=dict(sorted(self._counts.items())),
                                  built_with="beam", **self.settings)

    def _split_generators(self, dl_manager, pipeline):
        root = self.manual_root(dl_manager)
        inputs = list_inputs(root)
        return {"train": pipeline | "ImageTextPairs" >> beam.ptransform_fn(read_pairs)(
            root, inputs, limits=(self.MAX_FILE_BYTES, self.MAX_TEXT_BYTES), **self.settings)}

    def _generate_examples(self, **kwargs):  # the split is made in _split_generators
        raise NotImplementedError

    def _process_pipeline_result(self, pipeline_result) -> None:
        """The pipeline's counters (skips by reason, kept) -> self._counts."""
        counters = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
        for c in counters:
            value = c.committed if c.committed is not None else c.attempted
            self._counts[c.key.metric.name] = self._counts.get(c.key.metric.name, 0) + int(value or 0)


def list_inputs(root: str) -> list[tuple[int, str, str]]:
    """The input files in order: (ordinal, kind "tar" | "parquet", name in root)."""
    for kind in ("tar", "parquet"):
        names = sorted(p.name for p in epath.Path(root).glob(f"*.{kind}"))
        if names:
            return [(i, kind, n) for i, n in enumerate(names)]
    raise DatasetError(f"image_text_pairs: no *.tar or *.parquet files in {root}. Expected layout:\n{__doc__}")


def is_remote(root: str) -> bool:
    """A manual_dir on an object store (gs://, s3://): read through epath, no local file checks."""
    return "://" in str(root)


@contextlib.contextmanager
def local_copy(root: str, name: str):
    """A local folder holding input file `name`: `root` itself, or for a remote root a temporary
    copy (streamed; a worker reads a tar or Parquet file from local disk, front to back)."""
    if not is_remote(root):
        yield Path(root)
        return
    with tempfile.TemporaryDirectory(prefix="image_text_pairs_") as tmp:
        with (epath.Path(root) / name).open("rb") as src, open(os.path.join(tmp, name), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield Path(tmp)


# ------------------------------------------------------------------ the pipeline
def read_pairs(pipeline, root: str, inputs, *, limits, min_image_size: int, dedup: bool,
               max_image_pixels: int):
    """PTransform body: input files -> (image_id, example) of the usable, distinct pairs."""
    read = (pipeline
            | "Files" >> beam.Create(inputs)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFile(root, limits)).with_outputs("counts", main="samples"))
    bases = beam.pvalue.AsSingleton(read.counts | "Positions" >> beam.combiners.ToDict()
                                    | "Offsets" >> beam.Map(_offsets))
    pairs = (read.samples
             | "ImageIds" >> beam.Map(_with_image_id, bases)
             | "CheckImages" >> beam.ParDo(_CheckImage(min_image_size, max_image_pixels)))
    if dedup:
        pairs = (pairs
                 | "ByContent" >> beam.Map(lambda ex: (hashlib.sha256(ex["image"]).hexdigest(), ex))
                 | "LowestId" >> beam.CombinePerKey(LowestImageId())
                 | "CountDuplicates" >> beam.Map(_count_duplicates))
    return pairs | "Keys" >> beam.Map(_keyed)


def _offsets(counts: dict[int, int]) -> dict[int, int]:
    """{file ordinal: samples in it} -> {file ordinal: image_id of its first sample}."""
    out, base = {}, 0
    for ordinal in sorted(counts):
        out[ordinal], base = base, base + counts[ordinal]
    return out


def _with_image_id(sample, bases: dict[int, int]) -> dict:
    ordinal, index, example = sample
    return dict(example, image_id=bases[ordinal] + index)


def _keyed(example: dict):
    _counter("kept").inc()
    return example["image_id"], example


def _count_duplicates(keyed) -> dict:
    _, (example, copies) = keyed
    if copies > 1:
        _counter("duplicate").inc(copies - 1)
    return example


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


_SKIPS = SkipLog("image_text_pairs (beam)")  # per worker process: its first skips of each reason


def _skip(s: Skip, where: str) -> None:
    _counter(s.reason).inc()
    _SKIPS.skip(s.reason, where, s.detail)


class LowestImageId(beam.CombineFn):
    """The examples of one image content -> (the lowest image_id's example, number of copies)."""

    def create_accumulator(self):
        return None, 0

    def add_input(self, acc, example):
        return self.merge_accumulators([acc, (example, 1)])

    def merge_accumulators(self, accs):
        best, n = None, 0
        for b, k in accs:
            if b is not None and (best is None or b["image_id"] < best["image_id"]):
                best = b
            n += k
        return best, n

    def extract_output(self, acc):
        return acc


class _ReadFile(beam.DoFn):
    """(ordinal, kind, name) of one input file -> (ordinal, index, example) per usable sample,
    and (ordinal, samples in the file) on the "counts" output."""

    def __init__(self, root: str, limits):
        self.root, self.limits = root, limits

    def process(self, item):
        ordinal, kind, name = item
        n = 0
        with local_copy(self.root, name) as folder:
            samples = (tar_samples(folder, name, self.limits) if kind == "tar" else
                       parquet_samples(folder, name, self.limits, image_root=self.root))
            for index, where, example in samples:
                n = n if index is None else max(n, index + 1)
                if isinstance(example, Skip):
                    _skip(example, where)
                else:
                    yield ordinal, index, example
        yield beam.pvalue.TaggedOutput("counts", (ordinal, n))


class _CheckImage(beam.DoFn):
    """Passes the examples whose image is usable (decodes, not too small, not too large)."""

    def __init__(self, min_size: int, max_pixels: int):
        self.min_size, self.max_pixels = min_size, max_pixels

    def process(self, example):
        try:
            check_image(example["image"], self.min_size, self.max_pixels)
        except Skip as s:
            _skip(s, example["file_name"])
        else:
            yield example


# ------------------------------------------------------------------ readers
class _Limits:
    def __init__(self, limits):
        self.MAX_FILE_BYTES, self.MAX_TEXT_BYTES = limits


def tar_samples(root: Path, name: str, limits):
    """(index, where, example or Skip) per sample of a webdataset tar, as web.py reads it (index
    None: the whole file is skipped, and holds no sample)."""
    try:
        reader = web._TarReader(root / name, _Limits(limits), read_from=0)
    except Skip as s:
        yield None, name, s
        return
    with reader:
        for index, key, parts, problem in reader.samples():
            where = f"{name}:{key}"
            try:
                if problem:
                    raise Skip(*problem)
                if key.startswith("/") or ".." in key.split("/"):
                    raise Skip("outside_root", f"member name {key!r} leads outside the tar's root")
                example = web._tar_example(parts)
            except Skip as s:
                yield index, where, s
            else:
                yield index, where, dict(example, file_name=f"{name}/{key}")


def parquet_samples(root: Path, name: str, limits, image_root: str | None = None):
    """(index, where, example or Skip) per row of an img2dataset Parquet file in `root`; images
    named by key are read from `image_root` (default root)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    max_file, max_text = limits
    try:
        f = files.open_regular(str(resolve_inside(root, name)), lambda m: Skip("not_a_file", m), "parquet")
    except Skip as s:
        yield None, name, s
        return
    with f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            yield None, name, Skip("bad_parquet", f"not a readable Parquet file ({str(e)[:120]})")
            return
        columns = set(pf.schema_arrow.names)
        image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
        rows = pf.metadata.num_rows
        if "caption" not in columns or (image_col is None and "key" not in columns):
            yield max(rows - 1, 0), name, Skip(
                "missing_columns", f"columns {sorted(columns)[:12]}: needs 'caption' and an image "
                                   f"column ({'/'.join(IMAGE_COLUMNS)}) or 'key'; its {rows} rows are lost")
            return
        wanted = ["caption", image_col or "key"] + (["key"] if image_col and "key" in columns else [])
        index = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if pf.metadata.row_group(g).total_byte_size > MAX_ROW_GROUP_BYTES:
                for i in range(index, index + n):
                    yield i, f"{name}:{i}", Skip("too_large", f"row group {g} is over {MAX_ROW_GROUP_BYTES} bytes")
                index += n
                continue
            try:
                table = pf.read_row_group(g, columns=wanted)
            except (pa.ArrowException, OSError, ValueError) as e:
                yield index + n - 1, name, Skip("bad_parquet", f"row group {g} unreadable ({str(e)[:120]}); "
                                                               "its rows and any after it are lost")
                return
            for row in table.to_pylist():
                yield index, f"{name}:{index}", _parquet_example(image_root or str(root), name, row, image_col,
                                                                 index, max_file, max_text)
                index += 1


def _parquet_example(root: str, name: str, row: dict, image_col: str | None, index: int,
                     max_file: int, max_text: int):
    """An example (or the Skip) of one Parquet row."""
    caption, key = row.get("caption"), row.get("key")
    if caption is not None and not isinstance(caption, str):
        return Skip("malformed_line", f"caption is {type(caption).__name__}, not text")
    if caption is not None and len(caption.encode("utf-8", "surrogatepass")) > max_text:
        return Skip("too_large", f"a caption over {max_text} bytes")
    if key is not None and not isinstance(key, (str, int)):
        return Skip("malformed_line", f"key is {type(key).__name__}")
    try:
        if image_col is not None:
            image = row.get(image_col)
            if not isinstance(image, bytes) or not image:
                raise Skip("empty_image" if not image else "malformed_line", f"no {image_col} bytes")
            if len(image) > max_file:
                raise Skip("too_large", f"an image of {len(image)} bytes > {max_file}")
        else:
            image = _image_file(root, Path(name).stem, str(key), max_file)
        captions = web._nonempty([caption or ""])
    except Skip as s:
        return s
    label = key if key is not None else index
    return {"image": image, "captions": captions, "file_name": f"{name}/{label}"}


def _image_file(root: str, shard: str, key: str, max_bytes: int) -> bytes:
    """The image `<shard>/<key>.<ext>` of img2dataset's "files" layout (inside root)."""
    if is_remote(root):
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise Skip("outside_root", f"key {key!r} leads outside manual_dir")
        for ext in web.IMAGE_EXTS:
            path = epath.Path(root) / shard / f"{key}{ext}"
            if path.exists():
                with path.open("rb") as f:
                    data = f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise Skip("too_large", f"{shard}/{key}{ext}: over {max_bytes} bytes")
                if not data:
                    raise Skip("empty_image", f"{shard}/{key}{ext} is empty")
                return data
    else:
        for ext in web.IMAGE_EXTS:
            path = resolve_inside(Path(root), f"{shard}/{key}{ext}")
            if os.path.lexists(path):
                return read_regular_file(path, max_bytes)
    raise Skip("missing_image", f"no image file {shard}/{key}.*")


# ------------------------------------------------------------------ one image
def check_image(data: bytes, min_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Skip(reason) unless `data` decodes to an image at least `min_size` pixels on its shorter
    side and at most `max_pixels` in all: too_small, too_large, truncated_image,
    undecodable_image. The size is read from the header first; JPEGs decode at reduced scale."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise Skip("too_large", f"{w}x{h} pixels > {max_pixels}")
            if min(w, h) < min_size:
                raise Skip("too_small", f"{w}x{h}, the shorter side under {min_size}")
            img.draft("RGB", (max(min_size, 1), max(min_size, 1)))
            img.load()
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001  PIL and its codecs raise many types on broken data
        reason = "truncated_image" if "truncated" in str(e).lower() else "undecodable_image"
        raise Skip(reason, f"{type(e).__name__}: {str(e)[:120]}") from None
