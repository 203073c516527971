"""The miniature pipeline, shortened (`python -m blip2_jax.miniature --fast`): unimodal towers,
stage 1, stage 2, the run without stage 1, zero-shot evaluation on 64 held-out scenes.

Thresholds come from measured runs (docs/miniature.md lists them) with a margin; each sits
well above what a model that ignores the image (or an untrained one) reaches, so a broken
bridge between the towers fails here.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # minutes of CPU: left out of ./run_tests.sh --fast

# Thresholds from --fast runs (docs/miniature.md), with a margin; what chance gives, for scale.
VISION_COLOUR_ACC = 0.60     # measured 0.84: colour of the occupied grid cells; chance 1/8
LM_CAPTION_QA_LOSS = 0.75    # measured 0.62 nats/token on held-out caption + QA documents;
                             # a uniform guess over the 65 tokens is 4.2
ITC_R1 = 8.0                 # measured 23.4 / 27.2 (image->text / text->image); chance 1.6 %
CIDER_OVER_BLIND = 25.0      # measured 75.6 (with stage 1), 69.8 (without); blind caption 30.7


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("miniature")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "blip2_jax.miniature", "--fast", f"--workdir={workdir}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-4000:]}")
    out = json.loads((workdir / "results.json").read_text())
    out["stdout"], out["stderr"] = p.stdout, p.stderr
    return out


def test_prints_a_table_examples_and_progress(results):
    assert "| caption CIDEr |" in results["stdout"] and "| VQA accuracy (%) |" in results["stdout"]
    assert "reference:" in results["stdout"] and "A: " in results["stdout"]
    for phase in ("[1/7] data", "[2/7] towers", "[4/7] stage1", "[5/7] stage2", "[7/7] ablation"):
        assert phase in results["stderr"]
    assert set(results["commands"]) == {"stage1", "stage2", "stage2_no_stage1"}


def test_towers_learn_their_own_modality(results):
    towers = results["towers"]
    assert towers["vision"]["val_colour_acc"] >= VISION_COLOUR_ACC
    assert towers["lm"]["val_loss_caption_qa"] <= LM_CAPTION_QA_LOSS


def test_stage1_aligns_images_and_texts(results):
    retrieval = results["runs"]["with_stage1"]["retrieval"]
    assert retrieval["itc_txt_r1"] >= ITC_R1
    assert retrieval["itc_img_r1"] >= ITC_R1


@pytest.mark.parametrize("run", ["with_stage1", "without_stage1"])
def test_captions_describe_the_image(results, run):
    cider = 100 * results["runs"][run]["caption"]["CIDEr"]
    blind = 100 * results["runs"]["blind"]["caption"]["CIDEr"]
    assert cider >= blind + CIDER_OVER_BLIND, (cider, blind)


def test_vqa_is_scored_on_every_question(results):
    for run in ("with_stage1", "without_stage1", "blind"):
        vqa = results["runs"][run]["vqa"]
        assert 0.0 <= vqa["accuracy"] <= 100.0
    assert len(results["questions"]) == 64
    assert results["verdict"].startswith("Captioning:")
