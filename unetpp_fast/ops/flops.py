"""FLOP formulas for the fused operator, so `torch.utils.flop_counter.FlopCounterMode` counts it.

The counter sees the custom op as one opaque call (the convolution a backend runs inside it is
hidden from the dispatch mode), so it needs the op's cost spelled out: the same count as the
`aten.convolution` on the materialised concatenation (multiply-adds x 2, bias ignored).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from unetpp_fast.ops import fused_op  # noqa: F401  (defines the ops registered below)


# Only the leading arguments matter; the rest (bias, activation, backend, ...) are taken as they come.
def _fused_conv_flops(pieces_shapes, resample, weight_shape, *_rest, out_shape) -> int:
    # The convolution reads a virtual input of the output's size with sum(C_p) = C_in channels.
    return conv_flop_count(list(out_shape), list(weight_shape), list(out_shape))


def _fused_conv_backward_flops(grad_out_shape, pieces_shapes, resample, weight_shape, *_rest, out_shape):
    # The gradient w.r.t. the virtual input and w.r.t. the weight: each costs one forward convolution.
    return 2 * conv_flop_count(list(grad_out_shape), list(weight_shape), list(grad_out_shape))


if torch.ops.unetpp_fast.fused_conv not in flop_registry:
    register_flop_formula(torch.ops.unetpp_fast.fused_conv)(_fused_conv_flops)
if torch.ops.unetpp_fast.fused_conv_backward not in flop_registry:
    register_flop_formula(torch.ops.unetpp_fast.fused_conv_backward)(_fused_conv_backward_flops)
