"""The KV cache's attention against `layers.attention` on explicitly repeated / concatenated
keys: grouped query rows (beams sharing their prompt's keys) and a shared prefix give the same
outputs as copies would, and in-place layer updates land in the right slots."""
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models import kv_cache, layers


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_grouped_prefix_attention_equals_repeated_copies():
    b, g, h, d, p, s = 2, 3, 2, 4, 5, 6
    q = _rand(0, (b * g, 1, h, d))
    pk, pv = _rand(1, (b, h, p, d)), _rand(2, (b, h, p, d))  # one prompt per row of b
    k, v = _rand(3, (b * g, h, s, d)), _rand(4, (b * g, h, s, d))  # one per beam
    key_mask = np.ones((b * g, p + s), bool)
    key_mask[:g, 0] = False  # row 0's prompt is left-padded
    key_mask[:, p + 4:] = False  # generated slots not written yet
    mask = layers.padding_mask(jnp.asarray(key_mask))
    got = kv_cache.attend(q, k, v, mask=mask, scale=0.5, prefix=(pk, pv))

    def token_major(x):  # [B, H, S, D] -> [B, S, H, D]
        return jnp.swapaxes(x, 1, 2)
    full_k = jnp.concatenate([jnp.repeat(pk, g, axis=0), k], axis=2)
    full_v = jnp.concatenate([jnp.repeat(pv, g, axis=0), v], axis=2)
    want = layers.attention(q, token_major(full_k), token_major(full_v), mask=mask, scale=0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    # masked slots really are ignored
    poisoned = k.at[:, :, 4:].set(1e3)
    np.testing.assert_allclose(np.asarray(kv_cache.attend(q, poisoned, v, mask=mask, scale=0.5,
                                                          prefix=(pk, pv))), np.asarray(got))


def test_grouped_attention_without_prefix():
    b, g, h, d, s = 2, 2, 3, 4, 5
    q, k, v = _rand(5, (b * g, 1, h, d)), _rand(6, (b, h, s, d)), _rand(7, (b, h, s, d))
    got = kv_cache.attend(q, k, v)
    want = layers.attention(q, jnp.repeat(jnp.swapaxes(k, 1, 2), g, axis=0),
                            jnp.repeat(jnp.swapaxes(v, 1, 2), g, axis=0))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def test_update_layer_writes_one_layer_at_the_slot():
    cache = kv_cache.init_kv(3, 2, 7, 2, 4)
    new_k, new_v = _rand(8, (2, 2, 2, 4)), _rand(9, (2, 2, 2, 4))  # [B, T, H, D]
    cache, k, v = kv_cache.update_layer(cache, jnp.int32(1), new_k, new_v, jnp.int32(3))
    ck = np.asarray(cache["k"])
    np.testing.assert_array_equal(ck[1, :, :, 3:5], np.swapaxes(np.asarray(new_k), 1, 2))
    assert not ck[[0, 2]].any() and not ck[1, :, :, :3].any() and not ck[1, :, :, 5:].any()
    np.testing.assert_array_equal(np.asarray(k), ck[1])
    np.testing.assert_array_equal(np.asarray(v)[:, :, 3:5], np.swapaxes(np.asarray(new_v), 1, 2))
    pre = kv_cache.with_prefix(cache, kv_cache.init_kv(3, 1, 4, 2, 4))
    assert kv_cache.prefix_length(pre) == 4 and kv_cache.cache_length(pre) == 11
    assert sorted(kv_cache.without_prefix(pre)) == ["k", "v"]
