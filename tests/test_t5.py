"""T5 / FlanT5: parity with transformers (golden file + reference numbers recorded from
transformers 5.23, eager attention), cached decoding, scan/loop and remat equivalence, conversion."""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from blip2_jax.models import t5
from blip2_jax.models.configs import T5Config
from blip2_jax.weights import convert_t5
from tests.conftest import GOLDEN
from tests.test_opt import hf_names_shapes, reference_state_dict

CASE = GOLDEN / "blip2_t5"
PREFIX = "language_model."
TOL = 1e-4

# --- two small layouts with weights drawn by `reference_state_dict` ---------------------------
ORIG = T5Config(vocab_size=40, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2,
                num_decoder_layers=1, relative_attention_num_buckets=8,
                relative_attention_max_distance=12, feed_forward_proj="relu", dense_act_fn="relu",
                is_gated_act=False, dropout_rate=0.0, tie_word_embeddings=True,
                scale_decoder_outputs=True)  # original T5: ReLU, tied and rescaled head
FLAN = dataclasses.replace(ORIG, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                           dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
                           scale_decoder_outputs=False)  # FlanT5: gated GELU, own head
IDS = np.array([[5, 9, 33, 2, 17, 3, 1], [7, 3, 24, 12, 1, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
DEC = np.array([[0, 4, 19, 22, 8], [0, 31, 6, 2, 11]])

# transformers' T5ForConditionalGeneration on (IDS, MASK, DEC): logits[:, :, :4], encoder[:, :, :3]
REF = {
    "orig": dict(
        logits=[[[0.440837, -0.066750, 0.106389, -0.496261], [0.008774, 0.322047, -0.062880, 0.511135],
                 [0.084851, -0.005020, 0.047693, -0.529169], [0.158335, -0.103244, 0.202856, -0.321790],
                 [0.198354, 0.196986, 0.050341, 0.331762]],
                [[0.257978, -0.086330, 0.051408, -0.612408], [0.152461, -0.102407, 0.087967, -0.323002],
                 [0.139692, -0.066880, 0.158640, -0.345886], [0.066986, -0.096859, 0.155700, -0.536109],
                 [-0.014305, 0.113738, 0.151366, -0.011418]]],
        encoder=[[[0.269461, 0.020654, -0.435034], [-0.288805, -0.579559, 1.627372],
                  [-0.769181, -0.533701, 1.572195], [-0.205351, -0.058794, 1.212557],
                  [0.382797, -0.408503, 1.333384], [-0.153452, -0.011546, -0.100435],
                  [0.804196, -0.808456, -0.428536]],
                 [[-0.698759, -0.674586, 0.609919], [-0.538025, -0.995156, 0.566324],
                  [-1.068445, -0.757582, 0.521428], [-0.051484, -1.540798, 1.295201],
                  [-0.310182, -0.582328, 0.349720], [0.220088, -0.977849, 1.593968],
                  [0.234454, -1.010092, 1.508590]]]),
    "flan": dict(
        logits=[[[0.538333, -0.164952, 0.395855, 1.159406], [-0.285028, -1.364043, 0.620364, 0.483738],
                 [-0.340202, -0.782549, 0.356255, 1.123577], [-0.028001, -0.443012, 0.827545, 1.434611],
                 [0.072518, -1.482327, 0.782814, -0.076835]],
                [[-0.208976, -0.024129, 0.243274, 1.464431], [0.578806, 0.378880, 0.181891, 0.784638],
                 [-0.046416, -0.417747, -0.046739, 1.194583], [0.297709, -0.529781, 0.146689, 1.170143],
                 [-0.025965, -1.017819, 0.088824, 1.097401]]],
        encoder=[[[0.871360, 0.247387, -0.344479], [-0.611396, 1.483562, -0.331560],
                  [1.050588, 1.940155, 0.829264], [-0.031606, -2.606853, -0.060911],
                  [1.754916, 0.272299, 0.216306], [-0.726307, 1.170950, 0.911455],
                  [0.506900, -0.996877, 0.300273]],
                 [[-0.512241, 1.067646, 1.038064], [-0.760628, 0.805765, 0.055251],
                  [-0.171756, 0.514416, 0.376175], [1.882418, 1.164963, 0.827531],
                  [1.962618, 1.482275, 0.795041], [1.372668, 1.284771, 1.121023],
                  [1.249476, 1.393850, 1.210518]]]),
}
CONFIGS = {"orig": ORIG, "flan": FLAN}


def init_args(cfg):
    return jnp.zeros((1, 2, cfg.d_model)), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32)


@functools.lru_cache(maxsize=None)
def small_state_dict(name: str) -> dict:
    cfg = CONFIGS[name]
    return reference_state_dict(hf_names_shapes(t5.T5ForConditionalGeneration(cfg), convert_t5.to_hf,
                                                cfg, *init_args(cfg)))


@functools.lru_cache(maxsize=None)
def forward_fn(cfg: T5Config, scan_layers: bool = True, remat_policy: str = "none"):
    model = t5.T5ForConditionalGeneration(cfg, scan_layers=scan_layers, remat_policy=remat_policy)

    @jax.jit
    def forward(params, ids, mask, dec):
        v = {"params": params}
        enc = model.apply(v, model.apply(v, ids, method="embed"), mask, method="encode")
        logits, _ = model.apply(v, dec, enc, mask, method="decode")
        return enc, logits
    return forward


@functools.lru_cache(maxsize=None)
def decode_fn(cfg: T5Config, scan_layers: bool = True):
    model = t5.T5ForConditionalGeneration(cfg, scan_layers=scan_layers)
    return jax.jit(functools.partial(model.apply, method="decode"))


def test_relative_position_buckets_match_reference():
    rel = jnp.arange(-14, 15)
    bi = [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 1, 0, 5, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]
    causal = [7, 7, 7, 7, 7, 6, 6, 6, 5, 4, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(t5.relative_position_bucket(rel, True, 8, 12), bi)
    np.testing.assert_array_equal(t5.relative_position_bucket(rel, False, 8, 12), causal)
    # the released checkpoints' setting (32 buckets, max distance 128)
    rel = jnp.array([-1000, -128, -127, -100, -64, -33, -32, -20, -16, -15, -8, -7, -1, 0, 1, 7, 8,
                     15, 16, 20, 32, 33, 64, 100, 127, 128, 1000])
    bi = [15, 15, 15, 15, 14, 12, 12, 10, 10, 9, 8, 7, 1, 0, 17, 23, 24, 25, 26, 26, 28, 28, 30, 31,
          31, 31, 31]
    causal = [31, 31, 31, 30, 26, 21, 21, 17, 16, 15, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(t5.relative_position_bucket(rel, True, 32, 128), bi)
    np.testing.assert_array_equal(t5.relative_position_bucket(rel, False, 32, 128), causal)


@pytest.mark.parametrize("name", ["orig", "flan"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_small_models_match_reference(name, scan_layers):
    cfg = CONFIGS[name]
    params = convert_t5.to_flax(small_state_dict(name), cfg, scan_layers=scan_layers)
    enc, logits = forward_fn(cfg, scan_layers)(params, IDS, MASK, DEC)
    np.testing.assert_allclose(np.asarray(enc)[..., :3], REF[name]["encoder"], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits)[..., :4], REF[name]["logits"], rtol=0, atol=TOL)
    assert logits.dtype == jnp.float32 and logits.shape == DEC.shape + (cfg.vocab_size,)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_matches_full_forward(scan_layers):
    """Prefill two decoder tokens (this also stores the cross-attention keys/values), then one
    token at a time without the encoder output; the encoder input of row 1 is padded."""
    params = convert_t5.to_flax(small_state_dict("flan"), FLAN, scan_layers=scan_layers)
    enc, full = forward_fn(FLAN, scan_layers)(params, IDS, MASK, DEC)
    decode = decode_fn(FLAN, scan_layers)
    v = {"params": params}
    cache = t5.init_cache(FLAN, 2, DEC.shape[1] + 3)
    assert sorted(cache) == ["k", "v"]
    logits, cache = decode(v, DEC[:, :2], enc, MASK, cache=cache, cache_index=jnp.int32(0))
    assert sorted(cache) == ["cross_k", "cross_v", "k", "v"]
    assert cache["cross_k"].shape == (FLAN.num_decoder_layers, 2, FLAN.num_heads, IDS.shape[1], FLAN.d_kv)
    pieces = [logits]
    for i in range(2, DEC.shape[1]):
        logits, cache = decode(v, DEC[:, i:i + 1], None, MASK, cache=cache, cache_index=jnp.int32(i))
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-5)


def test_scan_and_loop_agree():
    out = [forward_fn(FLAN, s)(convert_t5.to_flax(small_state_dict("flan"), FLAN, scan_layers=s),
                               IDS, MASK, DEC) for s in (True, False)]
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_full_forward_and_return_hidden():
    params = convert_t5.to_flax(small_state_dict("flan"), FLAN)
    model = t5.T5ForConditionalGeneration(FLAN)
    v = {"params": params}
    emb = model.apply(v, IDS, method="embed")
    logits = model.apply(v, emb, MASK, DEC)
    _, ref = forward_fn(FLAN)(params, IDS, MASK, DEC)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-6)
    enc = model.apply(v, emb, MASK, method="encode")
    hidden, _ = model.apply(v, DEC, enc, MASK, return_hidden=True, method="decode")
    head = np.asarray(small_state_dict("flan")["lm_head.weight"], np.float64)
    np.testing.assert_allclose(np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), head), ref,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims"])
def test_remat_keeps_values_and_gradients(policy):
    params = convert_t5.to_flax(small_state_dict("flan"), FLAN)
    emb = jnp.asarray(np.random.RandomState(1).normal(size=(2, 7, 16)), jnp.float32)

    def loss(e, remat_policy):
        return jnp.sum(t5.T5ForConditionalGeneration(FLAN, remat_policy=remat_policy).apply(
            {"params": params}, e, MASK, DEC) ** 2)

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, remat_policy="none")))(emb)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, remat_policy=policy)))(emb)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)


def test_dropout_only_when_not_deterministic():
    cfg = dataclasses.replace(FLAN, dropout_rate=0.3)
    params = convert_t5.to_flax(small_state_dict("flan"), cfg)
    model = t5.T5ForConditionalGeneration(cfg)
    emb = model.apply({"params": params}, IDS, method="embed")
    det = model.apply({"params": params}, emb, MASK, DEC)
    drop = model.apply({"params": params}, emb, MASK, DEC, deterministic=False,
                       rngs={"dropout": jax.random.key(0)})
    assert np.all(np.isfinite(drop)) and not np.allclose(drop, det)


def test_decode_needs_encoder_output_or_cross_cache():
    params = convert_t5.to_flax(small_state_dict("flan"), FLAN)
    with pytest.raises(ValueError, match="encoder_hidden"):
        decode_fn(FLAN)({"params": params}, DEC[:, :1], None, MASK, cache=t5.init_cache(FLAN, 2, 8),
                        cache_index=jnp.int32(0))


@pytest.mark.parametrize("name", ["orig", "flan"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_converted_tree_matches_module_and_logical_axes(name, scan_layers):
    cfg = CONFIGS[name]
    model = t5.T5ForConditionalGeneration(cfg, scan_layers=scan_layers)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args(cfg)))["params"]
    converted = convert_t5.to_flax(small_state_dict(name), cfg, scan_layers=scan_layers)
    assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(converted)
    for want, got in zip(jax.tree.leaves(nn.unbox(boxed)), jax.tree.leaves(converted)):
        assert want.shape == got.shape
    specs = nn.get_partition_spec(boxed)
    dec = specs["decoder"]["layers"] if scan_layers else specs["decoder"]["layers_0"]
    lead = ("layers",) if scan_layers else ()
    assert tuple(dec["cross_attn"]["q"]["kernel"]) == lead + ("heads", "embed")  # [out, in]
    assert tuple(dec["ff"]["wo"]["kernel"]) == lead + ("embed", "mlp")
    assert tuple(specs["encoder"]["relative_attention_bias"]["embedding"]) == ("relpos", "heads")
    assert tuple(specs["shared"]["embedding"]) == ("vocab", "embed")
    assert ("lm_head" in specs) == (name == "flan")


@pytest.mark.parametrize("name", ["orig", "flan"])
def test_convert_round_trip_is_exact(name):
    cfg = CONFIGS[name]
    sd = {PREFIX + k: v for k, v in small_state_dict(name).items()}
    for scan_layers in (True, False):
        back = convert_t5.to_hf(convert_t5.to_flax(sd, cfg, prefix=PREFIX, scan_layers=scan_layers),
                                cfg, prefix=PREFIX)
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_tied_head_follows_the_checkpoint():
    sd = small_state_dict("flan")
    assert not convert_t5.resolve_tied_head(sd, ORIG).tie_word_embeddings  # own, different head
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert convert_t5.resolve_tied_head(no_head, FLAN).tie_word_embeddings
    same = dict(no_head, **{"lm_head.weight": sd["shared.weight"]})
    assert convert_t5.resolve_tied_head(same, FLAN).tie_word_embeddings
    with pytest.raises(ValueError, match="resolve_tied_head"):
        convert_t5.to_flax(sd, dataclasses.replace(FLAN, tie_word_embeddings=True))


def test_convert_errors_name_the_tensor():
    sd = {PREFIX + k: v for k, v in small_state_dict("flan").items()}
    key = PREFIX + "decoder.block.1.layer.1.EncDecAttention.k.weight"
    with pytest.raises(KeyError, match=key):
        convert_t5.to_flax({k: v for k, v in sd.items() if k != key}, FLAN, prefix=PREFIX)
    with pytest.raises(ValueError, match=r"\(8, 15\).*\(8, 16\)"):
        convert_t5.to_flax(dict(sd, **{key: np.zeros((8, 15), np.float32)}), FLAN, prefix=PREFIX)
    shared = sd[PREFIX + "shared.weight"]
    old_style = dict(sd, **{PREFIX + "encoder.embed_tokens.weight": shared,
                            PREFIX + "decoder.embed_tokens.weight": shared})
    jax.tree.map(np.testing.assert_array_equal, convert_t5.to_flax(old_style, FLAN, prefix=PREFIX),
                 convert_t5.to_flax(sd, FLAN, prefix=PREFIX))
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs"):
        convert_t5.to_flax(dict(old_style, **{PREFIX + "encoder.embed_tokens.weight": shared + 1}),
                           FLAN, prefix=PREFIX)
    with pytest.raises(KeyError, match="wi_0"):  # a ReLU checkpoint read as gated
        convert_t5.to_flax({PREFIX + k: v for k, v in small_state_dict("orig").items()},
                           dataclasses.replace(ORIG, is_gated_act=True), prefix=PREFIX)


# --- the golden BLIP-2 FlanT5 language model ---------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    if not (CASE / "reference.npz").exists():
        pytest.skip("golden file blip2_t5 missing")
    cfg = T5Config.from_hf(json.loads((CASE / "config.json").read_text())["text_config"])
    sd = {k: v for k, v in load_file(str(CASE / "model.safetensors")).items() if k.startswith(PREFIX)}
    return cfg, sd, dict(np.load(CASE / "reference.npz"))


def test_golden_language_model(golden):
    cfg, sd, ref = golden
    cfg = convert_t5.resolve_tied_head(sd, cfg, prefix=PREFIX)
    assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
    params = convert_t5.to_flax(sd, cfg, prefix=PREFIX)
    enc, logits = forward_fn(cfg)(params, ref["lm_input_ids"], ref["lm_attention_mask"],
                                  ref["lm_decoder_input_ids"])
    np.testing.assert_allclose(logits, ref["lm_logits"], rtol=0, atol=TOL)
    if "lm_encoder_last_hidden_state" in ref:
        np.testing.assert_allclose(enc, ref["lm_encoder_last_hidden_state"], rtol=0, atol=TOL)


def test_golden_sharded_on_8_devices_with_cache(golden):
    """Params shard by their logical names (1 x 2 x 4 mesh); cached decoding on the mesh still
    gives the reference's logits."""
    from blip2_jax import sharding

    cfg, sd, ref = golden
    cfg = convert_t5.resolve_tied_head(sd, cfg, prefix=PREFIX)
    ids, mask, dec = ref["lm_input_ids"], ref["lm_attention_mask"], ref["lm_decoder_input_ids"]
    model = t5.T5ForConditionalGeneration(cfg)
    mesh = sharding.make_mesh((1, 2, 4))
    with sharding.use(mesh):
        emb = jnp.zeros(ids.shape + (cfg.d_model,))
        shard = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0), emb, mask, dec),
                                         mesh)["params"]
        assert tuple(shard["decoder"]["layers"]["ff"]["wo"]["kernel"].spec) == (None, "fsdp", "tensor")  # [out, in]
        params = jax.device_put(convert_t5.to_flax(sd, cfg, prefix=PREFIX), shard)
        v = {"params": params}
        enc = jax.jit(functools.partial(model.apply, method="encode"))(
            v, jax.jit(functools.partial(model.apply, method="embed"))(v, ids), mask)
        decode = decode_fn(cfg)
        logits, cache = decode(v, dec[:, :1], enc, mask, cache=t5.init_cache(cfg, 2, dec.shape[1]),
                               cache_index=jnp.int32(0))
        pieces = [logits]
        for i in range(1, dec.shape[1]):
            logits, cache = decode(v, dec[:, i:i + 1], None, mask, cache=cache, cache_index=jnp.int32(i))
            pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), ref["lm_logits"], rtol=0, atol=TOL)
