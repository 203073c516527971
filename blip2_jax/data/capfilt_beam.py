"""CapFilt as an Apache Beam pipeline (`python -m blip2_jax.capfilt --engine beam`).

    input shards (not finished yet)
      -> Reshuffle -> ShardBatches: read the shard's records, decode and preprocess in a thread
         pool, cut them into CapFilt batches (capfilt.shard_batches; bad images counted)
      -> RunInference(BlipCapfiltHandler.with_no_batching()): the model handler loads the captioner
         and the scorer once per worker and compiles their programs on a warm-up batch; every
         batch has the same shapes, so nothing compiles again
      -> GroupByKey(shard) -> write each output shard (capfilt_output.Output.write_shard)
      -> once all are written: the dataset's metadata (Output.finalize)
The batches are made per input shard, not by Beam's BatchElements: a batch's sampling seed is
a function of (seed, shard, batch number), so the captions do not depend on which worker ran
what, and equal those of the JAX job (`capfilt.run_shards`). Counters (namespace "capfilt"):
images, and skips by reason.
"""
from __future__ import annotations

import dataclasses
import logging

# Beam's notices about Google Cloud clients (at import) and about memory metrics RunInference
# cannot read (on every batch: an optional import of its fails) say nothing about this run.
_NOTICES = ("apitools not found", "Resource module is not available")
logging.getLogger().addFilter(lambda record: not record.getMessage().startswith(_NOTICES))
import apache_beam as beam  # noqa: E402
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from blip2_jax.data import capfilt
from blip2_jax.data.capfilt_output import Output

NAMESPACE = "capfilt"


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything a worker needs (picklable): input, models, settings, output."""
    input: str
    input_data_dir: str | None
    shard_size: int
    captioner: str
    scorer: str
    dtype: str
    options: capfilt.Options
    output_dir: str
    num_shards: int
    config: dict
    workers: int = 8
    max_pixels: int = capfilt.annotation.MAX_IMAGE_PIXELS


class BlipCapfiltHandler(ModelHandler):
    """RunInference handler for blip2_jax CapFilt: the model is a `capfilt.CapfiltStep` (captioner
    and scorer on this worker's devices); an example is one image of a CapFilt batch, and a
    (pre-made) batch is one call of the step. Predictions: (shard, ("row", record)) per image
    kept, (shard, ("skip", (id, reason))) per image without a caption to keep."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec

    def load_model(self) -> capfilt.CapfiltStep:
        from blip2_jax import cache
        cache.enable()
        s = self.spec
        captioner, cp = capfilt.load_model(s.captioner, dtype=s.dtype)
        scorer, sp = capfilt.load_model(s.scorer, dtype=s.dtype)
        step = capfilt.CapfiltStep(captioner, scorer, s.options)
        step(np.zeros((1, cp.size, cp.size, 3), np.float32), np.zeros((1, sp.size, sp.size, 3), np.float32),
             [["a"]], seed=0)  # compiles every program at its only shape
        return step

    def run_inference(self, batch, model: capfilt.CapfiltStep, inference_args=None):
        if not batch:
            return []
        first = batch[0]
        rows, skipped = capfilt.run_batch(model, {
            "ids": [e["id"] for e in batch], "records": [e["record"] for e in batch], "seed": first["seed"],
            "captioner_pixels": np.stack([e["captioner_pixels"] for e in batch]),
            "scorer_pixels": np.stack([e["scorer_pixels"] for e in batch]), "skipped": []})
        Metrics.counter(NAMESPACE, "images").inc(len(rows))
        for _, reason in skipped:
            Metrics.counter(NAMESPACE, reason).inc()
        shard = first["shard"]
        return [(shard, ("row", r)) for r in rows] + [(shard, ("skip", s)) for s in skipped]

    def get_num_bytes(self, batch) -> int:
        return sum(e["captioner_pixels"].nbytes + e["scorer_pixels"].nbytes + len(e["record"]["image"])
                   for e in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE + "_inference"  # RunInference's own metrics (latency, batch sizes)


class ShardBatches(beam.DoFn):
    """Input shard index -> its CapFilt batches (lists of per-image examples); skipped images go
    to the "skipped" output as (shard, ("skip", (id, reason)))."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def setup(self):
        s = self.spec
        self.inputs = capfilt.InputShards(s.input, s.input_data_dir, s.shard_size)
        self.views = capfilt.TwoViews(capfilt.image_processor(s.captioner), capfilt.image_processor(s.scorer))

    def process(self, shard: int):
        s = self.spec
        for b in capfilt.shard_batches(self.inputs, [self.inputs.shards[shard]], self.views, s.options,
                                       workers=s.workers, max_pixels=s.max_pixels):
            for item in b["skipped"]:
                Metrics.counter(NAMESPACE, item[1]).inc()
                yield beam.pvalue.TaggedOutput("skipped", (shard, ("skip", item)))
            if b["ids"]:
                yield [{"shard": shard, "seed": b["seed"], "id": rid, "record": rec, "captioner_pixels": cp,
                        "scorer_pixels": sp}
                       for rid, rec, cp, sp in zip(b["ids"], b["records"], b["captioner_pixels"], b["scorer_pixels"])]


class WriteShard(beam.DoFn):
    """(shard, items) -> the committed output shard; yields its marker."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def process(self, keyed):
        shard, items = keyed
        rows = [v for kind, v in items if kind == "row"]
        skipped = [tuple(v) for kind, v in items if kind == "skip"]
        yield Output(self.spec.output_dir, self.spec.num_shards, self.spec.config).write_shard(shard, rows, skipped)


def finalize(_count, spec: Spec):
    """After every shard of this run is written: the dataset's metadata (when all are done)."""
    return Output(spec.output_dir, spec.num_shards, spec.config).finalize()


def build(pipeline, spec: Spec, todo: list[int]):
    """Adds CapFilt over the input shards `todo` to `pipeline`."""
    batches = (pipeline
               | "Shards" >> beam.Create(todo)
               | "Spread" >> beam.Reshuffle()
               | "Batches" >> beam.ParDo(ShardBatches(spec)).with_outputs("skipped", main="batches"))
    kept = batches.batches | "CapFilt" >> RunInference(BlipCapfiltHandler(spec).with_no_batching())
    written = ((kept, batches.skipped)
               | "Merge" >> beam.Flatten()
               | "ByShard" >> beam.GroupByKey()
               | "Write" >> beam.ParDo(WriteShard(spec)))
    return (written
            | "AllWritten" >> beam.combiners.Count.Globally()
            | "Finalize" >> beam.Map(finalize, spec=spec))


def counters(result) -> dict[str, int]:
    """The pipeline's CapFilt counters {name: value}."""
    from apache_beam.metrics.metric import MetricsFilter
    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out
