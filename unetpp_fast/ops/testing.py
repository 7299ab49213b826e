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
    """One fused-conv call: piece shapes and modes, kernel, dtype, layout.

    `out_hw` of length 3, (D, H, W), makes a 3D case: 5-D pieces and a 5-D weight.
    """

    batch: int
    channels: Sequence[int]
    modes: Sequence[str]
    out_hw: tuple[int, ...]
    c_out: int
    k: int
    dtype: torch.dtype = torch.float32
    # 'nchw' (NCDHW in 3D), 'channels_last' (channels_last_3d in 3D) or 'strided' (a non-contiguous view)
    layout: str = "nchw"
    activation: str = "relu"
    bias: bool = True
    seed: int = 0
    piece_hw: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.piece_hw:
            self.piece_hw = [piece_size_for(self.out_hw, m) for m in self.modes]

    def make(self, device: str | torch.device = "cpu", requires_grad: bool = True):
        """Fresh random (pieces, weight, bias) in `self.dtype` on `device`."""
        gen = torch.Generator().manual_seed(self.seed)
        pieces = []
        for c, size in zip(self.channels, self.piece_hw):
            t = torch.randn(self.batch, c, *size, generator=gen, dtype=torch.float64)
            pieces.append(_layout(t.to(device=device, dtype=self.dtype), self.layout))
        dims = len(self.out_hw)
        fan_in = max(1, sum(self.channels) * self.k**dims)
        weight = torch.randn(
            self.c_out, sum(self.channels), *[self.k] * dims, generator=gen, dtype=torch.float64
        )
        weight = (weight / fan_in**0.5).to(device=device, dtype=self.dtype)
        bias = torch.randn(self.c_out, generator=gen, dtype=torch.float64).to(device=device, dtype=self.dtype)
        tensors = [*pieces, weight, bias]
        if requires_grad:
            for t in tensors:
                t.requires_grad_(True)
        return pieces, weight, (bias if self.bias else None)


def piece_size_for(out_hw: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """A piece size that becomes `out_hw` (H, W) or (D, H, W) after `mode` (odd sizes for
    max-pooled pieces)."""
    if mode == "maxpool2":
        return tuple(2 * s + 1 for s in out_hw)
    if mode in ("up_nearest", "up_bilinear", "up_bilinear_ac", "up_trilinear", "up_trilinear_ac"):
        if any(s % 2 for s in out_hw):
            raise ValueError(f"an upsampled piece needs an even output size, got {out_hw}")
        return tuple(s // 2 for s in out_hw)
    return tuple(out_hw)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=conv_spec.channels_last_format(t.dim()))
    if layout == "strided":
        # A view with a channel stride and an offset along the first spatial axis: not contiguous
        # in any format.
        wide = torch.randn(
            t.shape[0], 2 * t.shape[1], t.shape[2] + 1, *t.shape[3:], dtype=t.dtype, device=t.device
        )
        view = wide[:, ::2, 1:]
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
    assert out.is_contiguous(memory_format=conv_spec.output_memory_format(case.make("cpu", False)[0][0]))
    for name, got, want in zip(names, grads, ref_grads):
        err = relative_error(got, want)
        assert err <= tol, f"{backend} grad {name}: relative error {err:.3g} > {tol} for {case}"
