"""`synthetic_shapes`: the built-in offline corpus of coloured-shape scenes.

Each scene has 1-3 shapes (kind, colour, size) in distinct cells of a 3x3 grid on a solid,
gradient or noise background (the config picks how many shapes at most, their colours, the
background brightness and how far shapes move and turn inside their cells). From the scene
description we derive several captions ("a red circle to the left of a blue square") and
question/answer pairs (colour, shape, count, relative position, yes/no), so captioning,
retrieval and VQA can all be trained and scored without any download. Everything is a deterministic function of (seed, split sizes, image size).

Splits are disjoint: every scene has a canonical key (its objects and cells, and the background
kind); the key's hash decides its split, and a key is used at most once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from blip2_jax.data.builders.base import Builder, image_feature

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (245, 215, 40), "purple": (140, 60, 185), "orange": (250, 140, 30),
    "white": (250, 250, 250), "black": (15, 15, 15),
}
SIZES = {"small": 0.27, "large": 0.42}  # radius as a fraction of the grid cell
BACKGROUNDS = {"solid": "plain", "gradient": "gradient", "noise": "noisy"}
GRID = 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three")
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Examples per split, image side in pixels, generator seed, and the scenes' look: the
    colours drawn (names of COLOURS), the background's RGB range [lo, hi), how far a centre
    moves inside its cell (fraction of the free room) and the largest turn in degrees."""
    num_train: int = 2000
    num_validation: int = 250
    num_test: int = 250
    image_size: int = 80
    seed: int = 0
    colours: tuple[str, ...] = tuple(COLOURS)
    background_range: tuple[int, int] = (70, 180)
    jitter: float = 1.0
    max_angle: float = 20.0
    full_caption: bool = False  # add one caption naming every object's size, colour, shape, place
    max_objects: int = 3


CONFIGS = (
    # The miniature's corpus (blip2_jax/miniature): one 16-px ViT patch per grid cell, upright
    # shapes near their cell's centre, bright shapes on dark backgrounds (no black shapes), one
    # or two per scene, and a full description among the captions. A 2-layer, 64-wide ViT tells
    # the shapes apart in ~1000 steps here, and stays near chance on `large`'s look (rotations,
    # free placement, shapes darker and brighter than the background).
    SyntheticShapesConfig(name="default", num_train=4000, num_validation=250, num_test=250,
                          image_size=48, colours=tuple(c for c in COLOURS if c != "black"),
                          background_range=(20, 90), jitter=0.3, max_angle=0.0, full_caption=True,
                          max_objects=2,
                          description="4000/250/250 scenes, 48 px, 1-2 upright shapes on dark backgrounds"),
    SyntheticShapesConfig(name="tiny", num_train=64, num_validation=16, num_test=16,
                          description="64/16/16 scenes, 64 px (tests)", image_size=64),
    SyntheticShapesConfig(name="large", num_train=50000, num_validation=2000, num_test=2000,
                          description="50k/2k/2k scenes, 96 px, 1-3 turned shapes", image_size=96),
)


# ---------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, cfg: SyntheticShapesConfig) -> dict[str, Any]:
    """A random scene description: background + 1-`max_objects` objects in distinct grid cells."""
    colours = list(cfg.colours)
    n = int(rng.integers(1, cfg.max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = []
    for cell in sorted(int(c) for c in cells):
        objects.append({
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": colours[rng.integers(len(colours))],
            "size": list(SIZES)[rng.integers(len(SIZES))],
            "row": cell // GRID, "col": cell % GRID,
            # offset of the centre inside its cell, in units of the free room
            "dx": cfg.jitter * float(rng.uniform(-1, 1)), "dy": cfg.jitter * float(rng.uniform(-1, 1)),
            "angle": float(rng.uniform(-cfg.max_angle, cfg.max_angle)),
        })
    return {"background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
            "background_rgb": [int(v) for v in rng.integers(*cfg.background_range, size=6)],
            "objects": objects}


def scene_key(scene: dict[str, Any]) -> str:
    """What makes two scenes 'the same' (for dedup and split assignment)."""
    objs = sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"])
                  for o in scene["objects"])
    return json.dumps([scene["background"], objs])


def _split_sizes(cfg: SyntheticShapesConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}


def _split_bounds(cfg: SyntheticShapesConfig) -> dict[str, float]:
    """Upper end of each split's share of [0, 1), in which a scene key's hash falls."""
    sizes = _split_sizes(cfg)
    total = sum(sizes.values())
    bounds, acc = {}, 0.0
    for split, n in sizes.items():
        acc += n / total
        bounds[split] = acc
    return bounds


def split_of(key: str, cfg: SyntheticShapesConfig) -> str:
    """The split a scene key belongs to (the same for every draw of that scene)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return next(s for s, b in _split_bounds(cfg).items() if h < b or s == "test")


def assign_splits(cfg: SyntheticShapesConfig) -> dict[str, list[tuple[int, dict]]]:
    """Draws scenes until every split is full; returns {split: [(scene_index, scene)]}."""
    sizes = _split_sizes(cfg)
    total = sum(sizes.values())
    out = {s: [] for s in sizes}
    seen: set[str] = set()
    rng = np.random.default_rng(cfg.seed)
    index = 0
    while any(len(out[s]) < sizes[s] for s in sizes):
        if index > 50 * total + 1000:
            raise RuntimeError(f"synthetic_shapes: could not draw {total} distinct scenes")
        scene = sample_scene(rng, cfg)
        key = scene_key(scene)
        index += 1
        if key in seen:
            continue
        seen.add(key)
        split = split_of(key, cfg)
        if len(out[split]) < sizes[split]:
            out[split].append((index - 1, scene))
    return out


# ---------------------------------------------------------------- rendering
def _polygon(shape: str, r: float, angle: float) -> np.ndarray:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(0.8 * x, 0.8 * y) for x, y in pts]
    elif shape == "triangle":
        pts = [(0, -1), (0.87, 0.5), (-0.87, 0.5)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * np.sin(i * np.pi / 5),
                -(1.0 if i % 2 == 0 else 0.45) * np.cos(i * np.pi / 5)) for i in range(10)]
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
               (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(shape)
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (np.asarray(pts, np.float64) @ rot.T) * r


def _background(scene, size: int, rng: np.random.Generator) -> np.ndarray:
    c = np.asarray(scene["background_rgb"], np.float32)
    c = 0.5 * c + 0.5 * c.reshape(2, 3).mean(axis=1).repeat(3)  # muted: shapes stand out
    if scene["background"] == "solid":
        img = np.broadcast_to(c[:3], (size, size, 3))
    elif scene["background"] == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        img = np.broadcast_to((1 - t) * c[:3] + t * c[3:], (size, size, 3))
    else:
        img = c[:3] + rng.normal(0.0, 18.0, size=(size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def object_centre(obj: dict[str, Any], image_size: int) -> tuple[float, float, float]:
    """(x, y, radius) in pixels of an object."""
    cell = image_size / GRID
    r = SIZES[obj["size"]] * cell
    room = cell / 2 - r
    x = (obj["col"] + 0.5) * cell + obj["dx"] * room * 0.8
    y = (obj["row"] + 0.5) * cell + obj["dy"] * room * 0.8
    return x, y, r


def render_scene(scene: dict[str, Any], image_size: int, seed: list[int]) -> bytes:
    """The scene as PNG bytes, image_size x image_size RGB (`seed` drives the noise)."""
    rng = np.random.default_rng(seed)
    big = image_size * SUPERSAMPLE
    bg = Image.fromarray(_background(scene, image_size, rng)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(bg)
    for obj in scene["objects"]:
        x, y, r = (v * SUPERSAMPLE for v in object_centre(obj, image_size))
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            pts = _polygon(obj["shape"], r, obj["angle"]) + (x, y)
            draw.polygon([tuple(p) for p in pts], fill=fill)
    img = bg.resize((image_size, image_size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- language
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _name(obj, with_size: bool = False) -> str:
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    return _a(" ".join(words))


def _where(obj) -> str:
    row, col = ROWS[obj["row"]], COLS[obj["col"]]
    if row == "middle":
        return "center" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


def _where_phrase(obj) -> str:
    where = _where(obj)
    if where == "center":
        return "in the center of the picture"
    if where in ("top", "bottom"):
        return f"at the {where} of the picture"
    if where in ("left", "right"):
        return f"on the {where} of the picture"
    return f"in the {where} corner of the picture"


def _place(obj) -> str:
    """Short form of where an object is: "at the top left", "in the center", "on the right"."""
    where = _where(obj)
    if where == "center":
        return "in the center"
    return f"on the {where}" if where in ("left", "right") else f"at the {where}"


def _relation(a, b) -> str | None:
    """How a lies relative to b, or None if they share a cell row and column (impossible)."""
    if a["col"] != b["col"]:
        return "to the left of" if a["col"] < b["col"] else "to the right of"
    if a["row"] != b["row"]:
        return "above" if a["row"] < b["row"] else "below"
    return None


def _list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def captions_for(scene: dict[str, Any], full: bool = False) -> list[str]:
    """Several true descriptions of the scene; with `full`, last, one that names every object's
    size, colour, shape and place ("a large red circle at the top left and a small blue square
    in the center"), from which every question can be answered."""
    objs, bg = scene["objects"], BACKGROUNDS[scene["background"]]
    n = len(objs)
    names = [_name(o) for o in objs]
    caps = [_list(names), f"{_list([_name(o, True) for o in objs])} on {_a(bg)} background"]
    if n == 1:
        caps.append(f"{names[0]} {_where_phrase(objs[0])}")
        caps.append(f"one {objs[0]['colour']} {objs[0]['shape']}")
    else:
        caps.append(f"{NUMBERS[n]} shapes: {_list(names)}")
        caps.append(f"{names[0]} {_relation(objs[0], objs[1])} {names[1]}")
        caps.append(f"{names[-1]} {_relation(objs[-1], objs[0])} {names[0]}")
    if full:
        caps.append(_list([f"{_name(o, True)} {_place(o)}" for o in objs]))
    return caps


def _unique(objs, **match):
    hits = [o for o in objs if all(o[k] == v for k, v in match.items())]
    return hits[0] if len(hits) == 1 else None


def questions_for(scene: dict[str, Any], rng: np.random.Generator,
                  colours: tuple[str, ...] = tuple(COLOURS)) -> list[tuple[str, str, str]]:
    """(question, answer, type) triples, each answerable from the scene alone (`colours`: those
    the corpus draws, for "is there a <colour> <shape>?")."""
    objs = scene["objects"]
    qa = [("how many shapes are there?", NUMBERS[len(objs)], "count")]
    present = {o["shape"] for o in objs}
    # yes/no, balanced between present and absent kinds
    if rng.random() < 0.5:
        kind = sorted(present)[rng.integers(len(present))]
    else:
        kind = [s for s in SHAPES if s not in present][rng.integers(len(SHAPES) - len(present))]
    qa.append((f"is there {_a(kind)}?", "yes" if kind in present else "no", "exist"))
    ref = objs[rng.integers(len(objs))]
    colour = colours[rng.integers(len(colours))] if rng.random() < 0.5 else ref["colour"]
    yes = any(o["shape"] == ref["shape"] and o["colour"] == colour for o in objs)
    qa.append((f"is there {_a(colour + ' ' + ref['shape'])}?", "yes" if yes else "no", "exist"))
    for o in objs:
        if _unique(objs, shape=o["shape"]) is not None:
            qa.append((f"what color is the {o['shape']}?", o["colour"], "colour"))
            qa.append((f"is the {o['shape']} small or large?", o["size"], "size"))
        if _unique(objs, colour=o["colour"]) is not None:
            qa.append((f"what shape is the {o['colour']} object?", o["shape"], "shape"))
        if _unique(objs, colour=o["colour"], shape=o["shape"]) is not None:
            desc = f"{o['colour']} {o['shape']}"
            qa.append((f"where is the {desc}?", _where(o), "position"))
            for rel in ("to the left of", "to the right of", "above", "below"):
                hits = [p for p in objs if p is not o and _relation(p, o) == rel]
                if len(hits) == 1:
                    qa.append((f"what shape is {rel} the {desc}?", hits[0]["shape"], "relation"))
    counted = objs[rng.integers(len(objs))]["colour"]
    n = sum(o["colour"] == counted for o in objs)
    qa.append((f"how many {counted} shapes are there?", NUMBERS[n], "count"))
    return qa


def config_of(dataset: str) -> SyntheticShapesConfig:
    """The builder config of "synthetic_shapes[/name]" (no name: the default)."""
    name = dataset.partition("/")[2] or SyntheticShapes.DEFAULT_CONFIG_NAME
    return next(c for c in CONFIGS if c.name == name)


# ---------------------------------------------------------------- builder
class SyntheticShapes(Builder):
    """Coloured-shape scenes with captions, QA pairs and the scene description."""
    BUILDER_CONFIGS = list(CONFIGS)
    DEFAULT_CONFIG_NAME = "default"
    # 2.0.0: "default" is the miniature's corpus (48 px, 1-2 shapes, full description); a data
    # folder built by 1.0.0 holds other scenes under the same name and is rebuilt, not read.
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"2.0.0": "default config: the miniature's corpus", "1.0.0": "first release"}

    def _info(self) -> tfds.core.DatasetInfo:
        obj = {"shape": tfds.features.Text(), "colour": tfds.features.Text(),
               "size": tfds.features.Text(), "row": np.int32, "col": np.int32,
               "x": np.float32, "y": np.float32, "radius": np.float32}
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": image_feature("png"),
                "image_id": np.int64,
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "qa_questions": tfds.features.Sequence(tfds.features.Text()),
                "qa_answers": tfds.features.Sequence(tfds.features.Text()),
                "qa_types": tfds.features.Sequence(tfds.features.Text()),
                "background": tfds.features.Text(),
                "objects": tfds.features.Sequence(obj),
            }))

    def _split_generators(self, dl_manager):
        del dl_manager
        scenes = assign_splits(self.builder_config)
        return {split: self._generate_examples(items) for split, items in scenes.items()}

    def _generate_examples(self, items):
        cfg = self.builder_config
        for index, scene in items:
            yield index, make_example(scene, index, cfg.image_size, cfg.seed, tuple(cfg.colours),
                                      cfg.full_caption)


def make_example(scene: dict[str, Any], index: int, image_size: int, seed: int,
                 colours: tuple[str, ...] = tuple(COLOURS), full_caption: bool = False) -> dict:
    """One stored example: image bytes, captions, QA pairs and the scene description."""
    rng = np.random.default_rng([seed, index, 1])
    qa = questions_for(scene, rng, colours)
    objects = []
    for o in scene["objects"]:
        x, y, r = object_centre(o, image_size)
        objects.append({"shape": o["shape"], "colour": o["colour"], "size": o["size"],
                        "row": o["row"], "col": o["col"], "x": x / image_size,
                        "y": y / image_size, "radius": r / image_size})
    return {
        "image": render_scene(scene, image_size, seed=[seed, index, 2]),
        "image_id": index,
        "captions": captions_for(scene, full_caption),
        "qa_questions": [q for q, _, _ in qa],
        "qa_answers": [a for _, a, _ in qa],
        "qa_types": [t for _, _, t in qa],
        "background": scene["background"],
        "objects": objects,
    }
