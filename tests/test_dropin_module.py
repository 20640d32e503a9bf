"""The drop-ins as torch.nn.Modules (dropins/module.py) and the modes every call runs in (modes.py), in the main
environment: OpenFlamingoRuntime over a tiny reference and IdeficsRuntime over the idefics-tiny layout (no
transformers needed).

- the drop-in's parameters and state dict are the model's own tensors; `.to` rebuilds the runtime over the moved
  tensors (fused weights included); `load_state_dict` copies into them; DDP (CPU form: gloo, no device_ids)
  wraps it without changing a result;
- results inside autocast regions (CPU and CUDA, bf16 and fp16) equal those outside, for greedy and beam
  generate, score and forward, on FastFlamingo and both drop-ins;
- inference_mode, no_grad and plain calls in either order (and a runtime built inside inference_mode) give
  the same results and no error.
The real open_flamingo model (its names, its trainable parameters under DDP) is at the end of
test_openflamingo.py."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from builders import idefics_batch
from checkpoint_files import OPTIONS as LOADING_OPTIONS
from checkpoint_files import TINY as LOADING_TINY
from checkpoint_files import write_files

import flamingo_fast
from flamingo_fast.config import from_name
from flamingo_fast.dropins.idefics import IdeficsRuntime
from flamingo_fast.dropins.openflamingo import OpenFlamingoRuntime
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.fused_weights import already_fused
from flamingo_fast.runtime.runtime import FastFlamingo

TINY, IDEFICS = from_name("tiny"), from_name("idefics-tiny")
KINDS = ("fast", "openflamingo", "idefics")
DROP_INS = ("openflamingo", "idefics")
OPTIONS = dict(backend="auto", max_batch_size=2, max_seq_len=64, max_tail_len=8)
CANDIDATES = [[5], [7, 8], [9, 10, 11], [7, 12]]
CALLS = ("greedy", "beams", "score", "forward")


def build(kind: str, seed: int = 1, device: str = "cpu", dtype: torch.dtype | None = None):
    """A fresh tiny model of `kind` ("fast": a bare FastFlamingo) on `device`; the same seed, the same weights."""
    config = IDEFICS if kind == "idefics" else TINY
    reference = build_reference(config, seed=seed).to(device)
    if dtype is not None:
        reference = reference.to(dtype)
    fast = FastFlamingo.from_reference(reference, **OPTIONS)
    if kind == "fast":
        return fast
    if kind == "openflamingo":
        return OpenFlamingoRuntime(fast, reference, None, {})
    return IdeficsRuntime(fast, reference, config.eos_token_id, config.pad_token_id, {})


def inputs(kind: str, device: str = "cpu") -> tuple:
    """The positional inputs of `kind`'s calls: (vision_x, lang_x, mask), or IDEFICS's (input_ids, mask,
    pixel_values, image_attention_mask); text before the first image, left padding, 2 and 1 images."""
    if kind == "idefics":
        vision, ids, mask, image_mask = idefics_batch([[("text", 3), "image", ("text", 4), "image", ("text", 2)],
                                                       ["image", ("text", 5)]], num_images=2)
        batch = (ids, mask, vision[:, :, 0], image_mask)
    else:
        from helpers import random_batch

        batch = random_batch(TINY, [([2, 7], 12), ([0], 8)], num_images=2)
    return tuple(t.to(device) for t in batch)


def call(runner, name: str, batch: tuple) -> torch.Tensor:
    if name == "greedy":
        return runner.generate(*batch, max_new_tokens=6)
    if name == "beams":
        return runner.generate(*batch, max_new_tokens=6, num_beams=3)
    if name == "score":
        return runner.score(*batch, candidates=CANDIDATES)
    out = runner(*batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def run_all(runner, batch: tuple) -> dict[str, torch.Tensor]:
    return {name: call(runner, name, batch) for name in CALLS}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    for name in CALLS:
        a, e = got[name], expected[name]
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}, {name}: {a.dtype} {tuple(a.shape)} vs " \
                                                          f"{e.dtype} {tuple(e.shape)}"
        assert torch.equal(a, e), f"{what}, {name}: max difference {(a.double() - e.double()).abs().max()}"


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (DDP's CPU form), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("kind", DROP_INS)
def test_parameters_and_state_dict_are_the_models_own(kind):
    drop_in = build(kind)
    reference = drop_in.reference
    assert isinstance(drop_in, torch.nn.Module) and not drop_in.training
    ours, theirs = dict(drop_in.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[name] is theirs[name] for name in ours)  # registered, never copied
    state = drop_in.state_dict()
    assert state.keys() == reference.state_dict().keys()
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in reference.state_dict().items())
    assert drop_in.eval() is drop_in and not drop_in.training


@pytest.mark.parametrize("kind", DROP_INS)
def test_to_a_dtype_rebuilds_the_runtime_over_the_moved_tensors(kind):
    """`.to(bfloat16)` converts the shared tensors (each fused LLaMA weight splits into one tensor per Linear);
    the rebuilt runtime fuses them again and gives what a runtime built on the converted model gives."""
    drop_in = build(kind)
    engine = drop_in.fast
    assert drop_in.to("cpu") is drop_in and drop_in.fast is engine  # nothing moved: nothing rebuilt
    batch = inputs(kind)
    run_all(drop_in, batch)  # caches, tail cache and context cache in use before the move
    drop_in.to(torch.bfloat16)
    expected = run_all(build(kind, dtype=torch.bfloat16), batch)
    assert_same(run_all(drop_in, batch), expected, ".to(bfloat16)")
    fast = drop_in.fast
    assert fast is not engine and fast.dtype == torch.bfloat16 and fast.stack.fused_projections
    attn = drop_in.reference.lang_encoder.layers[0].self_attn
    assert already_fused([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) is not None


@pytest.mark.parametrize("kind", DROP_INS)
def test_a_conversion_to_a_dtype_the_runtime_does_not_run_is_refused_at_once(kind):
    """`.double()` is refused when it is called, naming the dtype, before anything converts (the rebuild on the
    next call would refuse float64, naming from_reference, which the caller never called)."""
    drop_in = build(kind)
    engine = drop_in.fast
    for convert in (lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.to("cpu", torch.float64)):
        with pytest.raises(ValueError, match=r"converting the drop-in's torch.float32 weights to torch.float64: "
                                             r"unsupported by FastFlamingo; expected one of float32, float16, "
                                             r"bfloat16"):
            convert(drop_in)
    assert drop_in.fast is engine and {t.dtype for t in drop_in.state_dict().values()} == {torch.float32}
    drop_in.generate(*inputs(kind), max_new_tokens=2)  # still runs, unconverted


@pytest.mark.parametrize("kind", DROP_INS)
def test_numpy_ids_are_taken_as_lists_and_meta_inputs_are_named(kind):
    """A 1-D numpy eos_token_id and 1-D numpy candidates give what the lists give (as 1-D tensors do); a 2-D eos
    array and the image or text tensor on the meta device are errors naming the argument."""
    drop_in, batch = build(kind), inputs(kind)
    stops = [drop_in.config.eos_token_id, 7]
    expected = drop_in.generate(*batch, max_new_tokens=6, eos_token_id=stops)
    assert torch.equal(drop_in.generate(*batch, max_new_tokens=6, eos_token_id=np.array(stops)), expected)
    with pytest.raises(ValueError, match=r"eos_token_id: got a ndarray of shape \(1, 2\); expected a token id or "
                                         r"a list of them"):
        drop_in.generate(*batch, max_new_tokens=6, eos_token_id=np.array([stops]))
    expected = drop_in.score(*batch, candidates=CANDIDATES)
    assert torch.equal(drop_in.score(*batch, candidates=[np.array(c) for c in CANDIDATES]), expected)
    image, text = (0, 1) if kind == "openflamingo" else (2, 0)
    names = ("vision_x", "lang_x") if kind == "openflamingo" else ("pixel_values", "lang_x")
    for index, name in zip((image, text), names, strict=True):
        on_meta = tuple(t.to("meta") if i == index else t for i, t in enumerate(batch))
        for run, options in ((drop_in, {}), (drop_in.generate, {"max_new_tokens": 2}),
                             (drop_in.score, {"candidates": CANDIDATES})):
            with pytest.raises(ValueError, match=f"{name}: on the meta device .*expected a tensor with values on a "
                                                 f"real device"):
                run(*on_meta, **options)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", DROP_INS)
def test_cuda_moves_the_runtime(kind):
    drop_in = build(kind)
    drop_in.cuda()
    expected = run_all(build(kind, device="cuda"), inputs(kind, "cuda"))
    assert_same(run_all(drop_in, inputs(kind, "cuda")), expected, ".cuda()")
    assert drop_in.fast.device.type == "cuda" and drop_in.fast.backend == "triton"


@pytest.mark.parametrize("kind", DROP_INS)
def test_load_state_dict_copies_into_the_shared_tensors(kind):
    drop_in = build(kind, seed=1)
    batch = inputs(kind)
    run_all(drop_in, batch)  # fills the context cache with the old weights' keys/values
    other = build(kind, seed=2)
    drop_in.load_state_dict(other.state_dict())
    assert drop_in.fast.context_cache_stats().bytes == 0
    assert_same(run_all(drop_in, batch), run_all(other, batch), "after load_state_dict")
    with pytest.raises(ValueError, match="assign=True"):
        drop_in.load_state_dict(other.state_dict(), assign=True)


@pytest.mark.parametrize("kind", DROP_INS)
def test_ddp_cpu_form_wraps_without_changing_a_result(kind, process_group):
    drop_in = build(kind)
    batch = inputs(kind)
    expected = run_all(drop_in, batch)
    ddp = torch.nn.parallel.DistributedDataParallel(drop_in)
    assert ddp.module is drop_in
    assert_same(run_all(ddp.module, batch), expected, "through DDP(...).module")
    with torch.no_grad():
        assert torch.equal(ddp(*batch).logits, expected["forward"])  # DDP's own forward


def test_load_openflamingo_trains_what_openflamingo_trains(tmp_path, process_group):
    """OpenFlamingo's factory leaves the perceiver, the gated blocks and the input embeddings trainable and
    freezes the rest; DDP (which refuses a model with nothing trainable) sees the same on the loaded drop-in."""
    files = write_files(build_reference(LOADING_TINY, seed=3), tmp_path)
    drop_in = flamingo_fast.load_openflamingo(*files, **LOADING_OPTIONS)
    trainable = {n for n, p in drop_in.named_parameters() if p.requires_grad}
    expected = {n for n, _ in drop_in.named_parameters()
                if n.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers.",
                                 "lang_encoder.model.embed_tokens."))}
    assert trainable == expected and expected
    ddp = torch.nn.parallel.DistributedDataParallel(drop_in)
    assert ddp.module is drop_in


@pytest.mark.cuda
@pytest.mark.parametrize("kind", DROP_INS)
def test_ddp_gpu_form_wraps_without_changing_a_result(kind, tmp_path):
    drop_in = build(kind).cuda()
    batch = inputs(kind, "cuda")
    expected = run_all(drop_in, batch)
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(drop_in, device_ids=[torch.cuda.current_device()])
        assert ddp.module is drop_in
        assert_same(run_all(ddp.module, batch), expected, "through DDP(..., device_ids).module")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ autocast


AUTOCAST = [("cpu", torch.bfloat16), ("cpu", torch.float16),
            pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),
            pytest.param("cuda", torch.float16, marks=pytest.mark.cuda)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_an_autocast_region_changes_no_result(kind, device, dtype):
    """The runtime computes in its construction dtype (float32 here) inside any autocast region."""
    runner, batch = build(kind, device=device), inputs(kind, device)
    expected = run_all(runner, batch)
    with torch.autocast(device, dtype=dtype):
        got = run_all(runner, batch)
    assert_same(got, expected, f"inside autocast({device!r}, {dtype})")
    fresh = build(kind, device=device)  # and when the region holds an instance's first calls
    with torch.autocast(device, dtype=dtype):
        got = run_all(fresh, batch)
    assert_same(got, expected, f"first calls inside autocast({device!r}, {dtype})")


# ------------------------------------------------------------------------------------------ inference mode


MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}
ORDERS = {"inference_mode first": ("inference_mode", "no_grad", "plain"),
          "plain first": ("plain", "no_grad", "inference_mode"),
          "built in inference_mode": ("plain", "inference_mode")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ORDERS)
def test_inference_mode_and_no_grad_in_either_order(kind, order):
    """Each call runs in each mode in turn on one instance, so that whatever a call allocates first (the tail
    cache on the first beam search, context-cache entries) is allocated in the first mode and reused in the
    others; every result equals a fresh instance's, called plainly."""
    batch = inputs(kind)
    expected = run_all(build(kind), batch)
    if order == "built in inference_mode":
        with torch.inference_mode():
            runner = build(kind)
    else:
        runner = build(kind)
    for name in CALLS:
        for mode in ORDERS[order]:
            with MODES[mode]():
                got = call(runner, name, batch)
            assert torch.equal(got, expected[name]), f"{name} under {mode} ({order})"
            assert not got.is_inference()


# ------------------------------------------------------------------------------------------ weights="int8"


def build_int8(kind: str, live: torch.nn.Module, with_live: bool = True, **options):
    """The drop-in over `live` (the caller's float model, standing in for the open_flamingo / transformers one)
    with weights="int8": as from_openflamingo and from_idefics build it (`with_live`: `live` passed as the model
    to register), or over a bare FastFlamingo.from_reference(live, weights="int8")."""
    config = live.config
    fast = FastFlamingo.from_reference(live, **{"weights": "int8", **OPTIONS, **options})
    model = live if with_live else None
    if kind == "openflamingo":
        return OpenFlamingoRuntime(fast, live, None, {}, model)
    return IdeficsRuntime(fast, live, config.eos_token_id, config.pad_token_id, {}, model)


def live_model(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return build_reference(IDEFICS if kind == "idefics" else TINY, seed=4).to(dtype)


@pytest.mark.parametrize("kind", DROP_INS)
def test_int8_drop_in_equals_the_int8_runtime_and_holds_no_live_float_weight(kind):
    live = live_model(kind)
    live_ptrs = {t.untyped_storage().data_ptr() for t in [*live.parameters(), *live.buffers()]}
    drop_in = build_int8(kind, live, dtype=torch.bfloat16)
    batch = inputs(kind)
    if kind == "openflamingo":  # a bare FastFlamingo takes OpenFlamingo's inputs
        expected = run_all(FastFlamingo.from_reference(live, weights="int8", dtype=torch.bfloat16, **OPTIONS), batch)
    else:
        expected = run_all(build_int8(kind, live, with_live=False, dtype=torch.bfloat16), batch)
    assert_same(run_all(drop_in, batch), expected, "int8 drop-in")
    held = [*drop_in.parameters(), *drop_in.buffers(), *drop_in.reference.parameters(),
            *drop_in.reference.buffers(), *drop_in.fast.model.parameters(), *drop_in.fast.model.buffers()]
    assert not [t for t in held if t.untyped_storage().data_ptr() in live_ptrs], "a live model's tensor is held"
    assert {t.dtype for t in drop_in.state_dict().values()} == {torch.int8, torch.bfloat16}
    float_build = FastFlamingo.from_reference(live, dtype=torch.bfloat16, **OPTIONS).weight_bytes()
    int8_bytes = drop_in.fast.weight_bytes()
    assert int8_bytes["int8"] > 0 and sum(int8_bytes.values()) < sum(float_build.values())


@pytest.mark.parametrize("kind", DROP_INS)
def test_int8_drop_in_lets_the_live_model_go(kind):
    """Same dtype: the copy keeps the unquantized tensors (no copy made), but nothing holds the live model or
    the float weights of the layers it quantized: `del model` frees them."""
    import gc
    import weakref

    live = live_model(kind, torch.bfloat16)
    quantized = [m.weight for m in live.lang_encoder.modules() if type(m) is torch.nn.Linear]
    quantized_ptrs = {w.untyped_storage().data_ptr() for w in quantized}
    live_ref, weight_ref = weakref.ref(live), weakref.ref(quantized[0])
    drop_in = build_int8(kind, live)
    del live, quantized
    gc.collect()
    assert live_ref() is None and weight_ref() is None
    held = [*drop_in.parameters(), *drop_in.buffers(), *drop_in.reference.parameters(), *drop_in.reference.buffers()]
    assert not [t for t in held if t.untyped_storage().data_ptr() in quantized_ptrs]


@pytest.mark.parametrize("kind", DROP_INS)
def test_int8_drop_in_rebuilds_after_a_move_and_refuses_a_dtype_conversion(kind):
    live = live_model(kind)
    drop_in = build_int8(kind, live, dtype=torch.bfloat16)
    batch = inputs(kind)
    expected = run_all(drop_in, batch)
    engine = drop_in.fast
    assert drop_in.to("cpu") is drop_in and drop_in.fast is engine  # nothing moved: nothing rebuilt
    for convert in (lambda m: m.to(torch.float16), lambda m: m.float(), lambda m: m.to("cpu", torch.float32),
                    lambda m: m.to(torch.bfloat16)):  # the last would convert the float32 scales
        with pytest.raises(ValueError, match="weights='int8'"):
            convert(drop_in)
    assert drop_in.fast is engine and {t.dtype for t in drop_in.state_dict().values()} == {torch.int8, torch.bfloat16}
    drop_in.share_memory()  # moves every storage (a CPU stand-in for `.to(device)`): the runtime is rebuilt
    fast = drop_in.fast
    assert fast is not engine and fast.options == engine.options and fast.weight_bytes() == engine.weight_bytes()
    assert_same(run_all(drop_in, batch), expected, "after share_memory()")


def test_int8_drop_in_joins_llama_projections_again_after_a_move():
    """`.to(device)` moves each buffer on its own, so the q/k/v (and gate/up) row views of one int8 matrix come
    apart; the rebuilt runtime joins them again (one GEMM each, as a build on that device has). The meta device
    stands in for CUDA: a move of every tensor, nothing computed."""
    drop_in = build_int8("openflamingo", live_model("openflamingo"), dtype=torch.bfloat16)
    assert drop_in.fast.stack.fused_projections
    drop_in.to("meta")
    fast = drop_in.fast
    assert fast.device.type == "meta" and fast.stack.fused_projections
    for layer in fast.model.lang_encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            assert already_fused([m.weight for m in group]) is not None
            assert already_fused([m.scales[:, None] for m in group]) is not None


@pytest.mark.cuda
@pytest.mark.parametrize("kind", DROP_INS)
def test_int8_drop_in_moves_to_cuda(kind):
    live = live_model(kind)
    drop_in = build_int8(kind, live, dtype=torch.bfloat16, backend="torch").cuda()
    expected = run_all(build_int8(kind, live.cuda(), dtype=torch.bfloat16, backend="torch"), inputs(kind, "cuda"))
    got = run_all(drop_in, inputs(kind, "cuda"))
    for name in CALLS:
        torch.testing.assert_close(got[name].float(), expected[name].float(), atol=0, rtol=0)


def test_load_openflamingo_passes_weights_on_and_keeps_no_float_copy(tmp_path):
    files = write_files(build_reference(LOADING_TINY, seed=3), tmp_path)
    drop_in = flamingo_fast.load_openflamingo(*files, **LOADING_OPTIONS, weights="int8")
    assert drop_in.reference is drop_in.fast.model  # the float model built from the files is not kept
    assert torch.int8 in {t.dtype for t in drop_in.state_dict().values()}
    with pytest.raises(ValueError, match="weights='int3'"):
        flamingo_fast.load_openflamingo(*files, **LOADING_OPTIONS, weights="int3")
    with pytest.raises(ValueError, match="weights='int3'"):
        build_int8("openflamingo", live_model("openflamingo"), weights="int3")
