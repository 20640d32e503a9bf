"""The decode step, as a function of explicit state: what the CUDA graphs capture (graphs.py).

    logits = decode_step(state, inputs, kv_len, per_row, tails)

`state` (DecodeState) holds everything the step reads besides its inputs: the layer wiring (layers.
LayerStack), the caches (StaticKVCache, MediaKVCache, TailKVCache) and the decode paths in use. Like vLLM's
graph runner, which takes its KV caches as arguments, the step reads no runtime object: a graph captured with one
state replays against the same buffers, which FastFlamingo allocates once and never replaces.

The decode paths are switched here too: DECODE_PATHS, DEFAULT_DECODE_PATHS, resolve_decode_paths. FastDecoder is
the search interface (generation/search.py's fork / step / reorder) over a FastFlamingo's caches, for one call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import masking
from ..config import FlamingoConfig
from ..positions import rotary_cos_sin
from .caches import MediaKVCache, StaticKVCache, TailKVCache
from .decode_forms import FusedKVWrite, KernelAttention, MaskedAttention, PlainKVWrite, write_target
from .graphs import DecodeInputs
from .layers import LayerStack

# The decode step's faster paths, each with a switch back to the old one for before/after measurements:
#   fused_projections  LLaMA: one GEMM for q/k/v and one for gate/up (fused weights, the modules' own are views)
#   rotary_kv_write    rotary on q, k and the K/V cache write in one kernel per layer
#   decode_attention   split-KV decode attention over each row's valid cache columns (no mask), and the cascade
#                      (prompt + tails) merged from its log-sum-exps
# FastFlamingo(decode_paths=...) picks them (default: DEFAULT_DECODE_PATHS of the backend); the environment
# variable FLAMINGO_FAST_OLD_DECODE="name,name" turns the named ones off in every instance (bench/gpu_check.sh).
DECODE_PATHS = ("fused_projections", "rotary_kv_write", "decode_attention")
# The torch backend keeps today's attention and rotary + index_copy: their twins are slower on the CPU (the `small`
# preset, 1 thread, bench/decode_ops_cpu.py: attention 1.3-3.7x, rotary + cache write 4.3-5.5x the old ops' time,
# per-call overhead of the general twins); the fused q/k/v GEMM costs the same as three (1.00-1.02x).
DEFAULT_DECODE_PATHS = {"triton": DECODE_PATHS, "torch": ("fused_projections",)}
OLD_DECODE_ENV = "FLAMINGO_FAST_OLD_DECODE"


def resolve_decode_paths(backend: str, decode_paths) -> frozenset[str]:
    """The new decode paths an instance uses: `decode_paths` (None: the backend's default) minus those named in
    FLAMINGO_FAST_OLD_DECODE."""
    chosen = DEFAULT_DECODE_PATHS[backend] if decode_paths is None else tuple(decode_paths)
    old = tuple(n.strip() for n in os.environ.get(OLD_DECODE_ENV, "").split(",") if n.strip())
    for where, names in (("decode_paths", chosen), (OLD_DECODE_ENV, old)):
        unknown = sorted(set(names) - set(DECODE_PATHS))
        if unknown:
            raise ValueError(f"{where}: unknown {unknown}; expected names from {DECODE_PATHS}")
    return frozenset(chosen) - frozenset(old)


@dataclass(frozen=True)
class DecodeState:
    """What the decode step reads besides its inputs. The caches are allocated once and written in place; `tail`
    is None until the first beam search allocates it (a step with tails needs it)."""

    stack: LayerStack
    kv: StaticKVCache
    media: MediaKVCache
    tail: TailKVCache | None
    paths: frozenset[str]
    # OpenFlamingo's generated-<image> behaviour (config.openflamingo_generated_image_bug): the hypotheses of a
    # row may attend to different images, so the cross-attention reads one image index per hypothesis
    image_per_hypothesis: bool = False

    @property
    def attention(self) -> KernelAttention | MaskedAttention:
        """The self-attention form: the split-KV kernel ("decode_attention") or SDPA over a mask."""
        return KernelAttention() if "decode_attention" in self.paths else MaskedAttention()

    @property
    def kv_write(self) -> FusedKVWrite | PlainKVWrite:
        """The K/V write: fused with rotary ("rotary_kv_write") or index_copy after the layers' rotary."""
        return FusedKVWrite() if "rotary_kv_write" in self.paths else PlainKVWrite()


def decode_step(state: DecodeState, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool) -> torch.Tensor:
    """One token per hypothesis -> logits [H, vocab]. Static shapes, no host sync, no allocation that
    depends on values: the function a CUDA graph captures.

    tails False (one hypothesis per row): each row owns its segment; the token is written to static-cache
    column `kv_column` and attends to columns [0, kv_len). tails True: hypothesis h = b * per_row + r of
    per_row attends to row b's prompt (static-cache columns [0, kv_len)) and to its own tail (tail columns
    [0, kv_column], the token written at kv_column), merged by log-sum-exp (attention.py). How the self-attention
    and the K/V write run is the state's choice (decode_forms.py, from the decode paths in use)."""
    stack = state.stack
    lm, model, ops = stack.lm, stack.lang_encoder, stack.ops
    attention, kv_write = state.attention, state.kv_write
    x = model.embed_tokens(inputs.token)[:, None]  # [H, 1, D]
    rope = None if lm.alibi else rotary_cos_sin(inputs.rope_position[:, None], lm.rotary_dim, lm.rope_theta,
                                                 x.dtype)
    cos_sin = (None, None) if rope is None else (rope[0][:, 0, 0], rope[1][:, 0, 0])  # [H, rotary_dim] each
    step = attention.prepare(state, inputs, kv_len, per_row, tails)
    per_hypothesis = state.image_per_hypothesis and per_row > 1
    image_index = inputs.image_index if per_hypothesis else inputs.image_index[::per_row]

    def cross(idx, x, h):
        slot = stack.xattn_slot[idx]
        return stack.xattn[idx].decode(  # a row's hypotheses share its image (the row's first one's index)
            x, h, state.media.keys[slot, :step.rows], state.media.values[slot, :step.rows],  # unless per_hypothesis
            image_index, inputs.row_images[::per_row], stack.input_norms[idx],
            queries_per_row=per_row, index_per_query=per_hypothesis,
        )

    def attend(idx, q, k, v):
        q = kv_write.write(ops, q, k, v, cos_sin, *write_target(state, step, idx), inputs.kv_column)
        return attention.attend(state, step, idx, q)

    rope_for_qkv = None if kv_write.rotates else rope  # a fused write rotates q and k itself
    return model.output_head(stack.layers(x, rope_for_qkv, cross, attend)[:, 0])


class DecodeRunner(Protocol):
    """What FastDecoder needs of its runtime (FastFlamingo)."""

    config: FlamingoConfig

    def run_decode_step(self, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool, graphs: bool = True,
                        tail: TailKVCache | None = None) -> torch.Tensor: ...

    def beam_tail_cache(self) -> TailKVCache: ...


class FastDecoder:
    """The search interface (flamingo_fast/generation/search.py) over FastFlamingo's caches, for one call.

    Owned segments (`fork(1)`): the row's new tokens follow its prompt in its static-cache row. Shared prompt
    (`fork(n)` with n > 1, or `shared=True`): the row's hypotheses read its prompt KV and media K/V in place;
    each one's new tokens go to its own TailKVCache row, and `reorder` gathers tails only (the count per row may
    change, as scoring's trie levels do). Each `step` is one decode step (a CUDA-graph replay on a GPU unless
    `graphs` is off) with no host sync. `tail`: the tail cache, the runtime's (allocated on the first shared
    fork: beams) unless the caller passes one for the call (score)."""

    def __init__(self, runtime: DecodeRunner, prompt_len: int, last_position: torch.Tensor,
                 image_index: torch.Tensor, row_images: torch.Tensor, graphs: bool = True,
                 tail: TailKVCache | None = None):
        self.runtime, self.prompt_len = runtime, prompt_len
        self.last_position, self.image_index, self.row_images = last_position, image_index, row_images
        self.per_row, self.shared, self.tail_len, self.inputs = 1, False, 0, None
        self.graphs, self.tail = graphs, tail

    @classmethod
    def over_prompt(cls, runtime: DecodeRunner, lang_x: torch.Tensor, attention_mask: torch.Tensor,
                    prompt: masking.PromptImages, pre_image_bug: bool, graphs: bool = True,
                    tail: TailKVCache | None = None) -> FastDecoder:
        """The decoder over prompts just prefilled into the runtime's caches: each row's last position, and the
        image slots its new tokens see (every row's last one with OpenFlamingo's pre-image bug)."""
        slots = prompt.slots
        row_images = torch.tensor([max(slots)] * len(slots) if pre_image_bug else slots, dtype=torch.int32,
                                  device=lang_x.device)
        last_position = masking.positions_from_mask(attention_mask)[:, -1]
        return cls(runtime, lang_x.shape[1], last_position, prompt.decode_image, row_images, graphs, tail)

    @property
    def rows(self) -> int:
        return self.last_position.shape[0]

    def fork(self, per_row: int, shared: bool | None = None) -> None:
        """Every row becomes `per_row` hypotheses with empty tails, from its prompt (again, if forked before)."""
        self.per_row, self.tail_len = per_row, 0
        self.shared = per_row > 1 if shared is None else shared
        if self.shared:
            self.tail = self.tail or self.runtime.beam_tail_cache()
            self._check_hypotheses(self.rows * per_row)
        elif per_row != 1:
            raise ValueError(f"fork: per_row={per_row} needs shared=True (rows own their segment only alone)")
        device = self.last_position.device
        self.inputs = DecodeInputs(
            token=torch.zeros(self.rows * per_row, dtype=torch.long, device=device),
            rope_position=self.last_position.repeat_interleave(per_row),
            kv_column=torch.full((1,), -1 if self.shared else self.prompt_len - 1, dtype=torch.long, device=device),
            prompt_columns=torch.full((1,), self.prompt_len, dtype=torch.long, device=device),
            image_index=self.image_index.repeat_interleave(per_row),
            row_images=self.row_images.repeat_interleave(per_row),
        )

    def _check_hypotheses(self, hypotheses: int) -> None:
        if hypotheses > self.tail.max_hypotheses:
            raise ValueError(f"{hypotheses} hypotheses exceed the {self.tail.max_hypotheses} rows of the tail cache "
                             f"(max_hypotheses of this FastFlamingo, or score's pass)")

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs
        inputs.token = tokens
        if self.runtime.config.openflamingo_generated_image_bug:  # 1-based in masking's helper, 0-based here
            inputs.image_index = masking.image_after_generated_tokens(
                tokens, inputs.image_index + 1, self.runtime.config.media_token_id) - 1
        inputs.rope_position = inputs.rope_position + 1
        inputs.kv_column = inputs.kv_column + 1
        self.tail_len += 1
        if self.shared and self.tail_len > self.tail.max_tail_len:
            raise ValueError(f"step: tail of {self.tail_len} tokens exceeds the tail cache's {self.tail.max_tail_len} "
                             f"(max_tail_len of this FastFlamingo, or score's longest candidate)")
        kv_len = self.prompt_len if self.shared else self.prompt_len + self.tail_len
        return self.runtime.run_decode_step(inputs, kv_len, self.per_row, self.shared, self.graphs,
                                            self.tail if self.shared else None).float()

    def reorder(self, index: torch.Tensor) -> None:
        """Hypothesis h continues old hypothesis index[h], which must belong to the same row; len(index) may
        be any multiple of the row count."""
        if not self.shared:
            raise ValueError("reorder: rows that own their segment cannot reorder; fork(per_row, shared=True) first")
        self._check_hypotheses(index.shape[0])
        self.tail.reorder(index, self.tail_len)
        inputs = self.inputs
        inputs.rope_position, inputs.row_images = inputs.rope_position[index], inputs.row_images[index]
        inputs.image_index = masking.image_after_reorder(inputs.image_index, index,
                                                         self.runtime.config.openflamingo_generated_image_bug)
        self.per_row = index.shape[0] // self.rows
