"""Tiny random OpenFlamingo models, put together from the real open_flamingo package as its factory does (an
open_clip ViT, a Hugging Face LM built from its config, FlamingoLMMixin, Flamingo; no downloads), with nonzero
gates, and left-padded prompt batches for them. Shared by test_openflamingo.py, test_openflamingo_eval.py and
torchrun_eval.py. Importing it needs open_flamingo, open_clip and transformers (.venv-openflamingo,
.venv-transformers5): the test files skip before they import it where those are missing."""

from __future__ import annotations

import types

import torch
import transformers
from helpers import random_prompt
from open_clip.transformer import QuickGELU, VisionTransformer
from open_flamingo.src.flamingo import Flamingo as OpenFlamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance

from flamingo_fast.compat import OptionalMaskMixin

BASE_VOCAB, EOC, MEDIA, PAD = 96, 96, 97, 98
VOCAB = BASE_VOCAB + 3
LAYERS_ATTR = {"llama": "model.layers", "mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers",
               "gpt_neox_sequential": "gpt_neox.layers"}


def hf_lm(family: str, vocab: int = VOCAB):
    """A tiny Hugging Face causal LM of `family`, from its config (no download)."""
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=PAD if vocab > PAD else None)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, **common)
        return transformers.LlamaForCausalLM(config)
    if family == "mpt":
        # transformers' MPT hard-codes a 4x MLP (MPT-7B's expansion_ratio), whatever the config says
        config = transformers.MptConfig(d_model=64, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=256,
                                        attn_config={"alibi": True, "alibi_bias_max": 8}, **common)
        return transformers.MptForCausalLM(config)
    parallel = family == "gpt_neox"
    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                        num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=parallel,
                                        max_position_embeddings=256, tie_word_embeddings=False, **common)
    return transformers.GPTNeoXForCausalLM(config)


def open_clip_vit() -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=2, mlp_ratio=4.0,
                             output_dim=16, act_layer=QuickGELU, output_tokens=True)


def build_openflamingo(family: str, every: int, seed: int, lm=None) -> OpenFlamingo:
    """OpenFlamingo's Flamingo put together as its factory does (minus the downloads), gates nonzero."""
    torch.manual_seed(seed)
    lm = hf_lm(family) if lm is None else lm
    extend_instance(lm, FlamingoLMMixin)
    extend_instance(lm, OptionalMaskMixin)
    lm.set_decoder_layers_attr_name(LAYERS_ATTR[family])
    model = OpenFlamingo(types.SimpleNamespace(visual=open_clip_vit()), lm, EOC, MEDIA, vis_dim=48,
                         cross_attn_every_n_layers=every)
    with torch.no_grad():
        for block in lm.gated_cross_attn_layers:
            if block is not None:  # OpenFlamingo starts the gates at 0, which hides a broken branch
                for gate in (block.attn_gate, block.ff_gate):
                    gate.copy_((torch.rand(1) + 0.3) * (1 if torch.rand(1) < 0.5 else -1))
                for p in block.parameters():  # the rest: small random values instead of PyTorch's default init
                    if p.dim() > 1:
                        p.normal_(0, 0.05)
        for p in model.perceiver.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model.eval()


def batch(rows, num_images: int):
    """rows [(image positions, length)], left-padded; text ids below the special tokens."""
    config = types.SimpleNamespace(eoc_token_id=EOC, media_token_id=MEDIA, pad_token_id=PAD)
    longest = max(n for _, n in rows)
    built = [random_prompt(config, pos, n, pad_left=longest - n) for pos, n in rows]
    vision = torch.randn(len(rows), num_images, 1, 3, 32, 32)
    return vision, torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])


def quantized_linears(of_model) -> list[torch.nn.Linear]:
    """The layers weights="int8" quantizes, found on OpenFlamingo's model: every Linear of its LM (decoder layers,
    gated cross-attention blocks, output head). LLaMA's q/k/v and gate/up are quantized as one matrix each, one scale
    per row: the same as quantizing them apart."""
    return [m for m in of_model.lang_encoder.modules() if type(m) is torch.nn.Linear]
