"""Annotating image collections: every image of a folder, webdataset tars or a TFDS split gets a
caption, answers or an embedding, written in shards, exactly once, resumable after a kill.

    shards = list_shards("photos/", shard_size=1000)      # or "data/*.tar", "coco_karpathy:test"
    task = CaptionTask(predictor, num_beams=5)            # VqaTask(predictor, questions), EmbedTask
    summary = annotate(shards, task, processor, "out/", process_index=0, process_count=1)

Input shards are numbered in a fixed order (sorted files, one tar per shard, index ranges of a
TFDS split); process p of P takes shards p, p + P, ... and runs them on its own devices (the
Predictor spreads a batch over its mesh), so no process waits for another. Images are decoded
and preprocessed in a thread pool while the devices work. A shard's outputs are written to
temporary files and renamed into place, its `.done.json` last: a shard is finished exactly when
that file exists, so a killed run resumes by skipping finished shards and never writes half a
shard or the same shard twice. A corrupt image is skipped and counted by reason (`data.stats`).

Output directory: `annotate.json` (the run's configuration; another configuration is refused),
and per shard `part-NNNNN.jsonl` or `.parquet` (one row per image: `id` and the task's fields),
`part-NNNNN.npy` (embeddings, [rows, ...] float32, jsonl format) and `part-NNNNN.done.json`
(rows, skipped ids and reasons).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import io
import json
import os
import queue
import tarfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from blip2_jax.data.transforms import BadImage
from blip2_jax.preprocess import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused (decompression bombs), demo and annotation
CONFIG_FILE = "annotate.json"
FORMATS = ("jsonl", "parquet")


# ------------------------------------------------------------------------------ one image
def read_image(source: bytes | str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes or a file path -> decoded PIL image (any mode; `ImageProcessor` converts it).
    Raises `BadImage` with a `data.stats` reason: empty_image, too_large, truncated_image,
    undecodable_image. The size is checked before the pixels are decoded."""
    data = source if isinstance(source, bytes) else None
    try:
        if data is None:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as e:
        raise BadImage("undecodable_image", f"{e.__class__.__name__}: {e}") from None
    if not data:
        raise BadImage("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage("too_large", f"{w}x{h} pixels ({w * h / 1e6:.1f} MP); at most "
                                            f"{max_pixels / 1e6:.0f} MP are accepted")
            img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except OSError as e:  # PIL: unidentified / truncated / broken data
        raise BadImage("truncated_image" if "truncated" in str(e) else "undecodable_image", str(e)) from None
    except Exception as e:  # noqa: BLE001  anything else a broken file may raise in a codec
        raise BadImage("undecodable_image", repr(e)) from None
    if img.width < 1 or img.height < 1:
        raise BadImage("empty_image")
    return img


# ------------------------------------------------------------------------------ input shards
@dataclasses.dataclass(frozen=True)
class Shard:
    """Input shard `index`: `read()` yields (record id, encoded bytes, a file path, or the
    `BadImage` that stands for a record that could not be read)."""
    index: int
    read: Callable[[], Iterator[tuple[str, bytes | str | BadImage]]]
    size: int | None = None  # images, when known without reading


def list_shards(spec: str, shard_size: int = 1000, data_dir: str | None = None) -> list[Shard]:
    """"DIR" (images, recursively; or the .tar files in it), "a/*.tar" (webdataset tars, one
    shard each) or "name[/config]:split" (a prepared TFDS dataset) -> its shards, in order."""
    if shard_size < 1:
        raise InputError(f"shard size must be >= 1, got {shard_size}")
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(spec, "*.tar")))
        return tar_shards(tars) if tars else folder_shards(spec, shard_size)
    if spec.endswith(".tar") or glob.has_magic(spec):
        tars = sorted(p for p in glob.glob(spec) if p.endswith(".tar"))
        if not tars:
            raise InputError(f"no .tar files match {spec}")
        return tar_shards(tars)
    if ":" in spec and not os.path.exists(spec):
        return tfds_shards(spec, shard_size, data_dir)
    raise InputError(f"input not found: {spec} (a folder, webdataset .tar files, or a TFDS name:split)")


def folder_shards(folder: str, shard_size: int) -> list[Shard]:
    """Image files under `folder` (sorted relative paths; the id is that path)."""
    rel = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
                 for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not rel:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")

    def reader(names):
        return lambda: ((n, os.path.join(folder, n)) for n in names)

    return [Shard(i, reader(rel[s:s + shard_size]), len(rel[s:s + shard_size]))
            for i, s in enumerate(range(0, len(rel), shard_size))]


def tar_shards(paths: Sequence[str]) -> list[Shard]:
    """Webdataset tars: members grouped by key (the name up to the first dot of its base name);
    the first image member of a key is the image; the id is "<tar name>/<key>"."""
    def read(path):
        name = os.path.basename(path)
        seen = set()
        try:
            with tarfile.open(path, "r|*") as tar:
                for m in tar:
                    base = os.path.basename(m.name)
                    key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                    if not m.isfile() or not base.lower().endswith(IMAGE_EXTENSIONS) or key in seen:
                        continue
                    seen.add(key)
                    yield f"{name}/{key}", tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:  # the rest of this tar is lost, the run goes on
            yield name, BadImage("truncated_tar" if seen else "bad_tar", str(e))

    return [Shard(i, (lambda p=p: read(p))) for i, p in enumerate(paths)]


def tfds_shards(spec: str, shard_size: int, data_dir: str | None) -> list[Shard]:
    """A prepared TFDS split (array_record), index ranges of `shard_size` records; the id is the
    record's `image_id` when it has one, else "<split>/<index>"."""
    import tensorflow_datasets as tfds

    from blip2_jax.data import builders  # noqa: F401  registers the project's builders

    name, _, split = spec.rpartition(":")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                  decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001  tfds raises many types for a missing dataset
        raise InputError(f"cannot open TFDS {spec}: {' '.join(str(e).split())[:300]}") from None
    n = len(source)

    def read(lo, hi):
        for i in range(lo, hi):
            rec = source[i]
            rid = rec.get("image_id")
            yield (f"{split}/{i}" if rid is None else str(np.asarray(rid).item())), rec["image"]

    return [Shard(i, (lambda lo=s: read(lo, min(lo + shard_size, n))), min(shard_size, n - s))
            for i, s in enumerate(range(0, n, shard_size))]


# ------------------------------------------------------------------------------ decoding pool
@dataclasses.dataclass
class Batch:
    """Preprocessed images of one shard; `last` closes the shard (it may have no images)."""
    shard: Shard
    ids: list[str]
    pixels: np.ndarray | None
    skipped: list[tuple[str, str]]  # (id, reason)
    last: bool


def decoded_batches(shards: Sequence[Shard], preprocess: Callable[[Image.Image], np.ndarray], batch_size: int,
                    *, workers: int = 8, prefetch: int = 4, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Batch]:
    """Batches of at most `batch_size` images per shard, decoded and preprocessed by `workers`
    threads ahead of the consumer (up to `prefetch` batches)."""
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def load(item):
        rid, source = item
        try:
            if isinstance(source, BadImage):
                raise source
            return rid, preprocess(read_image(source, max_pixels)), None
        except BadImage as e:
            return rid, None, e.reason

    def put(x):
        while not stop.is_set():
            try:
                out.put(x, timeout=0.2)
                return
            except queue.Full:
                continue

    def produce():
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
                for shard in shards:
                    ids, pix, skipped = [], [], []
                    window: collections.deque = collections.deque()
                    records = iter(shard.read())
                    done = False
                    while not done or window:
                        while not done and len(window) < 2 * batch_size + workers:
                            item = next(records, None)
                            if item is None:
                                done = True
                            else:
                                window.append(pool.submit(load, item))
                        if not window:
                            break
                        rid, x, reason = window.popleft().result()
                        if reason:
                            skipped.append((rid, reason))
                        else:
                            ids.append(rid)
                            pix.append(x)
                        if len(ids) == batch_size and (window or not done):
                            put(Batch(shard, ids, np.stack(pix), skipped, False))
                            ids, pix, skipped = [], [], []
                        if stop.is_set():
                            return
                    put(Batch(shard, ids, np.stack(pix) if pix else None, skipped, True))
            put(None)
        except BaseException as e:  # noqa: BLE001  handed to the consumer
            put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------ tasks
class CaptionTask:
    """A caption per image (`prompt`: an optional text the caption continues)."""
    name = "caption"

    def __init__(self, predictor, prompt: str | None = None, **options):
        predictor.require(predictor.can_generate, "captioning")
        self.predictor, self.prompt, self.options = predictor, prompt or None, options
        predictor.options(**options)  # an invalid option fails before any image is read

    def __call__(self, pixels: np.ndarray) -> tuple[list[dict], None]:
        texts = self.predictor.generate(pixels, self.prompt, **self.options)
        return [{"caption": t} for t in texts], None


class VqaTask:
    """Answers to every question for each image. Questions are grouped by prompt length (the
    token-length bucket the Predictor pads to), one generate call per group and row chunk."""
    name = "vqa"

    def __init__(self, predictor, questions: Sequence[str], template: str = "Question: {} Answer:",
                 rows_per_call: int = 32, **options):
        predictor.require(predictor.can_generate, "question answering")
        questions = [q.strip() for q in questions]
        if not questions or not all(questions):
            raise InputError("every question must be a non-empty text")
        if "{}" not in template:
            raise InputError(f"the prompt template needs a {{}} for the question, got {template!r}")
        self.predictor, self.questions, self.options = predictor, questions, options
        self.prompts = [template.format(q) for q in questions]
        self.rows_per_call = rows_per_call
        opts = predictor.options(**options)
        extra = opts.max_new_tokens - 1 if predictor.llm_kind == "opt" else 0
        self.groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(self.prompts):
            n = len(predictor.prompt_tokens(p))
            predictor.check_length(n, extra, f"question {i + 1}'s prompt")
            self.groups[predictor.bucket(n)].append(i)

    def __call__(self, pixels: np.ndarray) -> tuple[list[dict], None]:
        n = len(pixels)
        answers = [[""] * len(self.questions) for _ in range(n)]
        for group in self.groups.values():
            rows = [(i, q) for i in range(n) for q in group]
            for s in range(0, len(rows), self.rows_per_call):
                chunk = rows[s:s + self.rows_per_call]
                texts = self.predictor.generate(pixels[[i for i, _ in chunk]], [self.prompts[q] for _, q in chunk],
                                                **self.options)
                for (i, q), t in zip(chunk, texts):
                    answers[i][q] = t
        return [{"qa": [{"question": q, "answer": a} for q, a in zip(self.questions, row)]} for row in answers], None


class EmbedTask:
    """Image embeddings: normalised ITC features [Q, E] (retrieval checkpoints), else the
    Q-Former's query outputs [Q, D]."""
    name = "embed"

    def __init__(self, predictor):
        self.predictor = predictor
        self.key = "image_feats" if predictor.can_match else "query_output"

    def __call__(self, pixels: np.ndarray) -> tuple[list[dict], np.ndarray]:
        emb = self.predictor.image_features(pixels)[self.key].astype(np.float32)
        return [{} for _ in range(len(pixels))], emb


# ------------------------------------------------------------------------------ output files
def part_name(index: int) -> str:
    return f"part-{index:05d}"


def done_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, part_name(index) + ".done.json")


def write_atomic(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes through `path + ".tmp"`, flushed to disk, then renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out_dir: str, index: int, rows: list[dict], embeddings: np.ndarray | None,
                skipped: list[tuple[str, str]], fmt: str, process_index: int = 0) -> None:
    """A finished shard's files; `.done.json` last (it marks the shard finished)."""
    base = os.path.join(out_dir, part_name(index))
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())})
        if embeddings is not None:
            flat = embeddings.reshape(len(embeddings), -1)
            col = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), flat.shape[1] or 1)
            table = table.append_column("embedding", col).replace_schema_metadata(
                {"embedding_shape": json.dumps(list(embeddings.shape[1:]))})
        write_atomic(base + ".parquet", lambda f: pq.write_table(table, f))
    else:
        if embeddings is not None:
            write_atomic(base + ".npy", lambda f: np.save(f, embeddings))
        write_atomic(base + ".jsonl", lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in rows), "w")
    marker = {"shard": index, "rows": len(rows), "skipped": [list(s) for s in skipped], "process": process_index}
    write_atomic(done_path(out_dir, index), lambda f: json.dump(marker, f), "w")


def prepare_output(out_dir: str, config: dict, *, overwrite: bool, leader: bool) -> None:
    """Checks `out_dir` against this run's configuration. A different one is refused unless
    `overwrite` (then the leader removes the old shards). The leader writes the config."""
    path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != config and not overwrite:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise InputError(f"{out_dir} holds another run's outputs (different {', '.join(diff)}); "
                             "use another --output or --overwrite")
        if old == config:
            return
    elif os.path.isdir(out_dir) and any(n.startswith("part-") for n in os.listdir(out_dir)) and not overwrite:
        raise InputError(f"{out_dir} holds shards without {CONFIG_FILE}; use another --output or --overwrite")
    if not leader:
        return
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.startswith("part-"):
            os.remove(os.path.join(out_dir, name))
    write_atomic(path, lambda f: json.dump(config, f, indent=1, sort_keys=True), "w")


# ------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Summary:
    images: int = 0            # annotated by this run
    shards: int = 0            # finished by this run
    already_done: int = 0      # shards found finished and skipped
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"images": self.images, "shards": self.shards, "already_done_shards": self.already_done,
                "skipped": dict(sorted(self.skipped.items())), "seconds": round(self.seconds, 2),
                "images_per_second": round(self.images / self.seconds, 2) if self.seconds else 0.0}


def my_shards(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
    """This process's shards: index = process_index (mod process_count)."""
    return [s for s in shards if s.index % process_count == process_index]


def annotate(shards: Sequence[Shard], task, preprocess: Callable[[Image.Image], np.ndarray], out_dir: str, *,
             fmt: str = "jsonl", batch_size: int = 32, workers: int = 8, process_index: int = 0,
             process_count: int = 1, max_pixels: int = MAX_IMAGE_PIXELS, progress: bool = True) -> Summary:
    """Runs `task` over this process's unfinished shards (see the module docstring)."""
    from tqdm import tqdm

    t0, summary = time.perf_counter(), Summary()
    os.makedirs(out_dir, exist_ok=True)
    mine = my_shards(shards, process_index, process_count)
    todo = [s for s in mine if not os.path.exists(done_path(out_dir, s.index))]
    summary.already_done = len(mine) - len(todo)
    sizes = [s.size for s in todo]
    total = None if None in sizes else sum(sizes)
    bar = tqdm(total=total, unit="img", desc=f"annotate[{process_index}]" if process_count > 1 else "annotate",
               disable=not progress, mininterval=1.0 if os.isatty(2) else 30.0, smoothing=0.1)
    rows: list[dict] = []
    embs: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for batch in decoded_batches(todo, preprocess, batch_size, workers=workers, max_pixels=max_pixels):
        skipped += batch.skipped
        if batch.ids:
            fields, emb = task(batch.pixels)
            rows += [{"id": i, **f} for i, f in zip(batch.ids, fields)]
            if emb is not None:
                embs.append(emb)
        bar.update(len(batch.ids) + len(batch.skipped))
        if batch.last:
            emb_all = np.concatenate(embs) if embs else (np.zeros((0,), np.float32) if task.name == "embed" else None)
            write_shard(out_dir, batch.shard.index, rows, emb_all, skipped, fmt, process_index)
            summary.images += len(rows)
            summary.shards += 1
            summary.skipped.update(reason for _, reason in skipped)
            bar.set_postfix(shards=f"{summary.shards}/{len(todo)}", skipped=sum(summary.skipped.values()))
            rows, embs, skipped = [], [], []
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def read_outputs(out_dir: str) -> dict[str, Any]:
    """All finished shards' rows by id, with embeddings (np.ndarray) under "embedding" (tests,
    downstream steps). Parquet and jsonl both."""
    out: dict[str, Any] = {}
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".done.json"):
            continue
        base = os.path.join(out_dir, name[:-len(".done.json")])
        if os.path.exists(base + ".parquet"):
            import pyarrow.parquet as pq
            table = pq.read_table(base + ".parquet")
            shape = json.loads((table.schema.metadata or {}).get(b"embedding_shape", b"null"))
            rows = table.to_pylist()
            for r in rows:
                if shape is not None:
                    r["embedding"] = np.asarray(r["embedding"], np.float32).reshape(shape)
        else:
            with open(base + ".jsonl", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
            if os.path.exists(base + ".npy"):
                for r, e in zip(rows, np.load(base + ".npy")):
                    r["embedding"] = e
        for r in rows:
            if r["id"] in out:
                raise ValueError(f"id {r['id']} appears in two shards")
            out[r["id"]] = r
    return out
