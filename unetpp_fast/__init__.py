"""unetpp-fast: UNet++ whose convolutions read their concatenated, resampled inputs virtually.

Layers (imports only go down):  cli -> train -> bench -> compat -> nn -> ops
  ops/     the one operator `fused_conv`: spec, backend registry, reference, C++/CUDA/Triton backends
  nn/      networks built on the operator: node grid, blocks, UNet++, U-Net
  compat/  adapters: drop-in classes, `accelerate`, checkpoint loading, export
  train/   data, losses, metrics, training and evaluation jobs
  bench/   timing, memory, roofline, plots

The public names below are imported on first use, so `unetpp-fast --help` answers without
loading torch. When torch is already imported, the operator is registered at once, so
`torch.ops.unetpp_fast.fused_conv` exists right after `import unetpp_fast`.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# public name -> (module, attribute)
_PUBLIC = {
    "BCEDiceLoss": ("unetpp_fast.train.losses", "BCEDiceLoss"),
    "UNet": ("unetpp_fast.nn", "UNet"),
    "UNetPlusPlus": ("unetpp_fast.nn", "UNetPlusPlus"),
    "accelerate": ("unetpp_fast.compat.accelerate", "accelerate"),
    "available_backends": ("unetpp_fast.ops", "available_backends"),
    "build_info": ("unetpp_fast.ops", "build_info"),
    "capture_inference": ("unetpp_fast.nn.cuda_graph", "capture_inference"),
    "cuda_kernel_resources": ("unetpp_fast.ops.kernel_resources", "kernel_resources"),
    "dice_score": ("unetpp_fast.train.metrics", "dice_score"),
    "export_onnx": ("unetpp_fast.compat.export", "export_onnx"),
    "fused_conv": ("unetpp_fast.ops", "fused_conv"),
    "get_backend": ("unetpp_fast.ops", "get_backend"),
    "iou_score": ("unetpp_fast.train.metrics", "iou_score"),
    "load_checkpoint": ("unetpp_fast.compat.checkpoint", "load_checkpoint"),
    "set_backend": ("unetpp_fast.ops", "set_backend"),
    "use_backend": ("unetpp_fast.ops", "use_backend"),
    "wide_unet": ("unetpp_fast.nn", "wide_unet"),
}
_SUBPACKAGES = ("bench", "cli", "compat", "nn", "ops", "train")

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBPACKAGES))


if "torch" in sys.modules:
    importlib.import_module("unetpp_fast.ops")
