"""The compiled backends 'cpu' (C++) and 'cuda' (CUDA C++), run through `torch.ops.unetpp_fast_C`.

Registering them imports nothing compiled: the extension is loaded (safely, see `extension.py`)
only when a backend is asked whether it can run or is first used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from unetpp_fast.ops.backends import DEFAULT_CAPABILITIES, BackendImpl, register_backend
from unetpp_fast.ops.extension import extension, extension_unavailable_reason


def _extension_reason() -> str:
    if extension() is None:
        return f"the compiled extension is unavailable ({extension_unavailable_reason()})"
    return ""


def _cuda_compiled() -> bool:
    module = extension()
    return module is not None and bool(module.build_info().get("cuda", False))


def why_cpu_unusable(device: torch.device) -> str:
    """'' when the C++ CPU backend can run tensors on `device`, else why not."""
    reason = _extension_reason()
    if reason:
        return reason
    if device.type != "cpu":
        return f"it runs CPU tensors only, not {device.type} tensors"
    return ""


def why_cuda_unusable(device: torch.device) -> str:
    """'' when the CUDA C++ backend can run tensors on `device`, else why not."""
    reason = _extension_reason()
    if reason:
        return reason
    if not _cuda_compiled():
        return (
            "the extension was built without its CUDA part (no CUDA toolkit or a CPU-only torch at "
            "build time; rebuild with FORCE_CUDA=1)"
        )
    if device.type != "cuda":
        return f"it runs CUDA tensors only, not {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available on this machine"
    return ""


def _forward(
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return torch.ops.unetpp_fast_C.fused_conv_forward(
        list(pieces), [int(c) for c in resample], weight, bias, activation
    )


def _backward(
    grad_out: torch.Tensor,
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    activation: str,
) -> list[torch.Tensor]:
    return list(
        torch.ops.unetpp_fast_C.fused_conv_backward(
            grad_out, list(pieces), [int(c) for c in resample], weight, out, bool(has_bias), activation
        )
    )


def _load() -> BackendImpl:
    reason = _extension_reason()
    if reason:
        raise RuntimeError(f"unetpp_fast native backends cannot load: {reason}")
    return BackendImpl(forward=_forward, backward=_backward)


register_backend("cpu", why_cpu_unusable, _load)
# 3D: the CUDA kernels take 5-D pieces as their DIMS = 3 instance (2D is the D = 1 case), the backward
# gathers the 3D virtual input for cuDNN's conv3d backward.
register_backend(
    "cuda", why_cuda_unusable, _load, dataclasses.replace(DEFAULT_CAPABILITIES["cuda"], spatial_dims=(2, 3))
)
