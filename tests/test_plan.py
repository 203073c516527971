"""`blip2_jax.plan` on a CPU "topology" (8 local devices; a TPU one where libtpu is installed):
per-device byte counts follow the shardings, remat and batch change the kept activations,
the search finds a setting that fits, and the command line prints the plan."""
import importlib.util
import subprocess
import sys

import jax
import numpy as np
import pytest

from blip2_jax import plan as plan_lib
from blip2_jax import sharding, train_state
from blip2_jax.models import build
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # minutes of CPU: left out of ./run_tests.sh --fast

HBM = 4 * plan_lib.GIB  # far more than the tiny model needs


def _config(name="stage1", **overrides):
    """A tiny config; overrides by dotted path with "__" for ".", e.g. input__batch_size=32."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / "tiny" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c


@pytest.fixture(scope="module")
def cpu8():
    devices, kind, hbm = plan_lib.topology_devices("cpu:8")
    assert kind == "cpu" and hbm is None and len(devices) == 8
    return devices


@pytest.fixture(scope="module")
def data_parallel(cpu8):
    return plan_lib.plan(_config(mesh_shape=(8, 1, 1)), cpu8, "cpu", HBM, "cpu:8")


@pytest.fixture(scope="module")
def fsdp(cpu8):
    return plan_lib.plan(_config(mesh_shape=(1, 8, 1)), cpu8, "cpu", HBM, "cpu:8")


def _trainable_param_bytes():
    model, cfg = build.build_model(_config().model)
    params = sharding.unbox(build.abstract_params(model, cfg))
    trainable, _ = train_state.split_params(params, list(_config().frozen_patterns))
    return train_state.tree_bytes(trainable)


def test_replicated_bytes_are_the_whole_trainable_tree(data_parallel):
    p = data_parallel
    assert p.fits and p.compiled and p.mesh == (8, 1, 1) and p.devices == 8
    assert p.trainable_bytes == _trainable_param_bytes()  # float32, on every device
    # Adam: two moments per trainable parameter, plus a few counters
    assert 2 * p.trainable_bytes <= p.optimizer_bytes < 2 * p.trainable_bytes + 1024
    assert p.frozen_bytes > 0 and p.activation_bytes > 0 and p.temp_bytes > 0
    assert p.flops > 0


def test_fsdp_splits_parameters_and_optimizer_state(data_parallel, fsdp):
    # every big matrix has an "embed" axis on fsdp: what is left whole is biases and norms
    assert fsdp.trainable_bytes < data_parallel.trainable_bytes / 4
    assert fsdp.optimizer_bytes < data_parallel.optimizer_bytes / 4
    assert 2 * fsdp.trainable_bytes <= fsdp.optimizer_bytes < 2 * fsdp.trainable_bytes + 1024
    assert fsdp.peak_bytes < data_parallel.peak_bytes
    # the same global step: about the same work per device
    np.testing.assert_allclose(fsdp.flops, data_parallel.flops, rtol=0.25)


def test_kept_activations_follow_remat_and_batch(cpu8):
    def residuals(name="stage1", **overrides):
        config = _config(name, mesh_shape=(8, 1, 1), **overrides)
        mesh = sharding.make_mesh((8, 1, 1), devices=cpu8)
        step, (state, frozen, batch, rng), task = plan_lib.abstract_step_inputs(config, mesh)
        accum = int(config.grad_accum_steps)
        return plan_lib.activation_bytes(task, state, frozen, batch, rng, accum, 8)

    none = residuals()
    # batch-major, plus the (batch x batch) similarities of ITC / hard-negative mining
    assert 2 * none < residuals(input__batch_size=32) < 2.5 * none
    assert 0.4 * none < residuals(grad_accum_steps=2) <= none / 2  # one micro-batch at a time
    # remat wraps the ViT and LLM layers: in stage 2 the LLM's backward pass is needed (a small
    # vocabulary, so that the layers and not the logits dominate)
    lm = {p: residuals("stage2_opt", model__remat_policy=p, model__text__vocab_size=512)
          for p in ("none", "dots", "full")}
    assert lm["full"] < lm["dots"] < lm["none"]
    assert lm["full"] < 0.6 * lm["none"]


def test_search_finds_a_setting_that_fits(cpu8, data_parallel, fsdp):
    hbm = (data_parallel.peak_bytes + fsdp.peak_bytes) // 2  # between the two compiled peaks
    log = []
    first, fix = plan_lib.search(_config(mesh_shape=(8, 1, 1)), cpu8, "cpu", hbm, "cpu:8", log=log.append)
    assert not first.fits and fix is not None and fix.fits
    assert fix.mesh == (1, 8, 1) and fix.remat == "none" and fix.accum == 1
    assert fix.overrides == ("--config.mesh_shape=(1,8,1) --config.model.remat_policy=none "
                             "--config.grad_accum_steps=1")
    assert log and "mesh=(1, 8, 1)" in log[0]
    # nothing fits: every candidate is tried (traced only, to keep this quick)
    first, fix = plan_lib.search(_config(mesh_shape=(8, 1, 1)), cpu8, "cpu", 1024, "cpu:8", log=log.append,
                                 compile=False)
    assert fix is None and not first.fits and len(log) == 1 + 3


def test_candidates_order_and_batch_divisibility():
    c = _config(mesh_shape=(8, 1, 1))
    assert plan_lib.candidates(c, 8) == [((1, 8, 1), "none", 1), ((1, 8, 1), "full", 1), ((1, 8, 1), "full", 2)]
    c.input.batch_size = 1680  # 105 per device: micro-batches of 35, 21, 15, 7
    assert [a for _, _, a in plan_lib.candidates(c, 16)] == [1, 1, 3, 5, 7, 15]
    with pytest.raises(ValueError, match="does not split"):
        plan_lib.plan(_config(mesh_shape=(8, 1, 1), grad_accum_steps=4), jax.devices()[:8], "cpu", HBM)


def test_compile_oom_message_is_read():
    msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
           "for HLO temporaries (25.21G) exceeds available HBM (15.75G). HLO module: jit_train_step.")
    temp, hbm = plan_lib._compile_oom(msg)
    assert temp == int(25.21 * 2 ** 30) and hbm == int(15.75 * 2 ** 30)
    assert plan_lib._compile_oom("INTERNAL: something else") is None


def test_topology_names():
    assert plan_lib.SLICES["v4-32"] == "v4:2x2x4" and plan_lib.SLICES["v5e-16"] == "v5e:4x4"
    assert plan_lib.SLICES["v5p-8"] == "v5p:2x2x1"
    with pytest.raises(ValueError, match="unknown topology"):
        plan_lib.topology_devices("v9-3")
    with pytest.raises(ValueError, match="only 8 CPU devices"):
        plan_lib.topology_devices("cpu:16")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_tpu_topology_without_libtpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match="libtpu"):
        plan_lib.topology_devices("v5e:2x2")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the tpu extra)")
def test_tpu_topology_plan():
    devices, kind, hbm = plan_lib.topology_devices("v5e-4")
    assert len(devices) == 4 and kind.startswith("TPU v5") and hbm == 16 * plan_lib.GIB
    v4, _, _ = plan_lib.topology_devices("v4-32")
    assert len(v4) == 16  # megacore: one device per chip
    p = plan_lib.plan(_config(mesh_shape=(4, 1, 1)), devices, kind, hbm, "v5e-4")
    assert p.fits and p.flops > 0 and p.peak_flops == 197e12


def test_command_line(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "blip2_jax.plan", f"--config={ROOT / 'configs/tiny/stage1.py'}",
                        "--config.mesh_shape=(8,1,1)", "--topology=cpu:8", "--hbm_gib=4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for line in ("parameters, trainable", "optimizer state", "activations", "XLA temporaries", "peak",
                 "FLOPs per step"):
        assert line in p.stdout
    assert "fits" in p.stdout and "NOT" not in p.stdout
    bad = subprocess.run([sys.executable, "-m", "blip2_jax.plan", f"--config={ROOT / 'configs/tiny/stage1.py'}",
                          "--topology=v9-3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown topology" in bad.stderr.splitlines()[-1]


def test_traced_estimate_is_near_the_compiled_plan(cpu8, data_parallel):
    est = plan_lib.plan(_config(mesh_shape=(8, 1, 1)), cpu8, "cpu", HBM, "cpu:8", compile=False)
    assert est.source == "estimate" and not est.compiled
    for field in ("trainable_bytes", "frozen_bytes", "optimizer_bytes", "activation_bytes"):
        assert getattr(est, field) == getattr(data_parallel, field)
    np.testing.assert_allclose(est.flops, data_parallel.flops, rtol=0.1)
    # gradients + kept activations: XLA's other temporaries (on this CPU backend, e.g. the
    # backward's cotangents and unfused buffers) are missing, so it is a lower bound, which is
    # what the search relies on (it compiles to confirm)
    assert est.peak_bytes <= data_parallel.peak_bytes
    assert est.peak_bytes > est.argument_bytes + est.activation_bytes
    assert "estimate" in plan_lib.describe(est) and "estimate" in plan_lib.table_row("x", est)


def test_flops_count_every_layer():
    """Cost analysis counts a loop body once: the FLOPs come from the step with unrolled layers,
    so each extra (frozen, forward-only) ViT layer adds its matmuls, counted by hand here."""
    flops = {n: plan_lib.step_flops(_config(model__vision__num_hidden_layers=n)) for n in (2, 4, 6)}
    per_layer = (flops[4] - flops[2]) / 2
    assert per_layer == pytest.approx((flops[6] - flops[4]) / 2, rel=1e-3)
    b, t, h, m, heads = 16, 17, 64, 128, 4  # batch, 16 patches + [CLS], width, MLP, heads
    matmuls = 2 * b * t * (4 * h * h + 2 * h * m) + 2 * 2 * b * heads * t * t * (h // heads)
    assert matmuls < per_layer < 1.2 * matmuls  # + norms, GELU, softmax
