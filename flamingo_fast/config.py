"""Model configuration: one typed dataclass per part, one `FlamingoConfig`, and named presets.

Presets:
    tiny                  tests: a forward in well under a second on one CPU core.
    small                 CPU profiling (LLaMA-style LM 512 wide, 8 layers; ViT 256 wide, 4 layers).
    openflamingo-9b-v1    the shapes of OpenFlamingo-9B v1 (LLaMA-7B, CLIP ViT-L/14 at 224 px,
                          cross-attention every 4 layers), for GPU benchmarks with random weights.
    openflamingo-3b       OpenFlamingo-3B (MPT-1B RedPajama: ALiBi, QK LayerNorm, no biases; ViT-L/14; every layer).
    openflamingo-4b       OpenFlamingo-4B (RedPajama-INCITE-Base-3B, GPT-NeoX; ViT-L/14; every 2 layers).
    openflamingo-9b-v2    OpenFlamingo-9B v2 (MPT-7B: ALiBi, no biases; ViT-L/14; every 4 layers).
    idefics-tiny          tests: the IDEFICS v1 layout at tiny shapes (qk norms, per-channel gates, 5 latents).
    idefics-small         CPU profiling of the IDEFICS layout (the `small` LM; ViT 256 wide, 4 layers).
    idefics-9b            the shapes of Hugging Face's IDEFICS-9B (LLaMA-7B, CLIP ViT-H/14, every 4 layers).
    idefics-80b           IDEFICS-80B (LLaMA-65B, ViT-H/14, every 4 layers, q/k norms in the gated blocks).

The OpenFlamingo presets use the tokenizer OpenFlamingo builds: the LM's (GPT-NeoX-20B's for MPT and
RedPajama, 50277 tokens) plus `<|endofchunk|>`, `<image>` and `<PAD>`, and the embeddings resized to that
length (50280), as its factory does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .checks import check_int

Activation = Literal["gelu", "quick_gelu"]
LM_FAMILIES = ("llama", "mpt", "gpt_neox")
# The model family's layout: OpenFlamingo's (open_clip ViT, OpenFlamingo's perceiver and gated blocks, the image
# a token sees from `<image>` tokens) or Hugging Face IDEFICS v1's (docs/semantics.md).
LAYOUTS = ("openflamingo", "idefics")


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
    qk_norm: bool = False  # IDEFICS: a LayerNorm over each head's q and k (qk_layer_norms_perceiver)


@dataclass(frozen=True)
class LMConfig:
    """Decoder-only language model. `family` names the decoder implementation (LM_FAMILIES):

    llama     pre-RMSNorm, rotary (all head dims), SwiGLU MLP, no biases, grouped KV heads allowed.
    mpt       pre-LayerNorm (biases iff `bias`), fused Wqkv, optional `qk_ln` (LayerNorm of q and k over the
              full width, MPT-1B) and `clip_qkv`, GELU MLP (intermediate_size = expansion ratio x hidden),
              ALiBi (`alibi=True`, slopes from `alibi_bias_max`); output head tied to the embedding.
    gpt_neox  pre-LayerNorm with biases, fused query_key_value laid out per head as [q | k | v], rotary on the
              first `rotary_pct` of each head's dims, GELU MLP, biases everywhere, `parallel_residual`
              (x + attn(ln1(x)) + mlp(ln2(x))) or sequential.
    """

    family: str = "llama"
    vocab_size: int = 32003
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 2048
    rms_norm_eps: float = 1e-6  # llama's RMSNorm
    layer_norm_eps: float = 1e-5  # mpt's and gpt_neox's LayerNorms
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bias: bool = False  # mpt: biases in linears and LayerNorms (MPT checkpoints set no_bias=True)
    qk_ln: bool = False  # mpt: LayerNorm of q and k
    clip_qkv: float | None = None  # mpt: clamp the fused qkv projection to [-clip_qkv, clip_qkv]
    alibi: bool = False  # mpt: ALiBi position bias instead of rotary
    alibi_bias_max: float = 8.0
    rotary_pct: float = 1.0  # gpt_neox: fraction of each head's dims that is rotated
    parallel_residual: bool = False  # gpt_neox
    # IDEFICS: the last `additional_vocab_size` of the vocab_size rows live in second tables (Hugging Face's
    # decoupled embedding and output head: `additional_embedding`, `additional_fc`).
    additional_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.family not in LM_FAMILIES:
            raise ValueError(f"lm.family={self.family!r}: unsupported; expected one of {list(LM_FAMILIES)}")
        if self.family == "mpt" and not self.alibi:
            raise ValueError("lm.alibi=False with family='mpt': only ALiBi MPT models are supported (no rotary MPT)")
        if self.family != "mpt" and (self.alibi or self.qk_ln or self.clip_qkv is not None):
            raise ValueError(f"lm.family={self.family!r}: alibi, qk_ln and clip_qkv are MPT options")
        if self.family != "llama" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"lm.num_kv_heads={self.num_kv_heads}: family {self.family!r} has no grouped KV heads; "
                             f"expected num_heads={self.num_heads}")
        if not 0 < self.rotary_pct <= 1 or (self.family != "gpt_neox" and self.rotary_pct != 1.0):
            raise ValueError(f"lm.rotary_pct={self.rotary_pct}: expected (0, 1], and 1.0 unless family='gpt_neox'")
        added = self.additional_vocab_size
        if not 0 <= added < self.vocab_size or (added and self.family != "llama"):
            raise ValueError(f"lm.additional_vocab_size={self.additional_vocab_size}: expected 0 <= it < vocab_size="
                             f"{self.vocab_size}, and 0 unless family='llama' (IDEFICS)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary embedding rotates (0 for ALiBi models)."""
        return 0 if self.alibi else int(self.head_dim * self.rotary_pct)

    @property
    def norm(self) -> str:
        """The decoder's normalisation: "rmsnorm" (llama) or "layernorm"."""
        return "rmsnorm" if self.family == "llama" else "layernorm"

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_eps if self.family == "llama" else self.layer_norm_eps


@dataclass(frozen=True)
class FlamingoConfig:
    """Everything that fixes a Flamingo model's shapes and semantics.

    Cross-attention blocks sit before decoder layer `idx` when `(idx + 1) % cross_attn_every_n_layers == 0`.
    `only_attend_immediate_media=True`: a token attends to the latents of its own image only; False: to every
    image up to its own. `openflamingo_pre_image_bug=True` reproduces OpenFlamingo's all-previous mode, where
    text before the first image attends uniformly to all images (our default gives it exactly 0).
    `openflamingo_generated_image_bug=True` reproduces what OpenFlamingo's cached generate does once the model
    generates `<image>` (greedy, sampling and beams; immediate mode only): from the next step on, every
    hypothesis whose token was `<image>` attends to the FIRST image of its row (of vision_x, shown or not) and
    every other hypothesis of the batch, other rows included, to none, until the next generated `<image>`; with
    beams the state belongs to the batch slot, not to the beam (masking.image_after_reorder). That is
    OpenFlamingo's behaviour, not ours. Our default: every generated token attends to the last image of its
    row's prompt.

    layout="idefics" (Hugging Face IDEFICS v1): blocks sit before layer `idx` when `idx % n == 0`; the images a
    token sees come from the processor's `image_attention_mask`, and generated tokens see what the last prompt
    token sees; the vision tower keeps every token (class token included, no final LayerNorm); the perceiver
    has separate q/k/v projections, optional q/k LayerNorms (`perceiver.qk_norm`) and a ReLU MLP; a gated block
    is RMSNorm -> cross-attention (the LM's heads; per-head q/k RMSNorms with `xattn_qk_norm`) -> tanh gate ->
    RMSNorm -> SwiGLU -> tanh gate, the gates per channel with `xattn_gate_per_channel`. Only immediate media;
    `eoc_token_id` may be None (IDEFICS has no `<|endofchunk|>`).
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
    openflamingo_generated_image_bug: bool = False
    layout: str = "openflamingo"
    xattn_qk_norm: bool = False  # idefics: RMSNorm over each head's q and k in the gated blocks
    xattn_gate_per_channel: bool = False  # idefics: alpha_type "vector" (one gate per channel) instead of "float"
    # Special tokens, laid out as OpenFlamingo's tokenizer adds them after the base vocabulary.
    bos_token_id: int = 1
    eos_token_id: int = 2
    eoc_token_id: int | None = 32000  # <|endofchunk|>
    media_token_id: int = 32001  # <image>
    pad_token_id: int = 32002  # <PAD>

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}: expected one of {list(LAYOUTS)}")
        if self.layout == "idefics":
            self._check_idefics()
        elif self.xattn_qk_norm or self.xattn_gate_per_channel or self.perceiver.qk_norm or self.eoc_token_id is None:
            raise ValueError("xattn_qk_norm, xattn_gate_per_channel, perceiver.qk_norm and eoc_token_id=None are "
                             "IDEFICS options; expected layout='idefics'")
        check_int("cross_attn_every_n_layers", self.cross_attn_every_n_layers, 1)
        if self.lm.hidden_size % self.lm.num_heads or self.lm.num_heads % self.lm.num_kv_heads:
            raise ValueError(
                f"lm.hidden_size={self.lm.hidden_size}, num_heads={self.lm.num_heads}, "
                f"num_kv_heads={self.lm.num_kv_heads}: expected hidden divisible by heads, heads by kv heads"
            )
        if self.openflamingo_generated_image_bug and not self.only_attend_immediate_media:
            raise ValueError("openflamingo_generated_image_bug=True: supported with only_attend_immediate_media=True "
                             "(every released OpenFlamingo model); expected False in the all-previous mode")
        for name in ("bos_token_id", "eos_token_id", "eoc_token_id", "media_token_id", "pad_token_id"):
            token = getattr(self, name)
            if token is None and name == "eoc_token_id":
                continue
            if not 0 <= token < self.lm.vocab_size:
                raise ValueError(f"{name}={token}: expected a token id in [0, {self.lm.vocab_size})")
        # <image> and <|endofchunk|> must be tokens of their own: an <|endofchunk|> equal to <image> would be
        # taken for an image, a pad equal to <image> would add images. bos == eos and pad == eos are common.
        distinct = {"media_token_id": ("bos_token_id", "eos_token_id", "eoc_token_id", "pad_token_id"),
                    "eoc_token_id": ("bos_token_id", "eos_token_id", "pad_token_id")}
        for name, others in distinct.items():
            for other in others:
                if getattr(self, name) is not None and getattr(self, name) == getattr(self, other):
                    raise ValueError(f"{name}={getattr(self, name)}: equal to {other}; expected <image> and "
                                     f"<|endofchunk|> to have ids of their own, distinct from bos, eos and pad")

    def _check_idefics(self) -> None:
        lm = self.lm
        n = self.cross_attn_every_n_layers
        if lm.family != "llama" or lm.num_kv_heads != lm.num_heads:
            raise ValueError(f"layout='idefics' with lm.family={lm.family!r}, num_kv_heads={lm.num_kv_heads}: IDEFICS "
                             f"v1's LM is LLaMA without grouped KV heads; expected family='llama', num_kv_heads="
                             f"num_heads={lm.num_heads}")
        if n < 1 or lm.num_layers % n:
            raise ValueError(f"cross_attn_every_n_layers={n}: expected an interval that divides the "
                             f"{lm.num_layers} layers (IDEFICS's cross_layer_interval)")
        if (self.xattn_heads, self.xattn_dim_head) != (lm.num_heads, lm.head_dim):
            raise ValueError(f"xattn_heads={self.xattn_heads}, xattn_dim_head={self.xattn_dim_head}: IDEFICS's gated "
                             f"blocks use the LM's heads; expected {lm.num_heads} heads of {lm.head_dim}")
        if not self.only_attend_immediate_media or self.openflamingo_pre_image_bug \
                or self.openflamingo_generated_image_bug:
            raise ValueError("layout='idefics': the image_attention_mask decides what a token sees; expected "
                             "only_attend_immediate_media=True and no openflamingo_*_bug flags")

    @property
    def vision_dim(self) -> int:
        """Width of the visual features and of the perceiver latents."""
        return self.vision.width

    @property
    def vision_tokens(self) -> int:
        """Tokens per image the perceiver reads: the patches (IDEFICS also keeps the class token)."""
        return self.vision.num_patches + (self.layout == "idefics")

    @property
    def xattn_layer_indices(self) -> tuple[int, ...]:
        """The decoder layers a gated block precedes: OpenFlamingo's every n-th ((idx + 1) % n == 0) or
        IDEFICS's (idx % n == 0, the first layer included)."""
        n = self.cross_attn_every_n_layers
        offset = 0 if self.layout == "idefics" else 1
        return tuple(i for i in range(self.lm.num_layers) if (i + offset) % n == 0)

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


# CLIP ViT-L/14 at 224 px with OpenAI's weights (QuickGELU), the vision tower of every OpenFlamingo release.
_VIT_L_14 = VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, act="quick_gelu")
# GPT-NeoX-20B's tokenizer (MPT and RedPajama use it): 50277 tokens, <|endoftext|> (0) is bos and eos; then
# OpenFlamingo's <|endofchunk|>, <image>, <PAD>.
_NEOX_TOKENS = dict(bos_token_id=0, eos_token_id=0, eoc_token_id=50277, media_token_id=50278, pad_token_id=50279)


def _openflamingo_3b() -> FlamingoConfig:
    # mosaicml/mpt-1b-redpajama-200b (MosaicGPT): d_model 2048, 24 layers, 16 heads, mlp_ratio 4, ALiBi,
    # attn_qk_ln, no_bias, max_seq_len 2048.
    return FlamingoConfig(
        vision=_VIT_L_14,
        lm=LMConfig(family="mpt", vocab_size=50280, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                    intermediate_size=8192, max_position_embeddings=2048, tie_word_embeddings=True,
                    alibi=True, qk_ln=True),
        cross_attn_every_n_layers=1, **_NEOX_TOKENS,
    )


def _openflamingo_4b() -> FlamingoConfig:
    # togethercomputer/RedPajama-INCITE-Base-3B-v1 (GPTNeoXForCausalLM): hidden 2560, 32 layers, 32 heads,
    # intermediate 10240, rotary_pct 1.0, use_parallel_residual false, untied embed_out.
    return FlamingoConfig(
        vision=_VIT_L_14,
        lm=LMConfig(family="gpt_neox", vocab_size=50280, hidden_size=2560, num_layers=32, num_heads=32,
                    num_kv_heads=32, intermediate_size=10240, max_position_embeddings=2048, rotary_pct=1.0,
                    parallel_residual=False),
        cross_attn_every_n_layers=2, **_NEOX_TOKENS,
    )


def _openflamingo_9b_v2() -> FlamingoConfig:
    # mosaicml/mpt-7b: d_model 4096, 32 layers, 32 heads, expansion_ratio 4, ALiBi, no_bias, no qk_ln / clip_qkv.
    return FlamingoConfig(
        vision=_VIT_L_14,
        lm=LMConfig(family="mpt", vocab_size=50280, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                    intermediate_size=16384, max_position_embeddings=2048, tie_word_embeddings=True, alibi=True),
        cross_attn_every_n_layers=4, **_NEOX_TOKENS,
    )


def _idefics(lm: LMConfig, vision: VisionConfig, perceiver: PerceiverConfig, every: int = 4,
             **options) -> FlamingoConfig:
    """IDEFICS's token layout: LLaMA's 32000 tokens (<unk> 0, <s> 1, </s> 2) plus the two added rows of the
    decoupled tables, `<fake_token_around_image>` 32000 and `<image>` 32001; padding is <unk>."""
    base = lm.vocab_size - lm.additional_vocab_size
    return FlamingoConfig(
        vision=vision, perceiver=perceiver, lm=lm, cross_attn_every_n_layers=every, layout="idefics",
        xattn_heads=lm.num_heads, xattn_dim_head=lm.head_dim, bos_token_id=1, eos_token_id=2, eoc_token_id=None,
        media_token_id=base + 1, pad_token_id=0, **options,
    )


def _idefics_tiny() -> FlamingoConfig:
    return _idefics(
        LMConfig(vocab_size=98, additional_vocab_size=2, hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=2,
                 intermediate_size=160, max_position_embeddings=256),
        VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=2),
        PerceiverConfig(depth=2, heads=2, dim_head=24, num_latents=5, ff_mult=4, qk_norm=True),
        every=2, xattn_qk_norm=True, xattn_gate_per_channel=True,
    )


def _idefics_small() -> FlamingoConfig:
    return _idefics(
        LMConfig(vocab_size=32002, additional_vocab_size=2, hidden_size=512, num_layers=8, num_heads=8,
                 num_kv_heads=8, intermediate_size=2048, max_position_embeddings=4096),
        VisionConfig(image_size=224, patch_size=16, width=256, layers=4, heads=4),
        PerceiverConfig(depth=6, heads=4, dim_head=96, num_latents=64, ff_mult=4),
        every=4,
    )


# CLIP ViT-H/14 at 224 px (laion2b), IDEFICS's vision tower: exact GELU.
_VIT_H_14 = VisionConfig(image_size=224, patch_size=14, width=1280, layers=32, heads=16, act="gelu")
_IDEFICS_PERCEIVER = PerceiverConfig(depth=6, heads=16, dim_head=96, num_latents=64, ff_mult=4)


def _idefics_9b() -> FlamingoConfig:
    # HuggingFaceM4/idefics-9b: LLaMA-7B (4096 wide, 32 layers, 32 heads, 11008), cross_layer_interval 4,
    # alpha_type "float", no q/k norms.
    return _idefics(
        LMConfig(vocab_size=32002, additional_vocab_size=2, hidden_size=4096, num_layers=32, num_heads=32,
                 num_kv_heads=32, intermediate_size=11008, rms_norm_eps=1e-6, max_position_embeddings=2048),
        _VIT_H_14, _IDEFICS_PERCEIVER,
    )


def _idefics_80b() -> FlamingoConfig:
    # HuggingFaceM4/idefics-80b: LLaMA-65B (8192 wide, 80 layers, 64 heads, 22016), q/k norms in the gated blocks.
    return _idefics(
        LMConfig(vocab_size=32002, additional_vocab_size=2, hidden_size=8192, num_layers=80, num_heads=64,
                 num_kv_heads=64, intermediate_size=22016, rms_norm_eps=1e-5, max_position_embeddings=2048),
        _VIT_H_14, _IDEFICS_PERCEIVER, xattn_qk_norm=True,
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "openflamingo-9b-v1": _openflamingo_9b_v1,
    "openflamingo-3b": _openflamingo_3b,
    "openflamingo-4b": _openflamingo_4b,
    "openflamingo-9b-v2": _openflamingo_9b_v2,
    "idefics-tiny": _idefics_tiny,
    "idefics-small": _idefics_small,
    "idefics-9b": _idefics_9b,
    "idefics-80b": _idefics_80b,
}


def from_name(name: str, **overrides) -> FlamingoConfig:
    """A preset by name, with top-level fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: unknown; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
