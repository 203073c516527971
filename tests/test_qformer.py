"""Q-Former vs transformers' PyTorch outputs (golden files), its converter, and the attention
patterns of the paper's Figure 2 (uni-modal, bi-directional, multimodal causal)."""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from blip2_jax.models.configs import Blip2Config, QFormerConfig
from blip2_jax.models.layers import causal_mask, padding_mask
from blip2_jax.models.qformer import TEMP_INIT, QFormer
from blip2_jax.weights import convert_qformer
from tests.conftest import GOLDEN

TOL = 1e-4
NOT_QFORMER = ("vision_model.", "language_model.", "language_projection.")


def load_case(case):
    d = GOLDEN / case
    if not (d / "reference.npz").exists():
        pytest.skip(f"golden case {case} not generated (tools/make_golden.py {case})")
    cfg = Blip2Config.from_hf(json.loads((d / "config.json").read_text()))
    return cfg, load_file(str(d / "model.safetensors")), dict(np.load(d / "reference.npz"))


def model_of(cfg: Blip2Config, **kw) -> QFormer:
    return QFormer(cfg.qformer, cfg.num_query_tokens, cfg.image_text_hidden_size, **kw)


@functools.lru_cache(maxsize=None)
def jitted(cfg: Blip2Config, method: str, with_lm_head=False, **static):
    """A jitted `apply` of one method; `static` keyword arguments are fixed at trace time."""
    return jax.jit(functools.partial(model_of(cfg, with_lm_head=with_lm_head).apply, method=method, **static))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,key", [("blip2_opt", "qformer_last_hidden_state"),
                                      ("blip2_t5", "qformer_last_hidden_state"),
                                      ("blip2_itm", "qformer_query_output")])
def test_query_features_match_transformers(case, key):
    cfg, sd, ref = load_case(case)
    params = convert_qformer.to_flax(sd, cfg)
    out = jitted(cfg, "query_features")({"params": params}, ref["vision_last_hidden_state"])
    assert out.shape == ref[key].shape == (ref["pixel_values"].shape[0], cfg.num_query_tokens, cfg.qformer.hidden_size)
    assert max_diff(out, ref[key]) <= TOL


def itm_case():
    cfg, sd, ref = load_case("blip2_itm")
    return cfg, {"params": convert_qformer.to_flax(sd, cfg)}, ref


def test_itc_matches_transformers():
    cfg, variables, ref = itm_case()
    q = jitted(cfg, "query_features")(variables, ref["vision_last_hidden_state"])
    image_embeds = jitted(cfg, "image_embeds")(variables, q)
    text = jitted(cfg, "text_features")(variables, ref["input_ids"], ref["attention_mask"])
    text_embeds = jitted(cfg, "text_embeds")(variables, text)
    assert max_diff(image_embeds, ref["image_embeds"]) <= TOL
    assert max_diff(text_embeds, ref["text_embeds"]) <= TOL
    sim = jitted(cfg, "itc_similarity")(variables, image_embeds, text_embeds)
    assert sim.shape == ref["logits_per_image"].shape == (len(ref["pixel_values"]), len(ref["input_ids"]))
    assert max_diff(sim, ref["logits_per_image"]) <= TOL
    assert max_diff(sim.T, ref["logits_per_text"]) <= TOL


def test_itm_matches_transformers():
    """ITM logits for every (image, text) pair: [num_images, num_texts, 2]."""
    cfg, variables, ref = itm_case()
    images, ids, mask = ref["vision_last_hidden_state"], ref["input_ids"], ref["attention_mask"]
    ni, nt = len(images), len(ids)
    mm = jitted(cfg, "multimodal_features")(variables, np.repeat(images, nt, axis=0),
                                            np.tile(ids, (ni, 1)), np.tile(mask, (ni, 1)))
    logits = jitted(cfg, "itm_logits")(variables, mm).reshape(ni, nt, 2)
    assert max_diff(logits, ref["itm_logits"].reshape(ni, nt, 2)) <= TOL


# ------------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["blip2_opt", "blip2_itm"])
def test_roundtrip_is_exact(case):
    cfg, sd, _ = load_case(case)
    want = {k: v for k, v in sd.items() if not k.startswith(NOT_QFORMER)}
    back = convert_qformer.to_hf(convert_qformer.to_flax(sd, cfg), cfg)
    assert sorted(back) == sorted(want)
    for k in want:
        assert back[k].dtype == want[k].dtype and np.array_equal(back[k], want[k]), k


TINY = Blip2Config(qformer=QFormerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=24, encoder_hidden_size=8,
                                         use_qformer_text_input=True, hidden_dropout_prob=0.1,
                                         attention_probs_dropout_prob=0.1),
                   num_query_tokens=3, image_text_hidden_size=6)
B, N, T = 2, 5, 7


def tiny_inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(B, N, TINY.qformer.encoder_hidden_size)).astype(np.float32)
    ids = rng.integers(1, TINY.qformer.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 5:] = 0
    return image, ids, mask


@functools.lru_cache(maxsize=None)
def tiny_params(tie=True):
    """Random params with weights large enough (std ~0.3) that every input visibly matters."""
    image, ids, mask = tiny_inputs()
    init = jax.jit(model_of(TINY, with_lm_head=True, tie_lm_head=tie).init)
    params = nn.unbox(init(jax.random.key(0), image, ids, mask)["params"])
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.normal(size=x.shape).astype(np.float32), params)


@pytest.mark.parametrize("tie", [True, False])
def test_roundtrip_with_lavis_extras(tie):
    params = tiny_params(tie)
    assert ("decoder" in params["lm_head"]) == (not tie)
    sd = convert_qformer.to_hf(params, TINY, prefix="m.", extras=True)
    assert "m.temp" in sd and "m.cls.predictions.bias" in sd
    back = convert_qformer.to_flax(sd, TINY, prefix="m.", with_lm_head=True, tie_lm_head=tie)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    # Without extras (a transformers checkpoint), temp starts at its initial value.
    plain = convert_qformer.to_hf(params, TINY)
    assert "temp" not in plain and not any(k.startswith("cls.") for k in plain)
    assert float(convert_qformer.to_flax(plain, TINY)["temp"]) == pytest.approx(TEMP_INIT)


def test_missing_keys_are_all_named():
    sd = convert_qformer.to_hf(tiny_params(), TINY)
    del sd["qformer.encoder.layer.2.crossattention.attention.key.bias"]  # layer 2 cross-attends (freq 2)
    del sd["itm_head.weight"]
    with pytest.raises(KeyError, match=r"2 tensor\(s\) missing.*layer\.2\.crossattention\.attention\.key\.bias.*itm_head\.weight"):
        convert_qformer.to_flax(sd, TINY)
    with pytest.raises(KeyError, match=r"cls\.predictions\.transform\.dense\.weight"):
        convert_qformer.to_flax(convert_qformer.to_hf(tiny_params(), TINY), TINY, with_lm_head=True)


def test_shape_mismatch_names_both_shapes():
    sd = convert_qformer.to_hf(tiny_params(), TINY)
    sd["query_tokens"] = np.zeros((1, 4, 16), np.float32)
    with pytest.raises(ValueError, match=r"query_tokens.*\(1, 4, 16\).*\(1, 3, 16\)"):
        convert_qformer.to_flax(sd, TINY)


def test_param_tree_layout():
    p = tiny_params()
    assert set(p) == {"query_tokens", "embeddings", "layernorm", "layer_0", "layer_1", "layer_2", "vision_proj",
                      "text_proj", "itm_head", "temp", "lm_head"}
    assert p["query_tokens"].shape == (1, 3, 16)
    assert "crossattention" in p["layer_0"] and "crossattention" not in p["layer_1"]
    assert p["layer_2"]["crossattention"]["key"]["kernel"].shape == (8, 16)  # K/V from the image width
    fresh = nn.unbox(jax.jit(model_of(TINY).init)(jax.random.key(0), *tiny_inputs())["params"])
    assert float(fresh["temp"]) == pytest.approx(TEMP_INIT)
    assert 0.01 < float(np.std(fresh["query_tokens"])) < 0.04  # normal(0.02)


# ------------------------------------------------------------------------------------------------
# Attention patterns (paper Figure 2)
# ------------------------------------------------------------------------------------------------
def tiny_apply(method, *args, **static):
    return jitted(TINY, method, with_lm_head=True, **static)({"params": tiny_params()}, *args)


def changed_text(ids, position):
    other = ids.copy()
    other[:, position] = (ids[:, position] % (TINY.qformer.vocab_size - 1)) + 1
    assert (other != ids)[:, position].all()
    return other


def test_itg_text_token_sees_only_earlier_text():
    image, ids, mask = tiny_inputs()
    _, cache = tiny_apply("query_features", image, return_cache=True)
    logits = tiny_apply("causal_lm", ids, mask, cache)
    assert logits.shape == (B, T, TINY.qformer.vocab_size)
    j = 3
    logits2 = tiny_apply("causal_lm", changed_text(ids, j), mask, cache)
    np.testing.assert_array_equal(logits2[:, :j], logits[:, :j])  # earlier positions: bit-identical
    assert np.abs(logits2[:, j:] - logits[:, j:]).max(axis=(1, 2)).min() > 1e-3
    # ...and every text token sees the queries (the image).
    _, cache_other = tiny_apply("query_features", image[::-1].copy(), return_cache=True)
    logits3 = tiny_apply("causal_lm", ids, mask, cache_other)
    assert np.abs(logits3[:, 0] - logits[:, 0]).max() > 1e-3


def itg_joint_pass(module, image, ids, mask):
    """The ITG pattern as ONE pass over [queries; text] with an explicit mask (no cache)."""
    q = module.num_query_tokens
    b, t = ids.shape
    to_queries = jnp.ones((b, 1, q + t, q), bool)
    text_to_text = causal_mask(t, t) & padding_mask(mask)
    to_text = jnp.concatenate([jnp.zeros((b, 1, q, t), bool), jnp.broadcast_to(text_to_text, (b, 1, t, t))], axis=2)
    embeds = jnp.concatenate([module._queries(b), module.embeddings(ids)], axis=1)
    x, _ = module._encode(embeds, q, jnp.concatenate([to_queries, to_text], axis=-1), image_embeds=image)
    return x[:, :q], module.lm_head(x[:, q:], module.embeddings)


def test_itg_cached_query_kv_equals_one_masked_pass():
    """The query pass's cached keys/values give exactly the multimodal causal mask's result;
    in that pass the queries never see the text."""
    image, ids, mask = tiny_inputs()
    variables = {"params": tiny_params()}
    joint = jax.jit(functools.partial(model_of(TINY, with_lm_head=True).apply, method=itg_joint_pass))
    queries, logits = joint(variables, image, ids, mask)
    q, cache = tiny_apply("query_features", image, return_cache=True)
    assert max_diff(queries, q) <= 1e-5
    assert max_diff(logits, tiny_apply("causal_lm", ids, mask, cache)) <= 1e-5
    queries2, _ = joint(variables, image, changed_text(ids, 0), mask)
    np.testing.assert_array_equal(queries2, queries)


def test_unimodal_text_ignores_padding_and_bidirectional_mixes_modalities():
    image, ids, mask = tiny_inputs()
    text = tiny_apply("text_features", ids, mask)
    # Uni-modal: a padded token (batch 1, position 6) changes nothing at real positions.
    ids_pad = ids.copy()
    ids_pad[1, 6] = (ids[1, 6] % 40) + 1
    np.testing.assert_array_equal(tiny_apply("text_features", ids_pad, mask)[1, :5], text[1, :5])
    # Uni-modal: text tokens see each other in both directions.
    assert np.abs(tiny_apply("text_features", changed_text(ids, 4), mask)[:, 0] - text[:, 0]).max() > 1e-3
    # Bi-directional (ITM): queries see the text, and text sees the queries (the image).
    mm = tiny_apply("multimodal_features", image, ids, mask)
    assert mm.shape == (B, TINY.num_query_tokens + T, 16)
    mm_text = tiny_apply("multimodal_features", image, changed_text(ids, 4), mask)
    assert np.abs(mm_text[:, :3] - mm[:, :3]).max(axis=(1, 2)).min() > 1e-3
    mm_image = tiny_apply("multimodal_features", image[::-1].copy(), ids, mask)
    assert np.abs(mm_image[:, 3:] - mm[:, 3:]).max(axis=(1, 2)).min() > 1e-3


def test_itm_and_itc_heads_by_hand():
    image, ids, mask = tiny_inputs()
    p = tiny_params()
    mm = tiny_apply("multimodal_features", image, ids, mask)
    want = (np.asarray(mm[:, :3]) @ p["itm_head"]["kernel"] + p["itm_head"]["bias"]).mean(axis=1)
    np.testing.assert_allclose(tiny_apply("itm_logits", mm), want, atol=1e-5)
    q = tiny_apply("query_features", image)
    img = tiny_apply("image_embeds", q)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-6)
    txt = tiny_apply("text_embeds", tiny_apply("text_features", ids, mask))
    want = np.max(np.einsum("iqe,te->itq", np.asarray(img), np.asarray(txt)), axis=-1)
    np.testing.assert_allclose(tiny_apply("itc_similarity", img, txt), want, atol=1e-6)


def test_dropout_only_when_not_deterministic():
    image, _, _ = tiny_inputs()
    variables = {"params": tiny_params()}
    a = tiny_apply("query_features", image)
    train = jitted(TINY, "query_features", with_lm_head=True, deterministic=False)
    b = train(variables, image, rngs={"dropout": jax.random.key(3)})
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(b, train(variables, image, rngs={"dropout": jax.random.key(3)}))


def test_vit_and_qformer_sharded_on_8_devices():
    """Parameters shard by their logical names (data x fsdp x tensor = 1 x 2 x 4) and the result
    is still the reference's."""
    from blip2_jax import sharding
    from blip2_jax.models.vit import VisionTransformer
    from blip2_jax.weights import convert_vision

    cfg, sd, ref = load_case("blip2_itm")
    vit, qformer = VisionTransformer(cfg.vision), model_of(cfg)
    pixels = ref["pixel_values"].transpose(0, 2, 3, 1)
    mesh = sharding.make_mesh((1, 2, 4))
    with sharding.use(mesh):
        text = (ref["input_ids"][:2], ref["attention_mask"][:2])
        shard_v = sharding.param_shardings(jax.eval_shape(vit.init, jax.random.key(0), pixels), mesh)["params"]
        shard_q = sharding.param_shardings(jax.eval_shape(qformer.init, jax.random.key(0),
                                                          ref["vision_last_hidden_state"], *text), mesh)["params"]
        assert tuple(shard_q["layer_0"]["attention"]["query"]["kernel"].spec) == ("fsdp", "tensor")
        pv = jax.device_put(convert_vision.to_flax(sd, cfg.vision, prefix="vision_model."), shard_v)
        pq = jax.device_put(convert_qformer.to_flax(sd, cfg), shard_q)

        @jax.jit
        def features(pv, pq, x):
            return qformer.apply({"params": pq}, vit.apply({"params": pv}, x), method="query_features")

        out = features(pv, pq, jax.device_put(pixels, sharding.batch_sharding(mesh, 4)))
    assert max_diff(out, ref["qformer_query_output"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_outputs_and_gradients(policy):
    """Stage 1 keeps only Q-Former activations: rematerialised layers must give transformers'
    outputs and the same gradients of an ITM-pass loss as stored activations."""
    cfg, variables, ref = itm_case()
    image = ref["vision_last_hidden_state"]
    ids, mask = ref["input_ids"][:len(image)], ref["attention_mask"][:len(image)]

    def loss(model, params):
        mm = model.apply({"params": params}, image, ids, mask, method="multimodal_features",
                         deterministic=True)
        q = model.apply({"params": params}, image, method="query_features")
        return jnp.sum(mm ** 2) + jnp.sum(jnp.sin(q))

    plain, rematted = model_of(cfg), model_of(cfg, remat_policy=policy)
    out = jax.jit(functools.partial(rematted.apply, method="query_features"))(variables, image)
    assert max_diff(out, ref["qformer_query_output"]) <= TOL
    want = jax.jit(jax.grad(functools.partial(loss, plain)))(variables["params"])
    got = jax.jit(jax.grad(functools.partial(loss, rematted)))(variables["params"])
    # float32 round-off of the recomputed forward, relative to the gradients' scale (some leaves,
    # e.g. key biases, have mathematically zero gradients: there only round-off is left)
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert max_diff(g, w) <= 1e-6 * scale, (max_diff(g, w), scale)
    assert jax.tree.structure(want) == jax.tree.structure(got)
