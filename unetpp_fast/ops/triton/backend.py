"""The 'triton' backend: the Triton kernels of this package, forward and backward.

CUDA tensors on a GPU; CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, set
before Triton is first imported), which is how the kernels are tested without a GPU. The kernels
are imported on first use, so registering the backend imports neither Triton nor CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import torch

from unetpp_fast.ops.backends import DEFAULT_CAPABILITIES, BackendImpl, register_backend

_FOUND: list[bool] = []  # Triton found once stays found: only that answer is kept (it is asked per call)


def _triton_missing() -> str:
    if _FOUND:
        return ""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    _FOUND.append(True)
    return ""


def why_unusable(device: torch.device) -> str:
    """'' when the Triton kernels can run tensors on `device`, else why not."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    missing = _triton_missing()
    if missing:
        return missing
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available on this machine"
        return ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1" and not _stub_runtime_installed():
            return (
                "Triton runs CPU tensors only in its interpreter: set the environment variable "
                "TRITON_INTERPRET=1 before importing unetpp_fast"
            )
        return ""
    return f"it runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type} tensors"


def _stub_runtime_installed() -> bool:
    """A runtime that takes CPU tensors was installed (benchmarks/host_path.py: the GPU host path,
    Triton's compile and launch stubbed). Never imports the kernels to find out."""
    common = sys.modules.get("unetpp_fast.ops.triton.launch_common")
    current = common._RUNTIME[0] if common is not None else None
    return bool(getattr(current, "runs_gpu_path_on_cpu", False))


def _load() -> BackendImpl:
    reason = _triton_missing()
    if reason:
        raise RuntimeError(f"unetpp_fast triton backend cannot load: {reason}")
    from unetpp_fast.ops.triton.fused_conv_backward import fused_conv_backward
    from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

    return BackendImpl(
        forward=_forward_on_device(fused_conv_forward), backward=_backward_on_device(fused_conv_backward)
    )


def _forward_on_device(forward):
    """Launch on the tensors' own GPU (Triton launches on the current device); the weight says which."""

    def run(pieces, codes, weight, bias, activation):
        if weight.is_cuda:
            with torch.cuda.device(weight.device):
                return forward(pieces, codes, weight, bias, activation)
        return forward(pieces, codes, weight, bias, activation)

    run.__name__, run.__doc__ = forward.__name__, forward.__doc__
    return run


def _backward_on_device(backward):
    """As _forward_on_device; grad_out says which GPU."""

    def run(grad_out, *args):
        if grad_out.is_cuda:
            with torch.cuda.device(grad_out.device):
                return backward(grad_out, *args)
        return backward(grad_out, *args)

    run.__name__, run.__doc__ = backward.__name__, backward.__doc__
    return run


# The pieces come from a descriptor table: any number of them; 2D and 3D are one kernel family.
register_backend(
    "triton",
    why_unusable,
    _load,
    dataclasses.replace(DEFAULT_CAPABILITIES["triton"], max_pieces=None, spatial_dims=(2, 3)),
)
