"""The `unetpp_fast::fused_conv` operator: schema, fake implementation, autograd, Python wrapper.

    virtual = cat([R_p(pieces[p]) for p], dim=1)       # never materialised by the fused backends
    out     = act(conv2d(virtual, weight, bias, padding=k // 2))

The operator routes each call to the backend chosen by `unetpp_fast.backends` at run time.
Its backward is an operator of its own (`unetpp_fast::fused_conv_backward`); it saves the
pieces by reference (they are other nodes' outputs, alive anyway) and, for a non-linear
activation, the output for the activation mask — never the concatenated input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unetpp_fast.ops import backends, conv_spec

# Importing the backend modules registers them; none of them imports Triton or touches CUDA here.
from unetpp_fast.ops import native as _backend_native  # noqa: F401  (registers 'cpu' and 'cuda')
from unetpp_fast.ops import reference as _reference  # noqa: F401  (registers 'reference')
from unetpp_fast.ops.triton import backend as _backend_triton  # noqa: F401  (registers 'triton')

Tensor = torch.Tensor


@torch.library.custom_op("unetpp_fast::fused_conv", mutates_args=())
def fused_conv_op(
    pieces: list[Tensor], resample: list[int], weight: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    conv_spec.check_inputs(pieces, resample, weight, bias, activation)
    _, impl = backends.resolve(weight.device)
    return impl.forward(pieces, resample, weight, bias, activation)


@fused_conv_op.register_fake
def _fused_conv_fake(pieces, resample, weight, bias, activation):
    height, width = conv_spec.check_inputs(pieces, resample, weight, bias, activation)
    shape = (pieces[0].shape[0], weight.shape[0], height, width)
    return weight.new_empty(shape).contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))


@torch.library.custom_op("unetpp_fast::fused_conv_backward", mutates_args=())
def fused_conv_backward_op(
    grad_out: Tensor,
    pieces: list[Tensor],
    resample: list[int],
    weight: Tensor,
    out: Tensor | None,
    has_bias: bool,
    activation: str,
) -> list[Tensor]:
    """[grad_piece_0, ..., grad_piece_{n-1}, grad_weight, grad_bias (empty when has_bias is False)]."""
    _, impl = backends.resolve(weight.device)
    return impl.backward(
        grad_out.contiguous(memory_format=conv_spec.output_memory_format(pieces[0])),
        pieces,
        resample,
        weight,
        out,
        has_bias,
        activation,
    )


@fused_conv_backward_op.register_fake
def _fused_conv_backward_fake(grad_out, pieces, resample, weight, out, has_bias, activation):
    grads = [torch.empty_like(p) for p in pieces]
    grads.append(torch.empty_like(weight, memory_format=torch.contiguous_format))
    grads.append(weight.new_empty(weight.shape[0] if has_bias else 0))
    return grads


def _setup_context(ctx, inputs, output):
    pieces, resample, weight, bias, activation = inputs
    ctx.resample = list(resample)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.num_pieces = len(pieces)
    needs_out = conv_spec.parse_activation(activation)[0] != "none"
    ctx.save_for_backward(*pieces, weight, output if needs_out else None)


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    pieces, weight, out = list(saved[: ctx.num_pieces]), saved[ctx.num_pieces], saved[ctx.num_pieces + 1]
    grads = fused_conv_backward_op(grad_out, pieces, ctx.resample, weight, out, ctx.has_bias, ctx.activation)
    grad_pieces = list(grads[: ctx.num_pieces])
    grad_bias = grads[-1] if ctx.has_bias else None
    return grad_pieces, None, grads[ctx.num_pieces], grad_bias, None


fused_conv_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def fused_conv(
    pieces: Sequence[Tensor] | Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    resample: Sequence[int | str] | None = None,
    activation: str = "relu",
    backend: str = "auto",
) -> Tensor:
    """Convolve the virtual concatenation of `pieces` (each resampled first) with `weight`.

    Args:
        pieces: tensors [N, C_p, H_p, W_p] (or one tensor); concatenated along channels, virtually.
        weight: [C_out, sum(C_p), k, k], k in {1, 3}; stride 1, padding k // 2.
        bias: [C_out] or None.
        resample: per piece 'none', 'up_nearest', 'up_bilinear', 'up_bilinear_ac' (align_corners
            True) or 'maxpool2' (or their codes 0..4); default all 'none'.
        activation: 'none', 'relu', 'leaky_relu' or 'leaky_relu:<slope>', applied in the epilogue.
        backend: 'auto', 'reference', 'triton', 'cuda' or 'cpu'; a named backend that cannot run
            these tensors raises instead of falling back.

    Returns:
        [N, C_out, H, W] in the first piece's memory format. Under `torch.autocast` the inputs are
        cast to the autocast dtype first.
    """
    if isinstance(pieces, Tensor):
        pieces = [pieces]
    if not isinstance(pieces, (list, tuple)):
        raise ValueError(f"pieces must be a non-empty list of 4-D tensors, got {type(pieces).__name__}")
    pieces = list(pieces)
    if resample is None:
        codes = [conv_spec.NONE] * len(pieces)
    else:
        if isinstance(resample, (str, int)):
            raise ValueError("resample must be a list with one mode per piece, e.g. ['none', 'up_bilinear']")
        codes = [conv_spec.resample_code(m, f"resample[{i}]") for i, m in enumerate(resample)]
    if isinstance(weight, Tensor):
        cast = _autocast_dtype(weight.device.type)
        if cast is not None:
            pieces = [p.to(cast) if isinstance(p, Tensor) and p.is_floating_point() else p for p in pieces]
            weight = weight.to(cast)
            bias = bias.to(cast) if isinstance(bias, Tensor) else bias
    conv_spec.check_inputs(pieces, codes, weight, bias, activation)
    if backend != "auto":
        with backends.use_backend(backend):
            return fused_conv_op(pieces, codes, weight, bias, activation)
    return fused_conv_op(pieces, codes, weight, bias, activation)
