"""What the build produced: C++ and CUDA parts, archs, kernel list, kernel resources (no spills),
and a clear error (never a crash) when the CUDA backend is asked to run without a GPU."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import unetpp_fast
from unetpp_fast.ops import backends, kernel_resources

TOOLKIT = shutil.which("nvcc") or os.path.exists(
    os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin/nvcc")
)
CUDA_BUILD_EXPECTED = (
    bool(TOOLKIT) and torch.version.cuda is not None and not os.environ.get("UNETPP_FAST_NO_CUDA")
)
needs_cuda_build = pytest.mark.skipif(
    not CUDA_BUILD_EXPECTED, reason="no CUDA toolkit or a CPU-only torch: the CUDA part is not built here"
)


def test_extension_built_with_cpu_kernels():
    info = unetpp_fast.build_info()
    assert info["extension_loaded"], info["extension_unavailable_reason"]
    assert info["cxx"]
    assert "cpu:fused_conv_forward_im2col_gemm" in info["kernels"]
    assert "cpu" in unetpp_fast.available_backends("cpu")


@needs_cuda_build
def test_build_info_lists_cuda_kernels_and_archs():
    info = unetpp_fast.build_info()
    assert info["cuda"], "built without the CUDA part although a toolkit and a CUDA torch are present"
    archs = set(info["cuda_archs"])
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert {"8.0", "9.0"} <= archs
    for name in (
        "cuda:fused_conv_fwd_wmma_f16",
        "cuda:fused_conv_fwd_wmma_bf16",
        "cuda:fused_conv_fwd_simt_f32",
        "cuda:fused_conv_fwd_tc_f16",
        "cuda:fused_conv_fwd_tc_bf16",
        "cuda:fused_conv_fwd_tc_tf32",
    ):
        assert name in info["kernels"]


@needs_cuda_build
def test_kernel_resources_report_no_spills():
    if kernel_resources.find_cuobjdump() is None:
        pytest.skip("no cuobjdump to read the built kernels")
    resources = kernel_resources.kernel_resources()
    archs = {r.arch for r in resources}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert {"sm_80", "sm_90"} <= archs
    # Substring tests hold for demangled and (without c++filt) mangled names alike.
    names = {r.kernel for r in resources}
    assert any("fused_conv_fwd_wmma_kernel" in n and "__half" in n for n in names), names
    assert any("fused_conv_fwd_wmma_kernel" in n and "__nv_bfloat16" in n for n in names), names
    assert any("fused_conv_fwd_simt_kernel" in n for n in names), names
    assert any("fused_conv_fwd_tc_kernel" in n and "__nv_bfloat16" in n for n in names), names
    tf32 = ("fused_conv_fwd_tc_halo_kernel<float", "fused_conv_fwd_tc_halo_kernelIf")  # demangled, mangled
    assert any(form in n for n in names for form in tf32), names
    ours = [r for r in resources if "fused_conv_" in r.kernel or "gather_virtual_input" in r.kernel]
    assert all(0 < r.registers <= 255 for r in ours)
    spills = kernel_resources.spilling_kernels(ours)
    assert not spills, "kernels spill registers to local memory:\n" + kernel_resources.format_table(spills)


def test_ptxas_verbose_parser_reads_spills():
    text = (
        "ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z6kernelPf\n"
        "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n"
    )
    (res,) = kernel_resources.parse_ptxas_verbose(text)
    assert (res.arch, res.registers, res.shared_bytes, res.local_bytes) == ("sm_90", 96, 4096, 12)
    assert kernel_resources.spilling_kernels([res]) == [res]


def test_cuda_backend_without_gpu_raises_clearly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA backend is usable")
    reason = backends.why_unusable("cuda", "cuda")
    assert reason, "the cuda backend claims to run without a GPU"
    weight = torch.randn(4, 3, 3, 3)
    with backends.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested"):
            unetpp_fast.fused_conv([torch.randn(1, 3, 5, 5)], weight)
    with pytest.raises(RuntimeError, match="cuda"):
        unetpp_fast.fused_conv([torch.randn(1, 3, 5, 5)], weight, backend="cuda")
