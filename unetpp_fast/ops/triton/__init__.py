"""Triton kernels of unetpp-fast (`unetpp_fast.ops.triton`), 2D and 3D: one kernel family, the
constexpr DIMS (2D is the D = 1 case and compiles to the code of a 2D-only kernel).

virtual_input.py           the piece descriptor table and resampled loads (shared by every kernel)
fused_conv_forward.py      forward kernel + launcher (implicit GEMM, one K loop over the table)
fused_conv_input_grad.py   gradient w.r.t. each piece, the resample's adjoint inside the kernel
fused_conv_weight_grad.py  pre-activation gradient and split-K weight gradient (all pieces, one launch)
fused_conv_backward.py     backward launcher
launch_common.py           host side: piece tables, layouts, precision, tuning (persisted), the launch
                           seam (set_runtime: Triton, the interpreter, or the host-path harness's stub)
                           and the launch plans (per-call metadata -> prepared launch)
configs.py                 block configs per kernel, shape class and 2D / 3D
aot.py                     ahead-of-time compile for sm_80 / sm_90: registers, spills, mma

Kernel modules import Triton; import them only when the 'triton' backend is first used.
"""
