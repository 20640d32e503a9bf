"""Llama 3.2 Vision on the CPU: `from_mllama` against transformers' own `generate`, one run each.

    OMP_NUM_THREADS=1 .venv-transformers5/bin/python bench/mllama_cpu.py [--new-tokens 32] [--batch 4]
    OMP_NUM_THREADS=1 .venv-transformers5/bin/python bench/mllama_cpu.py --invariant   # the mode's cost

The mllama-small shapes (84 px tiles of 14 px patches, 37 vision tokens a tile; ViT 128 wide, 6 local + 2 global
layers; LM 512 wide, 10 layers, cross-attention at 3 and 8) as a transformers MllamaForConditionalGeneration with
random weights, fp32, one torch thread. Each row: 8 text tokens, then 4 images of 4 tiles (168 px squares, through
MllamaImageProcessor), each followed by 8 text tokens. First token: generate with max_new_tokens=1; decode: (time
at N new tokens - time at 1) / (N - 1), every row made to run N tokens (min_new_tokens=N). One warm-up call each,
then one timed run of each length; the drop-in without its image cache here. Warm few-shot first token: `--shots`
demonstrations of 4 tiles and a new query image per call; the drop-in's image cache holds the demonstrations from
the calls before (transformers has no such cache). Prints one JSON line.

The decode floor: a decode step reads, at least once each, the language model's weights that act on the new token
(every decoder layer but the cross-attention layers' k/v projections, whose outputs are cached per image; the final
norm; the output head; the embedding only one row per token, not counted) -> `decode_weight_mb`; with this
machine's copy bandwidth (bench/bandwidth.py's measure, one thread, 256 MiB: `copy_GBps`, bytes read + written)
`decode_floor_ms` = those bytes / (copy_GBps / 2), the time to read them once. A decode at the floor cannot be
made faster in float32 by any runtime: `*_decode_pct_of_floor` says how close each one is. `--int8` adds the
drop-in with weights="int8" (1 byte a weight + a float32 scale per row: a different precision, within the int8 row
of docs/int8.md; reported beside, not as the comparison).
--invariant: instead, the drop-in's default against `batch_invariant=True` (runtime/mllama_invariant.py), both
without the image cache, on the same prompt and lengths: first token and decode ms/token of each (one warm-up call
each, then one timed run of each length), and invariant / default.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from bandwidth import measure_copy_bandwidth
from PIL import Image

from flamingo_fast.compat import import_torchvision_if_installed
from flamingo_fast.testing import build_mllama_from_config

import_torchvision_if_installed()
from transformers import MllamaConfig  # noqa: E402
from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

import flamingo_fast  # noqa: E402

IMAGE, TILE = 32000, 84


def small_model():
    vision = dict(image_size=TILE, patch_size=14, max_num_tiles=4, hidden_size=128, num_hidden_layers=6,
                  num_global_layers=2, attention_heads=4, intermediate_size=512, intermediate_layers_indices=[1, 3, 5],
                  vision_output_dim=128 * 4)
    text = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1024, cross_attention_layers=[3, 8], max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, rope_theta=500000.0,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
    return build_mllama_from_config(MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE))


def inputs(batch: int, images: int, query_seed: int = 0) -> dict:
    """Each row: 8 text tokens, then `images` images of 4 tiles, each followed by 8 text tokens; the last image
    (the query's) drawn from `query_seed`, the others (the demonstrations) from seed 0."""
    g, q = np.random.default_rng(0), np.random.default_rng(1000 + query_seed)
    row = [1] + list(range(3, 11))
    for i in range(images):
        row += [IMAGE] + list(range(11 + 8 * i, 19 + 8 * i))
    ids = torch.tensor([row] * batch)

    def picture(rng):
        return Image.fromarray(rng.integers(0, 256, (2 * TILE, 2 * TILE, 3), dtype=np.uint8))

    pictures = [[picture(g) for _ in range(images - 1)] + [picture(q)] for _ in range(batch)]
    processed = MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=4)(pictures,
                                                                                              return_tensors="pt")
    sparse = [get_cross_attention_token_mask(r, IMAGE) for r in ids.tolist()]
    cross = convert_sparse_cross_attention_mask_to_dense(sparse, processed["num_tiles"], 4, ids.shape[1])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=processed["pixel_values"],
                aspect_ratio_ids=processed["aspect_ratio_ids"], aspect_ratio_mask=processed["aspect_ratio_mask"],
                cross_attention_mask=torch.from_numpy(cross))


def decode_weight_bytes(model) -> int:
    """The language model's bytes a decode step reads (module docstring): its decoder layers but the
    cross-attention k/v projections, the final norm and the output head."""
    text = model.model.language_model if hasattr(model, "model") else model.language_model.model
    head = model.lm_head if hasattr(model, "lm_head") else model.language_model.lm_head
    layers = sum(p.nbytes for n, p in text.layers.named_parameters()
                 if not any(part in n for part in ("cross_attn.k_proj", "cross_attn.v_proj")))
    return layers + text.norm.weight.nbytes + head.weight.nbytes


def seconds(generate, prompt: dict, new: int) -> float:
    start = time.perf_counter()
    out = generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt["input_ids"].shape[1] + new
    return elapsed


def first_and_decode_ms(generate, prompt: dict, new: int) -> tuple[float, float]:
    """One warm-up call, then one timed run of 1 and of `new` tokens -> (first token ms, decode ms per token)."""
    seconds(generate, prompt, 2)
    first = seconds(generate, prompt, 1)
    total = seconds(generate, prompt, new)
    return round(first * 1e3, 1), round((total - first) / (new - 1) * 1e3, 2)


def invariant_cost(model, prompt: dict, new: int) -> dict:
    result = {"batch": prompt["input_ids"].shape[0], "prompt_tokens": prompt["input_ids"].shape[1], "new_tokens": new,
              "images_per_row": 4, "tiles_per_image": int(prompt["aspect_ratio_mask"].sum(-1).max())}
    with torch.no_grad():
        for name, invariant in (("default", False), ("invariant", True)):
            runtime = flamingo_fast.from_mllama(model, backend="torch", context_cache_bytes=0,
                                                batch_invariant=invariant)
            first, decode = first_and_decode_ms(runtime.generate, prompt, new)
            result[f"{name}_first_token_ms"], result[f"{name}_decode_ms_per_token"] = first, decode
    for what in ("first_token_ms", "decode_ms_per_token"):
        result[f"{what}_ratio"] = round(result[f"invariant_{what}"] / result[f"default_{what}"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shots", type=int, default=8, help="demonstrations of the warm few-shot first token")
    parser.add_argument("--int8", action="store_true", help="also time the drop-in with weights='int8'")
    parser.add_argument("--invariant", action="store_true", help="the default against batch_invariant=True instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = small_model()
    prompt = inputs(args.batch, 4)
    if args.invariant:
        print(json.dumps(invariant_cost(model, prompt, args.new_tokens)))
        return
    fast = flamingo_fast.from_mllama(model, backend="torch")
    cold = flamingo_fast.from_mllama(model, backend="torch", context_cache_bytes=0)  # every call encodes its images
    result = {"batch": args.batch, "prompt_tokens": prompt["input_ids"].shape[1], "new_tokens": args.new_tokens,
              "images_per_row": 4, "tiles_per_image": int(prompt["aspect_ratio_mask"].sum(-1).max())}
    impls = [("hf", model.generate), ("fast", cold.generate)]
    if args.int8:
        impls.append(("fast_int8", flamingo_fast.from_mllama(model, backend="torch", context_cache_bytes=0,
                                                             weights="int8").generate))
    with torch.no_grad():
        for name, generate in impls:
            first, decode = first_and_decode_ms(generate, prompt, args.new_tokens)
            result[f"{name}_first_token_ms"], result[f"{name}_decode_ms_per_token"] = first, decode
        few_shot = [inputs(args.batch, args.shots + 1, query_seed=s) for s in range(3)]
        seconds(model.generate, few_shot[0], 1)  # warm-up
        result["hf_few_shot_first_token_ms"] = round(seconds(model.generate, few_shot[1], 1) * 1e3, 1)
        seconds(fast.generate, few_shot[0], 1)  # the demonstrations' images enter the image cache
        seconds(fast.generate, few_shot[1], 1)
        result["fast_warm_few_shot_first_token_ms"] = round(seconds(fast.generate, few_shot[2], 1) * 1e3, 1)
        result["few_shot_image_hits"] = fast.engine.cache_stats.image_hits
    result["few_shot_first_token_speedup"] = round(result["hf_few_shot_first_token_ms"]
                                                   / result["fast_warm_few_shot_first_token_ms"], 2)
    result["decode_speedup"] = round(result["hf_decode_ms_per_token"] / result["fast_decode_ms_per_token"], 2)
    result["first_token_speedup"] = round(result["hf_first_token_ms"] / result["fast_first_token_ms"], 2)
    bandwidth = measure_copy_bandwidth("cpu", 256 << 20)
    floor_ms = decode_weight_bytes(model) / (bandwidth["copy_GBps"] / 2 * 1e9) * 1e3
    result.update(decode_weight_mb=round(decode_weight_bytes(model) / 1e6, 1),
                  copy_GBps=round(bandwidth["copy_GBps"], 2), decode_floor_ms=round(floor_ms, 2))
    for name, _ in impls:
        result[f"{name}_decode_pct_of_floor"] = round(result[f"{name}_decode_ms_per_token"] / floor_ms * 100)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
