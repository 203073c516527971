"""Model configurations: frozen dataclasses that read and write transformers' config.json fields.

Field names follow transformers (`Blip2VisionConfig`, `Blip2QFormerConfig`, `OPTConfig`,
`T5Config`) so that `from_hf(config_dict)` / `to_hf()` are plain renames. Dataclasses are
hashable, so a config can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}


def _size(x) -> int:
    """transformers allows `image_size`/`patch_size` as int or [h, w]; we support square only."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ValueError(f"non-square size {list(x)} is not supported")
        return int(x[0])
    return int(x)


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
    def from_hf(cls, d: dict[str, Any]) -> "VisionConfig":
        d = dict(d)
        d["image_size"], d["patch_size"] = _size(d.get("image_size", 224)), _size(d.get("patch_size", 14))
        cfg = cls(**_pick(cls, d))
        return dataclasses.replace(cfg, post_layernorm_eps=cfg.layer_norm_eps)

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
    def from_hf(cls, d: dict[str, Any]) -> "QFormerConfig":
        return cls(**_pick(cls, d))

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
    def from_hf(cls, d: dict[str, Any]) -> "OPTConfig":
        d = dict(d)
        d.setdefault("word_embed_proj_dim", d.get("hidden_size", cls.hidden_size))
        return cls(**_pick(cls, d))

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
    def from_hf(cls, d: dict[str, Any]) -> "T5Config":
        d = dict(d)
        proj = d.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.split("-")[-1]
        d["is_gated_act"] = gated
        d["dense_act_fn"] = "gelu_new" if act == "gelu" else act
        d.setdefault("num_decoder_layers", d.get("num_layers", cls.num_layers))
        if "scale_decoder_outputs" not in d:
            d["scale_decoder_outputs"] = d.get("tie_word_embeddings", True) is not False
        return cls(**_pick(cls, d))

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
    def from_hf(cls, d: dict[str, Any]) -> "Blip2Config":
        text = None
        tc = d.get("text_config")
        # transformers always fills text_config; the retrieval model ignores it.
        if "Blip2ForImageTextRetrieval" in d.get("architectures", ()):
            tc = None
        if tc is not None:
            mt = tc.get("model_type", "opt")
            if mt == "opt":
                text = OPTConfig.from_hf(tc)
            elif mt == "t5":
                text = T5Config.from_hf(tc)
            else:
                raise ValueError(f"unsupported language model type {mt!r} (supported: opt, t5)")
        vision = VisionConfig.from_hf(d.get("vision_config", {}))
        qf = QFormerConfig.from_hf(dict(d.get("qformer_config", {}), encoder_hidden_size=vision.hidden_size))
        return cls(vision=vision, qformer=qf, text=text,
                   num_query_tokens=int(d.get("num_query_tokens", 32)),
                   image_text_hidden_size=int(d.get("image_text_hidden_size", 256)),
                   image_token_index=d.get("image_token_index", d.get("image_token_id")))

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
