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
  const void* weight;  // [C_out, C_in * taps], contiguous (taps k^2 in 2D, k^3 in 3D)
  const void* bias;    // [C_out] or nullptr
  void* out;           // [N, C_out, (D,) H, W] with the strides below
  int64_t out_stride_n, out_stride_c, out_stride_h, out_stride_w;
  int64_t out_stride_d;  // 3D only (0 in 2D)
  int batch, c_out, k;
  int activation;  // ActivationKind
  float slope;
};

// A call is 3D when its pieces are 5-D (they resample depth): 2D is the D = 1 case of one code path.
inline bool is_volume(const VirtualInput& v) { return v.num_pieces > 0 && v.pieces[0].resample_depth; }

// out = act(conv(virtual input, weight) + bias). Needs batch * D * H * W < 2^31 (checked by the caller).
cudaError_t launch_fused_conv_forward(const ConvForwardParams& params, DType dtype, cudaStream_t stream);

// Writes the virtual input [N, C_in, (D,) H, W] into `out` (strides in elements; stride_d unused
// in 2D): the transient rebuild the backward hands to cuDNN, one node at a time.
cudaError_t launch_gather_virtual_input(const VirtualInput& input, int batch, DType dtype, void* out,
                                        int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                                        int64_t stride_d, cudaStream_t stream);

}  // namespace cuda
}  // namespace unetpp_fast
