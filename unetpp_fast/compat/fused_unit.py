"""One convolution unit of a borrowed UNet++ (conv -> norm -> dropout -> activation) on `fused_conv`.

The compatibility classes keep the original modules (same parameters, same state_dict keys) and
only change how a unit runs: its convolution reads the unit's inputs as virtual pieces through
`unetpp_fast.fused_conv`. What follows the convolution is folded into it where that is exact:

Units of 3D networks (Conv3d on 5-D tensors, BatchNorm3d) run the same way on the 3D operator.

* BatchNorm in eval mode with running statistics -> folded into the weight and bias, recomputed on
  every forward (O(parameters); a cache could be older than the parameters, see nn/blocks.py);
* Identity, and dropout that is inactive (eval mode or p == 0) -> skipped;
* ReLU / LeakyReLU (positive slope) -> the operator's epilogue ('relu', 'leaky_relu:<slope>').

Everything else (instance/group/layer norm, BatchNorm in training, active dropout, other
activations) runs as the original module on the convolution's output, in the original order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.fused_op import fused_conv
from unetpp_fast.ops.reference import apply_resample

Tensor = torch.Tensor

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class FollowsOriginal:
    """Mixin for an accelerated module that wraps an original one: both are in the same mode.

    `fast = accelerate(net); net.eval()` must make `fast(x)` run in eval mode (and not update
    `net`'s running statistics), and `fast.eval()` must put `net` in eval mode too: the original
    is the one mode, read at each forward and set by `train()` / `eval()` on either.
    """

    def _follow(self, original: nn.Module) -> None:
        # A plain attribute, not a submodule: no second set of state_dict keys, no recursion.
        object.__setattr__(self, "_original", original)

    def train(self, mode: bool = True):
        result = super().train(mode)
        original = self.__dict__.get("_original")
        if original is not None and original.training != mode:
            original.train(mode)
        return result

    def _follow_mode(self) -> None:
        """Take the original's mode (call at the start of forward)."""
        original = self.__dict__.get("_original")
        if original is not None and original.training != self.training:
            nn.Module.train(self, original.training)


def unaccounted_children(module: nn.Module, allowed: Sequence[str], where: str = "") -> str:
    """'' when every child of `module` is named in `allowed`, else a sentence naming the others."""
    extra = [
        f"{where}{name} ({type(child).__name__})"
        for name, child in module.named_children()
        if name not in allowed
    ]
    if not extra:
        return ""
    return f"unaccounted child module(s) {', '.join(extra)}: the fused forward would not run them"


def conv_is_fusable(conv: nn.Module) -> bool:
    """True when `conv` is a Conv2d / Conv3d the operator computes: 1x1(x1) or 3x3(x3), stride 1,
    'same' zero padding."""
    if type(conv) not in (nn.Conv2d, nn.Conv3d):
        return False
    k = tuple(conv.kernel_size)
    if len(set(k)) != 1 or k[0] not in conv_spec.SUPPORTED_KERNEL_SIZES:
        return False
    ones = (1,) * len(k)
    padding_ok = conv.padding == "same" or tuple(conv.padding) == (k[0] // 2,) * len(k)
    return (
        padding_ok
        and tuple(conv.stride) == ones
        and tuple(conv.dilation) == ones
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def materialise(pieces: Sequence[Tensor], resample: Sequence[int]) -> Tensor:
    """The concatenated, resampled input as a real tensor (for units that cannot run fused)."""
    parts = [apply_resample(p, int(c)) for p, c in zip(pieces, resample)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _is_passthrough(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity):
        return True
    if isinstance(module, _DROPOUT_TYPES):
        return not module.training or module.p == 0.0
    return False


def _bn_foldable(module: nn.Module) -> bool:
    return (
        type(module) in (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def epilogue_activation(module: nn.Module) -> str | None:
    """The operator's activation string equal to `module`, or None if the epilogue cannot do it."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.LeakyReLU:
        slope = float(module.negative_slope)
        if slope == 0.0:
            return "relu"
        if 0.0 < slope < math.inf:  # repr() of a finite float is a literal of the operator's grammar
            return f"leaky_relu:{slope!r}"
    return None


def _fold_now(conv: nn.Conv2d | nn.Conv3d, norms: Sequence[nn.Module]) -> tuple[Tensor, Tensor]:
    """BatchNorm(s) in eval mode folded into the convolution, computed in fp32 at least."""
    weight = conv.weight
    compute = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(compute)
    b = conv.bias.to(compute) if conv.bias is not None else w.new_zeros(w.shape[0])
    for bn in norms:
        scale = torch.rsqrt(bn.running_var.to(compute) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(compute)
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        b = (b - bn.running_mean.to(compute)) * scale
        if bn.bias is not None:
            b = b + bn.bias.to(compute)
    return w.to(weight.dtype), b.to(weight.dtype)


def run_conv_unit(
    pieces: Sequence[Tensor],
    resample: Sequence[int],
    conv: nn.Module,
    after: Sequence[nn.Module] = (),
) -> Tensor:
    """`after[-1](...after[0](conv(cat(resampled pieces))))`, with the conv run by `fused_conv`.

    Pieces with zero channels are dropped (they contribute nothing). A convolution the operator
    cannot compute (other kernel size, stride, groups, padding mode, another dimensionality) runs
    as the original module on the materialised input.
    """
    kept = [(p, int(c)) for p, c in zip(pieces, resample) if p.shape[1] > 0]
    if kept:
        pieces, resample = [p for p, _ in kept], [c for _, c in kept]
    if not conv_is_fusable(conv):
        out = conv(materialise(pieces, resample))
        for module in after:
            out = module(out)
        return out

    norms: list[nn.Module] = []
    activation = "none"
    index = 0
    while index < len(after):
        module = after[index]
        if _is_passthrough(module):
            index += 1
        elif _bn_foldable(module):
            norms.append(module)
            index += 1
        else:
            fused_activation = epilogue_activation(module)
            if fused_activation is not None:
                activation = fused_activation
                index += 1
            break
    if norms:
        weight, bias = _fold_now(conv, norms)
    else:
        weight, bias = conv.weight, conv.bias
    out = fused_conv(list(pieces), weight, bias, resample=list(resample), activation=activation)
    for module in after[index:]:
        out = module(out)
    return out


def replicate_pad_to(x: Tensor, like: Tensor) -> Tensor:
    """Pad `x` by one at the end of each spatial dim where its size differs from `like`'s (MONAI's rule)."""
    dims = x.dim() - 2
    pad = [0] * (2 * dims)
    changed = False
    for i in range(dims):
        if x.shape[-i - 1] != like.shape[-i - 1]:
            pad[2 * i + 1] = 1
            changed = True
    return F.pad(x, pad, "replicate") if changed else x
