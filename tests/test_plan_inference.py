"""Inference plans (blip2_jax/plan_inference.py): serving's programs compiled ahead of time, here
for CPU devices and a tiny model (TPU topologies need libtpu and minutes per model)."""
from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from blip2_jax import plan_inference
from blip2_jax.weights import hf
from tests.conftest import GOLDEN, ROOT


@pytest.mark.parametrize("case", ["blip2_opt", pytest.param("blip2_t5", marks=pytest.mark.slow)])
def test_compiled_plan_of_a_tiny_model(case):
    cfg, _ = hf.read_config(str(GOLDEN / case))
    devices = jax.devices()[:2]
    plans = {mode: plan_inference.plan(case, cfg, "cpu:2", devices, 2**30, mode, batch=4, prompt_len=8,
                                       new_tokens=6, log=lambda m: None)
             for mode in ("none", "int8")}
    for p in plans.values():
        assert p.source == "compiled" and p.fits and p.temp_bytes > 0
        assert p.peak_bytes >= p.weight_bytes + p.temp_bytes
        assert p.kv_cache_bytes == plan_inference.kv_cache_bytes(cfg, 4, 8, 6, 2) > 0
    assert plans["int8"].weight_bytes < plans["none"].weight_bytes
    estimate = plan_inference.plan(case, cfg, "cpu:2", devices, 2**30, "int8", batch=4, prompt_len=8,
                                   new_tokens=6, compile=False, log=lambda m: None)
    assert estimate.source == "estimate" and estimate.weight_bytes == plans["int8"].weight_bytes
    assert "| yes | XLA (libtpu) |" in plan_inference.table_row(plans["int8"])


def test_kv_cache_bytes_of_the_released_models():
    from blip2_jax.models import presets
    # OPT-2.7B: 2 (k, v) x 32 layers x 8 rows x 2560 x (32 queries + 32 prompt + 64 new) x 2 bytes
    assert plan_inference.kv_cache_bytes(presets.preset("vitg_opt2.7b"), 8, 32, 64, 1) == 2 * 32 * 8 * 2560 * 128 * 2
    # FlanT5-XXL decoder: 24 layers x 64 heads x 64 dims x (64 new + 32 + 32 encoder positions)
    assert plan_inference.kv_cache_bytes(presets.preset("vitg_flant5xxl"), 8, 32, 64, 1) == 2 * 24 * 8 * 4096 * 128 * 2


def test_bad_inference_plan_arguments_are_one_line():
    run = subprocess.run([sys.executable, "-m", "blip2_jax.plan", "--infer=vitg_opt2.7b", "--topology=cpu:1",
                          "--quantize=int5"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "unknown quantization mode 'int5'" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
