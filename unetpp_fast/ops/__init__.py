"""The operator layer: `fused_conv` and everything that runs it.

conv_spec.py         the operator's contract: resample codes, activation grammar, input checks, shapes
fused_op.py          the `torch.ops.unetpp_fast.fused_conv` custom op: schema, fake, autograd, autocast
backends.py          backend registry and selection (`auto`, `use_backend`, UNETPP_FAST_BACKEND)
reference.py         plain-PyTorch backend (cat + interpolate + conv2d): the ground truth
native.py            the C++ CPU and CUDA C++ backends of the compiled extension `unetpp_fast._C`
extension.py         loading `_C` and `build_info()`
triton/              the Triton backend: kernels, launchers, ahead-of-time compile report
kernel_resources.py  registers / shared memory / spills of the compiled CUDA kernels
flops.py             FLOP formula so `FlopCounterMode` counts the fused operator
testing.py           comparison helpers shared by the test suites

Nothing here imports the networks, adapters or applications above it.
"""

from unetpp_fast.ops.backends import available_backends, get_backend, set_backend, use_backend
from unetpp_fast.ops.extension import build_info
from unetpp_fast.ops.fused_op import fused_conv

__all__ = ["available_backends", "build_info", "fused_conv", "get_backend", "set_backend", "use_backend"]
