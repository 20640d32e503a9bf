"""FastFlamingo against the real open_flamingo package: tiny random models built from configs (an open_clip
ViT, a Hugging Face LM from its config, OpenFlamingo's FlamingoLMMixin and Flamingo), nonzero gates, per LM
family and cross-attention cadence. Runs in .venv-openflamingo (`make test-openflamingo`, transformers 4.57) and
.venv-transformers5 (`make test-transformers5`, 5.24); skipped where open_flamingo is not installed. No downloads.

Position convention: under OpenFlamingo a left-padded row's rotary positions count its padding (its
FlamingoLMMixin.forward hides `position_ids` from Hugging Face's generate); flamingo_fast counts real tokens.
Rotary embeddings and ALiBi depend only on position differences, so logits agree up to rounding.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import assert_close, relative_error

open_flamingo = pytest.importorskip("open_flamingo", reason="needs the open_flamingo package (make test-openflamingo)")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.comparison

from int8_real_models import assert_greedy_agrees_where_safe, held_tensors, int8_bound  # noqa: E402
from open_flamingo.src.flamingo import Flamingo as OpenFlamingo  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402
from openflamingo_models import (  # noqa: E402
    BASE_VOCAB,
    EOC,
    MEDIA,
    PAD,
    VOCAB,
    batch,
    build_openflamingo,
    hf_lm,
    open_clip_vit,
    quantized_linears,
)

import flamingo_fast  # noqa: E402
from flamingo_fast.generation.sampling import SamplingOptions, select_next_token  # noqa: E402
from flamingo_fast.profiling.baselines import EvalModelCalls  # noqa: E402

NEW_TOKENS = 20
# OpenFlamingo and flamingo_fast compute the same functions in different orders (eager vs SDPA attention,
# HF's rotary tables, open_clip's nn.MultiheadAttention): float32 rounding differences measured here stay
# below 2e-6 on logits of magnitude ~0.5, so the fp32 table (1e-5 abs + 1e-5 rel) still binds.
FP32 = torch.float32


def shots_prompt(shots: int, caption: int = 5):
    """`<image> caption <|endofchunk|>` per shot, then `<image> question`: shots + 1 images."""
    positions = [i * (caption + 2) for i in range(shots + 1)]
    vision, ids, mask = batch([(positions, (shots + 1) * (caption + 2))], shots + 1)
    for i in range(shots):
        ids[0, positions[i] + caption + 1] = EOC
    return vision, ids, mask


def compare(of_model, fast, vision, ids, mask):
    """Logits of the prompt (at real tokens: a padding position's output is unused and implementations differ
    there), then 20 generated tokens and the logits they were chosen from."""
    with torch.no_grad():
        of_logits = of_model(vision, ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(fast(vision, ids, mask).logits[real], of_logits[real], dtype=FP32)
    with torch.no_grad():
        out = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=1,
                                output_logits=True, return_dict_in_generate=True)
    got, got_logits = fast.generate(vision, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                    return_logits=True)
    new = ids.shape[1]
    assert torch.equal(got, out.sequences), f"tokens differ:\n{got[:, new:]}\n{out.sequences[:, new:]}"
    assert_close(got_logits, torch.stack(out.logits, dim=1), dtype=FP32)


FAMILIES = ["llama", "mpt", "gpt_neox", "gpt_neox_sequential"]


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_outputs_as_openflamingo(family, every):
    of_model = build_openflamingo(family, every, seed=FAMILIES.index(family) + 10 * every)
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    assert fast.config.lm.family == family.replace("_sequential", "")
    assert fast.config.cross_attn_every_n_layers == every
    for shots in (0, 1, 4):
        compare(of_model, fast, *shots_prompt(shots))
    # a left-padded batch of two prompts with different image counts (row 1's last two images are padding)
    compare(of_model, fast, *batch([([0, 6, 12], 18), ([1], 7)], num_images=3))


def test_tensors_are_shared_not_copied():
    of_model = build_openflamingo("mpt", 1, seed=3)
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=64)
    ours = dict(fast.reference.named_parameters())
    theirs = of_model.state_dict(keep_vars=True)
    assert ours["lang_encoder.transformer.blocks.0.attn.Wqkv.weight"] is theirs[
        "lang_encoder.transformer.blocks.0.decoder_layer.attn.Wqkv.weight"]
    assert ours["perceiver.latents"] is theirs["perceiver.latents"]
    assert ours["vision_encoder.conv1.weight"] is theirs["vision_encoder.conv1.weight"]
    assert fast.reference.lang_encoder.output_head.weight is fast.reference.lang_encoder.embed_tokens.weight


def test_generate_options():
    of_model = build_openflamingo("llama", 2, seed=4)
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    vision, ids, mask = shots_prompt(1)
    with pytest.raises(ValueError, match=r"generate options \['no_repeat_ngram_size'\]: not supported"):
        fast.generate(vision, ids, mask, max_new_tokens=4, no_repeat_ngram_size=2)
    # min_new_tokens: stop the first free-running token; the same call to OpenFlamingo gives the same tokens
    free = fast.generate(vision, ids, mask, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, ids.shape[1]])
    for minimum in (0, 4):
        got = fast.generate(vision, ids, mask, max_new_tokens=10, eos_token_id=stop, min_new_tokens=minimum)
        with torch.no_grad():
            expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=stop,
                                         min_new_tokens=minimum)
        assert torch.equal(got, expected)
        assert (got.shape[1] == ids.shape[1] + 1) == (minimum == 0)
        assert stop not in got[0, ids.shape[1]:ids.shape[1] + minimum].tolist()


def _trainable_state_dict(model):
    """What OpenFlamingo's training script saves (train_utils.filter_state_dict_to_trainable, which imports
    wandb and so is mirrored here): trainable parameters and every embedding, without the duplicate
    old_decoder_blocks / gated_cross_attn_layers names and without the vision encoder."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = model.state_dict()
    for name, p in model.named_parameters():
        if "embed" not in name and not p.requires_grad:
            state.pop(name, None)
    return {k: v for k, v in state.items() if "lang_encoder.old_decoder_blocks" not in k
            and "lang_encoder.gated_cross_attn_layers" not in k and "vision_encoder" not in k}


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_checkpoint_round_trip(family, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(20)
    lm = hf_lm(family, vocab=BASE_VOCAB)
    lm.save_pretrained(tmp_path / "lm")  # the LM's Hugging Face directory, before OpenFlamingo resizes it
    base_head = lm.get_output_embeddings().weight.detach().clone()
    lm.resize_token_embeddings(VOCAB)
    lm.config.pad_token_id = lm.generation_config.pad_token_id = PAD
    # The checkpoint holds the head's new rows only where the head is the embedding (MPT) or is named like one
    # (GPT-NeoX's `embed_out` in transformers 4.x; 5.x names it `lm_head`, as LLaMA's): elsewhere they exist
    # nowhere, so make OpenFlamingo's the mean
    head = lm.get_output_embeddings().weight
    head_saved = head is lm.get_input_embeddings().weight or any(
        p is head for name, p in lm.named_parameters() if "embed" in name)
    if not head_saved:
        with torch.no_grad():
            head[BASE_VOCAB:] = base_head.mean(dim=0)
    of_model = build_openflamingo(family, 2, seed=21, lm=lm)
    torch.save(_trainable_state_dict(of_model), tmp_path / "checkpoint.pt")
    visual = {"visual." + k: v.contiguous() for k, v in of_model.vision_encoder.state_dict().items()}
    visual["token_embedding.weight"] = torch.zeros(4, 4)  # a full CLIP file: the text tower is ignored
    save_file(visual, str(tmp_path / "open_clip.safetensors"))

    files = (tmp_path / "checkpoint.pt", tmp_path / "lm", tmp_path / "open_clip.safetensors")
    vision = flamingo_fast.VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=2, act="quick_gelu")
    options = dict(eoc_token_id=EOC, media_token_id=MEDIA, vision=vision, backend="torch", max_batch_size=2,
                   max_seq_len=96)
    if not head_saved:
        ours = {"llama": "lm_head", "gpt_neox": "embed_out"}[family]  # the reference's name of the head
        with pytest.raises(ValueError, match=rf"lang_encoder.{ours}.weight: 96 rows but the embedding has 99"):
            flamingo_fast.load_openflamingo(*files, **options)
        options["missing_output_rows"] = "mean"
    fast = flamingo_fast.load_openflamingo(*files, **options)
    compare(of_model, fast, *batch([([0, 6, 12], 18), ([1], 7)], num_images=3))
    if family == "llama":  # the LM directory's generation_config.json, applied as OpenFlamingo applies the LM's
        import json

        vision, ids, mask = batch([([0, 6], 12), ([1], 7)], num_images=2)
        fields = {"max_length": ids.shape[1] + 3, "num_beams": 3}
        written = json.loads((tmp_path / "lm" / "generation_config.json").read_text())
        (tmp_path / "lm" / "generation_config.json").write_text(json.dumps({**written, **fields}))
        for name, value in fields.items():
            setattr(of_model.lang_encoder.generation_config, name, value)
        with torch.no_grad():
            expected = of_model.generate(vision, ids, attention_mask=mask)
        assert expected.shape[1] == ids.shape[1] + 3
        assert torch.equal(flamingo_fast.load_openflamingo(*files, **options).generate(vision, ids, mask), expected)

    broken = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    broken["perceiver.extra.weight"] = torch.zeros(1)
    del broken["perceiver.norm.weight"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing keys \[perceiver.norm.weight\]; unexpected keys \[perceiver.extra"):
        flamingo_fast.load_openflamingo(tmp_path / "broken.pt", *files[1:], **options)


def test_unsupported_architecture_is_a_clear_error():
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.h")
    of_model = OpenFlamingo(types.SimpleNamespace(visual=open_clip_vit()), lm, EOC, MEDIA, vis_dim=48)
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported; expected one of 'llama', 'mpt'"):
        flamingo_fast.from_openflamingo(of_model)


def test_the_baseline_profiles_run_as_commands_in_a_fresh_process(tmp_path):
    """The README's baseline profiles, `profile --impl idefics,fast` and `--impl openflamingo,fast`, in a process
    of their own (the smallest presets, 1 shot count, 2 tokens, 1 repeat), under the installed transformers: the
    IDEFICS one first, before anything imported torchvision (this process's conftest.py makes torchvision
    importable for every test, which hid a baseline that did not); the OpenFlamingo one on unpadded rows, which
    transformers 5's generate passes with no attention_mask. One process for both: the imports take most of the
    time. Both rows give the baseline's greedy tokens (the same float32 weights)."""
    import json
    import os
    import subprocess
    import sys

    runs = [["profile", "--preset", preset, "--impl", f"{baseline},fast", "--shots", "0", "--new-tokens", "2",
             "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress", "--json", str(tmp_path / preset)]
            for preset, baseline in (("idefics-tiny", "idefics"), ("tiny", "openflamingo"))]
    driver = ("import json, sys\nfrom flamingo_fast.cli import main\n"
              "sys.exit(next((code for code in map(main, json.loads(sys.argv[1])) if code), 0))")
    done = subprocess.run([sys.executable, "-c", driver, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for preset, baseline in (("idefics-tiny", "idefics"), ("tiny", "openflamingo")):
        rows = json.loads((tmp_path / preset).read_text())["rows"]
        assert [row["impl"] for row in rows] == [baseline, "fast"], rows
        assert rows[1]["tokens_match_baseline"] == 1.0, rows[1]


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_profiler_baseline_runs_openflamingo_on_our_weights(family):
    """to_openflamingo: the reverse map; OpenFlamingoBaseline: OpenFlamingo's generate with phase laps."""
    from flamingo_fast.config import LMConfig, from_name
    from flamingo_fast.profiling.baselines import OpenFlamingoBaseline, to_openflamingo
    from flamingo_fast.reference.model import build_reference

    tiny = from_name("tiny")
    extra = {"llama": {}, "mpt": dict(alibi=True, tie_word_embeddings=True, intermediate_size=256),
             "gpt_neox": dict(rotary_pct=0.5, parallel_residual=True)}[family]
    lm = LMConfig(**{**tiny.lm.__dict__, "family": family, "num_kv_heads": 4, **extra})
    reference = build_reference(tiny.replace(lm=lm, cross_attn_every_n_layers=2), seed=30)
    of_model = to_openflamingo(reference)
    assert of_model.perceiver.latents is reference.perceiver.latents
    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7)], num_images=3)
    expected = reference.generate(vision, ids, mask, max_new_tokens=8, eos_token_id=[])
    timer = flamingo_fast.PhaseTimer()
    got = OpenFlamingoBaseline(of_model).generate(vision, ids, mask, max_new_tokens=8, eos_token_id=[], timer=timer)
    assert torch.equal(got, expected)
    assert [len(timer.laps[p]) for p in ("vision", "prefill", "decode")] == [1, 1, 7]


def beam_stops(fast, vision, ids, mask) -> list[int]:
    """Random weights rarely produce `<|endofchunk|>`: stop on tokens that beams produce two and four steps in
    (taken from a beam search that never stops), so that hypotheses end at different steps."""
    free = fast.generate(vision, ids, mask, max_new_tokens=5, num_beams=2, eos_token_id=[])[:, ids.shape[1]:]
    return sorted({int(free[0, 1]), int(free[-1, 3])})


def compare_beams(of_model, fast, vision, ids, mask, **gen):
    """OpenFlamingo's generate runs Hugging Face's beam search with `use_cache=False`: with transformers 4.57's
    KV cache, its beam-search decode steps compute wrong logits here (a beam's next-token log-probs differ from
    a full forward of the same sequence by up to 0.2, while greedy decoding with the cache is exact); without
    the cache every step is a full forward, so the search runs on the model's true scores."""
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, use_cache=gen.get("num_beams", 1) == 1, **gen)
    # A generated `<image>` is where flamingo_fast deliberately differs (docs/semantics.md): this comparison is only
    # meaningful when OpenFlamingo generated none, so say so loudly rather than compare different semantics.
    assert MEDIA not in expected[:, ids.shape[1]:], "OpenFlamingo generated <image>: pick another seed"
    got = fast.generate(vision, ids, mask, **gen)
    new = ids.shape[1]
    assert torch.equal(got, expected), f"{gen}\nours:\n{got[:, new:]}\nOpenFlamingo:\n{expected[:, new:]}"
    return got


# Every (num_beams, length_penalty) pair of {2, 3, 4} x {-2.0, 0.0, 1.0}, for each family.
BEAM_GRID = [(beams, penalty) for beams in (2, 3, 4) for penalty in (-2.0, 0.0, 1.0)]


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_beam_search_same_tokens_as_openflamingo(family):
    """Hugging Face's beam search as OpenFlamingo runs it (vision and prompt expanded num_beams times) against
    ours (prompt encoded and prefilled once per row), on a left-padded batch whose hypotheses end at
    different steps: beams and length penalties, each early-stopping rule, returned sequences, min_new_tokens."""
    of_model = build_openflamingo(family, 2, seed=70 + len(family))
    with torch.no_grad():  # less uniform next-token distributions than random weights give: fewer near-ties
        of_model.lang_encoder.get_output_embeddings().weight.mul_(6.0)
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7)], num_images=3)
    stops = beam_stops(fast, vision, ids, mask)
    new = 6
    early = {"llama": False, "mpt": True, "gpt_neox": "never"}[family]
    ends = set()
    for beams, penalty in BEAM_GRID:
        got = compare_beams(of_model, fast, vision, ids, mask, max_new_tokens=new, num_beams=beams,
                            length_penalty=penalty, early_stopping=early, num_return_sequences=2,
                            eos_token_id=stops)
        ends.update(next((i for i, t in enumerate(row) if t in stops), new) for row in got[:, 18:].tolist())
    assert len(ends) > 1, f"the beams should end at different steps: {ends}"
    if family == "llama":
        compare_beams(of_model, fast, vision, ids, mask, max_new_tokens=new, num_beams=3, min_new_tokens=3,
                      eos_token_id=stops)


def test_evaluation_call_with_greedy_and_sampling_leftovers():
    """OpenFlamingo's evaluation scripts pass length_penalty with one beam, and temperature=0 without
    sampling: Hugging Face ignores both there, and so must the drop-in."""
    of_model = build_openflamingo("llama", 1, seed=50)
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    vision, ids, mask = shots_prompt(2)
    gen = dict(max_new_tokens=6, num_beams=1, length_penalty=-2.0)
    compare_beams(of_model, fast, vision, ids, mask, **gen)
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(fast.generate(vision, ids, mask, max_new_tokens=6, temperature=0.0), expected)


def test_output_head_is_found_by_role_as_transformers_5_names_it():
    """transformers 5 names GPT-NeoX's output head `lm_head` (4.x: `embed_out`): rename it on a live model the
    way the other version lays it out and convert both; the tokens must not change."""
    of_model = build_openflamingo("gpt_neox", 1, seed=60)
    vision, ids, mask = shots_prompt(1)
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    as_built = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    lang = of_model.lang_encoder
    own, other = ("embed_out", "lm_head") if hasattr(lang, "embed_out") else ("lm_head", "embed_out")
    head = getattr(lang, own)
    delattr(lang, own)
    setattr(lang, other, head)
    lang.get_output_embeddings = lambda: getattr(lang, other)
    assert f"lang_encoder.{other}.weight" in of_model.state_dict()
    renamed = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    assert renamed.reference.lang_encoder.output_head.weight is head.weight
    for fast in (as_built, renamed):
        assert torch.equal(fast.generate(vision, ids, mask, max_new_tokens=8, eos_token_id=[]), expected)


def test_lm_generation_config_gives_the_defaults_and_unsupported_entries_are_named():
    """Hugging Face merges the LM's generation_config into every generate call; so does the drop-in (read when
    it is built). An entry flamingo_fast does not implement is an error naming it, never silently ignored."""
    of_model = build_openflamingo("llama", 1, seed=70)
    vision, ids, mask = shots_prompt(1)
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    free = fast.generate(vision, ids, mask, max_new_tokens=8, eos_token_id=[])
    stop = int(free[0, ids.shape[1]])  # the first free-running token: without min_new_tokens it stops at once
    of_model.lang_encoder.generation_config.min_new_tokens = 3
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=stop)
    got = fast.generate(vision, ids, mask, max_new_tokens=8, eos_token_id=stop)
    assert torch.equal(got, expected) and got.shape[1] > ids.shape[1] + 3

    of_model.lang_encoder.generation_config.repetition_penalty = 2.0
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    with pytest.raises(ValueError, match=r"generation_config: repetition_penalty=2.0 not supported"):
        fast.generate(vision, ids, mask, max_new_tokens=8)
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=stop,
                                     repetition_penalty=1.0)
    assert torch.equal(fast.generate(vision, ids, mask, max_new_tokens=8, eos_token_id=stop,
                                     repetition_penalty=1.0), expected)


def test_generated_image_parity_flag():
    """When the model itself generates `<image>`, OpenFlamingo's cached generate switches the row to its first
    image (and every other row to none); flamingo_fast keeps the last prompt image unless asked for parity."""
    of_model = build_openflamingo("llama", 1, seed=80)
    vision, ids, mask = batch([([0, 6, 12], 18), ([1, 5], 9)], num_images=3)
    plain = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    free = plain.generate(vision, ids, mask, max_new_tokens=12, eos_token_id=[])[:, 18:]
    with torch.no_grad():  # make `<image>` win wherever row 0's third token would: the model generates it
        head = of_model.lang_encoder.get_output_embeddings().weight
        head[MEDIA] = 1.5 * head[int(free[0, 2])]
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    assert MEDIA in expected[:, 18:-1], "the model must generate <image> before its last step for this test"
    parity = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96,
                                             openflamingo_generated_image_bug=True)
    assert torch.equal(parity.generate(vision, ids, mask, max_new_tokens=12, eos_token_id=[]), expected)
    ours = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    assert not torch.equal(ours.generate(vision, ids, mask, max_new_tokens=12, eos_token_id=[]), expected), \
        "without the flag the tokens after a generated <image> should differ (else this test shows nothing)"


def _image_on_beams(family: str, seed: int, bias_row: int, scale: float):
    """A tiny OpenFlamingo model and a left-padded batch of three queries (3, 1 and 2 images) whose output head
    makes `<image>` compete with what hypothesis `bias_row` of a free 3-beam search says second (its head row
    `scale` times that token's): the model generates `<image>` on some beams, its own choice.
    -> (model, (vision, ids, mask))."""
    of_model = build_openflamingo(family, 2, seed=seed)
    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7), ([2, 5], 10)], num_images=3)
    plain = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=3, max_seq_len=64)
    free = plain.generate(vision, ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=[], num_return_sequences=3)
    with torch.no_grad():
        head = of_model.lang_encoder.get_output_embeddings().weight
        head[MEDIA] = scale * head[int(free[bias_row, ids.shape[1] + 1])]
    return of_model, (vision, ids, mask)


def test_generated_image_parity_flag_with_beams_couples_the_batch():
    """Beam search as OpenFlamingo's evaluation runs it (3 beams, length_penalty -2.0, cached generate) on a batch
    where one query's beams generate `<image>`: OpenFlamingo re-conditions every hypothesis of the batch on that
    step's tokens, and the state stays with the batch slot while the beams move between slots. With the parity
    flag the drop-in (and its reference) return OpenFlamingo's tokens; the other queries' answers differ from
    what OpenFlamingo answers for them alone (the coupling is exercised), and the default differs."""
    of_model, (vision, ids, mask) = _image_on_beams("llama", seed=90, bias_row=6, scale=1.08)
    new = ids.shape[1]
    gen = dict(max_new_tokens=8, num_beams=3, length_penalty=-2.0)
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, num_return_sequences=3, **gen)
        alone = [of_model.generate(vision[b:b + 1], ids[b:b + 1, pad:], attention_mask=mask[b:b + 1, pad:], **gen)
                 for b, pad in enumerate((~mask.bool()).sum(dim=1).tolist())]
    generated = (expected[:, new:-1] == MEDIA).view(3, 3, -1).flatten(1).any(dim=1).tolist()
    assert generated == [False, False, True], f"only the third query's beams should generate <image>: {generated}"
    coupled = [b for b in (0, 1) if not torch.equal(expected[3 * b, new:], alone[b][0, -8:])]
    assert coupled, "a query without <image> should answer differently beside the one that generates it"
    parity = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=3, max_seq_len=64,
                                             openflamingo_generated_image_bug=True)
    got = parity.generate(vision, ids, mask, num_return_sequences=3, **gen)
    assert torch.equal(got, expected), f"ours:\n{got[:, new:]}\nOpenFlamingo:\n{expected[:, new:]}"
    # OpenFlamingo's evaluation call (EvalModel.get_outputs: inference mode, min and max lengths, the best beam)
    evaluation = EvalModelCalls(parity).get_outputs(vision, ids, mask, 0, 8, 3, -2.0)
    assert torch.equal(evaluation, expected.view(3, 3, -1)[:, 0, new:])
    # the reference's own generate stops on eos too by default; OpenFlamingo's on <|endofchunk|> only
    assert torch.equal(parity.reference.generate(vision, ids, mask, num_return_sequences=3, eos_token_id=EOC, **gen),
                       expected)
    default = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=3, max_seq_len=64)
    assert not torch.equal(default.generate(vision, ids, mask, num_return_sequences=3, **gen), expected)
    # uncached, OpenFlamingo treats a generated <image> otherwise (each step runs over the whole sequence)
    with torch.no_grad():
        uncached = of_model.generate(vision, ids, attention_mask=mask, use_cache=False, num_return_sequences=3, **gen)
    assert not torch.equal(uncached, expected), "OpenFlamingo's cached and uncached generate should differ here"
    with pytest.raises(ValueError, match=r"use_cache=False \(the call's use_cache\) with "
                                         r"openflamingo_generated_image_bug=True"):
        parity.generate(vision, ids, mask, use_cache=False, **gen)


class _FlamingoFastDraw(transformers.LogitsProcessor):
    """flamingo_fast's sampler (sampling.select_next_token: an exponential race over a seeded generator) inside
    OpenFlamingo's own greedy loop: the drawn token keeps its score and every other gets -inf. Hugging Face draws
    with torch.multinomial from the global generator, which no seed makes equal to flamingo_fast's draws; with
    the draw made the same way from each loop's own logits, the tokens agree exactly when the logits do."""

    def __init__(self, options, generator: torch.Generator):
        self.options, self.generator = options, generator

    def __call__(self, input_ids, scores):
        token = select_next_token(scores, self.options, self.generator)
        return torch.full_like(scores, float("-inf")).scatter(1, token[:, None], 0.0)


def test_generated_image_parity_flag_with_seeded_sampling():
    """Sampling (temperature, top-k, top-p) on a batch where one row samples `<image>`: OpenFlamingo's cached
    generate, drawing with flamingo_fast's sampler from its own logits, and the parity drop-in's sampled generate
    with the same seed give the same tokens; without the flag they differ after the `<image>`."""
    of_model, (vision, ids, mask) = _image_on_beams("llama", seed=90, bias_row=6, scale=1.08)
    new = ids.shape[1]
    sampling = dict(temperature=1.0, top_k=20, top_p=0.95)
    draw = _FlamingoFastDraw(SamplingOptions(True, **sampling), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=8,
                                     logits_processor=transformers.LogitsProcessorList([draw]))
    sampled = (expected[:, new:-1] == MEDIA).any(dim=1).tolist()
    assert sampled == [False, False, True], f"only the third row should sample <image>: {sampled}"
    gen = dict(max_new_tokens=8, do_sample=True, **sampling)
    for flag in (True, False):
        drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=3, max_seq_len=64,
                                                  openflamingo_generated_image_bug=flag)
        got = drop_in.generate(vision, ids, mask, generator=torch.Generator().manual_seed(0), **gen)
        assert torch.equal(got, expected) == flag, f"flag={flag}\nours:\n{got[:, new:]}\nOpenFlamingo:\n" \
                                                   f"{expected[:, new:]}"


def test_generated_image_parity_flag_refuses_an_lm_that_generates_uncached():
    """transformers' MptConfig defaults to use_cache=False, so OpenFlamingo's generate runs uncached on such an LM
    unless the call asks for the cache: the parity drop-in says so instead of returning other tokens."""
    of_model = build_openflamingo("mpt", 2, seed=90)
    assert of_model.lang_encoder.generation_config.use_cache is False
    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7), ([2, 5], 10)], num_images=3)
    parity = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=3, max_seq_len=64,
                                             openflamingo_generated_image_bug=True)
    with pytest.raises(ValueError, match=r"use_cache=False \(lang_encoder.generation_config.use_cache\)"):
        parity.generate(vision, ids, mask, max_new_tokens=4, num_beams=3)
    with torch.no_grad():
        expected = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=6, use_cache=True)
        uncached = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=6)
    assert MEDIA in expected[:, ids.shape[1]:-1], "this model generates <image> (else the test shows little)"
    assert not torch.equal(uncached, expected)
    assert torch.equal(parity.generate(vision, ids, mask, max_new_tokens=6, use_cache=True), expected)
    default = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=3, max_seq_len=64)
    assert default.generate(vision, ids, mask, max_new_tokens=4).shape[0] == 3  # without the flag: no error


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_score_matches_openflamingo_rank_classification(family):
    """OpenFlamingo's cached per-class loop (get_rank_classifications with use_cache=True, run by
    OpenFlamingoBaseline.score on the real model) against the drop-in's batched trie: log-likelihoods within
    1e-4 relative in float32 and the same argmax per row, plain and length-normalised, on a left-padded batch
    with candidates of 1 to 8 tokens, shared prefixes and a duplicate."""
    from flamingo_fast.profiling.baselines import OpenFlamingoBaseline

    of_model = build_openflamingo(family, 2, seed=90 + len(family))
    fast = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96,
                                           max_hypotheses=8, max_tail_len=8)
    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7)], num_images=3)
    g = torch.Generator().manual_seed(family.__len__())
    candidates = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (1, 2, 3, 8, 4, 1)]
    candidates += [candidates[3][:3] + [5], candidates[3][:2], list(candidates[1])]
    baseline = OpenFlamingoBaseline(of_model)
    for normalize_length in (False, True):
        expected = baseline.score(vision, ids, mask, candidates=candidates, normalize_length=normalize_length)
        got = fast.score(vision, ids, mask, candidates=candidates, normalize_length=normalize_length)
        assert got.shape == expected.shape == (2, len(candidates))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


def test_drop_in_is_a_module_over_the_live_models_tensors(tmp_path):
    """from_openflamingo's drop-in registers the live model's own modules: OpenFlamingo's parameter names and
    objects, its trainable set as its factory leaves it (so DDP accepts the drop-in as it accepts the model),
    and DDP's CPU form (gloo, one process) wraps it without changing a result."""
    import torch.distributed as dist

    of_model = build_openflamingo("llama", 2, seed=120)
    of_model.requires_grad_(False)  # create_model_and_transforms: the perceiver, the gated blocks, the embeddings
    of_model.perceiver.requires_grad_(True)
    of_model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    of_model.lang_encoder.get_input_embeddings().requires_grad_(True)
    drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    ours, theirs = dict(drop_in.named_parameters()), dict(of_model.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[n] is theirs[n] for n in ours)
    assert drop_in.state_dict().keys() == of_model.state_dict().keys()
    assert [n for n, p in ours.items() if p.requires_grad] == [n for n, p in theirs.items() if p.requires_grad]
    vision, ids, mask = batch([([0, 6], 12), ([1], 7)], num_images=2)
    expected = drop_in.generate(vision, ids, mask, max_new_tokens=5, num_beams=3)
    logits = drop_in(vision, ids, mask).logits
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(drop_in)
        assert ddp.module is drop_in
        assert torch.equal(ddp.module.generate(vision, ids, mask, max_new_tokens=5, num_beams=3), expected)
        assert torch.equal(ddp.module(vision, ids, mask).logits, logits)
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        real = mask.bool()  # the padding's own logits are not compared (positions counted differently)
        assert_close(logits[real], of_model(vision, ids, attention_mask=mask).logits[real], dtype=FP32)


# --------------------------------------------------------------------------------------------- weights="int8"
# The int8 drop-in against OpenFlamingo's model, with the int8 bound derived on that model and prompt
# (int8_real_models.int8_bound: tests/test_int8_weights.py's derivation for a model from another package), and the
# wiring checked apart: with fp32 activations the int8 drop-in computes OpenFlamingo's model whose quantized weights
# are replaced by q * scale, to the fp32 table.

INT8_OPTIONS = dict(backend="torch", weights="int8", max_batch_size=2, max_seq_len=96)


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_int8_drop_in_against_openflamingo(family):
    """from_openflamingo(model, weights="int8"), fp32 activations, on a left-padded batch with 3 and 1 images: the
    live model is left as it was (same values, same storage) and none of its quantized weights is held; the logits
    equal OpenFlamingo's on the dequantized weights (fp32 table) and are within the derived int8 bound of the
    original's; greedy tokens equal the original's where the margin allows (all 12 new tokens' agreement printed);
    beam search as EvalModel calls it (num_beams=3, length_penalty=-2.0) gives OpenFlamingo's tokens on the
    dequantized weights."""
    of_model = build_openflamingo(family, 2, seed=210 + len(family))
    # (tensor, its storage, its values): a non-int8 LLaMA drop-in would move the live q/k/v into one fused storage
    before = {name: (t, t.untyped_storage().data_ptr(), t.detach().clone())
              for name, t in of_model.state_dict(keep_vars=True).items()}
    drop_in = flamingo_fast.from_openflamingo(of_model, **INT8_OPTIONS)
    after = of_model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    changed = [n for n, t in after.items() if t is not before[n][0] or t.untyped_storage().data_ptr() != before[n][1]
               or not torch.equal(t, before[n][2])]
    assert not changed, f"the live model changed: {changed[:5]}"
    linears = quantized_linears(of_model)
    assert drop_in.fast.weight_bytes()["int8"] == sum(m.weight.numel() for m in linears)  # the fixture's list is right
    embedding = of_model.lang_encoder.get_input_embeddings().weight  # MPT's tied head: kept as the float embedding
    quantized = {m.weight.untyped_storage().data_ptr() for m in linears if m.weight is not embedding}
    assert not [t for t in held_tensors(drop_in) if t.untyped_storage().data_ptr() in quantized]

    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7)], num_images=3)
    real = mask.bool()
    bound, eps_int8, expected, dequant_model = int8_bound(
        of_model, quantized_linears, lambda m: m(vision, ids, attention_mask=mask).logits[real])
    logits = drop_in(vision, ids, mask).logits[real]
    with torch.no_grad():
        assert_close(logits, dequant_model(vision, ids, attention_mask=mask).logits[real], dtype=FP32)
    rel = relative_error(logits, expected)
    print(f"{family}: logits rel err int8 {rel:.3g} (bound {bound:.3g}); weights rel err int8 {eps_int8:.3g}")
    assert rel <= bound

    with torch.no_grad():
        out = of_model.generate(vision, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], num_beams=1,
                                output_logits=True, return_dict_in_generate=True)
    prompt = ids.shape[1]
    new = drop_in.generate(vision, ids, mask, max_new_tokens=12, eos_token_id=[])[:, prompt:]
    ref_new = out.sequences[:, prompt:]
    assert_greedy_agrees_where_safe(new, ref_new, torch.stack(out.logits, dim=1), bound, family)

    beams = compare_beams(dequant_model, drop_in, vision, ids, mask, max_new_tokens=6, num_beams=3,
                          length_penalty=-2.0)
    assert beams.shape[0] == 2 and prompt < beams.shape[1] <= prompt + 6


def test_int8_with_bf16_activations_against_openflamingo():
    """weights="int8" with dtype=torch.bfloat16 (the aten int8 path), MPT (ALiBi): the drop-in holds no tensor of the
    live model (everything is a bf16 or int8 copy); its error against OpenFlamingo's fp32 logits is at most twice the
    sum of int8's at fp32 activations and the plain bf16 drop-in's (tests/test_int8_weights.py's rule); greedy and
    beam search return the prompt and the new tokens."""
    of_model = build_openflamingo("mpt", 2, seed=240)
    live = {t.untyped_storage().data_ptr() for t in of_model.state_dict().values()}
    int8_bf16 = flamingo_fast.from_openflamingo(of_model, **{**INT8_OPTIONS, "dtype": torch.bfloat16})
    assert not [t for t in held_tensors(int8_bf16) if t.untyped_storage().data_ptr() in live]
    assert {t.dtype for t in int8_bf16.state_dict().values()} == {torch.int8, torch.bfloat16}
    int8_fp32 = flamingo_fast.from_openflamingo(of_model, **INT8_OPTIONS)
    bf16 = flamingo_fast.from_openflamingo(of_model, **{**INT8_OPTIONS, "weights": None, "dtype": torch.bfloat16})
    vision, ids, mask = batch([([0, 6, 12], 18), ([1], 7)], num_images=3)
    real = mask.bool()
    with torch.no_grad():
        expected = of_model(vision, ids, attention_mask=mask).logits[real]
    rel = relative_error(int8_bf16(vision, ids, mask).logits[real], expected)
    parts = [relative_error(m(vision, ids, mask).logits[real], expected) for m in (int8_fp32, bf16)]
    print(f"int8+bf16 rel err {rel:.3g}; int8+fp32 {parts[0]:.3g}; bf16 {parts[1]:.3g}")
    assert rel <= 2 * sum(parts)
    prompt = ids.shape[1]
    greedy = int8_bf16.generate(vision, ids, mask, max_new_tokens=5, eos_token_id=[])
    assert greedy.shape == (2, prompt + 5) and torch.equal(greedy[:, :prompt], ids)
    beams = int8_bf16.generate(vision, ids, mask, max_new_tokens=5, num_beams=3, length_penalty=-2.0)
    assert beams.shape[0] == 2 and prompt < beams.shape[1] <= prompt + 5 and torch.equal(beams[:, :prompt], ids)


def test_live_weight_changes_reach_the_warm_context_cache():
    """The drop-in shares the live model's tensors. After an in-place update of what OpenFlamingo trains (what
    optimizer.step() writes), after the live model's own load_state_dict, and after a fused q/k/v weight's storage
    is replaced behind the drop-in (`param.data = ...`), a few-shot call whose context and images were cached gives
    OpenFlamingo's logits for the weights as they are now."""
    of_model = build_openflamingo("llama", 2, seed=130)
    drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=1, max_seq_len=96)
    vision, ids, mask = shots_prompt(2)
    for _ in range(2):
        drop_in.generate(vision, ids, mask, max_new_tokens=1)
    assert drop_in.fast.context_cache_stats().context_hits == 1
    trained = [*of_model.perceiver.parameters(), *of_model.lang_encoder.gated_cross_attn_layers.parameters(),
               of_model.lang_encoder.get_input_embeddings().weight]
    other = build_openflamingo("llama", 2, seed=131).state_dict()
    q_proj = of_model.lang_encoder.model.layers[1].decoder_layer.self_attn.q_proj

    def step():
        with torch.no_grad():
            torch._foreach_add_(trained, [0.02 * torch.randn(p.shape) for p in trained])

    def replace():
        q_proj.weight.data = 1.5 * q_proj.weight.data

    for update in (step, lambda: of_model.load_state_dict(other), replace):
        update()
        _, logits = drop_in.generate(vision, ids, mask, max_new_tokens=1, return_logits=True)
        with torch.no_grad():
            expected = of_model(vision, ids, attention_mask=mask).logits[:, -1]
        assert_close(logits[:, 0], expected, dtype=FP32)


def _with_generation_config(lang, base, fields: dict):
    """The LM's generation_config: a copy of `base` with `fields` set (each case starts from the model's own)."""
    import copy

    config = copy.deepcopy(base)
    for name, value in fields.items():
        setattr(config, name, value)
    lang.generation_config = config


def test_generation_config_fields_as_openflamingo_applies_them():
    """Each field that matters, set on the LM's generation_config (read when the drop-in is built), against
    OpenFlamingo's generate under the installed transformers with the same call: max_length counts the prompt and
    yields to max_new_tokens (transformers 4.57 takes max_length=20 as its default of 20 new tokens, 5.x as a
    length); OpenFlamingo passes num_beams=1 and eos_token_id=<|endofchunk|> itself, so the config's never apply;
    pad_token_id, min_new_tokens, length_penalty and do_sample do."""
    of_model = build_openflamingo("llama", 2, seed=140)
    lang, saved = of_model.lang_encoder, of_model.lang_encoder.generation_config
    vision, ids, mask = batch([([0, 6], 12), ([1], 7)], num_images=2)
    prompt = ids.shape[1]
    options = dict(backend="torch", max_batch_size=2, max_seq_len=64, max_hypotheses=8)
    greedy = flamingo_fast.from_openflamingo(of_model, **options).generate(vision, ids, mask, max_new_tokens=6,
                                                                           eos_token_id=[])
    stop = int(greedy[1, prompt + 1])  # row 1's second token: it stops there, row 0 later or never
    cases = [
        ({"max_length": prompt + 3}, {}),
        ({"max_length": 20}, {}),  # 4.57: its default, 20 new tokens; 5.x: 8 new tokens
        ({"max_length": prompt + 9}, {"max_new_tokens": 2}),
        ({}, {"max_length": prompt + 2}),
        ({"num_beams": 3, "max_new_tokens": 3}, {}),
        ({"num_beams": 2, "length_penalty": -2.0, "max_new_tokens": 3}, {"num_beams": 3, "use_cache": False}),
        ({"eos_token_id": stop, "max_new_tokens": 3}, {}),
        ({"pad_token_id": 7, "max_new_tokens": 3}, {"eos_token_id": stop}),
        ({"min_new_tokens": 3, "max_new_tokens": 4}, {"eos_token_id": stop}),
    ]
    try:
        for fields, call in cases:
            _with_generation_config(lang, saved, fields)
            drop_in = flamingo_fast.from_openflamingo(of_model, **options)
            with torch.no_grad():
                expected = of_model.generate(vision, ids, attention_mask=mask, **call)
            got = drop_in.generate(vision, ids, mask, **call)
            assert torch.equal(got, expected), f"{fields} {call}\nours:\n{got[:, prompt:]}\n" \
                                               f"OpenFlamingo:\n{expected[:, prompt:]}"
        # do_sample from the config samples (OpenFlamingo's draws come from the global RNG, ours from a generator)
        _with_generation_config(lang, saved, {"do_sample": True, "max_new_tokens": 6})
        drop_in = flamingo_fast.from_openflamingo(of_model, **options)
        draws = {tuple(drop_in.generate(vision, ids, mask, eos_token_id=[],
                                        generator=torch.Generator().manual_seed(s)).flatten().tolist())
                 for s in range(3)}
        assert len(draws) > 1 and tuple(greedy.flatten().tolist()) not in draws
    finally:
        lang.generation_config = saved


def test_left_padded_batch_without_attention_mask_as_openflamingo():
    """No attention_mask: transformers' generate under OpenFlamingo infers it from the pad token when the pad occurs
    in lang_x and is not a stop token (here the LM's pad, 98, and <|endofchunk|>), else takes every token as real
    (pad_token_id=<|endofchunk|>); the drop-in does the same. A pad after a real token is an error naming
    attention_mask."""
    of_model = build_openflamingo("llama", 2, seed=150)
    drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=2, max_seq_len=96)
    vision, ids, _ = batch([([0, 6, 12], 18), ([1], 7)], num_images=3)
    for call in ({}, {"pad_token_id": EOC}):
        with torch.no_grad():
            out = of_model.generate(vision, ids, max_new_tokens=4, output_logits=True, return_dict_in_generate=True,
                                    **call)
        got, logits = drop_in.generate(vision, ids, max_new_tokens=4, return_logits=True, **call)
        assert torch.equal(got, out.sequences), call
        assert_close(logits, torch.stack(out.logits, dim=1), dtype=FP32)
    holed = ids.clone()
    holed[0, 10] = PAD
    with pytest.raises(ValueError, match=r"attention_mask: None, and lang_x row 0 holds pad_token_id=98"):
        drop_in.generate(vision, holed, max_new_tokens=2)
