"""The batch-invariant mode through the IDEFICS drop-in, over transformers' own model and processor (the comparison
environments: make test-openflamingo, test-transformers5). With batch_invariant=False this failed on the
development CPU (row 0's logits alone against in the batch); tests/test_batch_invariant.py has the rest."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from idefics_fixtures import build_idefics, build_processor, process, prompt_batches  # noqa: E402

import flamingo_fast  # noqa: E402

CANDIDATES = [[5, 6, 7], [5, 6, 8], [9], [5, 10, 11, 12]]  # tries 2 wide at depth 2


def test_idefics_drop_in_rows_alone_as_the_processor_makes_them():
    """from_idefics(model, batch_invariant=True) over transformers' IdeficsForVisionText2Text: each row of the
    processor's batch (3, 2, 1 and 0 images, left padding, zero pixel rows) equals that prompt processed alone,
    with its own image count, in greedy tokens and logits and in score."""
    processor = build_processor(additional_rows=3)
    prompts = prompt_batches(seed=0)["mixed"]
    drop_in = flamingo_fast.from_idefics(build_idefics(), backend="torch", max_batch_size=4, max_seq_len=64,
                                         batch_invariant=True)
    assert drop_in.fast.options.batch_invariant
    batch = process(processor, prompts)
    gen = dict(max_new_tokens=3, eos_token_id=[], return_logits=True)
    ids, logits = drop_in.generate(**batch, **gen)
    scores = drop_in.score(**batch, candidates=CANDIDATES)
    width = batch["input_ids"].shape[1]
    for b, prompt in enumerate(prompts):
        row = process(processor, [prompt])
        row_ids, row_logits = drop_in.generate(**row, **gen)
        assert torch.equal(row_ids[0, row["input_ids"].shape[1]:], ids[b, width:]), f"row {b}"
        assert torch.equal(row_logits[0], logits[b]), f"row {b}"
        assert torch.equal(drop_in.score(**row, candidates=CANDIDATES)[0], scores[b]), f"row {b}"
