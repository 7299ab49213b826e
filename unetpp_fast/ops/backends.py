"""Backend registry and selection for the fused convolution.

A backend computes `fused_conv` forward and backward for tensors on some devices. `auto` picks
`cuda` (built, CUDA tensors) -> `triton` (CUDA tensors) -> `cpu` (built, CPU tensors) ->
`reference`. A backend forced through `use_backend(name)` or the environment variable
`UNETPP_FAST_BACKEND` is used or raises a clear error: never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "UNETPP_FAST_BACKEND"

# forward(pieces, resample, weight, bias, activation) -> out
ForwardFn = Callable[
    [Sequence[torch.Tensor], Sequence[int], torch.Tensor, "torch.Tensor | None", str], torch.Tensor
]
# backward(grad_out, pieces, resample, weight, out, has_bias, activation)
#   -> [grad_piece_0, ..., grad_piece_{n-1}, grad_weight, grad_bias]  (grad_bias: empty if no bias)
BackwardFn = Callable[..., list[torch.Tensor]]


@dataclass(frozen=True)
class BackendImpl:
    forward: ForwardFn
    backward: BackwardFn


@dataclass(frozen=True)
class _Entry:
    # (device) -> '' when usable for tensors on that device, else the reason it is not.
    why_unusable: Callable[[torch.device], str]
    # Imports the implementation on first use, so `import unetpp_fast` stays light.
    load: Callable[[], BackendImpl]


_REGISTRY: dict[str, _Entry] = {}
_LOADED: dict[str, BackendImpl] = {}
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("unetpp_fast_backend", default=None)

_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def register_backend(
    name: str, why_unusable: Callable[[torch.device], str], load: Callable[[], BackendImpl]
) -> None:
    """Register backend `name` (one of BACKEND_NAMES except 'auto')."""
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {name!r}")
    _REGISTRY[name] = _Entry(why_unusable, load)
    _LOADED.pop(name, None)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"{what} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost `use_backend`, else $UNETPP_FAST_BACKEND, else 'auto'."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, f"environment variable {ENV_VAR}") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fused convolutions inside this block on backend `name` ('auto' restores the choice)."""
    token = _FORCED.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _FORCED.reset(token)


def why_unusable(name: str, device: torch.device | str) -> str:
    """'' when backend `name` can run tensors on `device`, else a sentence saying why not."""
    device = torch.device(device)
    entry = _REGISTRY.get(name)
    if entry is None:
        return f"backend {name!r} is not part of this installation"
    return entry.why_unusable(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run tensors on `device` in this installation."""
    return [n for n in BACKEND_NAMES[1:] if not why_unusable(n, device)]


def resolve_name(device: torch.device | str, name: str | None = None) -> str:
    """The backend that will run tensors on `device`, honouring a forced choice strictly."""
    device = torch.device(device)
    name = requested_backend() if name is None else _check_name(name, "backend")
    if name != "auto":
        reason = why_unusable(name, device)
        if reason:
            raise RuntimeError(
                f"unetpp_fast backend {name!r} was requested for {device.type} tensors but {reason}"
            )
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if not why_unusable(candidate, device):
            return candidate
    raise RuntimeError(f"no unetpp_fast backend can run tensors on device {device}")


def get_impl(name: str) -> BackendImpl:
    impl = _LOADED.get(name)
    if impl is None:
        impl = _LOADED[name] = _REGISTRY[name].load()
    return impl


def resolve(device: torch.device | str) -> tuple[str, BackendImpl]:
    name = resolve_name(device)
    return name, get_impl(name)
