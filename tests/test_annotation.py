"""Collection annotation (`blip2_jax.annotation`, `python -m blip2_jax.annotate`): inputs read
as shards (folders, webdataset tars, TFDS), corrupt images skipped and counted, outputs equal to a
plain loop over `blip2_jax.load(...).generate` / `image_features`, shards written atomically; a
run killed with SIGKILL resumes without redoing finished shards and ends with every image exactly
once, in one process x 8 devices and in 2 processes x 4 devices (jax.distributed on localhost)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from blip2_jax import annotation
from blip2_jax.data.transforms import BadImage
from blip2_jax.preprocess import InputError
from tests.conftest import GOLDEN, ROOT

MODEL = GOLDEN / "blip2_opt"
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), JAX_PLATFORMS="cpu",
           PYTHONUNBUFFERED="1")


def png(seed: int, size=(40, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """24 images in a folder tree, two of them corrupt: 07.png truncated, sub/19.png not an image."""
    root = tmp_path_factory.mktemp("collection")
    (root / "sub").mkdir()
    for i in range(24):
        path = root / (f"sub/{i:02d}.png" if i >= 16 else f"{i:02d}.png")
        path.write_bytes({7: png(i)[:60], 19: b"garbage"}.get(i, png(i)))
    (root / "notes.txt").write_text("not an image file name: ignored")
    return root


def good_ids(root) -> list[str]:
    return [i for i in sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                              for f in fs if f.endswith(".png")) if i not in ("07.png", "sub/19.png")]


# ------------------------------------------------------------------------------ pieces
def test_read_image_names_the_reason(tmp_path):
    assert annotation.read_image(png(0)).size == (48, 40)
    cases = {"empty_image": b"", "undecodable_image": b"plain text", "truncated_image": png(1, (200, 200))[:400]}
    for reason, data in cases.items():
        with pytest.raises(BadImage) as e:
            annotation.read_image(data)
        assert e.value.reason == reason
    with pytest.raises(BadImage) as e:
        annotation.read_image(png(2, (100, 100)), max_pixels=9999)
    assert e.value.reason == "too_large" and "100x100" in str(e.value)


def test_folder_shards_in_a_fixed_order(collection):
    shards = annotation.list_shards(str(collection), shard_size=5)
    assert [s.size for s in shards] == [5, 5, 5, 5, 4]
    assert [rid for s in shards for rid, _ in s.read()] == sorted(
        os.path.relpath(os.path.join(d, f), collection) for d, _, fs in os.walk(collection) for f in fs
        if f.endswith(".png"))
    assert [s.index for s in annotation.my_shards(shards, 1, 2)] == [1, 3]
    with pytest.raises(InputError, match="input not found"):
        annotation.list_shards(str(collection / "missing"))


def test_tar_shards_group_members_and_survive_a_truncated_tar(tmp_path):
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for k in range(3):
            add(tar, f"s{k}.png", png(k))
            add(tar, f"s{k}.txt", b"a caption")
    whole = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[:1500])  # ends inside the first member
    shards = annotation.list_shards(str(tmp_path / "*.tar"))
    records = [list(s.read()) for s in shards]
    assert [r for r, _ in records[0]] == ["a.tar/s0", "a.tar/s1", "a.tar/s2"]
    assert records[0][1][1] == png(1)
    assert isinstance(records[1][-1][1], BadImage) and records[1][-1][1].reason in ("bad_tar", "truncated_tar")


def test_another_configuration_is_refused_unless_overwrite(tmp_path):
    out = str(tmp_path / "out")
    annotation.prepare_output(out, {"task": "caption"}, overwrite=False, leader=True)
    annotation.write_shard(out, 0, [{"id": "x", "caption": "c"}], None, [], "jsonl")
    annotation.prepare_output(out, {"task": "caption"}, overwrite=False, leader=True)  # same: resumes
    assert os.path.exists(annotation.done_path(out, 0))
    with pytest.raises(InputError, match="another run's outputs .different task"):
        annotation.prepare_output(out, {"task": "vqa"}, overwrite=False, leader=True)
    annotation.prepare_output(out, {"task": "vqa"}, overwrite=True, leader=True)
    assert sorted(os.listdir(out)) == ["annotate.json"]


def test_a_shard_is_finished_only_when_all_its_files_are_in_place(tmp_path, monkeypatch):
    out = str(tmp_path)
    real = os.replace

    def fail_on_marker(src, dst):
        if dst.endswith(".done.json"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_marker)
    with pytest.raises(OSError):
        annotation.write_shard(out, 3, [{"id": "a"}], np.ones((1, 2), np.float32), [("b", "too_large")], "jsonl")
    assert not os.path.exists(annotation.done_path(out, 3)) and annotation.read_outputs(out) == {}
    monkeypatch.setattr(os, "replace", real)
    annotation.write_shard(out, 3, [{"id": "a"}], np.ones((1, 2), np.float32), [("b", "too_large")], "jsonl")
    got = annotation.read_outputs(out)
    assert list(got) == ["a"] and got["a"]["embedding"].tolist() == [1.0, 1.0]
    assert json.load(open(annotation.done_path(out, 3)))["skipped"] == [["b", "too_large"]]


def test_embeddings_equal_image_features(collection, tmp_path):
    import blip2_jax
    model = blip2_jax.load(MODEL)
    shards = annotation.list_shards(str(collection), shard_size=10)
    task = annotation.EmbedTask(model.predictor)
    s = annotation.annotate(shards, task, model.image_processor.one, str(tmp_path), fmt="parquet", batch_size=4,
                            workers=2, progress=False)
    assert (s.images, s.shards, dict(s.skipped)) == (22, 3, {"truncated_image": 1, "undecodable_image": 1})
    got = annotation.read_outputs(str(tmp_path))
    ids = good_ids(collection)
    assert sorted(got) == ids
    want = model.image_features([str(collection / i) for i in ids])["query_output"]
    np.testing.assert_allclose(np.stack([got[i]["embedding"] for i in ids]), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ the command line
def annotate_cmd(collection, out, *extra):
    return [sys.executable, "-m", "blip2_jax.annotate", "--model", str(MODEL), "--input", str(collection),
            "--task", "caption", "--max_new_tokens", "5", "--shard_size", "1", "--batch_size", "2",
            "--output", str(out), "--workers", "2", "--no_progress", *extra]


def finished(out) -> dict[str, tuple[int, int]]:
    """Finished shards' files -> (inode, mtime_ns): a rewritten file would change both."""
    names = [n for n in os.listdir(out) if n.startswith("part-") and not n.endswith(".tmp")]
    done = {n.split(".")[0] for n in names if n.endswith(".done.json")}
    return {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in names if n.split(".")[0] in done}


def kill_after_first_shards(procs, out, timeout=400):
    """SIGKILL to every process once some, not all, shards are finished; -> the finished files."""
    def markers():
        return [n for n in os.listdir(out) if n.endswith(".done.json")] if out.exists() else []

    t0 = time.time()
    while not markers():
        assert all(p.poll() is None for p in procs), "a process ended before finishing a shard"
        assert time.time() - t0 < timeout, "no shard finished in time"
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(30)
    done = finished(out)
    assert 0 < len([n for n in done if n.endswith(".done.json")]) < 24, "the run was not killed mid-way"
    return done


def check_exactly_once(collection, out, before_kill, reference_captions):
    after = finished(out)
    assert {k: after[k] for k in before_kill} == before_kill  # finished shards were not written again
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    got = annotation.read_outputs(str(out))  # raises on an id in two shards
    assert sorted(got) == good_ids(collection)
    assert {i: r["caption"] for i, r in got.items()} == reference_captions
    markers = [json.load(open(out / n)) for n in os.listdir(out) if n.endswith(".done.json")]
    assert sorted(tuple(x) for m in markers for x in m["skipped"]) == [("07.png", "truncated_image"),
                                                                      ("sub/19.png", "undecodable_image")]
    return markers


@pytest.fixture(scope="module")
def reference_captions(collection):
    """The plain loop: `generate` on each shard's images (one image per shard), 8 devices."""
    import blip2_jax
    from blip2_jax import sharding
    model = blip2_jax.load(MODEL, mesh=sharding.make_mesh((-1, 1, 1)))
    return {i: model.generate([str(collection / i)], max_new_tokens=5)[0] for i in good_ids(collection)}


@pytest.mark.slow
def test_kill_9_then_resume_writes_every_image_once(collection, tmp_path, reference_captions):
    out = tmp_path / "out"
    proc = subprocess.Popen(annotate_cmd(collection, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    before = kill_after_first_shards([proc], out)
    run = subprocess.run(annotate_cmd(collection, out), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.splitlines()[-1])
    n_before = len([n for n in before if n.endswith(".done.json")])
    assert summary["already_done_shards"] == n_before and summary["shards"] == 24 - n_before
    check_exactly_once(collection, out, before, reference_captions)
    again = subprocess.run(annotate_cmd(collection, out, "--task", "embed"), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "another run's outputs" in again.stderr and len(again.stderr.splitlines()) == 1


@pytest.mark.slow
def test_two_processes_split_the_shards_and_resume(collection, tmp_path, reference_captions):
    import portpicker
    out = tmp_path / "out"
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")

    def start():
        port = portpicker.pick_unused_port()
        return [subprocess.Popen(annotate_cmd(collection, out, "--coordinator_address", f"127.0.0.1:{port}",
                                              "--num_processes", "2", "--process_id", str(i)),
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]

    before = kill_after_first_shards(start(), out)
    procs = start()
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outs]
    assert [s["process"] for s in summaries] == [0, 1]
    markers = check_exactly_once(collection, out, before, reference_captions)
    assert all(m["process"] == m["shard"] % 2 for m in markers)  # each process its own shards
