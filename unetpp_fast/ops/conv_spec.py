"""What a fused convolution call means: resample modes, activations, shapes, and input checks.

Shared by the Python wrapper, the fake (meta) implementation and every backend, so that bad
input gets the same clear message whichever path sees it first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

# Resample mode per piece; the integer code is what the operator schema and the kernels carry.
RESAMPLE_MODES = ("none", "up_nearest", "up_bilinear", "up_bilinear_ac", "maxpool2")
NONE, UP_NEAREST, UP_BILINEAR, UP_BILINEAR_AC, MAXPOOL2 = range(len(RESAMPLE_MODES))
UPSAMPLING_MODES = (UP_NEAREST, UP_BILINEAR, UP_BILINEAR_AC)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_KERNEL_SIZES = (1, 3)
DEFAULT_LEAKY_SLOPE = 0.01


def resample_code(mode: int | str, where: str = "resample") -> int:
    """Map a mode name or code to its code, with a clear error for anything else."""
    if isinstance(mode, bool):
        raise ValueError(f"{where} must be one of {RESAMPLE_MODES} (or their codes 0..4), got {mode!r}")
    if isinstance(mode, int):
        if 0 <= mode < len(RESAMPLE_MODES):
            return mode
    elif isinstance(mode, str) and mode in RESAMPLE_MODES:
        return RESAMPLE_MODES.index(mode)
    raise ValueError(f"{where} must be one of {RESAMPLE_MODES} (or their codes 0..4), got {mode!r}")


# The one grammar of the activation string, shared with the C++ parser (csrc/fused_conv_ops.cpp):
#   'none' | 'relu' | 'leaky_relu' | 'leaky_relu:' SLOPE
#   SLOPE = ASCII decimal literal: digits with an optional '.' and fraction (or '.' digits),
#           optionally followed by an exponent e/E [+/-] digits; no sign, spaces, '_', or non-ASCII
#           digits (Python's float() accepts those, the C++ parser must not need to); the value must
#           be finite and > 0 (the activation mask is then readable from the output).
_SLOPE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
ACTIVATION_GRAMMAR = (
    "'none', 'relu', 'leaky_relu' or 'leaky_relu:<positive slope>' (the slope an ASCII decimal literal, "
    "e.g. 0.2 or 1e-3)"
)


def parse_activation(activation: str) -> tuple[str, float]:
    """'none' | 'relu' | 'leaky_relu' | 'leaky_relu:<slope>' -> (kind, negative slope)."""
    if not isinstance(activation, str):
        raise ValueError(f"activation must be a string, got {type(activation).__name__}")
    if activation in ("none", "relu"):
        return activation, 0.0
    if activation == "leaky_relu":
        return "leaky_relu", DEFAULT_LEAKY_SLOPE
    if activation.startswith("leaky_relu:"):
        text = activation[len("leaky_relu:") :]
        if _SLOPE.fullmatch(text):
            slope = float(text)
            if 0.0 < slope < math.inf:
                return "leaky_relu", slope
    raise ValueError(f"activation must be {ACTIVATION_GRAMMAR}, got {activation!r}")


def resampled_size(height: int, width: int, code: int) -> tuple[int, int]:
    """Spatial size of a piece after its resample."""
    if code in UPSAMPLING_MODES:
        return 2 * height, 2 * width
    if code == MAXPOOL2:
        return height // 2, width // 2
    return height, width


def check_inputs(
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> tuple[int, int]:
    """Validate one call; return the output spatial size (H, W). Raises ValueError/TypeError."""
    if not isinstance(pieces, (list, tuple)) or len(pieces) == 0:
        raise ValueError("pieces must be a non-empty list of 4-D tensors [N, C_p, H_p, W_p]")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in, k, k], got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"weight dtype must be one of float16, bfloat16, float32, float64, got {weight.dtype}"
        )
    c_out, c_in, kh, kw = weight.shape
    if kh != kw or kh not in SUPPORTED_KERNEL_SIZES:
        raise ValueError(f"weight must have a square kernel of size 1 or 3, got {kh}x{kw}")
    if len(resample) != len(pieces):
        raise ValueError(f"resample has {len(resample)} entries but there are {len(pieces)} pieces")
    parse_activation(activation)

    out_hw = None
    channels = 0
    batch = None
    for index, piece in enumerate(pieces):
        name = f"pieces[{index}]"
        if not isinstance(piece, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(piece).__name__}")
        if piece.dim() != 4:
            raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(piece.shape)}")
        if piece.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {piece.dtype} but weight has {weight.dtype}: all must match")
        if piece.device != weight.device:
            raise ValueError(f"{name} is on {piece.device} but weight is on {weight.device}: all must match")
        if batch is None:
            batch = piece.shape[0]
        elif piece.shape[0] != batch:
            raise ValueError(f"{name} has batch size {piece.shape[0]} but pieces[0] has {batch}")
        code = resample_code(resample[index], f"resample[{index}]")
        hw = resampled_size(piece.shape[2], piece.shape[3], code)
        if out_hw is None:
            out_hw = hw
        elif hw != out_hw:
            raise ValueError(
                f"{name} of spatial size {tuple(piece.shape[2:])} with resample "
                f"'{RESAMPLE_MODES[code]}' becomes {hw}, but pieces[0] becomes {out_hw}: "
                "every piece must have the same size after its resample"
            )
        channels += piece.shape[1]
    if out_hw[0] < 1 or out_hw[1] < 1:
        raise ValueError(f"the output spatial size would be {out_hw}; it must be at least 1x1")
    if channels != c_in:
        raise ValueError(
            f"the pieces have {channels} channels in all "
            f"({' + '.join(str(p.shape[1]) for p in pieces)}) but weight expects C_in = {c_in}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != c_out:
            raise ValueError(f"bias must be 1-D of length C_out = {c_out}, got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(
                f"bias is {bias.dtype} on {bias.device} but weight is {weight.dtype} on {weight.device}"
            )
    return out_hw


def output_memory_format(first_piece: torch.Tensor) -> torch.memory_format:
    """The output takes the first piece's memory format."""
    if (
        first_piece.dim() == 4
        and first_piece.shape[1] > 1
        and first_piece.is_contiguous(memory_format=torch.channels_last)
        and not first_piece.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format
