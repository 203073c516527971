"""Writes tests/golden/decoding/hf_decoding.npz: transformers' own greedy and beam search on a stub LM.

Run with a Python that has torch + transformers (the reference implementation):
    python tools/make_decoding_golden.py

The stub language model has no weights to learn, only three fixed float32 tables, and computes,
for an input x_0..x_{m-1} (prompt + generated so far):
    acc    = ((G[x_0] + G[x_1]) + ...) + G[x_{m-1}]      (left to right, float32)
    logits = (T[x_{m-1}] + acc) + S[m]
T is a bigram table, G makes the logits depend on the whole history (in JAX this running sum
lives in the cache, so a wrong beam reorder changes the result), S[m] depends on the length and
pushes EOS up as sequences grow. The stub recomputes from the full `input_ids` every step
(use_cache=False), so the reference needs no cache at all.

The file holds the tables, the prompts, every config and the reference's outputs: generated ids
cropped as the reference crops them (`gen_len` columns) and `sequences_scores` for beams.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "golden" / "decoding" / "hf_decoding.npz"

VOCAB = 24
PROMPT_LEN = 5
MAX_LEN = 40  # longest prompt + generation the tables support
EOS = 3
EOS2 = 7
PAD = 1


def make_tables(seed: int = 4):
    """Seed and EOS ramp picked so rows differ: row 0's best beams run to the length limit,
    rows 1 and 2 end after 5-10 tokens."""
    rng = np.random.default_rng(seed)
    t = (rng.standard_normal((VOCAB, VOCAB)) * 1.0).astype(np.float32)
    g = (rng.standard_normal((VOCAB, VOCAB)) * 0.4).astype(np.float32)
    s = (rng.standard_normal((MAX_LEN + 1, VOCAB)) * 0.3).astype(np.float32)
    generated = np.arange(MAX_LEN + 1) - PROMPT_LEN
    s[:, EOS] += (-3.0 + 0.8 * generated).astype(np.float32)
    s[:, EOS2] += (-4.0 + 0.56 * generated).astype(np.float32)
    return t, g, s


class StubConfig(PretrainedConfig):
    model_type = "decoding_stub"

    def __init__(self, vocab_size=VOCAB, **kwargs):
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class StubLM(PreTrainedModel, GenerationMixin):
    config_class = StubConfig
    main_input_name = "input_ids"

    def __init__(self, config, tables):
        super().__init__(config)
        t, g, s = (torch.from_numpy(a) for a in tables)
        self.register_buffer("t", t)
        self.register_buffer("g", g)
        self.register_buffer("s", s)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.calls = []

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        n, m = input_ids.shape
        self.calls.append(m)
        acc = torch.zeros((n, self.config.vocab_size), dtype=torch.float32)
        for i in range(m):
            acc = acc + self.g[input_ids[:, i]]
        last = (self.t[input_ids[:, -1]] + acc) + self.s[m]
        logits = torch.zeros((n, m, self.config.vocab_size), dtype=torch.float32)
        logits[:, -1] = last
        return CausalLMOutput(logits=logits)


def prompts():
    # Three rows that behave differently; row 0 starts with two left pads (masked).
    ids = np.array([[PAD, PAD, 5, 9, 2], [11, 4, 4, 20, 13], [17, 0, 22, 6, 15]], np.int64)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


GREEDY = [
    dict(max_new=12, min_new=0, rep=1.0, eos=EOS),
    dict(max_new=12, min_new=6, rep=1.0, eos=EOS),
    dict(max_new=14, min_new=0, rep=1.3, eos=EOS),
    dict(max_new=10, min_new=2, rep=0.8, eos=[EOS, EOS2]),
]
BEAM = [
    dict(beams=3, max_new=12, min_new=0, lp=1.0, es=False, rep=1.0, ret=1, eos=EOS, pad=PAD),
    dict(beams=4, max_new=12, min_new=0, lp=0.0, es=False, rep=1.0, ret=3, eos=EOS, pad=PAD),
    dict(beams=4, max_new=12, min_new=0, lp=2.0, es=False, rep=1.0, ret=4, eos=EOS, pad=PAD),
    dict(beams=3, max_new=12, min_new=0, lp=-1.0, es=False, rep=1.0, ret=2, eos=EOS, pad=PAD),
    dict(beams=3, max_new=12, min_new=0, lp=1.0, es=True, rep=1.0, ret=3, eos=EOS, pad=PAD),
    dict(beams=4, max_new=10, min_new=6, lp=1.0, es=True, rep=1.0, ret=2, eos=EOS, pad=PAD),
    dict(beams=3, max_new=14, min_new=0, lp=1.0, es=False, rep=1.4, ret=2, eos=EOS, pad=PAD),
    dict(beams=3, max_new=12, min_new=1, lp=0.5, es="never", rep=1.0, ret=3, eos=EOS, pad=PAD),
    dict(beams=3, max_new=12, min_new=0, lp=-1.0, es="never", rep=1.0, ret=1, eos=EOS, pad=PAD),
    dict(beams=2, max_new=12, min_new=0, lp=1.0, es=False, rep=1.0, ret=2, eos=[EOS, EOS2], pad=PAD),
    dict(beams=3, max_new=6, min_new=0, lp=1.0, es=False, rep=1.0, ret=3, eos=EOS, pad=0),
    dict(beams=4, max_new=3, min_new=0, lp=1.0, es=False, rep=1.2, ret=4, eos=EOS, pad=PAD),
    # Two EOS ids that both rank high: more than `beams` of 2*beams candidates end, so the
    # reference's (1 + n_eos) * beams candidates matter.
    dict(beams=2, max_new=10, min_new=0, lp=2.0, es="never", rep=1.0, ret=2, eos=[EOS, 11], pad=PAD),
    dict(beams=3, max_new=10, min_new=0, lp=2.0, es="never", rep=1.0, ret=3, eos=[EOS, 15], pad=PAD),
]


def main():
    torch.manual_seed(0)
    tables = make_tables()
    model = StubLM(StubConfig(), tables).eval()
    ids, mask = prompts()
    input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    out = {"T": tables[0], "G": tables[1], "S": tables[2], "prompt": ids, "prompt_mask": mask}

    common = dict(use_cache=False, do_sample=False, top_k=None, top_p=None, temperature=None)
    for i, c in enumerate(GREEDY):
        with torch.no_grad():
            seq = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=c["max_new"],
                                 min_new_tokens=c["min_new"], repetition_penalty=c["rep"],
                                 eos_token_id=c["eos"], pad_token_id=PAD, num_beams=1, **common)
        out[f"greedy{i}_tokens"] = seq[:, PROMPT_LEN:].numpy()
    for i, c in enumerate(BEAM):
        with torch.no_grad():
            res = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=c["max_new"],
                                 min_new_tokens=c["min_new"], repetition_penalty=c["rep"],
                                 eos_token_id=c["eos"], pad_token_id=c["pad"], num_beams=c["beams"],
                                 length_penalty=c["lp"], early_stopping=c["es"],
                                 num_return_sequences=c["ret"], return_dict_in_generate=True,
                                 output_scores=True, **common)
        b = ids.shape[0]
        out[f"beam{i}_tokens"] = res.sequences[:, PROMPT_LEN:].numpy().reshape(b, c["ret"], -1)
        out[f"beam{i}_scores"] = res.sequences_scores.numpy().reshape(b, c["ret"])
    out["greedy_configs"] = np.array(json.dumps(GREEDY))
    out["beam_configs"] = np.array(json.dumps(BEAM))
    out["transformers_version"] = np.array(transformers.__version__)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    for key in sorted(out):
        if key.endswith("_tokens"):
            print(key, out[key].reshape(-1, out[key].shape[-1]).tolist())


if __name__ == "__main__":
    main()
