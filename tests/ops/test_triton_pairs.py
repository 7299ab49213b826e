"""The forward's bf16 blend reads two channels per 32-bit word (virtual_input.widened_pairs and
interleave_pairs; the GPU path for 16-byte bf16 pieces). The interpreter cannot run a bf16 dot,
so the unpacking is checked here on its own: every channel gets its own corner values and
weights, in channel order."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from unetpp_fast.ops.triton.virtual_input import interleave_pairs, widened_pairs  # noqa: E402


@triton.jit
def _blend_kernel(src_ptr, w_ptr, out_ptr, C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Four [BLOCK_M, C] bf16 corners blended with per-row weights, stored as one bf16 tile."""
    rows = tl.arange(0, BLOCK_M)
    words = tl.arange(0, C // 2)
    base = src_ptr.to(tl.pointer_type(tl.int32))
    mask = (rows < BLOCK_M)[:, None] & (words < C // 2)[None, :]
    lo, hi = widened_pairs(base + rows[:, None] * (C // 2) + words[None, :], tl.load(w_ptr + rows), mask)
    for corner in range(1, 4):
        ptrs = base + (corner * BLOCK_M + rows)[:, None] * (C // 2) + words[None, :]
        lo_c, hi_c = widened_pairs(ptrs, tl.load(w_ptr + corner * BLOCK_M + rows), mask)
        lo += lo_c
        hi += hi_c
    tl.store(out_ptr + rows[:, None] * C + tl.arange(0, C)[None, :], interleave_pairs(lo, hi))


def test_bf16_pairs_blend_unpacks_both_halves_of_each_word():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    rows, channels = 16, 8
    corners = torch.randn(4, rows, channels, generator=gen).to(torch.bfloat16)
    weights = torch.rand(4, rows, generator=gen)
    out = torch.full((rows, channels), float("nan"), dtype=torch.bfloat16, device=device)
    _blend_kernel[(1,)](corners.to(device), weights.to(device), out, C=channels, BLOCK_M=rows)
    want = sum(weights[c, :, None] * corners[c].float() for c in range(4))
    got = out.cpu().float()
    assert torch.isfinite(got).all()
    # Within one bf16 ulp: the interpreter rounds fp32 -> bf16 toward zero, a GPU to nearest.
    assert ((got - want).abs() <= want.abs() * 2.0**-7).all()
    # A swapped half or weight would be off by far more: the check can fail.
    assert not torch.equal(got[:, 0::2], got[:, 1::2])
