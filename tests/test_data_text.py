"""Caption normalisation, offline tokenizers and the text processors' exact layouts.

Expected ids are bert-base-uncased's and GPT-2's published vocabularies ([CLS]=101, [SEP]=102,
"a"=1037, "photo"=6302, "of"=1997, "dog"=3899; GPT-2 "Hello"=15496, " world"=995, "\\n"=198).
"""
import json

import numpy as np
import pytest

from blip2_jax.data import text
from blip2_jax.data.tokenizers import Tokenizer, from_transformers_dir, load_tokenizer

BERT = load_tokenizer("bert-base-uncased-offline")
GPT2 = load_tokenizer("gpt2-offline")


def test_normalize_caption_like_blip():
    assert text.normalize_caption('  A Dog (brown)!  runs: "fast"...\n') == "a dog brown runs fast"
    assert text.normalize_caption("it's a dog, isn't it?") == "it's a dog, isn't it?"
    assert text.normalize_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert text.normalize_caption("...") == ""
    assert text.normalize_question("What colour is it?!") == "what colour is it?"
    assert text.normalize_question("Is (this) a cat.") == "is this a cat"


def test_offline_tokenizers_ids():
    assert BERT.encode("A photo of a Dog") == [1037, 6302, 1997, 1037, 3899]
    assert (BERT.prefix, BERT.suffix, BERT.pad_id, BERT.dec_id) == ((101,), (102,), 0, 30522)
    assert BERT.vocab_size == 30523  # bert-base-uncased + [DEC]
    assert GPT2.encode("Hello world\n") == [15496, 995, 198]
    assert (GPT2.prefix, GPT2.suffix, GPT2.pad_id) == ((), (), 50256)
    assert GPT2.decode(GPT2.encode("a photo of a dog\n")) == "a photo of a dog\n"


def test_qformer_text_layout():
    out = text.qformer_text("a photo of a dog", BERT, 8)
    np.testing.assert_array_equal(out["qformer_input_ids"], [101, 1037, 6302, 1997, 1037, 3899,
                                                             102, 0])
    np.testing.assert_array_equal(out["qformer_attention_mask"], [1] * 7 + [0])
    np.testing.assert_array_equal(out["qformer_dec_input_ids"][:2], [30522, 1037])
    short = text.qformer_text("a photo of a dog", BERT, 5)  # truncation keeps [SEP]
    np.testing.assert_array_equal(short["qformer_input_ids"], [101, 1037, 6302, 1997, 102])


def test_decoder_only_lm_masks_prompt_and_padding():
    opt_like = Tokenizer(GPT2.backend, pad_id=1, bos_id=2, eos_id=2, prefix=(2,))
    out = text.decoder_only_lm("a photo of", "a dog\n", opt_like, 10)
    a, photo, of, dog, nl = 64, 4590, 286, 3290, 198  # " a" = 257
    np.testing.assert_array_equal(out["llm_input_ids"], [2, a, photo, of, 257, dog, nl, 1, 1, 1])
    np.testing.assert_array_equal(out["llm_attention_mask"], [1] * 7 + [0] * 3)
    np.testing.assert_array_equal(out["llm_labels"],
                                  [-100] * 4 + [257, dog, nl] + [-100] * 3)
    # joined tokenisation is identical to tokenising prompt and target apart
    assert opt_like.encode("a photo of a dog\n") == [a, photo, of, 257, dog, nl]
    cut = text.decoder_only_lm("", "a dog\n", opt_like, 3)
    np.testing.assert_array_equal(cut["llm_input_ids"], [2, a, dog])
    np.testing.assert_array_equal(cut["llm_labels"], [-100, a, dog])


def test_encoder_decoder_lm_layout():
    t5_like = Tokenizer(GPT2.backend, pad_id=0, eos_id=1, suffix=(1,), decoder_start_id=0)
    out = text.encoder_decoder_lm("a photo of", "a dog", t5_like, 6, 5)
    np.testing.assert_array_equal(out["llm_input_ids"], [64, 4590, 286, 1, 0, 0])
    np.testing.assert_array_equal(out["llm_attention_mask"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["llm_labels"], [64, 3290, 1, -100, -100])
    np.testing.assert_array_equal(out["llm_decoder_input_ids"], [0, 64, 3290, 0, 0])
    np.testing.assert_array_equal(out["llm_decoder_attention_mask"], [1, 1, 1, 0, 0])


def test_prompt_ids_padding_sides():
    opt_like = Tokenizer(GPT2.backend, pad_id=1, bos_id=2, eos_id=2, prefix=(2,))
    left = text.prompt_ids("Question: hi Answer:", opt_like, 8, "left")
    ids = [2] + GPT2.encode("Question: hi Answer:")
    assert len(ids) == 6
    np.testing.assert_array_equal(left["llm_input_ids"], [1, 1] + ids)
    np.testing.assert_array_equal(left["llm_attention_mask"], [0, 0] + [1] * 6)


def test_prefix_split_covers_caption():
    rng = np.random.default_rng(0)
    cuts = set()
    for _ in range(50):
        prefix, suffix = text.split_prefix("a b c d", rng)
        assert suffix and (prefix + " " + suffix).strip() == "a b c d"
        cuts.add(prefix)
    assert cuts == {"", "a", "a b", "a b c"}


def test_processor_vqa_puts_question_in_qformer():
    p = text.TextProcessor("opt_vqa", qformer_tokenizer=BERT, llm_tokenizer=GPT2,
                           max_text_len=6, max_llm_len=16)
    out = p({"question": "a dog", "answer": "yes"}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["qformer_input_ids"], [101, 1037, 3899, 102, 0, 0])
    prompt = GPT2.encode("Question: a dog Answer:")
    n = len(prompt)
    np.testing.assert_array_equal(out["llm_input_ids"][:n + 2],
                                  prompt + GPT2.encode(" yes\n"))
    assert (out["llm_labels"][:n] == -100).all() and out["llm_labels"][n] == GPT2.encode(" yes")[0]
    with pytest.raises(ValueError, match="unknown text_processor"):
        text.TextProcessor("nope")


def test_transformers_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    plain = load_tokenizer("bert-base-uncased-offline")
    hf = PreTrainedTokenizerFast(tokenizer_object=plain.backend, cls_token="[CLS]",
                                 sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    from tokenizers.processors import TemplateProcessing
    hf.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    hf.save_pretrained(tmp_path)
    tok = from_transformers_dir(tmp_path, add_dec=True)
    assert (tok.prefix, tok.suffix, tok.pad_id) == ((101,), (102,), 0)
    assert tok.encode("a photo") == [1037, 6302]
    assert tok.dec_id == 30522


GOLDEN_TOKENIZERS = ["blip2_opt", "blip2_opt/no_bos", "blip2_t5", "blip2_itm"]


@pytest.mark.parametrize("name", GOLDEN_TOKENIZERS)
@pytest.mark.parametrize("add_dec", [False, True])
def test_cached_tokenizer_is_transformers_own(tmp_path, monkeypatch, name, add_dec):
    from blip2_jax.data import tokenizers
    from tests.conftest import GOLDEN
    monkeypatch.setenv(tokenizers.CACHE_ENV, str(tmp_path))
    d = GOLDEN / name
    built = tokenizers._with_transformers(d, add_dec)       # what transformers makes of the files
    first = from_transformers_dir(d, add_dec=add_dec)       # built, then written to the cache
    assert len(list(tmp_path.iterdir())) == 1
    cached = from_transformers_dir(d, add_dec=add_dec)      # read back
    text = "A Photo of 2 cats, ünïcode [DEC] <image> </s> tail"
    for tok in (first, cached):
        assert {k: getattr(tok, k) for k in tokenizers._IDS} == {k: getattr(built, k) for k in tokenizers._IDS}
        assert tok.encode(text) == built.encode(text) and tok.vocab_size == built.vocab_size
        assert tok.decode(built.encode(text)) == built.decode(built.encode(text))


def test_tokenizer_cache_hit_does_not_import_transformers(tmp_path):
    import subprocess
    import sys

    from tests.conftest import GOLDEN, ROOT
    code = ("import sys; from blip2_jax.data.tokenizers import from_transformers_dir; "
            f"t = from_transformers_dir({str(GOLDEN / 'blip2_opt')!r}); "
            "print(t.prefix, 'transformers' in sys.modules)")
    env = dict(__import__("os").environ, BLIP2_JAX_TOKENIZER_CACHE=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True).stdout.split()[-2:] for _ in range(2)]
    assert runs == [["(50256,)", "True"], ["(50256,)", "False"]]   # built once, then read


def test_a_damaged_or_stale_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    from blip2_jax.data import tokenizers
    from tests.conftest import GOLDEN
    monkeypatch.setenv(tokenizers.CACHE_ENV, str(tmp_path))
    d = tmp_path / "tok"
    import shutil
    shutil.copytree(GOLDEN / "blip2_itm", d, ignore=shutil.ignore_patterns("*.safetensors"))
    good = from_transformers_dir(d)
    (entry,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    entry.write_text("{broken")
    assert from_transformers_dir(d).prefix == good.prefix            # rebuilt, and rewritten
    assert json.loads(entry.read_text())["prefix"] == list(good.prefix)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["cls_token"] = "[SEP]"                                      # other files: another key
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    from_transformers_dir(d)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".json"]) == 2
