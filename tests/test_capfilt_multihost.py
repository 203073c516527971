"""CapFilt as a plain multi-host JAX job: 2 processes x 4 CPU devices (jax.distributed on
localhost) split the shards, are killed with SIGKILL after the first shards are committed,
resume with --if_exists resume, and end with the same dataset as one process x 8 devices
(this test process): every image once, finished shards never rewritten, each shard written by
the process it belongs to (shard mod 2)."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import portpicker
import pytest
from PIL import Image

from blip2_jax.data import builders
from tests.conftest import GOLDEN, ROOT
from tests.test_capfilt import read_output, run_cli, same_records

pytestmark = pytest.mark.slow  # minutes of CPU: left out of ./run_tests.sh --fast

IMAGES = 16
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), JAX_PLATFORMS="cpu",
           PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=4")


@pytest.fixture(scope="module")
def web_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    (root / "raw").mkdir()
    with tarfile.open(root / "raw" / "00000.tar", "w") as tar:
        for k in range(IMAGES):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(k).integers(0, 255, (36, 44, 3), np.uint8)).save(buf, "PNG")
            for ext, data in ((".png", buf.getvalue()), (".txt", f"picture number {k}".encode())):
                info = tarfile.TarInfo(f"k{k:03d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    builders.prepare_dataset("image_text_pairs", root / "tfds", root / "raw")
    return root / "tfds"


def cmd(web_pairs, out, *extra):
    return [sys.executable, "-m", "blip2_jax.capfilt", "--engine", "jax", "--input", "image_text_pairs:train",
            "--input_data_dir", str(web_pairs), "--captioner", str(GOLDEN / "blip2_opt"),
            "--scorer", str(GOLDEN / "blip2_itm"), "--output_dir", str(out), "--num_captions", "3",
            "--max_new_tokens", "5", "--batch_size", "2", "--shard_size", "1", "--workers", "2", "--no_progress",
            *extra]


def start(web_pairs, out, *extra):
    port = portpicker.pick_unused_port()
    return [subprocess.Popen(cmd(web_pairs, out, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                 "--process_id", str(i), *extra),
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def finished(meta) -> dict[str, tuple[int, int]]:
    """Finished shards' files -> (inode, mtime): a rewritten file would change both."""
    version = meta.parent
    out = {}
    for m in meta.glob("part-*.done.json"):
        shard = int(m.name[5:10])
        data = next(version.glob(f"capfilt_pairs-train.array_record-{shard:05d}-of-*"))
        out.update({p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (m, data)})
    return out


def test_two_processes_split_resume_and_match_one_process(web_pairs, tmp_path):
    ref = tmp_path / "ref"
    code, _ = run_cli(web_pairs, ref, "--engine", "jax", "--batch_size", "2", "--shard_size", "1")
    assert code == 0
    out = tmp_path / "out"
    meta = out / "capfilt_pairs" / "1.0.0" / "capfilt"
    procs = start(web_pairs, out)
    t0 = time.time()
    while not (meta.exists() and list(meta.glob("part-*.done.json"))):
        assert all(p.poll() is None for p in procs), "a process ended before finishing a shard: " + \
            "".join(p.communicate()[1][-2000:] for p in procs)
        assert time.time() - t0 < 400, "no shard finished in time"
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(30)
    before = finished(meta)
    n_before = len(before) // 2
    assert 0 < n_before < IMAGES, "the run was not killed mid-way"
    refused = subprocess.run(cmd(web_pairs, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--if_exists resume" in refused.stderr
    procs = start(web_pairs, out, "--if_exists", "resume")
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(o.splitlines()[-1]) for o, _ in outs]
    assert [s["process"] for s in summaries] == [0, 1]
    assert sum(s["shards"] for s in summaries) == IMAGES - n_before
    assert summaries[0]["complete"] and summaries[0]["totals"]["images"] == IMAGES
    after = finished(meta)
    assert {k: after[k] for k in before} == before  # finished shards were not written again
    assert not list(meta.parent.glob("**/*.tmp"))
    markers = [json.loads(p.read_text()) for p in meta.glob("part-*.done.json")]
    assert sorted(m["shard"] for m in markers) == list(range(IMAGES))
    assert all(m["process"] == m["shard"] % 2 for m in markers)
    same_records(read_output(out), read_output(ref))
