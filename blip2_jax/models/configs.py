"""Model configurations: frozen dataclasses that read and write transformers' config.json fields.

Field names follow transformers (`Blip2VisionConfig`, `Blip2QFormerConfig`, `OPTConfig`,
`T5Config`) so that `from_hf(config_dict)` / `to_hf()` are plain renames. Dataclasses are
hashable, so a config can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Union

LIMITS_ENV = "BLIP2_JAX_LIMITS"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what a configuration or input file may ask for, checked before anything is
    allocated. Far above every released BLIP-2 (widths <= 6144, 39+48 layers, 490 px); raise
    them with `BLIP2_JAX_LIMITS="max_width=131072,max_image_pixels=100000000"` or by passing a
    `Limits` to the loaders."""
    max_width: int = 2**16            # hidden sizes, FFN widths, head widths
    max_layers: int = 1024
    max_vocab: int = 2**20
    max_positions: int = 2**20        # position tables, query tokens
    max_image_size: int = 4096        # px: the vision tower's image_size, processor sizes
    max_image_pixels: int = 64_000_000  # decoded image size (width x height)
    max_tensors: int = 2**17          # entries in one safetensors header

    @classmethod
    def from_env(cls) -> "Limits":
        """Defaults, overridden by `BLIP2_JAX_LIMITS` (comma-separated name=integer)."""
        spec = os.environ.get(LIMITS_ENV, "").strip()
        if not spec:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        over = {}
        for item in spec.split(","):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in names or not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"{LIMITS_ENV}: {item.strip()!r} is not name=positive integer "
                                 f"(names: {', '.join(sorted(names))})")
            over[name] = int(value)
        return cls(**over)


def _pick(cls, d: Any, where: str = "") -> dict[str, Any]:
    """The fields of `cls` present in the JSON object `d`, type-checked (a wrong JSON type is a
    one-line ValueError naming `where.field`)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__} must be a JSON object, not {type(d).__name__}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            out[f.name] = _typed(d[f.name], f.type, f"{where}.{f.name}" if where else f.name)
    return out


_JSON_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _typed(value: Any, annotation: str, name: str) -> Any:
    """`value` if it has the JSON type `annotation` names ("int", "float", "bool", "str",
    "int | None"); other annotations pass through (lists become tuples)."""
    kind = annotation.replace(" | None", "")
    if annotation.endswith("| None") and value is None:
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(kind)
    if ok is False:
        raise ValueError(f"{name} must be {_JSON_TYPES[kind]}, got {value!r:.40}")
    return tuple(value) if isinstance(value, list) else value


def _size(x, name: str) -> int:
    """transformers allows `image_size`/`patch_size` as int or [h, w]; we support square only."""
    if isinstance(x, (list, tuple)):
        if not x or len(set(map(repr, x))) != 1:
            raise ValueError(f"{name}: non-square size {list(x)} is not supported")
        x = x[0]
    return _typed(x, "int", name)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _within(value: int, low: int, high: int, name: str, limit: str = "") -> None:
    """low <= value <= high, else a message naming the field (and the limit to raise)."""
    hint = f" (limit {limit}; see {LIMITS_ENV})" if limit else ""
    _need(low <= value <= high, f"{name}={value} is outside [{low}, {high}]{hint}")


def _heads_divide(width: int, heads: int, where: str, width_name: str = "hidden_size",
                  heads_name: str = "num_attention_heads") -> None:
    _need(heads >= 1, f"{where}.{heads_name}={heads} must be positive")
    _need(width % heads == 0, f"{where}.{heads_name}={heads} does not divide {where}.{width_name}={width}")


def _activation_known(name: str, where: str) -> None:
    from blip2_jax.models.layers import ACTIVATIONS
    _need(name in ACTIVATIONS, f"{where}={name!r} is not a supported activation ({', '.join(sorted(ACTIVATIONS))})")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """EVA ViT-g/14 (`kind="eva"`, HF `Blip2VisionModel`) or CLIP ViT-L/14 (`kind="clip"`).

    `num_hidden_layers` is the number of blocks that run: BLIP-2 drops the ViT's last block
    (39 of 40 for ViT-g, 23 of 24 for ViT-L). `post_layernorm` is BLIP-2's `ln_vision`.
    """
    kind: str = "eva"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    post_layernorm_eps: float = 1e-6  # ln_vision (LAVIS uses 1e-5)
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict[str, Any], limits: Limits | None = None, where: str = "vision_config") -> "VisionConfig":
        rest = _pick(cls, {k: v for k, v in d.items() if k not in ("image_size", "patch_size")}
                     if isinstance(d, dict) else d, where)
        sizes = {k: _size(d.get(k, default), f"{where}.{k}") for k, default in (("image_size", 224), ("patch_size", 14))}
        cfg = cls(**rest, **sizes)
        cfg = dataclasses.replace(cfg, post_layernorm_eps=cfg.layer_norm_eps)
        cfg.check(limits or Limits.from_env(), where)
        return cfg

    def check(self, limits: Limits, where: str = "vision_config") -> None:
        """The tower's arithmetic: positive sizes within `limits`, heads dividing the width,
        patches tiling the image."""
        _need(self.kind in ("eva", "clip"), f"{where}.kind={self.kind!r} is not 'eva' or 'clip'")
        for name in ("hidden_size", "intermediate_size"):
            _within(getattr(self, name), 1, limits.max_width, f"{where}.{name}", "max_width")
        _within(self.num_hidden_layers, 1, limits.max_layers, f"{where}.num_hidden_layers", "max_layers")
        _heads_divide(self.hidden_size, self.num_attention_heads, where)
        _within(self.image_size, 1, limits.max_image_size, f"{where}.image_size", "max_image_size")
        _need(self.patch_size >= 1, f"{where}.patch_size={self.patch_size} must be positive")
        _need(self.image_size % self.patch_size == 0,
              f"{where}.patch_size={self.patch_size} does not divide {where}.image_size={self.image_size}")
        _need(self.layer_norm_eps > 0, f"{where}.layer_norm_eps={self.layer_norm_eps} must be positive")
        _activation_known(self.hidden_act, f"{where}.hidden_act")

    def to_hf(self) -> dict[str, Any]:
        if self.kind != "eva":
            raise ValueError(f"vision tower kind {self.kind!r} has no transformers Blip2VisionConfig")
        d = dataclasses.asdict(self)
        for k in ("kind", "post_layernorm_eps"):
            d.pop(k)
        d["model_type"] = "blip_2_vision_model"
        return d


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """The Querying Transformer (BERT-base layout with cross-attention every N layers)."""
    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False  # text embeddings, text FFN path and retrieval heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def from_hf(cls, d: dict[str, Any], limits: Limits | None = None, where: str = "qformer_config") -> "QFormerConfig":
        cfg = cls(**_pick(cls, d, where))
        cfg.check(limits or Limits.from_env(), where)
        return cfg

    def check(self, limits: Limits, where: str = "qformer_config") -> None:
        for name in ("hidden_size", "intermediate_size", "encoder_hidden_size"):
            _within(getattr(self, name), 1, limits.max_width, f"{where}.{name}", "max_width")
        _within(self.num_hidden_layers, 1, limits.max_layers, f"{where}.num_hidden_layers", "max_layers")
        _heads_divide(self.hidden_size, self.num_attention_heads, where)
        _need(self.cross_attention_frequency >= 1,
              f"{where}.cross_attention_frequency={self.cross_attention_frequency} must be positive")
        _within(self.vocab_size, 1, limits.max_vocab, f"{where}.vocab_size", "max_vocab")
        _within(self.max_position_embeddings, 1, limits.max_positions, f"{where}.max_position_embeddings",
                "max_positions")
        _within(self.pad_token_id, 0, self.vocab_size - 1, f"{where}.pad_token_id")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            _need(0 <= getattr(self, name) < 1, f"{where}.{name}={getattr(self, name)} is not in [0, 1)")
        _need(self.layer_norm_eps > 0, f"{where}.layer_norm_eps={self.layer_norm_eps} must be positive")
        _activation_known(self.hidden_act, f"{where}.hidden_act")

    def to_hf(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), model_type="blip_2_qformer")


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """OPT decoder-only LM (pre-LN, ReLU, learned positions with offset 2)."""
    vocab_size: int = 50272
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    ffn_dim: int = 10240
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 2560
    do_layer_norm_before: bool = True
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    activation_function: str = "relu"
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 50118  # BLIP-2 checkpoints end captions with "\n"
    tie_word_embeddings: bool = True
    dropout: float = 0.1  # residual-branch dropout, active only with deterministic=False
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5  # not a transformers field: torch.nn.LayerNorm's default

    model_type = "opt"
    is_encoder_decoder = False

    @classmethod
    def from_hf(cls, d: dict[str, Any], limits: Limits | None = None, where: str = "text_config") -> "OPTConfig":
        d = _pick(cls, d, where)
        d.setdefault("word_embed_proj_dim", d.get("hidden_size", cls.hidden_size))
        cfg = cls(**d)
        cfg.check(limits or Limits.from_env(), where)
        return cfg

    def check(self, limits: Limits, where: str = "text_config") -> None:
        for name in ("hidden_size", "ffn_dim", "word_embed_proj_dim"):
            _within(getattr(self, name), 1, limits.max_width, f"{where}.{name}", "max_width")
        _within(self.num_hidden_layers, 1, limits.max_layers, f"{where}.num_hidden_layers", "max_layers")
        _heads_divide(self.hidden_size, self.num_attention_heads, where)
        _within(self.vocab_size, 1, limits.max_vocab, f"{where}.vocab_size", "max_vocab")
        _within(self.max_position_embeddings, 1, limits.max_positions, f"{where}.max_position_embeddings",
                "max_positions")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            _within(getattr(self, name), 0, self.vocab_size - 1, f"{where}.{name}")
        _need(0 <= self.dropout < 1, f"{where}.dropout={self.dropout} is not in [0, 1)")
        _activation_known(self.activation_function, f"{where}.activation_function")

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("layer_norm_eps")  # fixed at 1e-5 in transformers' OPT, not a config field there
        return dict(d, model_type="opt")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 / FlanT5 encoder-decoder (RMS norm, relative position buckets, gated GELU for FlanT5)."""
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dropout_rate: float = 0.1
    initializer_factor: float = 1.0
    # transformers 5: real FlanT5 checkpoints are untied (own lm_head, no d_model**-0.5 rescale).
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False

    model_type = "t5"
    is_encoder_decoder = True

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @classmethod
    def from_hf(cls, d: dict[str, Any], limits: Limits | None = None, where: str = "text_config") -> "T5Config":
        picked = _pick(cls, d, where)
        proj = picked.get("feed_forward_proj", "relu")
        act = proj.split("-")[-1]
        picked["is_gated_act"] = proj.startswith("gated-")
        picked["dense_act_fn"] = "gelu_new" if act == "gelu" else act
        picked.setdefault("num_decoder_layers", picked.get("num_layers", cls.num_layers))
        if "scale_decoder_outputs" not in picked:
            picked["scale_decoder_outputs"] = d.get("tie_word_embeddings", True) is not False
        cfg = cls(**picked)
        cfg.check(limits or Limits.from_env(), where)
        return cfg

    def check(self, limits: Limits, where: str = "text_config") -> None:
        for name in ("d_model", "d_kv", "d_ff"):
            _within(getattr(self, name), 1, limits.max_width, f"{where}.{name}", "max_width")
        _within(self.num_heads, 1, limits.max_width // self.d_kv, f"{where}.num_heads", "max_width")
        for name in ("num_layers", "num_decoder_layers"):
            _within(getattr(self, name), 1, limits.max_layers, f"{where}.{name}", "max_layers")
        _within(self.vocab_size, 1, limits.max_vocab, f"{where}.vocab_size", "max_vocab")
        for name in ("relative_attention_num_buckets", "relative_attention_max_distance"):
            _within(getattr(self, name), 1, limits.max_positions, f"{where}.{name}", "max_positions")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            _within(getattr(self, name), 0, self.vocab_size - 1, f"{where}.{name}")
        _need(0 <= self.dropout_rate < 1, f"{where}.dropout_rate={self.dropout_rate} is not in [0, 1)")
        _need(self.layer_norm_epsilon > 0, f"{where}.layer_norm_epsilon={self.layer_norm_epsilon} must be positive")
        _activation_known(self.dense_act_fn, f"{where}.feed_forward_proj")

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("is_gated_act")
        d.pop("dense_act_fn")
        return dict(d, model_type="t5")


TextConfig = Union[OPTConfig, T5Config]


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """The whole model: vision tower, Q-Former, (optional) LLM, and the bridge between them.

    `text` is None for the stage-1 / retrieval model (HF `Blip2ForImageTextRetrieval`).
    """
    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    text: TextConfig | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256  # ITC projection width
    image_token_index: int | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.text is not None and self.text.is_encoder_decoder)

    @classmethod
    def from_hf(cls, d: dict[str, Any], limits: Limits | None = None) -> "Blip2Config":
        """A transformers config.json dict -> Blip2Config, type- and arithmetic-checked against
        `limits` (default: `Limits.from_env()`); a problem is a one-line ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"the configuration must be a JSON object, not {type(d).__name__}")
        limits = limits or Limits.from_env()
        architectures = d.get("architectures") or []
        _need(isinstance(architectures, list) and all(isinstance(a, str) for a in architectures),
              "architectures must be a list of strings")
        text = None
        tc = d.get("text_config")
        # transformers always fills text_config; the retrieval model ignores it.
        if "Blip2ForImageTextRetrieval" in architectures:
            tc = None
        if tc is not None:
            _need(isinstance(tc, dict), "text_config must be a JSON object")
            mt = tc.get("model_type", "opt")
            if mt == "opt":
                text = OPTConfig.from_hf(tc, limits)
            elif mt == "t5":
                text = T5Config.from_hf(tc, limits)
            else:
                raise ValueError(f"unsupported language model type {mt!r:.40} (supported: opt, t5)")
        vision = VisionConfig.from_hf(d.get("vision_config", {}), limits)
        qc = d.get("qformer_config", {})
        _need(isinstance(qc, dict), "qformer_config must be a JSON object")
        qf = QFormerConfig.from_hf(dict(qc, encoder_hidden_size=vision.hidden_size), limits)
        image_token = d.get("image_token_index", d.get("image_token_id"))
        cfg = cls(vision=vision, qformer=qf, text=text,
                  num_query_tokens=_typed(d.get("num_query_tokens", 32), "int", "num_query_tokens"),
                  image_text_hidden_size=_typed(d.get("image_text_hidden_size", 256), "int", "image_text_hidden_size"),
                  image_token_index=_typed(image_token, "int | None", "image_token_index"))
        cfg.check(limits)
        return cfg

    def check(self, limits: Limits) -> None:
        """The bridge's arithmetic (the towers check their own in `from_hf`)."""
        _within(self.num_query_tokens, 1, limits.max_positions, "num_query_tokens", "max_positions")
        _within(self.image_text_hidden_size, 1, limits.max_width, "image_text_hidden_size", "max_width")
        if self.image_token_index is not None:
            _within(self.image_token_index, 0, limits.max_vocab, "image_token_index", "max_vocab")

    def to_hf(self) -> dict[str, Any]:
        d = {
            "model_type": "blip-2",
            "vision_config": self.vision.to_hf(),
            "qformer_config": self.qformer.to_hf(),
            "num_query_tokens": self.num_query_tokens,
            "image_text_hidden_size": self.image_text_hidden_size,
            "image_token_index": self.image_token_index,
        }
        if self.text is not None:
            d["text_config"] = self.text.to_hf()
            d["architectures"] = ["Blip2ForConditionalGeneration"]
        else:
            d["architectures"] = ["Blip2ForImageTextRetrieval"]
        return d


# generation_config.json: the fields the predictor reads, with their JSON types and ranges.
_GENERATION_INTS = {"max_new_tokens": 0, "min_new_tokens": 0, "num_beams": 1, "num_return_sequences": 1,
                    "top_k": 0, "max_length": 0, "min_length": 0, "no_repeat_ngram_size": 0}
_GENERATION_FLOATS = ("length_penalty", "repetition_penalty", "temperature", "top_p")
_TOKEN_FIELDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")


def check_generation_config(d: Any, vocab_size: int | None = None, limits: Limits | None = None) -> dict:
    """A generation_config.json value -> the same dict, every field the predictor reads checked
    (a length within `max_positions`, token ids within the vocabulary); one-line ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"must be a JSON object, not {type(d).__name__}")
    limits = limits or Limits.from_env()
    for name, low in _GENERATION_INTS.items():
        if d.get(name) is not None:
            _within(_typed(d[name], "int", name), low, limits.max_positions, name, "max_positions")
    for name in _GENERATION_FLOATS:
        if d.get(name) is not None:
            _typed(d[name], "float", name)
    for name in ("temperature", "repetition_penalty"):
        _need(d.get(name) is None or d[name] > 0, f"{name}={d.get(name)} must be positive")
    _need(d.get("top_p") is None or 0 < d["top_p"] <= 1, f"top_p={d.get('top_p')} is not in (0, 1]")
    _need(d.get("do_sample") is None or isinstance(d["do_sample"], bool), "do_sample must be true or false")
    _need(d.get("early_stopping") in (None, True, False, "never"), "early_stopping must be true, false or 'never'")
    top = (vocab_size or limits.max_vocab) - 1
    for name in _TOKEN_FIELDS:
        ids = d.get(name)
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            _within(_typed(i, "int", name), 0, top, name)
    return d
