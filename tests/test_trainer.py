"""`python -m blip2_jax.main` end to end on the tiny configs: outputs, exact resume after kill -9,
a final save on SIGTERM, a halt on a non-finite loss, and stage 2 initialised from stage 1."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT

STEPS = 8


def _env():
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    return env


def _cmd(config, workdir, data_dir, *overrides):
    return [sys.executable, "-m", "blip2_jax.main", f"--config={ROOT / 'configs' / 'tiny' / config}",
            f"--workdir={workdir}", f"--config.input.data_dir={data_dir}", f"--config.total_steps={STEPS}",
            "--config.log_every=1", "--config.ckpt_every=3", *overrides]


def _run(*args, check=True):
    p = subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run's rows overwrite the killed run's


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("reference")
    _run("stage1.py", wd, data_dir)
    return wd


def test_two_steps_in_process(tmp_path):
    """The quick tier's trainer run: tiny stage 2 for two steps in this process (8 test
    devices on the data axis): finite losses, logged metrics, a checkpoint, config.json."""
    import runpy

    from blip2_jax import main
    config = runpy.run_path(str(ROOT / "configs" / "tiny" / "stage2_opt.py"))["get_config"]("")
    config.total_steps, config.log_every, config.ckpt_every = 2, 1, 2
    config.async_checkpointing = False
    config.input.update(dict(dataset="synthetic_shapes/tiny", data_dir=str(tmp_path / "tfds"), batch_size=8))
    last = main.train(config, str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and last["lm_tokens"] > 0
    assert sorted(_losses(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "lm"


@pytest.mark.slow
def test_outputs_of_a_run(reference):
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in losses.values())
    row = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("itc_loss", "itm_loss", "itg_loss", "lr", "grad_norm", "images_per_s", "eta_min"):
        assert key in row
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == STEPS
    assert json.loads((reference / "config.json").read_text())["task"] == "stage1"


@pytest.mark.slow
def test_resume_after_kill_is_exact(reference, tmp_path, data_dir):
    proc = subprocess.Popen(_cmd("stage1.py", tmp_path, data_dir), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "checkpoints" / "3").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else 0
    assert killed_at < STEPS
    _run("stage1.py", tmp_path, data_dir)
    want, got = _losses(reference), _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.slow
def test_sigterm_saves_and_resumes(reference, tmp_path, data_dir):
    proc = subprocess.Popen(_cmd("stage1.py", tmp_path, data_dir, "--config.ckpt_every=100"), cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and max(_losses(tmp_path), default=0) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    stopped_at = max(_losses(tmp_path))
    assert saved[-1] == stopped_at < STEPS  # the final save is at the step where it stopped
    _run("stage1.py", tmp_path, data_dir, "--config.ckpt_every=100")
    want, got = _losses(reference), _losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)],
                               rtol=1e-6)


@pytest.mark.slow
def test_non_finite_loss_halts_and_keeps_checkpoints(tmp_path, data_dir):
    p = _run("stage1.py", tmp_path, data_dir, "--config.optim.peak_lr=1e12", "--config.optim.warmup_steps=0",
             check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "non-finite loss" in p.stderr.splitlines()[-1]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_stage2_from_stage1_workdir(reference, tmp_path, data_dir):
    import importlib.util

    import orbax.checkpoint as ocp

    from blip2_jax import sharding
    from blip2_jax.models import build
    from blip2_jax.weights import init

    spec = importlib.util.spec_from_file_location("c", ROOT / "configs" / "tiny" / "stage2_opt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.init.source, config.init.stage1_workdir = "stage1", str(reference)
    model, cfg = build.build_model(config.model)
    abstract = sharding.unbox(build.abstract_params(model, cfg))
    loaded, _ = init.load_sources(cfg, config, abstract)
    stage1 = ocp.StandardCheckpointer().restore(reference / "checkpoints" / str(STEPS) / "state")["params"]
    # the whole query path of the Q-Former and ln_vision come from stage 1 ...
    flat_loaded, flat_s1 = init._flatten(loaded["qformer"]), init._flatten(stage1["qformer"])
    assert set(flat_loaded) == set(init._flatten(abstract["qformer"]))
    for path, value in flat_loaded.items():
        np.testing.assert_array_equal(value, flat_s1[path])
    np.testing.assert_array_equal(loaded["vision_model"]["post_layernorm"]["scale"],
                                  stage1["vision_model"]["post_layernorm"]["scale"])
    assert "language_projection" not in loaded  # ... the projection starts fresh
    _run("stage2_opt.py", tmp_path, data_dir, "--config.init.source=stage1",
         f"--config.init.stage1_workdir={reference}")
    assert sorted(_losses(tmp_path)) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_bad_override_is_one_line_error(tmp_path, data_dir):
    p = _run("stage1.py", tmp_path, data_dir, "--config.optim.not_a_field=1", check=False)
    assert p.returncode != 0
    assert "not_a_field" in p.stderr
