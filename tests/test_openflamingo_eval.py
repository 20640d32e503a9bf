"""OpenFlamingo's own evaluation calls on the drop-in: `EvalModel`'s model calls, in its order and with its arguments
(flamingo_fast.profiling.baselines.EvalModelCalls, written from open_flamingo/eval/models/open_flamingo.py), on tiny
random LLaMA, MPT and GPT-NeoX OpenFlamingo models, against the original model. Runs in .venv-openflamingo; skipped
where open_flamingo is not installed.

- get_outputs (captioning and VQA: beams 3, length_penalty -2, inside inference mode): the same token ids.
- get_rank_classifications with use_cache True and False: the log-likelihoods of OpenFlamingo's use_cache=False,
  within the float32 tolerance. OpenFlamingo's own use_cache=True path is wrong on these prompts (its cache grows
  from one class to the next; class tokens get no attention mask, so left-padded rows attend to their padding);
  a test shows it is, so that a drop-in copying it would fail here.
- torchrun: two gloo ranks run the evaluation data-parallel through DDP and gather; equal to one process.
- past_key_values handles: never changed by extending them, any number alive, restaged after other calls;
  foreign and stale handles are errors naming past_key_values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, assert_close, relative_error

pytest.importorskip("open_flamingo", reason="needs the open_flamingo package (make test-openflamingo)")
pytestmark = pytest.mark.comparison
from int8_real_models import int8_bound  # noqa: E402
from openflamingo_models import EOC, MEDIA, batch, build_openflamingo, quantized_linears  # noqa: E402

import flamingo_fast  # noqa: E402
from flamingo_fast.profiling.baselines import EvalModelCalls  # noqa: E402

FAMILIES = ["llama", "mpt", "gpt_neox"]
FP32 = torch.float32


def few_shot(rows, num_images):
    """Left-padded rows, each `<image> text <|endofchunk|>` demonstrations then `<image>` and a question."""
    vision, ids, mask = batch(rows, num_images)
    pads = (~mask.bool()).sum(dim=1)
    for b, (positions, _) in enumerate(rows):
        for p in positions[1:]:
            ids[b, pads[b] + p - 1] = EOC  # the token before each later `<image>` closes the previous chunk
    return vision, ids, mask.bool()


def prompts():
    """Three left-padded rows: 2, 1 and 0 demonstrations."""
    return few_shot([([0, 6, 12], 16), ([0, 7], 11), ([0], 5)], num_images=3)


def class_names(seed: int):
    """Class names of 1-4 tokens, two sharing their first tokens (as "golden retriever" and "golden eagle")."""
    g = torch.Generator().manual_seed(seed)
    names = [torch.randint(3, EOC, (n,), generator=g).tolist() for n in (1, 3, 2, 4, 1)]
    return names + [names[1][:2] + [names[3][0]]]


def models(family: str, seed: int):
    of_model = build_openflamingo(family, 2, seed=seed)
    drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=4, max_seq_len=64)
    return of_model, drop_in


@pytest.mark.parametrize("family", FAMILIES)
def test_get_outputs_captions_and_vqa_same_tokens(family):
    of_model, drop_in = models(family, seed=40 + FAMILIES.index(family))
    vision, ids, mask = prompts()
    for min_len, max_len in ((0, 20), (0, 5)):  # evaluate.py: captioning, then VQA
        expected = EvalModelCalls(of_model).get_outputs(vision, ids, mask, min_len, max_len, 3, -2.0)
        got = EvalModelCalls(drop_in).get_outputs(vision, ids, mask, min_len, max_len, 3, -2.0)
        assert torch.equal(got, expected), f"tokens differ:\n{got}\n{expected}"


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_classifications_equal_openflamingo_uncached(family):
    """Both of the drop-in's paths give OpenFlamingo's use_cache=False values, plain and length-normalised."""
    of_model, drop_in = models(family, seed=50 + FAMILIES.index(family))
    vision, ids, mask = prompts()
    names = class_names(FAMILIES.index(family))
    for normalize_length in (False, True):
        expected = EvalModelCalls(of_model).get_rank_classifications(vision, ids, mask, names, False,
                                                                      normalize_length)
        assert expected.shape == (3, len(names))
        for use_cache in (True, False):
            got = EvalModelCalls(drop_in).get_rank_classifications(vision, ids, mask, names, use_cache,
                                                                     normalize_length)
            assert_close(got, expected, dtype=FP32)
    score = drop_in.score(vision, ids, mask, candidates=names)
    assert_close(score, EvalModelCalls(of_model).get_rank_classifications(vision, ids, mask, names, False, False),
                 dtype=FP32)


def test_openflamingo_cached_path_is_wrong_on_these_prompts():
    """The reason the drop-in is compared with use_cache=False: OpenFlamingo's cached loop, as EvalModel runs it,
    is far outside the tolerance on the same left-padded prompts and multi-token classes."""
    of_model, _ = models("llama", seed=60)
    vision, ids, mask = prompts()
    names = class_names(7)
    calls = EvalModelCalls(of_model)
    cached = calls.get_rank_classifications(vision, ids, mask, names, True, False)
    uncached = calls.get_rank_classifications(vision, ids, mask, names, False, False)
    tol = TOLERANCE[FP32]
    assert ((cached - uncached).abs() > tol["atol"] + tol["rtol"] * uncached.abs()).any()


def test_encode_vision_x_gives_openflamingo_latents():
    of_model, drop_in = models("mpt", seed=61)
    vision = torch.randn(2, 3, 1, 3, 32, 32)
    with torch.no_grad():
        of_model._encode_vision_x(vision)
    layers = of_model.lang_encoder._get_decoder_layers()
    layer = next(x for x in layers if x.gated_cross_attn_layer is not None)
    expected = layer.vis_x
    of_model.lang_encoder.clear_conditioned_layers()
    assert_close(drop_in._encode_vision_x(vision), expected, dtype=FP32)
    with pytest.raises(ValueError, match=r"vision_x: got \(2, 3, 3, 32, 32\)"):
        drop_in._encode_vision_x(vision[:, :, 0])


def extend(drop_in, handle, tokens):
    out = drop_in(vision_x=None, lang_x=tokens, attention_mask=None, clear_conditioned_layers=False,
                  past_key_values=handle, use_cache=True)
    return out.logits, out.past_key_values


def test_handles_never_change_many_alive_and_survive_other_calls():
    """Two prompts' handles and their extensions, interleaved with generate and score (which overwrite the
    runtime's caches): every extension equals the uncached forward over the whole sequence, however often and
    in whatever order it runs."""
    of_model, drop_in = models("gpt_neox", seed=62)
    (vision_a, ids_a, mask_a), (vision_b, ids_b, mask_b) = prompts(), few_shot([([0, 4], 9), ([1], 6)], 2)
    first = drop_in(vision_a, ids_a, mask_a, use_cache=True)
    assert first.past_key_values.nbytes > 0
    second = drop_in(vision_b, ids_b, mask_b, use_cache=True)
    tokens_a, tokens_b = torch.randint(3, EOC, (3, 2)), torch.randint(3, EOC, (2, 3))

    def expected(vision, ids, mask, tokens):
        whole = torch.cat([ids, tokens], dim=1)
        with torch.no_grad():
            logits = of_model(vision, whole, attention_mask=torch.cat([mask, torch.ones_like(tokens).bool()], 1))
        return logits.logits[:, -tokens.shape[1]:]

    want_a, want_b = expected(vision_a, ids_a, mask_a, tokens_a), expected(vision_b, ids_b, mask_b, tokens_b)
    for _ in range(2):
        got_a, handle_a = extend(drop_in, first.past_key_values, tokens_a)
        assert_close(got_a, want_a, dtype=FP32)
        drop_in.generate(vision_b, ids_b, mask_b, max_new_tokens=3, num_beams=2)
        assert_close(extend(drop_in, first.past_key_values, tokens_a)[0], want_a, dtype=FP32)  # same handle after
        got_b, _ = extend(drop_in, second.past_key_values, tokens_b)
        assert_close(got_b, want_b, dtype=FP32)
        drop_in.score(vision_a, ids_a, mask_a, candidates=[[5, 6], [7]])
        # one token at a time from the same handle, after another handle ran: the same values
        step_1, handle_1 = extend(drop_in, first.past_key_values, tokens_a[:, :1])
        step_2, _ = extend(drop_in, handle_1, tokens_a[:, 1:])
        assert_close(torch.cat([step_1, step_2], dim=1), want_a, dtype=FP32)
        # the whole sequence's mask is accepted too (Hugging Face's convention)
        whole_mask = torch.cat([mask_a, torch.ones_like(tokens_a).bool()], dim=1)
        out = drop_in(None, tokens_a, whole_mask, past_key_values=first.past_key_values, use_cache=True)
        assert_close(out.logits, want_a, dtype=FP32)
    assert handle_a.parent is first.past_key_values


def test_dropped_handles_free_their_tensors():
    """The drop-in's past_key_values handles own their KV and media K/V: after the caller drops them (here after the
    per-class loop's calls, then a generate), nothing keeps them alive."""
    import gc
    import weakref

    _, drop_in = models("mpt", seed=64)
    vision, ids, mask = prompts()
    prompt = drop_in(vision, ids, mask, use_cache=True).past_key_values
    _, extended = extend(drop_in, prompt, torch.randint(3, EOC, (3, 1)))
    drop_in.generate(vision, ids, mask, max_new_tokens=2)
    alive = [weakref.ref(t) for t in (prompt, extended, prompt.keys, prompt.media_keys, extended.keys)]
    del prompt, extended
    gc.collect()
    assert [r() for r in alive] == [None] * len(alive)


def test_handle_errors_name_past_key_values():
    of_model, drop_in = models("llama", seed=63)
    _, other = models("llama", seed=63)
    vision, ids, mask = prompts()
    tokens = torch.randint(3, EOC, (3, 1))
    with torch.no_grad():
        hf_cache = of_model(vision, ids, attention_mask=mask, use_cache=True).past_key_values
    for foreign in (hf_cache, ((torch.zeros(1),),)):
        with pytest.raises(ValueError, match=r"past_key_values: got .*; expected the handle"):
            extend(drop_in, foreign, tokens)
    handle = other(vision, ids, mask, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"past_key_values: a handle made by another model"):
        extend(drop_in, handle, tokens)
    # made from cached media: stale once uncache_media() released them
    drop_in.cache_media(input_ids=ids, vision_x=vision)
    cached = drop_in(None, ids, mask, clear_conditioned_layers=False, use_cache=True).past_key_values
    extend(drop_in, cached, tokens)
    with pytest.raises(ValueError, match=r"vision_x: media are cached"):
        drop_in(vision, ids, mask)
    drop_in.uncache_media()
    with pytest.raises(ValueError, match=r"past_key_values: stale"):
        extend(drop_in, cached, tokens)
    fresh = drop_in(vision, ids, mask, use_cache=True).past_key_values  # not from cached media: never stale
    drop_in.cache_media(input_ids=ids, vision_x=vision)
    drop_in.uncache_media()
    extend(drop_in, fresh, tokens)
    with pytest.raises(ValueError, match=r"vision_x: expected None with past_key_values"):
        drop_in(vision, tokens, None, past_key_values=fresh, use_cache=True)
    with pytest.raises(ValueError, match=r"lang_x: holds <image>"):
        extend(drop_in, fresh, torch.full((3, 1), of_model.media_token_id))
    with pytest.raises(ValueError, match=r"attention_mask: a new token is masked"):
        drop_in(None, tokens, torch.zeros_like(tokens), past_key_values=fresh, use_cache=True)
    with pytest.raises(ValueError, match=r"lang_x: got \(2, 1\) with past_key_values"):
        extend(drop_in, fresh, tokens[:2])
    with pytest.raises(ValueError, match=r"past_key_values: .* exceed max_seq_len=64"):
        extend(drop_in, fresh, torch.randint(3, EOC, (3, 64 - ids.shape[1] + 1)))
    with pytest.raises(ValueError, match=r"labels: not supported"):
        drop_in(vision, ids, mask, labels=ids)
    assert drop_in(vision, ids, mask).past_key_values is None  # use_cache=False, as Hugging Face returns


def test_torchrun_data_parallel_evaluation_equals_one_process():
    """tests/torchrun_eval.py under `torchrun --standalone --nproc_per_node 2` (gloo on the loopback interface):
    sharded as evaluate.py shards, called through DDP, gathered with all_gather_object; it checks the merged
    results against one process's and prints OK. ~20 s on two busy cores."""
    script = Path(__file__).with_name("torchrun_eval.py")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=240, env=env,
                         cwd=script.parent.parent)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert "torchrun_eval: OK (2 ranks, 5 queries)" in run.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_drop_in_runs_the_evaluation_calls(family):
    """EvalModel's calls, unchanged, on from_openflamingo(model, weights="int8") (fp32 activations). Rank
    classification, both paths (use_cache: forward with past_key_values), plain and length-normalised: the
    log-likelihoods of OpenFlamingo's model on the dequantized weights (fp32 table). Against the original model: the
    logits rank classification reads (each class's forward after the prompt, at the positions that predict its
    tokens) within the derived int8 bound (int8_real_models.int8_bound), and each row's best class the original's
    wherever its margin over the second exceeds 4 sigma of the two sums' error difference (a log-prob's error at
    most sqrt(2) x a logit's, bound x RMS(logits); up to 2 x 4 tokens). VQA: OpenFlamingo's beam-search tokens on
    the dequantized weights; captioning runs (its beams: test_openflamingo's int8 test)."""
    of_model = build_openflamingo(family, 2, seed=70 + FAMILIES.index(family))
    drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", weights="int8", max_batch_size=4,
                                              max_seq_len=64)
    vision, ids, mask = prompts()
    names = class_names(10 + FAMILIES.index(family))
    rows = ids.shape[0]

    def read_logits(model):  # get_rank_classifications' forwards (use_cache=False): [sum of rows x len(name), V]
        read = []
        for name in names:
            tokens = torch.tensor([name]).expand(rows, -1)
            call_mask = torch.cat([mask, torch.ones_like(tokens, dtype=torch.bool)], dim=1)
            logits = model(vision, torch.cat([ids, tokens], dim=1), attention_mask=call_mask).logits
            read.append(logits[:, -len(name) - 1:-1].flatten(0, 1))
        return torch.cat(read)

    def scores(read, normalize_length):  # EvalModelCalls' log-likelihoods from read_logits -> [rows, classes]
        per_class = read.split([rows * len(name) for name in names])
        picked = [torch.log_softmax(logits.view(rows, len(name), -1), dim=-1)
                  .gather(2, torch.tensor([name]).expand(rows, -1)[:, :, None])[:, :, 0]
                  for logits, name in zip(per_class, names, strict=True)]
        return torch.stack([p.mean(1) if normalize_length else p.sum(1) for p in picked], dim=1)

    bound, eps_int8, expected, dequant_model = int8_bound(of_model, quantized_linears, read_logits)
    rel = relative_error(read_logits(drop_in), expected)
    calls = EvalModelCalls(drop_in)
    with torch.no_grad():
        dequant_read = read_logits(dequant_model)
    got = {(normalize_length, use_cache): calls.get_rank_classifications(vision, ids, mask, names, use_cache,
                                                                          normalize_length)
           for normalize_length in (False, True) for use_cache in (True, False)}
    for (normalize_length, _), values in got.items():
        assert_close(values, scores(dequant_read, normalize_length), dtype=FP32)
    best = got[False, True].argmax(dim=1)
    ref_scores = scores(expected, False)
    sigma = bound * expected.double().square().mean().sqrt().item()
    top2 = ref_scores.topk(2, dim=1).values
    sure = top2[:, 0] - top2[:, 1] > 4 * 2 * max(map(len, names)) ** 0.5 * sigma
    print(f"{family}: class logits rel err int8 {rel:.3g} (bound {bound:.3g}); weights rel err int8 {eps_int8:.3g}; "
          f"best class agrees in {int((best == ref_scores.argmax(1)).sum())} of {rows} rows, {int(sure.sum())} with "
          f"a safe margin")
    assert rel <= bound
    assert sure.any()  # else the prompts assert nothing
    assert torch.equal(best[sure], ref_scores.argmax(1)[sure])

    with torch.no_grad():  # use_cache=False: see test_openflamingo.compare_beams
        expected_tokens = dequant_model.generate(vision, ids, attention_mask=mask, min_new_tokens=0, max_new_tokens=5,
                                                 num_beams=3, length_penalty=-2.0, use_cache=False)[:, ids.shape[1]:]
    assert MEDIA not in expected_tokens, "OpenFlamingo generated <image>: pick another seed"
    for min_len, max_len in ((0, 20), (0, 5)):  # evaluate.py: captioning, then VQA
        tokens = calls.get_outputs(vision, ids, mask, min_len, max_len, 3, -2.0)
        assert tokens.shape[0] == rows and 0 < tokens.shape[1] <= max_len and tokens.dtype == torch.long
    assert torch.equal(tokens, expected_tokens), f"VQA tokens differ:\n{tokens}\n{expected_tokens}"
