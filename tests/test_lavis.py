"""LAVIS checkpoints -> transformers names (blip2_jax/weights/lavis.py).

The goldens under golden/lavis/ are the golden transformers checkpoints written in LAVIS naming by
tools/make_lavis_golden.py, with its own (structural, opposite-direction) table; converting them back
must give the transformers tensors exactly.
"""
import hashlib
import json
import sys

import jax
import numpy as np
import pytest

from blip2_jax.models.configs import Blip2Config
from blip2_jax.weights import convert_qformer, convert_vision, lavis
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError
from tests.conftest import GOLDEN

LAV = GOLDEN / "lavis"
MANIFEST = json.loads((LAV / "manifest.json").read_text())
SAFETENSORS = sorted(n for n in MANIFEST if n.endswith(".safetensors"))
VISION = lavis.VISION_ABSENT


def hf_state(case):
    return LazyStateDict([str(GOLDEN / case / "model.safetensors")])


def hf_config(case):
    return Blip2Config.from_hf(json.loads((GOLDEN / case / "config.json").read_text()))


def expected(entry):
    """The transformers tensors a LAVIS file must give back: all but the omitted parts; EVA's key bias
    is zero (LAVIS has none; the golden's random one cannot be written in LAVIS naming)."""
    path = GOLDEN / entry["source"] / "model.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["source_sha256"], (
        f"golden/{entry['source']} changed since golden/lavis was made: rerun tools/make_lavis_golden.py")
    hf, out = hf_state(entry["source"]), {}
    for k in hf:
        if k.startswith(tuple(entry["omitted_prefixes"])):
            continue
        v = hf[k]
        if entry["key_bias_dropped"] and k.endswith("self_attn.qkv.bias"):
            d = v.shape[0] // 3
            v = np.concatenate([v[:d], np.zeros_like(v[d:2 * d]), v[2 * d:]])
        out[k] = v
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        assert np.array_equal(g, w), k


def raw(name):
    return dict(lavis.read_lavis_file(str(LAV / name)))


@pytest.mark.parametrize("name", SAFETENSORS)
def test_golden_roundtrip(name):
    entry = MANIFEST[name]
    ck = lavis.load_lavis(str(LAV / name))
    assert ck.kind == entry["kind"]
    tensors, extras = lavis.split_extras(ck.tensors)
    assert_same(tensors, expected(entry))
    src = raw(name)
    assert_same(extras, {k: src[lv] for k, lv in entry["extras"].items()})
    assert set(ck.absent) == set(entry["omitted_prefixes"])
    assert set(ck.dropped) == set(entry["dropped"])
    assert lavis.lavis_to_hf(src, entry["kind"]).keys() == ck.tensors.keys()


def test_stage1_feeds_the_project_converters():
    """The converted stage-1 file loads into our Q-Former/ViT params exactly as the transformers file
    does (up to EVA's key bias, which LAVIS does not have: zero there, random in the golden), and
    the LM head comes from the LAVIS tensors."""
    cfg = hf_config("blip2_itm")
    ck = lavis.load_lavis(str(LAV / "blip2_itm_lavis.safetensors"))
    hf = hf_state("blip2_itm")
    ours = convert_qformer.to_flax(ck.tensors, cfg, with_lm_head=True)
    ref = convert_qformer.to_flax(hf, cfg)
    head = ours.pop("lm_head")
    ours.pop("temp"), ref.pop("temp")
    jax.tree.map(np.testing.assert_array_equal, ours, ref)
    src = raw("blip2_itm_lavis.safetensors")
    np.testing.assert_array_equal(head["transform"]["kernel"], src["Qformer.cls.predictions.transform.dense.weight"].T)
    np.testing.assert_array_equal(head["bias"], src["Qformer.cls.predictions.bias"])
    np.testing.assert_array_equal(convert_qformer.to_flax(ck.tensors, cfg)["temp"], src["temp"])
    want = convert_vision.to_flax(hf, cfg.vision, prefix="vision_model.")
    got = convert_vision.to_flax(ck.tensors, cfg.vision, prefix="vision_model.")
    assert not np.any(got["layers"]["self_attn"]["key"]["bias"])
    got["layers"]["self_attn"]["key"]["bias"] = want["layers"]["self_attn"]["key"]["bias"]
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_missing_tensors_are_named():
    sd = raw("blip2_itm_lavis.safetensors")
    gone = ["Qformer.bert.encoder.layer.1.output_query.dense.weight", "visual_encoder.blocks.1.attn.v_bias",
            "temp", "Qformer.bert.encoder.layer.0.crossattention.self.key.bias", "itm_head.bias"]
    for k in gone:
        del sd[k]
    with pytest.raises(WeightsError, match="missing 5 tensor") as e:
        lavis.convert_lavis(sd)
    for k in gone:
        assert k in str(e.value)


@pytest.mark.parametrize("prefix, named", [
    ("Qformer.bert.encoder.layer.1.", ["Qformer.bert.encoder.layer.1.attention.self.query.weight",
                                       "Qformer.bert.encoder.layer.1.attention.output.LayerNorm.bias"]),
    ("visual_encoder.blocks.0.", ["visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.blocks.0.attn.q_bias"]),
])
def test_missing_layer_or_block_is_named(prefix, named):
    sd = {k: v for k, v in raw("blip2_opt_lavis.safetensors").items() if not k.startswith(prefix)}
    with pytest.raises(WeightsError, match="missing") as e:
        lavis.convert_lavis(sd, "blip2_opt")
    for k in named:
        assert k in str(e.value)


def test_unexpected_tensors_are_named():
    sd = raw("blip2_opt_lavis.safetensors")
    sd["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(2, np.float32)
    sd["visual_encoder.blocks.0.gamma_1"] = np.zeros(2, np.float32)
    sd["vision_proj.weight"] = np.zeros(2, np.float32)  # a stage-1 head in a stage-2 file
    with pytest.raises(WeightsError, match="3 unexpected") as e:
        lavis.convert_lavis(sd)
    for k in ("attention.self.rotary.weight", "visual_encoder.blocks.0.gamma_1", "vision_proj.weight"):
        assert k in str(e.value)


def test_wrong_kind_and_unknown_layouts():
    with pytest.raises(WeightsError, match="opt_proj.weight"):
        lavis.load_lavis(str(LAV / "blip2_opt_lavis.safetensors"), kind="blip2_t5")
    with pytest.raises(WeightsError) as e:
        lavis.convert_lavis({"encoder.foo.weight": np.zeros(1), "decoder.bar": np.zeros(1)})
    assert all(k in str(e.value) for k in lavis.KINDS) and "encoder.foo.weight" in str(e.value)
    sd = raw("blip2_opt_lavis.safetensors")
    sd["t5_proj.weight"] = sd["opt_proj.weight"]
    with pytest.raises(WeightsError, match="ambiguous"):
        lavis.convert_lavis(sd)
    with pytest.raises(WeightsError, match="supported"):
        lavis.convert_lavis(sd, kind="blip2_vicuna")


def test_tied_lm_head_members():
    entry = MANIFEST["blip2_itm_lavis.safetensors"]
    sd = raw("blip2_itm_lavis.safetensors")
    words = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    sd["Qformer.cls.predictions.decoder.weight"] = words.copy()
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"].copy()
    ck = lavis.convert_lavis(sd)  # both members, as in a LAVIS .pth
    np.testing.assert_array_equal(ck.tensors["cls.predictions.decoder.weight"], words)
    assert "Qformer.cls.predictions.decoder.bias" in ck.dropped
    assert_same(lavis.split_extras(ck.tensors)[0], expected(entry))

    del sd["Qformer.bert.embeddings.word_embeddings.weight"], sd["Qformer.cls.predictions.bias"]
    ck = lavis.convert_lavis(sd)  # one member of each pair
    assert_same(lavis.split_extras(ck.tensors)[0], expected(entry))
    np.testing.assert_array_equal(ck.tensors["cls.predictions.bias"], sd["Qformer.cls.predictions.decoder.bias"])

    sd["Qformer.cls.predictions.bias"] = sd["Qformer.cls.predictions.decoder.bias"] + 1
    with pytest.raises(WeightsError, match="differ"):
        lavis.convert_lavis(sd)


def test_absent_vision_and_language_model():
    sd = raw("blip2_opt_lavis.safetensors")
    no_vit = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    ck = lavis.convert_lavis(no_vit)
    assert set(ck.absent) == {*VISION, "language_model."}
    assert not any(k.startswith(VISION) for k in ck.tensors) and "vision_model.post_layernorm.weight" in ck.tensors

    hf = hf_state("blip2_opt")
    lm = {k: hf[k] for k in hf if k.startswith("language_model.")}
    with_lm = dict(sd, **{"opt_model." + k[len("language_model."):]: v for k, v in lm.items()})
    ck = lavis.convert_lavis(with_lm)
    assert ck.absent == ()
    assert_same({k: v for k, v in ck.tensors.items() if k.startswith("language_model.")}, lm)

    clip = lavis.load_lavis(str(LAV / "blip2_t5_lavis.safetensors"), vision="clip")
    assert {"vision_model.ln_vision.weight", "vision_model.ln_vision.bias"} <= clip.tensors.keys()
    assert "vision_model.pre_layrnorm." in clip.absent
    no_vit["visual_encoder.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match="CLIP ViT-L"):
        lavis.convert_lavis(no_vit)


def test_eva_vit_file_drops_last_block_and_final_norm():
    entry = MANIFEST["blip2_itm_lavis.safetensors"]
    p = "visual_encoder."
    eva = {k[len(p):]: v for k, v in raw("blip2_itm_lavis.safetensors").items() if k.startswith(p)}
    eva.update({k.replace("blocks.1.", "blocks.2."): v + 1 for k, v in eva.items() if k.startswith("blocks.1.")})
    eva.update({"norm.weight": np.ones(32, np.float32), "norm.bias": np.zeros(32, np.float32)})
    ck = lavis.convert_lavis(eva)
    assert ck.kind == "eva_vit_g" and ck.absent == ("vision_model.post_layernorm.",)
    assert {"norm.weight", "norm.bias", "blocks.2.attn.qkv.weight"} <= set(ck.dropped)
    want = {k: v for k, v in expected(entry).items() if k.startswith(VISION)}
    assert_same(ck.tensors, want)
    three = lavis.convert_lavis(eva, num_vision_layers=3).tensors
    np.testing.assert_array_equal(three["vision_model.encoder.layers.2.mlp.fc1.weight"],
                                  want["vision_model.encoder.layers.1.mlp.fc1.weight"] + 1)
    one = lavis.convert_lavis(eva, num_vision_layers=1).tensors
    assert not any(".layers.1." in k for k in one) and "vision_model.encoder.layers.0.mlp.fc1.weight" in one


def test_pth_without_torch_names_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="torch"):
        lavis.read_lavis_file(str(LAV / "blip2_opt_lavis.pth"))


class NotAWeight:  # a pickled object a weights-only load must refuse
    pass


def test_pth_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    ck = lavis.load_lavis(str(LAV / "blip2_opt_lavis.pth"))
    ref = lavis.load_lavis(str(LAV / "blip2_opt_lavis.safetensors"))
    assert ck.kind == ref.kind and ck.absent == ref.absent
    assert_same(ck.tensors, ref.tensors)
    bf = tmp_path / "bf16.pth"
    t = torch.randn(3, 4).to(torch.bfloat16)
    torch.save({"model": {"x": t}}, bf)
    got = lavis.read_lavis_file(str(bf))["x"]
    np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
    bad = tmp_path / "code.pth"
    torch.save({"model": {"x": t}, "obj": NotAWeight()}, bad)
    with pytest.raises(WeightsError, match="refused"):
        lavis.read_lavis_file(str(bad))
