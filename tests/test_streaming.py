"""models/streaming.py: the few-row CPU product that streams [out, in] weights."""
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
