"""The sampler against its formula. The reference and the fast runtime share `select_next_token`, so comparing the
two cannot see a wrong formula: here the frequencies of many seeded draws are compared with the distribution
written out in float64 (temperature, then top-k, then top-p over the renormalised rest, as Hugging Face does)."""

from __future__ import annotations

import pytest
import torch

from flamingo_fast.generation.sampling import SamplingOptions, select_next_token

DRAWS = 40_000  # one call: the rows are independent draws from the same logits


def expected_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[V] float64 probabilities, written out step by step."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_k > 0:
        kept = torch.zeros_like(probs, dtype=torch.bool)
        kept[probs.argsort(descending=True)[:top_k]] = True
        probs = torch.where(kept, probs, 0.0)
        probs = probs / probs.sum()
    if top_p < 1.0:
        order = probs.argsort(descending=True)
        mass_before = 0.0
        for index in order.tolist():  # a token stays while the better ones hold less than top_p
            p = float(probs[index])
            if mass_before >= top_p:
                probs[index] = 0.0
            mass_before += p
        probs = probs / probs.sum()
    return probs


# Logits in a shuffled order (the best token is not index 0), with cases where each option changes the result:
# temperature alone; and temperature + top-k + top-p, where top-k drops tokens that top-p alone would keep and
# top-p drops tokens that top-k keeps.
LOGITS = torch.tensor([0.3, -1.0, 2.0, 1.0, 0.0, 1.5])
CASES = [
    (1.7, 0, 1.0),
    (0.6, 0, 1.0),
    (0.7, 4, 0.8),
]


@pytest.mark.parametrize("temperature, top_k, top_p", CASES)
def test_sample_frequencies_match_the_formula(temperature, top_k, top_p):
    expected = expected_distribution(LOGITS, temperature, top_k, top_p)
    options = SamplingOptions(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = select_next_token(LOGITS.expand(DRAWS, -1), options, torch.Generator().manual_seed(1234))
    assert tokens.shape == (DRAWS,) and tokens.dtype == torch.long
    freq = torch.bincount(tokens, minlength=LOGITS.numel()).double() / DRAWS
    # filtered-out tokens are never drawn
    assert (freq[expected == 0] == 0).all(), f"drew filtered tokens: {freq.tolist()} vs {expected.tolist()}"
    # each kept token within 5 binomial standard deviations (a false alarm about once in 10^6 per token)
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), f"{freq.tolist()} vs {expected.tolist()}"


def test_the_cases_tell_the_options_apart():
    """The formula cases above are chosen so that each option matters: a sampler that ignored one of them, or
    multiplied by the temperature, would give a distribution off by far more than the tolerance."""
    for temperature, top_k, top_p in CASES:
        right = expected_distribution(LOGITS, temperature, top_k, top_p)
        wrong = [expected_distribution(LOGITS * temperature**2, temperature, top_k, top_p)]  # logits * T
        if top_k:
            wrong.append(expected_distribution(LOGITS, temperature, 0, top_p))
        if top_p < 1:
            wrong.append(expected_distribution(LOGITS, temperature, top_k, 1.0))
        for other in wrong:
            assert (other - right).abs().max() > 0.05
