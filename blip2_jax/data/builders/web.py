"""Web image-text pairs (CC3M, CC12M, SBU, LAION style) from local files.

Three layouts are recognised in `manual_dir`, tried in this order:
  *.tar        webdataset shards (plain or gzip/bz2/xz-compressed): members
               `<key>.<jpg|jpeg|png|webp|bmp|gif>` with `<key>.txt` (the caption) and optionally
               `<key>.json` (its "caption" is used when there is no .txt).
  pairs.jsonl  one object per line: "image" (path relative to manual_dir) and "caption" (str)
               or "captions" (list of str).
  pairs.tsv    tab-separated with a header row naming the columns "image" and "caption".
Every path is resolved inside manual_dir: absolute paths, ".." escapes and symlinks leading out
are never read (put the files themselves under manual_dir). Web crawls have holes, and shared
files can be hostile: a record that cannot be used is skipped and counted by reason, never
fatal: "outside_root", "malformed_line" (not JSON, not an object, no "image", wrong types,
over 1 MiB), "bad_encoding" (not UTF-8), "malformed_sidecar", "missing_image", "not_a_file"
(directories, FIFOs, links inside a tar), "unreadable", "empty_image", "too_large" (an image
over 64 MiB, a caption file over 1 MiB), "empty_caption", "truncated_tar" (once per tar: the
sample in progress at the cut), "bad_tar". The first skips of each reason are logged with file and line
(or shard and member); the counts are saved in the dataset's metadata.json ("skipped", "kept"),
readable as `builder.info.metadata`. One split, "train"; image_id is the record's position in
the input (line number; sample index across the shards), unique and stable.
"""
from __future__ import annotations

import bz2
import functools
import gzip
import itertools
import json
import lzma
import os
import stat
import tarfile
import zlib
from pathlib import Path

import tensorflow_datasets as tfds

from blip2_jax import files
from blip2_jax.data.builders.base import (
    DatasetError,
    ShardedManualBuilder,
    Skip,
    caption_features,
    read_regular_file,
    resolve_inside,
)
from blip2_jax.data.stats import SkipLog

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TEXT_EXTS = (".txt", ".json")
# what a damaged or truncated (compressed) tar raises while it is read
_TAR_ERRORS = (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError, OSError)


class ImageTextPairs(ShardedManualBuilder):
    """A folder of images with captions (JSONL/TSV), or webdataset tar shards."""

    name = "image_text_pairs"
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    MAX_FILE_BYTES = 64 << 20   # an image file or member; larger ones are skipped unread
    MAX_TEXT_BYTES = 1 << 20    # a manifest line or a caption sidecar
    # Output shards: TFDS holds one shard's examples in memory while it writes it.
    SHARD_BYTES = 64 << 20
    SHARD_RECORDS = 10_000

    def _features(self):
        return caption_features(encoding="jpeg")

    def _metadata(self):
        return tfds.core.MetadataDict()

    # ------------------------------------------------------------------ the build
    def _download_and_prepare(self, dl_manager, download_config=None):
        self._skips, self._kept, self._reader = SkipLog(self.name), 0, None
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if self._reader is not None:
                self._reader.close()
        self._skips.log_summary(self._kept)
        if not self._kept:
            raise DatasetError(f"{self.name}: no usable pairs in {self.manual_root(dl_manager)}; "
                               f"skipped: {self._skips.as_dict()}")
        self.info.metadata.update(kept=self._kept, skipped=self._skips.as_dict())

    def _shard_iterators_per_split(self, dl_manager):
        """One generator per output shard (SHARD_BYTES / SHARD_RECORDS of input each)."""
        root = self.manual_root(dl_manager)
        tars = sorted(root.glob("*.tar"))
        if tars:
            shards = self._plan_tars(root, tars)
        elif (root / "pairs.jsonl").exists():
            shards = self._plan_manifest(root, root / "pairs.jsonl")
        else:
            shards = self._plan_manifest(root, self.manual_file(dl_manager, "pairs.tsv", "pairs.jsonl"))
        if not shards:
            raise DatasetError(f"{self.name}: no readable input in {root}; "
                               f"skipped: {self._skips.as_dict()}")
        return {"train": shards}

    # ------------------------------------------------------------------ JSONL / TSV manifests
    def _plan_manifest(self, root: Path, path: Path):
        """Shards of consecutive manifest lines: (byte offset, first line number, line count)."""
        if not path.resolve().is_relative_to(root.resolve()):
            raise DatasetError(f"{self.name}: {path.name} resolves outside manual_dir")
        with self._open_manifest(path) as f:
            columns = _tsv_header(f, path, self.name) if path.suffix == ".tsv" else None
            line_no = 1 if columns else 0
            plan = _ShardPlan(self, lambda first, n: functools.partial(
                self._manifest_examples, root, path, columns, *first, n))
            offset = f.tell()
            for raw in _lines(f, self.MAX_TEXT_BYTES):
                line_no += 1
                plan.add(len(raw or b"") + self._image_size(root, raw, columns), (offset, line_no))
                offset = f.tell()
        return plan.shards()

    def _open_manifest(self, path: Path):
        return files.open_regular(str(path), DatasetError, f"{self.name} manifest")

    def _image_size(self, root: Path, raw: bytes | None, columns) -> int:
        """The size of the image a manifest line names (0 when the line will be skipped)."""
        try:
            if raw is None or not raw.strip():
                return 0
            st = os.stat(resolve_inside(root, _parse_row(raw, columns)[0]))
            return st.st_size if stat.S_ISREG(st.st_mode) and st.st_size <= self.MAX_FILE_BYTES else 0
        except (Skip, OSError):
            return 0

    def _manifest_examples(self, root: Path, path: Path, columns, offset: int, first_line: int,
                           count: int):
        with self._open_manifest(path) as f:
            f.seek(offset)
            lines = itertools.islice(_lines(f, self.MAX_TEXT_BYTES), count)
            for line_no, raw in enumerate(lines, first_line):
                if raw is not None and not raw.strip():
                    continue  # blank lines are not records
                try:
                    if raw is None:
                        raise Skip("malformed_line", f"longer than {self.MAX_TEXT_BYTES} bytes")
                    rel, captions = _parse_row(raw, columns)
                    captions = _nonempty(captions)
                    image = read_regular_file(resolve_inside(root, rel), self.MAX_FILE_BYTES)
                except Skip as s:
                    self._skips.skip(s.reason, f"{path.name}:{line_no}", s.detail)
                    continue
                self._kept += 1
                yield line_no, {"image": image, "image_id": line_no, "file_name": rel,
                                "captions": captions}

    # ------------------------------------------------------------------ webdataset tars
    def _plan_tars(self, root: Path, tars: list[Path]):
        """Shards of consecutive samples of one tar: (tar, first sample, count, image_id base)."""
        shards, base = [], 0
        for tar in tars:
            plan = _ShardPlan(self, lambda first, n, tar=tar, base=base: functools.partial(
                self._tar_examples, tar, first, n, base))
            n = 0
            try:
                with _TarReader(tar, self, read_from=None) as reader:
                    for index, _, parts, _ in reader.samples():
                        plan.add(sum(v for v in parts.values() if isinstance(v, int)), index)
                        n = index + 1
            except Skip as s:
                self._skips.skip(s.reason, tar.name, s.detail)
            shards += plan.shards()
            base += n
        return shards

    def _tar_examples(self, tar: Path, first: int, count: int, base: int):
        reader = self._reader
        if reader is None or reader.source != tar or reader.next_index != first:
            if reader is not None:
                reader.close()
            try:  # shards of a tar are written in order: a fresh reader only for the first
                reader = self._reader = _TarReader(tar, self, read_from=first)
            except Skip as s:
                self._skips.skip(s.reason, tar.name, s.detail)
                return
        for index, key, parts, problem in reader.samples():
            if index < first:
                continue
            reader.next_index = index + 1
            try:
                if problem:
                    raise Skip(*problem)
                example = _tar_example(parts)
            except Skip as s:
                self._skips.skip(s.reason, f"{tar.name}:{key}", s.detail)
            else:
                self._kept += 1
                yield base + index, dict(example, image_id=base + index, file_name=f"{tar.name}/{key}")
            if index + 1 >= first + count:
                return


class _ShardPlan:
    """Consecutive input records grouped into output shards of at most SHARD_RECORDS records and
    about SHARD_BYTES of input; `make(first position, count)` gives a shard's generator."""

    def __init__(self, limits: ImageTextPairs, make):
        self.limits, self.make, self._done = limits, make, []
        self.first, self.count, self.bytes = None, 0, 0

    def add(self, size: int, position) -> None:
        if self.first is None:
            self.first = position
        self.count, self.bytes = self.count + 1, self.bytes + size
        if self.count >= self.limits.SHARD_RECORDS or self.bytes >= self.limits.SHARD_BYTES:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.count:
            self._done.append(self.make(self.first, self.count))
        self.first, self.count, self.bytes = None, 0, 0

    def shards(self) -> list:
        self._close_shard()
        return self._done


class _TarReader:
    """One tar read front to back in stream mode (constant memory, any compression).

    `samples()` yields (index, key, parts, problem) per sample (consecutive members sharing a
    key): parts maps ".ext" to the member's bytes for samples from `read_from` on, else to its
    size (`read_from=None`: sizes only). `problem` is a (reason, detail) that skips the sample.
    """

    def __init__(self, source: Path, limits: ImageTextPairs, read_from: int | None):
        """`source`: a tar found in manual_dir (read only if it resolves inside it)."""
        self.source, self.limits, self.read_from, self.next_index = source, limits, read_from, 0
        path = resolve_inside(source.parent, source.name)
        self.file = files.open_regular(path, lambda msg: Skip("not_a_file", msg), "tar")
        self.stream = None
        try:
            self.stream = _EndWatcher(_decompressed(self.file))
            self.tar = tarfile.open(fileobj=self.stream, mode="r|")
        except _TAR_ERRORS as e:
            self.file.close()
            raise Skip("bad_tar", f"not a readable tar: {getattr(self.stream, 'error', None) or e}") from None
        self._samples = self._iter_samples()

    def samples(self):
        """The shared sample iterator (a later caller continues where the last one stopped)."""
        return self._samples

    def _iter_samples(self):
        key, parts, problem, index = None, {}, None, 0
        try:
            for member in self.tar:
                if member.isdir():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                name, ext = (f"{folder}/{stem}" if folder else stem), ("." + ext.lower() if dot else "")
                if key is not None and (name != key or ext in parts):
                    yield index, key, parts, problem
                    index, parts, problem = index + 1, {}, None
                key = name
                problem = self._member(member, ext, parts, index) or problem
        except _TAR_ERRORS as e:
            error = e
        else:  # tarfile ends quietly when a cut falls between members
            error = None if self.stream.complete() else (self.stream.error or "no end-of-archive block")
        if error is not None:
            lost = "the sample in progress and any after it are lost"
            yield index, key or "(start)", parts, ("truncated_tar", f"the tar ends early ({error}); {lost}")
        elif key is not None:
            yield index, key, parts, problem

    def _member(self, member: tarfile.TarInfo, ext: str, parts: dict, index: int):
        """Puts the member's bytes (or size) into parts; returns a problem or None."""
        if not member.isreg():
            return "not_a_file", f"{member.name} is a link or special file, not read"
        if member.size < 0:
            raise tarfile.ReadError(f"{member.name}: negative size {member.size}")
        if ext not in IMAGE_EXTS and ext not in TEXT_EXTS:
            return None  # other webdataset fields (.cls, .url, ...) are not used
        cap = self.limits.MAX_FILE_BYTES if ext in IMAGE_EXTS else self.limits.MAX_TEXT_BYTES
        if member.size > cap:
            return "too_large", f"{member.name}: {member.size} bytes > {cap}, not read"
        if self.read_from is None or index < self.read_from:
            parts[ext] = member.size
            return None
        data = self.tar.extractfile(member).read(cap + 1)
        if len(data) != member.size:
            raise tarfile.ReadError(f"{member.name}: {len(data)} of {member.size} bytes")
        parts[ext] = data
        return None

    def close(self):
        self._samples.close()
        self.tar.close()
        self.stream.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _EndWatcher:
    """Reads for tarfile and tells how the data ended: `tail` is the last block (a complete tar
    ends in a zero block), `error` a decompression error, turned into an end of data so that
    everything before the cut is still read."""

    def __init__(self, f):
        self.f, self.tail, self.error = f, b"", None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            data = self.f.read(n)
        except _TAR_ERRORS as e:
            self.error = e
            return b""
        if data:
            self.tail = (self.tail + data)[-tarfile.BLOCKSIZE:]
        return data

    def complete(self) -> bool:
        return self.error is None and self.tail == bytes(tarfile.BLOCKSIZE)

    def close(self):
        self.f.close()


def _decompressed(f):
    """`f`, or a decompressing reader of it (gzip, bz2, xz by their magic bytes). These read in
    bounded steps: tarfile's own stream decompression re-copies its buffer on every read,
    which takes minutes to skip a highly compressed member."""
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(f, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(f, "rb")
    return f


# ------------------------------------------------------------------ one record
def _lines(f, max_bytes: int):
    """Each line's bytes from f's position, or None for a line over `max_bytes` (never read
    whole: memory stays bounded by `max_bytes`)."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def _tsv_header(f, path: Path, builder: str) -> list[str]:
    raw = f.readline(1 << 16)
    try:
        columns = raw.decode("utf-8").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        raise DatasetError(f"{builder}: {path.name}: the header row is not UTF-8") from None
    if not {"image", "caption"} <= set(columns):
        raise DatasetError(f"{builder}: {path.name}: the header must name 'image' and 'caption' "
                           f"columns, got {columns}")
    return columns


def _parse_row(raw: bytes, columns: list[str] | None) -> tuple[str, list[str]]:
    """(image path, captions) of a JSONL line (columns None) or a TSV row; Skip when malformed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("bad_encoding", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if columns is not None:
        fields = text.rstrip("\r\n").split("\t")
        if len(fields) != len(columns):
            raise Skip("malformed_line", f"{len(fields)} fields, the header has {len(columns)}")
        row = dict(zip(columns, fields))
        return row["image"], [row["caption"]]
    try:
        row = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Skip("malformed_line", f"not JSON ({str(e)[:80]})") from None
    if not isinstance(row, dict):
        raise Skip("malformed_line", f"a JSON {type(row).__name__}, not an object")
    if not isinstance(row.get("image"), str):
        raise Skip("malformed_line", 'no "image" key' if "image" not in row else '"image" is not a string')
    return row["image"], _captions(row)


def _captions(row: dict) -> list[str]:
    for key in ("captions", "caption", "text"):
        if key in row:
            value = row[key]
            if value is None:
                return []
            if isinstance(value, str):
                return [value]
            if isinstance(value, list) and all(isinstance(c, str) for c in value):
                return value
            raise Skip("malformed_line", f'"{key}" is not a string or a list of strings')
    return []


def _nonempty(captions: list[str]) -> list[str]:
    captions = [c.strip() for c in captions if c and c.strip()]
    if not captions:
        raise Skip("empty_caption")
    return captions


def _tar_example(parts: dict[str, bytes]) -> dict:
    """image + captions of one webdataset sample; Skip when it has no usable pair."""
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        raise Skip("missing_image", "no image member")
    if not image:
        raise Skip("empty_image", "empty image member")
    caption = ""
    if ".txt" in parts:
        try:
            caption = parts[".txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("bad_encoding", f".txt is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not caption.strip() and ".json" in parts:
        try:
            meta = json.loads(parts[".json"].decode("utf-8"))
        except UnicodeDecodeError:
            raise Skip("bad_encoding", ".json is not UTF-8") from None
        except (ValueError, RecursionError):
            raise Skip("malformed_sidecar", ".json is not JSON") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("caption") or "", str):
            raise Skip("malformed_sidecar", '.json is not an object with a string "caption"')
        caption = meta.get("caption") or ""
    return {"image": image, "captions": _nonempty([caption])}
