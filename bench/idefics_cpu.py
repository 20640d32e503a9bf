"""IDEFICS v1 decode on the CPU, transformers' own generate against flamingo_fast's drop-in, in ONE process.

    .venv-openflamingo/bin/python bench/idefics_cpu.py --json out.json      transformers 4.57 (make setup-openflamingo)
    .venv-transformers5/bin/python bench/idefics_cpu.py --json out.json     transformers 5.x  (make setup-transformers5)

The shape is the `idefics-small` preset's, at random weights (EVERY parameter random: flamingo_fast.testing):
LLaMA 512 wide, 8 layers, 8 heads, 2048 MLP, 32000 + 2 decoupled rows; CLIP-style ViT 224 px / patch 16, 256 wide,
4 layers (197 tokens per image, CLS included); perceiver 6 deep, 4 heads x 96, 64 latents; a gated block before
every 4th layer (cross_layer_interval 4), scalar alphas. One prompt row with --images images in IDEFICS' few-shot
form (`<s>` then, per image, `<fake_token_around_image><image><fake_token_around_image>` and a caption, the
last caption cut short), its image_attention_mask built by the processor's rule.

Implementations, greedy, on the same weights and the same inputs:
  hf          transformers' IdeficsForVisionText2Text.generate (whichever transformers this venv has)
  fast        flamingo_fast.from_idefics(model, engine="fast")             (skipped until the API exists)
  reference   flamingo_fast.from_idefics(model, engine="reference")
  fast0       the fast path on the same prompt with no images: the image tokens replaced by words, the
              processor's text-only form (an all-zero [B, T, 1] mask, one zero image): the decode floor
Per implementation: generate with 1 new token (TTFT: vision, perceiver, prefill, the first token; the fast
path's context cache is off unless --context-cache, so its TTFT is cold like transformers') and with
--new-tokens (N), alternating; decode ms/token = (t_N - t_1) / (N - 1); medians over --repeats rounds after
--warmup rounds.
Every call produces exactly the asked number of tokens (min_new_tokens = max_new_tokens). Prints each row and
the ratios; --json writes them with the versions and the shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from flamingo_fast.compat import import_torchvision

import_torchvision()  # transformers' IDEFICS imports torchvision, which beside the CPU torch needs compat's help
import transformers  # noqa: E402

from flamingo_fast.testing import build_idefics_from_config, expected_image_index  # noqa: E402

BASE_VOCAB, ADDED = 32000, 2
FAKE, IMAGE = BASE_VOCAB, BASE_VOCAB + 1
BOS, EOS, PAD = 1, 2, 0


def bench_config(images_per_layer_interval: int = 4, num_latents: int = 64) -> transformers.IdeficsConfig:
    return transformers.IdeficsConfig(
        vocab_size=BASE_VOCAB, additional_vocab_size=ADDED, hidden_size=512, intermediate_size=2048,
        num_hidden_layers=8, num_attention_heads=8, rms_norm_eps=1e-6, cross_layer_interval=images_per_layer_interval,
        qk_layer_norms=False, alpha_type="float", use_resampler=True, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, tie_word_embeddings=False,
        vision_config=dict(embed_dim=256, image_size=224, patch_size=16, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, hidden_act="gelu"),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=num_latents, resampler_depth=6,
                              resampler_n_heads=4, resampler_head_dim=96, qk_layer_norms_perceiver=False),
    )


def build_inputs(images: int, caption: int, question: int, batch: int, seed: int) -> tuple[dict, dict]:
    """(with images, text-only twin of the same length), each as the processor would return it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids = [BOS]
        for i in range(images):
            ids += [FAKE, IMAGE, FAKE]
            ids += torch.randint(3, BASE_VOCAB, (caption if i < images - 1 else question,), generator=g).tolist()
        rows.append(ids)
    input_ids = torch.tensor(rows)
    index = expected_image_index(input_ids, image_id=IMAGE, eos_id=EOS)
    n = max(images, 1)
    iam = torch.zeros(batch, input_ids.shape[1], n, dtype=torch.long)
    seen = index >= 0
    iam[seen.nonzero(as_tuple=True) + (index[seen],)] = 1
    with_images = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       pixel_values=torch.randn(batch, n, 3, 224, 224, generator=g), image_attention_mask=iam)
    words = torch.randint(3, BASE_VOCAB, input_ids.shape, generator=g)
    text_ids = torch.where((input_ids == FAKE) | (input_ids == IMAGE), words, input_ids)
    text_only = dict(input_ids=text_ids, attention_mask=torch.ones_like(text_ids),
                     pixel_values=torch.zeros(batch, 1, 3, 224, 224),
                     image_attention_mask=torch.zeros(batch, text_ids.shape[1], 1, dtype=torch.bool))
    return with_images, text_only


def hf_call(model):
    def generate(inputs, new_tokens):
        width = model.lm_head.out_features + model.lm_head.additional_fc.out_features
        saved, model.config.vocab_size = model.config.vocab_size, width  # see idefics_fixtures.hf_generate
        try:
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, num_beams=1)
        finally:
            model.config.vocab_size = saved
    return generate


def ours_call(runtime):
    def generate(inputs, new_tokens):
        return runtime.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                num_beams=1)
    return generate


def measure(generate, inputs, new_tokens: int, repeats: int, warmup: int) -> dict:
    """Rounds of (1 new token, N new tokens), alternating so that drifting machine load touches both alike; the
    first `warmup` rounds are dropped (transformers on the CPU needs a few calls before its times settle)."""
    T = inputs["input_ids"].shape[1]
    times = {1: [], new_tokens: []}
    out = None
    for i in range(warmup + repeats):
        for n in (1, new_tokens):
            start = time.perf_counter()
            out = generate(inputs, n)
            elapsed = time.perf_counter() - start
            assert out.shape[1] == T + n, f"asked for {n} new tokens, got {out.shape[1] - T}"
            if i >= warmup:
                times[n].append(elapsed)
    t1, tn = statistics.median(times[1]), statistics.median(times[new_tokens])
    return {"ttft_ms": 1e3 * t1, "total_ms": 1e3 * tn, "decode_ms_per_token": 1e3 * (tn - t1) / (new_tokens - 1),
            "t1_ms_all": [1e3 * t for t in times[1]], "tn_ms_all": [1e3 * t for t in times[new_tokens]],
            "tokens": out[:, T:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--caption", type=int, default=8, help="text tokens after each image but the last")
    parser.add_argument("--question", type=int, default=6, help="text tokens after the last image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="rounds dropped before timing")
    parser.add_argument("--impls", default="hf,fast,reference,fast0")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-cache", action="store_true",
                        help="keep the fast path's context cache on (warm TTFT: the same images every call)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = args.impls.split(",")

    model = build_idefics_from_config(bench_config(), seed=args.seed, head_scale=3.0)
    inputs, text_only = build_inputs(args.images, args.caption, args.question, args.batch, args.seed)
    T = inputs["input_ids"].shape[1]
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(), "images": args.images,
            "prompt_tokens": T, "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "warmup": args.warmup, "context_cache": args.context_cache, "loadavg_start": os.getloadavg(),
            "shape": "idefics-small: LM 512x8 (8 heads, MLP 2048), ViT 224/16 256x4, "
            "perceiver 6x(4x96) 64 latents, interval 4, float alphas"}
    print(f"transformers {meta['transformers']}, torch {meta['torch']}, {meta['threads']} threads; "
          f"{args.images} images, prompt {T} tokens, batch {args.batch}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} rounds after {args.warmup} warm-up rounds")

    runners = {}
    if "hf" in impls:
        runners["hf"] = (hf_call(model), inputs)
    wanted_ours = [i for i in impls if i in ("fast", "reference", "fast0")]
    if wanted_ours:
        import flamingo_fast

        if not hasattr(flamingo_fast, "from_idefics"):
            print("flamingo_fast.from_idefics does not exist yet: skipping", ", ".join(wanted_ours))
        else:
            # The context cache (on by default) would serve the repeated images from memory: TTFT without it
            # is the cold one, comparable with transformers'. Decode is the same either way.
            options = dict(max_batch_size=args.batch, max_seq_len=T + args.new_tokens + 8,
                           context_cache_bytes=(1 << 30) if args.context_cache else 0)
            if "fast" in impls or "fast0" in impls:
                fast = flamingo_fast.from_idefics(model, engine="fast", backend="auto", **options)
                if "fast" in impls:
                    runners["fast"] = (ours_call(fast), inputs)
                if "fast0" in impls:
                    runners["fast0"] = (ours_call(fast), text_only)
            if "reference" in impls:
                reference = flamingo_fast.from_idefics(model, engine="reference")
                runners["reference"] = (ours_call(reference), inputs)

    results, errors = {}, {}
    for name, (generate, prompt) in runners.items():
        try:
            results[name] = measure(generate, prompt, args.new_tokens, args.repeats, args.warmup)
        except Exception as error:  # noqa: BLE001 - one failing implementation must not hide the others' times
            errors[name] = f"{type(error).__name__}: {error}"
            print(f"{name:10s} FAILED: {errors[name]}")
            continue
        r = results[name]
        print(f"{name:10s} TTFT {r['ttft_ms']:9.1f} ms   decode {r['decode_ms_per_token']:8.2f} ms/token   "
              f"({args.new_tokens} tokens: {r['total_ms']:.1f} ms)")

    ratios = {}

    def ratio(key, a, b):
        if a in results and b in results:
            ratios[key] = results[a]["decode_ms_per_token"] / results[b]["decode_ms_per_token"]
            print(f"{key}: {ratios[key]:.2f}x")

    ratio("decode hf / fast", "hf", "fast")
    ratio("decode reference / fast", "reference", "fast")
    ratio("decode fast / fast0 (0 images)", "fast", "fast0")
    if "hf" in results and "fast" in results:
        ratios["ttft hf / fast"] = results["hf"]["ttft_ms"] / results["fast"]["ttft_ms"]
        print(f"ttft hf / fast: {ratios['ttft hf / fast']:.2f}x")
    for other in ("fast", "reference"):
        if "hf" in results and other in results:
            same = results["hf"]["tokens"] == results[other]["tokens"]
            meta[f"same_tokens_hf_{other}"] = same
            print(f"greedy tokens {other} == hf: {same}")
    meta["loadavg_end"] = os.getloadavg()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "ratios": ratios, "errors": errors}, f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()
