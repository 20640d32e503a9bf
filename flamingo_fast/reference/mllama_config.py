"""The Llama 3.2 Vision (Hugging Face `MllamaForConditionalGeneration`) layout's configuration: typed, frozen, read
from a transformers `MllamaConfig.to_dict()` as 4.57 and 5.x write it, or built from a named preset.

Presets (`MLLAMA_PRESETS`, `mllama_from_name`):
    mllama-tiny    tests: 28 px tiles of 14 px patches (4 patches + the class token, padded to 8), a 64-wide LM.
    mllama-small   CPU profiling: 84 px tiles (36 patches + class = 37, padded to 40 tokens a tile), a ViT 128 wide
                   (6 local + 2 global layers), an LM 512 wide with 10 layers, cross-attention at 3 and 8.
    mllama-11b     the shapes of Llama 3.2 11B Vision (Llama 3.1 8B + 8 cross-attention layers, 560 px tiles).
    mllama-90b     Llama 3.2 90B Vision (Llama 3.1 70B + 20 cross-attention layers, the same vision tower).
The two released shapes are read from the public config.json files of meta-llama/Llama-3.2-11B-Vision(-Instruct)
and 90B; the weights are random (GPU benchmarks, meta-device byte counts: mllama_sizes.py).

`intermediate_from` says which hidden state of local-encoder layer i is the "intermediate layer" i concatenated
with the vision tower's output: the layer's OUTPUT in transformers 4.57 and 5.x (their encoder records each layer's
output), its INPUT in Meta's llama-models code and in transformers before its output-recording refactor (mid 2025,
4.5x). The reference follows the installed transformers (mllama.installed_intermediate_from).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..checks import check_int

INTERMEDIATE_FROM = ("layer_output", "layer_input")
# transformers' default when a config lists none: every tiling of at most 4 tiles, ids 1.. in this order (0: pad)
DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
# Llama's embedding has this many rows more than the head (the image token's row among them).
EXTRA_EMBEDDINGS = 8


@dataclass(frozen=True)
class Llama3RopeScaling:
    """`rope_type: llama3`: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MllamaVisionConfig:
    """The tiled ViT: each image is up to `max_num_tiles` tiles of image_size^2 px; a tile is (image_size /
    patch_size)^2 patches + a class token, padded to a multiple of 8 tokens inside the encoders."""

    image_size: int = 560
    patch_size: int = 14
    max_num_tiles: int = 4
    hidden_size: int = 1280
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    intermediate_size: int = 5120
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS
    norm_eps: float = 1e-5
    num_channels: int = 3
    intermediate_from: str = "layer_output"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "max_num_tiles", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "num_channels"):
            check_int(f"vision.{name}", getattr(self, name), 1)
        check_int("vision.num_global_layers", self.num_global_layers, 0)
        if self.image_size % self.patch_size or self.hidden_size % self.num_heads:
            raise ValueError(f"vision: image_size={self.image_size}, patch_size={self.patch_size}, hidden_size="
                             f"{self.hidden_size}, num_heads={self.num_heads}: expected whole patches and heads")
        if not self.intermediate_layers or any(not 0 <= i < self.num_layers for i in self.intermediate_layers):
            raise ValueError(f"vision.intermediate_layers={self.intermediate_layers}: expected one or more indices "
                             f"of the {self.num_layers} local layers")
        if self.intermediate_from not in INTERMEDIATE_FROM:
            raise ValueError(f"vision.intermediate_from={self.intermediate_from!r}: expected one of "
                             f"{list(INTERMEDIATE_FROM)}")
        if any(h * w > self.max_num_tiles for h, w in self.supported_aspect_ratios):
            raise ValueError(f"vision.supported_aspect_ratios={self.supported_aspect_ratios}: a tiling has more than "
                             f"max_num_tiles={self.max_num_tiles} tiles")

    @property
    def num_patches(self) -> int:
        """Tokens of one tile: the patches and the class token (1601 at 560 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """A tile's tokens inside the encoders, padded to a multiple of 8 (1608 at 560 px)."""
        return -(-self.num_patches // 8) * 8

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @property
    def vision_output_dim(self) -> int:
        """The tower's output width: the global encoder's output and every intermediate layer, concatenated."""
        return self.hidden_size * (1 + len(self.intermediate_layers))

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens one image slot gives the cross-attention (padded tiles included): 6404 at 560 px."""
        return self.max_num_tiles * self.num_patches


@dataclass(frozen=True)
class MllamaTextConfig:
    """Llama 3.1 with cross-attention layers at `cross_attention_layers` (instead of self-attention there)."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    rope_theta: float = 500000.0
    rope_scaling: Llama3RopeScaling | None = field(default_factory=Llama3RopeScaling)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            check_int(f"text.{name}", getattr(self, name), 1)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"text: hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads="
                             f"{self.num_kv_heads}: expected hidden divisible by heads, heads by kv heads")
        layers = self.cross_attention_layers
        if any(not 0 <= i < self.num_layers for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"text.cross_attention_layers={layers}: expected distinct indices of the "
                             f"{self.num_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + EXTRA_EMBEDDINGS


@dataclass(frozen=True)
class MllamaConfig:
    vision: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    text: MllamaTextConfig = field(default_factory=MllamaTextConfig)
    image_token_id: int = 128256  # <|image|>: outside the head's vocabulary, inside the embedding's 8 extra rows
    bos_token_id: int = 128000
    eos_token_id: int = 128001
    pad_token_id: int = 128004

    def __post_init__(self) -> None:
        if not 0 <= self.image_token_id < self.text.embedding_rows:
            raise ValueError(f"image_token_id={self.image_token_id}: expected a row of the embedding "
                             f"[0, {self.text.embedding_rows})")

    def replace(self, **changes) -> MllamaConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------
# From transformers' MllamaConfig.to_dict() (4.57 and 5.x spellings)
# ----------------------------------------------------------------------------------------------------------


def _rope_settings(text: Mapping) -> tuple[float, Llama3RopeScaling | None]:
    """rope_theta and the scaling: 5.x keeps both in `rope_parameters`, 4.x `rope_theta` and `rope_scaling` at the
    text config's top level. Only the default rotary and llama3 scaling are supported."""
    params = text.get("rope_parameters") or {}
    scaling = params if params else (text.get("rope_scaling") or {})
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ValueError("text_config: no rope_theta (in rope_parameters or at the top level); expected one")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"text_config rope_type={kind!r}: not supported by flamingo_fast; expected 'llama3' or "
                         f"'default'")
    return float(theta), Llama3RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _first(value):
    """eos may be a list (the instruct models list three); the first is the config's own."""
    return value[0] if isinstance(value, (list, tuple)) else value


def mllama_config_from_hf(hf: Mapping, intermediate_from: str = "layer_output") -> MllamaConfig:
    """A transformers MllamaConfig as a dict (`model.config.to_dict()`, 4.57 or 5.x) -> MllamaConfig. Activations
    other than the released ones (GELU in the ViT, SiLU in the LM) are an error that names them."""
    vc, tc = hf["vision_config"], hf["text_config"]
    if vc.get("hidden_act", "gelu") != "gelu" or tc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"vision_config.hidden_act={vc.get('hidden_act')!r}, text_config.hidden_act="
                         f"{tc.get('hidden_act')!r}: expected 'gelu' and 'silu' (every released Llama 3.2 Vision)")
    image_size, patch_size = vc["image_size"], vc["patch_size"]
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(f"vision_config image_size={image_size!r}, patch_size={patch_size!r}: expected square "
                         f"sizes (integers)")
    vision = MllamaVisionConfig(
        image_size=image_size, patch_size=patch_size, max_num_tiles=vc["max_num_tiles"],
        hidden_size=vc["hidden_size"], num_layers=vc["num_hidden_layers"], num_global_layers=vc["num_global_layers"],
        num_heads=vc.get("attention_heads", vc.get("num_attention_heads")), intermediate_size=vc["intermediate_size"],
        intermediate_layers=tuple(vc["intermediate_layers_indices"]),
        supported_aspect_ratios=tuple(tuple(r) for r in vc["supported_aspect_ratios"]), norm_eps=vc["norm_eps"],
        num_channels=vc.get("num_channels", 3), intermediate_from=intermediate_from)
    if vc.get("vision_output_dim", vision.vision_output_dim) != vision.vision_output_dim:
        raise ValueError(f"vision_config.vision_output_dim={vc['vision_output_dim']}: expected hidden_size x (1 + "
                         f"{len(vision.intermediate_layers)} intermediate layers) = {vision.vision_output_dim}")
    theta, scaling = _rope_settings(tc)
    text = MllamaTextConfig(
        vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], num_layers=tc["num_hidden_layers"],
        num_heads=tc["num_attention_heads"], num_kv_heads=tc["num_key_value_heads"],
        intermediate_size=tc["intermediate_size"], cross_attention_layers=tuple(tc["cross_attention_layers"]),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=tc["rms_norm_eps"],
        max_position_embeddings=tc["max_position_embeddings"])
    image = hf.get("image_token_index", hf.get("image_token_id"))
    pad = tc.get("pad_token_id")
    return MllamaConfig(vision=vision, text=text, image_token_id=image, bos_token_id=tc.get("bos_token_id"),
                        eos_token_id=_first(tc.get("eos_token_id")),
                        pad_token_id=pad if pad is not None else tc.get("bos_token_id"))


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------


def _tiny() -> MllamaConfig:
    vision = MllamaVisionConfig(image_size=28, patch_size=14, max_num_tiles=4, hidden_size=32, num_layers=3,
                                num_global_layers=1, num_heads=2, intermediate_size=64, intermediate_layers=(0, 2))
    text = MllamaTextConfig(vocab_size=128, hidden_size=64, num_layers=5, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, cross_attention_layers=(1, 3), rope_theta=10000.0,
                            rope_scaling=Llama3RopeScaling(factor=8.0, original_max_position_embeddings=64),
                            max_position_embeddings=512)
    return MllamaConfig(vision=vision, text=text, image_token_id=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _small() -> MllamaConfig:
    vision = MllamaVisionConfig(image_size=84, patch_size=14, max_num_tiles=4, hidden_size=128, num_layers=6,
                                num_global_layers=2, num_heads=4, intermediate_size=512, intermediate_layers=(1, 3, 5))
    text = MllamaTextConfig(vocab_size=32000, hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=2,
                            intermediate_size=1024, cross_attention_layers=(3, 8), max_position_embeddings=4096)
    return MllamaConfig(vision=vision, text=text, image_token_id=32000, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)


def _released(text: MllamaTextConfig) -> MllamaConfig:
    """Llama 3.2 Vision's vision tower (the MllamaVisionConfig defaults at 560 px), the Llama 3 tokenizer's ids:
    <|begin_of_text|> 128000, <|end_of_text|> 128001, <|finetune_right_pad_id|> 128004, <|image|> 128256."""
    return MllamaConfig(vision=MllamaVisionConfig(), text=text)


def _11b() -> MllamaConfig:
    return _released(MllamaTextConfig())  # Llama 3.1 8B: 4096 wide, 32 + 8 layers, 32 heads, 8 KV heads


def _90b() -> MllamaConfig:
    # Llama 3.1 70B: 8192 wide, 80 + 20 layers (every fifth from 3), 64 heads, 8 KV heads, 28672
    return _released(MllamaTextConfig(hidden_size=8192, num_layers=100, num_heads=64, num_kv_heads=8,
                                      intermediate_size=28672, cross_attention_layers=tuple(range(3, 100, 5))))


MLLAMA_PRESETS = {"mllama-tiny": _tiny, "mllama-small": _small, "mllama-11b": _11b, "mllama-90b": _90b}


def mllama_from_name(name: str) -> MllamaConfig:
    if name not in MLLAMA_PRESETS:
        raise ValueError(f"preset={name!r}: unknown; expected one of {sorted(MLLAMA_PRESETS)}")
    return MLLAMA_PRESETS[name]()

