"""Drop-in replacements for the UNet++ modules people use, running on `unetpp_fast.fused_conv`.

* `NestedUNet` — pytorch-nested-unet's `NestedUNet(num_classes, input_channels=3, deep_supervision=False)`;
* `BasicUNetPlusPlus` — MONAI's `monai.networks.nets.BasicUNetPlusPlus` (no MONAI needed);
* `UnetPlusPlus` — segmentation_models_pytorch's `UnetPlusPlus` (smp builds the encoder).

Each has the original's constructor, state_dict keys and outputs. `unetpp_fast.accelerate(model)`
turns an existing instance of the originals into one of these, sharing its parameters.
Attributes are imported on first access, so `import unetpp_fast` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NestedUNet": ".nested_unet",
    "BasicUNetPlusPlus": ".monai_unetpp",
    "BasicUnetPlusPlus": ".monai_unetpp",
    "UnetPlusPlus": ".smp_unetpp",
    "FusedUnetPlusPlusDecoder": ".smp_unetpp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
