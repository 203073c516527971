"""Evaluators on tiny fake corpora with fake predictors (hand-computed scores), and the model
predictor against transformers' generation and ITM/ITC references."""
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from blip2_jax.data import builders
from blip2_jax.data import transforms
from blip2_jax.evaluators import base, caption, registry, retrieval, vqa
from tests.conftest import GOLDEN
from tests.test_data_builders import _jpeg, _vqa_copy, _write


# ------------------------------------------------------------------------------ fakes
class FakePredictor:
    """Answers from a prompt -> text table; retrieval features from the images' colours."""

    def __init__(self, answers=None, llm_kind="t5", default=""):
        self.answers, self.llm_kind, self.default = answers or {}, llm_kind, default
        self.calls, self.params = [], None

    def set_params(self, params):
        self.params = params

    def generate(self, pixel_values, prompts, **options):
        self.calls.append((len(pixel_values), list(prompts), options))
        return [self.answers.get(p, self.default) for p in prompts]

    # Image i of the retrieval corpus is a solid red of 40 * i: its index comes back from the
    # normalised pixels. ITC: query 0 is one-hot(index), query 1 zeros.
    def _index(self, pixel_values):
        red = (np.asarray(pixel_values)[:, :, :, 0].mean((1, 2)) * transforms.CLIP_STD[0]
               + transforms.CLIP_MEAN[0]) * 255
        return np.rint(red / 40).astype(int)

    def image_features(self, pixel_values):
        idx = self._index(pixel_values)
        feats = np.zeros((len(idx), 2, 8), np.float32)
        feats[np.arange(len(idx)), 0, idx] = 1
        return {"image_embeds": idx[:, None, None].astype(np.float32), "image_feats": feats}

    def qformer_tokens(self, texts, max_len):  # token 0: the image number, token 1: "alt"
        ids = np.zeros((len(texts), max_len), np.int32)
        for i, t in enumerate(texts):
            ids[i, 0] = int(re.search(r"\d+", t).group())
            ids[i, 1] = "alt" in t
        return ids, np.ones_like(ids)

    def text_features(self, ids, mask):
        # "picture i": one-hot(i); "picture i alt": ITC prefers image i+1 (1.1), image i second
        # (0.5). (Not normalised: only the order matters.)
        feats = np.zeros((len(ids), 8), np.float32)
        for r, (n, alt) in enumerate(ids[:, :2]):
            if alt:
                feats[r, (n + 1) % 4], feats[r, n] = 1.1, 0.5
            else:
                feats[r, n] = 1.0
        return feats

    def itm_scores(self, image_embeds, ids, mask):
        return np.where(image_embeds[:, 0, 0] == ids[:, 0], 5.0, 0.0)


def _config(kind, tmp_path, manual, dataset, split, **fields):
    c = base.base_config(kind)
    c.input.update(dict(dataset=dataset, split=split, data_dir=str(tmp_path / "tfds"),
                        manual_dir=str(manual), batch_size=8, image_size=16, read_threads=1))
    c.output_dir = str(tmp_path / "out")
    c.progress = False
    for k, v in fields.items():
        c[k] = v
    return c


def _read(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ VQA
def test_vqav2_accuracy_prompts_and_submission_file(tmp_path):
    manual = tmp_path / "vqa"
    _vqa_copy(manual, "v2_OpenEnded_mscoco_val2014_questions.json",
              "v2_mscoco_val2014_annotations.json", "val2014")  # 10 answers: 7 "two", 3 "2"
    fake = FakePredictor({"Question: what is 0? Short answer:": "Two.",
                          "Question: what is 1? Short answer:": "2"}, default="cat")
    ev = vqa.VqaEvaluator(_config("vqa", tmp_path, manual, "vqav2", "validation"))
    results = dict(ev.evaluate(fake))
    # "Two." and "2" both normalise to "2", which 3 of 10 humans gave: each leave-one-out subset
    # has 3 matches (credit 1) except the 3 leaving out a "2" (credit 2/3) -> 0.9; "cat" -> 0.
    assert results == {"accuracy": pytest.approx(100 * (0.9 + 0.9 + 0) / 3)}
    (n, prompts, options), = fake.calls  # one padded batch of 8 rows
    assert n == 8 and prompts[3:] == ["Question:  Short answer:"] * 5
    assert options == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0,
                           repetition_penalty=1.0, early_stopping=False, max_prompt_len=32)
    preds = _read(tmp_path / "out" / "vqa_vqav2_validation_predictions.json")
    assert sorted(preds, key=lambda p: p["question_id"]) == [
        {"question_id": 420, "answer": "Two."}, {"question_id": 421, "answer": "2"},
        {"question_id": 422, "answer": "cat"}]
    saved = _read(tmp_path / "out" / "vqa_vqav2_validation_results.json")
    assert saved["num_examples"] == 3 and saved["metrics"] == results


def test_vqa_opt_defaults_and_test_dev_without_answers(tmp_path):
    manual = tmp_path / "vqa"
    _vqa_copy(manual, "v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", 2)
    fake = FakePredictor(llm_kind="opt", default="yes")
    ev = vqa.VqaEvaluator(_config("vqa", tmp_path, manual, "vqav2", "test_dev"))
    assert dict(ev.evaluate(fake)) == {}  # nothing to score
    _, prompts, options = fake.calls[0]
    assert prompts[0] == "Question: what is 0? Answer:" and options["length_penalty"] == 0.0
    assert len(_read(tmp_path / "out" / "vqa_vqav2_test_dev_predictions.json")) == 2


def test_okvqa_lemmatises_predictions(tmp_path):
    manual = tmp_path / "okvqa"
    _write(manual / "val2014" / "COCO_val2014_000000000007.jpg", _jpeg(0))
    _write(manual / "OpenEnded_mscoco_val2014_questions.json",
           {"questions": [{"image_id": 7, "question": "What animal?", "question_id": 70}]})
    _write(manual / "mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 70, "answers": [{"answer": "dog", "raw_answer": "dog"}] * 10}]})
    fake = FakePredictor(default="dogs")
    ok = dict(vqa.VqaEvaluator(_config("vqa", tmp_path, manual, "okvqa", "validation",
                                           metric="okvqa")).evaluate(fake))
    plain = dict(vqa.VqaEvaluator(_config("vqa", tmp_path, manual, "okvqa", "validation",
                                              metric="vqav2")).evaluate(fake))
    assert ok == {"accuracy": 100.0} and plain == {"accuracy": 0.0}  # "dogs" -> "dog"


def test_gqa_exact_match_and_submission_format(tmp_path):
    manual = tmp_path / "gqa"
    qs = {"201307251": {"imageId": "n161313", "question": "Is it red?", "answer": "yes"},
          "05451384": {"imageId": "2354786", "question": "What is it?", "answer": "cat"},
          "1234": {"imageId": "2354786", "question": "What color?", "answer": "red"}}
    for q in qs.values():
        _write(manual / "images" / f"{q['imageId']}.jpg", _jpeg(len(q["imageId"])))
    _write(manual / "testdev_balanced_questions.json", qs)
    fake = FakePredictor({"Question: is it red? Short answer:": "Yes.",
                          "Question: what is it? Short answer:": "a cat"}, default="blue")
    results = dict(vqa.VqaEvaluator(_config("vqa", tmp_path, manual, "gqa_balanced", "testdev",
                                                metric="gqa")).evaluate(fake))
    assert results == {"accuracy": pytest.approx(200 / 3)}  # punctuation and articles go
    preds = _read(tmp_path / "out" / "vqa_gqa_balanced_testdev_predictions.json")
    assert {p["questionId"]: p["prediction"] for p in preds} == {
        "201307251": "Yes.", "05451384": "a cat", "1234": "blue"}  # ids as GQA writes them


# ------------------------------------------------------------------------------ captions
@pytest.mark.slow
def test_caption_scores_and_results_file(tmp_path):
    manual = tmp_path / "coco"
    caps = {0: ["a man riding a red bicycle down a busy city street", "a cyclist in traffic"],
            1: ["two dogs playing with a ball on the green grass", "dogs in a park"]}
    caps[2], caps[3] = ["a train caption"], ["a val caption"]  # every split needs an image
    images = []
    for i, refs in caps.items():
        fname = f"COCO_val2014_{i + 1:012d}.jpg"
        _write(manual / "val2014" / fname, _jpeg(i))
        images.append({"filepath": "val2014", "filename": fname, "cocoid": i + 1,
                       "split": {2: "train", 3: "val"}.get(i, "test"),
                       "sentences": [{"raw": r} for r in refs]})
    _write(manual / "dataset_coco.json", {"images": images})
    fake = FakePredictor({"a photo of": "a man riding a red bicycle down a busy city street"})
    ev = caption.CaptionEvaluator(_config("caption", tmp_path, manual, "coco_karpathy", "test",
                                          spice=False))
    results = dict(ev.evaluate(fake))
    _, prompts, options = fake.calls[0]
    assert prompts == ["a photo of"] * 8
    assert (options["num_beams"], options["max_new_tokens"], options["min_new_tokens"]) == (5, 30, 8)
    # Both images get the caption of image 1 (11 tokens): all n-grams match there; for image 2
    # only one "a" (clipped to its count in the references) -> corpus precisions 12/22, 10/20,
    # 9/18, 8/16; the closest reference lengths (11 + 10) do not exceed 22: no brevity penalty.
    assert results["Bleu_4"] == pytest.approx((12 / 22 * 10 / 20 * 9 / 18 * 8 / 16) ** 0.25, abs=1e-6)
    assert 0.5 < results["ROUGE_L"] < 1.0 and "SPICE" not in results
    preds = _read(tmp_path / "out" / "caption_coco_karpathy_test_predictions.json")
    assert sorted(p["image_id"] for p in preds) == [1, 2]


# ------------------------------------------------------------------------------ retrieval
def _solid_jpeg(i):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _flickr_copy(manual, n=4):
    images = []
    for i in range(n + 2):  # the last two: one train and one val image (every split needs one)
        fname = f"{1000 + i}.jpg"
        _write(manual / "flickr30k-images" / fname, _solid_jpeg(i))
        images.append({"filename": fname, "split": {n: "train", n + 1: "val"}.get(i, "test"),
                       "sentences": [{"raw": f"Picture {i}."}, {"raw": f"Picture {i} alt"}]})
    _write(manual / "dataset_flickr30k.json", {"images": images})


@pytest.mark.parametrize("k, expected", [
    # ITC alone: image i ranks "picture i-1 alt" (1.1) above "picture i" (1.0); "alt" texts rank
    # image i+1 first. k=2 re-ranks the right caption / image to the top everywhere.
    (2, dict(txt_r1=100.0, img_r1=100.0)),
    # k=1 re-scores only ITC's first choice, which keeps its wrong first places.
    (1, dict(txt_r1=0.0, img_r1=50.0)),
])
def test_retrieval_reranks_itc_top_k_with_itm(tmp_path, k, expected):
    manual = tmp_path / "f30k"
    _flickr_copy(manual)
    ev = retrieval.RetrievalEvaluator(_config("retrieval", tmp_path, manual, "flickr30k_karpathy",
                                            "test", k=k, text_batch_size=8, itm_rows_per_call=3))
    results = dict(ev.evaluate(FakePredictor()))
    for key, value in expected.items():
        assert results[key] == value, key
    if k == 2:
        assert results["txt_r5"] == results["img_r5"] == 100.0
    assert results["itc_txt_r1"] == 0.0 and results["itc_img_r1"] == 50.0
    assert results["itc_txt_r5"] == 100.0
    top = _read(tmp_path / "out" / "retrieval_flickr30k_karpathy_test_predictions.json")
    assert sorted(top["texts"])[:2] == ["picture 0", "picture 0 alt"] and len(top["i2t_top"]) == 4


# ------------------------------------------------------------------------------ synthetic_shapes
def _shapes_config(kind, tmp_path, **fields):
    c = base.base_config(kind)
    c.input.update(dict(dataset="synthetic_shapes/tiny", split="validation",
                        data_dir=str(tmp_path / "tfds"), batch_size=8, image_size=16,
                        read_threads=1))
    c.progress = False
    for key, value in fields.items():
        c[key] = value
    return c


def _shapes_records(tmp_path):
    src = tfds.data_source("synthetic_shapes/tiny", split="validation",
                           data_dir=str(tmp_path / "tfds"),
                           decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def test_shapes_vqa_and_registry(tmp_path):
    fake = FakePredictor(llm_kind="opt", default="Yes")
    evals = registry.from_config({"shapes_vqa": dict(
        type="vqa", every=2, metric="exact", progress=False,
        input=dict(dataset="synthetic_shapes/tiny", split="validation",
                   data_dir=str(tmp_path / "tfds"), batch_size=8, image_size=16,
                   read_threads=1))}, predictor=fake)
    assert list(evals.run_due(1, {}, {})) == []
    got = dict(evals.run_due(2, {"a": np.zeros(1)}, {"b": np.ones(1)}))
    assert set(fake.params) == {"a", "b"}  # trainable + frozen, merged
    # The eval pipeline asks question image_id % n of each scene.
    records = _shapes_records(tmp_path)
    truth = [r["qa_answers"][r["image_id"] % len(r["qa_answers"])].decode() for r in records]
    assert got == {"shapes_vqa/accuracy": pytest.approx(100 * np.mean([a == "yes" for a in truth]))}
    assert 0 < got["shapes_vqa/accuracy"] < 100


@pytest.mark.slow
def test_shapes_caption_and_retrieval_run(tmp_path):
    builders.prepare_dataset("synthetic_shapes/tiny", tmp_path / "tfds")
    records = _shapes_records(tmp_path)
    first = records[0]["captions"][0].decode()
    cap = caption.CaptionEvaluator(_shapes_config("caption", tmp_path, prompt="", spice=False))
    res = dict(cap.evaluate(FakePredictor({"": first})))
    assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(res) and res["CIDEr"] > 0

    class ShapesRetrieval(FakePredictor):  # every image and text alike: ties everywhere
        def image_features(self, px):
            return {"image_embeds": np.zeros((len(px), 1, 1), np.float32),
                    "image_feats": np.ones((len(px), 2, 8), np.float32) / 8**.5}

        def text_features(self, ids, mask):
            return np.ones((len(ids), 8), np.float32) / 8**.5

        def qformer_tokens(self, texts, max_len):
            return np.zeros((len(texts), max_len), np.int32), np.ones((len(texts), max_len), np.int32)

        def itm_scores(self, e, ids, mask):
            return np.zeros(len(ids), np.float32)

    ret = retrieval.RetrievalEvaluator(_shapes_config("retrieval", tmp_path, k=4))
    res = dict(ret.evaluate(ShapesRetrieval()))
    n_img = len(records)
    # All scores tie: the lowest index wins, so only image 0 finds its captions at R@1, and only
    # texts of image 0 find their image.
    assert res["txt_r1"] == pytest.approx(100 / n_img)
    n_txt = sum(len(r["captions"]) for r in records)
    assert res["img_r1"] == pytest.approx(100 * len(records[0]["captions"]) / n_txt)


def test_config_defaults_and_errors():
    c = base.with_defaults({"type": "caption", "input": {"dataset": "nocaps"}})
    assert (c.prompt, c.generation.num_beams, c.generation.min_new_tokens, c.input.split) == (
        "a photo of", 5, 8, "validation")
    with pytest.raises(ValueError, match="unknown field generation.beams"):
        base.with_defaults({"type": "vqa", "generation": {"beams": 3}})
    with pytest.raises(ValueError, match="unknown evaluator type"):
        base.with_defaults({"type": "bleu"})
    with pytest.raises(ValueError, match="unknown type"):
        registry.from_config({"x": {"type": "nope"}})


# ------------------------------------------------------------------------------ the model predictor
def _golden_predictor(case):
    from blip2_jax import serving
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.weights import hf
    d = GOLDEN / case
    cfg, params = hf.load(str(d))
    gen = json.loads((d / "generation_config.json").read_text()) if cfg.text else None
    ref = json.loads((d / "reference.json").read_text())
    npz = np.load(d / "reference.npz")
    pred = serving.Predictor(Blip2(cfg), params, cfg, tokenizer=str(d) if cfg.text else None,
                             qformer_tokenizer=None if cfg.text else str(d), generation_config=gen)
    return pred, ref, npz


@pytest.mark.parametrize("case, names", [
    ("blip2_opt", ["greedy_prompts", "beam4_lp_neg1"]),
    ("blip2_t5", ["beam3", "greedy_no_prompt"]),
])
def test_model_predictor_generates_like_transformers(case, names):
    pred, ref, npz = _golden_predictor(case)
    images = npz["images_pixel_values"].transpose(0, 2, 3, 1)
    for g in ref["generate"]:
        if g["name"] not in names:
            continue
        kw = {k: v for k, v in g["kwargs"].items() if k != "do_sample"}
        got = pred.generate(images[g["image_index"]], g["prompts"], max_prompt_len=24, **kw)
        want = [pred.tokenizer.decode(t).strip() for t in g["new_tokens"]]
        assert got == want, g["name"]


def test_model_predictor_itc_itm_like_transformers():
    from blip2_jax.serving import itc_similarity
    pred, ref, npz = _golden_predictor("blip2_itm")
    f = pred.image_features(npz["pixel_values"].transpose(0, 2, 3, 1))
    embeds, feats = f["image_embeds"], f["image_feats"]
    np.testing.assert_allclose(feats, npz["image_embeds"], atol=1e-5)
    np.testing.assert_allclose(embeds, npz["vision_last_hidden_state"], atol=1e-4)
    ids, mask = pred.qformer_tokens(ref["texts"], npz["input_ids"].shape[1])
    np.testing.assert_array_equal(ids, npz["input_ids"])
    text = pred.text_features(ids, mask)
    np.testing.assert_allclose(text, npz["text_embeds"], atol=1e-5)
    np.testing.assert_allclose(itc_similarity(feats, text), npz["logits_per_image"], atol=1e-5)
    pairs = [(i, t) for i in range(2) for t in range(3)]
    itm = pred.itm_scores(embeds[[i for i, _ in pairs]], ids[[t for _, t in pairs]],
                          mask[[t for _, t in pairs]])
    np.testing.assert_allclose(itm.reshape(2, 3), npz["itm_logits"][..., 1], atol=1e-4)


@pytest.mark.slow
def test_trainer_entry_point_builds_the_model_predictor(tmp_path):
    """`run(trainable, frozen)` as the trainer calls it: a retrieval evaluator over the tiny
    retrieval checkpoint gives the same numbers as the same predictor driven directly."""
    from blip2_jax import sharding, train_state
    from blip2_jax.models.blip2 import Blip2
    from blip2_jax.weights import hf
    manual = tmp_path / "f30k"
    _flickr_copy(manual)
    cfg, params = hf.load(str(GOLDEN / "blip2_itm"))
    trainable, frozen = train_state.split_params(params)
    ec = _config("retrieval", tmp_path, manual, "flickr30k_karpathy", "test", k=3,
                 text_batch_size=8)
    ec.input.image_size = 48
    evals = registry.from_config({"f30k": ec}, model=Blip2(cfg), model_cfg=cfg,
                                 mesh=sharding.make_mesh(), qformer_tokenizer=str(GOLDEN / "blip2_itm"))
    assert list(evals.run_due(5, trainable, frozen)) == []  # every = 0: never due
    (_, _, evaluator), = evals.runs
    via_run = dict(evaluator.run(trainable, frozen))
    pred, _, _ = _golden_predictor("blip2_itm")
    direct = dict(retrieval.RetrievalEvaluator(ec).evaluate(pred))
    assert via_run == direct and set(via_run) >= {"txt_r1", "img_r1", "itc_txt_r1"}
    ec.image_bank_on_device = False  # ITM images sent from the host instead: same scores
    written = tmp_path / "out" / "retrieval_flickr30k_karpathy_test_predictions.json"
    written.rename(tmp_path / "bank.json")
    assert dict(retrieval.RetrievalEvaluator(ec).evaluate(pred)) == direct
    assert _read(tmp_path / "bank.json") == _read(written)
