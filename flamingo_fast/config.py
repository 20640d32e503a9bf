"""Model configuration: one typed dataclass per part, one `FlamingoConfig`, and named presets.

Presets:
    tiny                  tests: a forward in well under a second on one CPU core.
    small                 CPU profiling (LLaMA-style LM 512 wide, 8 layers; ViT 256 wide, 4 layers).
    openflamingo-9b-v1    the shapes of OpenFlamingo-9B v1 (LLaMA-7B, CLIP ViT-L/14 at 224 px,
                          cross-attention every 4 layers), for GPU benchmarks with random weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Activation = Literal["gelu", "quick_gelu"]


@dataclass(frozen=True)
class VisionConfig:
    """CLIP-style ViT: patch conv, class token, learned positions, pre-LN, pre-norm blocks, post-LN."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: Activation = "gelu"  # OpenAI CLIP weights (OpenFlamingo's ViT-L/14) use "quick_gelu"
    in_channels: int = 3
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class PerceiverConfig:
    """Perceiver resampler: `num_latents` learned latents attend to each image's patch tokens."""

    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4


@dataclass(frozen=True)
class LMConfig:
    """Decoder-only language model. `family` names the decoder implementation (only "llama" so far)."""

    family: str = "llama"
    vocab_size: int = 32003
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class FlamingoConfig:
    """Everything that fixes a Flamingo model's shapes and semantics.

    Cross-attention blocks sit before decoder layer `idx` when `(idx + 1) % cross_attn_every_n_layers == 0`.
    `only_attend_immediate_media=True`: a token attends to the latents of its own image only; False: to every
    image up to its own. `openflamingo_pre_image_bug=True` reproduces OpenFlamingo's all-previous mode, where
    text before the first image attends uniformly to all images (our default gives it exactly 0).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    cross_attn_every_n_layers: int = 1
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    only_attend_immediate_media: bool = True
    openflamingo_pre_image_bug: bool = False
    # Special tokens, laid out as OpenFlamingo's tokenizer adds them after the base vocabulary.
    bos_token_id: int = 1
    eos_token_id: int = 2
    eoc_token_id: int = 32000  # <|endofchunk|>
    media_token_id: int = 32001  # <image>
    pad_token_id: int = 32002  # <PAD>

    def __post_init__(self) -> None:
        if self.cross_attn_every_n_layers < 1:
            raise ValueError(
                f"cross_attn_every_n_layers={self.cross_attn_every_n_layers}: expected an integer >= 1"
            )
        if self.lm.hidden_size % self.lm.num_heads or self.lm.num_heads % self.lm.num_kv_heads:
            raise ValueError(
                f"lm.hidden_size={self.lm.hidden_size}, num_heads={self.lm.num_heads}, "
                f"num_kv_heads={self.lm.num_kv_heads}: expected hidden divisible by heads, heads by kv heads"
            )
        for name in ("bos_token_id", "eos_token_id", "eoc_token_id", "media_token_id", "pad_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.lm.vocab_size:
                raise ValueError(f"{name}={token}: expected a token id in [0, {self.lm.vocab_size})")

    @property
    def vision_dim(self) -> int:
        """Width of the visual features and of the perceiver latents."""
        return self.vision.width

    @property
    def xattn_layer_indices(self) -> tuple[int, ...]:
        n = self.cross_attn_every_n_layers
        return tuple(i for i in range(self.lm.num_layers) if (i + 1) % n == 0)

    def replace(self, **changes) -> FlamingoConfig:
        return dataclasses.replace(self, **changes)


def _tiny() -> FlamingoConfig:
    base_vocab = 96
    return FlamingoConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=2),
        perceiver=PerceiverConfig(depth=2, heads=2, dim_head=32, num_latents=64, ff_mult=2),
        lm=LMConfig(
            vocab_size=base_vocab + 3, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
            intermediate_size=160, max_position_embeddings=256,
        ),
        cross_attn_every_n_layers=1,
        xattn_heads=2,
        xattn_dim_head=64,
        xattn_ff_mult=2,
        eoc_token_id=base_vocab, media_token_id=base_vocab + 1, pad_token_id=base_vocab + 2,
    )


def _small() -> FlamingoConfig:
    return FlamingoConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=256, layers=4, heads=4),
        perceiver=PerceiverConfig(depth=6, heads=8, dim_head=64, num_latents=64, ff_mult=4),
        lm=LMConfig(
            vocab_size=32003, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
            intermediate_size=2048, max_position_embeddings=4096,
        ),
        cross_attn_every_n_layers=1,
    )


def _openflamingo_9b_v1() -> FlamingoConfig:
    return FlamingoConfig(
        vision=VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, act="quick_gelu"),
        perceiver=PerceiverConfig(depth=6, heads=8, dim_head=64, num_latents=64, ff_mult=4),
        lm=LMConfig(
            vocab_size=32003, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
            intermediate_size=11008, max_position_embeddings=2048,
        ),
        cross_attn_every_n_layers=4,
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "openflamingo-9b-v1": _openflamingo_9b_v1,
}


def from_name(name: str, **overrides) -> FlamingoConfig:
    """A preset by name, with top-level fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: unknown; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
