"""The Beam-built `image_text_pairs` (data/builders/web_beam.py, `python -m blip2_jax.build_pairs`)
on the DirectRunner: its records equal the single-process builder's on the same tars; it filters
small images, drops exact duplicates and counts corrupt images, hostile tar members and Parquet
files by reason without writing outside the data directory; img2dataset's Parquet layouts read
as the tars do; the grain pipeline reads the result unchanged; a rerun refuses or keeps it."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from blip2_jax.data import builders, pipeline
from blip2_jax.data.builders import web_beam
from blip2_jax.data.builders.base import DatasetError
from tests.conftest import ROOT

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def jpeg(seed: int, size=(72, 80)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, samples, mode="w"):
    """samples: (key, {ext: bytes})."""
    with tarfile.open(path, mode) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                add(tar, f"{key}{ext}", data)


def build_beam(manual, data_dir, **settings):
    b = web_beam.ImageTextPairsBeam(data_dir=str(data_dir), file_format="array_record", **settings)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), beam_options=PipelineOptions(["--runner=DirectRunner"])))
    return b


def records(data_dir) -> dict[int, dict]:
    src = builders.get_builder("image_text_pairs", data_dir).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})
    return {int(r["image_id"]): {"image": r["image"], "file_name": r["file_name"],
                                 "captions": [bytes(c) for c in r["captions"]]} for r in src}


@pytest.fixture(scope="module")
def clean_tars(tmp_path_factory):
    """Three tars (one gzip-compressed, one cut short), .txt and .json captions."""
    root = tmp_path_factory.mktemp("clean")
    write_tar(root / "00000.tar", [(f"a{k}", {".jpg": jpeg(k), ".txt": f"a photo {k}".encode()}) for k in range(4)])
    write_tar(root / "00001.tar", [(f"b{k}", {".jpg": jpeg(10 + k), ".json": json.dumps({"caption": f"json {k}"}).encode()})
                                   for k in range(3)], mode="w:gz")
    write_tar(root / "00002.tar", [(f"c{k}", {".jpg": jpeg(20 + k), ".txt": b"cut"}) for k in range(3)])
    whole = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(whole[:len(whole) - 1024 - 512 * 3])  # the last sample is lost
    return root


def test_records_equal_the_single_process_builder(clean_tars, tmp_path):
    beam = build_beam(clean_tars, tmp_path / "beam", min_image_size=16)
    single = builders.prepare_dataset("image_text_pairs", tmp_path / "single", clean_tars)
    got, want = records(tmp_path / "beam"), records(tmp_path / "single")
    assert len(want) == 9 and got == want
    assert beam.info.metadata["skipped"] == single.info.metadata["skipped"] == {"truncated_tar": 1}
    assert beam.info.metadata["kept"] == 9 and beam.info.metadata["built_with"] == "beam"


def test_the_input_pipeline_reads_it_unchanged(clean_tars, tmp_path):
    build_beam(clean_tars, tmp_path, min_image_size=16)
    cfg = pipeline.default_input_config()
    cfg.update(dataset="image_text_pairs", data_dir=str(tmp_path), prepare=False, batch_size=4,
               image_size=32, read_threads=1)
    batch = next(pipeline.make_iterator(cfg, process_index=0, process_count=1))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["qformer_input_ids"].shape == (4, 32)
    assert set(batch["image_id"].tolist()) <= set(records(tmp_path))


def test_filters_duplicates_and_hostile_tar_members(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    good = jpeg(1)
    truncated = jpeg(2, (200, 200))[:600]
    write_tar(manual / "00000.tar", [
        ("k0", {".jpg": good, ".txt": b"kept"}),
        ("k1", {".jpg": jpeg(3, (20, 90)), ".txt": b"too small"}),
        ("k2", {".jpg": good, ".txt": b"a duplicate of k0"}),
        ("k3", {".jpg": truncated, ".txt": b"truncated image"}),
        ("k4", {".jpg": b"not an image at all", ".txt": b"undecodable"}),
        ("../escape", {".jpg": jpeg(4), ".txt": b"a name leading out"}),
        ("/abs/path", {".jpg": jpeg(5), ".txt": b"an absolute name"}),
        ("k5", {".jpg": jpeg(6), ".txt": b"   "}),
        ("k6", {".jpg": jpeg(7), ".txt": b"x" * ((1 << 20) + 1)}),   # a megabyte caption
        ("k7", {".jpg": jpeg(8), ".txt": b"kept too"}),
    ])
    before = sorted(p for p in tmp_path.rglob("*"))
    b = build_beam(manual, tmp_path / "data", min_image_size=32)
    assert b.info.metadata["skipped"] == {"too_small": 1, "duplicate": 1, "truncated_image": 1,
                                          "undecodable_image": 1, "outside_root": 2, "empty_caption": 1,
                                          "too_large": 1}
    got = records(tmp_path / "data")
    assert {i: r["captions"] for i, r in got.items()} == {0: [b"kept"], 9: [b"kept too"]}  # k0 before its copy
    new = [p for p in tmp_path.rglob("*") if p not in before]
    assert new and all(p.is_relative_to(tmp_path / "data") for p in new)


def test_img2dataset_parquet_layouts(tmp_path):
    manual = tmp_path / "manual"
    (manual / "00001").mkdir(parents=True)
    pq.write_table(pa.table({"url": ["http://a/0", "http://a/1", "http://a/2"], "key": ["000000000", "000000001", "000000002"],
                             "caption": ["inline zero", "", "inline two"], "jpg": [jpeg(0), jpeg(1), jpeg(2)]}),
                   manual / "00000.parquet")
    for k in range(2):  # output_format="files": images beside the Parquet, found by key
        (manual / "00001" / f"00001000{k}.jpg").write_bytes(jpeg(10 + k))
    pq.write_table(pa.table({"url": ["u", "v", "w"], "key": ["000010000", "000010001", "../../secret"],
                             "caption": ["by key zero", "by key one", "escapes"]}), manual / "00001.parquet")
    pq.write_table(pa.table({"url": ["x"], "text": ["no caption column"]}), manual / "00002.parquet")
    (manual / "00003.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"caption": ["x" * ((1 << 20) + 5), "fine"], "jpg": [jpeg(20), jpeg(21)]}),
                   manual / "00004.parquet")
    b = build_beam(manual, tmp_path / "data", min_image_size=16)
    assert b.info.metadata["skipped"] == {"empty_caption": 1, "outside_root": 1, "missing_columns": 1,
                                          "bad_parquet": 1, "too_large": 1}
    got = records(tmp_path / "data")
    # ids: rows across the sorted files (3 + 3 + 1 + 0 + 2)
    assert {i: (r["file_name"], r["captions"]) for i, r in got.items()} == {
        0: (b"00000.parquet/000000000", [b"inline zero"]), 2: (b"00000.parquet/000000002", [b"inline two"]),
        3: (b"00001.parquet/000010000", [b"by key zero"]), 4: (b"00001.parquet/000010001", [b"by key one"]),
        8: (b"00004.parquet/1", [b"fine"])}
    assert got[3]["image"] == jpeg(10) and got[0]["image"] == jpeg(0)


def test_a_remote_manual_dir_is_read_through_epath(tmp_path, monkeypatch):
    """gs:// and other object stores: files copied to the worker's disk, key images read by epath."""
    manual = tmp_path / "manual"
    (manual / "00000").mkdir(parents=True)
    for k in range(3):
        (manual / "00000" / f"{k:09d}.jpg").write_bytes(jpeg(30 + k))
    pq.write_table(pa.table({"key": [f"{k:09d}" for k in range(3)] + ["../x"], "caption": ["a", "b", "c", "d"]}),
                   manual / "00000.parquet")
    local = build_beam(manual, tmp_path / "local", min_image_size=16)
    monkeypatch.setattr(web_beam, "is_remote", lambda root: True)
    remote = build_beam(manual, tmp_path / "remote", min_image_size=16)
    assert records(tmp_path / "remote") == records(tmp_path / "local") and len(records(tmp_path / "local")) == 3
    assert remote.info.metadata["skipped"] == local.info.metadata["skipped"] == {"outside_root": 1}


def test_no_usable_pair_is_one_error(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_tar(manual / "a.tar", [("k", {".jpg": b"garbage", ".txt": b"c"})])
    with pytest.raises(DatasetError, match="no usable pairs"):
        build_beam(manual, tmp_path / "data")
    (manual / "a.tar").unlink()
    with pytest.raises(DatasetError, match=r"no \*.tar or \*.parquet"):
        build_beam(manual, tmp_path / "data")


@pytest.mark.slow  # two processes importing Beam and TFDS
def test_command_line_refuses_or_keeps_a_finished_build(clean_tars, tmp_path):
    def run(*extra):
        cmd = [sys.executable, "-m", "blip2_jax.build_pairs", "--manual_dir", str(clean_tars),
               "--data_dir", str(tmp_path / "data"), "--min_image_size", "16", *extra]
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)

    first = run("--runner=DirectRunner", "--direct_num_workers=1")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.splitlines()[-1])
    assert (summary["built"], summary["kept"], summary["skipped"]) == (True, 9, {"truncated_tar": 1})
    info = tmp_path / "data" / "image_text_pairs" / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    again = run()
    assert again.returncode == 2 and again.stderr.strip().endswith("--if_exists overwrite rebuilds it")
    assert len(again.stderr.strip().splitlines()) == 1
    kept = run("--if_exists", "resume")
    assert kept.returncode == 0 and json.loads(kept.stdout.splitlines()[-1])["built"] is False
    assert info.stat().st_mtime_ns == stamp
    missing = subprocess.run([sys.executable, "-m", "blip2_jax.build_pairs", "--manual_dir", str(tmp_path / "nope"),
                              "--data_dir", str(tmp_path / "d2")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_check_image_reasons():
    web_beam.check_image(jpeg(0), 64)
    for data, min_size, reason in ((jpeg(0), 100, "too_small"), (b"", 1, "undecodable_image"),
                                   (jpeg(1, (300, 300))[:500], 1, "truncated_image")):
        with pytest.raises(web_beam.Skip) as e:
            web_beam.check_image(data, min_size)
        assert e.value.reason == reason
    with pytest.raises(web_beam.Skip, match="pixels"):
        web_beam.check_image(jpeg(2, (100, 100)), 1, max_pixels=5000)
