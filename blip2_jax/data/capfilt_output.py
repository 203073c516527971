"""CapFilt's output: the `capfilt_pairs` dataset (builders/capfilt.py), written shard by shard.

    DATA_DIR/capfilt_pairs/1.0.0/
      capfilt_pairs-train.array_record-NNNNN-of-MMMMM   output shard i = input shard i
      capfilt/capfilt.json                              the run's settings
      capfilt/part-NNNNN.done.json                      shard i is finished (rows, skips, bytes)
      dataset_info.json, features.json, metadata.json   written once every shard is finished

A shard's records are written to a temporary name and renamed into place, its `.done.json`
last: a shard is finished exactly when that file exists, so a killed run (Beam worker or JAX
process) resumes by skipping finished shards and never writes a shard twice. The dataset is
readable (TFDS, the input pipeline) only once `finalize` has written dataset_info.json. Paths
go through etils.epath: local folders and, with a filesystem package installed, gs:// alike.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds
from etils import epath

from blip2_jax.annotation import done_path
from blip2_jax.data.builders.capfilt import NAME, CapfiltPairs, capfilt_features
from blip2_jax.preprocess import InputError

CONFIG_FILE = "capfilt.json"
IF_EXISTS = ("refuse", "resume", "overwrite")
RECORD_FIELDS = ("image", "image_id", "file_name", "captions", "caption_scores", "caption_sources",
                 "web_captions", "web_caption_scores")


class Output:
    """The output dataset of one CapFilt run over an input of `num_shards` shards."""

    def __init__(self, data_dir: str, num_shards: int, config: dict):
        self.data_dir, self.num_shards, self.config = str(data_dir), int(num_shards), config
        self.dir = epath.Path(data_dir) / NAME / str(CapfiltPairs.VERSION)
        self.meta = self.dir / "capfilt"
        self.template = tfds.core.ShardedFileTemplate(data_dir=self.dir, dataset_name=NAME, split="train",
                                                      filetype_suffix="array_record")
        self._features = None

    # -- the run's folder
    def prepare(self, if_exists: str, *, leader: bool = True) -> None:
        """Checks the folder against this run. Existing output is refused (`refuse`), continued
        when its settings are this run's (`resume`; other settings are refused), or removed
        first (`overwrite`, by the leader). The leader then records the settings."""
        if if_exists not in IF_EXISTS:
            raise InputError(f"--if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
        path = self.meta / CONFIG_FILE
        has_output = self.dir.exists() and any(self.dir.iterdir())
        if has_output and if_exists != "overwrite":
            done = len(self.done_shards())
            state = "complete" if self.complete() else f"{done} of {self.num_shards} shards done"
            if if_exists == "refuse":
                raise InputError(f"{self.dir} already holds CapFilt output ({state}); --if_exists resume "
                                 "continues it, --if_exists overwrite replaces it")
            old = json.loads(path.read_text()) if path.exists() else None
            if old != self.config:
                diff = sorted(k for k in set(old or {}) | set(self.config) if (old or {}).get(k) != self.config.get(k))
                raise InputError(f"{self.dir} holds another CapFilt run's output (different "
                                 f"{', '.join(diff) or 'settings'}); use another --output_dir or --if_exists overwrite")
            return
        if not leader:
            return
        if has_output:
            for p in sorted(self.dir.glob("**/*"), key=lambda p: -len(p.parts)):
                p.rmtree() if p.is_dir() else p.unlink()
        self.meta.mkdir(parents=True, exist_ok=True)
        _commit(path, lambda p: _write_bytes(p, json.dumps(self.config, indent=1, sort_keys=True).encode()))

    def done_shards(self) -> dict[int, dict]:
        """{shard: its .done.json} of the finished shards."""
        if not self.meta.exists():
            return {}
        out = {}
        for p in self.meta.glob("part-*.done.json"):
            marker = json.loads(p.read_text())
            out[int(marker["shard"])] = marker
        return out

    def complete(self) -> bool:
        return (self.dir / "dataset_info.json").exists()

    # -- shards
    def shard_path(self, shard: int) -> epath.Path:
        return self.template.sharded_filepath(shard_index=shard, num_shards=self.num_shards)

    def write_shard(self, shard: int, rows: Sequence[dict], skipped: Sequence[tuple[str, str]], *,
                    process: int = 0) -> dict:
        """Commits output shard `shard`: its records (ordered by input position), then its marker."""
        if self._features is None:
            self._features = capfilt_features()
        rows = sorted(rows, key=lambda r: r["_index"])
        serialized = [self._features.serialize_example({k: r[k] for k in RECORD_FIELDS}) for r in rows]
        _commit(self.shard_path(shard), lambda p: _write_array_record(p, serialized))
        sources = Counter(s for r in rows for s in r["caption_sources"])
        marker = {"shard": shard, "rows": len(rows), "bytes": sum(map(len, serialized)), "process": process,
                  "skipped": dict(sorted(Counter(reason for _, reason in skipped).items())),
                  "kept_web": sources.get("web", 0), "kept_synthetic": sources.get("synthetic", 0)}
        _commit(epath.Path(done_path(str(self.meta), shard)), lambda p: _write_bytes(p, json.dumps(marker).encode()))
        return marker

    def finalize(self) -> dict | None:
        """When every shard is finished: writes the dataset's metadata (TFDS can read it from then
        on) and returns the run's totals; else None."""
        done = self.done_shards()
        if len(done) < self.num_shards:
            return None
        markers = [done[i] for i in range(self.num_shards)]
        skipped: Counter = Counter()
        for m in markers:
            skipped.update(m["skipped"])
        totals = {"images": sum(m["rows"] for m in markers), "skipped": dict(sorted(skipped.items())),
                  "kept_web": sum(m["kept_web"] for m in markers),
                  "kept_synthetic": sum(m["kept_synthetic"] for m in markers)}
        if not self.complete():
            builder = CapfiltPairs(data_dir=self.data_dir, file_format="array_record")
            split = tfds.core.SplitInfo(name="train", shard_lengths=[m["rows"] for m in markers],
                                        num_bytes=sum(m["bytes"] for m in markers), filename_template=self.template)
            builder.info.set_splits(tfds.core.SplitDict([split]))
            builder.info.metadata.update(totals, settings=self.config)
            builder.info.write_to_directory(self.dir)
        return totals


def _write_array_record(path: str, records: Sequence[bytes]) -> None:
    from tensorflow_datasets.core import file_adapters
    file_adapters.ArrayRecordFileAdapter.write_examples(path, ((None, r) for r in records))


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(dst: epath.Path, write: Callable[[str], None]) -> None:
    """Writes `dst` through a temporary name renamed into place; `write(local_path)` writes the
    content. A remote `dst` (gs://...) is written to a local scratch file, then copied."""
    tmp = epath.Path(str(dst) + ".tmp")
    local = "://" not in str(dst)
    if local:
        write(str(tmp))
    else:
        fd, scratch = tempfile.mkstemp(suffix=".part")
        os.close(fd)
        try:
            write(scratch)
            epath.Path(scratch).copy(tmp, overwrite=True)
        finally:
            os.remove(scratch)
    tmp.replace(dst)  # a shard committed by a run killed before its marker is redone
