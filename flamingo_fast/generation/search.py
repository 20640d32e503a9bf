"""Search strategies over a model's decoder, kept apart from model execution.

A model call (the reference `Flamingo` or `FastFlamingo`) prefills the prompt and hands back a decoder and the
logits of each row's last prompt token. A search reaches the model only through the decoder's three methods:

    fork(per_row)     each prompt row b becomes `per_row` hypotheses b * per_row + j, with empty tails (from the
                      prompt again when called again; `shared=True` keeps the prompt shared even for one)
    step(tokens)      [H] tokens -> [H, vocab] float32 logits; appends one tail column per hypothesis
    reorder(index)    hypothesis h continues old hypothesis index[h] (always a hypothesis of the same row); the
                      count per row may change

Hypotheses are grouped by row and every row has the same count. That is what beams (N per row) and scoring
(the same candidates for every row) both need, and it lets the fast decoder attend from all of a row's
hypotheses to the row's prompt as one matrix-matrix product.

- `sample_search`: greedy and sampled decoding (one hypothesis per row; sampling with num_return_sequences R
  forks each row into R hypotheses that share its prompt and draw apart, rows b * R + j, as transformers expands
  the batch).
- `beam_search`: Hugging Face's beam search, vectorised over rows and beams on the device.
- `beam_search_ref`: the same semantics written plainly, one hypothesis at a time: its twin in tests.
- `generation_options`, `generate_ids`: the generate call shared by the reference and the runtime (Hugging
  Face's generate options are translated to GenerationOptions in dropins/hf.py).

Beam search follows Hugging Face transformers 4.57 (`GenerationMixin._beam_search`, the vectorised rewrite of
4.50 that OpenFlamingo's evaluation runs on with that release):
- a beam's score is the sum of its tokens' log-softmax (float32); `min_new_tokens` sets the stop tokens'
  log-probs to -inf without renormalising;
- each step keeps the best K = max(2, 1 + len(stops)) * num_beams continuations of all beams; the best
  `num_beams` of them that do not stop continue; among the first `num_beams` of the K, those that stop (a stop
  token, or the last allowed token) are finished hypotheses scored sum_logprobs / new_len ** length_penalty;
  each row keeps its best `num_beams` finished ones;
- `early_stopping=True` stops a row once it holds `num_beams` finished hypotheses; `False` once the best
  running beam, scored at its current length, cannot beat the worst finished one; `"never"` likewise, but
  scored at `max_new_tokens` when length_penalty > 0. A batch stops when every row has;
- the result is each row's best `num_return_sequences` finished hypotheses, best first, padded to the longest.
Releases before 4.50 (the BeamScorer) scored the early-stop heuristic on the whole sequence length (prompt
included) with `early_stopping=False`, and so stopped at other steps; they are not matched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..checks import check_int, is_int
from .sampling import SamplingOptions, select_next_token

EARLY_STOPPING = (False, True, "never")
_NEG = -1.0e9  # Hugging Face's "impossible" score: added, never compared with -inf


class Decoder(Protocol):
    def fork(self, per_row: int, shared: bool | None = None) -> None: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, index: torch.Tensor) -> None: ...


def as_token_id(value, name: str, vocab_size: int) -> int:
    """An int, a 0-d integer tensor or a numpy integer -> int in [0, vocab); bools and floats are refused."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    elif type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and value.dtype.kind in "iu":
        value = int(value)
    if not is_int(value) or not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value!r}: expected a token id in [0, {vocab_size})")
    return value


def stop_token_ids(eos_token_id, default: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    """None -> `default`; an id (int, 0-d tensor, numpy int) or a list of ids (list, tuple, 1-D tensor or 1-D
    numpy array) -> exactly those; [] -> never."""
    if eos_token_id is None:
        return tuple(default)
    array = isinstance(eos_token_id, torch.Tensor) or type(eos_token_id).__module__ == "numpy"
    ndim = getattr(eos_token_id, "ndim", 0) if array else 0
    if isinstance(eos_token_id, (list, tuple)) or ndim == 1:
        return tuple(as_token_id(t, "eos_token_id", vocab_size) for t in eos_token_id)
    if ndim > 1:
        raise ValueError(f"eos_token_id: got a {type(eos_token_id).__name__} of shape {tuple(eos_token_id.shape)}; "
                         f"expected a token id or a list of them (list, tuple, 1-D tensor or 1-D numpy array)")
    return (as_token_id(eos_token_id, "eos_token_id", vocab_size),)


@dataclass(frozen=True)
class GenerationOptions:
    """Every option of a generate call, checked once. Sampling options are checked only when sampling and
    beam options only with num_beams > 1; elsewhere they have no effect, as in Hugging Face's generate."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    stop_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 0)
        check_int("min_new_tokens", self.min_new_tokens, 0)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample={self.do_sample!r}: expected True or False")
        check_int("num_beams", self.num_beams, 1)
        check_int("num_return_sequences", self.num_return_sequences, 1)
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences={self.num_return_sequences!r}: expected an integer in "
                             f"[1, num_beams={self.num_beams}] (more only when sampling: do_sample=True)")
        if self.do_sample:
            if self.num_beams > 1:
                raise ValueError(f"do_sample=True with num_beams={self.num_beams}: beam sampling is not supported; "
                                 f"expected do_sample=False or num_beams=1")
            self.sampling  # noqa: B018  (checks temperature, top_k, top_p)
        if self.num_beams > 1:
            if self.early_stopping not in EARLY_STOPPING or not isinstance(self.early_stopping, (bool, str)):
                raise ValueError(f"early_stopping={self.early_stopping!r}: expected True, False or 'never'")
            if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                    or not math.isfinite(self.length_penalty):
                raise ValueError(f"length_penalty={self.length_penalty!r}: expected a finite number")

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.do_sample, self.temperature, self.top_k, self.top_p)

    @property
    def hypotheses_per_row(self) -> int:
        """What each row forks into: its beams, or its samples."""
        return self.num_beams if self.num_beams > 1 else self.num_sequences

    @property
    def num_sequences(self) -> int:
        """Output rows per prompt row (the hypotheses a row forks into when sampling)."""
        return self.num_return_sequences if self.num_beams > 1 or self.do_sample else 1


# ----------------------------------------------------------------------------------------------------------
# Greedy and sampling
# ----------------------------------------------------------------------------------------------------------


def sample_search(decoder: Decoder, first_logits: torch.Tensor, options: GenerationOptions,
                  generator: torch.Generator | None = None, stop_check_interval: int = 1, timer=None,
                  return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy or sampled tokens, one hypothesis per row (R = options.num_sequences per row when sampling: rows
    b * R + j, sharing the row's prompt) -> (tokens [B * R, L], logits [B * R, L, vocab] float32 or None).

    A row stops at its first stop token and is then filled with `pad_token_id`; L is the step at which every
    row has stopped (or max_new_tokens). The host looks at `finished` only every `stop_check_interval` steps;
    the steps run past the last stop are trimmed off, and the generator is put back to its state right after
    the last kept draw, so a reused seeded generator gives the same samples as with a check at every step.
    """
    per_row = options.num_sequences
    if per_row > 1:
        first_logits = first_logits.repeat_interleave(per_row, dim=0)
    batch = first_logits.shape[0]
    device = first_logits.device
    stops = torch.tensor(options.stop_ids, dtype=torch.long, device=device)
    tokens = torch.full((batch, options.max_new_tokens), options.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sampling = options.sampling
    keep_states = options.do_sample and generator is not None and stop_check_interval > 1
    states: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    decoder.fork(per_row)
    logits, steps_done = first_logits, 0
    for step in range(options.max_new_tokens):
        if return_logits:
            step_logits.append(logits.to(torch.float32, copy=True))  # a graph's output buffer is reused
        scores = logits.index_fill(-1, stops, float("-inf")) if step < options.min_new_tokens else logits
        token = select_next_token(scores, sampling, generator)
        if keep_states:
            states.append(generator.get_state())
        token = torch.where(finished, torch.full_like(token, options.pad_token_id), token)
        tokens[:, step] = token
        finished = finished | torch.isin(token, stops)
        steps_done = step + 1
        if timer is not None:
            timer.lap("prefill" if step == 0 else "decode")
        if steps_done == options.max_new_tokens or (steps_done % stop_check_interval == 0 and bool(finished.all())):
            break
        logits = decoder.step(token)

    # Keep the steps up to the one at which every row had stopped: what a check at every step returns.
    tokens = tokens[:, :steps_done]
    done = torch.isin(tokens, stops).cumsum(dim=1) > 0  # [B, steps]: row finished at or before step
    all_done = done.all(dim=0).nonzero()
    length = int(all_done[0]) + 1 if len(all_done) else steps_done
    if keep_states and length < steps_done:
        generator.set_state(states[length - 1])
    logits_out = None
    if return_logits:
        logits_out = torch.stack(step_logits[:length], dim=1) if length else first_logits.new_zeros(
            batch, 0, first_logits.shape[-1], dtype=torch.float32)
    return tokens[:, :length], logits_out


# ----------------------------------------------------------------------------------------------------------
# Beam search, vectorised
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BeamResult:
    """Each row's best `num_return_sequences` hypotheses, best first: row b's k-th is index b * K + k."""

    tokens: torch.Tensor  # [B * K, L] long: the new tokens, padded with pad_token_id after each one ends
    scores: torch.Tensor  # [B * K] float32: sum of log-probs / new_length ** length_penalty


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, M, ...] gathered along dim 1 by index [B, M'] -> [B, M', ...]."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(decoder: Decoder, first_logits: torch.Tensor, options: GenerationOptions,
                stop_check_interval: int = 1, timer=None) -> BeamResult:
    """Hugging Face's beam search (module docstring) over `decoder`, all rows and beams as tensors.

    first_logits [B, vocab]: each row's next-token logits after its prompt. Per step: one `reorder` (the
    surviving beams' parents) and one `step`; the host reads only the stop flag, every `stop_check_interval`
    steps. Steps run past a row's stop change nothing (its finished set is frozen), so the result is the same
    as with a check at every step."""
    batch, vocab = first_logits.shape
    beams, new_max = options.num_beams, options.max_new_tokens
    device = first_logits.device
    stops = torch.tensor(options.stop_ids, dtype=torch.long, device=device)
    keep = max(2, 1 + len(options.stop_ids)) * beams
    if keep > beams * vocab:
        raise ValueError(f"num_beams={beams}: needs {keep} candidates per row but there are only "
                         f"{beams * vocab} (beams x vocabulary)")
    lp, early = options.length_penalty, options.early_stopping
    top_beams_mask = torch.arange(keep, device=device) < beams

    running = torch.full((batch, beams, new_max), options.pad_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEG  # every beam starts as the prompt: only the first one's continuations count
    finished = running.clone()
    finished_scores = torch.full((batch, beams), _NEG, device=device)
    finished_len = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    row_offset = torch.arange(batch, device=device)[:, None] * beams

    decoder.fork(beams)
    logits = first_logits.repeat_interleave(beams, dim=0)
    for step in range(new_max):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if step < options.min_new_tokens:
            log_probs = log_probs.index_fill(-1, stops, float("-inf"))
        total = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        top_scores, top_index = torch.topk(total, keep)
        top_parent, top_token = top_index // vocab, top_index % vocab
        top_seqs = _gather(running, top_parent)
        top_seqs[:, :, step] = top_token
        hits = torch.isin(top_token, stops) | (step + 1 >= new_max)  # stop token, or the last allowed token

        # the best `beams` continuations that go on
        going = top_scores + hits.to(torch.float32) * _NEG
        next_index = torch.topk(going, beams).indices
        running, running_scores = _gather(top_seqs, next_index), _gather(going, next_index)
        parent = _gather(top_parent, next_index)

        # finished hypotheses: only among the first `beams` candidates, and only while the row can improve
        just_finished = hits & top_beams_mask[None, :]
        candidate = top_scores / ((step + 1) ** lp)
        candidate += (is_finished.all(dim=-1, keepdim=True) & (early is True)).to(torch.float32) * _NEG
        candidate += (~improvable).to(torch.float32) * _NEG
        candidate += (~just_finished) * _NEG
        merged_scores = torch.cat([finished_scores, candidate], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = _gather(torch.cat([finished, top_seqs], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        finished_len = _gather(torch.cat([finished_len, torch.full_like(top_token, step + 1)], dim=1), best)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)

        # can a running beam still beat the worst finished one? (sticky once no)
        best_len = new_max if early == "never" and lp > 0.0 else step + 1
        best_running = running_scores[:, :1] / (best_len**lp)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if timer is not None:
            timer.lap("prefill" if step == 0 else "decode")
        if step + 1 == new_max:
            break
        if (step + 1) % stop_check_interval == 0:
            going_on = improvable.any() & ~(is_finished.all() & (early is True)) & ~hits.all()
            if not bool(going_on):
                break
        decoder.reorder((parent + row_offset).flatten())
        logits = decoder.step(running[:, :, step].flatten())

    k = options.num_return_sequences
    length = int(finished_len[:, :k].max())
    return BeamResult(finished[:, :k, :length].flatten(0, 1), finished_scores[:, :k].flatten())


# ----------------------------------------------------------------------------------------------------------
# Beam search, plainly: the twin
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Hypothesis:
    score: float  # running: sum of log-probs; finished: that / new_length ** length_penalty
    tokens: list[int]
    slot: int = 0  # running: its decoder hypothesis index within the row


def beam_search_ref(decoder: Decoder, first_logits: torch.Tensor, options: GenerationOptions,
                    timer=None) -> BeamResult:
    """The semantics of `beam_search`, one hypothesis at a time in Python lists, checking the stop at every
    step. Slow and plain: the ground truth the vectorised search is tested against."""
    batch, vocab = first_logits.shape
    beams, new_max, lp = options.num_beams, options.max_new_tokens, options.length_penalty
    keep = max(2, 1 + len(options.stop_ids)) * beams
    stops = set(options.stop_ids)
    running = [[_Hypothesis(0.0, [], 0)] for _ in range(batch)]  # each row starts as one beam: its prompt
    done: list[list[_Hypothesis]] = [[] for _ in range(batch)]
    improvable = [True] * batch
    decoder.fork(beams)
    logits = first_logits.repeat_interleave(beams, dim=0)
    for step in range(new_max):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        last = step + 1 == new_max
        hits_all = True
        for b in range(batch):
            candidates = []
            for hyp in running[b]:
                row = log_probs[b * beams + hyp.slot].clone()
                if step < options.min_new_tokens:
                    row[list(stops)] = float("-inf")
                best = torch.topk(row, min(keep, vocab))  # the row's best `keep` overall come from these
                for lp_token, token in zip(best.values.tolist(), best.indices.tolist(), strict=True):
                    candidates.append((hyp.score + lp_token, hyp, token))
            candidates.sort(key=lambda c: -c[0])
            candidates = candidates[:keep]
            full_before = len(done[b]) == beams
            going = []
            for rank, (score, hyp, token) in enumerate(candidates):
                stopped = token in stops or last
                if not stopped:
                    if len(going) < beams:
                        going.append(_Hypothesis(score, hyp.tokens + [token], hyp.slot))
                elif rank < beams and improvable[b] and not (full_before and options.early_stopping is True):
                    done[b].append(_Hypothesis(score / (step + 1) ** lp, hyp.tokens + [token]))
                hits_all = hits_all and stopped
            done[b] = sorted(done[b], key=lambda h: -h.score)[:beams]
            running[b] = going
            if improvable[b] and len(done[b]) == beams and going:
                best_len = new_max if options.early_stopping == "never" and lp > 0.0 else step + 1
                improvable[b] = going[0].score / best_len**lp > done[b][-1].score
        if timer is not None:
            timer.lap("prefill" if step == 0 else "decode")
        all_full = all(len(d) == beams for d in done)
        if last or not any(improvable) or (all_full and options.early_stopping is True) or hits_all:
            break
        parents, tokens = [], []
        for b in range(batch):
            for j, hyp in enumerate(running[b]):
                parents.append(b * beams + hyp.slot)
                tokens.append(hyp.tokens[-1])
                hyp.slot = j
        decoder.reorder(torch.tensor(parents, device=logits.device))
        logits = decoder.step(torch.tensor(tokens, device=logits.device))

    k = options.num_return_sequences
    best = [done[b][:k] for b in range(batch)]
    length = max(len(h.tokens) for row in best for h in row)
    tokens = torch.full((batch * k, length), options.pad_token_id, dtype=torch.long)
    scores = torch.empty(batch * k)
    for b, row in enumerate(best):
        for j, hyp in enumerate(row):
            tokens[b * k + j, :len(hyp.tokens)] = torch.tensor(hyp.tokens)
            scores[b * k + j] = hyp.score
    return BeamResult(tokens.to(first_logits.device), scores.to(first_logits.device))


# ----------------------------------------------------------------------------------------------------------
# The generate call shared by the reference and the runtime
# ----------------------------------------------------------------------------------------------------------


def generation_options(config, *, eos_token_id=None, pad_token_id=None, **fields) -> GenerationOptions:
    """A generate call's keyword arguments -> checked GenerationOptions: `fields` are its own (max_new_tokens,
    min_new_tokens, do_sample, temperature, top_k, top_p, num_beams, length_penalty, early_stopping,
    num_return_sequences; their defaults are GenerationOptions'); `eos_token_id` becomes its stop_ids (None:
    `<|endofchunk|>` when the model has one, and the LM's eos); `pad_token_id` None is the config's."""
    vocab = config.lm.vocab_size
    defaults = tuple(t for t in (config.eoc_token_id, config.eos_token_id) if t is not None)  # IDEFICS: no eoc
    stops = stop_token_ids(eos_token_id, defaults, vocab)
    pad = config.pad_token_id if pad_token_id is None else as_token_id(pad_token_id, "pad_token_id", vocab)
    return GenerationOptions(**fields, stop_ids=stops, pad_token_id=pad)


class KeywordGenerate:
    """`generate(...)` with keyword options, shared by the reference (Flamingo) and the runtime (FastFlamingo): the
    options are checked and translated once into GenerationOptions, then run by the class's own
    `generate_from_options(vision_x, lang_x, attention_mask, options, *, generator, timer, return_logits,
    image_attention_mask)` (which the Hugging Face drop-ins call directly with the options they built)."""

    config: object  # FlamingoConfig

    def generate(
        self,
        vision_x: torch.Tensor | None,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        timer=None,
        return_logits: bool = False,
        image_attention_mask: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy, sampled or beam-searched continuation -> ids [B * num_return_sequences, T + new].

        `options`: GenerationOptions' fields (max_new_tokens=20, min_new_tokens, do_sample, temperature, top_k,
        top_p, num_beams, length_penalty, early_stopping, num_return_sequences), eos_token_id and pad_token_id
        (generation_options).

        Greedy and sampling (num_beams=1): a row stops at its first stop token (default: `<|endofchunk|>` or the
        LM's eos; `eos_token_id=[]` never stops) and is then filled with `pad_token_id`; generation ends when
        every row has stopped. The first `min_new_tokens` tokens are never stop tokens. With
        `return_logits=True` returns `(ids, logits)`, logits [B, new, vocab] float32: the scores each new token
        was chosen from. Sampling options are ignored when `do_sample=False`.
        Beam search (num_beams > 1): Hugging Face's, with `length_penalty`, `early_stopping` and
        `num_return_sequences` (this module's docstring says exactly which release it follows): the reference
        searches plainly, one hypothesis at a time (`beam_search_ref`: the ground truth the fast path's vectorised
        `beam_search` is tested against); FastFlamingo encodes and prefills each row's prompt once, and its beams
        share that KV with private tails. Each row's best sequences come best first, padded with `pad_token_id`.
        Every generated token attends to the last image of its row's prompt (IDEFICS: to what the last prompt
        token sees), unless the config asks for OpenFlamingo's generated-<image> behaviour
        (openflamingo_generated_image_bug). `timer` records phase times.
        """
        checked = generation_options(self.config, **options)
        return self.generate_from_options(vision_x, lang_x, attention_mask, checked, generator=generator, timer=timer,
                                          return_logits=return_logits, image_attention_mask=image_attention_mask)


def generate_ids(prefill, lang_x: torch.Tensor, options: GenerationOptions, vocab_size: int, *, generator=None,
                 timer=None, return_logits: bool = False, stop_check_interval: int = 1, plain: bool = False):
    """prefill() -> (decoder, first_logits [B, vocab]); then the search the options ask for (`plain`: beams
    by `beam_search_ref`, the reference's own ground truth; else the vectorised `beam_search`).

    -> ids [B * num_sequences, T + L]: each prompt row (repeated once per returned sequence with beams) followed
    by its new tokens; with `return_logits`, also the float32 logits [B, L, vocab] each token was chosen from
    (greedy and sampling only)."""
    if return_logits and options.num_beams > 1:
        raise ValueError(f"return_logits=True with num_beams={options.num_beams}: not supported; expected "
                         f"num_beams=1")
    prompt = lang_x.repeat_interleave(options.num_sequences, dim=0)
    if options.max_new_tokens == 0:
        empty = torch.zeros(lang_x.shape[0], 0, vocab_size, device=lang_x.device)
        return (prompt, empty) if return_logits else prompt
    if timer is not None:
        timer.start()
    decoder, first_logits = prefill()
    if options.num_beams == 1:
        tokens, logits = sample_search(decoder, first_logits, options, generator, stop_check_interval, timer,
                                       return_logits)
        ids = torch.cat([prompt, tokens], dim=1)
        return (ids, logits) if return_logits else ids
    if plain:
        result = beam_search_ref(decoder, first_logits, options, timer)
    else:
        result = beam_search(decoder, first_logits, options, stop_check_interval, timer)
    return torch.cat([prompt, result.tokens], dim=1)
