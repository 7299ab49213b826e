// Tensor-core forward (fp16 / bf16; fp32 on TF32) of the fused convolution: launcher and parameter block.
// Torch-free; the kernel is in fused_conv_tc.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../fused_conv_indexing.h"
#include "fused_conv_kernels.h"

namespace unetpp_fast {
namespace cuda {

// One piece as the tensor-core kernel reads it.
struct TcPiece {
  const void* data;
  int stride_n, stride_c, stride_h, stride_w;  // elements (32-bit: the launcher checks the span)
  int channels, height, width;                 // stored size
  int mode;                                        // ResampleMode
  int channel_blocks;                              // ceil(channels / 32): K blocks per tap
  int channel_offset;                              // first channel of this piece in the weight
  int packed_offset;                               // first column of this piece in a packed weight tap row
  int vectorized;                               // channels_last, C % 8 == 0, 16-byte aligned
  float scale_h, scale_w;                       // bilinear source scale (align_corners: (in-1)/(out-1))
};

// A piece's depth axis (3D only). Kept out of TcPiece so that TcPiece stays 64 bytes: the hot loop
// indexes pieces[cur.piece] with a shift, not a multiply (the 2D SASS is unchanged).
struct TcPieceDepth {
  int stride_d, depth;  // elements; stored depth
  float scale_d;        // trilinear source scale along depth
  int unused;           // 16 bytes
};

struct TcForwardParams {
  TcPiece pieces[kMaxPieces];
  int num_pieces;
  int blocks_per_tap;  // sum of channel_blocks
  int k_packed;        // packed columns per tap: sum of channel_blocks * 32
  int k_row;           // packed columns per output channel: k_packed * taps
  int height, width;   // output (= virtual input) size
  int pixels;          // batch * depth * height * width (< 2^31, checked by the caller)
  int c_out, c_in;
  int taps;            // k^2 in 2D, k^3 in 3D (K ordered tap = (kz, ky, kx), piece, channel)
  const void* weight;  // packed: see tc_packed_row_length
  const void* weight_src;  // [C_out, C_in, k, k(, k)] contiguous: what the pack kernel reads
  const void* bias;    // [C_out] or nullptr
  void* out;
  int64_t out_stride_n, out_stride_c, out_stride_h, out_stride_w;
  int out_vectorized;  // channels_last output with C_out % 8 == 0, 16-byte aligned
  int activation;      // ActivationKind
  float slope;
  // 3D only (read by the DIMS = 3 instance). Last, so the 2D parameters keep their offsets.
  int depth;  // output depth (1 in 2D)
  int64_t out_stride_d;
  TcPieceDepth depths[kMaxPieces];
};

// Columns per tap of the packed weight: every piece's channels padded to a multiple of the K block
// (32 channels for fp16 / bf16, 16 for fp32). The packed weight is [C_out][taps][this], zero in the padding (2D: taps k*k, tap = ky * k + kx;
// 3D: taps k^3, tap = (kz * k + ky) * k + kx, the weight's own tap order):
//   packed[co][tap][off_p + c] = weight[co][channel_offset_p + c][tap]
// with off_p the sum of the padded channel counts of the pieces before p.
int tc_packed_row_length(const VirtualInput& input, DType dtype);

// False when UNETPP_FAST_CUDA_LEGACY_FORWARD=1 asks for the first (WMMA) forward kernel instead.
bool tc_forward_enabled();

// out = act(conv(virtual input, weight) + bias) on tensor cores, 2D or 3D (3D when the pieces
// resample depth, i.e. are 5-D: one kernel, 2D its depth-tap-count-1 instance): fp16 / bf16, and
// fp32 on TF32 (the caller decides whether TF32 is allowed; the weight is rounded to TF32 when packed,
// the activations are truncated by the MMA).
// Two launches on `stream`: prm.weight ([C_out, C_in, k, k(, k)] contiguous) packed into
// `workspace` (C_out * taps * tc_packed_row_length elements of the data type, no initialisation
// needed), then the convolution.
// Returns cudaErrorNotSupported (and launches nothing) when a piece or the packed weight spans 2^31
// elements or more: the caller then runs the WMMA kernel.
cudaError_t launch_fused_conv_forward_tc(const ConvForwardParams& prm, void* workspace, DType dtype,
                                         cudaStream_t stream);

}  // namespace cuda
}  // namespace unetpp_fast
