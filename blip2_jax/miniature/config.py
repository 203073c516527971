r"""The miniature BLIP-2 pipeline (`python -m blip2_jax.miniature`): every phase's settings.

`configs/tiny/miniature.py` exposes this `get_config` to the trainer's command line (W = the
pipeline's workdir, S = the seed; the pipeline prints these commands):

  python -m blip2_jax.main --config=configs/tiny/miniature.py:stage1,towers=W/towers,run=W/seed_S,seed=S \
      --workdir=W/seed_S/stage1
  python -m blip2_jax.main --config=configs/tiny/miniature.py:stage2,towers=W/towers,run=W/seed_S,seed=S \
      --workdir=W/seed_S/stage2
  python -m blip2_jax.main --config=configs/tiny/miniature.py:stage2_no_stage1,towers=W/towers,run=W/seed_S,seed=S \
      --workdir=W/seed_S/stage2_no_stage1

Argument: `<phase>[,key=value...]`. Phases: `unimodal` (the towers' pretraining, unimodal.py),
`stage1`, `stage2`, `stage2_no_stage1` (the paper's Fig. 5 ablation: a random Q-Former straight
into stage 2, same stage-2 steps), `eval` (the zero-shot evaluations).
Keys: towers (the directory `unimodal` wrote: vision/, opt/, qformer_tokenizer/), run (one
seed's folder: start/ holds the Q-Former's random draw, stage1/ the stage-1 workdir), data_dir
(TFDS folder), fast (1: the shortened pipeline of the tests), seed (default 0: the Q-Former's
initialisation and the data order of stages 1 and 2; the towers always use seed 0).

The models are the tiny ones of tiny.py with two changes: the image tower reads 48 px images
(one 16 px patch per cell of the scenes' 3x3 grid), and both text vocabularies are the corpus's
words (at most `VOCAB` entries, built by unimodal.py from the training split) instead of BERT's
30k WordPiece and GPT-2's 50k BPE; with 64-wide models those output layers were 80-95% of every
step's time.
"""
import ml_collections

from blip2_jax import config_lib
from blip2_jax.miniature import tiny

DESIGN = 5           # bumped when what the phases compute changes: older workdirs are refused
VOCAB = 256          # capacity of both word-level vocabularies (the corpus has ~100 words)
LM_IDS = dict(bos_token_id=2, pad_token_id=1, eos_token_id=4)  # unimodal.LM_SPECIALS: </s>, <pad>, "\n"
DATASET = "synthetic_shapes"  # default config: 4000 / 250 / 250 scenes, 48 px, 1-2 shapes
VISION = dict(tiny.TINY_VISION, image_size=48, patch_size=16)
LM = dict(tiny.TINY_OPT, vocab_size=VOCAB, init_std=0.1, num_attention_heads=8, **LM_IDS)  # 8 heads: 77 vs 71 % read
QUERIES = 8
QFORMER_LAYERS = 4   # tiny.TINY_QFORMER has 2: too few for ITM to learn hard negatives
TEXT_LEN = 24        # Q-Former tokens: the full scene description is up to ~20
LLM_LEN = 28         # LM tokens after the soft prompt: BOS + caption + "\n"

STAGE1_BATCH = 16    # stage 1 at batch 32 for 600 steps left ITM undertrained (re-ranking lowered R@1)

# phase -> (steps, fast steps)
STEPS = {"vision": (1000, 1000), "lm": (5000, 2000), "stage1": (1800, 1800), "stage2": (2000, 600)}


def _args(arg: str) -> tuple[str, dict]:
    phase, *rest = [a for a in (arg or "").split(",") if a]
    kv = dict(item.split("=", 1) for item in rest)
    unknown = set(kv) - {"towers", "run", "data_dir", "fast", "seed"}
    if unknown:
        raise ValueError(f"miniature config: unknown key(s) {sorted(unknown)}")
    return phase, kv


def _steps(name: str, fast: bool) -> int:
    return STEPS[name][1 if fast else 0]


def _train_common(c, kv: dict, fast: bool, steps: int):
    """Shared by the trainer's phases: tiny model, word vocabularies, data, schedule."""
    towers = kv.get("towers", "")
    c.model.vision = dict(VISION)
    c.model.qformer = dict(c.model.qformer, vocab_size=VOCAB, num_hidden_layers=QFORMER_LAYERS)
    c.model.num_query_tokens = QUERIES
    c.input.qformer_tokenizer = f"{towers}/qformer_tokenizer" if towers else ""
    c.input.data_dir = kv.get("data_dir") or None
    c.input.dataset = DATASET
    c.input.image_size = VISION["image_size"]
    c.input.max_text_len = TEXT_LEN
    c.input.max_llm_len = LLM_LEN
    c.input.batch_size = 32
    c.input.augment = False       # crops and flips would falsify "left of" / "top right" captions
    c.input.cache_raw = True      # 4000 training scenes read for up to 16 epochs
    c.log_mfu = False             # its FLOP count traces the step unrolled: seconds per phase here
    c.init.vision_dir = f"{towers}/vision" if towers else ""
    c.total_steps = c.optim.total_steps = steps
    c.optim.warmup_steps = 20
    c.optim.peak_lr = 1e-3
    c.optim.min_lr = 1e-4
    c.seed = c.input.seed = int(kv.get("seed", 0))
    c.log_every = 10
    c.ckpt_every = steps          # one checkpoint, at the end: stage 2 and evaluation read it
    c.keep_ckpts = 1
    c.async_checkpointing = False
    return c


def _stage1(kv, fast):
    c = config_lib.base(task="stage1", preset="pretrain_vitg")
    c.model.qformer_lm_head = True
    c.input.text_processor = "qformer_caption"
    c = tiny.tiny(c, text=None)
    c = _train_common(c, kv, fast, _steps("stage1", fast))
    c.input.batch_size = STAGE1_BATCH  # ITC/ITM negatives come from the batch
    # The pretrained ViT and a random Q-Former, drawn once at the tiny width's scale and shared
    # with the ablation (pipeline.write_qformer_start).
    c.init.source = "hf"
    c.init.hf_dir = f"{kv.get('run', '')}/start/stage1"
    c.init.bert = ""
    return c


def _stage2(kv, fast, from_stage1: bool):
    c = config_lib.base(task="lm", preset="vitg_opt2.7b")
    c.input.text_processor = "opt_caption"
    c.input.llm_eos_text = "\n"
    c = tiny.tiny(c, text="opt")
    c = _train_common(c, kv, fast, _steps("stage2", fast))
    towers = kv.get("towers", "")
    # The pretrained LM's own tokenizer; ids as unimodal.py lays them out (OPT's convention:
    # </s> is BOS, captions end with "\n").
    c.input.llm_tokenizer = f"{towers}/opt" if towers else ""
    c.model.text = dict(LM)
    c.init.llm_dir = f"{towers}/opt" if towers else ""
    c.init.bert = ""
    if from_stage1:
        c.init.source = "stage1"
        c.init.stage1_workdir = f"{kv.get('run', '')}/stage1"
    else:  # ablation: the towers and the very Q-Former draw stage 1 started from
        c.init.source = "hf"
        c.init.hf_dir = f"{kv.get('run', '')}/start/opt"
    return c


def _unimodal(kv, fast):
    """The towers' pretraining (unimodal.py): each on its own modality only. Always seed 0: the
    frozen towers are given, as the paper's EVA-CLIP and OPT are; the seeds vary what BLIP-2
    trains (kv["seed"] only sets the Q-Former draw, `qformer_seed`)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.qformer_seed = int(kv.get("seed", 0))
    c.data_dir = kv.get("data_dir") or None
    c.dataset = DATASET
    c.vocab_size = VOCAB
    # Std of the Q-Former's random matrices: 1/sqrt(width). The model's built-in 0.02 is
    # BERT-base's (width 768); at width 64 it stalls stage 1 (pipeline.write_qformer_start).
    c.qformer_init_std = 0.125
    c.vision = dict(VISION)
    # init_std 0.1 ~ 1/sqrt(width): with 0.02 the 64-wide LM learns to read its context slowly
    c.text = dict(LM)
    c.vision_train = ml_collections.ConfigDict(dict(
        steps=_steps("vision", fast), batch_size=64, flip=True))
    c.vision_train.optim = _optim(_steps("vision", fast), peak_lr=2e-3)
    c.lm_train = ml_collections.ConfigDict(dict(
        steps=_steps("lm", fast), batch_size=32, max_len=64, max_questions=5,
        # steps per jitted call (a scan over that many batches): a tiny model's step is mostly
        # per-call overhead; 2 cores, beside stage 1: ~56 ms a step against ~74 one per call
        steps_per_call=10,
        # document kinds (unimodal.lm_document): a caption; the scene's full description, then
        # another caption of it; the full description, then questions about the scene and their
        # answers. Stage 2 makes the soft prompt stand where the description stands here.
        mix=dict(caption=0.1, description_caption=0.2, description_qa=0.7)))
    # The LM's corpus: scenes drawn afresh as text (unimodal.text_scenes), each described in
    # several wordings (unimodal.descriptions), so it learns to read content, not template slots.
    c.lm_train.corpus_scenes = 20000
    c.lm_train.optim = _optim(_steps("lm", fast), peak_lr=3e-3)
    return c


def _optim(steps: int, peak_lr: float):
    from blip2_jax import optim
    o = optim.default_config()
    o.peak_lr, o.min_lr, o.init_lr = peak_lr, peak_lr / 10, 0.0
    o.warmup_steps = max(steps // 20, 1)
    o.total_steps = steps
    o.weight_decay = 0.01
    return o


def _eval(kv, fast):
    """Zero-shot evaluation on held-out scenes (the test split): overrides of
    tiny.eval_config per evaluator type."""
    split = "test[:64]" if fast else "test"
    common = dict(input=dict(split=split, dataset=DATASET, image_size=VISION["image_size"],
                             data_dir=kv.get("data_dir") or None, batch_size=32),
                  progress=False)
    c = ml_collections.ConfigDict()
    c.caption = dict(common, generation=dict(num_beams=5, max_new_tokens=LLM_LEN - 4, min_new_tokens=1),
                     spice=False)
    # OPT's zero-shot VQA protocol (beam 5, at most 10 new tokens, length penalty 0)
    c.vqa = dict(common, prompt="Question: {} Answer:")
    # Re-rank the ITC top 16 with ITM (the paper's k=128 needs more candidates than 250 images).
    c.retrieval = dict(common, k=16, itm_rows_per_call=32, max_text_len=TEXT_LEN)
    c.examples = 4                 # images whose captions and answers are printed
    return c


def get_config(arg: str = "stage1"):
    phase, kv = _args(arg)
    fast = kv.get("fast", "0") not in ("0", "", "false", "False")
    if phase == "unimodal":
        return _unimodal(kv, fast)
    if phase == "stage1":
        return _stage1(kv, fast)
    if phase == "stage2":
        return _stage2(kv, fast, from_stage1=True)
    if phase == "stage2_no_stage1":
        return _stage2(kv, fast, from_stage1=False)
    if phase == "eval":
        return _eval(kv, fast)
    raise ValueError(f"miniature config: unknown phase {phase!r} "
                     "(unimodal, stage1, stage2, stage2_no_stage1, eval)")
