"""`accelerate(model)`: an existing UNet++ from another library, running on the fused operator.

Recognised by structure (submodule names, types and shapes), not by class name:

* pytorch-nested-unet's `NestedUNet` -> `unetpp_fast.compat.NestedUNet` (the same Conv2d and
  BatchNorm2d modules installed in it, so `.to()` on either moves both);
* MONAI's `BasicUNetPlusPlus` -> `unetpp_fast.compat.BasicUNetPlusPlus` holding the same
  submodules (2-D and 3-D run fused; 1-D runs the plain PyTorch path);
* segmentation_models_pytorch's `UnetPlusPlus` -> `unetpp_fast.compat.UnetPlusPlus` holding the
  same encoder, decoder blocks and heads, with the fused decoder forward.

The result shares its parameters with `model` (training one trains the other) and returns the
same outputs, and follows its train/eval mode (`model.eval()` puts the result in eval mode and the
other way round). Every child module must be one the fused forward runs: a model with extra or
renamed children (a dropout, another activation) is refused, naming them. This package's own
networks (`UNetPlusPlus`, `UNet`) and drop-in classes are returned as they are. Anything else
raises a TypeError saying, for each kind, what was not found.
"""

from __future__ import annotations

from torch import nn

from unetpp_fast.compat import monai_unetpp, nested_unet, smp_unetpp
from unetpp_fast.compat.fused_unit import unaccounted_children
from unetpp_fast.nn.node_grid import NodeGrid


def _smp_problem(model: nn.Module) -> str:
    missing = [
        a
        for a in ("encoder", "decoder", "segmentation_head")
        if not isinstance(getattr(model, a, None), nn.Module)
    ]
    if missing:
        return f"no submodule {', '.join(missing)}"
    problem = unaccounted_children(model, ("encoder", "decoder", "segmentation_head", "classification_head"))
    problem = problem or unaccounted_children(model.decoder, ("center", "blocks"), "decoder.")
    if problem:
        return problem
    problem = smp_unetpp.smp_decoder_problem(model.decoder)
    return f"decoder: {problem}" if problem else ""


def accelerate(model: nn.Module) -> nn.Module:
    """Return a module sharing `model`'s parameters whose convolutions run through `fused_conv`.

    Args:
        model: an instance of pytorch-nested-unet's NestedUNet, MONAI's BasicUNetPlusPlus or
            segmentation_models_pytorch's UnetPlusPlus (or one of this package's networks or
            drop-in classes, returned as is).

    Raises:
        TypeError: `model` is none of those; the message lists what each check did not find.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate() expects an nn.Module, got {type(model).__name__}")
    if isinstance(
        model, (NodeGrid, nested_unet.NestedUNet, monai_unetpp.BasicUNetPlusPlus, smp_unetpp.UnetPlusPlus)
    ):
        return model

    reasons = {
        "pytorch-nested-unet NestedUNet": nested_unet.nested_unet_problem(model),
        "MONAI BasicUNetPlusPlus": monai_unetpp.monai_structure_problem(model),
        "segmentation_models_pytorch UnetPlusPlus": _smp_problem(model),
    }
    if not reasons["pytorch-nested-unet NestedUNet"]:
        return nested_unet.NestedUNet.from_nested_unet(model)
    if not reasons["MONAI BasicUNetPlusPlus"]:
        return monai_unetpp.BasicUNetPlusPlus.from_monai(model)
    if not reasons["segmentation_models_pytorch UnetPlusPlus"]:
        return smp_unetpp.UnetPlusPlus.from_smp(model)

    lines = [f"accelerate() does not recognise {type(model).__name__} as a supported UNet++:"]
    lines += [f"  not a {kind}: {why}" for kind, why in reasons.items()]
    if isinstance(getattr(model, "module", None), nn.Module):
        lines.append("  hint: it wraps another module (DataParallel?); pass model.module instead")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        lines.append("  hint: it is a torch.compile wrapper; pass model._orig_mod and compile the result")
    raise TypeError("\n".join(lines))
