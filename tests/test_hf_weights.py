"""transformers-format directories in and out: the whole model equals the reference, a load ->
save round trip reproduces every tensor, and bad checkpoints fail with clear errors."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax.models.blip2 import Blip2
from blip2_jax.weights import hf
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError, checkpoint_files, save_state_dict
from tests.conftest import GOLDEN

TOL = 1e-4


def nhwc(x):
    return jnp.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def opt():
    return hf.load(str(GOLDEN / "blip2_opt")), np.load(GOLDEN / "blip2_opt" / "reference.npz")


@pytest.fixture(scope="module")
def t5():
    return hf.load(str(GOLDEN / "blip2_t5")), np.load(GOLDEN / "blip2_t5" / "reference.npz")


def test_full_model_logits_opt(opt):
    (cfg, params), ref = opt
    model = Blip2(cfg)
    v = {"params": params}
    px = nhwc(ref["pixel_values"])
    np.testing.assert_allclose(model.apply(v, px, method="encode_image"), ref["vision_last_hidden_state"], atol=TOL)
    q = model.apply(v, model.apply(v, px, method="encode_image"), method="query_output")
    np.testing.assert_allclose(q, ref["qformer_last_hidden_state"], atol=TOL)
    np.testing.assert_allclose(model.apply(v, q, method="project"), ref["language_projection_output"], atol=TOL)
    logits = np.asarray(model.apply(v, px, ref["input_ids"], ref["attention_mask"], method="forward"))
    # Only positions the reference computes from real tokens (left pads attend to nothing).
    mask = np.concatenate([np.ones((2, cfg.num_query_tokens)), ref["attention_mask"]], 1).astype(bool)
    sub = logits[..., ref["logits_cols"]]
    assert np.abs(sub - ref["logits_sub"])[mask].max() <= TOL
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    assert np.abs(lse - ref["logits_lse"])[mask].max() <= TOL


def test_full_model_logits_t5(t5):
    (cfg, params), ref = t5
    model = Blip2(cfg)
    logits = model.apply({"params": params}, nhwc(ref["pixel_values"]), ref["input_ids"], ref["attention_mask"],
                         ref["decoder_input_ids"], method="forward")
    assert np.abs(np.asarray(logits) - ref["logits"]).max() <= TOL


def test_bfloat16_frozen_towers_stay_close(t5):
    (cfg, params), ref = t5
    cfg16, p16 = hf.load(str(GOLDEN / "blip2_t5"), frozen_dtype=jnp.bfloat16)
    assert p16["language_model"]["shared"]["embedding"].dtype == jnp.bfloat16
    assert p16["qformer"]["query_tokens"].dtype == np.float32  # the trained part stays float32
    model = Blip2(cfg16, vision_dtype=jnp.bfloat16, text_dtype=jnp.bfloat16)
    logits = model.apply({"params": p16}, nhwc(ref["pixel_values"]), ref["input_ids"], ref["attention_mask"],
                         ref["decoder_input_ids"], method="forward")
    assert np.isfinite(np.asarray(logits)).all()
    assert np.abs(np.asarray(logits) - ref["logits"]).max() < 0.1 * np.abs(ref["logits"]).max()


@pytest.mark.parametrize("case", ["blip2_opt", "blip2_t5", "blip2_itm"])
def test_roundtrip_is_exact(case, tmp_path):
    src = GOLDEN / case
    cfg, params = hf.load(str(src))
    _, raw = hf.read_config(str(src))
    hf.save(str(tmp_path), cfg, params, raw_config=raw, side_files_from=str(src), max_shard_bytes=2**17)
    assert (tmp_path / "model.safetensors.index.json").exists()  # sharded on the way out
    want = LazyStateDict(checkpoint_files(str(src)))
    got = LazyStateDict(checkpoint_files(str(tmp_path)))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert json.loads((tmp_path / "config.json").read_text()) == raw
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "preprocessor_config.json").exists()
    # transformers itself reads the configuration back
    transformers = pytest.importorskip("transformers")
    conf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert conf.num_query_tokens == cfg.num_query_tokens


def _damaged(tmp_path, edit):
    src = GOLDEN / "blip2_itm"
    for f in src.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
    sd = dict(LazyStateDict(checkpoint_files(str(src))))
    edit(sd)
    (tmp_path / "model.safetensors").unlink()
    save_state_dict(sd, str(tmp_path))
    return str(tmp_path)


def test_missing_tensors_listed_by_name(tmp_path):
    def drop(sd):
        del sd["itm_head.weight"], sd["qformer.encoder.layer.1.attention.output.dense.bias"]
    with pytest.raises(WeightsError, match=r"missing.*itm_head\.weight.*") as e:
        hf.load(_damaged(tmp_path, drop))
    assert "qformer.encoder.layer.1.attention.output.dense.bias" in str(e.value)


def test_unexpected_tensors_listed_by_name(tmp_path):
    def add(sd):
        sd["qformer.encoder.layer.9.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=r"unexpected tensors.*qformer\.encoder\.layer\.9\.extra\.weight"):
        hf.load(_damaged(tmp_path, add))


def test_shape_mismatch_names_both_shapes(tmp_path):
    def shrink(sd):
        sd["itm_head.weight"] = np.zeros((3, 32), np.float32)
    with pytest.raises(WeightsError, match=r"itm_head\.weight.*\(3, 32\).*\(2, 32\)"):
        hf.load(_damaged(tmp_path, shrink))


def test_unsupported_model_type_and_bad_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(WeightsError, match=r"unsupported model type 'llava'"):
        hf.load(str(tmp_path))
    with pytest.raises(WeightsError, match="model directory not found"):
        hf.load(str(tmp_path / "nope"))
    (tmp_path / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        hf.load(str(tmp_path))
    shutil.copyfile(GOLDEN / "blip2_itm" / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        hf.load(str(tmp_path))
