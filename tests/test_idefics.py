"""The IDEFICS v1 drop-in (`flamingo_fast.from_idefics`) against transformers' real
`IdeficsForVisionText2Text`: tiny models built offline from configs with EVERY parameter random (the default zero
alphas would switch the gated blocks off), prompts through the real `IdeficsProcessor` with a tokenizer built
locally (tests/idefics_fixtures.py). Runs where transformers is installed (`make test-openflamingo`'s
.venv-openflamingo, transformers 4.57, and `make test-transformers5`'s .venv-transformers5, 5.24); skipped elsewhere.

Conventions:
- logits are compared at real tokens only (a padding position's output is unused; transformers gives pads the
  position 1 in forward and 0 in 5.x generate, flamingo_fast need not match either);
- transformers' generate is called through `hf_generate` (fixtures), which only widens `config.vocab_size` to the
  logits' width during the call: 4.57's beam search otherwise fails on every IDEFICS model with additional rows;
- sampling: Hugging Face draws with `torch.multinomial` on the global RNG, flamingo_fast with an exponential race
  on a `generator`, so seeded draws cannot be compared one to one. They are compared where the draws cannot
  matter (top_k=1, a tiny top_p, a tiny temperature: one token has all the mass), and otherwise every sampled
  token must lie in the support of Hugging Face's own warped distribution (teacher-forced), with the same seed
  giving the same tokens and the draws really departing from greedy.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_close, hf_sampling_probs, interpreter, relative_error

transformers = pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from idefics_fixtures import (  # noqa: E402
    EOS,
    FAKE,
    IMAGE,
    PAD,
    build_idefics,
    build_processor,
    expected_image_index,
    hf_generate,
    process,
    prompt_batches,
)
from int8_real_models import assert_greedy_agrees_where_safe, held_tensors, int8_bound  # noqa: E402

import flamingo_fast  # noqa: E402

FP32 = torch.float32
NEW_TOKENS = 8
# One place for the runtime's capacity options (FastFlamingo.from_reference's names).
RUNTIME_OPTIONS = dict(max_batch_size=4, max_seq_len=64)

# (name, build_idefics kwargs): every interval, qk norms on and off (gated blocks and perceiver independently),
# scalar and per-channel alphas, 3 and 5 latents (never 64), more decoupled rows than the config says.
CONFIGS = {
    "every1-qk-float-3lat": dict(cross_layer_interval=1, qk_layer_norms=True, qk_layer_norms_perceiver=True,
                                 alpha_type="float", num_latents=3, seed=1),
    "every2-noqk-vector-5lat": dict(cross_layer_interval=2, qk_layer_norms=False, qk_layer_norms_perceiver=False,
                                    alpha_type="vector", num_latents=5, seed=2),
    "every4-qk-vector-3rows": dict(cross_layer_interval=4, qk_layer_norms=True, qk_layer_norms_perceiver=False,
                                   alpha_type="vector", num_latents=5, additional_rows=3, seed=3),
    "every4-8layers-float-pqk": dict(cross_layer_interval=4, num_hidden_layers=8, qk_layer_norms=False,
                                     qk_layer_norms_perceiver=True, alpha_type="float", num_latents=3, seed=4),
}
ENGINES = ["reference", "fast"]


@pytest.fixture(scope="module")
def processor():
    return build_processor(additional_rows=3)


@pytest.fixture(scope="module")
def batches(processor):
    return {name: process(processor, prompts) for name, prompts in prompt_batches(seed=0).items()}


@functools.cache
def hf_model(name: str, head_scale: float = 3.0):
    """One live model per configuration for the whole module (both engines share it, as they share its tensors;
    tests that change weights build their own)."""
    return build_idefics(**CONFIGS[name], head_scale=head_scale)


_HF_OUTPUTS: dict = {}


def cached(kind: str, model, batch: str, inputs, **gen):
    """transformers' logits or generate output for (model, batch, options), computed once per module."""
    key = (id(model), kind, batch, tuple(sorted(gen.items())))
    if key not in _HF_OUTPUTS:
        _HF_OUTPUTS[key] = hf_logits(model, inputs) if kind == "logits" else hf_generate(model, inputs, **gen)
    return _HF_OUTPUTS[key]


def runtime_for(model, engine: str, backend: str = "torch", **options):
    """engine="reference" takes no runtime options (the eager reference has no capacities or backends)."""
    if engine == "reference":
        return flamingo_fast.from_idefics(model, engine="reference")
    return flamingo_fast.from_idefics(model, engine=engine, backend=backend, **{**RUNTIME_OPTIONS, **options})


def hf_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def compare_logits(model, runtime, inputs, batch: str | None = None) -> None:
    out = runtime(**inputs)
    expected = cached("logits", model, batch, inputs) if batch else hf_logits(model, inputs)
    assert out.logits.dtype == FP32
    real = inputs["attention_mask"].bool()
    assert out.logits.shape == expected.shape, f"{tuple(out.logits.shape)} != {tuple(expected.shape)}"
    assert_close(out.logits[real], expected[real], dtype=FP32)


def compare_generate(model, runtime, inputs, batch: str | None = None, **gen) -> torch.Tensor:
    expected = cached("generate", model, batch, inputs, **gen) if batch else hf_generate(model, inputs, **gen)
    got = runtime.generate(**inputs, **gen)
    new = inputs["input_ids"].shape[1]
    assert got.dtype == torch.long
    assert torch.equal(got, expected), f"{gen}\nours:\n{got[:, new:]}\ntransformers:\n{expected[:, new:]}"
    return got


# ------------------------------------------------------------------------------------------------ fixtures


def test_processor_masks_follow_the_idefics_rule(batches):
    """The fixtures exercise what they claim: the processor's image_attention_mask is the latest `<image>`, none
    after a `</s>` until the next image; the batches hold left padding, adjacent images, a text-only row, a
    `</s>` inside a prompt, and a prompt whose last token sees no image."""
    mixed = batches["mixed"]
    ids, iam = mixed["input_ids"], mixed["image_attention_mask"]
    index = expected_image_index(ids)
    assert torch.equal(torch.where(iam.bool().any(-1), iam.float().argmax(-1), -1), index)
    assert (mixed["attention_mask"][:, 0] == 0).any(), "left padding"
    adjacent = (ids[:, :-2] == IMAGE) & (ids[:, 1:-1] == FAKE) & (ids[:, 2:] == IMAGE)
    assert adjacent.any(), "adjacent images: <image><fake_token_around_image><image>"
    assert len(set((ids == IMAGE).sum(1).tolist())) > 2, "rows with different image counts"
    assert (iam.sum((1, 2)) == 0).any(), "a text-only row"
    assert ((ids == EOS) & mixed["attention_mask"].bool()).any(), "a </s> inside a prompt"
    last = batches["eod_last"]["image_attention_mask"][:, -1]
    assert last[0].sum() == 0, "eod_last row 0: the last prompt token (after a </s>) sees no image"
    assert last[1].sum() == 1, "eod_last row 1: the prompt ends with </s>, which still sees its image"
    assert batches["text_only"]["image_attention_mask"].dtype == torch.bool  # the processor's text-only form


# ----------------------------------------------------------------------------------------- logits, tokens


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_tokens_match_transformers(name, engine, batches):
    model = hf_model(name)
    runtime = runtime_for(model, engine)
    for batch in ("mixed", "single", "text_only", "eod_last"):
        compare_logits(model, runtime, batches[batch], batch)
    for batch in ("mixed", "single", "eod_last"):
        compare_generate(model, runtime, batches[batch], batch, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["every1-qk-float-3lat", "every4-qk-vector-3rows"])
def test_beam_search_matches_transformers(name, engine, batches):
    """num_beams=3, length_penalty=-2.0 (what IDEFICS' evaluation uses), on a left-padded batch with different
    image counts and on one row; a sharper output head gives fewer near-ties between beams."""
    model = hf_model(name, head_scale=6.0)
    runtime = runtime_for(model, engine)
    differs = False
    for batch in ("mixed", "single"):
        got = compare_generate(model, runtime, batches[batch], batch, max_new_tokens=6, num_beams=3,
                               length_penalty=-2.0, do_sample=False)
        greedy = cached("generate", model, batch, batches[batch], max_new_tokens=6, do_sample=False)
        differs |= not torch.equal(got, greedy)
    assert differs, "beam search gave the greedy tokens everywhere: this test would not see a broken search"


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_where_the_draws_cannot_differ(engine, batches):
    """do_sample=True with one token holding all the mass (top_k=1, a tiny top_p, a tiny temperature): the
    tokens equal transformers' sampled tokens whatever the generators."""
    model = hf_model("every2-noqk-vector-5lat")
    runtime = runtime_for(model, engine)
    inputs = batches["mixed"]
    for options in (dict(top_k=1, temperature=0.7), dict(top_p=1e-6, top_k=0), dict(temperature=1e-4, top_k=0)):
        gen = dict(max_new_tokens=NEW_TOKENS, do_sample=True, **options)
        torch.manual_seed(123)
        expected = hf_generate(model, inputs, **gen)
        got = runtime.generate(**inputs, generator=torch.Generator().manual_seed(7), **gen)
        assert torch.equal(got, expected), f"{options}\n{got}\n{expected}"


def _hf_warped_probs(model, inputs, sequences, temperature, top_k, top_p) -> torch.Tensor:
    """transformers' own sampling distribution at each generated position of `sequences`, teacher-forced:
    [B, new, V]. Generated tokens see the last prompt row of the image mask."""
    T = inputs["input_ids"].shape[1]
    new = sequences.shape[1] - T
    iam = inputs["image_attention_mask"]
    full = dict(inputs, input_ids=sequences,
                attention_mask=torch.cat([inputs["attention_mask"],
                                          torch.ones_like(sequences[:, T:])], dim=1),
                image_attention_mask=torch.cat([iam, iam[:, -1:].expand(-1, new, -1)], dim=1))
    return hf_sampling_probs(hf_logits(model, full)[:, T - 1:-1], sequences, temperature, top_k, top_p)


@pytest.mark.parametrize("engine", ENGINES)
def test_seeded_sampling_stays_in_transformers_support(engine, batches):
    """Temperature, top-k and top-p together: each sampled token (up to the row's first `</s>`) has nonzero
    probability under transformers' warped distribution; the same generator seed gives the same tokens, and the
    draws are not simply greedy."""
    model = hf_model("every1-qk-float-3lat")
    runtime = runtime_for(model, engine)
    inputs = batches["mixed"]
    sampling = dict(temperature=1.3, top_k=6, top_p=0.9)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=True, **sampling)
    a = runtime.generate(**inputs, generator=torch.Generator().manual_seed(11), **gen)
    b = runtime.generate(**inputs, generator=torch.Generator().manual_seed(11), **gen)
    assert torch.equal(a, b), "the same seed must give the same tokens"
    T = inputs["input_ids"].shape[1]
    probs = _hf_warped_probs(model, inputs, a, **sampling)
    greedy_steps = 0
    for row in range(a.shape[0]):
        for step, token in enumerate(a[row, T:].tolist()):
            p = probs[row, step]
            assert p[token] > 0, f"row {row} step {step}: token {token} is outside transformers' support"
            greedy_steps += int(token == int(p.argmax()))
            if token == EOS:
                break
    assert greedy_steps < a[:, T:].numel(), "every draw was the greedy token: sampling did nothing"
    c = runtime.generate(**inputs, generator=torch.Generator().manual_seed(12), **gen)
    assert not torch.equal(a, c), "a different seed should give different draws"


# ---------------------------------------------------------------------------------------- Triton backend


@interpreter
def test_triton_backend_matches_transformers(batches):
    """The fast path's Triton kernels (interpreted on the CPU), small shapes: logits and greedy tokens."""
    model = hf_model("every2-noqk-vector-5lat")
    runtime = runtime_for(model, "fast", backend="triton")
    compare_logits(model, runtime, batches["eod_last"], "eod_last")
    compare_generate(model, runtime, batches["eod_last"], "eod_last", max_new_tokens=3, do_sample=False)


@interpreter
def test_triton_backend_with_qk_norms_and_scalar_gates(batches):
    model = hf_model("every1-qk-float-3lat")
    runtime = runtime_for(model, "fast", backend="triton")
    compare_logits(model, runtime, batches["single"], "single")


# --------------------------------------------------------------------------------- sharing, API, errors


def test_tensors_are_shared_not_copied(batches):
    """Every matrix, embedding and the latents of the live model back the runtime's reference (same storage),
    and an in-place change to the live model reaches both engines' outputs."""
    model = build_idefics(**CONFIGS["every4-qk-vector-3rows"])
    runtime = runtime_for(model, "fast")
    assert isinstance(runtime.reference, flamingo_fast.Flamingo)
    assert runtime.fast is not None
    ours = {t.untyped_storage().data_ptr()
            for t in list(runtime.reference.parameters()) + list(runtime.reference.buffers())}
    unused = {"model.vision_model.post_layernorm.weight"}  # IDEFICS reads the unnormalised last layer
    missing = [name for name, p in model.named_parameters()
               if p.dim() >= 2 and name not in unused and p.untyped_storage().data_ptr() not in ours]
    assert not missing, f"copied, not shared: {missing}"
    with torch.no_grad():  # after the runtime is built: a copy would not see this
        model.lm_head.additional_fc.weight[0].mul_(-2.0)
        model.model.gated_cross_attn_layers[0].cross_attn.v_proj.weight.mul_(1.5)
        model.model.perceiver_resampler.latents.add_(0.5)
    compare_logits(model, runtime, batches["mixed"])
    compare_logits(model, runtime_for(model, "reference"), batches["mixed"])


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_returns_prompt_plus_new_tokens_and_pads_finished_rows(engine, batches):
    """Rows that produce `</s>` early are padded with pad_token_id, as transformers does; the prompt is returned
    unchanged in front."""
    model = hf_model("every1-qk-float-3lat")
    runtime = runtime_for(model, engine)
    inputs = batches["mixed"]
    free = runtime.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS,
                            pad_token_id=PAD)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(free[:, :T], inputs["input_ids"])
    stop = int(free[1, T + 2])  # a token the second row produces: rows stop at different steps
    compare_generate(model, runtime, inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop,
                     pad_token_id=PAD)


def test_interval_that_does_not_divide_the_layers_is_a_clear_error():
    """transformers builds this model but its forward fails with an IndexError at the last gated block."""
    model = build_idefics(cross_layer_interval=3, seed=5)  # 4 layers
    with pytest.raises(ValueError, match="cross_layer_interval"):
        flamingo_fast.from_idefics(model, engine="fast", backend="torch")


def test_without_resampler_is_supported_or_a_clear_error(batches):
    """use_resampler=False: the gated blocks read all the vision tokens (CLS included) directly."""
    model = build_idefics(use_resampler=False, seed=6, num_latents=3)
    try:
        runtime = runtime_for(model, "fast")
    except ValueError as error:
        assert "use_resampler" in str(error)
        return
    compare_logits(model, runtime, batches["mixed"])
    compare_generate(model, runtime, batches["mixed"], max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("rope_type", ["default", "linear"])
def test_rope_parameters_as_the_installed_transformers_reads_them(rope_type, batches):
    """A config with rope_parameters (base 500, not the usual 10000), as transformers 5 writes it: 5.x's IDEFICS
    rotates with them, and a scaled type there is a named error; 4.x's ignores them (its base is 10000 whatever
    the config says: a config.json saved by 5.x, loaded by 4.x). The drop-in computes the live model's logits."""
    scaling = {"factor": 2.0} if rope_type == "linear" else {}
    model = build_idefics(seed=8, rope_parameters={"rope_theta": 500.0, "rope_type": rope_type, **scaling})
    reads_config = not hasattr(model.model.layers[0].self_attn.rotary_emb, "base")  # transformers 5
    if reads_config and rope_type != "default":
        with pytest.raises(ValueError, match=r"model.config: rope_parameters\['rope_type'\]='linear' is not "
                                             r"supported .*; expected 'default'"):
            runtime_for(model, "fast")
        return
    runtime = runtime_for(model, "fast")
    assert runtime.config.lm.rope_theta == (500.0 if reads_config else 10000.0)
    compare_logits(model, runtime, batches["mixed"])


def test_unknown_alpha_shape_is_a_clear_error():
    model = build_idefics(alpha_type="vector", seed=7)
    block = model.model.gated_cross_attn_layers[0]
    block.alpha_cross_attn = torch.nn.Parameter(torch.ones(2, 64), requires_grad=False)
    with pytest.raises(ValueError, match="alpha"):
        flamingo_fast.from_idefics(model, engine="fast", backend="torch")


def test_mask_where_a_token_sees_several_images(batches):
    """The processor never makes such a mask but the model accepts it: a dense fallback gives transformers'
    logits, or the runtime refuses it clearly."""
    model = hf_model("every2-noqk-vector-5lat")
    inputs = dict(batches["single"])
    iam = inputs["image_attention_mask"].clone()
    iam[0, -4:, :] = 1  # the last four tokens see all three images
    inputs["image_attention_mask"] = iam
    runtime = runtime_for(model, "fast")
    try:
        runtime(**inputs)
    except ValueError as error:
        assert "image_attention_mask" in str(error)
        return
    compare_logits(model, runtime, inputs)


def test_eval_mode_and_config_are_read_from_the_model():
    """The runtime reads the interval, latents and decoupled rows from the model, not from defaults; a model in
    training mode is refused, never switched."""
    model = hf_model("every4-8layers-float-pqk")
    runtime = runtime_for(model, "reference")
    config = runtime.reference.config
    assert config.cross_attn_every_n_layers == 4
    assert config.perceiver.num_latents == 3
    training = build_idefics(**CONFIGS["every2-noqk-vector-5lat"]).train()
    with pytest.raises(ValueError, match=r"model: in training mode \(model, .*\); expected a model in eval mode"):
        flamingo_fast.from_idefics(training)
    assert training.training


def hf_scores(model, inputs, candidates) -> torch.Tensor:
    """[B, C]: each candidate's log-likelihood after every row from transformers' forward over prompt + candidate (the
    candidate's tokens see what the last prompt token sees, as generated tokens do)."""
    batch = inputs["input_ids"].shape[0]
    expected = torch.empty(batch, len(candidates))
    for c, candidate in enumerate(candidates):
        tokens = torch.tensor(candidate).expand(batch, -1)
        n = len(candidate)
        extended = dict(inputs, input_ids=torch.cat([inputs["input_ids"], tokens], 1),
                        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1),
                        image_attention_mask=torch.cat([inputs["image_attention_mask"],
                                                        inputs["image_attention_mask"][:, -1:].expand(-1, n, -1)], 1))
        log_probs = torch.log_softmax(hf_logits(model, extended).float(), dim=-1)[:, -n - 1:-1]
        expected[:, c] = log_probs.gather(2, tokens[:, :, None]).squeeze(-1).sum(dim=1)
    return expected


def test_score_and_warm_context_match_transformers(batches):
    """Rank classification: each candidate's log-likelihood after every row equals what transformers' forward
    gives over prompt + candidate (the candidate's tokens see what the last prompt token sees, as generated tokens
    do); and a second generate, its contexts now cached, still gives transformers' tokens."""
    model = hf_model("every2-noqk-vector-5lat")
    runtime = runtime_for(model, "fast")
    inputs = batches["mixed"]
    candidates = [[5], [7, 9], [11, FAKE, 12]]
    scores = runtime.score(**inputs, candidates=candidates)
    assert_close(scores, hf_scores(model, inputs, candidates), dtype=FP32)
    for _ in range(2):  # cold, then with every row's context cached
        compare_generate(model, runtime, inputs, "mixed", max_new_tokens=NEW_TOKENS, do_sample=False)
    assert runtime.fast.context_cache_stats().context_hits > 0


def test_fused_projections_move_the_live_models_weights(batches):
    """The runtime's fused q/k/v and gate/up weights: the live model's own Parameters become views of them (one
    storage per layer's q/k/v), so memory does not grow and transformers' forward still gives what it gave."""
    model = build_idefics(**CONFIGS["every2-noqk-vector-5lat"])
    expected = hf_logits(model, batches["mixed"])
    runtime = runtime_for(model, "fast")
    assert "fused_projections" in runtime.fast.decode_paths
    attn = model.model.layers[1].self_attn
    storages = {p.untyped_storage().data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)}
    assert len(storages) == 1
    real = batches["mixed"]["attention_mask"].bool()
    assert torch.equal(hf_logits(model, batches["mixed"])[real], expected[real])
    compare_logits(model, runtime, batches["mixed"])


def test_live_weight_changes_reach_the_warm_context_cache(batches):
    """The drop-in shares the live model's tensors: after an in-place update (what optimizer.step() writes) and after
    the live model's own load_state_dict, a call whose contexts and images were cached gives transformers' logits
    for the weights as they are now."""
    model = build_idefics(**CONFIGS["every2-noqk-vector-5lat"])
    runtime = runtime_for(model, "fast")
    inputs = batches["mixed"]
    for _ in range(2):
        runtime.generate(**inputs, max_new_tokens=1)
    assert runtime.fast.context_cache_stats().context_hits > 0
    other = build_idefics(**{**CONFIGS["every2-noqk-vector-5lat"], "seed": 9}).state_dict()
    trained = [*model.model.perceiver_resampler.parameters(), *model.model.gated_cross_attn_layers.parameters()]

    def step():
        with torch.no_grad():
            torch._foreach_add_(trained, [0.02 * torch.randn(p.shape) for p in trained])

    for update in (step, lambda: model.load_state_dict(other)):
        update()
        _, logits = runtime.generate(**inputs, max_new_tokens=1, return_logits=True)
        assert_close(logits[:, 0], hf_logits(model, inputs)[:, -1], dtype=FP32)


def test_batch_without_attention_mask_as_transformers(batches):
    """No attention_mask: transformers' generate infers it from the pad token (the processor's, 0) when the pad
    occurs in the ids and is not a stop token, else takes every token as real (pad_token_id=</s>); the drop-in does
    the same."""
    model = hf_model("every2-noqk-vector-5lat")
    runtime = runtime_for(model, "fast")
    inputs = {k: v for k, v in batches["mixed"].items() if k != "attention_mask"}
    for call in ({}, {"pad_token_id": EOS}):
        compare_generate(model, runtime, inputs, max_new_tokens=4, **call)


def test_generation_config_fields_as_transformers_applies_them(batches):
    """Each field that matters, set on the model's generation_config (read when the drop-in is built), against
    transformers' generate with no option in the call: max_length counts the prompt and yields to max_new_tokens;
    num_beams, length_penalty, eos_token_id, pad_token_id and min_new_tokens apply (transformers' generate is the
    model's own: nothing overrides them); do_sample samples."""
    import copy

    model = build_idefics(**CONFIGS["every1-qk-float-3lat"])
    inputs = batches["mixed"]
    prompt = inputs["input_ids"].shape[1]
    saved = model.generation_config
    greedy = runtime_for(model, "fast").generate(**inputs, max_new_tokens=4, eos_token_id=[])
    stop = int(greedy[1, prompt + 1])  # row 1's second token
    cases = [
        {"max_length": prompt + 3},
        {"max_length": prompt + 9, "max_new_tokens": 2},
        {"num_beams": 3, "max_new_tokens": 3},
        {"num_beams": 2, "length_penalty": -2.0, "max_new_tokens": 3},
        {"eos_token_id": stop, "pad_token_id": 7, "max_new_tokens": 4},
        {"eos_token_id": stop, "min_new_tokens": 3, "max_new_tokens": 4},
    ]
    try:
        for fields in cases:
            model.generation_config = copy.deepcopy(saved)
            for name, value in fields.items():
                setattr(model.generation_config, name, value)
            compare_generate(model, runtime_for(model, "fast"), inputs)
        model.generation_config = copy.deepcopy(saved)
        model.generation_config.do_sample, model.generation_config.max_new_tokens = True, 6
        runtime = runtime_for(model, "fast")
        draws = {tuple(runtime.generate(**inputs, generator=torch.Generator().manual_seed(s)).flatten().tolist())
                 for s in range(3)}
        assert len(draws) > 1
    finally:
        model.generation_config = saved


def test_unsupported_call_options_are_named(batches):
    """Precomputed image embeddings and options flamingo_fast does not implement are errors naming them, in
    forward and generate; their defaults pass."""
    model = hf_model("every1-qk-float-3lat")
    runtime = runtime_for(model, "fast")
    inputs = batches["single"]
    latents = torch.zeros(1, 3, 3, model.config.vision_config.embed_dim)
    with pytest.raises(ValueError, match=r"forward options \['perceiver_embeddings'\]: not supported"):
        runtime(**inputs, perceiver_embeddings=latents)
    with pytest.raises(ValueError, match=r"forward options \['labels'\]: not supported"):
        runtime(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"generate options \['image_encoder_embeddings'\]: not supported"):
        runtime.generate(**inputs, image_encoder_embeddings=latents, max_new_tokens=2)
    runtime(**inputs, perceiver_embeddings=None, interpolate_pos_encoding=False)
    runtime.generate(**inputs, perceiver_embeddings=None, max_new_tokens=2)


# --------------------------------------------------------------------------------------------- weights="int8"
# The int8 drop-in against transformers' model, with the int8 bound derived on that model and prompt, and the
# wiring checked apart (tests/int8_real_models.py says how).


def quantized_linears(model) -> list[torch.nn.Linear]:
    """The layers from_idefics(weights="int8") quantizes, on transformers' IDEFICS: every Linear of its decoder layers
    and gated cross-attention blocks, and the output head's two parts (quantized as one matrix, one scale per row:
    the same as apart)."""
    found = [m for part in (model.model.layers, model.model.gated_cross_attn_layers) for m in part.modules()
             if type(m) is torch.nn.Linear]
    head = model.lm_head
    return [*found, head, *([head.additional_fc] if head.out_additional_features > 0 else [])]


@pytest.mark.parametrize("name", ["every1-qk-float-3lat", "every4-qk-vector-3rows"])
def test_int8_drop_in_against_transformers(name, batches):
    """from_idefics(model, weights="int8"), fp32 activations: the live model left as it was and none of its quantized
    weights held; over every batch, the logits equal transformers' model on the dequantized weights (fp32 table) and
    are within the derived int8 bound of the original's; greedy tokens equal the original's where the margin allows
    (agreement over all new tokens printed); score gives the dequantized model's log-likelihoods; beam search
    (num_beams=3, length_penalty=-2.0, as IDEFICS' evaluation) gives transformers' tokens on the dequantized
    weights."""
    model = build_idefics(**CONFIGS[name])  # not hf_model's: a broken build must not reach the other tests
    before = {n: (t, t.untyped_storage().data_ptr(), t.detach().clone())
              for n, t in model.state_dict(keep_vars=True).items()}
    drop_in = runtime_for(model, "fast", weights="int8")
    after = model.state_dict(keep_vars=True)
    changed = [n for n, t in after.items() if t is not before[n][0] or t.untyped_storage().data_ptr() != before[n][1]
               or not torch.equal(t, before[n][2])]
    assert after.keys() == before.keys() and not changed, f"the live model changed: {changed[:5]}"
    linears = quantized_linears(model)
    assert drop_in.fast.weight_bytes()["int8"] == sum(m.weight.numel() for m in linears)  # the list is the right one
    quantized = {m.weight.untyped_storage().data_ptr() for m in linears}
    assert not [t for t in held_tensors(drop_in) if t.untyped_storage().data_ptr() in quantized]

    names = ("mixed", "single", "text_only", "eod_last")
    bound, eps_int8, expected, dequant_model = int8_bound(
        model, quantized_linears,
        lambda m: torch.cat([m(**batches[b]).logits[batches[b]["attention_mask"].bool()] for b in names]))
    logits = torch.cat([drop_in(**batches[b]).logits[batches[b]["attention_mask"].bool()] for b in names])
    with torch.no_grad():
        assert_close(logits, torch.cat([dequant_model(**batches[b]).logits[batches[b]["attention_mask"].bool()]
                                        for b in names]), dtype=FP32)
    rel = relative_error(logits, expected)
    print(f"{name}: logits rel err int8 {rel:.3g} (bound {bound:.3g}); weights rel err int8 {eps_int8:.3g}")
    assert rel <= bound

    inputs = batches["mixed"]
    prompt = inputs["input_ids"].shape[1]
    out = hf_generate(model, inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], output_logits=True,
                      return_dict_in_generate=True)
    new = drop_in.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[])[:, prompt:]
    ref_new = out.sequences[:, prompt:]
    assert_greedy_agrees_where_safe(new, ref_new, torch.stack(out.logits, dim=1), bound, name)

    candidates = [[5], [7, 9], [11, FAKE, 12]]
    assert_close(drop_in.score(**inputs, candidates=candidates), hf_scores(dequant_model, inputs, candidates),
                 dtype=FP32)
    compare_generate(dequant_model, drop_in, inputs, max_new_tokens=6, num_beams=3, length_penalty=-2.0,
                     do_sample=False)
