"""Offline builders for Hugging Face IDEFICS v1 (`IdeficsForVisionText2Text`): a tiny model with EVERY parameter
random, a real `IdeficsProcessor` around a tokenizer built locally, and prompt batches that exercise the
processor's image_attention_mask rules. No downloads. Works with transformers 4.57 and 5.x.

Token ids follow IDEFICS: `<unk>`=0 (also the pad token), `<s>`=1, `</s>`=2, plain words 3..BASE_VOCAB-1, then the
added tokens, which live in the decoupled *additional* rows of the embedding and of the output head, as in the
released checkpoints: `<fake_token_around_image>`=BASE_VOCAB, `<image>`=BASE_VOCAB+1, `<end_of_utterance>`=
BASE_VOCAB+2 (present when there are 3 or more additional rows), then `<extra_k>` for any further rows.

Run this file to check that transformers' own forward and generate run on every batch:
    .venv-openflamingo/bin/python tests/idefics_fixtures.py
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from flamingo_fast import testing
from flamingo_fast.compat import import_torchvision_if_installed
from flamingo_fast.testing import build_idefics_from_config

import_torchvision_if_installed()  # before transformers' IDEFICS imports it (conftest.py does too; not when run alone)
import transformers  # noqa: E402
from transformers import IdeficsConfig, IdeficsForVisionText2Text  # noqa: E402

BASE_VOCAB = 64  # config.vocab_size: ids below it use the main tables
PAD, BOS, EOS = 0, 1, 2  # <unk> doubles as padding, as in IDEFICS' tokenizer
FAKE, IMAGE, EOU = BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2
IMAGE_SIZE = 16  # vision config and image processor; patch 8 -> 4 patches + CLS = 5 vision tokens
WORDS = [f"w{i}" for i in range(3, BASE_VOCAB)]  # word "wN" has id N
# The image each token sees under IDEFICS' rule (flamingo_fast.testing), with this vocabulary's <image> and </s>.
expected_image_index = functools.partial(testing.expected_image_index, image_id=IMAGE, eos_id=EOS)

TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-6,
    vision=dict(embed_dim=32, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, hidden_act="gelu", layer_norm_eps=1e-5),
    # head_dim 12 != 32 / 2: the perceiver's inner width (heads x head_dim) differs from the vision width
    perceiver=dict(resampler_depth=2, resampler_n_heads=2, resampler_head_dim=12),
)


def idefics_config(cross_layer_interval: int = 1, qk_layer_norms: bool = True, qk_layer_norms_perceiver: bool = True,
                   alpha_type: str = "float", num_latents: int = 3, additional_vocab_size: int = 2,
                   use_resampler: bool = True, num_hidden_layers: int | None = None, **overrides) -> IdeficsConfig:
    """A tiny IdeficsConfig (the idefics-9b layout at toy widths). `overrides` replace top-level LM fields."""
    shape = dict(TINY)
    vision, perceiver = shape.pop("vision"), shape.pop("perceiver")
    if num_hidden_layers is not None:
        shape["num_hidden_layers"] = num_hidden_layers
    shape.update(overrides)
    perceiver = dict(perceiver, use_resampler=use_resampler, resampler_n_latents=num_latents,
                     qk_layer_norms_perceiver=qk_layer_norms_perceiver)
    return IdeficsConfig(
        vocab_size=BASE_VOCAB, additional_vocab_size=additional_vocab_size, cross_layer_interval=cross_layer_interval,
        qk_layer_norms=qk_layer_norms, alpha_type=alpha_type, use_resampler=use_resampler,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
        vision_config=vision, perceiver_config=perceiver, **shape,
    )


def build_idefics(cross_layer_interval: int = 1, qk_layer_norms: bool = True, qk_layer_norms_perceiver: bool = True,
                  alpha_type: str = "float", num_latents: int = 3, additional_vocab_size: int = 2,
                  additional_rows: int | None = None, seed: int = 0, use_resampler: bool = True,
                  head_scale: float = 3.0, num_hidden_layers: int | None = None,
                  attn_implementation: str | None = None, **overrides) -> IdeficsForVisionText2Text:
    """transformers' real IdeficsForVisionText2Text, float32, eval mode, every parameter random (seeded).

    additional_rows: the number of decoupled rows the weights really have, when more than the config's
    additional_vocab_size (the instruct checkpoints' situation: a runtime must read the count from the weights).
    """
    config = idefics_config(cross_layer_interval, qk_layer_norms, qk_layer_norms_perceiver, alpha_type, num_latents,
                            additional_vocab_size, use_resampler, num_hidden_layers, **overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return build_idefics_from_config(config, seed=seed, head_scale=head_scale, additional_rows=additional_rows)


def build_tokenizer(additional_rows: int = 2):
    """A word-level fast tokenizer with IDEFICS' special tokens, wrapped as LlamaTokenizerFast (the class
    IdeficsProcessor expects), left padding with `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": PAD, "<s>": BOS, "</s>": EOS, **{w: i for i, w in enumerate(WORDS, start=3)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"][:additional_rows]
    added += [f"<extra_{k}>" for k in range(additional_rows - len(added))]
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", padding_side="left")
    cls = getattr(transformers, "LlamaTokenizerFast", None)
    try:
        tok = cls(tokenizer_object=core, add_bos_token=False, add_eos_token=False, legacy=False, **kwargs)
    except Exception:  # noqa: BLE001 - a transformers whose Llama tokenizer cannot wrap a prebuilt object
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    tok.add_tokens(added[:2], special_tokens=True)
    if len(added) > 2:  # as the instruct tokenizer lists <end_of_utterance>
        tok.add_special_tokens({"additional_special_tokens": added[2:]})
    ids = tok.convert_tokens_to_ids(added)
    expected = list(range(BASE_VOCAB, BASE_VOCAB + additional_rows))
    assert ids == expected, f"added token ids {ids} != {expected}"
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<unk>"]) == [BOS, EOS, PAD]
    return tok


def build_processor(additional_rows: int = 2):
    """transformers' IdeficsProcessor: the tokenizer above and IdeficsImageProcessor at IMAGE_SIZE (transformers
    5 without torchvision falls back to its PIL backend, the same resampling as 4.57)."""
    import logging as _logging

    from transformers import IdeficsImageProcessor, IdeficsProcessor

    quiet = _logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(_logging.ERROR)  # 5.x warns about the PIL fallback when torchvision is missing
    try:
        image_processor = IdeficsImageProcessor(image_size=IMAGE_SIZE)
    finally:
        quiet.setLevel(level)
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=build_tokenizer(additional_rows),
                                 image_size=IMAGE_SIZE)
    # A tokenizer without <end_of_utterance> among its special tokens: the processor adds none (base models).
    return processor


def random_image(generator: np.random.Generator, height: int | None = None, width: int | None = None):
    """A random RGB PIL image, of a size and aspect unlike IMAGE_SIZE so the processor's resize really works."""
    h = height or int(generator.integers(10, 40))
    w = width or int(generator.integers(10, 40))
    return Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _words(generator: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in generator.integers(0, len(WORDS), n))


def prompt_batches(seed: int = 0) -> dict[str, list[list]]:
    """Named batches of processor prompts (lists of text and PIL images, one list per row):

    - "mixed": rows with 3, 2, 1 and 0 images (left padding, a text-only row among image rows), text before the
      first image, a `</s>` inside a prompt (the tokens after it see no image until the next `<image>`),
      adjacent images, a prompt that starts with an image;
    - "single": one row, 3 images, text first, a `</s>` between images, adjacent images;
    - "text_only": two rows without images (the processor's all-zero [B, T, 1] mask and zero pixels);
    - "eod_last": row 0's last token comes after a `</s>` (it and the generated tokens, which reuse the last
      prompt row of the mask, see no image); row 1 ends with `</s>` itself, which still sees its image, and so
      do the tokens generated after it.
    """
    g = np.random.default_rng(seed)
    img = lambda: random_image(g)
    return {
        "mixed": [
            [_words(g, 3), img(), _words(g, 2) + " </s> " + _words(g, 2), img(), img(), _words(g, 3)],
            [img(), _words(g, 4), img(), _words(g, 2)],
            [_words(g, 2), img(), _words(g, 3)],
            [_words(g, 5)],
        ],
        "single": [[_words(g, 2), img(), _words(g, 3), img(), _words(g, 1) + " </s> " + _words(g, 2), img(),
                    _words(g, 3)]],
        "text_only": [[_words(g, 4)], [_words(g, 7)]],
        "eod_last": [[_words(g, 2), img(), _words(g, 3) + " </s> " + _words(g, 1)],
                     [img(), _words(g, 3) + " </s>"]],
    }


def process(processor, prompts) -> dict[str, torch.Tensor]:
    """The processor's outputs (input_ids, attention_mask, pixel_values, image_attention_mask) as a plain dict."""
    return dict(processor(text=prompts, return_tensors="pt"))


def hf_generate(model: IdeficsForVisionText2Text, inputs: dict, **options) -> torch.Tensor:
    """transformers' own generate on the processor's outputs.

    transformers 4.57's beam search sizes its candidate table with `config.vocab_size` (generation/utils.py
    _beam_search, line 3183), which for IDEFICS excludes the decoupled additional rows that the logits include,
    and fails with a reshape error on any checkpoint with additional rows (all released ones). 5.x infers the
    width from the logits. The config is widened to the logits' width for the call (nothing in the forward
    reads it), then restored: the search is then Hugging Face's own, unmodified."""
    width = model.lm_head.out_features + (model.lm_head.additional_fc.out_features
                                          if model.lm_head.out_additional_features > 0 else 0)
    config = model.config
    saved = config.vocab_size
    config.vocab_size = width
    try:
        with torch.no_grad():
            return model.generate(**inputs, **options)
    finally:
        config.vocab_size = saved


def _self_check() -> None:
    """transformers' own forward and generate (greedy, beams) on every batch, and the mask rule above."""
    print("transformers", transformers.__version__, "torch", torch.__version__)
    processor = build_processor()
    batches = {k: process(processor, v) for k, v in prompt_batches().items()}
    for name, inputs in batches.items():
        ids, mask, iam = inputs["input_ids"], inputs["attention_mask"], inputs["image_attention_mask"]
        index = expected_image_index(ids)
        if (index >= 0).any():
            seen = torch.where(iam.bool().any(-1), iam.float().argmax(-1), -1)
            assert torch.equal(seen, index), f"{name}: processor mask differs from the rule"
        assert (iam.sum(-1) <= 1).all()
        print(f"{name}: ids {tuple(ids.shape)} pixel {tuple(inputs['pixel_values'].shape)} "
              f"iam {tuple(iam.shape)} {iam.dtype} pads/row {(mask == 0).sum(1).tolist()}")
    for kw in [dict(cross_layer_interval=1), dict(cross_layer_interval=2, alpha_type="vector", qk_layer_norms=False),
               dict(cross_layer_interval=4, num_latents=5, additional_rows=3, qk_layer_norms_perceiver=False)]:
        model = build_idefics(**kw)
        for name, inputs in batches.items():
            with torch.no_grad():
                logits = model(**inputs).logits
            greedy = hf_generate(model, inputs, max_new_tokens=5, do_sample=False)
            beams = hf_generate(model, inputs, max_new_tokens=5, num_beams=3, length_penalty=-2.0)
            assert torch.isfinite(logits).all()
            print(f"  {kw} {name}: logits {tuple(logits.shape)} greedy {greedy[:, -5:].tolist()} "
                  f"beams {beams[:, -5:].tolist()}")


if __name__ == "__main__":
    _self_check()
