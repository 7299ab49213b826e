"""Triton kernels of unetpp-fast (`unetpp_fast.ops.triton`).

virtual_input.py           resampled loads of one piece (shared by forward and weight gradient)
fused_conv_forward.py      forward kernel + launcher (implicit GEMM over the virtual input)
fused_conv_input_grad.py   gradient w.r.t. each piece, the resample's adjoint inside the kernel
fused_conv_weight_grad.py  pre-activation gradient and split-K weight gradient
fused_conv_backward.py     backward launcher
launch_common.py           host helpers: piece arguments, layouts, precision, autotuned launch
configs.py                 block configs per kernel and shape class
aot.py                     ahead-of-time compile for sm_80 / sm_90: registers, spills, mma

Kernel modules import Triton; import them only when the 'triton' backend is first used.
"""
