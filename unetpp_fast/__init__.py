"""unetpp-fast: UNet++ whose convolutions read their concatenated, resampled inputs virtually."""

from .accelerate import accelerate
from .backends import available_backends, use_backend
from .checkpoint import load_checkpoint
from .extension import build_info
from .fused_op import fused_conv
from .kernel_resources import kernel_resources as cuda_kernel_resources
from .losses import BCEDiceLoss
from .metrics import dice_score, iou_score
from .model import UNet, UNetPlusPlus, wide_unet

__version__ = "0.1.0"

__all__ = [
    "BCEDiceLoss",
    "UNet",
    "UNetPlusPlus",
    "__version__",
    "accelerate",
    "available_backends",
    "build_info",
    "dice_score",
    "fused_conv",
    "cuda_kernel_resources",
    "load_checkpoint",
    "iou_score",
    "use_backend",
    "wide_unet",
]
