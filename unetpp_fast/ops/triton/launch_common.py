"""Host-side helpers of the kernel launchers: piece arguments, precision, configs, output allocation."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs

MAX_PIECES = 5
# Pixel counts index rows with int32 inside the kernels; element offsets are int64.
MAX_PIXELS = 2**31 - 2**20


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty_output(
    shape: Sequence[int],
    like: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every tensor a kernel writes is allocated here (tests replace it to poison outputs with NaN)."""
    return torch.empty(
        tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=memory_format
    )


def on_gpu_layout(t: torch.Tensor) -> bool:
    """Whether the kernels take `t`'s tensors in channels_last (on a GPU, outside the interpreter)."""
    return t.device.type == "cuda" and not interpreting()


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """On a GPU the kernels read channels_last tensors: the channel stride is then 1, which Triton
    specialises, so channel loads vectorise (a piece-sized copy at most, never a concatenation).
    The interpreter reads any strides as given, which is how the strided addressing is tested."""
    if on_gpu_layout(t) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots are exact (ieee) unless the user allowed TF32 for matmuls; other dtypes ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def align_corners_scale(size_in: int, size_out: int) -> float:
    """(in - 1) / (out - 1) rounded once to fp32, as PyTorch's bilinear align_corners=True computes it."""
    if size_out <= 1:
        return 0.0
    num = torch.tensor(float(size_in - 1), dtype=torch.float32)
    return float(num / torch.tensor(float(size_out - 1), dtype=torch.float32))


def piece_args(pieces: Sequence[torch.Tensor], codes: Sequence[int]) -> list:
    """Flat per-piece kernel arguments (pointer, strides n/c/h/w, H, W, C, scale_h, scale_w) x MAX_PIECES."""
    if len(pieces) > MAX_PIECES:
        raise ValueError(f"the triton backend takes at most {MAX_PIECES} pieces, got {len(pieces)}")
    args: list = []
    for piece, code in zip(pieces, codes):
        n, c, h, w = piece.shape
        out_h, out_w = conv_spec.resampled_size(h, w, code)
        if code == conv_spec.UP_BILINEAR_AC:
            scales = [align_corners_scale(h, out_h), align_corners_scale(w, out_w)]
        else:
            scales = [0.0, 0.0]
        args += [piece, *piece.stride(), h, w, c, *scales]
    filler = args[:10]
    filler[7] = 0  # an unused slot: no channels, never read
    for _ in range(len(pieces), MAX_PIECES):
        args += filler
    return args


def mode_constexprs(codes: Sequence[int]) -> dict[str, int]:
    padded = list(codes) + [conv_spec.NONE] * (MAX_PIECES - len(codes))
    return {f"MODE{i}": int(code) for i, code in enumerate(padded)}


def check_pixel_count(count: int, what: str) -> None:
    if count > MAX_PIXELS:
        raise ValueError(
            f"{what} has {count} pixels (N*H*W); the triton backend indexes pixels with int32 and "
            f"takes at most {MAX_PIXELS}: split the batch"
        )


_TUNED: dict[tuple[str, str], Callable] = {}


def launch(kernel, kernel_name: str, shape_class: str, grid: Callable, key_args: Sequence[str], *args, **kw):
    """Run `kernel` with the configs of (kernel_name, shape_class): autotuned on a GPU, one small
    fixed config under the interpreter (its autotuner would need a benchmark function)."""
    if interpreting():
        config = configs.interpreter_config(kernel_name)
        kernel[grid(config.all_kwargs())](*args, **kw, **config.all_kwargs())
        return
    tuned = _TUNED.get((kernel_name, shape_class))
    if tuned is None:
        tuned = triton.autotune(configs=configs.gpu_configs(kernel_name, shape_class), key=list(key_args))(
            kernel
        )
        _TUNED[(kernel_name, shape_class)] = tuned
    tuned[grid](*args, **kw)
