"""The grid of nodes X[i,j] that UNet++ and U-Net share: construction, input checks, the forward.

Node X[i,0] (encoder) is a block on max-pooled X[i-1,0] (X[0,0] on the input). A decoder node
X[i,j], j >= 1, is a block on [skips..., up(X[i+1,j-1])] where the skips are X[i,0..j-1] in
UNet++ (dense) and X[i,0] alone in U-Net. Each first convolution reads its pieces virtually
through `fused_conv` (max-pooling and interpolation are resample codes of the operator); 'deconv'
upsampling is a 2x2 stride-2 ConvTranspose2d whose output is a plain piece.

Module names are those of pytorch-nested-unet: blocks ``conv{i}_{j}``; a transposed convolution
feeding node X[i,j] is ``up{i}_{j}``.

3D (``spatial_dims=3``, volumes [N, C, D, H, W]): the same grid, names and keys, on Conv3d /
BatchNorm3d / ConvTranspose3d (2x2x2) and the operator's 5-D pieces; max-pooling is 2x2x2 and the
interpolating upsamples are trilinear ('bilinear_ac' / 'bilinear' are accepted as the names of
'trilinear_ac' / 'trilinear', so one configuration serves both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetpp_fast.nn.blocks import ConvBlock, check_block, check_spatial_dims, conv_transpose_class
from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.fused_op import fused_conv

Tensor = torch.Tensor

UPSAMPLES = ("bilinear_ac", "bilinear", "nearest", "deconv")
UPSAMPLES_3D = ("trilinear_ac", "trilinear", *UPSAMPLES)
_UPSAMPLE_CODES = {
    "bilinear_ac": conv_spec.UP_BILINEAR_AC,
    "bilinear": conv_spec.UP_BILINEAR,
    "nearest": conv_spec.UP_NEAREST,
    # The operator's interpolating codes mean trilinear on 5-D pieces.
    "trilinear_ac": conv_spec.UP_BILINEAR_AC,
    "trilinear": conv_spec.UP_BILINEAR,
}
MIN_DEPTH, MAX_DEPTH = 2, 5


def check_filters(filters: Sequence[int], min_depth: int = MIN_DEPTH) -> tuple[int, ...]:
    """Validate the channels per level; depth = len(filters) - 1 must lie in min_depth..5."""
    try:
        values = tuple(filters)
    except TypeError:
        raise ValueError(f"filters must be a sequence of positive ints, got {filters!r}") from None
    if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in values):
        raise ValueError(f"filters must be positive ints, got {values!r}")
    depth = len(values) - 1
    if not min_depth <= depth <= MAX_DEPTH:
        raise ValueError(
            f"filters must have {min_depth + 1} to {MAX_DEPTH + 1} entries (depth = len(filters) - 1 "
            f"between {min_depth} and {MAX_DEPTH}), got {len(values)}: {values!r}"
        )
    return values


def _check_positive_int(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class NodeGrid(nn.Module):
    """Nodes X[i,j] on `filters`, dense (UNet++) or plain (U-Net) skips; subclasses add the heads."""

    dense: bool = True

    def __init__(
        self,
        in_channels: int,
        filters: Sequence[int],
        block: str,
        upsample: str,
        pad_to_multiple: bool,
        min_depth: int = MIN_DEPTH,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.filters = check_filters(filters, min_depth)
        self.depth = len(self.filters) - 1
        self.block = check_block(block)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        allowed = UPSAMPLES_3D if spatial_dims == 3 else UPSAMPLES
        if upsample not in allowed:
            raise ValueError(
                f"upsample must be one of {allowed} (spatial_dims={spatial_dims}), got {upsample!r}"
            )
        self.upsample = upsample
        self.pad_to_multiple = bool(pad_to_multiple)
        f = self.filters
        for i, j in self.node_indices():
            if j == 0:
                node_in = in_channels if i == 0 else f[i - 1]
            else:
                skips = j if self.dense else 1
                up_channels = f[i] if upsample == "deconv" else f[i + 1]
                node_in = f[i] * skips + up_channels
                if upsample == "deconv":
                    deconv = conv_transpose_class(spatial_dims)(f[i + 1], f[i], 2, stride=2)
                    self.add_module(f"up{i}_{j}", deconv)
            self.add_module(f"conv{i}_{j}", ConvBlock(node_in, f[i], block, spatial_dims))

    # --- explicit inference freeze: the only place folded BatchNorm weights are kept ------------

    _is_frozen: bool = False

    def freeze(self) -> NodeGrid:
        """Inference deployments: switch to eval mode and fold every BatchNorm once.

        Without it the fold is recomputed on each eval forward (O(parameters); see
        `unetpp_fast.nn.blocks`). Frozen, the folded weights are reused, so the model refuses to
        train: `train()` raises, and so does a forward that would need parameter gradients.
        `load_state_dict` and `.to()` / `.half()` refold. Edits to parameters in any other way
        (optimizer steps, `.data`, `copy_`) are NOT seen until `freeze()` is called again.
        """
        self.eval()
        for module in self.modules():
            if isinstance(module, ConvBlock):
                module.freeze()
        self._is_frozen = True
        return self

    def unfreeze(self) -> NodeGrid:
        """Drop the folded weights: each eval forward folds again, and training is allowed."""
        for module in self.modules():
            if isinstance(module, ConvBlock):
                module.unfreeze()
        self._is_frozen = False
        return self

    @property
    def frozen(self) -> bool:
        return self._is_frozen

    def train(self, mode: bool = True) -> NodeGrid:
        if mode and self._is_frozen:
            raise RuntimeError(
                f"{type(self).__name__} is frozen for inference (freeze()); call unfreeze() before train()"
            )
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._is_frozen:
            self.freeze()  # the folded weights must describe the parameters just loaded
        return result

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self.__dict__.get("_is_frozen"):
            self.freeze()  # .to(), .half(), .cuda(): fold again on the new device / dtype
        return result

    def node_indices(self) -> list[tuple[int, int]]:
        """(i, j) of every node, in an order where each node's inputs come first."""
        nodes = [(i, 0) for i in range(self.depth + 1)]
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                if self.dense or i + j == self.depth:
                    nodes.append((i, j))
        return nodes

    def _upsampled(self, x: Tensor, i: int, j: int) -> tuple[Tensor, int]:
        """The piece up(X[i+1,j-1]) for node X[i,j], with its resample code."""
        if self.upsample == "deconv":
            return getattr(self, f"up{i}_{j}")(x), conv_spec.NONE
        return x, _UPSAMPLE_CODES[self.upsample]

    def compute_nodes(self, x: Tensor, levels: int) -> dict[tuple[int, int], Tensor]:
        """Every node X[i,j] with i + j <= levels (and i <= levels), from the (padded) input."""
        nodes: dict[tuple[int, int], Tensor] = {(0, 0): self.conv0_0([x])}
        for i in range(1, levels + 1):
            nodes[i, 0] = getattr(self, f"conv{i}_0")([nodes[i - 1, 0]], [conv_spec.MAXPOOL2])
        for j in range(1, levels + 1):
            for i in range(levels - j + 1):
                if not (self.dense or i + j == self.depth):
                    continue
                skips = [nodes[i, k] for k in range(j)] if self.dense else [nodes[i, 0]]
                up, code = self._upsampled(nodes[i + 1, j - 1], i, j)
                codes = [conv_spec.NONE] * len(skips) + [code]
                nodes[i, j] = getattr(self, f"conv{i}_{j}")([*skips, up], codes)
        return nodes

    def pad_input(self, x: Tensor, levels: int) -> tuple[Tensor, tuple[int, ...]]:
        """Check `x`; pad H, W (D, H, W in 3D) up to a multiple of 2**levels when allowed.

        Returns (x, crop box): (start, stop) of each spatial axis, flattened, first axis first.
        """
        rank = self.__dict__.get("spatial_dims", 2) + 2
        if not isinstance(x, Tensor) or x.dim() != rank:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            layout = "[N, C, D, H, W]" if rank == 5 else "[N, C, H, W]"
            raise ValueError(f"input must be a {rank}-D tensor {layout}, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        param = next(self.parameters(), None)
        if param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input has dtype {x.dtype} but the model's parameters are {param.dtype}: convert one "
                "(model.to(dtype) or x.to(dtype)), or run under torch.autocast"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channels but the model expects in_channels={self.in_channels} "
                f"(input shape {tuple(x.shape)})"
            )
        sizes = tuple(x.shape[2:])
        multiple = 2**levels
        box = tuple(v for s in sizes for v in (0, s))
        if all(s % multiple == 0 for s in sizes):
            return x, box
        if not self.pad_to_multiple:
            what = "depth, height and width" if rank == 5 else "height and width"
            raise ValueError(
                f"input {what} must be multiples of {multiple} (2**{levels}, one halving per "
                f"level), got {'x'.join(map(str, sizes))}; pass pad_to_multiple=True to pad and crop back"
            )
        pads = [(-s) % multiple for s in sizes]
        starts = [p // 2 for p in pads]
        # F.pad takes the last axis first.
        x = F.pad(x, [v for p, st in reversed(list(zip(pads, starts))) for v in (st, p - st)])
        return x, tuple(v for s, st in zip(sizes, starts) for v in (st, st + s))

    @staticmethod
    def crop(y: Tensor, box: tuple[int, ...]) -> Tensor:
        axes = len(box) // 2
        spans = [(box[2 * a], box[2 * a + 1]) for a in range(axes)]
        if all(start == 0 and stop == size for (start, stop), size in zip(spans, y.shape[-axes:])):
            return y
        return y[(..., *(slice(start, stop) for start, stop in spans))]

    @staticmethod
    def head(conv: nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
        """A 1x1 convolution head (logits), through the operator."""
        return fused_conv([x], conv.weight, conv.bias, None, "none")
