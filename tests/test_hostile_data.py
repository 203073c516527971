"""Hostile and malformed training inputs: the `image_text_pairs` builder skips and counts what it
cannot use (never reading outside manual_dir, never holding a bomb in memory, never needing
TensorFlow), and the trainer refuses a bad configuration in one line before building a model."""
import builtins
import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import builders
from blip2_jax.data.builders import web
from blip2_jax.data.builders.base import DatasetError
from tests.conftest import ROOT


# ==================================================================== helpers
def _jpeg(seed: int, side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    """`n` zero bytes, read in pieces (a bomb member is never held whole by the test)."""

    def __init__(self, n: int):
        self.n = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def _add(tar, name, data=b"", *, size=None, fileobj=None, link=None):
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
        return
    info.size = len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data) if fileobj is None else fileobj)


def _pairs_tar(path, keys, mode="w", side=16):
    """A webdataset tar with one good sample (image + caption) per key."""
    with tarfile.open(path, mode) as tar:
        for k in keys:
            _add(tar, f"{k}.jpg", _jpeg(k, side))
            _add(tar, f"{k}.txt", f"caption {k}".encode())


def _build(manual, tmp_path):
    """Builds image_text_pairs; returns (metadata, records sorted by image_id)."""
    import tensorflow_datasets as tfds
    b = builders.prepare_dataset("image_text_pairs", tmp_path / "tfds", manual)
    src = tfds.data_source("image_text_pairs", split="train", data_dir=str(tmp_path / "tfds"),
                           decoders={"image": tfds.decode.SkipDecoding()})
    rows = sorted((src[i] for i in range(len(src))), key=lambda r: r["image_id"])
    return dict(b.info.metadata), rows


def _jsonl(manual, rows):
    lines = [r if isinstance(r, (bytes, str)) else json.dumps(r) for r in rows]
    (manual / "pairs.jsonl").write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode()
                                                    for x in lines) + b"\n")


def _good_images(manual, n=2):
    (manual / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (manual / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
    return [{"image": f"img/{i}.jpg", "caption": f"good {i}"} for i in range(n)]


# ==================================================================== manifests
def test_paths_outside_manual_dir_are_skipped_and_never_opened(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(b"SECRET")
    manual = tmp_path / "manual"
    good = _good_images(manual)
    os.symlink(secret, manual / "img" / "link.jpg")      # a symlink leading out
    os.symlink(outside, manual / "elsewhere")            # a directory symlink leading out
    _jsonl(manual, good + [{"image": "../outside/secret.txt", "caption": "dotdot"},
                           {"image": "img/../../outside/secret.txt", "caption": "nested"},
                           {"image": str(secret), "caption": "absolute"},
                           {"image": "img/link.jpg", "caption": "symlink"},
                           {"image": "elsewhere/secret.txt", "caption": "dir symlink"}])
    opened = []
    real_os_open, real_open = os.open, builtins.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_os_open(p, *a, **k))
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    meta, rows = _build(manual, tmp_path)
    monkeypatch.undo()
    assert meta["skipped"] == {"outside_root": 5}
    assert meta["kept"] == 2 and [r["captions"][0] for r in rows] == [b"good 0", b"good 1"]
    assert not [p for p in opened if "secret" in p or os.path.realpath(p).startswith(str(outside))]


def test_malformed_lines_are_counted_with_file_and_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(web.ImageTextPairs, "MAX_TEXT_BYTES", 4096)
    manual = tmp_path / "manual"
    good = _good_images(manual)
    _jsonl(manual, [good[0],
                    "this is not json",                       # line 2
                    "[1, 2, 3]",                              # 3: not an object
                    {"caption": "no image key"},              # 4
                    {"image": 7, "caption": "int path"},      # 5
                    {"image": "img/1.jpg", "caption": 3},     # 6: caption not a string
                    b'{"image": "img/1.jpg", "caption": "\xff\xfe"}',  # 7: not UTF-8
                    "[" * 100_000 + "]" * 100_000,            # 8: over MAX_TEXT_BYTES
                    "[" * 2000 + "]" * 2000,                  # 9: deep nesting
                    {"image": "img/1.jpg", "caption": "   "},  # 10: empty caption
                    {"image": "img/none.jpg", "caption": "x"},  # 11: no such file
                    good[1]])                                 # 12
    meta, rows = _build(manual, tmp_path)
    assert meta["skipped"] == {"bad_encoding": 1, "empty_caption": 1, "malformed_line": 7,
                               "missing_image": 1}
    assert [r["image_id"] for r in rows] == [1, 12]  # the line numbers of the kept pairs
    for line in (2, 3, 4, 5, 6, 7, 8, 9):
        assert f"pairs.jsonl:{line}: skipped" in caplog.text
    assert 'pairs.jsonl:4: skipped (malformed_line): no "image" key' in caplog.text


def test_tsv_rows_with_wrong_fields_or_encoding(tmp_path):
    manual = tmp_path / "manual"
    _good_images(manual, 3)
    (manual / "pairs.tsv").write_bytes(
        b"image\tcaption\n" b"img/0.jpg\tzero\n" b"img/1.jpg\tone\textra field\n"
        b"img/2.jpg\n" b"img/2.jpg\t\xc3\x28 bad\n" b"img/2.jpg\ttwo\n")
    meta, rows = _build(manual, tmp_path)
    assert meta["skipped"] == {"malformed_line": 2, "bad_encoding": 1}
    assert [r["captions"][0] for r in rows] == [b"zero", b"two"]
    (manual / "pairs.tsv").write_bytes(b"path\ttext\nimg/0.jpg\tzero\n")
    with pytest.raises(DatasetError, match="header must name 'image' and 'caption'"):
        builders.prepare_dataset("image_text_pairs", tmp_path / "tfds2", manual)


def test_fifo_and_directory_in_a_manifest_are_not_files(tmp_path):
    manual = tmp_path / "manual"
    good = _good_images(manual)
    os.mkfifo(manual / "img" / "fifo.jpg")  # opening it for reading would block
    (manual / "img" / "dir.jpg").mkdir()
    _jsonl(manual, good + [{"image": "img/fifo.jpg", "caption": "f"}, {"image": "img/dir.jpg", "caption": "d"}])
    meta, _ = _build(manual, tmp_path)
    assert meta["skipped"] == {"not_a_file": 2}


# ==================================================================== webdataset tars
def test_bad_sidecars_and_missing_images_in_a_tar(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    members = [("0.jpg", _jpeg(0)), ("0.txt", b"a good caption"),
               ("1.jpg", _jpeg(1)), ("1.txt", b"\xff\xfe not utf-8"),
               ("2.jpg", _jpeg(2)), ("2.json", b"{not json"),
               ("3.jpg", _jpeg(3)), ("3.json", b'["a list"]'),
               ("4.txt", b"a caption without an image"),
               ("5.jpg", b""), ("5.txt", b"an empty image"),
               ("6.jpg", _jpeg(6)), ("6.json", b'{"caption": "from json"}')]
    with tarfile.open(manual / "00000.tar", "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    meta, rows = _build(manual, tmp_path)
    assert meta["skipped"] == {"bad_encoding": 1, "malformed_sidecar": 2, "missing_image": 1,
                               "empty_image": 1}
    assert [r["captions"][0] for r in rows] == [b"a good caption", b"from json"]


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_tar_keeps_what_came_before(tmp_path, compress):
    manual = tmp_path / "manual"
    manual.mkdir()
    _pairs_tar(tmp_path / "whole.tar", range(6), side=128)  # random pixels: gzip cannot shrink them
    data = (tmp_path / "whole.tar").read_bytes()
    data = gzip.compress(data) if compress else data
    (manual / "00000.tar").write_bytes(data[: len(data) * 6 // 10])
    _pairs_tar(manual / "00001.tar", [10, 11])
    meta, rows = _build(manual, tmp_path)
    assert meta["skipped"] == {"truncated_tar": 1}
    assert 3 <= meta["kept"] - 2 < 6  # the samples before the cut, and all of the next tar
    assert [r["captions"][0] for r in rows][-2:] == [b"caption 10", b"caption 11"]


def test_symlink_only_tar_and_non_tars(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "00000.tar", "w") as tar:
        _add(tar, "0.jpg", link="/etc/passwd")
    with pytest.raises(DatasetError) as e:
        builders.prepare_dataset("image_text_pairs", tmp_path / "tfds0", manual)
    assert "no usable pairs" in str(e.value) and "'not_a_file': 1" in str(e.value)
    assert "\n" not in str(e.value)
    (manual / "00001.tar").write_bytes(b"not a tar at all" * 64)
    (manual / "00002.tar").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere.tar", manual / "00003.tar")
    _pairs_tar(tmp_path / "elsewhere.tar", [7])
    _pairs_tar(manual / "00004.tar", [1, 2])
    meta, rows = _build(manual, tmp_path)
    assert meta["skipped"] == {"not_a_file": 1, "bad_tar": 2, "outside_root": 1}
    assert meta["kept"] == 2 and len(rows) == 2


# ==================================================================== memory and TensorFlow
_BUILD_SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, resource, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # `import tensorflow` fails in this process, whether it is installed or not
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "tensorflow":
                return importlib.machinery.ModuleSpec(name, self)
        def create_module(self, spec):
            raise ModuleNotFoundError(f"{spec.name} is not importable in this test")
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, NoTensorFlow())
    from tensorflow_datasets.core import shuffle
    shuffle.MAX_MEM_BUFFER_SIZE = 0   # TFDS's shuffler, if used, would spill through TensorFlow
    from blip2_jax.data import builders
    from blip2_jax.data.builders.web import ImageTextPairs
    ImageTextPairs.SHARD_RECORDS = int(sys.argv[3])
    b = builders.prepare_dataset("image_text_pairs", sys.argv[2], sys.argv[1])
    status = open("/proc/self/status").read()
    print(json.dumps({"metadata": dict(b.info.metadata),
                      "shards": b.info.splits["train"].shard_lengths,
                      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vmpeak_kb": int(status.split("VmPeak:")[1].split()[0])}))
""")


def _build_in_subprocess(manual, data_dir, *, limit_bytes=None, shard_records=10_000):
    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(manual), str(data_dir), str(shard_records)],
                       check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       preexec_fn=limit)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_builds_without_tensorflow_in_small_shards(tmp_path):
    """The shuffler is never used: with TensorFlow unimportable and TFDS's in-memory shuffle
    limit at 0 (so any use would spill through tf.io.gfile), a build still succeeds."""
    manual = tmp_path / "manual"
    _jsonl(manual, _good_images(manual, 7))
    out = _build_in_subprocess(manual, tmp_path / "tfds", shard_records=3)
    assert out["shards"] == [3, 3, 1] and out["metadata"]["kept"] == 7
    tars = tmp_path / "tars"
    tars.mkdir()
    _pairs_tar(tars / "00000.tar", range(5))
    _pairs_tar(tars / "00001.tar", range(5, 7), mode="w:gz")
    out = _build_in_subprocess(tars, tmp_path / "tfds_tar", shard_records=2)
    assert out["shards"] == [2, 2, 1, 2] and out["metadata"]["kept"] == 7


def _bomb_tar(path, member_bytes: int):
    """A gzip tar: one good sample, then a sample whose image is `member_bytes` of zeros."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        _add(tar, "0.jpg", _jpeg(0))
        _add(tar, "0.txt", b"a good caption")
        _add(tar, "1.jpg", size=member_bytes, fileobj=_Zeros(member_bytes))
        _add(tar, "1.txt", b"the bomb")


@pytest.mark.slow
def test_compression_bomb_is_skipped_in_bounded_memory(tmp_path):
    """A ~1 MB gzip tar holding a 1 GiB member: skipped as too_large, unread, in the memory of a
    valid tar whose large member fits the cap (under an address-space limit: a regression that
    reads the member fails here, not the machine)."""
    valid, bomb = tmp_path / "valid", tmp_path / "bomb"
    valid.mkdir()
    bomb.mkdir()
    _bomb_tar(valid / "00000.tar", 8 << 20)
    _bomb_tar(bomb / "00000.tar", 1 << 30)
    assert (bomb / "00000.tar").stat().st_size < 2 << 20
    ok = _build_in_subprocess(valid, tmp_path / "tfds_valid")
    assert ok["metadata"] == {"kept": 2, "skipped": {}}
    limit = ok["vmpeak_kb"] * 1024 + (512 << 20)  # well under the 1 GiB member
    out = _build_in_subprocess(bomb, tmp_path / "tfds_bomb", limit_bytes=limit)
    assert out["metadata"] == {"kept": 1, "skipped": {"too_large": 1}}
    assert out["maxrss_kb"] <= 1.5 * ok["maxrss_kb"], (out, ok)


# ==================================================================== the trainer's configuration
# Each case runs `python -m blip2_jax.main` (a few seconds each: the quick tier keeps four).
def _main(tmp_path, *overrides, config="configs/tiny/stage1.py", workdir=None, devices=1,
          limit_bytes=4 << 30):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"))
    workdir = str(tmp_path / "run") if workdir is None else str(workdir)
    cmd = [sys.executable, "-m", "blip2_jax.main", f"--config={ROOT / config}", f"--workdir={workdir}",
           f"--config.input.data_dir={tmp_path / 'tfds'}", *overrides]
    p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       preexec_fn=limit)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and len(errors) == 1, p.stderr[-3000:]
    assert p.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "parameters:" not in p.stderr  # nothing was built
    return errors[0]


def test_stage2_design_card_command_names_what_it_needs(tmp_path):
    line = _main(tmp_path, config="configs/stage2_opt.py", workdir=tmp_path / "runs" / "stage2")
    for flag in ("--config.init.stage1_workdir=", "--config.init.source", "--config.init.vision_dir=",
                 "--config.init.llm_dir="):
        assert flag in line
    assert not (tmp_path / "runs").exists()  # validation creates nothing
    (tmp_path / "s1" / "checkpoints").mkdir(parents=True)  # a workdir without any step
    line = _main(tmp_path, f"--config.init.stage1_workdir={tmp_path / 's1'}", config="configs/stage2_opt.py")
    assert "has none" in line


@pytest.mark.slow
def test_tower_directory_that_does_not_exist(tmp_path):
    (tmp_path / "s1" / "checkpoints" / "8").mkdir(parents=True)
    line = _main(tmp_path, f"--config.init.stage1_workdir={tmp_path / 's1'}",
                 f"--config.init.vision_dir={tmp_path / 'no_vit'}", config="configs/stage2_opt.py")
    assert "init.vision_dir" in line and "is not a directory" in line


@pytest.mark.parametrize("steps", ["-5", pytest.param("0", marks=pytest.mark.slow)])
def test_non_positive_total_steps(tmp_path, steps):
    line = _main(tmp_path, f"--config.total_steps={steps}")
    assert f"total_steps must be a positive integer, got {steps}" in line


@pytest.mark.parametrize("batch", ["0", pytest.param("-1", marks=pytest.mark.slow)])
def test_non_positive_batch(tmp_path, batch):
    assert f"input.batch_size must be a positive integer, got {batch}" in _main(
        tmp_path, f"--config.input.batch_size={batch}")


def test_huge_batch_is_refused_under_a_memory_limit(tmp_path):
    line = _main(tmp_path, "--config.input.batch_size=1000000000", limit_bytes=4 << 30)
    assert "input.batch_size 1000000000 is over 4096 per device on 1 device(s)" in line


@pytest.mark.slow
def test_batch_not_divisible_by_the_mesh(tmp_path):
    line = _main(tmp_path, "--config.input.batch_size=15", devices=2)
    assert "data x fsdp = 2" in line


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["(4,1,1)", "(0,1,1)"])
def test_mesh_that_does_not_fit_the_devices(tmp_path, shape):
    assert "--config.mesh_shape" in _main(tmp_path, f"--config.mesh_shape={shape}")


@pytest.mark.slow
def test_unknown_dataset(tmp_path):
    line = _main(tmp_path, "--config.input.dataset=laion_9000")
    assert "unknown dataset 'laion_9000'" in line and "image_text_pairs" in line


@pytest.mark.slow
def test_web_dataset_without_manual_dir(tmp_path):
    assert "--config.input.manual_dir" in _main(tmp_path, "--config.input.dataset=image_text_pairs")


@pytest.mark.slow
def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a directory" in _main(tmp_path, workdir=tmp_path / "afile")
    assert "is inside" in _main(tmp_path, workdir=tmp_path / "afile" / "run")


def _read_only_dir(path):
    """A directory this process cannot create files in (root: made immutable); None if impossible."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True).returncode:
        return None
    return path


@pytest.mark.slow
def test_read_only_workdir(tmp_path):
    ro = _read_only_dir(tmp_path / "ro")
    if ro is None:
        pytest.skip("cannot make a read-only directory here")
    try:
        assert "is not writable" in _main(tmp_path, workdir=ro / "run")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=False)
        ro.chmod(0o755)


@pytest.mark.slow
def test_dataset_error_after_validation_is_one_line(tmp_path):
    """A manual_dir that passes validation but holds no usable pair: the builder's error."""
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "00000.tar", "w") as tar:
        _add(tar, "0.jpg", link="/etc/passwd")
    p = subprocess.run(
        [sys.executable, "-m", "blip2_jax.main", f"--config={ROOT / 'configs/tiny/stage1.py'}",
         f"--workdir={tmp_path / 'run'}", f"--config.input.data_dir={tmp_path / 'tfds'}",
         "--config.input.dataset=image_text_pairs", f"--config.input.manual_dir={manual}"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.rstrip().splitlines()[-1].startswith("error: image_text_pairs: no usable pairs")
