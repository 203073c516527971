"""models/streaming.py: the few-row CPU product that streams [out, in] weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax.models import layers, streaming


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("shape", [(40, 24), (300, 5000), (9, 8192)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_streaming_dot_equals_the_plain_product(rows, shape, dtype):
    """Every output channel (a last chunk that overlaps the one before, input blocks split
    under the fused-vector limit) equals x @ w.T in float32, scaled per channel when given."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape) * (20 if dtype == jnp.int8 else 1)
    w = jnp.asarray(np.clip(w, -127, 127)).astype(dtype)
    x = jnp.asarray(rng.standard_normal((rows, shape[1])), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, (shape[0], 1)), jnp.float32) if dtype == jnp.int8 else None
    got = jax.jit(streaming.streaming_dot)(x, w, scale)
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T
    if scale is not None:
        want = want * np.asarray(scale)[:, 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_which_quantized_products_stream():
    """int8 streams one row (from 2, Qwix's dequantize-then-dot is faster); int4, whose
    unpacking slows Qwix's dot, streams up to 4 rows; float32 weights never stream."""
    import ml_dtypes
    with streaming.streaming(True):
        assert streaming.applies(1, jnp.int8) and not streaming.applies(2, jnp.int8)
        assert streaming.applies(4, ml_dtypes.int4) and not streaming.applies(5, ml_dtypes.int4)
        assert streaming.applies(1, jnp.bfloat16) and not streaming.applies(1, jnp.float32)
    with streaming.streaming(False):
        assert not streaming.applies(1, jnp.int8)


def test_dense_streams_one_bfloat16_row_on_cpu_only_when_asked():
    """layers.linear takes the loop for one row against a bfloat16 [out, in] kernel (CPU
    default), the plain dot for 2+ rows, float32 weights, [in, out] kernels, or streaming off;
    both paths give the same numbers."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    x1, x2 = (jnp.asarray(rng.standard_normal((1, r, 32)), jnp.bfloat16) for r in (1, 2))

    def hlo(x, kernel, transposed=True):
        return jax.jit(lambda a: layers.linear(a, kernel, jnp.bfloat16, transposed)).lower(x).as_text()

    with streaming.streaming(True):
        assert "while" in hlo(x1, w)
        assert "while" not in hlo(x2, w)
        assert "while" not in hlo(x1, w.astype(jnp.float32))
        assert "while" not in hlo(x1, w.T, transposed=False)
        on = layers.linear(x1, w, jnp.float32, True)
    with streaming.streaming(False):
        assert "while" not in hlo(x1, w)
        off = layers.linear(x1, w, jnp.float32, True)
    np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_banded_weights_give_the_plain_product(rows):
    """streaming.Banded: a weight stored as its input bands gives x @ w.T, streamed for one row
    (on CPU: `banded_dot`) and as one product per band for more."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((300, 9000)), jnp.bfloat16)
    nb = streaming.band_count(w.shape, w.dtype)
    assert nb == 3 and streaming.band_count((300, 4000), jnp.bfloat16) == 1
    assert streaming.band_count((300, 9000), jnp.float32) == 1
    banded = streaming.Banded(jnp.stack(jnp.split(w, nb, axis=1)))
    assert banded.shape == w.shape and banded.blocks.shape == (3, 300, 3000)
    x = jnp.asarray(rng.standard_normal((rows, 9000)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    with streaming.streaming(True):
        hlo = jax.jit(lambda a: streaming.banded_linear(a, banded, jnp.float32)).lower(x).as_text()
        got = streaming.banded_linear(x, banded, jnp.float32)
    assert ("banded_dot" in hlo) == (rows == 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------------ scanned layers
def _stack(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


@pytest.mark.parametrize("rows", [1, 5])
def test_a_layer_read_in_its_stack_equals_that_layers_product(rows):
    """`LayerOf(stack, i)` (bfloat16, bfloat16 in input bands, int8) gives x @ stack[i].T, for one
    streamed row and for more rows (`stacked_dot`), with several chunks of channels."""
    from blip2_jax import quant
    rng = np.random.default_rng(1)
    stack = _stack(rng, (3, 1200, 640), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, 640)), jnp.bfloat16)
    nb = 2
    banded = streaming.Banded(jnp.stack([stack[:, :, b * 320:(b + 1) * 320] for b in range(nb)], axis=1))
    q = quant.quantize_kernel(stack, jnp.int8)
    with streaming.streaming(True):
        for i in range(3):
            want = np.asarray(x, np.float64) @ np.asarray(stack[i], np.float64).T
            at = jnp.int32(i)
            for kernel in (stack, banded):
                got = jax.jit(lambda a, k, j: layers.layer_linear(a, streaming.LayerOf(k, j), jnp.float32))(x, kernel, at)
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
            got = jax.jit(lambda a, k, j: layers.layer_linear(a, streaming.LayerOf(k, j), jnp.float32))(x, q, at)
            deq = np.asarray(q.qvalue[i], np.float64) * np.asarray(q.scale[i], np.float64)
            want_q = np.asarray(x, np.float64) @ deq.T
            np.testing.assert_allclose(np.asarray(got), want_q, rtol=1e-4, atol=1e-3 * np.abs(want_q).max())


def test_scanned_decoding_reads_each_layer_in_its_stack():
    """A cached OPT step with scanned bfloat16 layers on CPU loops over the layer index, each
    kernel read in place: the logits and cache of `nn.scan` (which copies every layer's slice),
    those of the unrolled layers to bfloat16's rounding, and less scratch memory than one
    layer's kernels."""
    from blip2_jax.models import opt
    from blip2_jax.models.configs import OPTConfig
    cfg = OPTConfig(vocab_size=96, hidden_size=256, word_embed_proj_dim=256, num_hidden_layers=3,
                    num_attention_heads=4, ffn_dim=1024, max_position_embeddings=32, dropout=0.0)
    bf = jnp.bfloat16
    scanned = opt.OPTForCausalLM(cfg, dtype=bf, param_dtype=bf, scan_layers=True)
    unrolled = opt.OPTForCausalLM(cfg, dtype=bf, param_dtype=bf, scan_layers=False)
    emb = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 256)), bf)
    mask, pos = jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(scanned.init(jax.random.key(0), emb, mask[:, :1], pos))["params"]
    flat = {f"layers_{i}": jax.tree.map(lambda a: a[i], params["layers"]) for i in range(3)}
    params_unrolled = {**{k: v for k, v in params.items() if k != "layers"}, **flat}
    cache = opt.init_cache(cfg, 1, 8, bf)

    def step(model):
        return jax.jit(lambda p, c: model.apply({"params": p}, emb, mask, pos, cache=c, cache_index=jnp.int32(0)))

    with streaming.streaming(True):
        fn = step(scanned)
        got, new_cache = fn(params, cache)
        want, want_cache = step(unrolled)(params_unrolled, cache)
        scratch = fn.lower(params, cache).compile().memory_analysis().temp_size_in_bytes
    with streaming.streaming(False):
        sliced, sliced_cache = step(scanned)(params, cache)
    # the loop computes what nn.scan computes; unrolled layers round bfloat16 in other places
    np.testing.assert_allclose(np.asarray(got), np.asarray(sliced), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_cache["k"], np.float32), np.asarray(sliced_cache["k"], np.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0.01 * np.abs(np.asarray(want)).max())
    layer_kernels = sum(a[0].nbytes for path, a in jax.tree_util.tree_leaves_with_path(params["layers"])
                        if path[-1].key == "kernel")
    assert scratch < layer_kernels / 2, (scratch, layer_kernels)


# ------------------------------------------------------------------------------ split over host devices
@pytest.mark.parametrize("rows", [1, 5])
def test_products_split_over_host_devices_equal_one_devices(rows):
    """On a mesh of two host devices split along "tensor" only, each streamed product (a plain
    [out, in] kernel; a layer of a stack, plain, in input bands, int8; `stacked_dot` for more
    rows, plain and in bands) runs under shard_map, each device on its share of the output
    channels, and gives exactly one device's result; a kernel whose channels the mesh does not
    divide, and a mesh split along another axis, keep the one-device product."""
    from blip2_jax import quant, sharding
    rng = np.random.default_rng(3)
    stack = _stack(rng, (3, 1200, 640), jnp.bfloat16)
    banded = streaming.Banded(jnp.stack([stack[:, :, b * 320:(b + 1) * 320] for b in range(2)], axis=1))
    q = quant.quantize_kernel(stack, jnp.int8)
    x = jnp.asarray(rng.standard_normal((rows, 640)), jnp.bfloat16)
    at = jnp.int32(1)
    cases = {"plain": lambda a: layers.linear(a, stack[2], jnp.float32, transposed=True),
             "odd": lambda a: layers.linear(a, stack[2, :999], jnp.float32, transposed=True),
             **{name: (lambda k: lambda a: layers.layer_linear(a, streaming.LayerOf(k, at), jnp.float32))(k)
                for name, k in (("stack", stack), ("banded", banded), ("int8", q))}}
    split = sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2])
    other = sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2])
    assert streaming.split_mesh(split) is not None and streaming.split_mesh(other) is None
    with streaming.streaming(True):
        for name, f in cases.items():
            if rows > 1 and name in ("plain", "odd", "int8"):
                continue  # not streamed: XLA's dot, partitioned by the compiler
            want = np.asarray(jax.jit(f)(x))
            per_device = name != "odd" and (rows == 1 or name in ("stack", "banded"))
            for mesh, splits in ((split, per_device), (other, False)):
                with sharding.use(mesh):
                    text = str(jax.make_jaxpr(f)(x))
                    got = np.asarray(jax.jit(f)(x))
                assert ("shard_map" in text) == splits, (name, mesh.shape)
                np.testing.assert_array_equal(got, want, err_msg=name)


def _eqns(fn, *args, name: str):
    """Every `name` equation of fn's program (nested jits and loops included)."""
    from jax.extend import core
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == name:
                found.append(eqn)
            for sub in core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _dot_operand_dtypes(fn, *args) -> set[str]:
    return {str(v.aval.dtype) for eqn in _eqns(fn, *args, name="dot_general") for v in eqn.invars}


def test_serving_runs_half_products_in_float32_on_cpus_without_half_units(tmp_path, monkeypatch):
    """/proc/cpuinfo's flags decide (x86 AVX-512 BF16 or AMX, aarch64 bf16); inside
    `serving_products` a many-row bfloat16 product (a plain kernel, a layer of a stack, input
    bands) then multiplies float32 operands and returns the same values to bfloat16 rounding;
    outside it (training) and with BLIP2_JAX_CPU_HALF_PRODUCTS=half it stays bfloat16."""
    has = streaming.cpu_has_half_units.__wrapped__
    for text, want in (("flags\t\t: fpu sse avx2 fma\n", False), ("flags\t: avx2 avx512f avx512_bf16\n", True),
                       ("flags\t: avx2 amx_tile amx_bf16\n", True), ("Features\t: fp asimd bf16 i8mm\n", True),
                       ("Features\t: fp asimd\n", False)):
        (tmp_path / "cpuinfo").write_text("processor\t: 0\n" + text)
        assert has(str(tmp_path / "cpuinfo")) is want, text
    assert has(str(tmp_path / "absent")) is True
    rng = np.random.default_rng(2)
    stack = _stack(rng, (2, 300, 256), jnp.bfloat16)
    banded = streaming.Banded(jnp.stack([stack[:, :, :128], stack[:, :, 128:]], axis=1))
    x = jnp.asarray(rng.standard_normal((6, 256)), jnp.bfloat16)

    def products(x, stack, banded):
        return (layers.linear(x, stack[0], jnp.bfloat16, transposed=True),
                layers.layer_linear(x, streaming.LayerOf(stack, jnp.int32(1)), jnp.bfloat16),
                layers.layer_linear(x, streaming.LayerOf(banded, jnp.int32(1)), jnp.bfloat16),
                streaming.banded_linear(x, streaming.Banded(banded.blocks[0]), jnp.bfloat16))

    want = [np.asarray(x, np.float64) @ np.asarray(stack[i], np.float64).T for i in (0, 1, 1, 0)]
    with streaming.streaming(True):
        monkeypatch.setenv(streaming.HALF_ENV, "float32")
        assert _dot_operand_dtypes(streaming.serving_products(products), x, stack, banded) == {"float32"}
        assert _dot_operand_dtypes(products, x, stack, banded) == {"bfloat16"}
        for got, w in zip(jax.jit(streaming.serving_products(products))(x, stack, banded), want):
            assert got.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(got, np.float64), w, rtol=2 ** -7, atol=1e-2)
        # a language model head's few rows: converted a chunk at a time, never the whole kernel
        # (XLA would hoist that float32 copy out of a decoding loop and keep it)
        head = _stack(rng, (4096, 512), jnp.bfloat16)
        rows = jnp.asarray(rng.standard_normal((8, 512)), jnp.bfloat16)
        logits = streaming.serving_products(
            lambda a, k: layers.linear(a, k, jnp.bfloat16, transposed=True, out_dtype=jnp.float32))
        shapes = {tuple(e.outvars[0].aval.shape) for e in _eqns(logits, rows, head, name="convert_element_type")}
        assert (4096, 512) not in shapes and any(s[-1] == 512 and s[0] < 4096 for s in shapes), shapes
        want = np.asarray(rows, np.float64) @ np.asarray(head, np.float64).T
        np.testing.assert_allclose(np.asarray(jax.jit(logits)(rows, head)), want, rtol=1e-5, atol=1e-4)
        monkeypatch.setenv(streaming.HALF_ENV, "half")
        assert _dot_operand_dtypes(streaming.serving_products(products), x, stack, banded) == {"bfloat16"}
        monkeypatch.setenv(streaming.HALF_ENV, "fast")
        with pytest.raises(ValueError, match=streaming.HALF_ENV):
            streaming.serving_products(products)(x, stack, banded)
