"""Generation and scoring through the public API against transformers' `generate` outputs.

Every case of tests/golden/blip2_{opt,t5}/reference.json: the reference's new token ids, token
for token (greedy, beam search with length penalties / early stopping / min_new_tokens /
repetition penalty / several returned sequences), and its candidate log-likelihoods within
1e-4. Images are the recorded skimage photos, preprocessed by our processor.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import blip2_jax
from tests.conftest import GOLDEN

skimage_data = pytest.importorskip("skimage.data")
CASES = ("blip2_opt", "blip2_t5")
SCORE_TOL = 1e-4


def reference(case):
    return json.loads((GOLDEN / case / "reference.json").read_text())


@pytest.fixture(scope="module", params=CASES)
def setup(request):
    ref = reference(request.param)
    model = blip2_jax.load(GOLDEN / request.param)
    photos = [getattr(skimage_data, n)() for n in ref["images"]]
    return request.param, model, ref, photos


def generate_case(model, photos, case):
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "do_sample"}
    assert case["kwargs"].get("do_sample", False) is False
    return model.generate_ids([photos[i] for i in case["image_index"]], case["prompts"], **kwargs)



# The fast tier's slice: greedy, plain beam search, and beam search with early stopping.
FAST_CASES = ("greedy_prompts", "beam3", "beam4_lp_neg1_early")


@pytest.mark.parametrize("tier", ["fast", pytest.param("rest", marks=pytest.mark.slow)])
def test_generate_cases(setup, tier):
    _, model, ref, photos = setup
    failures = []
    cases = [c for c in ref["generate"] if (c["name"] in FAST_CASES) == (tier == "fast")]
    assert set(FAST_CASES) <= {c["name"] for c in ref["generate"]}, "a fast case is missing from the goldens"
    for case in cases:
        got = generate_case(model, photos, case)
        if got != case["new_tokens"]:
            failures.append(f"{case['name']}: got {got}, expected {case['new_tokens']}")
    assert not failures, "\n".join(failures)


def test_eos_and_early_stopping_paths_are_exercised(setup):
    """The goldens hit EOS in some cases, so trimming and early stopping are really tested."""
    _, _, ref, _ = setup
    assert any(any(c["hit_eos"]) for c in ref["generate"])
    assert any(c["kwargs"].get("early_stopping") for c in ref["generate"])


def test_text_output_is_the_decoded_ids(setup):
    _, model, ref, photos = setup
    case = ref["generate"][0]
    texts = model.generate([photos[i] for i in case["image_index"]], case["prompts"],
                           max_new_tokens=case["kwargs"]["max_new_tokens"])
    assert texts == [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in case["new_tokens"]]


def test_scores(setup):
    _, model, ref, photos = setup
    for case in ref["score"]:
        ll, n = model.score(photos[case["image_index"]], case["prompt"], case["texts"], return_num_tokens=True)
        np.testing.assert_allclose(ll, case["log_likelihood"], rtol=0, atol=SCORE_TOL)
        assert n.tolist() == case["num_tokens"]


def test_scores_batched_over_images(setup):
    """Two images with their own prompts and candidate lists in one call = one call each."""
    _, model, ref, photos = setup
    a, b = ref["score"][:2]
    ll = model.score([photos[a["image_index"]], photos[b["image_index"]]], [a["prompt"], b["prompt"]],
                     [a["texts"], b["texts"]])
    np.testing.assert_allclose(ll, [a["log_likelihood"], b["log_likelihood"]], rtol=0, atol=SCORE_TOL)


def test_same_bucket_does_not_recompile(setup):
    """Prompts of another length in the same length bucket reuse the compiled program."""
    _, model, ref, photos = setup
    case = next(c for c in ref["generate"] if c["name"] == "greedy_prompts")

    def longest(prompts):
        return max(len(model.tokenizer(p)["input_ids"]) for p in prompts)

    n = longest(case["prompts"])
    others = [["a picture of", "Question: " + q + "? Answer:"] for q in
              ("what is it", "what is in it", "what is in the image", "what is shown", "who is it")]
    others = [p for p in others if longest(p) != n and model.predictor.bucket(longest(p)) == model.predictor.bucket(n)]
    assert others, "no prompt pair of another length in the same bucket"
    generate_case(model, photos, case)
    size = model.predictor._generate._cache_size()
    model.generate_ids([photos[0], photos[1]], others[0], max_new_tokens=case["kwargs"]["max_new_tokens"])
    assert model.predictor._generate._cache_size() == size


def test_sampling_top_k_1_is_greedy(setup):
    """Sampling restricted to the single best token must reproduce the reference's greedy ids."""
    _, model, ref, photos = setup
    case = next(c for c in ref["generate"] if c["name"] == "greedy_no_prompt")
    got = model.generate_ids([photos[i] for i in case["image_index"]], case["prompts"], do_sample=True,
                             top_k=1, seed=3, max_new_tokens=case["kwargs"]["max_new_tokens"])
    assert got == case["new_tokens"]


def test_sampling_is_seeded(setup):
    _, model, _, photos = setup
    kw = dict(do_sample=True, top_k=0, temperature=1.5, max_new_tokens=6, num_return_sequences=2)
    a = model.generate_ids(photos[:2], None, seed=1, **kw)
    assert len(a) == 4
    assert a == model.generate_ids(photos[:2], None, seed=1, **kw)
    assert a != model.generate_ids(photos[:2], None, seed=2, **kw)


def test_empty_prompt_without_bos_matches_transformers(tmp_path):
    """blip2_opt with a tokenizer that adds no BOS (GPT-2 as transformers saves it) and the
    prompt "": the reference generates from the query embeddings alone (golden: no_bos/)."""
    src, d = GOLDEN / "blip2_opt", tmp_path / "blip2_opt_no_bos"
    d.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "reference")):
            (d / f.name).symlink_to(f)
    for f in (src / "no_bos").glob("tokenizer*"):
        (d / f.name).symlink_to(f)
    ref = json.loads((src / "no_bos" / "reference.json").read_text())
    model = blip2_jax.load(d)
    assert model.tokenizer("")["input_ids"] == []
    photos = [getattr(skimage_data, n)() for n in ref["images"]]
    for case in ref["generate"]:
        assert generate_case(model, photos, case) == case["new_tokens"], case["name"]
