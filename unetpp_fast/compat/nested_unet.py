"""pytorch-nested-unet's `NestedUNet`, drop-in: same constructor, state_dict keys and outputs.

A configuration of `unetpp_fast.UNetPlusPlus` (conv-BN-ReLU blocks, filters 32..512, bilinear
upsampling with align_corners=True), whose keys are already NestedUNet's: blocks
`conv{i}_{j}.{conv1,bn1,conv2,bn2}`, head `final` or `final1..final4` with deep supervision.

The one behavioural difference from `UNetPlusPlus` is the original's: with deep supervision the
output is the list of the four heads' logits in train *and* eval mode (no averaging); without,
one tensor. Every convolution runs through `unetpp_fast.fused_conv`; in eval mode BatchNorm is
folded into the convolutions. Input H and W must be multiples of 16 (ValueError otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from unetpp_fast.compat.checkpoint import ReadableLoadStateDict
from unetpp_fast.compat.fused_unit import FollowsOriginal, unaccounted_children
from unetpp_fast.nn.unetpp import UNetPlusPlus

Tensor = torch.Tensor

NB_FILTER = (32, 64, 128, 256, 512)
DEPTH = 4
NODES = tuple((i, j) for j in range(DEPTH + 1) for i in range(DEPTH + 1 - j))


class NestedUNet(FollowsOriginal, ReadableLoadStateDict, UNetPlusPlus):
    """`NestedUNet(num_classes, input_channels=3, deep_supervision=False, **kwargs)`.

    Extra keyword arguments are accepted and ignored, as the original does.
    `NestedUNet.from_nested_unet(model)` wraps an instance of the original, sharing its Parameter
    and buffer objects, and following its train/eval mode.
    """

    def __init__(
        self, num_classes: int, input_channels: int = 3, deep_supervision: bool = False, **kwargs: Any
    ):
        super().__init__(
            in_channels=input_channels,
            num_classes=num_classes,
            filters=NB_FILTER,
            deep_supervision=deep_supervision,
            block="conv_bn_relu",
            upsample="bilinear_ac",
        )

    def forward(self, input: Tensor) -> Tensor | list[Tensor]:  # noqa: A002  (the original's name)
        self._follow_mode()
        x, _ = self.pad_input(input, self.depth)  # checks shape; pad_to_multiple is off: no padding
        nodes = self.compute_nodes(x, self.depth)
        if self.deep_supervision:
            return [self.head(getattr(self, f"final{j}"), nodes[0, j]) for j in range(1, self.depth + 1)]
        return self.head(self.final, nodes[0, self.depth])

    @classmethod
    def from_nested_unet(cls, model: nn.Module) -> NestedUNet:
        """Wrap an instance of the original NestedUNet: its Parameters and buffers, a fused forward.

        The filters are read from the model (a NestedUNet with other `nb_filter` works too).
        """
        problem = nested_unet_problem(model)
        if problem:
            raise TypeError(
                f"{type(model).__name__} does not look like pytorch-nested-unet's NestedUNet: {problem}"
            )
        filters = tuple(getattr(model, f"conv{i}_0").conv2.out_channels for i in range(DEPTH + 1))
        deep_supervision = hasattr(model, "final1")
        first = model.conv0_0.conv1
        wrapper = cls.__new__(cls)
        with torch.device("meta"):  # no memory or initialisation for tensors about to be replaced
            UNetPlusPlus.__init__(
                wrapper,
                in_channels=first.in_channels,
                num_classes=(model.final1 if deep_supervision else model.final).out_channels,
                filters=filters,
                deep_supervision=deep_supervision,
                block="conv_bn_relu",
                upsample="bilinear_ac",
            )
        _share_modules(wrapper, model)
        wrapper._follow(model)
        return wrapper.train(model.training)


def _share_modules(target: nn.Module, source: nn.Module) -> None:
    """Install `source`'s convolution and BatchNorm modules in `target` (same names).

    Sharing the modules, not only their tensors, keeps the two models one: `.to()`, `.half()`,
    `.cuda()` on either converts the shared modules' buffers in place of the module, which both
    models read. (Shared tensors alone would be split by such a call — buffers are replaced per
    module — and the original would keep stale running statistics.)
    """
    wanted = set(target.state_dict(keep_vars=True))
    given = set(source.state_dict(keep_vars=True))
    if wanted != given:
        raise TypeError(
            "cannot share tensors: keys differ "
            f"(missing {sorted(wanted - given)[:5]}, unexpected {sorted(given - wanted)[:5]})"
        )
    holders = [
        name for name, module in target.named_modules() if name and (module._parameters or module._buffers)
    ]
    for name in holders:
        mine, theirs = target.get_submodule(name), source.get_submodule(name)
        if not isinstance(theirs, type(mine)):
            raise TypeError(
                f"cannot share {name}: expected a {type(mine).__name__}, got {type(theirs).__name__}"
            )
        parent_name, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(parent_name), leaf, theirs)


def _is_conv(module: object, kernel: int, bias: bool = True) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (kernel, kernel)
        and module.stride == (1, 1)
        and module.padding == (kernel // 2, kernel // 2)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and (module.bias is not None) == bias
    )


def _vgg_block_problem(name: str, block: object, in_channels: int, out_channels: int) -> str:
    for part in ("conv1", "conv2"):
        if not _is_conv(getattr(block, part, None), 3):
            return f"{name}.{part} is not a 3x3 Conv2d with padding 1 and bias"
    for part in ("bn1", "bn2"):
        if type(getattr(block, part, None)) is not nn.BatchNorm2d:
            return f"{name}.{part} is not a BatchNorm2d"
    relu = getattr(block, "relu", None)
    if relu is not None and type(relu) is not nn.ReLU:
        return f"{name}.relu is a {type(relu).__name__}, not a ReLU"
    # Anything else (another activation, dropout) would be silently skipped by the fused forward.
    problem = unaccounted_children(block, ("conv1", "bn1", "conv2", "bn2", "relu"), f"{name}.")
    if problem:
        return problem
    if block.conv1.in_channels != in_channels:
        return f"{name}.conv1 takes {block.conv1.in_channels} channels; its inputs have {in_channels}"
    if block.conv1.out_channels != block.conv2.in_channels or block.conv2.out_channels != out_channels:
        return f"{name} channels {block.conv1.out_channels}/{block.conv2.out_channels} do not chain"
    return ""


def nested_unet_problem(model: nn.Module) -> str:
    """'' when `model` has NestedUNet's structure (names, types, channel counts), else what is not."""
    children = dict(model.named_children())
    missing = [f"conv{i}_{j}" for i, j in NODES if f"conv{i}_{j}" not in children]
    if missing:
        return f"no submodules {', '.join(missing)}"
    up = children.get("up")
    if not (
        type(up) is nn.Upsample
        and up.mode == "bilinear"
        and up.align_corners
        and up.size is None
        and float(up.scale_factor if not isinstance(up.scale_factor, tuple) else up.scale_factor[0]) == 2.0
    ):
        return "no 'up' = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)"
    pool = children.get("pool")
    if not (type(pool) is nn.MaxPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))):
        return "no 'pool' = nn.MaxPool2d(2, 2)"
    nb: list[int] = []
    for i in range(DEPTH + 1):
        conv2 = getattr(children[f"conv{i}_0"], "conv2", None)
        if not isinstance(conv2, nn.Conv2d):
            return f"conv{i}_0.conv2 is not a Conv2d"
        nb.append(conv2.out_channels)
    first_in = getattr(getattr(children["conv0_0"], "conv1", None), "in_channels", None)
    for i, j in NODES:
        if j == 0:
            expected_in = first_in if i == 0 else nb[i - 1]
        else:
            expected_in = nb[i] * j + nb[i + 1]
        problem = _vgg_block_problem(f"conv{i}_{j}", children[f"conv{i}_{j}"], expected_in, nb[i])
        if problem:
            return problem
    heads: Sequence[str] = [f"final{j}" for j in range(1, DEPTH + 1)] if "final1" in children else ["final"]
    problem = unaccounted_children(model, [f"conv{i}_{j}" for i, j in NODES] + ["pool", "up", *heads])
    if problem:
        return problem
    for head in heads:
        conv = children.get(head)
        if not _is_conv(conv, 1) or conv.in_channels != nb[0]:
            return f"no head {head!r} = 1x1 Conv2d reading {nb[0]} channels"
    if len({children[h].out_channels for h in heads}) != 1:
        return "the heads have different numbers of classes"
    ds = getattr(model, "deep_supervision", None)
    if ds is not None and bool(ds) != (heads[0] == "final1"):
        return f"deep_supervision={ds} but the heads are {', '.join(heads)}"
    return ""
