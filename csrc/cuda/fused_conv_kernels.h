// Launchers of the CUDA kernels of the fused convolution. Torch-free on purpose: the .cu files
// that implement them include only CUDA headers and compile in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../fused_conv_indexing.h"

namespace unetpp_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvForwardParams {
  VirtualInput input;
  const void* weight;  // [C_out, C_in * k * k], contiguous
  const void* bias;    // [C_out] or nullptr
  void* out;           // [N, C_out, H, W] with the strides below
  int64_t out_stride_n, out_stride_c, out_stride_h, out_stride_w;
  int batch, c_out, k;
  int activation;  // ActivationKind
  float slope;
};

// out = act(conv(virtual input, weight) + bias). Needs batch * H * W < 2^31 (checked by the caller).
cudaError_t launch_fused_conv_forward(const ConvForwardParams& params, DType dtype, cudaStream_t stream);

// Writes the virtual input [N, C_in, H, W] into `out` (strides in elements): the transient
// rebuild the backward hands to cuDNN, one node at a time.
cudaError_t launch_gather_virtual_input(const VirtualInput& input, int batch, DType dtype, void* out,
                                        int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace unetpp_fast
