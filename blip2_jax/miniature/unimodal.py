"""Unimodal pretraining of the miniature's two frozen towers, each on its own modality only.

BLIP-2 bridges an image encoder and a language model that were pretrained apart and know
nothing of each other (paper §1, §3.1). The miniature (pipeline.py) recreates that
on synthetic_shapes:

- Image tower: the tiny ViT (tiny.TINY_VISION) learns, from pixels alone, to predict the
  scene's visual attributes per cell of the 3x3 layout grid (shape kind, colour, size, or empty)
  and the background kind: supervised multi-label classification, the ImageNet-style recipe,
  with class indices as targets (no words). An attention-pooling probe (one learned query per
  cell) reads the output tokens (after `post_layernorm` = ln_vision), so the attributes and
  where they are must be present in the very features the Q-Former will read. Why not self-supervised: a 2-layer, 64-wide ViT trained for
  a few hundred steps learns little from MAE/contrastive objectives, and the paper's frozen
  encoder (EVA-CLIP) is a strong one; this objective makes a strong small encoder in seconds.
- Language model: the tiny OPT-style decoder learns the corpus's text with the causal LM loss:
  captions, "Question: q Answer: a" lines, and two-part documents (a caption followed by another
  caption of the same scene, or by a question about it and its answer), as a real LLM's corpus
  holds text followed by text about it. It never sees an image.

Both towers are saved as transformers-format directories that `weights/init.py` reads:
`vision/` (the ViT's tensors under their names in a transformers BLIP-2 checkpoint,
`vision_model.*`, with a Blip2VisionConfig), `opt/` (an OPTForCausalLM directory with its
word-level tokenizer; transformers loads it as is); `qformer_tokenizer/` holds the Q-Former's
word-level BERT-style tokenizer. Both vocabularies are the words of the training split.
"""
from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from blip2_jax import optim, sharding
from blip2_jax.data import text as text_lib
from blip2_jax.data import transforms
from blip2_jax.data.builders import synthetic_shapes as shapes
from blip2_jax.models.configs import OPTConfig, VisionConfig
from blip2_jax.models.opt import OPTForCausalLM
from blip2_jax.models.vit import VisionTransformer
from blip2_jax.weights import convert_opt, convert_vision
from blip2_jax.weights.safetensors_io import save_state_dict

LM_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "\n")    # OPT's layout; "\n" ends captions
LM_BOS, LM_PAD = "</s>", "<pad>"
QFORMER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
QA_TEMPLATE = "Question: {} Answer:"  # the zero-shot VQA prompt of OPT (paper §4.1)
SHAPE_CLASSES = ("empty",) + shapes.SHAPES
COLOUR_CLASSES = ("empty",) + tuple(shapes.COLOURS)
SIZE_CLASSES = ("empty",) + tuple(shapes.SIZES)
BACKGROUND_CLASSES = tuple(shapes.BACKGROUNDS)
CELLS = shapes.GRID * shapes.GRID
IGNORE = text_lib.IGNORE_INDEX

Progress = Callable[[int, int], None]  # (done, total)


# ------------------------------------------------------------------------------------- corpus
def read_scenes(dataset: str, split: str, data_dir: str | None, image_size: int | None = None) -> dict:
    """One split of synthetic_shapes as arrays and texts.

    Returns images float32 [N, S, S, 3] (CLIP-normalised, as the pipeline's eval transform;
    only with `image_size`), targets int32 [N, CELLS, 3] (shape, colour, size class per grid
    cell; 0 = empty), background int32 [N], captions [N][k], qa [N][m] (question, answer),
    normalised as the input pipeline does, and qa_types [N][m] ("colour", "shape", ...)."""
    from blip2_jax.data import pipeline
    ic = pipeline.default_input_config()
    ic.dataset, ic.split, ic.data_dir = dataset, split, data_dir
    source = pipeline.load_source(ic)
    out = {"captions": [], "qa": [], "qa_types": [], "targets": [], "background": [], "images": []}
    for i in range(len(source)):
        rec = source[i]
        out["captions"].append([text_lib.normalize_caption(text_lib.as_text(c)) for c in rec["captions"]])
        out["qa"].append([(text_lib.normalize_question(text_lib.as_text(q)), text_lib.as_text(a).strip())
                          for q, a in zip(rec["qa_questions"], rec["qa_answers"])])
        out["qa_types"].append([text_lib.as_text(t) for t in rec["qa_types"]])
        out["targets"].append(attribute_targets(rec["objects"]))
        out["background"].append(BACKGROUND_CLASSES.index(text_lib.as_text(rec["background"])))
        if image_size:
            img, _ = transforms.decode(rec["image"])
            out["images"].append(transforms.normalize(transforms.eval_image(img, image_size)))
    out["targets"] = np.stack(out["targets"])
    out["background"] = np.asarray(out["background"], np.int32)
    out["images"] = np.stack(out["images"]) if image_size else None
    return out


def attribute_targets(objects: dict) -> np.ndarray:
    """Scene objects (the record's column dict) -> int32 [CELLS, 3] class ids (0 = empty cell)."""
    t = np.zeros((CELLS, 3), np.int32)
    for shape, colour, size, row, col in zip(objects["shape"], objects["colour"], objects["size"],
                                            objects["row"], objects["col"]):
        cell = int(row) * shapes.GRID + int(col)
        t[cell] = (SHAPE_CLASSES.index(text_lib.as_text(shape)), COLOUR_CLASSES.index(text_lib.as_text(colour)),
                   SIZE_CLASSES.index(text_lib.as_text(size)))
    return t


def flip_targets(targets: np.ndarray) -> np.ndarray:
    """Targets of the horizontally mirrored images: [N, CELLS, 3] with columns reversed."""
    g = shapes.GRID
    return targets.reshape(-1, g, g, 3)[:, :, ::-1].reshape(-1, CELLS, 3)


def text_scenes(dataset: str, count: int, seed: int) -> dict:
    """`count` scenes drawn afresh as text only ({"captions", "qa"} as `read_scenes`), from the
    training split's share of the scene space, with the `descriptions` of each: the language
    model's corpus (a real LLM reads far more text than the image-text pairs hold). No
    validation or test scene is among them."""
    bcfg = shapes.config_of(dataset)
    rng = np.random.default_rng([seed, 7])
    out = {"captions": [], "qa": [], "descriptions": []}
    while len(out["captions"]) < count:
        scene = shapes.sample_scene(rng, bcfg)
        if shapes.split_of(shapes.scene_key(scene), bcfg) != "train":
            continue
        out["captions"].append([text_lib.normalize_caption(c)
                                for c in shapes.captions_for(scene, bcfg.full_caption)])
        out["descriptions"].append([text_lib.normalize_caption(d) for d in descriptions(scene["objects"])])
        out["qa"].append([(text_lib.normalize_question(q), a)
                          for q, a, _ in shapes.questions_for(scene, rng, tuple(bcfg.colours))])
    return out


def descriptions(objects: list[dict]) -> list[str]:
    """Ways to say everything about a scene (each object's size, colour, shape and place), in
    both object orders: the contexts the LM learns to answer questions from. With the
    corpus's one template only, the LM learns where in it each answer stands (position and
    template, not content) and cannot read anything else: neither another caption nor the
    soft prompt (86 % with the template, 14 % after another caption)."""
    out = []
    for objs in (objects, objects[::-1]):
        named = [(shapes._name(o, True), shapes._name(o), o["size"], shapes._place(o)) for o in objs]
        out.append(" and ".join(f"{full} {place}" for full, _, _, place in named))
        out.append(" and ".join(f"{place} {full}" for full, _, _, place in named))
        out.append(" and ".join(f"{short}, {size}, {place}" for _, short, size, place in named))
        if len(objs) > 1:
            out.append(f"{shapes.NUMBERS[len(objs)]} shapes: " +
                       " and ".join(f"{full} {place}" for full, _, _, place in named))
    return out


def corpus_texts(scenes: dict) -> list[str]:
    """Every text the towers' users will tokenise: captions, questions (in the VQA prompt),
    answers."""
    texts = [c for caps in scenes["captions"] for c in caps]
    texts += [QA_TEMPLATE.format(q) + " " + a for qa in scenes["qa"] for q, a in qa]
    return texts


# ------------------------------------------------------------------------------------- tokenizers
WORD = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' `Whitespace` pre-tokenizer splits


def vocabulary(texts: list[str]) -> list[str]:
    """Words and punctuation runs, most frequent first (ties alphabetical)."""
    counts = collections.Counter(w for t in texts for w in WORD.findall(t))
    return sorted(counts, key=lambda w: (-counts[w], w))


def _word_tokenizer(specials, unk: str, words, template: str, special_for_template, capacity: int):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    tokens = list(specials) + [w for w in words if w not in specials]
    if len(tokens) > capacity:
        raise ValueError(f"{len(tokens)} tokens exceed the vocabulary capacity {capacity}")
    tk = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)},
                                               unk_token=unk))
    # Punctuation apart from words ("circle?" = "circle" "?"), so a word has one id everywhere;
    # decoding rejoins "circle ," as "circle,".
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # "\n" is a word of its own (OPT captions end with it); specials are matched before splitting.
    tk.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                           for s in specials if s != "\n"])
    if "\n" in specials:
        tk.add_tokens([tokenizers.AddedToken("\n", special=False, normalized=False)])
    tk.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tokens.index(s)) for s in special_for_template])
    return tk, len(tokens)


def save_lm_tokenizer(words: list[str], directory: str, capacity: int) -> int:
    """OPT-style word tokenizer: `</s>` before every text (OPT's BOS), `<pad>` padding."""
    tk, n = _word_tokenizer(LM_SPECIALS, "<unk>", words, f"{LM_BOS} $A", [LM_BOS], capacity)
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": LM_BOS, "eos_token": LM_BOS,
        "pad_token": LM_PAD, "unk_token": "<unk>", "model_max_length": 128})
    return n


def save_qformer_tokenizer(words: list[str], directory: str, capacity: int) -> int:
    """BERT-style word tokenizer: `[CLS] text [SEP]`, with `[DEC]` for ITG."""
    tk, n = _word_tokenizer(QFORMER_SPECIALS, "[UNK]", words, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"], capacity)
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]", "bos_token": "[DEC]",
        "model_max_length": 64})
    return n


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ------------------------------------------------------------------------------------- image tower
class AttributeClassifier(nn.Module):
    """ViT + an attention-pooling probe -> per-cell and background logits.

    pixels [B, S, S, 3] -> (cell logits [B, CELLS, len(SHAPE)+len(COLOUR)+len(SIZE)],
    background logits [B, len(BACKGROUND)]). One learned query per grid cell (and one for the
    background) attends over the ViT's output tokens, as the Q-Former's queries will: to find
    its cell, a query must read the place from the tokens themselves, so the features carry
    where things are (a probe with one weight matrix per token would not need that)."""
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        feats = VisionTransformer(self.config, name="vision_model")(pixels)  # [B, T, D]
        d = feats.shape[-1]
        queries = self.param("probe_queries", nn.initializers.normal(d ** -0.5), (CELLS + 1, d))
        keys = nn.Dense(d, name="probe_key")(feats)
        values = nn.Dense(d, name="probe_value")(feats)
        weights = jax.nn.softmax(jnp.einsum("qd,btd->bqt", queries, keys) / np.sqrt(d), axis=-1)
        pooled = jnp.einsum("bqt,btd->bqd", weights, values)
        per_cell = len(SHAPE_CLASSES) + len(COLOUR_CLASSES) + len(SIZE_CLASSES)
        cells = nn.Dense(per_cell, name="cell_head")(pooled[:, :CELLS])
        return cells, nn.Dense(len(BACKGROUND_CLASSES), name="background_head")(pooled[:, CELLS])


def attribute_loss(cell_logits, bg_logits, targets, background):
    """Mean cross-entropy over the three per-cell attributes and the background.

    Returns (loss, accuracies [5]): shape, colour and size on the occupied cells (an empty cell
    is 2 of 3 on average, so counting it would flatter), occupancy (empty or not) of every
    cell, background."""
    splits = np.cumsum([len(SHAPE_CLASSES), len(COLOUR_CLASSES)])
    parts = jnp.split(cell_logits, splits, axis=-1)
    occupied = (targets[..., 0] > 0).astype(jnp.float32)
    losses, accs = [], []
    for i, logits in enumerate(parts):
        logp = jax.nn.log_softmax(logits)
        losses.append(-jnp.mean(jnp.take_along_axis(logp, targets[..., i:i + 1], -1)))
        hit = (jnp.argmax(logits, -1) == targets[..., i]).astype(jnp.float32)
        accs.append(jnp.sum(hit * occupied) / jnp.maximum(jnp.sum(occupied), 1.0))
    accs.append(jnp.mean((jnp.argmax(parts[0], -1) > 0) == (targets[..., 0] > 0)))
    logp = jax.nn.log_softmax(bg_logits)
    losses.append(-jnp.mean(jnp.take_along_axis(logp, background[:, None], -1)))
    accs.append(jnp.mean(jnp.argmax(bg_logits, -1) == background))
    return sum(losses), jnp.stack(accs)


def pretrain_vision(cfg, train: dict, val: dict, out_dir: str, progress: Progress | None = None) -> dict:
    """Trains the image tower on the attribute task; saves `out_dir` (transformers Blip2Vision
    layout, tensors under `vision_model.*`). Returns validation accuracies."""
    vcfg = VisionConfig(**dict(cfg.vision))
    tc = cfg.vision_train
    model = AttributeClassifier(vcfg)
    rng = np.random.default_rng(cfg.seed)
    params = sharding.unbox(jax.jit(model.init)(jax.random.key(cfg.seed), train["images"][:1])["params"])
    tx = optim.make_optimizer(tc.optim, params)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, targets, background):
        def loss_fn(p):
            cells, bg = model.apply({"params": p}, images)
            return attribute_loss(cells, bg, targets, background)
        (loss, accs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accs

    n = len(train["images"])
    flipped = flip_targets(train["targets"])
    for i in range(int(tc.steps)):
        idx = rng.integers(0, n, int(tc.batch_size))
        images, targets = train["images"][idx], train["targets"][idx]
        if tc.flip:  # mirror half of the batch: the grid columns swap with it
            f = rng.random(len(idx)) < 0.5
            images = np.where(f[:, None, None, None], images[:, :, ::-1], images)
            targets = np.where(f[:, None, None], flipped[idx], targets)
        params, opt_state, loss, _ = step(params, opt_state, images, targets, train["background"][idx])
        if progress:
            progress(i + 1, int(tc.steps))
    eval_fn = jax.jit(lambda p, x, t, b: attribute_loss(*model.apply({"params": p}, x), t, b)[1])
    accs = np.mean([np.asarray(eval_fn(params, val["images"][s:s + 128], val["targets"][s:s + 128],
                                       val["background"][s:s + 128]))
                    for s in range(0, len(val["images"]) - 127, 128)], axis=0)
    os.makedirs(out_dir, exist_ok=True)
    tensors = convert_vision.to_hf(jax.tree.map(np.asarray, params["vision_model"]), vcfg,
                                   prefix="vision_model.")
    save_state_dict(tensors, out_dir)
    _write_json(os.path.join(out_dir, "config.json"),
                dict(vcfg.to_hf(), architectures=["Blip2VisionModel"]))
    names = ("shape", "colour", "size", "occupancy", "background")
    return {**{f"val_{n}_acc": float(a) for n, a in zip(names, accs)}, "final_loss": float(loss)}


# ------------------------------------------------------------------------------------- language model
def lm_document(kind: str, captions: list[str], qa: list[tuple[str, str]], rng,
                max_questions: int = 3, wordings: list[str] | None = None) -> list[str]:
    """The text segments of one training document; each becomes `</s> segment \\n`.

    Kinds: "caption"; "description_caption" and "description_qa" (a caption, or
    1..max_questions questions about the scene with their answers, after a full description of
    the scene, one of `wordings` or else the last caption, from which every answer can be read:
    text about a text, the skill zero-shot VQA relies on)."""
    cap = captions[rng.integers(len(captions))]
    described = wordings[rng.integers(len(wordings))] if wordings else captions[-1]
    if kind == "caption":
        return [cap]
    if kind == "description_caption":
        return [described, cap]
    if kind == "description_qa":
        lines = [QA_TEMPLATE.format(q) + " " + a for q, a in qa]
        k = int(rng.integers(1, max_questions + 1))
        return [described] + [lines[j] for j in rng.permutation(len(lines))[:k]]
    raise ValueError(f"unknown LM document kind {kind!r}")


def encode_document(segments: list[str], tok, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Segments -> (ids int32 [max_len], labels int32 [max_len]): each segment is `BOS text \\n`
    as in stage 2's captions; the loss covers everything after the first BOS."""
    ids: list[int] = []
    for s in segments:
        ids += list(tok.prefix) + tok.encode(s + "\n")
    ids = ids[:max_len]
    labels = [IGNORE] + ids[1:]
    pad = max_len - len(ids)
    return (np.asarray(ids + [tok.pad_id] * pad, np.int32),
            np.asarray(labels + [IGNORE] * pad, np.int32))


def lm_batch(scenes: dict, mix: dict, tok, batch_size: int, max_len: int, rng,
             max_questions: int = 3) -> dict:
    kinds, probs = list(mix), np.asarray(list(mix.values()), np.float64)
    ids, labels = [], []
    for _ in range(batch_size):
        i = int(rng.integers(len(scenes["captions"])))
        kind = kinds[rng.choice(len(kinds), p=probs / probs.sum())]
        described = scenes["descriptions"][i] if "descriptions" in scenes else None
        a, b = encode_document(lm_document(kind, scenes["captions"][i], scenes["qa"][i], rng,
                                           max_questions, described), tok, max_len)
        ids.append(a)
        labels.append(b)
    return {"ids": np.stack(ids), "labels": np.stack(labels)}


def _embed_and_decode(m: OPTForCausalLM, ids):
    """Touches every parameter of the LM (for `init`)."""
    return m(m.embed(ids), jnp.ones(ids.shape, jnp.int32), jnp.zeros(ids.shape, jnp.int32))


def _lm_loss(model, params, ids, labels):
    mask = ids != model.config.pad_token_id  # right padding only
    embeds = model.apply({"params": params}, ids, method=OPTForCausalLM.embed)
    logits, _ = model.apply({"params": params}, embeds, mask.astype(jnp.int32),
                            jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    logp = jax.nn.log_softmax(logits[:, :-1])
    tgt = labels[:, 1:]
    valid = tgt != IGNORE
    nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def train_lm(model, tx, params, next_batch: Callable[[], dict], total: int, per_call: int = 1,
             progress: Progress | None = None):
    """`total` AdamW steps of the LM loss on `next_batch()` batches ({"ids", "labels"}),
    `per_call` of them per jitted call (a scan over their stacked batches; a shorter tail one a
    call) -> (params, the last step's loss)."""
    def step(carry, batch):
        params, opt_state, _ = carry
        loss, grads = jax.value_and_grad(lambda p: _lm_loss(model, p, *batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, loss), None

    steps = jax.jit(lambda carry, ids, labels: jax.lax.scan(step, carry, (ids, labels))[0])
    carry, done = (params, tx.init(params), jnp.float32(0)), 0
    while done < total:
        k = per_call if total - done >= per_call else 1
        bs = [next_batch() for _ in range(k)]
        carry = steps(carry, np.stack([b["ids"] for b in bs]), np.stack([b["labels"] for b in bs]))
        done += k
        if progress:
            progress(done, total)
    return carry[0], carry[2]


def pretrain_lm(cfg, train: dict, val: dict, tok, out_dir: str, progress: Progress | None = None) -> dict:
    """Trains the tiny OPT on text only; saves an OPTForCausalLM directory (weights, config,
    the tokenizer already written there). Returns the validation loss per document kind."""
    tcfg = OPTConfig(**{k: v for k, v in dict(cfg.text).items() if k != "model_type"})
    tc = cfg.lm_train
    model = OPTForCausalLM(tcfg)
    rng = np.random.default_rng(cfg.seed + 1)
    ids = jnp.zeros((1, 2), jnp.int32)
    params = sharding.unbox(jax.jit(lambda r: model.init(r, ids, method=_embed_and_decode))(
        jax.random.key(cfg.seed + 1))["params"])
    tx = optim.make_optimizer(tc.optim, params)
    mix = dict(tc.mix)
    params, loss = train_lm(
        model, tx, params, lambda: lm_batch(train, mix, tok, int(tc.batch_size), int(tc.max_len), rng,
                                            int(tc.max_questions)),
        int(tc.steps), int(tc.get("steps_per_call", 1)), progress)
    eval_fn = jax.jit(lambda p, i, l: _lm_loss(model, p, i, l))
    vrng = np.random.default_rng(0)
    val_loss = {k: float(eval_fn(params, **_renamed(lm_batch(val, {k: 1.0}, tok, 128, int(tc.max_len), vrng,
                                                             int(tc.max_questions)))))
                for k in mix}
    tensors = convert_opt.to_hf(jax.tree.map(np.asarray, params), tcfg)
    save_state_dict(tensors, out_dir)
    _write_json(os.path.join(out_dir, "config.json"), dict(
        tcfg.to_hf(), architectures=["OPTForCausalLM"], torch_dtype="float32"))
    reading = {f"{k}_{t}": v for k, ctx in (("qa_with_description", True), ("qa_blind", False))
               for t, v in lm_answers(model, params, tok, val, ctx).items()}
    reading.update(two_object_reading(model, params, tok, val))
    return {"final_loss": float(loss), **{f"val_loss_{k}": v for k, v in val_loss.items()}, **reading}


def two_object_reading(model, params, tok, scenes: dict) -> dict:
    """Accuracy (%) of the LM's answers to every colour and shape question about the two-object
    scenes, after each scene's full description in text: what binding the LM brings to VQA
    (`lm_answers` asks one question per scene, mostly about one-object scenes or the first
    object). {"qa_two_object_colour", "qa_two_object_shape"}."""
    out = {}
    for kind in ("colour", "shape"):
        picked = [(caps, [pair]) for caps, qa, types, cells in
                  zip(scenes["captions"], scenes["qa"], scenes["qa_types"], scenes["targets"])
                  if (cells[:, 0] > 0).sum() == 2 for pair, t in zip(qa, types) if t == kind]
        if picked:
            sub = {"captions": [c for c, _ in picked], "qa": [q for _, q in picked]}
            out[f"qa_two_object_{kind}"] = lm_answers(model, params, tok, sub, True)["accuracy"]
    return out


def lm_answers(model, params, tok, scenes: dict, with_description: bool, max_new: int = 4) -> dict:
    """How well the LM reads: accuracy (%) of its greedy answers to one question per scene
    ("Question: q Answer:"), after the scene's full description in text or with no context:
    the text-only ceiling and floor of zero-shot VQA. Returns {"accuracy", per first word}."""
    eos = tok.encode("\n")[0]

    @jax.jit
    def next_token(p, ids, mask):
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        emb = model.apply({"params": p}, ids, method=OPTForCausalLM.embed)
        logits, _ = model.apply({"params": p}, emb, mask, pos)
        return jnp.argmax(logits[:, -1], axis=-1)

    rows, seqs = [], []
    for i, (caps, qa) in enumerate(zip(scenes["captions"], scenes["qa"])):
        q, a = qa[i % len(qa)]
        ctx = list(tok.prefix) + tok.encode(caps[-1] + "\n") if with_description else []
        seqs.append(ctx + list(tok.prefix) + tok.encode(QA_TEMPLATE.format(q)))
        rows.append((q.split()[0] + " " + q.split()[1], a))
    width = max(map(len, seqs)) + max_new
    out = [[] for _ in seqs]
    for _ in range(max_new):  # left-padded to a fixed width: one compiled shape
        ids = np.full((len(seqs), width), tok.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, width - len(s):], mask[j, width - len(s):] = s, 1
        nxt = np.asarray(next_token(params, ids, mask))
        for j, n in enumerate(nxt):
            seqs[j] = seqs[j] + [int(n)]
            out[j].append(int(n))
    hits: dict[str, list[bool]] = {}
    for (kind, truth), o in zip(rows, out):
        o = o[:o.index(eos)] if eos in o else o
        hits.setdefault(kind, []).append(tok.decode(o).strip() == truth)
    res = {"accuracy": 100.0 * float(np.mean([h for v in hits.values() for h in v]))}
    res.update({k.replace(" ", "_"): 100.0 * float(np.mean(v)) for k, v in sorted(hits.items())})
    return res


def _renamed(b: dict) -> dict:
    return {"i": b["ids"], "l": b["labels"]}


# ------------------------------------------------------------------------------------- both
def write_tokenizers(cfg, towers_dir: str) -> dict:
    """Both word-level tokenizers from the training split's words: `opt/` (the LM's) and
    `qformer_tokenizer/`. Checks the LM ids the config assumes."""
    from blip2_jax.data.tokenizers import load_tokenizer
    train = read_scenes(cfg.dataset, "train", cfg.data_dir)
    words = vocabulary(corpus_texts(train))
    n_lm = save_lm_tokenizer(words, os.path.join(towers_dir, "opt"), int(cfg.vocab_size))
    n_qf = save_qformer_tokenizer(words, os.path.join(towers_dir, "qformer_tokenizer"), int(cfg.vocab_size))
    tok = load_tokenizer(os.path.join(towers_dir, "opt"))
    for name, value in (("bos_token_id", tok.prefix[0]), ("pad_token_id", tok.pad_id),
                        ("eos_token_id", tok.encode("\n")[0])):
        if cfg.text[name] != value:
            raise ValueError(f"miniature config: text.{name}={cfg.text[name]} but the tokenizer has {value}")
    return {"vocab_lm": n_lm, "vocab_qformer": n_qf}


def pretrain_vision_tower(cfg, towers_dir: str, progress: Progress | None = None) -> dict:
    """The image tower on pixels alone -> `towers_dir/vision/`; validation accuracies."""
    size = int(cfg.vision["image_size"])
    train = read_scenes(cfg.dataset, "train", cfg.data_dir, size)
    val = read_scenes(cfg.dataset, "validation", cfg.data_dir, size)
    return pretrain_vision(cfg, train, val, os.path.join(towers_dir, "vision"), progress)


def pretrain_lm_tower(cfg, towers_dir: str, progress: Progress | None = None) -> dict:
    """The LM on text alone -> `towers_dir/opt/` (beside its tokenizer, `write_tokenizers`);
    validation losses and how well it answers questions about a description."""
    from blip2_jax.data.tokenizers import load_tokenizer
    n = int(cfg.lm_train.get("corpus_scenes", 0))
    train = (text_scenes(cfg.dataset, n, cfg.seed) if n
             else read_scenes(cfg.dataset, "train", cfg.data_dir))
    val = read_scenes(cfg.dataset, "validation", cfg.data_dir)
    tok = load_tokenizer(os.path.join(towers_dir, "opt"))
    return pretrain_lm(cfg, train, val, tok, os.path.join(towers_dir, "opt"), progress)
