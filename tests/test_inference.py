"""The inference API on the golden checkpoints: ITM / ITC / features / retrieval against
transformers' numbers, sharded loading, bfloat16, and the errors users see."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import blip2_jax
from blip2_jax import sharding
from blip2_jax.preprocess import InputError
from tests.conftest import GOLDEN, ROOT

skimage_data = pytest.importorskip("skimage.data")
TOL = 1e-4


def load_case(case):
    ref = json.loads((GOLDEN / case / "reference.json").read_text())
    photos = [getattr(skimage_data, n)() for n in ref["images"]]
    return ref, dict(np.load(GOLDEN / case / "reference.npz")), photos


@pytest.fixture(scope="module")
def itm():
    ref, npz, photos = load_case("blip2_itm")
    return blip2_jax.load(GOLDEN / "blip2_itm"), ref, npz, photos[:2]  # npz covers photos 0, 1


@pytest.fixture(scope="module")
def opt_model():
    return blip2_jax.load(GOLDEN / "blip2_opt")


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- retrieval checkpoint ---------------------------------------------------------------------
def test_match_itm_and_itc(itm):
    model, ref, npz, photos = itm
    out = model.match(photos, ref["texts"])
    np.testing.assert_allclose(out["itm_probability"], softmax(npz["itm_logits"])[..., 1], rtol=0, atol=TOL)
    np.testing.assert_allclose(out["itc_similarity"], npz["logits_per_image"], rtol=0, atol=TOL)
    one = model.match(photos[1], ref["texts"][2])
    assert set(one) == {"itm_probability", "itc_similarity"}
    assert abs(one["itm_probability"] - softmax(npz["itm_logits"][1, 2])[1]) < TOL
    assert abs(one["itc_similarity"] - npz["logits_per_image"][1, 2]) < TOL


def test_retrieval_features(itm):
    model, ref, npz, photos = itm
    f = model.image_features(photos)
    np.testing.assert_allclose(f["image_embeds"], npz["vision_last_hidden_state"], rtol=0, atol=TOL)
    np.testing.assert_allclose(f["query_output"], npz["qformer_query_output"], rtol=0, atol=TOL)
    np.testing.assert_allclose(f["image_feats"], npz["image_embeds"], rtol=0, atol=TOL)
    np.testing.assert_allclose(model.text_features(ref["texts"]), npz["text_embeds"], rtol=0, atol=TOL)


def brute_force_rank(itm_logits, itc, k):
    """ITC top-k per query row, re-scored as ITM match logit + ITC; the rest -inf.
    itm_logits [R, C, 2], itc [R, C] in query-major order."""
    out = np.full(itc.shape, -np.inf)
    for r in range(itc.shape[0]):
        for c in np.argsort(-itc[r])[:k]:
            out[r, c] = itm_logits[r, c, 1] + itc[r, c]
    return out


@pytest.mark.parametrize("k", [1, 2, 128])
def test_rank_itc_topk_then_itm(itm, k):
    model, ref, npz, photos = itm
    t2i = model.rank(photos, ref["texts"], k=k)
    expected = brute_force_rank(npz["itm_logits"].transpose(1, 0, 2), npz["logits_per_text"], k)
    np.testing.assert_array_equal(np.isinf(t2i), np.isinf(expected))
    np.testing.assert_allclose(t2i[np.isfinite(t2i)], expected[np.isfinite(expected)], rtol=0, atol=TOL)
    i2t = model.rank(photos, ref["texts"], k=k, direction="image_to_text")
    expected = brute_force_rank(npz["itm_logits"], npz["logits_per_image"], k)
    np.testing.assert_allclose(np.where(np.isinf(i2t), 0, i2t), np.where(np.isinf(expected), 0, expected),
                               rtol=0, atol=TOL)


def test_retrieve_orders_the_gallery(itm):
    model, ref, npz, photos = itm
    expected = brute_force_rank(npz["itm_logits"].transpose(1, 0, 2), npz["logits_per_text"], 2)
    hits = model.retrieve(photos, ref["texts"], k=2, top=2)
    for q, row in enumerate(hits):
        assert [i for i, _ in row] == list(np.argsort(-expected[q]))
        np.testing.assert_allclose([s for _, s in row], np.sort(expected[q])[::-1], rtol=0, atol=TOL)


def test_retrieval_checkpoint_cannot_generate(itm):
    model = itm[0]
    with pytest.raises(InputError, match="retrieval checkpoint"):
        model.generate(itm[3], None)


# --- captioning checkpoint --------------------------------------------------------------------
def test_opt_features(opt_model):
    _, npz, photos = load_case("blip2_opt")
    f = opt_model.image_features(photos[:2])
    np.testing.assert_allclose(f["image_embeds"], npz["vision_last_hidden_state"], rtol=0, atol=TOL)
    np.testing.assert_allclose(f["query_output"], npz["qformer_last_hidden_state"], rtol=0, atol=TOL)
    np.testing.assert_allclose(f["projected"], npz["language_projection_output"], rtol=0, atol=TOL)


def test_captioning_checkpoint_cannot_match(opt_model):
    with pytest.raises(InputError, match="captioning checkpoint"):
        opt_model.match(np.zeros((32, 32, 3), np.uint8), "a cat")


def test_option_and_prompt_errors(opt_model):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="num_beams"):
        opt_model.generate(image, num_beams=0)
    with pytest.raises(ValueError, match="unknown generation option"):
        opt_model.generate(image, beams=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        opt_model.generate(image, num_beams=2, num_return_sequences=3)
    with pytest.raises(InputError, match="at most"):
        opt_model.generate(image, "word " * 200)
    with pytest.raises(InputError, match="prompts for"):
        opt_model.generate([image, image], ["a", "b", "c"])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sharded_model_gives_the_reference_tokens(scan_layers):
    """Params sharded over a (data 1, fsdp 2, tensor 4) mesh of the 8 test devices, layers
    scanned (as on TPU) or unrolled (the CPU default)."""
    ref, _, photos = load_case("blip2_opt")
    model = blip2_jax.load(GOLDEN / "blip2_opt", mesh=sharding.make_mesh((1, 2, 4)), scan_layers=scan_layers)
    lm = model.params["language_model"]
    kernel = lm["layers"]["fc1"]["kernel"] if scan_layers else lm["layers_0"]["fc1"]["kernel"]
    assert tuple(kernel.sharding.spec) == ((None,) if scan_layers else ()) + ("tensor", "fsdp")  # [out, in]
    case = next(c for c in ref["generate"] if c["name"] == "beam3")
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "do_sample"}
    assert model.generate_ids([photos[i] for i in case["image_index"]], case["prompts"], **kwargs) == case["new_tokens"]


def test_bfloat16_towers():
    model = blip2_jax.load(GOLDEN / "blip2_opt", dtype="bfloat16")
    p = model.params
    # on CPU an OPT language model is scanned by default (decoding reads each stack in place),
    # the image tower unrolled (a scanned layer's slice would be copied)
    assert "layers" in p["language_model"] and "layers" not in p["vision_model"]
    assert p["vision_model"]["layers_0"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert p["language_model"]["layers"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert p["qformer"]["query_tokens"].dtype == jnp.float32  # the Q-Former stays float32
    ids = model.generate_ids([np.zeros((32, 32, 3), np.uint8)], None, max_new_tokens=3)
    assert len(ids) == 1 and 1 <= len(ids[0]) <= 3


@pytest.mark.parametrize("scan", [True, False])
def test_cpu_serving_lays_wide_kernels_out_in_bands(monkeypatch, scan):
    """On one CPU device, the language model's kernels whose inputs decoding reads in blocks are
    placed as their input bands (streaming.Banded, each layer's when stacked; forced here on the
    tiny model by lowering the block limit); the greedy tokens equal those of the plain layout,
    scanned and unrolled alike."""
    from blip2_jax.models import streaming
    image = [np.full((32, 32, 3), 90, np.uint8)]
    plain = blip2_jax.load(GOLDEN / "blip2_opt", dtype="bfloat16", scan_layers=scan)
    monkeypatch.setattr(streaming, "VECTOR_BYTES", 64)
    banded = blip2_jax.load(GOLDEN / "blip2_opt", dtype="bfloat16", scan_layers=scan)
    at = (lambda t: t["layers"]) if scan else (lambda t: t["layers_0"])
    lm = at(banded.params["language_model"])
    assert isinstance(lm["fc2"]["kernel"], streaming.Banded)
    assert isinstance(lm["self_attn"]["q_proj"]["kernel"], streaming.Banded)
    assert lm["fc2"]["kernel"].shape == at(plain.params["language_model"])["fc2"]["kernel"].shape
    assert not isinstance(at(banded.params["vision_model"])["fc2"]["kernel"], streaming.Banded)
    assert banded.generate_ids(image, None, max_new_tokens=4) == plain.generate_ids(image, None, max_new_tokens=4)


@pytest.mark.parametrize("case,scan,quantize", [("blip2_opt", True, None), ("blip2_opt", False, None),
                                                ("blip2_opt", True, "int8"), ("blip2_t5", None, None)])
def test_serving_on_two_cores_gives_one_devices_tokens(monkeypatch, case, scan, quantize):
    """mesh="cores" on a 2-core host: a (1, 1, 2) mesh of host devices (the image tower scanned
    by default: `serving.default_scan_layers`); the language model's
    kernels are placed split by output channel (in input bands too, forced here on the tiny
    model) and decoding's products run per device, each output channel computed as on one
    device: from the same soft prompts, one image's greedy tokens equal one device's, bfloat16
    and int8, OPT and T5 alike. What XLA partitions itself (the image side, products of more
    rows) agrees to bfloat16's rounding: the soft prompts within 2 ulps. A mesh named other
    than "cores" is a one-line error."""
    import jax
    from blip2_jax import cores
    from blip2_jax.models import streaming
    monkeypatch.setattr(cores, "available", lambda: 2)
    monkeypatch.setattr(streaming, "VECTOR_BYTES", 64)
    kw = dict(dtype="bfloat16", scan_layers=scan, quantize=quantize)
    one = blip2_jax.load(GOLDEN / case, **kw)
    split = blip2_jax.load(GOLDEN / case, mesh="cores", **kw)
    assert dict(split.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2}
    if scan is None:  # by default the image tower is scanned there (one device: unrolled)
        assert "layers" in split.params["vision_model"] and "layers" not in one.params["vision_model"]
    if case == "blip2_opt":
        lm = split.params["language_model"]
        lm = lm["layers"] if scan else lm["layers_0"]
        lead = (None,) * scan
        fc1, fc2 = lm["fc1"]["kernel"], lm["fc2"]["kernel"]
        if quantize:
            assert fc1.qvalue.sharding.spec == P(*lead, "tensor", None)
        else:
            assert isinstance(fc2, streaming.Banded) and fc2.blocks.sharding.spec == P(*lead, None, "tensor", None)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), np.uint8) for _ in range(2)]
    own_prompts = split.predictor._soft_prompts
    for batch in (images[:1], images):
        pix = jnp.asarray(one.pixel_values(batch))
        with sharding.use(one.mesh):
            prompt = np.asarray(one.predictor._soft_prompts(one.params, pix).astype(jnp.float32))
        with sharding.use(split.mesh):
            own = np.asarray(own_prompts(split.params, pix).astype(jnp.float32))
        np.testing.assert_allclose(own, prompt, rtol=0, atol=2 * 2.0 ** -8 * np.abs(prompt).max())
        if len(batch) == 1:
            fixed = jax.device_put(prompt.astype(jnp.bfloat16), jax.sharding.NamedSharding(split.mesh, P()))
    monkeypatch.setattr(split.predictor, "_soft_prompts", lambda params, px: fixed)
    taken = []
    real = streaming.split_mesh
    monkeypatch.setattr(streaming, "split_mesh", lambda *a: taken.append(real(*a)) or taken[-1])
    got = split.generate_ids(images[:1], None, max_new_tokens=4)
    monkeypatch.setattr(streaming, "split_mesh", real)
    assert any(m is not None for m in taken)
    assert got == one.generate_ids(images[:1], None, max_new_tokens=4)
    with pytest.raises(ValueError, match="'cores'"):
        blip2_jax.load(GOLDEN / "blip2_opt", mesh="all")


def test_cpu_serving_gives_large_freed_buffers_back(monkeypatch):
    """serving.return_large_frees: after it, a freed 16 MiB buffer leaves the resident set even
    after a larger one was freed (glibc's default would have raised its mmap threshold to that
    size and kept the 16 MiB); the environment variable sets or turns it off, bad values fail."""
    from blip2_jax import serving

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    monkeypatch.setenv(serving.MMAP_ENV, "0")
    assert serving.return_large_frees() is None
    monkeypatch.setenv(serving.MMAP_ENV, "lots")
    with pytest.raises(ValueError, match=serving.MMAP_ENV):
        serving.return_large_frees()
    monkeypatch.delenv(serving.MMAP_ENV)
    assert serving.return_large_frees() == 1 << 20
    big = np.ones(24 << 20, np.uint8)
    del big
    before = rss_mib()
    buf = np.ones(16 << 20, np.uint8)
    assert rss_mib() - before > 12
    del buf
    assert rss_mib() - before < 4


def test_import_is_light():
    code = "import sys, blip2_jax; print(sorted(m for m in ('jax', 'transformers', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_serving_gives_the_heap_back_after_each_compilation():
    """After serving.return_large_frees, each XLA compilation ends by returning the heap's free
    pages to the system (as a compiler's freed working memory is): 200 MiB of freed small blocks
    under a live one leave the resident set at the next compilation, and stay without it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, sys
        import jax, jax.numpy as jnp, numpy as np
        from blip2_jax import serving
        def rss_mib():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        if sys.argv[1] == "1":
            serving.return_large_frees()
        blocks = [np.ones(100 << 10, np.uint8) for _ in range(2048)]  # 200 MiB of 100 KiB heap blocks
        pin = np.ones(100 << 10, np.uint8)  # above them: the heap's top stays in use
        del blocks
        before = rss_mib()
        jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()  # a new program: compiled
        print(before - rss_mib())
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", BLIP2_JAX_MMAP_THRESHOLD="1048576", MALLOC_ARENA_MAX="1")
    freed = {}
    for on in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", code, on], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        freed[on] = float(run.stdout.split()[-1])
    assert freed["1"] > 150 and freed["0"] < 50, freed
