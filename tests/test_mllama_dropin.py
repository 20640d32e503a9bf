"""The Llama 3.2 Vision drop-in (`flamingo_fast.from_mllama`) against transformers' own
`MllamaForConditionalGeneration`: tiny models with EVERY parameter random, images through transformers'
MllamaImageProcessor, cross_attention_mask from processing_mllama's helpers (tests/mllama_fixtures.py). Runs under
transformers 4.57 (.venv-openflamingo) and 5.24 (.venv-transformers5); skipped elsewhere.

Conventions:
- logits are compared at real tokens only, within the fp32 row of the tolerance table (tests/helpers.py);
- transformers 5.24's cached generate reads its cache length from layer 0's cache; when layer 0 is a
  cross-attention layer (the "mha-default-2tiles" config; no released model has one there: theirs start at 3)
  that is the vision tokens' count, and generation fails or goes wrong (test_transformers5_cached_generate_*).
  There, the expected tokens are transformers' uncached generate (`use_cache=False`), the same model's own rule;
- sampling: transformers draws with `torch.multinomial` on the global RNG, flamingo_fast from a `generator`, so
  seeded draws are compared where they cannot differ (one token holds all the mass), and otherwise each sampled
  token must lie in transformers' own warped distribution (teacher-forced), the same seed giving the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from helpers import assert_close, hf_sampling_probs, interpreter

transformers = pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from mllama_fixtures import (  # noqa: E402
    BOS,
    CONFIGS,
    EOS,
    ONE,
    RELEASE,
    WIDE2,
    batch,
    build_mllama,
    image_processor,
    prompt_batches,
    random_image,
)

import flamingo_fast  # noqa: E402

FP32 = torch.float32
NEW_TOKENS = 6
PROMPTS = ("mixed", "text_only", "single", "image_last")


@functools.cache
def hf_model(name: str):
    return build_mllama(name, seed=len(name))


@functools.cache
def drop_in(name: str, backend: str = "torch"):
    return flamingo_fast.from_mllama(hf_model(name), backend=backend)


def max_tiles(name: str) -> int:
    return CONFIGS[name][0]["max_num_tiles"]


@functools.cache
def inputs_of(name: str, prompts: str) -> dict:
    """The fixtures' batches, and "image_last": prompts that end with `<|image|>`, so the last prompt token (whose
    mask row generated tokens see) sees other images than the token before it (another image, or none); the second
    row is shorter (left padding)."""
    rows = [[BOS, 5, ONE, 6, WIDE2], [BOS, 7, 9, ONE]] if prompts == "image_last" \
        else prompt_batches(max_tiles(name))[prompts]
    return batch(rows, max_tiles(name))


def cross_layer_first(name: str) -> bool:
    return 0 in CONFIGS[name][1]["cross_attention_layers"]


def hf_generate(name: str, inputs: dict, **gen) -> torch.Tensor:
    """transformers' generate; uncached where 5.24's cached generate is wrong (the module docstring)."""
    if RELEASE >= 5 and cross_layer_first(name):
        gen = dict(gen, use_cache=False)
    with torch.no_grad():
        return hf_model(name).generate(**inputs, **gen)


def hf_logits(name: str, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(name)(**inputs).logits


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor, attention_mask: torch.Tensor) -> None:
    real = attention_mask.bool()
    assert ours.dtype == FP32 and ours.shape == theirs.shape, f"{ours.dtype} {tuple(ours.shape)}"
    assert_close(ours[real], theirs[real], dtype=FP32)


def assert_same_tokens(got: torch.Tensor, expected: torch.Tensor, prompt_len: int) -> None:
    assert got.dtype == torch.long
    assert torch.equal(got, expected), f"\nours:\n{got[:, prompt_len:]}\ntransformers:\n{expected[:, prompt_len:]}"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompts", PROMPTS)
def test_logits_and_greedy_tokens_equal_transformers(name, prompts):
    """0-4 images of 1-4 tiles, adjacent images, text before the first image, an image first, a text-only row
    beside image rows, left padding; a batch without images."""
    inputs = inputs_of(name, prompts)
    assert_logits_match(drop_in(name)(**inputs).logits, hf_logits(name, inputs), inputs["attention_mask"])
    got = drop_in(name).generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert_same_tokens(got, hf_generate(name, inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
                       inputs["input_ids"].shape[1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beams_equal_transformers(name):
    """Beams sharing their row's prompt and media K/V: num_beams 3, two sequences back, a length penalty."""
    inputs = inputs_of(name, "mixed")
    gen = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, length_penalty=-1.5, do_sample=False)
    assert_same_tokens(drop_in(name).generate(**inputs, **gen), hf_generate(name, inputs, **gen),
                       inputs["input_ids"].shape[1])


def test_sampling_where_the_draws_cannot_differ():
    name = "gqa-llama3-4tiles"
    inputs = inputs_of(name, "mixed")
    for options in (dict(top_k=1, temperature=0.7), dict(top_p=1e-6, top_k=0)):
        gen = dict(max_new_tokens=4, do_sample=True, **options)
        torch.manual_seed(123)
        expected = hf_generate(name, inputs, **gen)
        got = drop_in(name).generate(**inputs, generator=torch.Generator().manual_seed(7), **gen)
        assert_same_tokens(got, expected, inputs["input_ids"].shape[1])


def _hf_warped_probs(name, inputs, sequences, temperature, top_k, top_p) -> torch.Tensor:
    """transformers' sampling distribution at each generated position of `sequences`, teacher-forced: [B, new, V];
    generated tokens see the mask's last row."""
    t = inputs["input_ids"].shape[1]
    new = sequences.shape[1] - t
    cam = inputs["cross_attention_mask"]
    full = dict(inputs, input_ids=sequences,
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, t:])], dim=1),
                cross_attention_mask=torch.cat([cam, cam[:, -1:].expand(-1, new, -1, -1)], dim=1))
    return hf_sampling_probs(hf_logits(name, full)[:, t - 1:-1], sequences, temperature, top_k, top_p)


@pytest.mark.parametrize("per_row", [1, 2])
def test_seeded_sampling_stays_in_transformers_support(per_row):
    """Each draw lies in transformers' warped distribution; with num_return_sequences=2 each row gives 2 samples,
    rows b * 2 + j, each in the distribution of its row's prompt (transformers' expanded batch)."""
    name = "gqa-llama3-4tiles"
    inputs = inputs_of(name, "mixed")
    sampling = dict(temperature=1.5, top_k=8, top_p=0.95)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=True, num_return_sequences=per_row, **sampling)
    runtime = drop_in(name)
    a = runtime.generate(**inputs, generator=torch.Generator().manual_seed(11), **gen)
    b = runtime.generate(**inputs, generator=torch.Generator().manual_seed(11), **gen)
    assert torch.equal(a, b), "the same seed must give the same tokens"
    t = inputs["input_ids"].shape[1]
    expanded = {k: v.repeat_interleave(per_row, dim=0) for k, v in inputs.items()}
    assert a.shape[0] == expanded["input_ids"].shape[0] and torch.equal(a[:, :t], expanded["input_ids"])
    if per_row > 1:
        assert any(not torch.equal(a[r], a[r + 1]) for r in range(0, a.shape[0], per_row)), "the samples agree"
    probs = _hf_warped_probs(name, expanded, a, **sampling)
    greedy = 0
    for row in range(a.shape[0]):
        for step, token in enumerate(a[row, t:].tolist()):
            assert probs[row, step, token] > 0, f"row {row} step {step}: token {token} outside transformers' support"
            greedy += int(token == int(probs[row, step].argmax()))
            if token == EOS:
                break
    assert greedy < a[:, t:].numel(), "every draw was the greedy token: sampling did nothing"
    c = runtime.generate(**inputs, generator=torch.Generator().manual_seed(12), **gen)
    assert not torch.equal(a, c), "a different seed should give different draws"


def test_batch_of_the_installed_image_processor_with_a_trailing_text_only_row():
    """The image processor's own output for a batch whose last row has no image: 5.24 leaves that row out of
    aspect_ratio_ids / aspect_ratio_mask (transformers' forward then fails), 4.57 pads it. The drop-in fills it in
    as 4.57 does: the same logits and tokens as on the padded batch, which transformers runs."""
    name = "gqa-llama3-4tiles"
    rows = [[BOS, 5, 6, WIDE2, 7, ONE, 8], [BOS, 9, 10, 11]]
    padded = batch(rows, 4)
    g = __import__("numpy").random.default_rng(0)  # the images `batch` made, in the same order
    images = [[random_image(g, *WIDE2), random_image(g, *ONE)], []]
    processed = image_processor(4)(images, return_tensors="pt")
    direct = dict(padded, pixel_values=processed["pixel_values"], aspect_ratio_ids=processed["aspect_ratio_ids"],
                  aspect_ratio_mask=processed["aspect_ratio_mask"])
    assert torch.equal(direct["pixel_values"], padded["pixel_values"])
    assert direct["aspect_ratio_ids"].shape[0] == (1 if RELEASE >= 5 else 2)
    if RELEASE >= 5:
        with pytest.raises(Exception):  # noqa: B017  (transformers' own error: a shape mismatch)
            hf_logits(name, direct)
    runtime = drop_in(name)
    ours = runtime(**direct).logits
    assert torch.equal(ours, runtime(**padded).logits)
    assert_logits_match(ours, hf_logits(name, padded), padded["attention_mask"])
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    assert_same_tokens(runtime.generate(**direct, **gen), hf_generate(name, padded, **gen), 7)


@pytest.mark.skipif(RELEASE < 5, reason="transformers 5's cached generate only (4.57 reads each layer's own cache)")
def test_transformers5_cached_generate_with_a_cross_attention_layer_first():
    """5.24 takes the cache length from layer 0: with a cross-attention layer there, a batch with images fails
    (the vision tokens' count taken for the text's) and one without images decodes at the wrong positions. Its
    uncached generate, which the other tests compare with for this config, gives the drop-in's tokens."""
    name = "mha-default-2tiles"
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="size of tensor"):
        hf_model(name).generate(**inputs_of(name, "mixed"), **gen)
    inputs = inputs_of(name, "text_only")
    with torch.no_grad():
        cached = hf_model(name).generate(**inputs, **gen)
    ours = drop_in(name).generate(**inputs, **gen)
    assert not torch.equal(cached, ours)
    assert_same_tokens(ours, hf_generate(name, inputs, **gen), inputs["input_ids"].shape[1])


@interpreter
def test_triton_backend_matches_transformers():
    """The kernels, interpreted on the CPU, on left-padded prompts that end with an image (every-tile tokens before
    the first image, a row with images of 1 and 2 tiles): logits, and beams. The decode step's kernels: the segment
    cross-attention reading a row's K/V for its 2 hypotheses, and in the self-attention layers the fused rotary +
    tail write and the split-KV kernel over each row's prompt range (2 hypotheses at once) and each hypothesis's
    tail, merged by log-sum-exp."""
    name = "gqa-llama3-4tiles"
    inputs = inputs_of(name, "image_last")
    assert not bool(inputs["attention_mask"].all())  # a row with left padding: a prompt range not starting at 0
    runtime = drop_in(name, "triton")
    assert runtime.engine.backend == "triton"
    assert_logits_match(runtime(**inputs).logits, hf_logits(name, inputs), inputs["attention_mask"])
    ops, launches = runtime.engine.ops, []

    def counted(name):
        def launch(*args, **kwargs):
            launches.append((name, kwargs.get("queries_per_row", 1)))
            return getattr(ops, name)(*args, **kwargs)
        return launch

    runtime.engine.ops = dataclasses.replace(ops, decode_attention=counted("decode_attention"),
                                             rotary_kv_write=counted("rotary_kv_write"))
    gen = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    assert_same_tokens(runtime.generate(**inputs, **gen), hf_generate(name, inputs, **gen),
                       inputs["input_ids"].shape[1])
    self_layers = len(runtime.engine.self_slot)
    steps = 2  # the first token comes from the prefill's logits
    assert launches.count(("rotary_kv_write", 1)) == steps * self_layers
    assert launches.count(("decode_attention", 2)) == steps * self_layers  # the prompt part, per row
    assert launches.count(("decode_attention", 1)) == steps * self_layers  # the tails


@interpreter
def test_the_old_decode_switch_puts_the_triton_decode_on_torch(monkeypatch):
    """FLAMINGO_FAST_OLD_DECODE (FastFlamingo's before/after switch) naming either decode kernel: the torch form."""
    for old, kernels in (("", True), ("decode_attention", False), ("rotary_kv_write,fused_projections", False)):
        monkeypatch.setenv("FLAMINGO_FAST_OLD_DECODE", old)
        assert flamingo_fast.from_mllama(hf_model("gqa-llama3-4tiles"), backend="triton").engine.decode_kernels \
            is kernels, old
    assert not drop_in("gqa-llama3-4tiles").engine.decode_kernels  # the torch backend never uses them


def test_tensors_are_the_live_models():
    model, runtime = hf_model("gqa-llama3-4tiles"), drop_in("gqa-llama3-4tiles")
    theirs = {t.data_ptr() for t in model.state_dict().values()}
    ours = list(runtime.engine.reference.state_dict().values())
    assert len(ours) == len(theirs) and all(t.data_ptr() in theirs for t in ours)
    assert dict(runtime.named_parameters()).keys() == dict(model.named_parameters()).keys()


def _bad(inputs: dict, **changes) -> dict:
    return dict(inputs, **changes)


@pytest.mark.parametrize("argument, change", [
    ("input_ids", lambda x: dict(input_ids=x["input_ids"].float())),
    ("attention_mask", lambda x: dict(attention_mask=x["attention_mask"].flip(1))),
    ("attention_mask", lambda x: dict(attention_mask=x["attention_mask"][:, 1:])),
    ("pixel_values", lambda x: dict(pixel_values=x["pixel_values"][:, :, :2])),
    ("cross_attention_mask", lambda x: dict(cross_attention_mask=None)),
    ("cross_attention_mask", lambda x: dict(cross_attention_mask=x["cross_attention_mask"][:, :-1])),
    ("cross_attention_mask", lambda x: dict(cross_attention_mask=x["cross_attention_mask"] * 2)),
    ("aspect_ratio_ids", lambda x: dict(aspect_ratio_ids=x["aspect_ratio_ids"] + 100)),
    ("aspect_ratio_mask", lambda x: dict(aspect_ratio_mask=x["aspect_ratio_mask"][:, :, :1])),
])
def test_bad_inputs_name_the_argument(argument, change):
    inputs = inputs_of("gqa-llama3-4tiles", "mixed")
    bad = dict(inputs, **change(inputs))
    runtime = drop_in("gqa-llama3-4tiles")
    for call in (runtime, functools.partial(runtime.generate, max_new_tokens=2)):
        with pytest.raises(ValueError, match=argument):
            call(**bad)


def test_unsupported_options_are_named():
    inputs = inputs_of("gqa-llama3-4tiles", "single")
    runtime = drop_in("gqa-llama3-4tiles")
    with pytest.raises(ValueError, match="labels"):
        runtime(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="repetition_penalty"):
        runtime.generate(**inputs, repetition_penalty=1.3)


def _hf_candidate_log_likelihood(name: str, inputs: dict, candidate: list[int]) -> torch.Tensor:
    """[B]: sum of log p(candidate[j] | prompt + candidate[:j]) by transformers' forward over prompt + candidate,
    the candidate's tokens seeing the mask's last row (as generated tokens do)."""
    b, t = inputs["input_ids"].shape
    extra = torch.tensor(candidate).expand(b, -1)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1))
    if "cross_attention_mask" in inputs:
        cam = inputs["cross_attention_mask"]
        full["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, len(candidate), -1, -1)], 1)
    logits = hf_logits(name, full)[:, t - 1:-1].log_softmax(-1)
    return logits.gather(-1, extra[..., None])[..., 0].sum(-1)


@pytest.mark.parametrize("prompts", ["mixed", "image_last"])
def test_score_equals_the_per_candidate_loop(prompts):
    """Candidates sharing leading tokens, of 1-4 tokens, one duplicated: each equals transformers' forward over
    the prompt and that candidate alone."""
    name = "gqa-llama3-4tiles"
    inputs = inputs_of(name, prompts)
    candidates = [[5], [5, 6], [5, 6, 7, 8], [9, 10, 11], [5, 6], [12, 13]]
    got = drop_in(name).score(**inputs, candidates=candidates)
    expected = torch.stack([_hf_candidate_log_likelihood(name, inputs, c) for c in candidates], dim=1)
    assert got.shape == (inputs["input_ids"].shape[0], len(candidates)) and got.dtype == FP32
    assert_close(got, expected, dtype=FP32)
    lengths = torch.tensor([len(c) for c in candidates], dtype=FP32)
    normalized = drop_in(name).score(**inputs, candidates=candidates, normalize_length=True)
    assert_close(normalized, expected / lengths, dtype=FP32)


def few_shot(query) -> dict:
    """One row: two demonstrations (a 4-tile and a 3-tile image, each with its caption), then the query image and
    its question; the demonstrations' pixels are the same whatever the query (drawn first from the same seed)."""
    from mllama_fixtures import FOUR, TALL3

    return batch([[BOS, 5, FOUR, 6, 7, TALL3, 8, 9, query, 10, 11]], 4)


def test_image_cache_warm_equals_cold():
    """A second few-shot call with the same demonstrations and another query image encodes only the query: the
    same logits (within the fp32 row) and tokens as a runtime without the cache, and as transformers."""
    name = "gqa-llama3-4tiles"
    warm = flamingo_fast.from_mllama(hf_model(name), backend="torch")
    cold = flamingo_fast.from_mllama(hf_model(name), backend="torch", context_cache_bytes=0)
    first, second = few_shot(ONE), few_shot(WIDE2)
    assert torch.equal(first["pixel_values"][:, :2], second["pixel_values"][:, :2])
    warm(**first)
    hits = warm.engine.cache_stats.image_hits
    logits = warm(**second).logits
    assert warm.engine.cache_stats.image_hits == hits + 2, "the two demonstrations should come from the cache"
    assert cold.engine.cache_stats.images == 0
    assert_close(logits, cold(**second).logits, dtype=FP32)
    assert_logits_match(logits, hf_logits(name, second), second["attention_mask"])
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = hf_generate(name, second, **gen)
    assert_same_tokens(warm.generate(**second, **gen), expected, second["input_ids"].shape[1])
    assert_same_tokens(cold.generate(**second, **gen), expected, second["input_ids"].shape[1])


def test_image_cache_emptied_when_weights_change_in_place():
    name = "gqa-llama3-4tiles"
    model = build_mllama(name, seed=5)
    runtime = flamingo_fast.from_mllama(model, backend="torch")
    inputs = few_shot(ONE)
    before = runtime(**inputs).logits
    with torch.no_grad():
        model.model.vision_model.patch_embedding.weight.mul_(1.5)
        model.model.language_model.layers[1].cross_attn.k_proj.weight.mul_(0.5)
    after = runtime(**inputs).logits
    assert not torch.allclose(before, after, atol=1e-3)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert_logits_match(after, expected, inputs["attention_mask"])


def test_inference_mode_and_autocast_change_nothing():
    """Every call computes in the model's dtype, outside autograd, whatever region the caller is in (modes.py)."""
    name = "gqa-llama3-4tiles"
    runtime = drop_in(name)
    inputs = inputs_of(name, "mixed")
    gen = dict(max_new_tokens=3, do_sample=False)
    logits, ids = runtime(**inputs).logits, runtime.generate(**inputs, **gen)
    with torch.inference_mode():
        assert torch.equal(runtime(**inputs).logits, logits)
        assert torch.equal(runtime.generate(**inputs, **gen), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = runtime(**inputs).logits
        assert out.dtype == FP32 and torch.equal(out, logits)
        assert torch.equal(runtime.generate(**inputs, **gen), ids)
    assert not runtime(**inputs).logits.requires_grad


def test_to_bfloat16_converts_the_shared_tensors():
    """`.to(torch.bfloat16)` converts the live model's tensors in place (the same Parameter objects); the runtime
    follows (its caches are per call, its image cache is emptied) and stays within twice transformers' own bf16
    error against the float64 model."""
    import copy

    from helpers import assert_within_torch_error

    name = "gqa-llama3-4tiles"
    model = build_mllama(name, seed=7)
    inputs = inputs_of(name, "single")
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(**dict(inputs, pixel_values=inputs["pixel_values"].double())).logits
    runtime = flamingo_fast.from_mllama(model, backend="torch")
    runtime(**inputs)  # fills the image cache in float32
    weight = model.lm_head.weight
    assert runtime.to(torch.bfloat16) is runtime
    assert model.lm_head.weight is weight and weight.dtype == torch.bfloat16
    ours = runtime(**inputs).logits
    with torch.no_grad():
        theirs = model(**dict(inputs, pixel_values=inputs["pixel_values"].bfloat16())).logits
    real = inputs["attention_mask"].bool()
    assert_within_torch_error(ours[real], exact[real], theirs[real].float(), torch.bfloat16)


def _lm_linears(model) -> list[torch.nn.Linear]:
    """The Linears weights="int8" quantizes in a transformers Mllama model: every Linear of the language model's
    layers, and the output head."""
    layers = model.model.language_model.layers
    return [m for m in layers.modules() if type(m) is torch.nn.Linear] + [model.lm_head]


def _with_weights(model, rounding):
    """A copy of `model` whose quantized Linears hold rounding(weight) -> (copy, ||w - rounding(w)|| / ||w||)."""
    import copy

    from helpers import weight_rounding_error

    copied = copy.deepcopy(model)
    linears = _lm_linears(copied)
    eps = weight_rounding_error([m.weight for m in linears], rounding)
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(rounding(m.weight))
    return copied, eps


def test_int8_weights_against_transformers():
    """from_mllama(model, weights="int8"), fp32 activations: the live model unchanged; the logits equal transformers'
    on the dequantized weights (fp32 row) and are within the int8 row of the original's (helpers.py: the bound from
    the same logits with the weights rounded to bf16); greedy tokens equal the dequantized model's; the int8 copy
    holds none of the quantized float weights."""
    from helpers import bf16_rounded, dequantized, int8_relative_bound, relative_error

    name = "gqa-llama3-4tiles"
    model = hf_model(name)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    runtime = flamingo_fast.from_mllama(model, backend="torch", weights="int8")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    quantized = {m.weight.untyped_storage().data_ptr() for m in _lm_linears(model)}
    held = [*runtime.engine.reference.parameters(), *runtime.engine.reference.buffers()]
    assert not [t for t in held if t.untyped_storage().data_ptr() in quantized]
    dequant, eps_int8 = _with_weights(model, dequantized)
    bf16, eps_bf16 = _with_weights(model, bf16_rounded)
    names = ("mixed", "single", "image_last")
    real = {p: inputs_of(name, p)["attention_mask"].bool() for p in names}
    with torch.no_grad():
        def logits_of(m):
            return torch.cat([m(**inputs_of(name, p)).logits[real[p]] for p in names])
        ours, expected, original, rounded = logits_of(runtime), logits_of(dequant), logits_of(model), logits_of(bf16)
    assert_close(ours, expected, dtype=FP32)
    bound = int8_relative_bound(relative_error(rounded, original), eps_int8, eps_bf16)
    assert relative_error(ours, original) <= bound
    inputs = inputs_of(name, "mixed")
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        expected_ids = dequant.generate(**inputs, **gen)
    assert_same_tokens(runtime.generate(**inputs, **gen), expected_ids, inputs["input_ids"].shape[1])


def test_generation_config_and_a_missing_attention_mask_as_transformers():
    """Options the call leaves out come from the model's generation_config (read when the drop-in is built), and a
    missing attention_mask is inferred from the pad token, as transformers' generate does."""
    name = "gqa-llama3-4tiles"
    model = build_mllama(name, seed=len(name))  # its own: the generation_config is changed
    model.generation_config.max_new_tokens, model.generation_config.num_beams = 4, 2
    runtime = flamingo_fast.from_mllama(model, backend="torch")
    inputs = dict(inputs_of(name, "mixed"))
    inputs.pop("attention_mask")
    with torch.no_grad():
        expected = model.generate(**inputs)
    got = runtime.generate(**inputs)
    assert got.shape[1] == inputs["input_ids"].shape[1] + 4
    assert_same_tokens(got, expected, inputs["input_ids"].shape[1])


@pytest.mark.parametrize("written_by", ["4.57.0", "4.45.0"])
def test_a_generation_config_passed_to_generate_as_transformers_merges_it(written_by):
    """generate(generation_config=...) replaces the model's config; its unset entries come from the model's, in 5.x
    always, in 4.x only when the model's config was written by 4.50 or later (4.x's legacy path: then the length is
    transformers' default, 20 new tokens, not the model's 4)."""
    name = "gqa-llama3-4tiles"
    model = build_mllama(name, seed=len(name))
    model.generation_config.max_new_tokens = 4
    model.generation_config.transformers_version = written_by
    runtime = flamingo_fast.from_mllama(model, backend="torch")
    inputs = inputs_of(name, "mixed")
    call = transformers.GenerationConfig(num_beams=3)
    with torch.no_grad():
        expected = model.generate(**inputs, generation_config=call)
    got = runtime.generate(**inputs, generation_config=call)
    merged = RELEASE >= 5 or written_by >= "4.50"
    assert got.shape[1] == inputs["input_ids"].shape[1] + (4 if merged else 20)
    assert_same_tokens(got, expected, inputs["input_ids"].shape[1])
    with pytest.raises(ValueError, match=r"^generation_config: repetition_penalty=1.3 not supported"):
        runtime.generate(**inputs, generation_config=transformers.GenerationConfig(repetition_penalty=1.3))
    with pytest.raises(ValueError, match=r"generation_config=\{'num_beams': 2\}: expected a transformers "):
        runtime.generate(**inputs, generation_config={"num_beams": 2})


def test_bad_options_name_the_option(monkeypatch):
    model = hf_model("gqa-llama3-4tiles")
    for options, named in ((dict(backend="cuda"), "backend"), (dict(stop_check_interval=0), "stop_check_interval"),
                           (dict(context_cache_bytes=-1), "context_cache_bytes"), (dict(weights="int4"), "weights")):
        with pytest.raises(ValueError, match=named):
            flamingo_fast.from_mllama(model, **options)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='triton'"):
            flamingo_fast.from_mllama(model, backend="triton")


def test_ddp_cpu_form_wraps_without_changing_a_result(tmp_path):
    """DistributedDataParallel over the drop-in (gloo, one process, a file store): `.module` is the drop-in, its
    generate (beams) and forward give the unwrapped drop-in's results, and DDP's own forward too; the parameters,
    buffers and state_dict are the live model's (the same names and objects, requires_grad flags included), and
    stay so under DDP (its state_dict: the same tensors under `module.`)."""
    import torch.distributed as dist

    name = "gqa-llama3-4tiles"
    model = build_mllama(name, seed=9)  # its own: DDP registers hooks on the parameters
    model.requires_grad_(False)
    model.model.language_model.requires_grad_(True)  # something trainable (DDP refuses a model with nothing)
    runtime = flamingo_fast.from_mllama(model, backend="torch")
    ours, theirs = dict(runtime.named_parameters()), dict(model.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[n] is theirs[n] for n in ours)
    assert [n for n, p in ours.items() if p.requires_grad] == [n for n, p in theirs.items() if p.requires_grad]
    buffers, their_buffers = dict(runtime.named_buffers()), dict(model.named_buffers())
    assert buffers and buffers.keys() == their_buffers.keys() and all(buffers[n] is their_buffers[n] for n in buffers)
    state = runtime.state_dict()
    assert state.keys() == model.state_dict().keys()
    inputs = inputs_of(name, "mixed")
    gen = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    expected, logits = runtime.generate(**inputs, **gen), runtime(**inputs).logits
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(runtime)
        assert ddp.module is runtime
        assert torch.equal(ddp.module.generate(**inputs, **gen), expected)
        assert torch.equal(ddp.module(**inputs).logits, logits)
        with torch.no_grad():
            assert torch.equal(ddp(**inputs).logits, logits)  # DDP's own forward
        wrapped = ddp.state_dict()
        assert wrapped.keys() == {f"module.{k}" for k in state}
        assert all(wrapped[f"module.{k}"].data_ptr() == v.data_ptr() for k, v in state.items())
    finally:
        dist.destroy_process_group()
