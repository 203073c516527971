"""Counts of records skipped or converted, by reason: while building a dataset and in the
input pipeline.

A long run must never die on one bad file: decoding problems turn a record into a `Skipped`
marker, the batcher counts and drops it, and the counts travel with the batch (`STATS_KEY`)
out of the worker processes to the `DataStats` of the iterator the trainer holds (which logs
them and saves them with the iterator state). Builders count what they skip in a `SkipLog`
(logged with file and line, and stored in the dataset's metadata).
"""
from __future__ import annotations

import collections
import dataclasses
import logging

STATS_KEY = "_stats"

# reasons a record is dropped (everything else counted is a conversion that kept the record)
SKIP_REASONS = ("empty_image", "undecodable_image", "truncated_image", "too_large",
                "empty_caption", "empty_question", "no_answer")

# reasons a builder skips an input record (builders/web.py)
BUILD_SKIP_REASONS = (
    "outside_root",       # a path that is absolute, escapes with "..", or is a symlink out
    "malformed_line",     # not JSON, not an object, no "image", wrong types, too long, bad TSV row
    "bad_encoding",       # text that is not UTF-8 (manifest line, .txt sidecar)
    "malformed_sidecar",  # a .json sidecar that is not a JSON object
    "missing_image",      # no such file, or a sample without an image member
    "not_a_file",         # a directory, FIFO, device, or a link member inside a tar
    "unreadable",         # the operating system refused to read it
    "empty_image", "too_large", "empty_caption",
    "truncated_tar",      # a tar that ends early: its remaining samples are lost (once per tar)
    "bad_tar")            # not a readable tar at all (once per file)

@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a record that could not be used."""
    reason: str


class DataStats:
    """Running totals {reason: count}; `skipped` sums the dropping reasons."""

    def __init__(self, counts: dict[str, int] | None = None, log_every: int = 1000):
        self.counts = collections.Counter(counts or {})
        self.log_every = log_every
        self._batches = 0
        self._logged: dict[str, int] = {}

    def add(self, delta: dict[str, int]) -> None:
        new_reason = any(k not in self.counts for k in delta)
        self.counts.update(delta)
        self._batches += 1
        if new_reason or (self._batches % self.log_every == 0 and self.counts != self._logged):
            self.log()

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k in SKIP_REASONS)

    @property
    def converted(self) -> int:
        return sum(v for k, v in self.counts.items() if k not in SKIP_REASONS)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def log(self) -> None:
        self._logged = dict(self.counts)
        logging.warning("input pipeline: %d records skipped, %d converted: %s",
                        self.skipped, self.converted, self.as_dict())

    def __repr__(self) -> str:
        return f"DataStats({self.as_dict()})"


class SkipLog:
    """A builder's skipped input records by reason; the first `log_first` of each reason are
    logged with where they are (file:line or shard:member)."""

    def __init__(self, builder: str, log_first: int = 20):
        self.builder, self.log_first = builder, log_first
        self.counts: collections.Counter = collections.Counter()

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.log_first:
            logging.warning("%s: %s: skipped (%s)%s", self.builder, where, reason,
                            f": {detail}" if detail else "")
        elif n == self.log_first + 1:
            logging.warning("%s: further %r skips are counted, not logged", self.builder, reason)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def log_summary(self, kept: int) -> None:
        if self.counts:
            logging.warning("%s: kept %d records, skipped %d: %s", self.builder, kept,
                            sum(self.counts.values()), self.as_dict())
        else:
            logging.info("%s: kept %d records, skipped none", self.builder, kept)
