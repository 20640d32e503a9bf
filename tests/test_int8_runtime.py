"""Weight-only int8 on the Triton backend, interpreted end to end, and the int8 error layer by layer.

Triton (TRITON_INTERPRET=1, fp32 activations): FastFlamingo.from_reference(model, backend="triton", weights="int8")
runs every quantized Linear through kernels/int8_matmul.py. Every launch here has at most 64 rows (DECODE_MAX_M),
so it is a split-K launch plus the combine kernel wherever K spans more than one BLOCK_K; the prefill-shape launch
is covered by test_kernel_int8_matmul.py. The checks:
(a) wiring, every family (LLaMA with its fused q/k/v and gate/up int8 row views, MPT with a tied int8 head,
    GPT-NeoX with parallel residual, IDEFICS with its decoupled head): the forward's logits equal the float
    reference whose quantized weights are replaced by q * scale, to the fp32 row of the tolerance table.
(b)-(e) decoding, against the torch backend's int8 runtime (the same int8 weights: the two differ by fp32 rounding
    only, so tokens are equal unless a near tie) with its context cache off (a fresh computation):
    (b) greedy ids and logits, (c) beam search ids, (d) `score`, (e) the context cache warm: a second call that
    reuses the cached demonstrations (their self-attention K/V and images) gives what the first gave, to the fp32
    row (its launches have other shapes: see the test).
The interpreter is slow (a prompt's prefill is ~1.5 s, a decode step ~0.5 s, mostly the int8 matmul's programs),
so the decode checks are spread over the families, one kind each, where the family's decode step differs most:
IDEFICS (a LLaMA decoder: fused int8 projections, decoupled head, image_attention_mask) greedy and the context
cache, MPT (ALiBi, tied head) beams as OpenFlamingo's evaluation runs them, GPT-NeoX (partial rotary, parallel
residual) scoring. The float Triton decode paths of every family are compared with the reference in
test_beams.py, test_decode_paths.py and test_idefics_layout.py. The models are int8_cases.py's (`build`);
the interpreted prompts are one row (two for the shared context) of a few tokens, smaller than its `batch`. The
file takes ~24 s on one core, ~3.5 s of it the first meta-device model (the import of sympy by torch._refs).

Layer by layer (torch only, not interpreted; int8_cases.py's `batch`): the hidden state after every gated
cross-attention block and decoder layer of the int8 model against the float reference, each within the int8 row
(helpers.py, int8_relative_bound) derived on that state.
"""

from __future__ import annotations

import pytest
import torch
from builders import idefics_batch
from helpers import (
    TOLERANCE,
    assert_close,
    bf16_rounded,
    dequantized,
    int8_relative_bound,
    interpreter,
    quantized_weights,
    random_batch,
    relative_error,
    weight_rounding_error,
    with_weights,
)
from int8_cases import CASES, batch, build
from torch import nn

from flamingo_fast.kernels.int8_matmul import int8_weight_matmul
from flamingo_fast.runtime.quantize import Int8Linear
from flamingo_fast.runtime.runtime import FastFlamingo

OPTIONS = dict(max_batch_size=1, max_seq_len=20, max_tail_len=4)


def prompt(model, seed: int):
    """One row: text, an image, text (IDEFICS: then `</s>` and text that sees no image).
    -> (vision_x, lang_x, attention_mask), extra keyword arguments."""
    torch.manual_seed(seed)
    if model.config.layout == "idefics":
        segments = [("text", 2), "image", ("text", 3), "eos", ("text", 2)]
        vision, ids, mask, image_mask = idefics_batch([segments], num_images=1, seed=seed)
        return (vision, ids, mask), {"image_attention_mask": image_mask}
    return random_batch(model.config, [([2], 9)], num_images=1), {}


def shared_context_idefics(seed: int):
    """Two IDEFICS rows with the same demonstration (image + words + `</s>`) and their own queries (image + words),
    the shorter left-padded: the evaluation's batch, whose context the runtime computes once, alone, for both rows.
    -> (vision_x, lang_x, attention_mask), extra keyword arguments."""
    context = [("text", 2), "image", ("text", 3), "eos"]
    vision, ids, mask, image_mask = idefics_batch([context + ["image", ("text", 1)], context + ["image", ("text", 2)]],
                                                  num_images=2, seed=seed)
    length = 1 + 2 + 3 + 3 + 1  # <s>, words, <fake><image><fake>, words, </s>
    starts = (mask == 0).sum(dim=1).tolist()
    ids[0, starts[0]:starts[0] + length] = ids[1, starts[1]:starts[1] + length]
    vision[0, 0] = vision[1, 0]
    return (vision, ids, mask), {"image_attention_mask": image_mask}


def runtimes(model, max_batch_size: int = 1):
    """(Triton int8 runtime, context cache on; torch int8 runtime, context cache off: every call fresh)."""
    options = {**OPTIONS, "max_batch_size": max_batch_size}
    triton_int8 = FastFlamingo.from_reference(model, backend="triton", weights="int8", **options)
    torch_int8 = FastFlamingo.from_reference(model, backend="torch", weights="int8", context_cache_bytes=0, **options)
    return triton_int8, torch_int8


def after_equal_prefix(ids, ref_ids):
    """ids, ref_ids [B, n] new tokens -> [B, n] bool: step t's logits were computed after the same tokens."""
    equal_so_far = (ids == ref_ids).cummin(dim=1).values
    return torch.cat([torch.ones_like(equal_so_far[:, :1]), equal_so_far[:, :-1]], dim=1)


def margin_safe_steps(ids, ref_ids, ref_logits):
    """Greedy steps whose tokens must agree (test_int8_weights.py's greedy test, with the fp32 row as the error of a
    logit): after the same prefix, where the reference's margin (top-1 minus top-2) exceeds 4 sigma of the
    difference of two logits' errors, sigma = sqrt(2) x (atol + rtol x |top-1|). ids, ref_ids [B, n] new tokens;
    ref_logits [B, n, V] -> [B, n] bool."""
    tol = TOLERANCE[torch.float32]
    top2 = ref_logits.double().topk(2, dim=-1).values
    sigma = 2 ** 0.5 * (tol["atol"] + tol["rtol"] * top2[..., 0].abs())
    return after_equal_prefix(ids, ref_ids) & (top2[..., 0] - top2[..., 1] > 4 * sigma)


# ------------------------------------------------------------------------------------------------ (a) the wiring


@interpreter
@pytest.mark.parametrize("case", CASES)
def test_triton_int8_forward_is_the_dequantized_reference(case):
    """(a) Every LM Linear is an Int8Linear bound to the Triton launcher (LLaMA's q/k/v and gate/up fused), and the
    logits at every real position equal the reference with q * scale weights to the fp32 row: a weight left float,
    quantized twice, given a wrong scale or a wrong row of a fused matrix, or a wrong split-K sum, fails here."""
    model = build(case, seed=len(case) + 10)
    fast = FastFlamingo.from_reference(model, backend="triton", weights="int8", **OPTIONS)
    int8_linears = [m for m in fast.model.modules() if isinstance(m, Int8Linear)]
    assert int8_linears and all(m.matmul is int8_weight_matmul for m in int8_linears), "not the Triton kernel"
    assert not any(type(m) is nn.Linear for m in fast.model.lang_encoder.modules())
    assert fast.stack.fused_projections == (model.config.lm.family == "llama")
    inputs, extra = prompt(model, seed=len(case))
    real = inputs[2].bool()
    logits = fast(*inputs, **extra)[real]
    with torch.no_grad():
        expected = with_weights(model, dequantized)[0](*inputs, **extra)[real]
    assert_close(logits, expected, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ (b)-(e) decoding


@interpreter
def test_triton_int8_greedy_and_the_warm_context_cache_idefics():
    """Two rows sharing a demonstration. (b) greedy ids equal the torch int8 runtime's where the margin allows,
    logits to the fp32 row; (e) the second call, which takes the demonstration's K/V and image from the context
    cache, gives the first call's ids where the margin allows and its logits to the fp32 row. Not bit for bit: the
    first call encodes the demonstration's image together with the two query images (3 images, one vision-encoder
    call) and the second the query images alone (2), so the encoder's matmuls have other row counts, and whether
    the last bits then agree depends on the BLAS (they did on one machine and not on another). The default runtime
    promises the tolerance table's row across calls of different shapes, bits only for identical calls."""
    model = build("idefics", seed=21)
    fast, torch_int8 = runtimes(model, max_batch_size=2)
    inputs, extra = shared_context_idefics(seed=21)
    gen = dict(max_new_tokens=2, eos_token_id=[], return_logits=True, **extra)
    encoded = []  # images per vision-encoder call
    hook = fast.model.vision_encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    try:
        cold_ids, cold_logits = fast.generate(*inputs, **gen)
        warm_ids, warm_logits = fast.generate(*inputs, **gen)
    finally:
        hook.remove()
    ref_ids, ref_logits = torch_int8.generate(*inputs, **gen)
    stats = fast.context_cache_stats()
    assert (stats.contexts, stats.context_misses, stats.context_hits) == (1, 1, 1), stats
    assert encoded == [1 + 2, 2], "cold: the shared demonstration once and the queries; warm: the queries"
    prompt_len = inputs[1].shape[1]
    new, ref_new = cold_ids[:, prompt_len:], ref_ids[:, prompt_len:]
    sure = margin_safe_steps(new, ref_new, ref_logits)
    top2 = ref_logits.topk(2, dim=-1).values
    print(f"greedy: {int(sure.sum())} of {sure.numel()} steps with a safe margin (smallest margin "
          f"{float((top2[..., 0] - top2[..., 1]).min()):.3g})")
    assert sure.any() and torch.equal(new[sure], ref_new[sure])
    same_prefix = after_equal_prefix(new, ref_new)
    assert_close(cold_logits[same_prefix], ref_logits[same_prefix], dtype=torch.float32)
    warm_new = warm_ids[:, prompt_len:]
    warm_sure = margin_safe_steps(warm_new, new, cold_logits)
    assert warm_sure.any() and torch.equal(warm_new[warm_sure], new[warm_sure])
    warm_prefix = after_equal_prefix(warm_new, new)
    assert_close(warm_logits[warm_prefix], cold_logits[warm_prefix], dtype=torch.float32)


@interpreter
def test_triton_int8_beams_mpt():
    """(c) beam search with OpenFlamingo's evaluation's length_penalty=-2.0 (num_beams=2: its 3 cost another
    second interpreted): both returned beams equal the torch int8 runtime's. Three new tokens: the second decode
    step reads tails that the first reordered."""
    model = build("mpt", seed=22)
    fast, torch_int8 = runtimes(model)
    inputs, extra = prompt(model, seed=22)
    gen = dict(max_new_tokens=3, num_beams=2, length_penalty=-2.0, num_return_sequences=2, eos_token_id=[], **extra)
    beams = fast.generate(*inputs, **gen)
    assert beams.shape == (2, inputs[1].shape[1] + 3) and not torch.equal(beams[0], beams[1])
    assert torch.equal(beams, torch_int8.generate(*inputs, **gen))


@interpreter
def test_triton_int8_score_gpt_neox():
    """(d) rank classification: candidates as a trie (two share their first token), log-likelihoods equal the
    torch int8 runtime's to the fp32 row."""
    model = build("gpt_neox_parallel", seed=23)
    fast, torch_int8 = runtimes(model)
    inputs, extra = prompt(model, seed=23)
    candidates = [[5], [7, 8], [7, 9]]
    scores = fast.score(*inputs, candidates=candidates, **extra)
    assert scores.shape == (1, 3) and bool((scores < 0).all())
    assert_close(scores, torch_int8.score(*inputs, candidates=candidates, **extra), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ layer by layer


def sites(model) -> list[tuple[str, nn.Module]]:
    """(name, module) of every gated block and decoder layer in execution order."""
    lm = model.lang_encoder
    found = []
    for idx, layer in enumerate(lm.layers):
        if str(idx) in lm.gated_cross_attn_layers:
            found.append((f"xattn {idx}", lm.gated_cross_attn_layers[str(idx)]))
        found.append((f"layer {idx}", layer))
    return found


def hidden_states(model, inputs, extra, real) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> (the output of every site at the real positions, the logits at the real positions)."""
    states = []
    hooks = [m.register_forward_hook(lambda mod, args, out: states.append(out[real])) for _, m in sites(model)]
    try:
        with torch.no_grad():
            logits = model(*inputs, **extra)[real]
    finally:
        for hook in hooks:
            hook.remove()
    return states, logits


@pytest.mark.parametrize("case", CASES)
def test_int8_error_layer_by_layer(case):
    """The hidden state after every gated block and decoder layer, int8 against float, each within the int8 row
    derived on that state: rel_int8 <= int8_relative_bound(rel_bf16, eps_int8, eps_bf16), where rel_bf16 is the same
    state's relative error with the weights rounded to bf16 and the eps are both roundings' relative errors over
    the quantized weights upstream of it (its site and the ones before; all of them, the head included, for the
    logits, which is test_int8_weights.py's bound). The int8 states come from forward hooks on the reference whose
    quantized weights are replaced by q * scale: the int8 runtime computes exactly that model (the fp32 row; the
    Triton backend above, the torch backend in test_int8_weights.py), and the runtime's fused kernels have no
    per-layer output to hook. The bound and the measured errors are printed per site."""
    model = build(case, seed=len(case))
    inputs, image_mask, real = batch(model)
    extra = {} if image_mask is None else {"image_attention_mask": image_mask}
    float_states, float_logits = hidden_states(model, inputs, extra, real)
    int8_states, int8_logits = hidden_states(with_weights(model, dequantized)[0], inputs, extra, real)
    bf16_states, bf16_logits = hidden_states(with_weights(model, bf16_rounded)[0], inputs, extra, real)
    upstream, rows = [], []
    for (name, module), ref, int8, bf16 in zip(sites(model), float_states, int8_states, bf16_states, strict=True):
        upstream += [m.weight for m in module.modules() if type(m) is nn.Linear]
        eps_int8, eps_bf16 = weight_rounding_error(upstream, dequantized), weight_rounding_error(upstream, bf16_rounded)
        rows.append((name, relative_error(int8, ref), relative_error(bf16, ref), eps_int8, eps_bf16))
    every = [getattr(m, attribute) for m, attribute in quantized_weights(model)]  # the output head too
    rows.append(("logits", relative_error(int8_logits, float_logits), relative_error(bf16_logits, float_logits),
                 weight_rounding_error(every, dequantized), weight_rounding_error(every, bf16_rounded)))
    print(f"\n{case}: {'site':>9} {'rel int8':>9} {'bound':>9} {'of bound':>9} {'rel bf16':>9} {'eps int8':>9} "
          f"{'eps bf16':>9}")
    failed = []
    for name, rel_int8, rel_bf16, eps_int8, eps_bf16 in rows:
        bound = int8_relative_bound(rel_bf16, eps_int8, eps_bf16)
        print(f"{case}: {name:>9} {rel_int8:9.3g} {bound:9.3g} {rel_int8 / bound:9.2f} {rel_bf16:9.3g} "
              f"{eps_int8:9.3g} {eps_bf16:9.3g}")
        if not rel_int8 <= bound:
            failed.append(f"{name}: {rel_int8:.3g} > {bound:.3g}")
    assert not failed, failed
