"""Decoding loops against transformers' own outputs and an independent loop-based reference.

The language model is a stub with fixed float32 tables (see tools/make_decoding_golden.py):
    logits(x_0..x_{m-1}) = ((T[x_{m-1}] + acc) + S[m]) [+ U[x_{m-2}]]
    acc = ((G[x_0] + G[x_1]) + ...) + G[x_{m-1}]
In JAX, `acc` and the token history (for the optional trigram term U) live in the cache, so a
wrong beam reorder of the cache changes the logits and the results.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import decoding
from tests.conftest import GOLDEN

GOLDEN_FILE = GOLDEN / "decoding" / "hf_decoding.npz"
HF_PAD = 1
with np.load(GOLDEN_FILE) as _g:
    N_GREEDY = len(json.loads(str(_g["greedy_configs"])))
    N_BEAM = len(json.loads(str(_g["beam_configs"])))


# ----------------------------------------------------------------------------------------------
# The stub model, in numpy (for the reference) and in JAX (prefill + step_fn with a cache)
# ----------------------------------------------------------------------------------------------
class Stub:
    def __init__(self, t, g, s, prompt, u=None, split_axes=False):
        self.t, self.g, self.s, self.u = t, g, s, u
        self.prompt = np.asarray(prompt)
        self.split_axes = split_axes

    def np_logits(self, seq) -> np.ndarray:
        acc = np.zeros(self.t.shape[1], np.float32)
        for x in seq:
            acc = acc + self.g[x]
        out = (self.t[seq[-1]] + acc) + self.s[len(seq)]
        if self.u is not None:
            out = out + self.u[seq[-2]]
        return out

    def prefill(self):
        """-> first_logits [B, V], cache; the prompt run through the model."""
        b, p = self.prompt.shape
        first = np.stack([self.np_logits(list(row)) for row in self.prompt])
        acc = np.zeros((b, self.t.shape[1]), np.float32)
        for i in range(p):
            acc = acc + self.g[self.prompt[:, i]]
        hist = np.zeros((1, b, self.s.shape[0]), np.int32)
        hist[0, :, :p] = self.prompt
        cache = {"acc": jnp.asarray(acc if self.split_axes else acc[None]), "hist": jnp.asarray(hist)}
        if self.split_axes:  # plus a leaf without a batch axis, carried as is
            cache["length"] = jnp.int32(p)
        return jnp.asarray(first), cache

    @property
    def cache_axes(self):
        return {"acc": 0, "hist": 1, "length": None} if self.split_axes else 1

    def step_fn(self, tokens, cache, step):
        t, g, s = jnp.asarray(self.t), jnp.asarray(self.g), jnp.asarray(self.s)
        p = self.prompt.shape[1]
        acc = cache["acc"] + (g[tokens] if self.split_axes else g[tokens][None])
        acc_rows = acc if self.split_axes else acc[0]
        logits = (t[tokens] + acc_rows) + s[p + step + 1]
        hist = jax.lax.dynamic_update_slice(cache["hist"], tokens[None, :, None], (0, 0, p + step))
        if self.u is not None:
            prev = jax.lax.dynamic_index_in_dim(hist[0], p + step - 1, axis=1, keepdims=False)
            logits = logits + jnp.asarray(self.u)[prev]
        new_cache = {"acc": acc, "hist": hist}
        if self.split_axes:
            new_cache["length"] = cache["length"] + 1
        return logits, new_cache


# ----------------------------------------------------------------------------------------------
# Independent, loop-based reference of transformers' rules (generation.md), one row at a time
# ----------------------------------------------------------------------------------------------
def np_log_softmax(x):
    x = x.astype(np.float32)
    y = x - x.max()
    return y - np.log(np.sum(np.exp(y)))


def np_process(scores, seen, t, *, rep, min_new, eos):
    scores = scores.copy()
    if rep != 1.0:
        for tok in seen:
            v = scores[tok]
            scores[tok] = v * np.float32(rep) if v < 0 else v / np.float32(rep)
    if t < min_new:
        for e in eos:
            scores[e] = -np.inf
    return scores


def ref_greedy(stub, seen0, *, max_new, min_new, rep, eos, pad):
    eos = [eos] if isinstance(eos, int) else list(eos)
    out = []
    for b, row in enumerate(stub.prompt):
        toks, seen, done = [], set(seen0[b]), False
        for t in range(max_new):
            if done:
                toks.append(pad)
                continue
            s = np_process(stub.np_logits(list(row) + toks), seen, t, rep=rep, min_new=min_new, eos=eos)
            tok = int(np.argmax(s))
            toks.append(tok)
            seen.add(tok)
            done = tok in eos
        out.append(toks)
    return np.array(out)


def ref_beam_row(stub, row, seen0, *, beams, max_new, min_new, lp_, es, rep, eos):
    """transformers' beam search for one batch item -> kept hypotheses [(score, tokens)], best first."""
    vocab = stub.t.shape[1]
    n_cand = max(2, 1 + len(eos)) * beams
    live = [([], np.float32(0.0))] + [([], np.float32(-1e9))] * (beams - 1)
    hyps, improvable = [], True
    for t in range(max_new):
        cands = []
        for bi, (toks, score) in enumerate(live):
            logp = np_log_softmax(stub.np_logits(list(row) + toks))
            logp = np_process(logp, set(seen0) | set(toks), t, rep=rep, min_new=min_new, eos=eos)
            for v in range(vocab):
                cands.append((np.float32(score + logp[v]), bi * vocab + v, bi, v))
        cands = sorted(cands, key=lambda c: (-c[0], c[1]))[:n_cand]
        next_live = []
        for rank, (score, _, bi, v) in enumerate(cands):
            toks = live[bi][0] + [v]
            if v in eos or t + 1 == max_new:
                if rank < beams:  # only the first `beams` ranks may finish
                    norm = np.float32(float(t + 1) ** lp_)
                    hyps.append((np.float32(score / norm), toks))
            elif len(next_live) < beams:
                next_live.append((toks, score))
        hyps = sorted(hyps, key=lambda h: -h[0])[:beams]
        if t + 1 == max_new:
            break
        live = next_live
        length = max_new if (es == "never" and lp_ > 0) else t + 1
        best_possible = live[0][1] / np.float32(float(length) ** lp_)
        if len(hyps) == beams and not best_possible > hyps[-1][0]:
            improvable = False
        if not improvable or (es is True and len(hyps) == beams):
            break
    return hyps


def ref_beam(stub, seen0, *, beams, max_new, min_new, lp_, es, rep, ret, eos, pad):
    eos = [eos] if isinstance(eos, int) else list(eos)
    fill = pad if pad else eos[0]
    tokens = np.full((len(stub.prompt), ret, max_new), fill, np.int64)
    scores = np.zeros((len(stub.prompt), ret), np.float32)
    for b, row in enumerate(stub.prompt):
        hyps = ref_beam_row(stub, row, seen0[b], beams=beams, max_new=max_new, min_new=min_new,
                            lp_=lp_, es=es, rep=rep, eos=eos)
        assert len(hyps) >= ret
        for r, (score, toks) in enumerate(hyps[:ret]):
            tokens[b, r, :len(toks)] = toks
            scores[b, r] = score
    return tokens, scores


# ----------------------------------------------------------------------------------------------
# Jitted runners (one compile per config)
# ----------------------------------------------------------------------------------------------
def run_greedy(stub, presence, **kw):
    first, cache = stub.prefill()
    fn = jax.jit(lambda f, c, p: decoding.greedy_search(f, c, stub.step_fn, presence=p, **kw))
    return np.asarray(fn(first, cache, presence))


def run_beam(stub, presence, **kw):
    first, cache = stub.prefill()
    fn = jax.jit(lambda f, c, p: decoding.beam_search(
        f, c, stub.step_fn, presence=p, cache_batch_axis=stub.cache_axes, **kw))
    tokens, scores = fn(first, cache, presence)
    return np.asarray(tokens), np.asarray(scores)


def beam_kwargs(c):
    return dict(num_beams=c["beams"], max_new_tokens=c["max_new"], min_new_tokens=c["min_new"],
                length_penalty=c["lp"], early_stopping=c["es"], repetition_penalty=c["rep"],
                num_return_sequences=c["ret"], eos_token_id=c["eos"], pad_token_id=c["pad"])


def ref_kwargs(c):
    return dict(beams=c["beams"], max_new=c["max_new"], min_new=c["min_new"], lp_=c["lp"],
                es=c["es"], rep=c["rep"], ret=c["ret"], eos=c["eos"], pad=c["pad"])


def pad_to(x, n, fill):
    out = np.full(x.shape[:-1] + (n,), fill, x.dtype)
    out[..., :x.shape[-1]] = x
    return out


@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN_FILE)
    stub = Stub(data["T"], data["G"], data["S"], data["prompt"])
    counted = decoding.repetition_counted_positions(data["prompt_mask"])
    presence = decoding.token_presence(data["prompt"], data["T"].shape[1], counted)
    seen = [set(np.flatnonzero(r)) for r in np.asarray(presence)]
    return dict(data=data, stub=stub, presence=presence, seen=seen,
                greedy=json.loads(str(data["greedy_configs"])), beam=json.loads(str(data["beam_configs"])))


# ----------------------------------------------------------------------------------------------
# Against transformers' outputs
# ----------------------------------------------------------------------------------------------
def test_golden_presence_skips_leading_pads(golden):
    # Row 0 is [pad, pad, 5, 9, 2] with the pads masked: transformers does not count them.
    assert golden["seen"][0] == {5, 9, 2}
    assert golden["seen"][1] == {11, 4, 20, 13}


@pytest.mark.parametrize("i", range(N_GREEDY))
def test_greedy_matches_transformers(golden, i):
    c = golden["greedy"][i]
    hf = golden["data"][f"greedy{i}_tokens"]
    hf = pad_to(hf, c["max_new"], HF_PAD)
    kw = dict(max_new_tokens=c["max_new"], min_new_tokens=c["min_new"], eos_token_id=c["eos"],
              pad_token_id=HF_PAD, repetition_penalty=c["rep"])
    ours = run_greedy(golden["stub"], golden["presence"], **kw)
    ref = ref_greedy(golden["stub"], golden["seen"], max_new=c["max_new"], min_new=c["min_new"],
                     rep=c["rep"], eos=c["eos"], pad=HF_PAD)
    np.testing.assert_array_equal(ref, hf)  # the reference loop itself agrees with transformers
    np.testing.assert_array_equal(ours, hf)


@pytest.mark.parametrize("i", range(N_BEAM))
def test_beam_search_matches_transformers(golden, i):
    c = golden["beam"][i]
    eos0 = c["eos"] if isinstance(c["eos"], int) else c["eos"][0]
    fill = c["pad"] if c["pad"] else eos0
    hf_tokens = pad_to(golden["data"][f"beam{i}_tokens"], c["max_new"], fill)
    hf_scores = golden["data"][f"beam{i}_scores"]
    ref_tokens, ref_scores = ref_beam(golden["stub"], golden["seen"], **ref_kwargs(c))
    np.testing.assert_array_equal(ref_tokens, hf_tokens)
    np.testing.assert_allclose(ref_scores, hf_scores, rtol=1e-6, atol=1e-6)
    tokens, scores = run_beam(golden["stub"], golden["presence"], **beam_kwargs(c))
    np.testing.assert_array_equal(tokens, hf_tokens)
    np.testing.assert_allclose(scores, hf_scores, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Against the loop reference on more configs (trigram stub: the cached history matters too)
# ----------------------------------------------------------------------------------------------
VOCAB, PLEN, MAXLEN = 20, 4, 32


def random_stub(seed, split_axes):
    rng = np.random.default_rng(seed)
    t = (rng.standard_normal((VOCAB, VOCAB)) * 1.0).astype(np.float32)
    g = (rng.standard_normal((VOCAB, VOCAB)) * 0.4).astype(np.float32)
    u = (rng.standard_normal((VOCAB, VOCAB)) * 0.5).astype(np.float32)
    s = (rng.standard_normal((MAXLEN + 1, VOCAB)) * 0.3).astype(np.float32)
    s[:, 2] += (-3.5 + 0.7 * (np.arange(MAXLEN + 1) - PLEN)).astype(np.float32)
    prompt = rng.integers(3, VOCAB, size=(3, PLEN))
    return Stub(t, g, s, prompt, u=u, split_axes=split_axes)


EXTRA = [
    dict(seed=10, beams=3, max_new=10, min_new=0, lp=1.0, es=False, rep=1.0, ret=3, eos=2, pad=0),
    dict(seed=11, beams=4, max_new=9, min_new=3, lp=2.0, es=True, rep=1.25, ret=2, eos=2, pad=5),
    dict(seed=12, beams=2, max_new=11, min_new=0, lp=-1.0, es=False, rep=0.9, ret=1, eos=[2, 9], pad=5),
    dict(seed=13, beams=5, max_new=8, min_new=2, lp=0.0, es="never", rep=1.0, ret=5, eos=2, pad=5),
    dict(seed=14, beams=3, max_new=10, min_new=0, lp=1.5, es="never", rep=1.1, ret=2, eos=2, pad=5),
]


@pytest.mark.parametrize("c", EXTRA, ids=lambda c: f"seed{c['seed']}")
def test_beam_search_matches_loop_reference(c):
    stub = random_stub(c["seed"], split_axes=c["seed"] % 2 == 0)
    presence = decoding.token_presence(stub.prompt, VOCAB)
    seen = [set(int(x) for x in row) for row in stub.prompt]
    ref_tokens, ref_scores = ref_beam(stub, seen, **ref_kwargs(c))
    tokens, scores = run_beam(stub, presence, **beam_kwargs(c))
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)


def test_stub_depends_on_cached_history():
    # Guards the tests above: if G or U did not matter, a broken cache reorder would go unseen.
    c = EXTRA[0]
    stub = random_stub(c["seed"], split_axes=False)
    seen = [set(int(x) for x in row) for row in stub.prompt]
    base = ref_beam(stub, seen, **ref_kwargs(c))[0]
    for field in ("g", "u"):
        other = random_stub(c["seed"], split_axes=False)
        setattr(other, field, np.zeros_like(getattr(other, field)))
        assert not np.array_equal(ref_beam(other, seen, **ref_kwargs(c))[0], base), field


def test_greedy_matches_argmax_loop_with_eos_list():
    stub = random_stub(21, split_axes=False)
    presence = decoding.token_presence(stub.prompt, VOCAB)
    seen = [set(int(x) for x in row) for row in stub.prompt]
    kw = dict(max_new=12, min_new=3, rep=1.3, eos=[2, 7], pad=0)
    ref = ref_greedy(stub, seen, **kw)
    ours = run_greedy(stub, presence, max_new_tokens=12, min_new_tokens=3, repetition_penalty=1.3,
                      eos_token_id=[2, 7], pad_token_id=0)
    np.testing.assert_array_equal(ours, ref)


def test_first_argmax_equals_argmax():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(6, 1000)) * 2).astype(np.float32)  # many ties
    x[1, :] = -np.inf
    x[2, [3, 700]] = np.nan
    x[3, 5], x[3, 9] = np.inf, np.nan
    x[4, 10:] = x[4].max() + 1
    want = np.argmax(x, axis=-1)  # numpy and jnp.argmax agree: first max, NaN wins
    np.testing.assert_array_equal(np.asarray(jnp.argmax(x, axis=-1)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(decoding.first_argmax)(x)), want)


def test_loop_traces_model_once():
    # No per-token Python dispatch: step_fn is traced a fixed number of times, whatever max_new.
    stub = random_stub(30, split_axes=False)
    traces = []

    def counting_step(tokens, cache, step):
        traces.append(1)
        return stub.step_fn(tokens, cache, step)

    first, cache = stub.prefill()
    for max_new in (4, 12):
        traces.clear()
        jax.jit(lambda f, c: decoding.beam_search(
            f, c, counting_step, num_beams=2, max_new_tokens=max_new, eos_token_id=2,
            pad_token_id=0))(first, cache)
        assert 1 <= len(traces) <= 2


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def run_sample(stub, presence, rng, **kw):
    first, cache = stub.prefill()
    fn = jax.jit(lambda f, c, p, r: decoding.sample(f, c, stub.step_fn, rng=r, presence=p, **kw))
    return np.asarray(fn(first, cache, presence, rng))


def test_sample_top_k_1_is_greedy():
    stub = random_stub(40, split_axes=False)
    presence = decoding.token_presence(stub.prompt, VOCAB)
    common = dict(max_new_tokens=10, min_new_tokens=2, eos_token_id=2, pad_token_id=0,
                  repetition_penalty=1.2)
    greedy = run_greedy(stub, presence, **common)
    for seed in range(3):
        sampled = run_sample(stub, presence, jax.random.key(seed), temperature=0.7, top_k=1,
                             top_p=0.9, **common)
        np.testing.assert_array_equal(sampled, greedy)


def test_sample_reproducible_with_seed():
    stub = random_stub(41, split_axes=False)
    presence = decoding.token_presence(stub.prompt, VOCAB)
    kw = dict(max_new_tokens=10, eos_token_id=2, pad_token_id=0, temperature=1.5, top_k=0)
    a = run_sample(stub, presence, jax.random.key(7), **kw)
    b = run_sample(stub, presence, jax.random.key(7), **kw)
    c = run_sample(stub, presence, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def constant_model(logits_row, batch):
    """A model whose next-token logits never change."""
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32), (batch, 1))
    return logits, {"dummy": jnp.zeros((1, batch))}, lambda tok, cache, step: (logits, cache)


def test_sample_frequencies_follow_filtered_distribution():
    # top_p=0.8: ascending cumulative 0.05, 0.15 | 0.30, 0.60, 1.0 -> drop those <= 0.2,
    # keep 0.15, 0.3, 0.4 renormalised.
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    first, cache, step = constant_model(np.log(probs), 256)
    tokens = np.asarray(jax.jit(lambda r: decoding.sample(
        first, cache, step, rng=r, max_new_tokens=16, eos_token_id=None, pad_token_id=0,
        top_k=0, top_p=0.8))(jax.random.key(0)))
    counts = np.bincount(tokens.ravel(), minlength=5) / tokens.size
    kept = np.array([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert counts[0] == 0 and counts[2] == 0
    sigma = np.sqrt(kept * (1 - kept) / tokens.size)
    np.testing.assert_array_less(np.abs(counts - kept), 5 * sigma + 1e-9)


def test_sample_temperature_and_top_k():
    # top_k=2 keeps {1, 3}; temperature 0.5 squares the odds: 0.4^2 : 0.3^2 = 16 : 9.
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    first, cache, step = constant_model(np.log(probs), 256)
    tokens = np.asarray(jax.jit(lambda r: decoding.sample(
        first, cache, step, rng=r, max_new_tokens=16, eos_token_id=None, pad_token_id=0,
        temperature=0.5, top_k=2))(jax.random.key(1)))
    counts = np.bincount(tokens.ravel(), minlength=5) / tokens.size
    expected = np.array([0, 16, 0, 9, 0]) / 25
    sigma = np.sqrt(expected * (1 - expected) / tokens.size)
    np.testing.assert_array_less(np.abs(counts - expected), 5 * sigma + 1e-9)


# ----------------------------------------------------------------------------------------------
# Processors on hand-made inputs
# ----------------------------------------------------------------------------------------------
def test_top_p_keeps_smallest_nucleus():
    scores = jnp.log(jnp.asarray([[0.1, 0.4, 0.05, 0.3, 0.15],
                                  [0.1, 0.4, 0.05, 0.3, 0.15],
                                  [0.7, 0.1, 0.1, 0.05, 0.05]], jnp.float32))
    keep = np.isfinite(np.asarray(jnp.concatenate([
        decoding.top_p_filter(scores[:2], 0.65), decoding.top_p_filter(scores[2:], 0.5)])))
    # rows 0-1 (p=0.65): ascending cumulative 0.05, 0.15, 0.30 | 0.60, 1.0 -> drop those <= 0.35.
    np.testing.assert_array_equal(keep[0], [False, True, False, True, False])
    np.testing.assert_array_equal(keep[1], [False, True, False, True, False])
    # row 2 (p=0.5): only the top token survives (min_tokens_to_keep=1 never drops it).
    np.testing.assert_array_equal(keep[2], [True, False, False, False, False])


def test_top_k_keeps_boundary_ties():
    scores = jnp.asarray([[1.0, 3.0, 2.0, 2.0, 0.5]])
    np.testing.assert_array_equal(np.isfinite(decoding.top_k_filter(scores, 2)),
                                  [[False, True, True, True, False]])


def test_repetition_penalty_and_min_tokens_by_hand():
    scores = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
    presence = jnp.asarray([[True, True, False, False]])
    out = decoding.process_scores(scores, presence, jnp.int32(0), repetition_penalty=2.0,
                            min_new_tokens=1, eos_ids=(3,))
    np.testing.assert_array_equal(out, [[1.0, -4.0, 1.0, -math.inf]])
    out = decoding.process_scores(scores, presence, jnp.int32(1), repetition_penalty=2.0,
                            min_new_tokens=1, eos_ids=(3,))
    np.testing.assert_array_equal(out, [[1.0, -4.0, 1.0, -1.0]])


def test_presence_helpers():
    ids = jnp.asarray([[1, 1, 4, 2, 1], [0, 3, 3, 9, 1]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 0, 1, 1]])
    counted = decoding.repetition_counted_positions(mask)
    np.testing.assert_array_equal(counted, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pres = np.asarray(decoding.token_presence(ids, 5, counted))  # 9 is outside the vocab: ignored
    np.testing.assert_array_equal(pres, [[0, 1, 1, 0, 1], [1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(decoding.add_tokens(jnp.asarray(pres), jnp.asarray([3, 7]))[:, 3], [1, 1])
