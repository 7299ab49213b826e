"""segmentation_models_pytorch's `UnetPlusPlus` with its decoder on `unetpp_fast.fused_conv`.

The encoder, segmentation head and classification head are smp's own modules, untouched. The
decoder keeps smp's blocks (same modules, same state_dict keys `decoder.blocks.x_{d}_{L}.conv{1,2}.*`,
`decoder.center.*`) and runs each block's first convolution on the virtual input
`[up(prev), x_{d+1}_L .. x_L_L, encoder feature]` — smp's (reversed) concatenation order — with
the x2 upsampling ('nearest' by default, or 'bilinear') read on the fly. BatchNorm in eval mode is
folded and ReLU runs in the operator's epilogue (see `unetpp_fast.compat.fused_unit`). Other
interpolation modes ('bicubic', 'area', 'nearest-exact') and scSE attention (which needs the
concatenated tensor) materialise that input first; the convolutions still run fused.

segmentation_models_pytorch is needed (it builds the encoder); it is imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unetpp_fast.compat.checkpoint import ReadableLoadStateDict
from unetpp_fast.compat.fused_unit import (
    FollowsOriginal,
    materialise,
    run_conv_unit,
    unaccounted_children,
)
from unetpp_fast.ops import conv_spec

Tensor = torch.Tensor

_INTERPOLATION_CODES = {"nearest": conv_spec.UP_NEAREST, "bilinear": conv_spec.UP_BILINEAR}


def _is_identity(module: nn.Module | None) -> bool:
    return (
        module is None
        or isinstance(module, nn.Identity)
        or isinstance(getattr(module, "attention", None), nn.Identity)
    )


def _conv_relu_unit(unit: nn.Sequential, pieces: list[Tensor], resample: list[int]) -> Tensor:
    """smp's Conv2dReLU (conv, norm, activation) as one fused unit."""
    modules = list(unit.children())
    return run_conv_unit(pieces, resample, modules[0], modules[1:])


def _decoder_block(block: nn.Module, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
    """smp's DecoderBlock.forward(x, cat(skips)) with the upsampled x and the skips read virtually."""
    mode = block.interpolation_mode
    if getattr(block, "is_empty", False) or block.conv1 is None:
        up = F.interpolate(x, scale_factor=2.0, mode=mode)
        return up.new_empty(up.shape[0], 0, *up.shape[2:])
    code = _INTERPOLATION_CODES.get(mode)
    if code is None:
        pieces, resample = [F.interpolate(x, scale_factor=2.0, mode=mode)], [conv_spec.NONE]
    else:
        pieces, resample = [x], [code]
    if skips:
        pieces += list(skips)
        resample += [conv_spec.NONE] * len(skips)
        if not _is_identity(block.attention1):  # attention looks at the whole concatenated input
            pieces, resample = [block.attention1(materialise(pieces, resample))], [conv_spec.NONE]
    hidden = _conv_relu_unit(block.conv1, pieces, resample)
    hidden = _conv_relu_unit(block.conv2, [hidden], [conv_spec.NONE])
    return block.attention2(hidden)


class FusedUnetPlusPlusDecoder(nn.Module):
    """smp's `UnetPlusPlusDecoder`, same modules (`center`, `blocks`), forward on the fused operator."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        problem = smp_decoder_problem(decoder)
        if problem:
            raise TypeError(f"{type(decoder).__name__} is not smp's UnetPlusPlusDecoder: {problem}")
        self.center = decoder.center
        self.blocks = decoder.blocks
        self.depth = int(decoder.depth)
        self.in_channels = list(decoder.in_channels)
        self.skip_channels = list(decoder.skip_channels)
        self.out_channels = list(decoder.out_channels)

    def forward(self, features: list[Tensor]) -> Tensor:
        features = features[1:][::-1]  # drop the full-resolution input, start from the deepest feature
        # smp applies `center` nowhere in its UnetPlusPlusDecoder.forward; neither do we.
        dense: dict[str, Tensor] = {}
        for layer in range(len(self.in_channels) - 1):
            for depth in range(self.depth - layer):
                if layer == 0:
                    name = f"x_{depth}_{depth}"
                    dense[name] = _decoder_block(self.blocks[name], features[depth], [features[depth + 1]])
                else:
                    top = depth + layer
                    skips = [dense[f"x_{i}_{top}"] for i in range(depth + 1, top + 1)]
                    skips.append(features[top + 1])
                    name = f"x_{depth}_{top}"
                    dense[name] = _decoder_block(self.blocks[name], dense[f"x_{depth}_{top - 1}"], skips)
        last = f"x_0_{self.depth}"
        return _decoder_block(self.blocks[last], dense[f"x_0_{self.depth - 1}"], [])


def smp_decoder_problem(decoder: nn.Module) -> str:
    """'' when `decoder` has the structure of smp's UnetPlusPlusDecoder, else what is missing."""
    for attr in ("blocks", "depth", "in_channels", "skip_channels", "out_channels"):
        if not hasattr(decoder, attr):
            return f"no attribute {attr!r}"
    blocks = decoder.blocks
    if not isinstance(blocks, nn.ModuleDict):
        return "'blocks' is not a ModuleDict"
    depth = int(decoder.depth)
    needed = [f"x_{d}_{L}" for L in range(depth) for d in range(L + 1)] + [f"x_0_{depth}"]
    missing = [n for n in needed if n not in blocks]
    if missing:
        return f"no decoder blocks {', '.join(missing)}"
    for name in needed:
        block = blocks[name]
        if not hasattr(block, "interpolation_mode"):
            return f"block {name} has no 'interpolation_mode'"
        if getattr(block, "conv1", None) is None and not getattr(block, "is_empty", False):
            return f"block {name} has no conv1"
        problem = unaccounted_children(
            block, ("conv1", "attention1", "conv2", "attention2"), f"blocks.{name}."
        )
        if problem:
            return problem
        for unit in ("conv1", "conv2"):
            seq = getattr(block, unit, None)
            if seq is not None and not (
                isinstance(seq, nn.Sequential) and len(seq) > 0 and isinstance(seq[0], nn.Conv2d)
            ):
                return f"block {name}.{unit} is not a Sequential starting with a Conv2d"
    return ""


class UnetPlusPlus(FollowsOriginal, ReadableLoadStateDict, nn.Module):
    """smp's `UnetPlusPlus` (same constructor, defaults, keys, outputs) with the fused decoder.

    `encoder_weights` defaults to "imagenet" as in smp, which downloads; pass None offline.
    `UnetPlusPlus.from_smp(model)` wraps an existing smp instance, sharing its modules.
    """

    requires_divisible_input_shape = True

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | None = "imagenet",
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_attention_type: str | None = None,
        decoder_interpolation: str = "nearest",
        in_channels: int = 3,
        classes: int = 1,
        activation: str | Callable | None = None,
        aux_params: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        import segmentation_models_pytorch as smp

        model = smp.UnetPlusPlus(
            encoder_name=encoder_name,
            encoder_depth=encoder_depth,
            encoder_weights=encoder_weights,
            decoder_use_norm=decoder_use_norm,
            decoder_channels=decoder_channels,
            decoder_attention_type=decoder_attention_type,
            decoder_interpolation=decoder_interpolation,
            in_channels=in_channels,
            classes=classes,
            activation=activation,
            aux_params=aux_params,
            **kwargs,
        )
        self._adopt(model)

    @classmethod
    def from_smp(cls, model: nn.Module) -> UnetPlusPlus:
        """Wrap an `smp.UnetPlusPlus` instance: the same encoder, blocks and heads, fused decoder."""
        missing = [a for a in ("encoder", "decoder", "segmentation_head") if not hasattr(model, a)]
        if missing:
            raise TypeError(f"{type(model).__name__} is not smp's UnetPlusPlus: no {', '.join(missing)}")
        problem = unaccounted_children(
            model, ("encoder", "decoder", "segmentation_head", "classification_head")
        )
        if problem:
            raise TypeError(f"{type(model).__name__} cannot be accelerated: {problem}")
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper._adopt(model)
        wrapper._follow(model)
        wrapper.train(model.training)
        return wrapper

    def _adopt(self, model: nn.Module) -> None:
        self.encoder = model.encoder
        self.decoder = FusedUnetPlusPlusDecoder(model.decoder)
        self.segmentation_head = model.segmentation_head
        self.classification_head = getattr(model, "classification_head", None)
        self.name = getattr(model, "name", "unetplusplus")
        self.requires_divisible_input_shape = getattr(model, "requires_divisible_input_shape", True)

    def check_input_shape(self, x: Tensor) -> None:
        """smp's rule: H and W must be multiples of the encoder's output stride (RuntimeError)."""
        if not self.requires_divisible_input_shape:
            return
        h, w = x.shape[-2:]
        stride = self.encoder.output_stride
        if h % stride or w % stride:
            new_h, new_w = -(-h // stride) * stride, -(-w // stride) * stride
            raise RuntimeError(
                f"Wrong input shape height={h}, width={w}. Expected image height and width "
                f"divisible by {stride}. Consider pad your images to shape ({new_h}, {new_w})."
            )

    def forward(self, x: Tensor):
        self._follow_mode()
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input_shape(x)
        features = self.encoder(x)
        masks = self.segmentation_head(self.decoder(features))
        if self.classification_head is not None:
            return masks, self.classification_head(features[-1])
        return masks

    @torch.inference_mode()
    def predict(self, x: Tensor):
        """Eval mode and inference mode, then forward (as smp's `predict`)."""
        if self.training:
            self.eval()
        return self(x)
