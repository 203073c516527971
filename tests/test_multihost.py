"""Two processes x 4 CPU devices on 127.0.0.1 (`jax.distributed` with gloo collectives) run
`python -m blip2_jax.main`, checked against one process x 8 devices (this test process):

- the logged losses of tiny stage 1 and stage 2 equal those of the same global batches (each
  process's shard `[process_index::2]` of the data, process 0's rows first) on 8 local devices;
- the checkpoint both processes wrote restores here, in one process, on another mesh;
- SIGTERM to one process makes both stop at the same step after one final save, and the
  restarted job's losses equal the uninterrupted ones.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from blip2_jax import checkpoint as ckpt_lib
from blip2_jax import main, sharding
from blip2_jax.data import pipeline
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # minutes of CPU: left out of ./run_tests.sh --fast

STEPS = 3          # stage 2
MESH = (2, 4, 1)   # data x fsdp: batches and parameters are both split across the processes
NPROC = 2


def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / "tiny" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _env():
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONUNBUFFERED="1")
    return env


def _start(config, workdir, data_dir, steps, *overrides):
    """Starts the NPROC processes of one job; returns their Popen objects (stderr to files)."""
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(NPROC):
        cmd = [sys.executable, "-m", "blip2_jax.main", f"--config={ROOT / 'configs' / 'tiny' / config}",
               f"--workdir={workdir}", f"--config.input.data_dir={data_dir}", f"--config.total_steps={steps}",
               "--config.log_every=1", f"--config.mesh_shape={MESH}",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               f"--config.distributed.num_processes={NPROC}", f"--config.distributed.process_id={i}",
               *overrides]
        err = open(workdir / f"stderr_{i}.txt", "a")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err))
    return procs


def _stderr(workdir, i):
    return (workdir / f"stderr_{i}.txt").read_text()


def _wait(procs, workdir, timeout=400):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited with {code}:\n{_stderr(workdir, i)[-3000:]}"


def _run(*args):
    workdir = args[1]
    _wait(_start(*args), workdir)


def _losses(workdir) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run's rows overwrite the stopped run's


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------ one process x 8 devices
def _reference(name: str, data_dir, steps: int):
    """Losses of main's loop on 8 local devices, fed the global batches two processes assemble."""
    config = _config(name)
    config.input.data_dir = str(data_dir)
    mesh = sharding.make_mesh(MESH)
    with sharding.use(mesh):
        _, _, task, state, frozen, schedule = main.create_state(config, mesh)
        step_fn = jax.jit(main.make_train_step(task, schedule))
        shards = [pipeline.make_iterator(config.input, process_index=i, process_count=NPROC)
                  for i in range(NPROC)]
        rng0, losses, seen = jax.random.key(int(config.seed)), {}, [set() for _ in shards]
        for step in range(steps):
            local = [next(it) for it in shards]
            for s, b in zip(seen, local):
                s.update(b["image_id"].tolist())
            batch = {k: np.concatenate([b[k] for b in local]) for k in task.batch_keys}
            state, metrics = step_fn(state, frozen, pipeline.make_global_batch(batch, mesh),
                                     jax.random.fold_in(rng0, step))
            losses[step + 1] = float(metrics["loss"])
        for it in shards:
            it.close()
    assert not seen[0] & seen[1]  # the two processes' shards are disjoint
    return losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    config = _config("stage1")
    config.input.data_dir = str(path)
    pipeline.load_source(config.input)  # built once here, not by two processes at once
    return path


@pytest.fixture(scope="module")
def stage1_job(tmp_path_factory, data_dir):
    """A stage-1 job stopped by SIGTERM to process 1 once step 2 is logged, then restarted
    for two more steps. Returns (workdir, the step both processes stopped at)."""
    workdir = tmp_path_factory.mktemp("stage1_2proc")
    procs = _start("stage1.py", workdir, data_dir, 1000, "--config.ckpt_every=100")
    t0 = time.time()
    while max(_losses(workdir), default=0) < 2:
        if any(p.poll() is not None for p in procs) or time.time() - t0 > 400:
            for p in procs:
                p.kill()
            raise AssertionError("the job ended before step 2:\n" + _stderr(workdir, 1)[-3000:])
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    _wait(procs, workdir)  # a missed signal would run 1000 steps and time out here
    stops = [re.findall(r"stopping on signal at step (\d+)", _stderr(workdir, i)) for i in range(NPROC)]
    assert all(len(s) == 1 for s in stops), stops
    stopped_at = int(stops[0][0])
    assert all(int(s[0]) == stopped_at for s in stops)  # both processes stopped at one step ...
    assert _saved_steps(workdir)[-1] == stopped_at      # ... and saved it
    assert max(_losses(workdir)) == stopped_at
    _run("stage1.py", workdir, data_dir, stopped_at + 2, "--config.ckpt_every=100")
    assert f"resumed from step {stopped_at}" in _stderr(workdir, 1)
    return workdir, stopped_at


def _assert_losses_equal(got, want, steps):
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], [want[s] for s in range(1, steps + 1)],
                               rtol=1e-5)


def test_stage1_stopped_by_sigterm_and_resumed_equals_one_process(stage1_job, data_dir):
    workdir, stopped_at = stage1_job
    steps = stopped_at + 2
    _assert_losses_equal(_losses(workdir), _reference("stage1", data_dir, steps), steps)
    assert _saved_steps(workdir)[-2:] == [stopped_at, steps]
    # each process's data-iterator state is in the checkpoint
    data = json.loads((workdir / "checkpoints" / str(steps) / "data" / "metadata").read_text())
    assert len(data["per_process"]) == NPROC


def test_stage2_two_processes_equal_one(tmp_path, data_dir):
    _run("stage2_opt.py", tmp_path, data_dir, STEPS, "--config.ckpt_every=100")
    _assert_losses_equal(_losses(tmp_path), _reference("stage2_opt", data_dir, STEPS), STEPS)


def test_checkpoint_restores_in_one_process_on_another_mesh(stage1_job):
    workdir, stopped_at = stage1_job
    config = _config("stage1")
    mesh = sharding.make_mesh((1, 8, 1))  # the writers used (2, 4, 1) over two processes
    with sharding.use(mesh):
        _, _, _, state, _, _ = main.create_state(config, mesh)
        abstract = ckpt_lib.abstract_like(state)
        one_device = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), abstract)
        ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
        step, restored, data_state = ckpt.restore(abstract)
        _, whole, _ = ckpt.restore(one_device)
        ckpt.close()
    assert step == stopped_at + 2 and int(restored.step) == step
    assert len(data_state["per_process"]) == NPROC
    leaves = jax.tree.leaves(restored)
    assert all(x.sharding.mesh.shape == mesh.shape for x in leaves)
    assert any("fsdp" in str(x.sharding.spec) and not x.is_fully_replicated for x in leaves)
    # resharded and whole restores hold the same numbers (the resumed losses show that they
    # are the right ones)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(whole))


def test_config_json_on_gcs_goes_through_fsspec(monkeypatch):
    """gs:// workdirs: the trainer's own files go through etils.epath -> fsspec's "gcs" protocol
    (gcsfs on a TPU VM; an in-memory stand-in here). Checkpoint arrays go through tensorstore's
    own GCS driver."""
    import importlib

    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]  # its own store, not memory://'s

    registry = importlib.import_module("fsspec.registry")._registry
    for p in FakeGCS.protocol:
        monkeypatch.setitem(registry, p, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        main._write_config(_config("stage1"), "gs://bucket/run")
        assert json.loads(FakeGCS().cat("gs://bucket/run/config.json"))["task"] == "stage1"
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()
