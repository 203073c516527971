"""Hugging Face Hub ids (weights/hub.py), offline, against a cache laid out exactly as
huggingface_hub lays it out: models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> ->
../../blobs/<sha256>, refs/<branch or tag>}."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from PIL import Image

import blip2_jax
from blip2_jax.weights import hf, hub
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError, save_state_dict
from tests.conftest import GOLDEN, ROOT

COMMIT, TAGGED = "a" * 40, "b" * 40


def add_snapshot(cache, repo_id: str, source, commit: str, ref: str) -> str:
    """Files of `source` as a cached snapshot of `repo_id` at `commit`, named by `ref`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.startswith("reference"):
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return str(snap)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding blip2-test/tiny-opt (main) and blip2-test/tiny-itm (main: sharded, tag v1)."""
    cache = tmp_path / "hub"
    opt = add_snapshot(cache, "blip2-test/tiny-opt", GOLDEN / "blip2_opt", COMMIT, "main")
    sharded = tmp_path / "itm_sharded"
    shutil.copytree(GOLDEN / "blip2_itm", sharded)
    sd = {k: np.array(v) for k, v in LazyStateDict([str(sharded / "model.safetensors")]).items()}
    (sharded / "model.safetensors").unlink()
    save_state_dict(sd, str(sharded), max_shard_bytes=2**17)
    itm = add_snapshot(cache, "blip2-test/tiny-itm", sharded, COMMIT, "main")
    itm_v1 = add_snapshot(cache, "blip2-test/tiny-itm", GOLDEN / "blip2_itm", TAGGED, "v1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return {"dir": cache, "opt": opt, "itm": itm, "itm_v1": itm_v1}


def test_ids_resolve_to_cached_snapshots(cache):
    assert hub.resolve("blip2-test/tiny-opt") == cache["opt"]
    assert hub.resolve("blip2-test/tiny-itm") == cache["itm"]
    assert hub.resolve("blip2-test/tiny-itm", revision="v1") == cache["itm_v1"]
    assert hub.resolve("blip2-test/tiny-itm", revision=TAGGED) == cache["itm_v1"]


def test_symlinked_shards_in_the_cache_load(cache):
    """Snapshot files link into ../../blobs: inside the repository's cache folder, so allowed."""
    _, params = hf.load(hub.resolve("blip2-test/tiny-itm"))
    _, ref = hf.load(str(GOLDEN / "blip2_itm"))
    np.testing.assert_array_equal(params["qformer"]["query_tokens"], ref["qformer"]["query_tokens"])


def test_load_by_id_equals_load_by_directory(cache):
    image = np.asarray(Image.new("RGB", (40, 30), (200, 120, 40)))
    by_id = blip2_jax.load("blip2-test/tiny-opt")
    by_dir = blip2_jax.load(GOLDEN / "blip2_opt")
    assert by_id.directory == cache["opt"]
    assert by_id.generate_ids([image], max_new_tokens=5) == by_dir.generate_ids([image], max_new_tokens=5)


def test_not_cached_and_offline_is_one_line(cache):
    with pytest.raises(WeightsError) as e:
        hub.resolve("blip2-test/absent")
    msg = str(e.value)
    assert "\n" not in msg and msg == (
        f"blip2-test/absent: no such directory, and the Hugging Face Hub model is not cached in {cache['dir']} "
        "nor reachable (HF_HUB_OFFLINE is set); download it with `hf download blip2-test/absent` where the Hub "
        "is reachable (HF_HUB_CACHE or HF_HOME choose the cache), or pass a model directory")
    with pytest.raises(WeightsError, match=r"not cached in .*`hf download blip2-test/tiny-opt --revision v9`"):
        hub.resolve("blip2-test/tiny-opt", revision="v9")


def test_directories_win_and_other_names_pass_through(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blip2-test" / "tiny-opt").mkdir(parents=True)
    assert hub.resolve("blip2-test/tiny-opt") == "blip2-test/tiny-opt"  # a directory of that name wins
    with pytest.raises(WeightsError, match="revision='v1' applies to Hugging Face Hub ids, not directories"):
        hub.resolve("blip2-test/tiny-opt", revision="v1")
    for name in ("no/such/dir", "./x/y", "../x", "a--b/c"):
        assert hub.resolve(name) == name  # not an id: the loader reports "model directory not found"
    with pytest.raises(WeightsError, match="model directory not found: no/such/dir"):
        hf.read_config(hub.resolve("no/such/dir"))


@pytest.mark.slow
def test_cli_accepts_a_hub_id(tmp_path):
    """HF_HOME=<dir> puts the cache in <dir>/hub, as huggingface_hub does."""
    home = tmp_path / "hf_home"
    add_snapshot(home / "hub", "blip2-test/tiny-opt", GOLDEN / "blip2_opt", COMMIT, "main")
    Image.new("RGB", (40, 30), (200, 120, 40)).save(tmp_path / "a.png")
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "blip2_jax.generate", "--model", "blip2-test/tiny-opt",
                          "--image", str(tmp_path / "a.png"), "--max_new_tokens", "3", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"token_ids"' in run.stdout
