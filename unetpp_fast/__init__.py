"""unetpp-fast: UNet++ whose convolutions read their concatenated, resampled inputs virtually."""

from .backends import available_backends, use_backend
from .extension import build_info
from .fused_op import fused_conv

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "build_info",
    "fused_conv",
    "use_backend",
]
