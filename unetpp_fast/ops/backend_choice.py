"""`auto` chooses a backend by measuring it, the first time it meets a kind of call.

Like `torch.backends.cudnn.benchmark`: the first eager call of a kind (device, shape bucket,
dtype, layout, training or not, resample codes, channel counts, kernel size, activation kind,
bias, CPU threads) times every backend that can take it on the call's own tensors (a warm-up, then
the fastest of 5 interleaved runs; CUDA: synchronised), checks each against the reference backend's
output (relative norm; a backend that disagrees is dropped with a warning) and keeps the fastest.
The candidates' timed runs are interleaved (a shared machine's load then falls on all alike).

* Inference (no gradient needed): the fused backends and `reference` (plain PyTorch / cuDNN)
  compete, so a fused call is never slower than eager; a fused backend must be more than 10 %
  faster to replace the reference (a near tie is noise).
* Training: only the fused backends compete (they save no concatenated or resampled input: the
  memory promise); `reference` runs only when no fused backend can take the call. The forward
  and the backward are timed together (on CUDA: cuda vs triton), at the call's own size, and both
  are checked against the reference.
* A kind with one candidate is decided without timing and not written down.

Choices persist in `<cache dir>/backend_choices.json` (the cache dir of the Triton tuning:
`UNETPP_FAST_CACHE_DIR`, else `$XDG_CACHE_HOME/unetpp_fast` or `~/.cache/unetpp_fast`) under a
section per device name, torch version and package build; the file is read once per process and a
directory that cannot be written just means measuring again in the next process.

Never measured: during CUDA graph capture (a recorded choice is used, else the fixed order, and
nothing is written) — torch.compile never reaches here (the operator uses the fixed order). The
environment variable `UNETPP_FAST_AUTO=order` (read at each call) turns measuring off: the fixed
order of `backends.auto_order` then decides. Registering a backend again voids this process's
choices.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Sequence

import torch

from unetpp_fast.ops import backends, conv_spec

AUTO_MODE_ENV = "UNETPP_FAST_AUTO"
CHOICE_FILE = "backend_choices.json"
TIMED_REPEATS = 5  # after one warm-up: few, since the test suite meets many tiny shapes
# A fused backend replaces the reference only when this much faster: a node timed alone (hot
# caches, its own tensors) is not the node inside a network, and near ties there went either way.
INFERENCE_MARGIN = 0.10

# Relative-norm tolerance of a candidate against the reference output, by dtype.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
# fp32 on a GPU where TF32 is allowed: cuDNN's convolutions (the reference backend's, under
# torch.backends.cudnn.allow_tf32, on by default) and our kernels (under
# torch.backends.cuda.matmul.allow_tf32) round to 10 mantissa bits, about 5e-4 from exact fp32 each.
_TF32_TOLERANCE = 5e-3


def agreement_tolerance(dtype: torch.dtype, device_type: str) -> float:
    """Largest relative error at which a candidate still agrees with the reference backend."""
    if dtype is torch.float32 and device_type == "cuda":
        if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
            return _TF32_TOLERANCE
    return _TOLERANCE.get(dtype, 1e-4)


_LOCK = threading.Lock()
_CHOICES: dict[Hashable, str] = {}  # choice key -> backend name, this process
_DISK: dict = {"loaded": False, "file": {}}
_SEEN_GENERATION = [-1]  # the registry generation _CHOICES was made under


def measuring_enabled() -> bool:
    """False when `UNETPP_FAST_AUTO=order` asks for the fixed order."""
    mode = os.environ.get(AUTO_MODE_ENV, "").strip()
    if mode in ("", "measure"):
        return True
    if mode == "order":
        return False
    raise ValueError(f"environment variable {AUTO_MODE_ENV} must be 'measure' or 'order', got {mode!r}")


def size_bucket(count: int) -> int:
    """The power of two at or above `count`: a new batch size in the same bucket re-uses a choice."""
    return 1 << max(int(count) - 1, 0).bit_length()


def call_kind(
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    codes: Sequence[int],
    piece_channels: Sequence[int],
    weight_shape: Sequence[int],
    has_bias: bool,
    activation_kind: str,
    out_pixels: int,
) -> tuple:
    """What decides the fastest backend of a call, apart from training and threads (`choice_key`).
    A pure function of the call's metadata, so callers may cache it with their validation."""
    return (
        str(device),
        str(dtype).removeprefix("torch."),
        channels_last,
        tuple(codes),
        tuple(int(c) for c in piece_channels),
        tuple(int(s) for s in weight_shape),
        has_bias,
        activation_kind,
        size_bucket(out_pixels),
    )


def choice_key(kind: tuple, training: bool, device: torch.device) -> tuple:
    """`kind` plus training-or-not, and for CPU calls the thread count (a backend's speed-up
    changes with it)."""
    return (*kind, training, torch.get_num_threads() if device.type == "cpu" else 0)


# --- persistence ---------------------------------------------------------------------------------


def cache_dir() -> str:
    """The directory of the persisted tuning (shared with the Triton tuning file)."""
    return os.environ.get("UNETPP_FAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unetpp_fast"
    )


def choice_file() -> str:
    return os.path.join(cache_dir(), CHOICE_FILE)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.machine()}:{platform.processor() or _cpu_model()}:{os.cpu_count()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _package_build() -> str:
    """The installed package and its compiled extension (size and time of the shared object)."""
    from unetpp_fast.ops.extension import extension

    module = extension()
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        return "no-extension"
    stat = os.stat(path)
    return f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _section_name(device: torch.device) -> str:
    return f"{_device_name(device)} | torch {torch.__version__} | {_package_build()}"


def _encode(key: tuple) -> str:
    return json.dumps(list(key))


def _read_file() -> dict:
    try:
        with open(choice_file()) as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _disk_choice(device: torch.device, key: tuple) -> str | None:
    """The persisted choice of `key` (the file is read once per process)."""
    if not _DISK["loaded"]:
        _DISK["loaded"] = True
        _DISK["file"] = _read_file()
    section = _DISK["file"].get(_section_name(device), {})
    name = section.get(_encode(key)) if isinstance(section, dict) else None
    return name if name in backends.BACKEND_NAMES[1:] else None


def _persist(device: torch.device, key: tuple, name: str) -> None:
    """Write the choice down (merged with what other processes wrote); a read-only dir is fine."""
    path = choice_file()
    data = _read_file()
    data.setdefault(_section_name(device), {})[_encode(key)] = name
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=0, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError:
        pass


def forget() -> None:
    """Drop this process's choices and re-read the file on the next call (tests, a new cache dir)."""
    with _LOCK:
        _CHOICES.clear()
        _DISK.update(loaded=False, file={})


def recorded(key: tuple) -> str | None:
    """The choice made for `key` in this process, if any."""
    return _CHOICES.get(key)


# --- measuring -----------------------------------------------------------------------------------


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _seconds(run: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    diff = (out.double() - want.double()).norm()
    return (diff / want.double().norm().clamp_min(1e-30)).item()


class CannotMeasure(RuntimeError):
    """The call cannot be checked against the reference here (e.g. the reference runs out of memory)."""


def _output_grad(out: torch.Tensor, first_piece: torch.Tensor) -> torch.Tensor:
    """A fixed random output gradient (its own generator: measuring never moves the caller's RNG)."""
    generator = torch.Generator(device=out.device).manual_seed(0)
    grad = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    return grad.contiguous(memory_format=conv_spec.output_memory_format(first_piece))


def measure(
    candidates: Sequence[str],
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    training: bool = False,
) -> tuple[str | None, dict[str, float]]:
    """Time each candidate on this call; (fastest agreeing one, seconds per candidate).

    Inference times the forward; training the forward and the backward (the backend that runs a
    forward runs its backward), each checked against the reference backend's. A candidate whose
    results disagree with the reference, or that raises, is dropped with a warning. With
    non-finite reference results nothing can be compared: all are kept.
    """
    device = weight.device
    has_bias = bias is not None
    keep_out = conv_spec.parse_activation(activation)[0] != "none"  # what autograd saves

    def step(
        impl: backends.BackendImpl, grad: torch.Tensor | None, out: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        out = impl.forward(pieces, codes, weight, bias, activation) if out is None else out
        if grad is None:
            return [out]
        grads = impl.backward(grad, pieces, codes, weight, out if keep_out else None, has_bias, activation)
        return [out, *grads]

    with torch.no_grad():
        reference_impl = backends.get_impl("reference")
        try:
            want_out = reference_impl.forward(pieces, codes, weight, bias, activation)
            grad = _output_grad(want_out, pieces[0]) if training else None
            want = step(reference_impl, grad, want_out)  # its forward has run
        except torch.OutOfMemoryError as exc:  # the reference materialises what the fused backends avoid
            raise CannotMeasure(f"not enough memory to check the call against the reference: {exc}") from exc
        check = all(bool(torch.isfinite(t).all()) for t in want)
        tolerance = agreement_tolerance(weight.dtype, device.type)
        runs = {}
        for name in candidates:  # the first run of each is its warm-up (compiles, tunes, loads)
            impl = backends.get_impl(name)
            try:
                got = step(impl, grad)
            except Exception as exc:  # a backend that cannot run this call is not a candidate
                warnings.warn(f"unetpp_fast auto: backend {name!r} failed on a call and is skipped: {exc}")
                continue
            error = (
                max((_relative_error(g, w) for g, w in zip(got, want) if w.numel()), default=0.0)
                if check
                else 0.0
            )
            if not error <= tolerance:
                warnings.warn(
                    f"unetpp_fast auto: backend {name!r} disagrees with the reference backend "
                    f"(relative error {error:.3g} > {tolerance:g}) and is skipped for this kind of call"
                )
                continue
            runs[name] = lambda impl=impl: step(impl, grad)
        # Interleaved, so that a shared machine's load falls on every candidate alike, and each judged
        # by its fastest run: a choice is made once and persisted, so one burst of load on the
        # machine (which only ever slows a run down) must not decide it.
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(TIMED_REPEATS):
            for name, run in runs.items():
                times[name].append(_seconds(run, device))
    seconds = {name: min(t) for name, t in times.items()}
    return _fastest(seconds), seconds


def _fastest(seconds: dict[str, float]) -> str | None:
    """The fastest candidate; the reference (plain PyTorch) keeps its place unless a fused backend
    beats it by more than INFERENCE_MARGIN: a near tie is noise, and eager is the safe side."""
    if not seconds:
        return None
    best = min(seconds, key=seconds.__getitem__)
    if "reference" in seconds and seconds[best] * (1 + INFERENCE_MARGIN) > seconds["reference"]:
        return "reference"
    return best


def candidates(
    device: torch.device,
    dtype: torch.dtype | None,
    num_pieces: int | None,
    spatial_dims: int | None,
    training: bool,
) -> list[str]:
    """The backends that compete: usable and able to take the call; no `reference` in training
    unless no fused backend can take it."""
    names = [
        name
        for name in backends.auto_order(device.type)
        if not backends.why_unusable(name, device)
        and backends.why_cannot_take(name, dtype, num_pieces, spatial_dims) is None
    ]
    if training:
        fused = [n for n in names if n != "reference"]
        return fused or names[:1]
    return names


def describe(device: torch.device | str, training: bool) -> str:
    """What runs this process's convolutions on `device`, for a job's header: the forced backend;
    under `auto`, the one candidate, or the candidates measured per kind of convolution."""
    device = torch.device(device)
    if backends.requested_backend() != "auto":
        return backends.resolve_name(device)
    if not measuring_enabled():
        return f"{backends.resolve_name(device)} (auto, fixed order)"
    names = candidates(device, None, None, None, training)  # any dtype, piece count, dims
    if len(names) == 1:
        return f"{names[0]} (auto)"
    return f"auto (measured per kind of convolution: {', '.join(names)})"


def choose(
    key: tuple,
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    training: bool,
) -> str:
    """The backend `auto` runs for a call of kind `key`: recorded, persisted, or measured now."""
    device = weight.device
    dims = weight.dim() - 2

    def fixed_order() -> str:
        num = len(pieces)
        return backends.resolve_name(device, "auto", dtype=weight.dtype, num_pieces=num, spatial_dims=dims)

    if not measuring_enabled():
        return fixed_order()
    if _SEEN_GENERATION[0] != backends.generation():  # a backend was (re-)registered
        forget()
        _SEEN_GENERATION[0] = backends.generation()
    name = _CHOICES.get(key)
    if name is not None and not backends.why_unusable(name, device):
        return name
    with _LOCK:
        name = _disk_choice(device, key)
    competing = candidates(device, weight.dtype, len(pieces), dims, training)
    if name in competing:
        _CHOICES[key] = name
        return name
    if len(competing) == 1:
        _CHOICES[key] = competing[0]
        return competing[0]
    if not competing or _capturing(device):  # nothing can run, or no timing possible: fixed order
        return fixed_order()
    try:
        best, _ = measure(competing, pieces, codes, weight, bias, activation, training)
    except CannotMeasure as exc:
        # The fixed order, for this process only (nothing measured, nothing written down).
        warnings.warn(f"unetpp_fast auto: {exc}; the fixed order decides this kind of call")
        best = _CHOICES[key] = fixed_order()
        return best
    if best is None:  # every candidate failed or disagreed: the reference is always right
        best = "reference"
    with _LOCK:
        _CHOICES[key] = best
        _persist(device, key, best)
        _DISK.setdefault("file", {}).setdefault(_section_name(device), {})[_encode(key)] = best
    return best
