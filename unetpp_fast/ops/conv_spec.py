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
# 3D (5-D pieces [N, C, D, H, W]): the same codes, the interpolating ones meaning trilinear and
# maxpool2 a 2x2x2 window. One code set keeps the schema and the kernels' mode switch one.
RESAMPLE_MODES_3D = ("none", "up_nearest", "up_trilinear", "up_trilinear_ac", "maxpool2")
SPATIAL_DIMS = (2, 3)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_KERNEL_SIZES = (1, 3)
DEFAULT_LEAKY_SLOPE = 0.01


def mode_names(spatial_dims: int | None = None) -> tuple[str, ...]:
    """The resample mode names, indexed by code, for 2-D (4-D pieces) or 3-D (5-D pieces) calls."""
    return RESAMPLE_MODES_3D if spatial_dims == 3 else RESAMPLE_MODES


def resample_code(mode: int | str, where: str = "resample", spatial_dims: int | None = None) -> int:
    """Map a mode name or code to its code, with a clear error for anything else.

    `spatial_dims` (2 or 3, None: either) decides which names are valid: 'up_bilinear(_ac)' for
    4-D pieces, 'up_trilinear(_ac)' for 5-D pieces; the codes 0..4 are valid for both.
    """
    names = mode_names(spatial_dims) if spatial_dims is not None else RESAMPLE_MODES
    if isinstance(mode, bool):
        raise ValueError(f"{where} must be one of {names} (or their codes 0..4), got {mode!r}")
    if isinstance(mode, int):
        if 0 <= mode < len(RESAMPLE_MODES):
            return mode
    elif isinstance(mode, str):
        if mode in names:
            return names.index(mode)
        if spatial_dims is None and mode in RESAMPLE_MODES_3D:
            return RESAMPLE_MODES_3D.index(mode)
        other = RESAMPLE_MODES if spatial_dims == 3 else RESAMPLE_MODES_3D
        if spatial_dims is not None and mode in other:
            raise ValueError(
                f"{where} is {mode!r}, a mode of {7 - spatial_dims}-D pieces, but the pieces are "
                f"{spatial_dims + 2}-D: use one of {names}"
            )
    raise ValueError(f"{where} must be one of {names} (or their codes 0..4), got {mode!r}")


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
    """Spatial size of a 2-D piece after its resample."""
    return resampled_shape((height, width), code)


def resampled_shape(spatial: Sequence[int], code: int) -> tuple[int, ...]:
    """Spatial size (H, W) or (D, H, W) of a piece after its resample: every axis alike."""
    if code in UPSAMPLING_MODES:
        return tuple(2 * s for s in spatial)
    if code == MAXPOOL2:
        return tuple(s // 2 for s in spatial)
    return tuple(spatial)


_SHAPES = {
    4: ("[N, C, H, W]", "[C_out, C_in, k, k]", "square"),
    5: ("[N, C, D, H, W]", "[C_out, C_in, k, k, k]", "cubic"),
}


def check_inputs(
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> tuple[int, ...]:
    """Validate one call; return the output spatial size, (H, W) for 4-D pieces and a 4-D weight,
    (D, H, W) for 5-D ones. Raises ValueError/TypeError."""
    if not isinstance(pieces, (list, tuple)) or len(pieces) == 0:
        raise ValueError(
            "pieces must be a non-empty list of 4-D tensors [N, C_p, H_p, W_p] "
            "(or 5-D [N, C_p, D_p, H_p, W_p] with a 5-D weight)"
        )
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() not in _SHAPES:
        raise ValueError(
            f"weight must be 4-D {_SHAPES[4][1]} or 5-D {_SHAPES[5][1]}, got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"weight dtype must be one of float16, bfloat16, float32, float64, got {weight.dtype}"
        )
    rank = weight.dim()
    piece_layout, _, kernel_shape = _SHAPES[rank]
    c_out, c_in, *kernel = weight.shape
    # Compared, not hashed: under tracing the sizes may be SymInts.
    if any(k != kernel[0] for k in kernel) or kernel[0] not in SUPPORTED_KERNEL_SIZES:
        raise ValueError(
            f"weight must have a {kernel_shape} kernel of size 1 or 3, got {'x'.join(map(str, kernel))}"
        )
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
        if index > 0 and piece.dim() in _SHAPES and piece.dim() != pieces[0].dim():
            raise ValueError(
                f"{name} is {piece.dim()}-D but pieces[0] is {pieces[0].dim()}-D: every piece must be "
                "4-D [N, C, H, W] (2D) or every piece 5-D [N, C, D, H, W] (3D)"
            )
        if piece.dim() != rank:
            raise ValueError(
                f"{name} must be {rank}-D {piece_layout} to match the {rank}-D weight, "
                f"got shape {tuple(piece.shape)}"
            )
        if piece.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {piece.dtype} but weight has {weight.dtype}: all must match")
        if piece.device != weight.device:
            raise ValueError(f"{name} is on {piece.device} but weight is on {weight.device}: all must match")
        if batch is None:
            batch = piece.shape[0]
        elif piece.shape[0] != batch:
            raise ValueError(f"{name} has batch size {piece.shape[0]} but pieces[0] has {batch}")
        code = resample_code(resample[index], f"resample[{index}]")
        hw = resampled_shape(tuple(piece.shape[2:]), code)
        if out_hw is None:
            out_hw = hw
        elif hw != out_hw:
            raise ValueError(
                f"{name} of spatial size {tuple(piece.shape[2:])} with resample "
                f"'{mode_names(rank - 2)[code]}' becomes {hw}, but pieces[0] becomes {out_hw}: "
                "every piece must have the same size after its resample"
            )
        channels += piece.shape[1]
    if min(out_hw) < 1:
        raise ValueError(
            f"the output spatial size would be {out_hw}; it must be at least {'x'.join('1' * len(out_hw))}"
        )
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


def channels_last_format(dim: int) -> torch.memory_format:
    """The channels-last memory format of a `dim`-D tensor (4-D: channels_last, 5-D: _3d)."""
    return torch.channels_last_3d if dim == 5 else torch.channels_last


def output_memory_format(first_piece: torch.Tensor) -> torch.memory_format:
    """The output takes the first piece's memory format (channels_last / channels_last_3d or not)."""
    if first_piece.dim() not in _SHAPES:
        return torch.contiguous_format
    cl = channels_last_format(first_piece.dim())
    if (
        first_piece.shape[1] > 1
        and first_piece.is_contiguous(memory_format=cl)
        and not first_piece.is_contiguous()
    ):
        return cl
    return torch.contiguous_format
