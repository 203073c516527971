"""Every real-corpus builder builds from a tiny fake copy in the official file formats."""
import io
import json
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from blip2_jax.data import builders


def _jpeg(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))


def _read(name, split, data_dir):
    src = tfds.data_source(name, split=split, data_dir=str(data_dir),
                           decoders={"image": tfds.decode.SkipDecoding()})
    return sorted((src[i] for i in range(len(src))), key=lambda r: r["image_id"])


def _texts(values):
    return [v.decode() for v in values]


def test_coco_karpathy(tmp_path):
    manual = tmp_path / "coco"
    images = []
    for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"),
                                         ("val", "val2014"), ("test", "val2014")]):
        cocoid = 100 + i
        fname = f"COCO_{folder}_{cocoid:012d}.jpg"
        _write(manual / folder / fname, _jpeg(i))
        images.append({"filepath": folder, "filename": fname, "imgid": i, "split": split,
                       "cocoid": cocoid, "sentids": [2 * i, 2 * i + 1],
                       "sentences": [{"raw": f"A caption {i}.", "tokens": [], "imgid": i,
                                      "sentid": 2 * i},
                                     {"raw": f"Another one {i}", "tokens": [], "imgid": i,
                                      "sentid": 2 * i + 1}]})
    _write(manual / "dataset_coco.json", {"images": images, "dataset": "coco"})
    b = builders.prepare_dataset("coco_karpathy", tmp_path / "tfds", manual)
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        "train": 2, "validation": 1, "test": 1}
    train = _read("coco_karpathy", "train", tmp_path / "tfds")
    assert [r["image_id"] for r in train] == [100, 101]  # restval joined train
    assert _texts(train[1]["captions"]) == ["A caption 1.", "Another one 1"]
    assert train[1]["image"] == _jpeg(1)  # bytes stored untouched
    assert train[1]["file_name"].decode() == "val2014/COCO_val2014_000000000101.jpg"


def test_flickr30k_karpathy(tmp_path):
    manual = tmp_path / "f30k"
    images = []
    for i, split in enumerate(["train", "val", "test", "test"]):
        fname = f"{1000092795 + i}.jpg"
        _write(manual / "flickr30k-images" / fname, _jpeg(i))
        images.append({"filename": fname, "imgid": i, "split": split,
                       "sentences": [{"raw": f"Dogs run {i}", "tokens": []}] * 5})
    _write(manual / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    builders.prepare_dataset("flickr30k_karpathy", tmp_path / "tfds", manual)
    test = _read("flickr30k_karpathy", "test", tmp_path / "tfds")
    assert [r["image_id"] for r in test] == [1000092797, 1000092798]
    assert len(test[0]["captions"]) == 5


def test_nocaps(tmp_path):
    manual = tmp_path / "nocaps"
    imgs = [{"id": i, "file_name": f"{i:016x}.jpg", "domain": d, "height": 16, "width": 24,
             "open_images_id": f"{i:016x}"} for i, d in enumerate(["in-domain", "out-domain"])]
    for im in imgs:
        _write(manual / "validation" / im["file_name"], _jpeg(im["id"]))
    anns = [{"image_id": i, "id": 10 * i + k, "caption": f"cap {i} {k}"}
            for i in range(2) for k in range(10)]
    _write(manual / "nocaps_val_4500_captions.json", {"images": imgs, "annotations": anns})
    builders.prepare_dataset("nocaps", tmp_path / "tfds", manual)
    val = _read("nocaps", "validation", tmp_path / "tfds")
    assert [r["domain"].decode() for r in val] == ["in-domain", "out-domain"]
    assert _texts(val[1]["captions"])[:2] == ["cap 1 0", "cap 1 1"]
    assert len(val[1]["captions"]) == 10


def _vqa_copy(manual, qfile, afile, folder, n=3, raw=False):
    questions, anns = [], []
    for i in range(n):
        image_id, qid = 42 + i, 420 + i
        _write(manual / folder / f"COCO_{folder}_{image_id:012d}.jpg", _jpeg(i))
        questions.append({"image_id": image_id, "question": f"What is {i}?",
                          "question_id": qid})
        answers = [{"answer": "two" if k < 7 else "2", "answer_confidence": "yes",
                    "answer_id": k + 1, **({"raw_answer": "Two"} if raw else {})}
                   for k in range(10)]
        anns.append({"question_id": qid, "image_id": image_id, "question_type": "what is",
                     "answer_type": "number", "multiple_choice_answer": "two",
                     "answers": answers})
    _write(manual / qfile, {"questions": questions, "data_subtype": folder})
    if afile:
        _write(manual / afile, {"annotations": anns})


def test_vqav2_all_answers_and_optional_splits(tmp_path):
    manual = tmp_path / "vqa"
    _vqa_copy(manual, "v2_OpenEnded_mscoco_val2014_questions.json",
              "v2_mscoco_val2014_annotations.json", "val2014")
    _vqa_copy(manual, "v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", 2)
    b = builders.prepare_dataset("vqav2", tmp_path / "tfds", manual)
    assert set(b.info.splits) == {"validation", "test_dev"}  # no train files: not built
    val = _read("vqav2", "validation", tmp_path / "tfds")
    assert len(val) == 3
    r = val[0]
    assert (r["image_id"], r["question_id"], r["question"].decode()) == (42, 420, "What is 0?")
    assert _texts(r["answers"]) == ["two"] * 7 + ["2"] * 3
    assert r["answer_type"].decode() == "number"
    assert list(_read("vqav2", "test_dev", tmp_path / "tfds")[0]["answers"]) == []


def test_okvqa(tmp_path):
    manual = tmp_path / "okvqa"
    for split in ("train2014", "val2014"):
        _vqa_copy(manual, f"OpenEnded_mscoco_{split}_questions.json",
                  f"mscoco_{split}_annotations.json", split, 2, raw=True)
    builders.prepare_dataset("okvqa", tmp_path / "tfds", manual)
    val = _read("okvqa", "validation", tmp_path / "tfds")
    assert _texts(val[0]["raw_answers"]) == ["Two"] * 10
    assert len(val[0]["answers"]) == 10


def test_gqa_balanced(tmp_path):
    manual = tmp_path / "gqa"
    qs = {"201307251": {"imageId": "n161313", "question": "Is it red?", "answer": "yes",
                        "fullAnswer": "Yes, it is red."},
          "05451384": {"imageId": "2354786", "question": "What is it?", "answer": "cat",
                       "fullAnswer": "It is a cat."}}
    for q in qs.values():
        _write(manual / "images" / f"{q['imageId']}.jpg", _jpeg(len(q["question"])))
    _write(manual / "testdev_balanced_questions.json", qs)
    builders.prepare_dataset("gqa_balanced", tmp_path / "tfds", manual)
    rows = _read("gqa_balanced", "testdev", tmp_path / "tfds")
    assert [r["image_id"] for r in rows] == [2354786, 1_000_161_313]
    assert [r["question_id"] for r in rows] == [5451384, 201307251]
    assert [r["question_key"].decode() for r in rows] == ["05451384", "201307251"]
    assert _texts(rows[1]["answers"]) == ["yes"]
    assert rows[1]["full_answer"].decode() == "Yes, it is red."


def test_vg_regions(tmp_path):
    manual = tmp_path / "vg"
    meta = [{"image_id": 1, "url": "https://x/rak248/VG_100K_2/1.jpg", "width": 24},
            {"image_id": 7, "url": "https://x/rak248/VG_100K/7.jpg", "width": 24}]
    _write(manual / "VG_100K_2" / "1.jpg", _jpeg(1))
    _write(manual / "VG_100K" / "7.jpg", _jpeg(7))
    regions = [{"id": 1, "regions": [
        {"region_id": 1, "phrase": "a man ", "x": 1, "y": 2, "width": 3, "height": 4,
         "image_id": 1},
        {"region_id": 2, "phrase": "a man", "x": 5, "y": 5, "width": 3, "height": 4,
         "image_id": 1},
        {"region_id": 3, "phrase": "blue sky", "x": 0, "y": 0, "width": 9, "height": 2,
         "image_id": 1}]},
        {"id": 7, "regions": [{"region_id": 4, "phrase": "tree", "x": 0, "y": 0,
                               "width": 1, "height": 1, "image_id": 7}]}]
    _write(manual / "region_descriptions.json", regions)
    _write(manual / "image_data.json", meta)
    builders.prepare_dataset("vg_regions", tmp_path / "tfds", manual)
    rows = _read("vg_regions", "train", tmp_path / "tfds")
    assert _texts(rows[0]["captions"]) == ["a man", "blue sky"]
    np.testing.assert_array_equal(rows[0]["boxes"], [[1, 2, 3, 4], [0, 0, 9, 2]])
    assert rows[1]["file_name"].decode() == "VG_100K/7.jpg"


@pytest.mark.parametrize("layout", ["jsonl", "tsv", "tar"])
def test_image_text_pairs(tmp_path, layout):
    manual = tmp_path / layout
    manual.mkdir()
    pairs = [("img/0.jpg", "a first caption"), ("img/1.jpg", ""),  # empty caption: skipped
             ("img/2.jpg", "a third caption"), ("img/missing.jpg", "no image")]
    if layout == "tar":
        with tarfile.open(manual / "00000.tar", "w") as tar:
            for k, (_, cap) in enumerate(pairs[:3]):
                for ext, data in ((".jpg", _jpeg(k)), (".txt", cap.encode())):
                    info = tarfile.TarInfo(f"{k:05d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("00003.txt")  # a caption without an image
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    else:
        for k, (rel, _) in enumerate(pairs[:3]):
            _write(manual / rel, _jpeg(k))
        if layout == "jsonl":
            lines = [json.dumps({"image": r, "caption": c}) for r, c in pairs]
            _write(manual / "pairs.jsonl", "\n".join(lines) + "\n")
        else:
            _write(manual / "pairs.tsv",
                   "caption\timage\turl\n" + "".join(f"{c}\t{r}\thttp://x\n" for r, c in pairs))
    builders.prepare_dataset("image_text_pairs", tmp_path / "tfds", manual)
    rows = _read("image_text_pairs", "train", tmp_path / "tfds")
    assert [_texts(r["captions"]) for r in rows] == [["a first caption"], ["a third caption"]]
    assert [r["image"] for r in rows] == [_jpeg(0), _jpeg(2)]


def test_missing_manual_files_are_named(tmp_path):
    manual = tmp_path / "coco"
    manual.mkdir()
    (manual / "something_else.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        builders.prepare_dataset("coco_karpathy", tmp_path / "tfds", manual)
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco_train2014_questions"):
        builders.prepare_dataset("vqav2", tmp_path / "tfds", tmp_path / "absent")
    # annotations present, an image missing: the image file is named
    _vqa_copy(manual, "OpenEnded_mscoco_val2014_questions.json",
              "mscoco_val2014_annotations.json", "val2014", 1)
    (manual / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000042.jpg"):
        builders.prepare_dataset("okvqa", tmp_path / "tfds", manual)
