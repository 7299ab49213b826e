"""Backend registry and selection for the fused convolution.

A backend computes `fused_conv` forward and backward for tensors on some devices. `auto`, in eager calls,
measures which backend is fastest for each kind of call (`backend_choice.py`); its fixed order —
used under torch.compile, by `resolve_name`, and with `UNETPP_FAST_AUTO=order` — is `cuda` (built,
CUDA tensors) -> `triton` (CUDA tensors) -> `cpu` (built, CPU tensors) -> `reference`, skipping
any backend that cannot take the call (its dtypes, piece count and spatial dimensions — 2D and/or
3D — are declared up front in `Capabilities`). A forced backend is used or
raises a clear error: never a silent fallback. Three ways to force one, the first that is set wins:

* `use_backend(name)`: a context manager, for the current thread (and asyncio task) only — it is a
  `contextvars.ContextVar`, which threads started inside the block (ThreadPoolExecutor workers,
  DataParallel replicas) do not see;
* `set_backend(name)`: process-wide, seen by every thread; `set_backend(None)` clears it;
* the environment variable `UNETPP_FAST_BACKEND`, read at each call.

The backend that ran a forward also runs its backward (the operator records it).

`count_calls()` says which backend ran how many forward calls (in this thread) inside a block.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import threading
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


_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can take, checked before it runs: `auto` skips it, a forced choice raises."""

    dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES
    max_pieces: int | None = None  # None: any number of pieces
    spatial_dims: tuple[int, ...] = (2,)  # 2: 4-D pieces [N, C, H, W]; 3: 5-D pieces [N, C, D, H, W]


# Declared here so that selection never has to import a backend to ask; `register_backend`
# may override them (e.g. the Triton descriptor-table kernels lifting the piece limit).
DEFAULT_CAPABILITIES = {
    "reference": Capabilities(_ALL_DTYPES, None, (2, 3)),
    "cpu": Capabilities(_ALL_DTYPES, 8, (2, 3)),  # kMaxPieces of csrc/fused_conv_indexing.h; 2D = D 1
    "cuda": Capabilities(_LOW_AND_SINGLE, 8),
    "triton": Capabilities(_LOW_AND_SINGLE, None),  # fp32 accumulation: fp64 would be silently wrong
}


@dataclass(frozen=True)
class _Entry:
    # (device) -> '' when usable for tensors on that device, else the reason it is not.
    why_unusable: Callable[[torch.device], str]
    # Imports the implementation on first use, so `import unetpp_fast` stays light.
    load: Callable[[], BackendImpl]
    capabilities: Capabilities


_REGISTRY: dict[str, _Entry] = {}
_LOADED: dict[str, BackendImpl] = {}
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("unetpp_fast_backend", default=None)
_PROCESS_WIDE: str | None = None  # set_backend(); a plain global, so every thread sees it

_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Bumped by register_backend: whatever was decided about the registered backends is void after it.
_GENERATION = [0]


def auto_order(device_type: str) -> tuple[str, ...]:
    """The fixed order `auto` follows on `device_type` when it does not measure."""
    return _AUTO_ORDER.get(device_type, ("reference",))


def generation() -> int:
    """A number that changes whenever a backend is (re-)registered."""
    return _GENERATION[0]


# Per thread: the Counters of the open `count_calls` blocks (nested blocks each see their calls).
_COUNTERS = threading.local()
_OPEN_COUNTS = [0]  # open blocks in all threads: with none, record_call returns at once


@contextlib.contextmanager
def count_calls() -> Iterator[collections.Counter[str]]:
    """Count the fused_conv forward calls of this thread inside the block, per backend name.

    Yields a `collections.Counter` {backend name: forward calls run on it}, filled as calls run
    (read it inside or after the block). Backward calls are not counted; calls of other threads
    are not counted; nested blocks each count every call made while they are open.
    """
    counter: collections.Counter[str] = collections.Counter()
    stack = getattr(_COUNTERS, "stack", None)
    if stack is None:
        stack = _COUNTERS.stack = []
    stack.append(counter)
    _OPEN_COUNTS[0] += 1
    try:
        yield counter
    finally:
        _OPEN_COUNTS[0] -= 1
        # By identity: Counters compare by content, and two blocks may hold equal counts.
        del stack[next(i for i, c in enumerate(stack) if c is counter)]


def record_call(name: str) -> None:
    """Note one forward call run on backend `name` in every open `count_calls` block of this thread."""
    if not _OPEN_COUNTS[0]:
        return
    stack = getattr(_COUNTERS, "stack", None)
    if stack:
        for counter in stack:
            counter[name] += 1


def register_backend(
    name: str,
    why_unusable: Callable[[torch.device], str],
    load: Callable[[], BackendImpl],
    capabilities: Capabilities | None = None,
) -> None:
    """Register backend `name` (one of BACKEND_NAMES except 'auto').

    `capabilities` defaults to `DEFAULT_CAPABILITIES[name]`.
    """
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {name!r}")
    _REGISTRY[name] = _Entry(why_unusable, load, capabilities or DEFAULT_CAPABILITIES[name])
    _LOADED.pop(name, None)
    _GENERATION[0] += 1


def registered(name: str) -> tuple[Callable[[torch.device], str], Callable[[], BackendImpl], Capabilities]:
    """(why_unusable, load, capabilities) of backend `name`, e.g. to register it again after a test."""
    entry = _REGISTRY[name]
    return entry.why_unusable, entry.load, entry.capabilities


def check_name(name: str, what: str) -> str:
    """`name` when it is one of BACKEND_NAMES, else ValueError naming `what`."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"{what} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost `use_backend` of this thread, else `set_backend`,
    else $UNETPP_FAST_BACKEND, else 'auto'."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    if _PROCESS_WIDE is not None:
        return _PROCESS_WIDE
    env = os.environ.get(ENV_VAR, "").strip()
    return check_name(env, f"environment variable {ENV_VAR}") if env else "auto"


def set_backend(name: str | None) -> None:
    """Force backend `name` for the whole process, every thread included; None clears it.

    A `use_backend` block still wins inside its own thread. Unlike `use_backend`, this reaches
    worker threads (ThreadPoolExecutor, DataParallel, data loaders running threads).
    """
    global _PROCESS_WIDE
    _PROCESS_WIDE = None if name is None else check_name(name, "backend")


def get_backend() -> str | None:
    """The process-wide setting of `set_backend` (None when unset)."""
    return _PROCESS_WIDE


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fused convolutions inside this block on backend `name` ('auto' restores the choice).

    Per thread: threads started inside the block do not see it (use `set_backend` for them).
    """
    token = _FORCED.set(check_name(name, "backend"))
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


def capabilities(name: str) -> Capabilities:
    """What backend `name` declares it can take."""
    entry = _REGISTRY.get(name)
    return entry.capabilities if entry is not None else DEFAULT_CAPABILITIES[check_name(name, "backend")]


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def why_cannot_take(
    name: str, dtype: torch.dtype | None, num_pieces: int | None, spatial_dims: int | None = None
) -> tuple[type, str] | None:
    """None when backend `name` can take a call of `dtype` with `num_pieces` pieces of
    `spatial_dims` spatial dimensions (2 or 3), else (exception type, sentence): TypeError for a
    dtype, ValueError for a piece count or spatial dimensions."""
    caps = capabilities(name)
    if spatial_dims is not None and spatial_dims not in caps.spatial_dims:
        takes = " and ".join(f"{d}D ({d + 2}-D pieces)" for d in caps.spatial_dims)
        return ValueError, (
            f"unetpp_fast backend {name!r} takes {takes} only, got a {spatial_dims}D call "
            f"({spatial_dims + 2}-D pieces); 'auto' runs it on a backend that takes it (e.g. 'reference')"
        )
    if dtype is not None and dtype not in caps.dtypes:
        return TypeError, (
            f"unetpp_fast backend {name!r} supports the dtypes {_dtype_names(caps.dtypes)}, got {dtype}"
        )
    if num_pieces is not None and caps.max_pieces is not None and num_pieces > caps.max_pieces:
        return ValueError, (
            f"unetpp_fast backend {name!r} takes at most {caps.max_pieces} pieces, got {num_pieces}"
        )
    return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run tensors on `device` in this installation."""
    return [n for n in BACKEND_NAMES[1:] if not why_unusable(n, device)]


def resolve_name(
    device: torch.device | str,
    name: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    num_pieces: int | None = None,
    spatial_dims: int | None = None,
) -> str:
    """The backend that will run a call on `device` (of `dtype`, with `num_pieces` pieces of
    `spatial_dims` spatial dimensions, when given), honouring a forced choice strictly: a forced
    backend that cannot run raises."""
    device = torch.device(device)
    name = requested_backend() if name is None else check_name(name, "backend")
    if name != "auto":
        return check_forced(name, device, dtype, num_pieces, spatial_dims)
    refusals = []
    for candidate in auto_order(device.type):
        if why_unusable(candidate, device):
            continue
        refusal = why_cannot_take(candidate, dtype, num_pieces, spatial_dims)
        if refusal is None:
            return candidate
        refusals.append(refusal[1])
    detail = f" ({'; '.join(refusals)})" if refusals else ""
    raise RuntimeError(f"no unetpp_fast backend can run this call on device {device}{detail}")


_REFUSALS: dict[tuple, tuple[type, str] | None] = {}  # why_cannot_take, per registry generation


def check_forced(
    name: str,
    device: torch.device,
    dtype: torch.dtype | None,
    num_pieces: int | None,
    spatial_dims: int | None,
) -> str:
    """`name` when the forced backend can run this call, else its clear error. Usability is asked
    at every call (it may change at run time); the capability answer is a pure function of the
    declared capabilities, kept per registry generation."""
    reason = why_unusable(name, device)
    if reason:
        raise RuntimeError(
            f"unetpp_fast backend {name!r} was requested for {device.type} tensors but {reason}"
        )
    key = (name, dtype, num_pieces, spatial_dims, _GENERATION[0])
    try:
        refusal = _REFUSALS[key]
    except KeyError:
        refusal = _REFUSALS[key] = why_cannot_take(name, dtype, num_pieces, spatial_dims)
    if refusal is not None:
        raise refusal[0](refusal[1])
    return name


def get_impl(name: str) -> BackendImpl:
    impl = _LOADED.get(name)
    if impl is None:
        impl = _LOADED[name] = _REGISTRY[name].load()
    return impl


def resolve(
    device: torch.device | str,
    *,
    dtype: torch.dtype | None = None,
    num_pieces: int | None = None,
    spatial_dims: int | None = None,
) -> tuple[str, BackendImpl]:
    name = resolve_name(device, dtype=dtype, num_pieces=num_pieces, spatial_dims=spatial_dims)
    return name, get_impl(name)
