"""Vision towers vs transformers' PyTorch outputs (golden files), and their weight converter."""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from blip2_jax.models.configs import Blip2Config, VisionConfig
from blip2_jax.models.vit import VisionTransformer, bicubic_resize_matrix, resize_position_embeddings
from blip2_jax.weights import convert_vision
from tests.conftest import GOLDEN

TOL = 1e-4


def load_case(case):
    d = GOLDEN / case
    if not (d / "reference.npz").exists():
        pytest.skip(f"golden case {case} not generated (tools/make_golden.py {case})")
    return (json.loads((d / "config.json").read_text()), load_file(str(d / "model.safetensors")),
            dict(np.load(d / "reference.npz")))


def nhwc(x):
    return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def forward(cfg: VisionConfig, scan_layers=True, remat_policy="none", method="__call__"):
    model = VisionTransformer(cfg, scan_layers=scan_layers, remat_policy=remat_policy)
    return jax.jit(functools.partial(model.apply, method=method))


def eva_case(case):
    config, sd, ref = load_case(case)
    return Blip2Config.from_hf(config).vision, sd, ref


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("case", ["blip2_opt", "blip2_t5", "blip2_itm"])
def test_eva_matches_transformers(case):
    cfg, sd, ref = eva_case(case)
    params = convert_vision.to_flax(sd, cfg, prefix="vision_model.")
    out = forward(cfg)({"params": params}, nhwc(ref["pixel_values"]))
    assert out.shape == ref["vision_last_hidden_state"].shape
    assert max_diff(out, ref["vision_last_hidden_state"]) <= TOL


def test_scan_unrolled_and_remat_agree_with_transformers():
    cfg, sd, ref = eva_case("blip2_opt")
    pixels, want = nhwc(ref["pixel_values"]), ref["vision_last_hidden_state"]
    unrolled = convert_vision.to_flax(sd, cfg, prefix="vision_model.", scan_layers=False)
    assert "layers" not in unrolled and "layers_1" in unrolled
    assert max_diff(forward(cfg, scan_layers=False)({"params": unrolled}, pixels), want) <= TOL
    scanned = convert_vision.to_flax(sd, cfg, prefix="vision_model.")
    assert max_diff(forward(cfg, remat_policy="dots")({"params": scanned}, pixels), want) <= TOL


def test_interpolated_positions_match_transformers():
    """48 px on a 32 px model: 4x4 -> 6x6 grid, HF `interpolate_pos_encoding=True`."""
    cfg, sd, ref = eva_case("blip2_opt")
    params = convert_vision.to_flax(sd, cfg, prefix="vision_model.")
    pixels, want = nhwc(ref["interp_pixel_values"]), ref["interp_vision_last_hidden_state"]
    assert max_diff(forward(cfg)({"params": params}, pixels), want) <= TOL
    # Resizing the table once at load time (LAVIS fine-tuning at 364/490) computes the same.
    size = pixels.shape[1]
    resized = resize_position_embeddings(params, cfg, size)
    assert resized["embeddings"]["position_embedding"].shape == ((size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)
    big = dataclasses.replace(cfg, image_size=size)
    assert max_diff(forward(big)({"params": resized}, pixels), want) <= TOL


def test_bicubic_matrix_hand_values():
    """PyTorch bicubic (a=-0.75, align_corners=False): 2 -> 4 samples at src = -0.25, 0.25, 0.75, 1.25."""
    m = bicubic_resize_matrix(2, 4)
    # Row 0: src -0.25 -> floor -1, t = 0.75; tap weights (-0.03515625, 0.26171875, 0.87890625,
    # -0.10546875) at indices -2, -1, 0, 1, clamped to 0, 0, 0, 1.
    np.testing.assert_allclose(m[0], [1.10546875, -0.10546875], rtol=1e-12)
    # Row 1: src 0.25 -> floor 0, t = 0.25; taps -1, 0, 1, 2 clamp to 0, 0, 1, 1.
    np.testing.assert_allclose(m[1], [-0.10546875 + 0.87890625, 0.26171875 - 0.03515625], rtol=1e-12)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(m[::-1, ::-1], m, rtol=1e-12)  # mirror symmetric
    np.testing.assert_allclose(bicubic_resize_matrix(5, 5), np.eye(5), atol=1e-12)


def clip_config(config):
    # BLIP-2 runs all but the last CLIP block (hidden_states[-2]); no final norm.
    return VisionConfig.from_hf(dict(config, kind="clip", num_hidden_layers=config["num_hidden_layers"] - 1))


def test_clip_penultimate_matches_transformers():
    config, sd, ref = load_case("clip_vit")
    cfg = clip_config(config)
    assert cfg.hidden_act == "quick_gelu"
    params = convert_vision.to_flax(sd, cfg)  # transformers 5 saves CLIPVisionModel unprefixed
    assert "pre_layernorm" in params and "bias" not in params["embeddings"]["patch_embedding"]
    out = forward(cfg, method="encode")({"params": params}, nhwc(ref["pixel_values"]))
    assert max_diff(out, ref["hidden_states_penultimate"]) <= TOL


def test_roundtrip_eva():
    cfg, sd, _ = eva_case("blip2_opt")
    want = {k: v for k, v in sd.items() if k.startswith("vision_model.")}  # incl. a random k-bias
    for scan in (True, False):
        back = convert_vision.to_hf(convert_vision.to_flax(want, cfg, prefix="vision_model.", scan_layers=scan),
                                    cfg, prefix="vision_model.")
        assert sorted(back) == sorted(want)
        for k in want:
            assert back[k].dtype == want[k].dtype and np.array_equal(back[k], want[k]), k


def test_roundtrip_clip_keeps_used_layers_only():
    config, sd, _ = load_case("clip_vit")
    cfg = clip_config(config)
    back = convert_vision.to_hf(convert_vision.to_flax(sd, cfg), cfg)
    last = f"encoder.layers.{cfg.num_hidden_layers}."
    want = {k: v for k, v in sd.items() if not k.startswith((last, "post_layernorm"))}
    assert sorted(back) == sorted(want)
    assert all(np.array_equal(back[k], want[k]) for k in want)
    with_ln = convert_vision.to_hf(convert_vision.to_flax(sd, cfg), cfg, include_ln_vision=True)
    np.testing.assert_array_equal(with_ln["ln_vision.weight"], np.ones(cfg.hidden_size))


def tiny_eva_state_dict(cfg):
    params = VisionTransformer(cfg).init(jax.random.key(0), np.zeros((1, cfg.image_size, cfg.image_size, 3)))
    return convert_vision.to_hf(jax.tree.map(np.asarray, nn.unbox(params["params"])), cfg)


TINY = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    image_size=16, patch_size=8)


def test_missing_keys_are_all_named():
    sd = tiny_eva_state_dict(TINY)
    del sd["encoder.layers.1.mlp.fc2.bias"], sd["post_layernorm.weight"]
    with pytest.raises(KeyError, match=r"2 tensor\(s\) missing.*encoder\.layers\.1\.mlp\.fc2\.bias.*post_layernorm\.weight"):
        convert_vision.to_flax(sd, TINY)


def test_shape_mismatch_names_both_shapes():
    sd = tiny_eva_state_dict(TINY)
    sd["encoder.layers.0.mlp.fc1.weight"] = np.zeros((31, 16), np.float32)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight.*\(31, 16\).*\(32, 16\)"):
        convert_vision.to_flax(sd, TINY)
