"""OPT: parity with transformers (golden file + reference numbers recorded from transformers),
KV-cache decoding, scan/loop and remat equivalence, weight conversion."""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from blip2_jax.models import opt
from blip2_jax.models.configs import OPTConfig
from blip2_jax.weights import convert_opt
from tests.conftest import GOLDEN

CASE = GOLDEN / "blip2_opt"
PREFIX = "language_model."
TOL = 1e-4


def hf_positions(mask):
    """transformers' OPT default: cumsum(mask) * mask - 1 (left pads get -1)."""
    return np.cumsum(mask, axis=1) * mask - 1


def reference_state_dict(names_shapes: dict) -> dict:
    """Weights drawn the way the reference numbers below were made with transformers: sorted
    tensor names, one RandomState(0); norms 1 + 0.1 n (weights) / 0.1 n (biases), others 0.2 n."""
    rs = np.random.RandomState(0)
    out = {}
    for name in sorted(names_shapes):
        shape = names_shapes[name]
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * rs.normal(size=shape)
        elif name.endswith("norm.bias"):
            x = 0.1 * rs.normal(size=shape)
        else:
            x = 0.2 * rs.normal(size=shape)
        out[name] = x.astype(np.float32)
    return out


def hf_names_shapes(model: nn.Module, to_hf, cfg, *args) -> dict:
    """transformers tensor names/shapes of a module, from its abstract init through `to_hf`."""
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args))["params"])
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return {k: v.shape for k, v in to_hf(zeros, cfg).items()}


@functools.lru_cache(maxsize=None)
def forward_fn(cfg: OPTConfig, scan_layers: bool = True, remat_policy: str = "none"):
    model = opt.OPTForCausalLM(cfg, scan_layers=scan_layers, remat_policy=remat_policy)

    @jax.jit
    def forward(params, ids, mask, pos):
        emb = model.apply({"params": params}, ids, method="embed")
        return model.apply({"params": params}, emb, mask, pos)[0]
    return forward


@functools.lru_cache(maxsize=None)
def step_fn(cfg: OPTConfig):
    model = opt.OPTForCausalLM(cfg)

    @jax.jit
    def step(params, ids, mask, pos, cache, index):
        emb = model.apply({"params": params}, ids, method="embed")
        return model.apply({"params": params}, emb, mask, pos, cache=cache, cache_index=index)
    return step


@pytest.fixture(scope="module")
def golden():
    if not (CASE / "reference.npz").exists():
        pytest.skip("golden file blip2_opt missing")
    cfg = OPTConfig.from_hf(json.loads((CASE / "config.json").read_text())["text_config"])
    sd = {k: v for k, v in load_file(str(CASE / "model.safetensors")).items() if k.startswith(PREFIX)}
    return cfg, sd, dict(np.load(CASE / "reference.npz"))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_golden_language_model_logits(golden, scan_layers):
    cfg, sd, ref = golden
    params = convert_opt.to_flax(sd, cfg, prefix=PREFIX, scan_layers=scan_layers)
    ids, mask = ref["lm_input_ids"], ref["lm_attention_mask"]
    logits = np.asarray(forward_fn(cfg, scan_layers)(params, ids, mask, hf_positions(mask)))
    assert logits.shape == ids.shape + (cfg.vocab_size,)
    np.testing.assert_allclose(logits[..., ref["logits_cols"]], ref["lm_logits_sub"], rtol=0, atol=TOL)
    lse = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    np.testing.assert_allclose(lse, ref["lm_logits_lse"], rtol=0, atol=TOL)


def test_cached_decoding_matches_full_forward(golden):
    """Prefill part of a left-padded batch, then one token at a time, in a longer cache."""
    cfg, sd, ref = golden
    params = convert_opt.to_flax(sd, cfg, prefix=PREFIX)
    ids, mask = ref["lm_input_ids"], ref["lm_attention_mask"]
    pos = hf_positions(mask)
    full = np.asarray(forward_fn(cfg)(params, ids, mask, pos))

    b, t = ids.shape
    extra, prefill = 5, 8
    cache = opt.init_cache(cfg, b, t + extra)
    cache_mask = np.pad(mask, ((0, 0), (0, extra)))  # unwritten slots: 0 (and causally hidden)
    step = step_fn(cfg)
    logits, cache = step(params, ids[:, :prefill], cache_mask, pos[:, :prefill], cache, jnp.int32(0))
    pieces = [np.asarray(logits)]
    for i in range(prefill, t):
        logits, cache = step(params, ids[:, i:i + 1], cache_mask, pos[:, i:i + 1], cache, jnp.int32(i))
        pieces.append(np.asarray(logits))
    real = mask.astype(bool)  # left-pad rows see no key at all; their outputs are never used
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full[real], rtol=0, atol=1e-5)
    assert cache["k"].shape == (cfg.num_hidden_layers, b, cfg.num_attention_heads, t + extra,
                                cfg.hidden_size // cfg.num_attention_heads)
    assert not np.any(np.asarray(cache["k"])[:, :, :, t:])  # nothing written past the last token


def test_scan_and_loop_agree(golden):
    cfg, sd, ref = golden
    ids, mask = ref["lm_input_ids"], ref["lm_attention_mask"]
    out = [np.asarray(forward_fn(cfg, s)(convert_opt.to_flax(sd, cfg, prefix=PREFIX, scan_layers=s),
                                         ids, mask, hf_positions(mask))) for s in (True, False)]
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-6)


# --- OPT-350m layout (post-LN, project_in/out); numbers recorded from transformers 5.23 -------
SMALL = OPTConfig(vocab_size=50, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=2,
                  num_attention_heads=2, ffn_dim=32, max_position_embeddings=20,
                  do_layer_norm_before=False, dropout=0.0, pad_token_id=1)
SMALL_IDS = np.array([[1, 1, 5, 9, 33, 2], [7, 3, 44, 12, 8, 21]])
SMALL_MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
# logits[:, :, :4] of transformers' OPTForCausalLM (eager attention, as the golden files: its
# fully masked left-pad rows average all keys, as ours do)
SMALL_LOGITS = np.array([
    [[-0.368828, 0.181539, 0.296639, -0.200123], [-0.368828, 0.181539, 0.296639, -0.200123],
     [-0.273373, 0.203226, 0.029067, -0.812787], [-0.085531, 0.089500, -0.047166, 0.350340],
     [-0.110872, 0.113829, 0.140499, -0.081654], [0.243450, 0.164634, 0.331255, -0.198973]],
    [[-0.438002, 0.248834, -0.117444, -0.946955], [-0.418138, 0.185872, -0.000007, -0.061685],
     [-0.289390, 0.083739, 0.109972, -0.322194], [0.121605, 0.181485, 0.271396, -0.341801],
     [0.131559, 0.090836, 0.280637, 0.313603], [0.127521, 0.225419, 0.209362, -0.313273]]],
    np.float32)


def small_state_dict(cfg=SMALL):
    model = opt.OPTForCausalLM(cfg)
    args = (jnp.zeros((1, 2, cfg.word_embed_proj_dim)), jnp.ones((1, 2), jnp.int32),
            jnp.zeros((1, 2), jnp.int32))
    return reference_state_dict(hf_names_shapes(model, convert_opt.to_hf, cfg, *args))


def test_post_layer_norm_and_projections_match_reference():
    sd = small_state_dict()
    assert "model.decoder.project_in.weight" in sd and "model.decoder.final_layer_norm.weight" not in sd
    params = convert_opt.to_flax(sd, SMALL)
    logits = np.asarray(forward_fn(SMALL)(params, SMALL_IDS, SMALL_MASK, hf_positions(SMALL_MASK)))
    np.testing.assert_allclose(logits[..., :4], SMALL_LOGITS, rtol=0, atol=TOL)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(policy):
    params = convert_opt.to_flax(small_state_dict(), SMALL)
    emb = jnp.asarray(np.random.RandomState(1).normal(size=(2, 6, 8)), jnp.float32)
    mask, pos = SMALL_MASK, hf_positions(SMALL_MASK)

    def loss(p, e, remat_policy):
        model = opt.OPTForCausalLM(SMALL, remat_policy=remat_policy)
        return jnp.sum(model.apply({"params": p}, e, mask, pos)[0] ** 2)

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, remat_policy="none"), argnums=1))(params, emb)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, remat_policy=policy), argnums=1))(params, emb)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)


def test_dropout_only_when_not_deterministic():
    cfg = dataclasses.replace(SMALL, dropout=0.5)
    params = convert_opt.to_flax(small_state_dict(), cfg)
    model = opt.OPTForCausalLM(cfg)
    emb = model.apply({"params": params}, SMALL_IDS, method="embed")
    args = (emb, SMALL_MASK, hf_positions(SMALL_MASK))
    det = model.apply({"params": params}, *args)[0]
    np.testing.assert_array_equal(det, model.apply({"params": params}, *args)[0])
    drop = [model.apply({"params": params}, *args, deterministic=False,
                        rngs={"dropout": jax.random.key(i)})[0] for i in range(2)]
    assert not np.allclose(drop[0], det) and not np.allclose(drop[0], drop[1])


def test_apply_checks_parameter_shapes_without_tracing_initialisers(monkeypatch):
    """layers.CheapParams: flax's per-parameter `jax.eval_shape` is not run on apply (it cost
    ~2 s of a full-size first call), and a stored shape that does not fit still fails, naming it."""
    from flax.errors import ScopeParamShapeError
    params = convert_opt.to_flax(small_state_dict(), SMALL, scan_layers=False)
    model = opt.OPTForCausalLM(SMALL, scan_layers=False)
    emb = model.apply({"params": params}, SMALL_IDS, method="embed")
    args = (emb, SMALL_MASK, hf_positions(SMALL_MASK))
    calls = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.apply({"params": params}, *args)
    assert calls == []
    for module, name in (("fc1", "kernel"), ("self_attn_layer_norm", "scale")):
        layer = dict(params["layers_0"])
        layer[module] = dict(layer[module], **{name: layer[module][name][..., :-1]})
        with pytest.raises(ScopeParamShapeError, match=f"{name}.*layers_0/{module}"):
            model.apply({"params": dict(params, layers_0=layer)}, *args)


def test_untied_head_and_return_hidden():
    cfg = dataclasses.replace(SMALL, tie_word_embeddings=False)
    sd = small_state_dict()
    head = np.random.RandomState(2).normal(size=(cfg.vocab_size, cfg.word_embed_proj_dim)).astype(np.float32)
    params = convert_opt.to_flax(dict(sd, **{"lm_head.weight": head}), cfg)
    model = opt.OPTForCausalLM(cfg)
    emb = model.apply({"params": params}, SMALL_IDS, method="embed")
    args = (emb, SMALL_MASK, hf_positions(SMALL_MASK))
    hidden, _ = model.apply({"params": params}, *args, return_hidden=True)
    logits, _ = model.apply({"params": params}, *args)
    assert hidden.shape == (2, 6, cfg.word_embed_proj_dim)
    np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), head),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_converted_tree_matches_module_and_logical_axes(scan_layers):
    model = opt.OPTForCausalLM(SMALL, scan_layers=scan_layers)
    args = (jnp.zeros((1, 2, 8)), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    converted = convert_opt.to_flax(small_state_dict(), SMALL, scan_layers=scan_layers)
    assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(converted)
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0],
                                 jax.tree.leaves(converted)):
        assert want.shape == got.shape, path
    specs = nn.get_partition_spec(boxed)
    layers = specs["layers"] if scan_layers else specs["layers_0"]
    lead = ("layers",) if scan_layers else ()
    assert tuple(layers["self_attn"]["q_proj"]["kernel"]) == lead + ("heads", "embed")  # [out, in]
    assert tuple(layers["fc2"]["kernel"]) == lead + ("embed", "mlp")
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")


def test_convert_round_trip_is_exact(golden):
    cfg, sd, _ = golden
    for scan_layers in (True, False):
        back = convert_opt.to_hf(convert_opt.to_flax(sd, cfg, prefix=PREFIX, scan_layers=scan_layers),
                                 cfg, prefix=PREFIX)
        assert sorted(back) == sorted(sd)  # tied head: no lm_head.weight, like save_pretrained
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_convert_errors_name_the_tensor():
    sd = small_state_dict()
    key = "model.decoder.layers.1.fc1.weight"
    with pytest.raises(KeyError, match="language_model.model.decoder.layers.1.fc1.weight"):
        convert_opt.to_flax({PREFIX + k: v for k, v in sd.items() if k != key}, SMALL, prefix=PREFIX)
    with pytest.raises(ValueError, match=r"\(32, 15\).*\(32, 16\)"):
        convert_opt.to_flax(dict(sd, **{key: np.zeros((32, 15), np.float32)}), SMALL)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        convert_opt.to_flax(dict(sd, **{"lm_head.weight": np.ones((50, 8), np.float32)}), SMALL)
    with pytest.raises(KeyError, match="lm_head.weight"):
        convert_opt.to_flax(sd, dataclasses.replace(SMALL, tie_word_embeddings=False))


def test_cache_and_mask_checks():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        opt.init_cache(SMALL, 1, SMALL.max_position_embeddings + 1)
    params = convert_opt.to_flax(small_state_dict(), SMALL)
    model = opt.OPTForCausalLM(SMALL)
    emb = jnp.zeros((2, 6, 8))
    with pytest.raises(ValueError, match="attention_mask covers 6 keys, expected 10"):
        model.apply({"params": params}, emb, SMALL_MASK, hf_positions(SMALL_MASK),
                    cache=opt.init_cache(SMALL, 2, 10), cache_index=jnp.int32(0))


def test_sharded_on_8_devices(golden):
    """Params shard by their logical names (data x fsdp x tensor = 1 x 2 x 4), the cache by
    batch and heads; the prefill logits are still the reference's."""
    from blip2_jax import sharding

    cfg, sd, ref = golden
    ids, mask = ref["lm_input_ids"], ref["lm_attention_mask"]
    model = opt.OPTForCausalLM(cfg)
    mesh = sharding.make_mesh((1, 2, 4))
    with sharding.use(mesh):
        emb = jnp.zeros(ids.shape + (cfg.word_embed_proj_dim,))
        shard = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0), emb, mask,
                                                        mask), mesh)["params"]
        assert tuple(shard["layers"]["self_attn"]["q_proj"]["kernel"].spec) == (None, "tensor", "fsdp")  # [out, in]
        params = jax.device_put(convert_opt.to_flax(sd, cfg, prefix=PREFIX), shard)
        cache = opt.init_cache(cfg, ids.shape[0], ids.shape[1] + 3)
        cache_mask = np.pad(mask, ((0, 0), (0, 3)))
        logits, cache = step_fn(cfg)(params, ids, cache_mask, hf_positions(mask), cache, jnp.int32(0))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[..., ref["logits_cols"]][real],
                               ref["lm_logits_sub"][real], rtol=0, atol=TOL)


def test_lm_head_backward_keeps_the_embedding_in_half_precision():
    """The bfloat16 LM head returns float32 logits; its backward rounds the cotangent to bfloat16
    (as a bfloat16 reference does) instead of making a float32 copy of the [V, D] embedding."""
    from blip2_jax.models import layers
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 256)), jnp.bfloat16)
    emb = jnp.asarray(0.05 * rng.standard_normal((8192, 256)), jnp.bfloat16)

    def loss(x, emb, head):
        return jnp.sum(jax.nn.log_softmax(head(x, emb))[..., :7])

    def ours(x, emb):
        return layers.linear(x, emb, jnp.bfloat16, transposed=True, out_dtype=jnp.float32)

    def exact(x, emb):
        return jnp.einsum("btd,vd->btv", x.astype(jnp.float32), emb.astype(jnp.float32),
                          precision="highest")
    grad = jax.jit(jax.grad(lambda x, e: loss(x, e, ours)))
    got = np.asarray(grad(x, emb), np.float32)
    want = np.asarray(jax.grad(lambda x, e: loss(x, e, exact))(x, emb))
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # bfloat16 rounding, not more
    temp = grad.lower(x, emb).compile().memory_analysis().temp_size_in_bytes
    assert temp < emb.size * 4, temp  # no float32 copy of the embedding
