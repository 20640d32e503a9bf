"""One tolerance table and one verbose comparison for every test (FlagGems / Liger-Kernel style).

The rule (DESIGN.md): a fast implementation's error against a float64 reference may be at most twice the
error of plain torch at the same dtype, plus the dtype's atol. Comparing against the error of plain torch
keeps the bound honest: it tightens when the computation is easy and widens only where rounding is real.
"""

from __future__ import annotations

import torch

# atol: the slack added to 2x plain torch's error; rtol: for direct comparisons of two implementations
# that should agree to rounding (for example a kernel and its torch twin at the same dtype).
TOLERANCE = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit]
    rows = [
        f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
        for i in idx
    ]
    return f"{int(bad.sum())} of {bad.numel()} elements differ; first ones:\n" + "\n".join(rows)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """allclose with the table's atol/rtol for `dtype` (default: actual's), printing the first mismatches."""
    tol = TOLERANCE[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"NaN in output: {int(torch.isnan(a).sum())} elements"
    bad = (a - e).abs() > tol["atol"] + tol["rtol"] * e.abs()
    assert not bad.any(), describe_mismatch(a, e, bad)


def assert_within_torch_error(
    actual: torch.Tensor, reference64: torch.Tensor, torch_same_dtype: torch.Tensor, dtype: torch.dtype
) -> None:
    """max|actual - ref| <= 2 * max|torch_at_dtype - ref| + atol[dtype]  (ref computed in float64)."""
    assert actual.shape == reference64.shape, f"shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    a, r, t = actual.double(), reference64.double(), torch_same_dtype.double()
    assert not torch.isnan(a).any(), f"NaN in output: {int(torch.isnan(a).sum())} elements"
    err, torch_err = (a - r).abs().max().item(), (t - r).abs().max().item()
    bound = 2 * torch_err + TOLERANCE[dtype]["atol"]
    bad = (a - r).abs() > bound
    assert err <= bound, (
        f"max error {err:.3g} > bound {bound:.3g} (plain torch at {dtype}: {torch_err:.3g})\n"
        + describe_mismatch(a, r, bad)
    )


def random_prompt(config, image_positions, seq_len: int, pad_left: int = 0):
    """One row: random text ids below the special tokens, `<image>` at `image_positions`, `pad_left` pads."""
    ids = torch.randint(0, config.eoc_token_id, (seq_len,))
    ids[list(image_positions)] = config.media_token_id
    mask = torch.ones(seq_len, dtype=torch.long)
    if pad_left:
        ids = torch.cat([torch.full((pad_left,), config.pad_token_id), ids])
        mask = torch.cat([torch.zeros(pad_left, dtype=torch.long), mask])
    return ids, mask


def random_batch(config, rows, num_images: int, frames: int = 1):
    """rows: [(image_positions, seq_len)], left-padded to the longest. -> vision_x, lang_x, attention_mask."""
    longest = max(seq_len for _, seq_len in rows)
    built = [random_prompt(config, pos, seq_len, pad_left=longest - seq_len) for pos, seq_len in rows]
    size = config.vision.image_size
    vision = torch.randn(len(rows), num_images, frames, 3, size, size) if num_images else None
    return vision, torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])
