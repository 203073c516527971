"""Counts of records the input pipeline skipped or converted, by reason.

A long run must never die on one bad file: decoding problems turn a record into a `Skipped`
marker, the batcher counts and drops it, and the counts travel with the batch (`STATS_KEY`)
out of the worker processes to the `DataStats` of the iterator the trainer holds (which logs
them and saves them with the iterator state).
"""
from __future__ import annotations

import collections
import dataclasses
import logging

STATS_KEY = "_stats"

# reasons a record is dropped (everything else counted is a conversion that kept the record)
SKIP_REASONS = ("empty_image", "undecodable_image", "truncated_image", "too_large",
                "empty_caption", "empty_question", "no_answer")


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
