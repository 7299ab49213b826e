// Tensor-core fused backward (fused_conv_bwd_tc.cu): which calls it takes and its launcher. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fused_conv_bwd.h"
#include "fused_conv_bwd_launch.h"
#include "fused_conv_kernels.h"

namespace unetpp_fast {
namespace cuda {

constexpr int kTcBwdTile = 64;   // rows and columns of a CTA's tile (dgrad and wgrad)
constexpr int kTcBwdPixels = 32;  // pixels per wgrad K block (split-K chunks are multiples of it)

inline bool tc_bwd_aligned(const void* p, int64_t sn, int64_t sh, int64_t sw, int64_t sc, int channels) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && sc == 1 && channels % 8 == 0 && sn % 8 == 0 &&
         sh % 8 == 0 && sw % 8 == 0;
}

constexpr int kTcBwdSrcH = 4, kTcBwdSrcW = 8;  // source pixels of a bilinear dgrad CTA
constexpr int kTcBwdSmemLimit = 99 * 1024;      // dynamic shared memory an sm_86 / sm_89 CTA may take
constexpr int kTcBwdDgradSmem = 2 * 2 * kTcBwdTile * 80;  // the dgrad pipeline (fused_conv_bwd_tc.cu)

// Virtual indices [lo, hi] along one axis whose bilinear taps read a source index in [s0, s1]:
// the candidates adjoint_axis (fused_conv_bwd.h) scans, with the same tap function.
UPF_HD void tc_bwd_bilinear_support(int mode, int s0, int s1, int in_size, int out_size, int* lo, int* hi) {
  *lo = out_size;
  *hi = -1;
  const int first = 2 * s0 - 3 > 0 ? 2 * s0 - 3 : 0, last = 2 * s1 + 5 < out_size - 1 ? 2 * s1 + 5 : out_size - 1;
  for (int d = first; d <= last; ++d) {
    const LinearTap<float> t = bilinear_tap_for_mode<float>(d, in_size, out_size, mode);
    if ((t.i0 >= s0 && t.i0 <= s1) || (t.i1 >= s0 && t.i1 <= s1)) {
      if (d < *lo) *lo = d;
      *hi = d;
    }
  }
}

// Largest support extent over the source blocks of `block` indices along one axis.
inline int tc_bwd_bilinear_extent(int mode, int in_size, int out_size, int block) {
  int most = 0;
  for (int s0 = 0; s0 < in_size; s0 += block) {
    const int s1 = s0 + block < in_size ? s0 + block - 1 : in_size - 1;
    int lo, hi;
    tc_bwd_bilinear_support(mode, s0, s1, in_size, out_size, &lo, &hi);
    if (hi - lo + 1 > most) most = hi - lo + 1;
  }
  return most;
}

// Shared memory of the bilinear dgrad CTA: the pipeline, then the fp32 virtual-gradient tile of the
// block's whole support (rows padded to the 64-row GEMM tile, 65 floats per row).
inline int64_t tc_bwd_bilinear_smem(const BwdParams& b, int piece) {
  const PieceDesc& d = b.input.pieces[piece];
  const int64_t rows = static_cast<int64_t>(tc_bwd_bilinear_extent(d.mode, d.height, b.input.height, kTcBwdSrcH)) *
                       tc_bwd_bilinear_extent(d.mode, d.width, b.input.width, kTcBwdSrcW);
  return kTcBwdDgradSmem + (rows + kTcBwdTile - 1) / kTcBwdTile * kTcBwdTile * (kTcBwdTile + 1) * 4;
}

// The piece's gradient comes from a tensor-core dgrad epilogue: none, up_nearest at exactly 2x,
// maxpool2, and up_bilinear(_ac) while its support tile fits in shared memory; else the SIMT kernel
// of fused_conv_bwd.cu.
inline bool tc_bwd_dgrad_covers(const BwdParams& b, int piece) {
  const PieceDesc& d = b.input.pieces[piece];
  if (d.mode == kResampleNone || d.mode == kMaxPool2) return true;
  if (d.mode == kUpNearest) return 2 * d.height == b.input.height && 2 * d.width == b.input.width;
  return tc_bwd_bilinear_smem(b, piece) <= kTcBwdSmemLimit;
}

// 2D, fp16 / bf16, k = 1 or 3, grad_pre and every piece channels_last with C % 8 == 0 and 16-byte
// aligned rows (16-byte cp.async / vector loads), nothing empty.
inline bool tc_bwd_qualifies(const BwdParams& b, DType dtype) {
  if (b.volume || dtype == DType::kFloat32 || (b.k != 1 && b.k != 3)) return false;
  if (b.batch < 1 || b.c_out < 1 || b.input.height < 1 || b.input.width < 1) return false;
  if (!tc_bwd_aligned(b.grad_pre, b.g_stride_n, b.g_stride_h, b.g_stride_w, b.g_stride_c, b.c_out)) return false;
  for (int p = 0; p < b.input.num_pieces; ++p) {
    const PieceDesc& d = b.input.pieces[p];
    if (d.height < 1 || d.width < 1) return false;
    if (!tc_bwd_aligned(d.data, d.stride_n, d.stride_h, d.stride_w, d.stride_c, d.channels)) return false;
  }
  return true;
}

// K blocks of the weight gradient: segments of kTcBwdPixels pixels along x of one image row.
inline int64_t tc_bwd_segments(const BwdParams& b) {
  return static_cast<int64_t>(b.batch) * b.input.height * ((b.input.width + kTcBwdPixels - 1) / kTcBwdPixels);
}

// Segment chunks of the split-K weight gradient: about two CTAs per SM of an H100-sized GPU (a CTA
// per output-channel tile, kernel row and channel tile), at least 8 K blocks per chunk.
inline int tc_bwd_splits(const BwdParams& b) {
  const int64_t tiles = static_cast<int64_t>((b.c_out + kTcBwdTile - 1) / kTcBwdTile) * b.k *
                        ((b.input.channels + kTcBwdTile - 1) / kTcBwdTile);
  int64_t splits = (264 + tiles - 1) / tiles;
  const int64_t most = (tc_bwd_segments(b) + 7) / 8;
  if (splits > most) splits = most;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

// Workspaces of launch_fused_conv_backward_tc: the weight packed [C_in][taps][C_out] (elements of
// the call's dtype) and the fp32 split-K partials [splits][C_out][C_in * taps + 1].
inline int64_t tc_bwd_packed_weight_elements(const BwdParams& b) {
  return static_cast<int64_t>(b.input.channels) * bwd_taps(b) * b.c_out;
}
inline int64_t tc_bwd_partial_elements(const BwdParams& b, int splits) {
  return static_cast<int64_t>(splits) * b.c_out * (static_cast<int64_t>(b.input.channels) * bwd_taps(b) + 1);
}

// Every gradient of a qualifying call (tc_bwd_qualifies): dgrad and wgrad on tensor cores, the
// linear modes' piece gradients on the SIMT kernel. A maxpool2 piece larger than twice the output
// (floor pooling) must come zero-filled: its dropped rows / columns are not written.
cudaError_t launch_fused_conv_backward_tc(const BwdParams& b, DType dtype, const FusedBwdOutputs& out,
                                          void* packed_weight, float* partial, int splits, cudaStream_t stream);

// The SIMT kernel of fused_conv_bwd.cu for one piece's gradient (any mode).
cudaError_t launch_fused_conv_backward_piece(const BwdParams& b, DType dtype, const FusedBwdOutputs& out, int piece,
                                             cudaStream_t stream);

}  // namespace cuda
}  // namespace unetpp_fast
