"""Lean loading (weights/placement.py): one dtype policy whatever the files store, sharded and
scanned placement equal to the plain numpy load, and peak host memory within 1.1x the placed
weights (measured in a subprocess on a checkpoint of a few hundred MB)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding

from blip2_jax import serving, sharding
from blip2_jax.models import build
from blip2_jax.models.blip2 import Blip2
from blip2_jax.models.configs import Blip2Config, OPTConfig, QFormerConfig, VisionConfig
from blip2_jax.weights import hf, placement
from blip2_jax.weights.safetensors_io import LazyStateDict, save_state_dict
from tests.conftest import GOLDEN, ROOT


def stored_as(tmp_path, case: str, dtype) -> str:
    """The golden directory with every tensor stored in `dtype` (as released checkpoints are)."""
    d = tmp_path / f"{case}_{np.dtype(dtype).name}"
    shutil.copytree(GOLDEN / case, d)
    sd = {k: np.asarray(v).astype(dtype) for k, v in LazyStateDict([str(d / "model.safetensors")]).items()}
    (d / "model.safetensors").unlink()
    save_state_dict(sd, str(d), max_shard_bytes=2**17)  # sharded, as released
    return str(d)


def dtypes(params) -> dict:
    return {"/".join(p): np.dtype(x.dtype).name for p, x in placement.flatten(jax.tree.map(lambda a: a, params)).items()}


def expected_dtype(path: str, dtype: str) -> str:
    """The policy, spelled out: frozen towers' kernels/embeddings in `dtype`, the rest float32."""
    frozen = path.startswith("language_model/") or (path.startswith("vision_model/")
                                                    and not path.startswith("vision_model/post_layernorm"))
    vector = path.endswith(("/bias", "/scale")) or "norm" in path
    return dtype if frozen and not vector else "float32"


@pytest.mark.parametrize("case", ["blip2_opt", "blip2_t5"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_policy_does_not_depend_on_the_files(tmp_path, case, dtype):
    want = None
    for stored in (np.float32, ml_dtypes.bfloat16, np.float16):
        directory = str(GOLDEN / case) if stored is np.float32 else stored_as(tmp_path, case, stored)
        got = dtypes(serving.Predictor.from_dir(directory, dtype=dtype).params)
        want = want or got
        assert got == want, (np.dtype(stored).name, {k: (v, want[k]) for k, v in got.items() if want[k] != v})
    assert all(v == expected_dtype(k, dtype) for k, v in want.items()), want
    assert want["qformer/query_tokens"] == "float32" and want["vision_model/post_layernorm/scale"] == "float32"
    assert any(v == dtype for k, v in want.items() if k.startswith("language_model/"))


def test_half_precision_files_load_exactly(tmp_path):
    """bfloat16 files loaded as float32: every value is the stored bfloat16 value, exactly."""
    d = stored_as(tmp_path, "blip2_opt", ml_dtypes.bfloat16)
    _, p16 = hf.load(d, frozen_dtype=np.float32)
    _, p32 = hf.load(str(GOLDEN / "blip2_opt"))
    for (path, a), b in zip(placement.flatten(p16).items(), placement.flatten(p32).values()):
        assert a.dtype == np.float32, path
        np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=str(path))
    _, stored = hf.load(d)  # no dtype: as stored
    assert {x.dtype for x in jax.tree.leaves(stored)} == {np.dtype(ml_dtypes.bfloat16)}


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_placement_equals_numpy_load(scan):
    mesh = sharding.make_mesh((1, 4, 2))
    pred = serving.Predictor.from_dir(GOLDEN / "blip2_opt", dtype="bfloat16", mesh=mesh, scan_layers=scan)
    _, ref = hf.load(str(GOLDEN / "blip2_opt"), frozen_dtype=jnp.bfloat16, scan_layers=scan)
    with sharding.use(mesh):
        want = sharding.param_shardings(build.abstract_params(pred.model, pred.config), mesh)
    flat_sh = placement.flatten(want)
    for path, x in placement.flatten(pred.params).items():
        assert x.sharding == flat_sh[path], path
        np.testing.assert_array_equal(np.asarray(x), placement.flatten(ref)[path], err_msg=str(path))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(pred.params))


def test_weights_are_copied_without_numpy_asking_for_huge_pages():
    from numpy._core import multiarray

    def state():  # numpy's madvise(MADV_HUGEPAGE) switch, read without changing it
        previous = multiarray._set_madvise_hugepage(False)
        multiarray._set_madvise_hugepage(previous)
        return previous

    seen = []

    def dtype_of(path, leaf):
        seen.append(state())
        return np.float32

    before = multiarray._set_madvise_hugepage(True)
    try:
        tree = {"a": np.ones((4, 4), np.float32)}
        placement.materialize(tree, dtype_of)
        placement.place(tree, {"a": jax.sharding.SingleDeviceSharding(jax.devices()[0])}, dtype_of)
        assert seen == [False, False] and state() is True    # off while copying, restored after
    finally:
        multiarray._set_madvise_hugepage(before)


def test_host_copy_is_aligned_and_transposes_exactly():
    a = np.arange(1200 * 700, dtype=np.float32).reshape(1200, 700)
    out = placement.host_copy(a.T, ml_dtypes.bfloat16)
    assert out.ctypes.data % 64 == 0 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a.T.astype(ml_dtypes.bfloat16))


def _first_bytes(bufs, n: int) -> list:
    """The leading `n` bytes of a list of buffers, as buffers (a short read's target)."""
    out = []
    for b in bufs:
        b = memoryview(b).cast("B")
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(out[-1])
    return out


def test_views_of_a_file_are_read_with_pread_exactly(tmp_path, monkeypatch):
    """Copies out of a safetensors file go through `pread` (not the map's page faults), in
    parts and stages smaller than the tensors here, and give numpy's own copy in every case:
    as stored, cast, transposed, a band of columns; a truncated file is a one-line error."""
    from blip2_jax.weights import safetensors_io
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 260)).astype(ml_dtypes.bfloat16)
    save_state_dict({"a": np.arange(7, dtype=np.float32), "w": w}, str(tmp_path))
    sd = LazyStateDict([str(tmp_path / "model.safetensors")])
    reads = []
    real = safetensors_io.read_span
    monkeypatch.setattr(safetensors_io, "read_span", lambda fm, off, out: (reads.append(out.nbytes), real(fm, off, out)))
    monkeypatch.setattr(safetensors_io, "_MIN_PART", 4096)
    monkeypatch.setattr(placement, "_STAGE_BYTES", 40_000)  # a cast in 4 stages, a transpose in one
    v = sd["w"]
    cases = {"stored": (v, v.dtype), "cast": (v, np.float32), "transposed": (v.T, np.float32),
             "band": (v[:, 130:], v.dtype), "rows": (v[17:42], v.dtype)}
    for name, (src, dt) in cases.items():
        reads.clear()
        np.testing.assert_array_equal(placement.host_copy(src, dt), np.array(src).astype(dt), err_msg=name)
        assert sum(reads) >= src.nbytes, (name, reads)
    monkeypatch.setattr(safetensors_io, "_IOV_MAX", 6)  # bands read 3 rows per preadv
    scattered = []
    real_bands = safetensors_io.read_rows_into_bands
    monkeypatch.setattr(safetensors_io, "read_rows_into_bands", lambda fm, off, out: (scattered.append(out.shape), real_bands(fm, off, out)))
    banded = placement.place_banded(v, jax.sharding.SingleDeviceSharding(jax.devices()[0]), v.dtype, 2, lambda a: None)
    assert scattered == [(2, 300, 130)]  # straight from the file into the bands
    np.testing.assert_array_equal(np.asarray(banded.blocks), np.stack([np.array(v[:, :130]), np.array(v[:, 130:])]))
    real_preadv = os.preadv  # short reads (1000 bytes, not a whole band row) go on where they stop
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real_preadv(fd, _first_bytes(bufs, 1000), off))
    short = placement.place_banded(v, jax.sharding.SingleDeviceSharding(jax.devices()[0]), v.dtype, 2, lambda a: None)
    np.testing.assert_array_equal(np.asarray(short.blocks), np.asarray(banded.blocks))
    monkeypatch.setattr(os, "preadv", real_preadv)
    # split by output channel over two devices: each holds its rows' bands; other splits refused
    mesh = sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2])
    P = jax.sharding.PartitionSpec
    split = placement.place_banded(v, NamedSharding(mesh, P("tensor", None)), v.dtype, 2, lambda a: None)
    assert split.blocks.sharding.spec == P(None, "tensor", None)
    np.testing.assert_array_equal(np.asarray(split.blocks), np.asarray(banded.blocks))
    for shard in split.blocks.addressable_shards:
        rows = slice(0, 150) if shard.device == jax.devices()[0] else slice(150, 300)
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(banded.blocks)[:, rows])
    with pytest.raises(ValueError, match="split by output channel only"):
        placement.place_banded(v, NamedSharding(mesh, P(None, "tensor")), v.dtype, 2, lambda a: None)
    with open(tmp_path / "model.safetensors", "r+b") as f:  # cut short after the header was read
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 1000)
    with pytest.raises(safetensors_io.WeightsError, match="truncated while loading"):
        placement.host_copy(v, v.dtype)


def test_leaves_split_by_input_columns_are_read_once(tmp_path, monkeypatch):
    """A leaf split across devices by its input columns only (a row-parallel kernel on a
    (1, 1, k) mesh) is read from its file once, each row scattered into every device's columns,
    and equals the plain layout; a split of rows too, or a cast, keeps the per-device copy."""
    from blip2_jax.weights import safetensors_io
    rng = np.random.default_rng(1)
    w = [rng.standard_normal((12, 40)).astype(ml_dtypes.bfloat16) for _ in range(2)]
    save_state_dict({"l0": w[0], "l1": w[1]}, str(tmp_path))
    sd = LazyStateDict([str(tmp_path / "model.safetensors")])
    P = jax.sharding.PartitionSpec
    mesh = sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2])
    tree = {"stack": placement.LayerStack((sd["l0"], sd["l1"])), "one": sd["l1"]}
    shardings = {"stack": NamedSharding(mesh, P(None, None, "tensor")), "one": NamedSharding(mesh, P(None, "tensor"))}
    scattered = []
    real = safetensors_io.read_rows_into_bands
    monkeypatch.setattr(safetensors_io, "read_rows_into_bands",
                        lambda fm, off, bands: (scattered.append(len(bands)), real(fm, off, bands)))
    placed = placement.place(tree, shardings, lambda path, leaf: leaf.dtype)
    assert scattered == [2, 2, 2]  # one pass per layer, into both devices' columns
    for name, want in (("stack", np.stack(w)), ("one", w[1])):
        assert placed[name].sharding == shardings[name]
        np.testing.assert_array_equal(np.asarray(placed[name]), want)
        for shard in placed[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    four = sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4])
    replicated = placement.place({"one": sd["l1"]}, {"one": NamedSharding(four, P(None, "tensor"))},
                                 lambda path, leaf: leaf.dtype)["one"]  # two replicas of each part
    assert scattered == [2, 2, 2, 2]
    pointers = {s.data.unsafe_buffer_pointer() for s in replicated.addressable_shards}
    assert len(pointers) == 4  # each device its own buffer
    for shard in replicated.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), w[1][shard.index])
    assert placement._column_shares(sd["l0"], NamedSharding(four, P("fsdp", "tensor")), w[0].dtype) is None
    assert placement._column_shares(sd["l0"], shardings["one"], np.float32) is None
    cast = placement.place({"one": sd["l0"]}, {"one": shardings["one"]}, lambda path, leaf: np.float32)
    np.testing.assert_array_equal(np.asarray(cast["one"]), w[0].astype(np.float32))
    assert scattered == [2, 2, 2, 2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_reading_in_parts_works_in_a_forked_child(tmp_path, monkeypatch):
    """A process forked after loading (a data worker) reads with threads of its own: the parent's
    reading threads do not exist in the child, whose reads waited on them for ever before."""
    import time
    import warnings

    from blip2_jax.weights import safetensors_io
    monkeypatch.setattr(safetensors_io, "_MIN_PART", 4096)
    w = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    save_state_dict({"w": w}, str(tmp_path))
    sd = LazyStateDict([str(tmp_path / "model.safetensors")])
    np.testing.assert_array_equal(placement.host_copy(sd["w"], np.float32), w)  # the parent's threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: what is tested
        pid = os.fork()
    if pid == 0:
        try:
            ok = bool((placement.host_copy(sd["w"], np.float32) == w).all())
        finally:
            os._exit(0 if ok else 3)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's read did not finish in 60 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0


# ----------------------------------------------------------------------------------------------
# Peak host memory
# ----------------------------------------------------------------------------------------------
MEASURING = """
    import re

    def status_mib(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

    def start_measuring():  # the peak so far (compiling, reading headers) -> now; returns now's RSS
        open("/proc/self/clear_refs", "w").write("5")
        return status_mib("VmRSS")
"""  # the start of each memory-measuring script below (and tests/test_quant.py's)

MEASURE = MEASURING + """
    import json, sys, time
    import jax
    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.weights import hf

    directory, dtype, scan = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    jax.devices()
    ckpt = hf.read_lazy(directory, scan_layers=scan)
    dt = build.dtype(dtype)
    model = Blip2(ckpt.config, vision_dtype=dt, text_dtype=dt, scan_layers=scan)
    mesh = sharding.single_device_mesh()
    with sharding.use(mesh):
        shardings = sharding.param_shardings(build.abstract_params(model, ckpt.config), mesh)
    before = start_measuring()
    start = time.perf_counter()
    params = jax.block_until_ready(ckpt.place(shardings, dt))
    seconds = time.perf_counter() - start
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    print(json.dumps({"before": before, "peak": status_mib("VmHWM"), "weights": weights, "seconds": seconds}))
"""


def write_checkpoint(directory) -> int:
    """A BLIP-2 of ~320 MB in float32 (largest tensor under 3 % of it), 4 shards."""
    cfg = Blip2Config(
        vision=VisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
        qformer=QFormerConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                              encoder_hidden_size=512),
        text=OPTConfig(vocab_size=4096, hidden_size=768, ffn_dim=3072, num_hidden_layers=8, num_attention_heads=12,
                       max_position_embeddings=512, word_embed_proj_dim=768, bos_token_id=2, eos_token_id=2,
                       pad_token_id=1))
    abstract = sharding.unbox(build.abstract_params(Blip2(cfg, scan_layers=False), cfg))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02, abstract)
    hf.save(str(directory), cfg, params, max_shard_bytes=90 * 2**20)
    return sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_peak_host_memory_within_1_1x_the_placed_weights(tmp_path):
    nbytes = write_checkpoint(tmp_path / "ckpt")
    assert nbytes > 250 * 2**20
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", OPENBLAS_NUM_THREADS="1")
    only_jax = subprocess.run([sys.executable, "-c", "import jax, re; jax.devices(); print(int(re.search("
                               "r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)"],
                              capture_output=True, text=True, env=env, check=True)
    for dtype, scan in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(MEASURE), str(tmp_path / "ckpt"), dtype,
                              str(int(scan))], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        m = json.loads(run.stdout.strip().splitlines()[-1])
        # the weights in their target dtypes (bfloat16: the Q-Former, norms and biases stay float32)
        assert m["weights"] * 2**20 == nbytes if dtype == "float32" else 0.5 < m["weights"] * 2**20 / nbytes < 0.6
        grown = m["peak"] - m["before"]
        print(f"{dtype} scan={scan}: weights {m['weights']:.0f} MiB, peak grew {grown:.0f} MiB "
              f"({grown / m['weights']:.3f}x) in {m['seconds']:.2f} s; peak {m['peak']:.0f} MiB vs "
              f"{float(only_jax.stdout):.0f} MiB for a process that only imports jax")
        assert grown <= 1.1 * m["weights"], (dtype, scan, m)


# ----------------------------------------------------------------------------------------------
# The trainer's initialisation from a transformers directory (weights/init.py, source "hf")
# ----------------------------------------------------------------------------------------------
def trainer_init_config(directory: str, frozen_dtype: str = "bfloat16"):
    """What `init_params` reads of a trainer config: start from `directory`, towers frozen."""
    import ml_collections

    from blip2_jax import train_state
    return ml_collections.ConfigDict({
        "seed": 0, "frozen_patterns": list(train_state.DEFAULT_FROZEN_PATTERNS),
        "init": {"source": "hf", "hf_dir": directory},
        "model": {"frozen_param_dtype": frozen_dtype, "quantize_frozen": "none"}})


@pytest.mark.parametrize("stored", [np.float32, ml_dtypes.bfloat16])
def test_trainer_init_places_frozen_towers_in_their_final_dtype(tmp_path, stored):
    """Frozen leaves placed directly in the trainer's dtype give exactly what placing in float32
    and casting afterwards gives (the old path, which held a float32 copy of both towers)."""
    from blip2_jax import train_state
    from blip2_jax.weights import init
    directory = str(GOLDEN / "blip2_opt") if stored is np.float32 else stored_as(tmp_path, "blip2_opt", stored)
    cfg, _ = hf.read_config(directory)
    model = Blip2(cfg, scan_layers=True)
    config = trainer_init_config(directory)
    mesh = sharding.make_mesh((1, 4, 2))
    with sharding.use(mesh):
        direct = init.init_params(model, cfg, config, mesh, frozen_cast=True)
        later = init.init_params(model, cfg, config, mesh)
    after_split = train_state.split_and_cast(direct, config)
    want = train_state.split_and_cast(later, config)
    for got, ref in zip(after_split, want):
        flat_got, flat_ref = placement.flatten(got), placement.flatten(ref)
        assert flat_got.keys() == flat_ref.keys()
        for path, x in flat_got.items():
            assert x.dtype == flat_ref[path].dtype and x.sharding == flat_ref[path].sharding, path
            np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_ref[path]), err_msg=str(path))
    # nothing is cast again after placing: split_and_cast hands back the placed arrays themselves
    flat_direct = placement.flatten(direct)
    frozen = placement.flatten(after_split[1])
    assert frozen and all(x is flat_direct[p] for p, x in frozen.items())
    assert {np.dtype(x.dtype).name for p, x in frozen.items() if p[-1] == "kernel"} == {"bfloat16"}


TRAINER_MEASURE = MEASURING + """
    import json, sys
    import jax
    from blip2_jax import sharding, train_state
    from blip2_jax.models import build
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.weights import hf, init
    from tests.test_placement import trainer_init_config

    directory = sys.argv[1]
    jax.devices()
    cfg, _ = hf.read_config(directory)
    model = Blip2(cfg, scan_layers=False)
    config = trainer_init_config(directory)
    mesh = sharding.single_device_mesh()
    with sharding.use(mesh):
        build.abstract_params(model, cfg)  # tracing the model's shapes (~30 MB, freed): not weights
        before = start_measuring()
        params = jax.block_until_ready(init.init_params(model, cfg, config, mesh, frozen_cast=True))
    trainable, frozen = train_state.split_and_cast(params, config)
    weights = sum(x.nbytes for x in jax.tree.leaves((trainable, frozen))) / 2**20
    print(json.dumps({"before": before, "peak": status_mib("VmHWM"), "weights": weights}))
"""


@pytest.mark.slow
def test_trainer_init_peak_host_memory_within_1_1x_its_weights(tmp_path):
    """The trainer's start from a float32 transformers directory with bfloat16 frozen towers: peak
    host memory grows by at most 1.1x the placed weights (a float32 copy of the towers would be
    about 1.9x)."""
    write_checkpoint(tmp_path / "ckpt")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", OPENBLAS_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(TRAINER_MEASURE), str(tmp_path / "ckpt")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["before"]
    print(f"trainer init: weights {m['weights']:.0f} MiB, peak grew {grown:.0f} MiB ({grown / m['weights']:.3f}x)")
    assert grown <= 1.1 * m["weights"], m
