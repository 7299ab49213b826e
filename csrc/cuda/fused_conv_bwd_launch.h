// Launcher of the fused backward kernels (fused_conv_bwd.cu). Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fused_conv_bwd.h"
#include "fused_conv_kernels.h"

namespace unetpp_fast {
namespace cuda {

struct FusedBwdOutputs {
  void* grad_pieces[kMaxPieces];          // each piece's gradient, the piece's shape
  int64_t piece_strides[kMaxPieces][5];   // (n, c, d, h, w) elements; d unused in 2D
  void* grad_weight;                      // [C_out, C_in * taps] contiguous
  void* grad_bias;                        // [C_out] or nullptr
};

// Pixel chunks of the split-K weight gradient; the workspace holds splits * C_out * (C_in * taps + 1)
// floats (no initialisation needed: every entry is written).
int fused_backward_splits(const BwdParams& params);

// dgrad of every piece, wgrad and the bias gradient on `stream`, without the virtual input.
cudaError_t launch_fused_conv_backward_fused(const BwdParams& params, DType dtype, const FusedBwdOutputs& out,
                                             float* workspace, int splits, cudaStream_t stream);

}  // namespace cuda
}  // namespace unetpp_fast
