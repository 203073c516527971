"""Logging of scalars: TensorBoard event files and `metrics.jsonl` in the workdir.

Every logged scalar goes to both; each line of metrics.jsonl is one JSON object with "step"
and each metric by name. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; metrics.jsonl is always written
                self._tb = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
