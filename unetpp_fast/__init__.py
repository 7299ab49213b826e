"""unetpp-fast: UNet++ whose convolutions read their concatenated, resampled inputs virtually.

Layers (imports only go down):  cli -> train, bench -> compat -> nn -> ops
  ops/     the one operator `fused_conv`: spec, backend registry, reference, C++/CUDA/Triton backends
  nn/      networks built on the operator: node grid, blocks, UNet++, U-Net
  compat/  adapters: drop-in classes, `accelerate`, checkpoint loading
  train/   data, losses, metrics, training and evaluation jobs
  bench/   timing, memory, roofline, plots
"""

from unetpp_fast.compat.accelerate import accelerate
from unetpp_fast.compat.checkpoint import load_checkpoint
from unetpp_fast.compat.export import export_onnx
from unetpp_fast.nn import UNet, UNetPlusPlus, wide_unet
from unetpp_fast.nn.cuda_graph import capture_inference
from unetpp_fast.ops import available_backends, build_info, fused_conv, use_backend
from unetpp_fast.ops.kernel_resources import kernel_resources as cuda_kernel_resources
from unetpp_fast.train.losses import BCEDiceLoss
from unetpp_fast.train.metrics import dice_score, iou_score

__version__ = "0.1.0"

__all__ = [
    "BCEDiceLoss",
    "UNet",
    "UNetPlusPlus",
    "__version__",
    "accelerate",
    "available_backends",
    "build_info",
    "capture_inference",
    "cuda_kernel_resources",
    "dice_score",
    "export_onnx",
    "fused_conv",
    "iou_score",
    "load_checkpoint",
    "use_backend",
    "wide_unet",
]
