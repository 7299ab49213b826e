"""UNet++ (Zhou et al., 2018/2019) on the fused operator, with deep supervision and real pruning.

Node X[i,j] = H(cat(X[i,0..j-1], U(X[i+1,j-1]))), encoder X[i,0] = H(maxpool(X[i-1,0])); 1x1 heads
on X[0,1..depth] (deep supervision) or on X[0,depth]. Every convolution runs through
`unetpp_fast.fused_conv`, on whichever backend the operator selects; the model never picks one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unetpp_fast.nn.blocks import conv_class
from unetpp_fast.nn.node_grid import MIN_DEPTH, NodeGrid, _check_positive_int
from unetpp_fast.nn.unet import UNet, wide_unet
from unetpp_fast.ops import flops as _flops  # noqa: F401  (lets FlopCounterMode count the fused operator)

Tensor = torch.Tensor

MODES = ("accurate", "fast")

__all__ = ["MODES", "UNet", "UNetPlusPlus", "wide_unet"]


class UNetPlusPlus(NodeGrid):
    """UNet++ with the state_dict keys of pytorch-nested-unet's ``NestedUNet``.

    Args:
        in_channels: channels of the input image.
        num_classes: channels of the logits.
        filters: channels per level; depth = len(filters) - 1 (2..5).
        deep_supervision: heads ``final1..final{depth}`` on X[0,1..depth]; else one head ``final``.
        block: ``"conv_bn_relu"`` (conv-BN-ReLU x2) or ``"conv_relu"`` (the paper's conv-ReLU x2).
        upsample: ``"bilinear_ac"`` (align_corners=True), ``"bilinear"``, ``"nearest"`` or
            ``"deconv"`` (2x2 stride-2 transposed convolution to ``filters[i]`` channels).
        mode: eval output with deep supervision: ``"accurate"`` averages the heads' logits,
            ``"fast"`` returns head ``prune`` (default: the last head) alone.
        prune: 1..depth, with ``mode="fast"``: only nodes X[i,j] with i + j <= prune are computed.
        pad_to_multiple: pad H, W to the multiple of 2**levels the network needs and crop the
            output back; otherwise such an input raises ValueError.
        spatial_dims: 2 (images [N, C, H, W]) or 3 (volumes [N, C, D, H, W]: 3x3x3 convolutions,
            2x2x2 max-pooling, trilinear or 2x2x2 transposed-convolution upsampling; the same
            module and state_dict key names as in 2D).

    forward(x [N, in_channels, H, W]) returns logits [N, num_classes, H, W] ([N, num_classes, D,
    H, W] in 3D); in training with deep
    supervision, the list of the ``depth`` heads' logits. `mode` and `prune` may be changed on the
    instance at any time.
    """

    dense = True

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        filters: Sequence[int] = (32, 64, 128, 256, 512),
        deep_supervision: bool = True,
        block: str = "conv_bn_relu",
        upsample: str = "bilinear_ac",
        mode: str = "accurate",
        prune: int | None = None,
        pad_to_multiple: bool = False,
        spatial_dims: int = 2,
        *,
        _min_depth: int = MIN_DEPTH,
    ) -> None:
        super().__init__(in_channels, filters, block, upsample, pad_to_multiple, _min_depth, spatial_dims)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.deep_supervision = bool(deep_supervision)
        self.mode = mode
        self.prune = prune
        self._output_levels()  # validates mode and prune now
        head = conv_class(self.spatial_dims)
        if self.deep_supervision:
            for j in range(1, self.depth + 1):
                self.add_module(f"final{j}", head(self.filters[0], num_classes, 1))
        else:
            self.final = head(self.filters[0], num_classes, 1)

    def _output_levels(self) -> int:
        """The head the eval output comes from in fast mode (= the levels computed); checks mode/prune."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        prune = self.prune
        if prune is None:
            return self.depth
        if not self.deep_supervision:
            raise ValueError("prune needs deep_supervision=True: without it there is only the last head")
        if self.mode != "fast":
            raise ValueError(
                f"prune={prune!r} selects one head and needs mode='fast', got mode={self.mode!r}"
            )
        if not isinstance(prune, int) or isinstance(prune, bool) or not 1 <= prune <= self.depth:
            raise ValueError(f"prune must be an int in 1..{self.depth} (the depth) or None, got {prune!r}")
        return prune

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        levels = self._output_levels()
        if not self.deep_supervision:
            x, box = self.pad_input(x, self.depth)
            nodes = self.compute_nodes(x, self.depth)
            return self.crop(self.head(self.final, nodes[0, self.depth]), box)
        if self.training or self.mode == "accurate":
            levels = self.depth
        x, box = self.pad_input(x, levels)
        nodes = self.compute_nodes(x, levels)
        if self.training:
            return [
                self.crop(self.head(getattr(self, f"final{j}"), nodes[0, j]), box)
                for j in range(1, levels + 1)
            ]
        if self.mode == "fast":
            return self.crop(self.head(getattr(self, f"final{levels}"), nodes[0, levels]), box)
        outputs = [self.head(getattr(self, f"final{j}"), nodes[0, j]) for j in range(1, levels + 1)]
        return self.crop(torch.stack(outputs).mean(dim=0), box)

    def pruned(self, level: int) -> UNetPlusPlus:
        """A standalone UNet++ holding only the nodes X[i,j] with i + j <= `level` and heads 1..level.

        Its output (eval) equals this model's with ``mode="fast", prune=level``; its state_dict keys
        are a subset of this model's, its parameters copies of these.
        """
        if not self.deep_supervision:
            raise ValueError("pruned() needs deep_supervision=True: without it there is only the last head")
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= self.depth:
            raise ValueError(f"level must be an int in 1..{self.depth} (the depth), got {level!r}")
        # The sub-network of head L is a UNet++ of depth L on the first L + 1 levels' filters.
        small = UNetPlusPlus(
            self.in_channels,
            self.num_classes,
            self.filters[: level + 1],
            deep_supervision=True,
            block=self.block,
            upsample=self.upsample,
            mode="fast",
            pad_to_multiple=self.pad_to_multiple,
            spatial_dims=self.spatial_dims,
            _min_depth=1,
        )
        reference = next(self.parameters())
        small.to(device=reference.device, dtype=reference.dtype)
        state = self.state_dict()
        small.load_state_dict({k: state[k] for k in small.state_dict()})
        return small.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, filters={self.filters}, "
            f"deep_supervision={self.deep_supervision}, block={self.block!r}, upsample={self.upsample!r}, "
            f"mode={self.mode!r}, prune={self.prune!r}, pad_to_multiple={self.pad_to_multiple}"
            + (f", spatial_dims={self.spatial_dims}" if self.spatial_dims != 2 else "")
        )
