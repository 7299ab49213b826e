"""Helpers for comparing backends with the reference: random cases, poisoned outputs, error norms.

Used by the test suite, the fuzzing and the GPU check, so every comparison is made the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops.fused_op import fused_conv


@dataclass
class ConvCase:
    """One fused-conv call: piece shapes and modes, kernel, dtype, layout."""

    batch: int
    channels: Sequence[int]
    modes: Sequence[str]
    out_hw: tuple[int, int]
    c_out: int
    k: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"  # 'nchw', 'channels_last' or 'strided' (a non-contiguous view)
    activation: str = "relu"
    bias: bool = True
    seed: int = 0
    piece_hw: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.piece_hw:
            self.piece_hw = [piece_size_for(self.out_hw, m) for m in self.modes]

    def make(self, device: str | torch.device = "cpu", requires_grad: bool = True):
        """Fresh random (pieces, weight, bias) in `self.dtype` on `device`."""
        gen = torch.Generator().manual_seed(self.seed)
        pieces = []
        for c, (h, w) in zip(self.channels, self.piece_hw):
            t = torch.randn(self.batch, c, h, w, generator=gen, dtype=torch.float64)
            pieces.append(_layout(t.to(device=device, dtype=self.dtype), self.layout))
        fan_in = max(1, sum(self.channels) * self.k * self.k)
        weight = torch.randn(
            self.c_out, sum(self.channels), self.k, self.k, generator=gen, dtype=torch.float64
        )
        weight = (weight / fan_in**0.5).to(device=device, dtype=self.dtype)
        bias = torch.randn(self.c_out, generator=gen, dtype=torch.float64).to(device=device, dtype=self.dtype)
        tensors = [*pieces, weight, bias]
        if requires_grad:
            for t in tensors:
                t.requires_grad_(True)
        return pieces, weight, (bias if self.bias else None)


def piece_size_for(out_hw: tuple[int, int], mode: str) -> tuple[int, int]:
    """A piece size that becomes `out_hw` after `mode` (odd sizes for max-pooled pieces)."""
    h, w = out_hw
    if mode == "maxpool2":
        return 2 * h + 1, 2 * w + 1
    if mode in ("up_nearest", "up_bilinear", "up_bilinear_ac"):
        if h % 2 or w % 2:
            raise ValueError(f"an upsampled piece needs an even output size, got {out_hw}")
        return h // 2, w // 2
    return h, w


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A view with a channel stride and a row offset: not contiguous in any format.
        wide = torch.randn(
            t.shape[0], 2 * t.shape[1], t.shape[2] + 1, t.shape[3], dtype=t.dtype, device=t.device
        )
        view = wide[:, ::2, 1:, :]
        view.copy_(t)
        return view
    return t.contiguous()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64; NaN anywhere in `got` that `want` lacks gives inf."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    finite = torch.isfinite(want)
    diff = (got[finite] - want[finite]).norm()
    scale = want[finite].norm()
    if scale == 0:
        return diff.item()
    return (diff / scale).item()


def run_case(case: ConvCase, backend: str, device: str | torch.device = "cpu", backward: bool = True):
    """Forward (and backward with a fixed random grad) on `backend`: (out, [grads...])."""
    pieces, weight, bias = case.make(device, requires_grad=backward)
    with backends.use_backend(backend):
        out = fused_conv(pieces, weight, bias, resample=list(case.modes), activation=case.activation)
        if not backward:
            return out.detach(), []
        gen = torch.Generator().manual_seed(case.seed + 1)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
        inputs = [*pieces, weight] + ([bias] if bias is not None else [])
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs)]


def reference_of(case: ConvCase, backward: bool = True):
    """The same case computed by the reference backend in fp64 on the CPU."""
    exact = ConvCase(**{**case.__dict__, "dtype": torch.float64, "layout": "nchw"})
    return run_case(exact, "reference", "cpu", backward)


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_matches_reference(case: ConvCase, backend: str, device: str | torch.device = "cpu") -> None:
    """Forward and every gradient of `backend` against the fp64 reference, by relative norm."""
    out, grads = run_case(case, backend, device)
    ref_out, ref_grads = reference_of(case)
    tol = TOLERANCE[case.dtype]
    names = [f"pieces[{i}]" for i in range(len(case.channels))] + ["weight", "bias"]
    err = relative_error(out, ref_out)
    assert err <= tol, f"{backend} forward: relative error {err:.3g} > {tol} for {case}"
    assert out.dtype == case.dtype
    expect_cl = conv_spec.output_memory_format(case.make("cpu", False)[0][0]) == torch.channels_last
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    for name, got, want in zip(names, grads, ref_grads):
        err = relative_error(got, want)
        assert err <= tol, f"{backend} grad {name}: relative error {err:.3g} > {tol} for {case}"
