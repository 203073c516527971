"""synthetic_shapes: deterministic, disjoint splits, texts true to the drawn scene, fast."""
import io
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from blip2_jax.data import builders
from blip2_jax.data.builders import synthetic_shapes as ss


def _scene(*objs, background="solid"):
    base = {"size": "large", "dx": 0.0, "dy": 0.0, "angle": 0.0}
    return {"background": background, "background_rgb": [128] * 6,
            "objects": [{**base, **o} for o in objs]}


def test_render_puts_the_colour_where_the_scene_says():
    scene = _scene({"shape": "circle", "colour": "red", "row": 1, "col": 1},
                   {"shape": "square", "colour": "blue", "row": 0, "col": 2})
    img = np.asarray(Image.open(io.BytesIO(ss.render_scene(scene, 90, [0]))))
    assert img.shape == (90, 90, 3)
    np.testing.assert_allclose(img[45, 45], ss.COLOURS["red"], atol=3)  # centre cell
    np.testing.assert_allclose(img[15, 75], ss.COLOURS["blue"], atol=3)  # top-right cell
    np.testing.assert_allclose(img[75, 15], [128, 128, 128], atol=3)  # empty: background


def test_captions_and_answers_of_a_known_scene():
    scene = _scene({"shape": "circle", "colour": "red", "row": 1, "col": 0},
                   {"shape": "square", "colour": "orange", "row": 1, "col": 2, "size": "small"})
    caps = ss.captions_for(scene)
    assert "a red circle and an orange square" in caps
    assert "a red circle to the left of an orange square" in caps
    assert "an orange square to the right of a red circle" in caps
    qa = {q: a for q, a, _ in ss.questions_for(scene, np.random.default_rng(0))}
    assert qa["how many shapes are there?"] == "two"
    assert qa["what color is the circle?"] == "red"
    assert qa["what shape is the orange object?"] == "square"
    assert qa["is the square small or large?"] == "small"
    assert qa["where is the red circle?"] == "left"
    assert qa["what shape is to the left of the orange square?"] == "circle"
    assert qa["what shape is to the right of the red circle?"] == "square"


def test_answers_agree_with_the_stored_description():
    splits = ss.assign_splits(ss.CONFIGS[1])
    for index, scene in splits["train"][:40]:
        ex = ss.make_example(scene, index, 64, 0)
        objs = ex["objects"]
        for q, a, t in zip(ex["qa_questions"], ex["qa_answers"], ex["qa_types"]):
            if q == "how many shapes are there?":
                assert a == ss.NUMBERS[len(objs)]
            elif t == "colour":
                kind = q.removeprefix("what color is the ").removesuffix("?")
                assert a == next(o["colour"] for o in objs if o["shape"] == kind)
            elif q.startswith("is there a") and t == "exist" and len(q.split()) == 4:
                kind = q.split()[-1].rstrip("?")
                assert a == ("yes" if any(o["shape"] == kind for o in objs) else "no")


def test_deterministic_and_disjoint():
    cfg = ss.CONFIGS[1]
    a, b = ss.assign_splits(cfg), ss.assign_splits(cfg)
    assert [i for i, _ in a["train"]] == [i for i, _ in b["train"]]
    keys = {s: {ss.scene_key(sc) for _, sc in items} for s, items in a.items()}
    assert sum(len(k) for k in keys.values()) == 64 + 16 + 16  # no duplicates anywhere
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    i, sc = a["test"][3]
    assert ss.make_example(sc, i, 64, 0) == ss.make_example(sc, i, 64, 0)
    other = ss.assign_splits(ss.SyntheticShapesConfig(name="x", num_train=64, num_validation=16,
                                                      num_test=16, seed=1))
    assert [i for i, _ in other["train"]] != [i for i, _ in a["train"]] or \
        ss.scene_key(other["train"][0][1]) != ss.scene_key(a["train"][0][1])


@pytest.mark.slow
def test_builds_in_seconds_and_reads_back(tmp_path):
    start = time.perf_counter()
    b = builders.prepare_dataset("synthetic_shapes", tmp_path)  # the default (the miniature's)
    seconds = time.perf_counter() - start
    assert seconds < 60, seconds
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        "train": 4000, "validation": 250, "test": 250}
    src = tfds.data_source("synthetic_shapes", split="validation", data_dir=str(tmp_path),
                           decoders={"image": tfds.decode.SkipDecoding()})
    rec = src[0]
    assert Image.open(io.BytesIO(rec["image"])).size == (48, 48)
    assert len(rec["captions"]) >= 4 and len(rec["qa_questions"]) == len(rec["qa_answers"])
    assert set(rec["objects"]) >= {"shape", "colour", "x", "y", "row", "col"}


def test_the_default_look():
    """The miniature's corpus: 1-2 upright shapes near their cell's centre, no black, dark
    backgrounds, and a last caption that names every object's size, colour, shape and place."""
    cfg = ss.CONFIGS[0]
    assert cfg.name == "default"
    splits = ss.assign_splits(ss.SyntheticShapesConfig(
        name="x", num_train=300, num_validation=0, num_test=0, colours=cfg.colours,
        background_range=cfg.background_range, jitter=cfg.jitter, max_angle=cfg.max_angle,
        full_caption=True, max_objects=cfg.max_objects))
    counts = set()
    for index, scene in splits["train"]:
        objs = scene["objects"]
        counts.add(len(objs))
        assert all(o["colour"] != "black" and o["angle"] == 0.0 for o in objs)
        assert all(abs(o["dx"]) <= cfg.jitter and abs(o["dy"]) <= cfg.jitter for o in objs)
        assert all(20 <= v < 90 for v in scene["background_rgb"])
        full = ss.captions_for(scene, full=True)[-1]
        for o in objs:
            assert f"{o['size']} {o['colour']} {o['shape']} {ss._place(o)}" in full
        for q, a, t in ss.questions_for(scene, np.random.default_rng(index), cfg.colours):
            if q.startswith("is there a") and len(q.split()) == 5:  # "is there a <colour> <shape>?"
                assert q.split()[3] in cfg.colours
    assert counts == {1, 2}


def test_full_caption_of_a_known_scene():
    scene = _scene({"shape": "circle", "colour": "red", "row": 0, "col": 0},
                   {"shape": "square", "colour": "blue", "row": 1, "col": 1, "size": "small"})
    assert ss.captions_for(scene, full=True)[-1] == \
        "a large red circle at the top left and a small blue square in the center"
    assert len(ss.captions_for(scene)) == len(ss.captions_for(scene, full=True)) - 1


def test_split_of_agrees_with_assign_splits():
    from blip2_jax.data.builders import synthetic_shapes as S
    cfg = S.CONFIGS[1]  # tiny
    for split, items in S.assign_splits(cfg).items():
        assert all(S.split_of(S.scene_key(scene), cfg) == split for _, scene in items)


def test_lm_descriptions_name_every_attribute_in_each_wording():
    from blip2_jax.data.builders import synthetic_shapes as S
    from blip2_jax.miniature import unimodal
    objs = [dict(shape="star", colour="red", size="large", row=0, col=0),
            dict(shape="square", colour="blue", size="small", row=1, col=1)]
    wordings = unimodal.descriptions(objs)
    assert len(set(wordings)) == len(wordings) == 8
    for w in wordings:
        for o in objs:
            assert all(word in w for word in (o["shape"], o["colour"], o["size"], S._place(o)))
    # both object orders: the red star comes first in some wordings and second in others
    assert {w.index("star") < w.index("square") for w in wordings} == {True, False}
