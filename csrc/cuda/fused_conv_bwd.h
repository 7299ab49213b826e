// Fused backward of the fused convolution, per element (torch-free, __host__ __device__): the
// arithmetic the CUDA kernels of fused_conv_bwd.cu run and the CPU twin runs in fp64
// (tests/ops/test_native_cuda_bwd_twin.py). Neither the virtual input nor its gradient is ever
// stored:
//   dgrad   grad_piece[src] = sum over the virtual positions v that read src, with the resample's
//           adjoint weight a(v, src), of  sum_{co, tap} W[co, c, tap] * g[co, v - tap + pad]
//           (the implicit GEMM of the pre-activation gradient g with the transposed weight);
//           nearest: the 2 (2^3) positions of src's block; bilinear / trilinear: the forward's own
//           taps and weights; max-pool: the one window position whose argmax, recomputed from the
//           piece as max_pool2d/3d picks it, is src.
//   wgrad   grad_W[co, c, tap] = sum over pixels m of g[m, co] * virtual[m + tap - pad, c], over
//           pixel chunks (split-K) whose partials are summed in a fixed order (deterministic);
//           the bias gradient is the extra column (virtual value 1).
// 2D is the D = 1 case (4-D pieces: depth 1, no depth resample, no depth tap).
#pragma once

#include <cstdint>

#include "../fused_conv_indexing.h"

namespace unetpp_fast {
namespace cuda {

struct BwdParams {
  VirtualInput input;     // the pieces (read by wgrad and by the max-pool argmax)
  const void* grad_pre;   // [N, C_out, (D,) H, W]: gradient before the activation
  int64_t g_stride_n, g_stride_c, g_stride_d, g_stride_h, g_stride_w;  // elements (stride_d 0 in 2D)
  const void* weight;     // [C_out, C_in, taps] contiguous
  int batch, c_out, k;
  int volume;             // 1: 3D (5-D pieces), 0: 2D
};

UPF_HD int bwd_taps(const BwdParams& b) { return b.volume ? b.k * b.k * b.k : b.k * b.k; }

// Virtual-input gradient at (n, virtual channel ci, z, y, x): the transposed convolution of g.
template <typename acc_t, typename LoadG, typename LoadW>
UPF_HD acc_t virtual_grad(const BwdParams& b, int64_t n, int ci, int z, int y, int x, LoadG load_g, LoadW load_w) {
  const VirtualInput& v = b.input;
  const int k = b.k, pad = k / 2, kd = b.volume ? k : 1, taps = bwd_taps(b);
  acc_t sum = static_cast<acc_t>(0);
  for (int co = 0; co < b.c_out; ++co) {
    const int64_t w_row = (static_cast<int64_t>(co) * v.channels + ci) * taps;
    const int64_t g_base = n * b.g_stride_n + co * b.g_stride_c;
    for (int kz = 0; kz < kd; ++kz) {
      const int oz = b.volume ? z - kz + pad : 0;
      if (oz < 0 || oz >= v.depth) continue;
      for (int ky = 0; ky < k; ++ky) {
        const int oy = y - ky + pad;
        if (oy < 0 || oy >= v.height) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int ox = x - kx + pad;
          if (ox < 0 || ox >= v.width) continue;
          const int tap = (kz * k + ky) * k + kx;
          sum += load_w(w_row + tap) * load_g(g_base + oz * b.g_stride_d + oy * b.g_stride_h + ox * b.g_stride_w);
        }
      }
    }
  }
  return sum;
}

// Calls visit(d, weight) for every virtual index d along one axis whose resample reads source index
// s (source size in_size, virtual size out_size), with the forward's weight of s in d. Not for
// max-pool (piece_grad handles it through the argmax).
template <typename acc_t, typename Visit>
UPF_HD void adjoint_axis(int mode, bool resampled, int s, int in_size, int out_size, Visit visit) {
  if (!resampled || mode == kResampleNone) {
    visit(s, static_cast<acc_t>(1));
    return;
  }
  if (mode == kUpNearest) {  // nearest_source(d) = d / 2 (out = 2 * in): exactly 2s and 2s + 1
    visit(2 * s, static_cast<acc_t>(1));
    visit(2 * s + 1, static_cast<acc_t>(1));
    return;
  }
  // bilinear: the virtual indices around 2s whose taps (i0, i1) include s; the forward's own
  // bilinear_tap decides, so the weights are the forward's (align_corners reaches d <= 2s + 4).
  const int lo = 2 * s - 3 > 0 ? 2 * s - 3 : 0, hi = 2 * s + 5 < out_size - 1 ? 2 * s + 5 : out_size - 1;
  for (int d = lo; d <= hi; ++d) {
    const LinearTap<acc_t> t = bilinear_tap_for_mode<acc_t>(d, in_size, out_size, mode);
    acc_t w = static_cast<acc_t>(0);
    bool reads = false;
    if (t.i0 == s) {
      w += t.w0;
      reads = true;
    }
    if (t.i1 == s) {
      w += t.w1;
      reads = true;
    }
    if (reads) visit(d, w);
  }
}

// Gradient of element (n, c, sz, sy, sx) of piece p (sz = 0 in 2D).
template <typename acc_t, typename LoadPiece, typename LoadG, typename LoadW>
UPF_HD acc_t piece_grad(const BwdParams& b, int p, int64_t n, int c, int sz, int sy, int sx, LoadPiece load_piece,
                        LoadG load_g, LoadW load_w) {
  const VirtualInput& v = b.input;
  const PieceDesc& d = v.pieces[p];
  const int ci = d.channel_offset + c;
  if (d.mode == kMaxPool2) {
    // The virtual position whose window holds src, if the floor pooling keeps it, and whether
    // src is that window's argmax (recomputed as max_pool2d / max_pool3d pick it).
    const int vz = b.volume ? sz / 2 : 0, vy = sy / 2, vx = sx / 2;
    if (vz >= v.depth || vy >= v.height || vx >= v.width) return static_cast<acc_t>(0);
    const int64_t base = n * d.stride_n + static_cast<int64_t>(c) * d.stride_c +
                         (b.volume ? 2 * static_cast<int64_t>(vz) * d.stride_d : 0) +
                         2 * static_cast<int64_t>(vy) * d.stride_h + 2 * static_cast<int64_t>(vx) * d.stride_w;
    const int mine = ((b.volume ? (sz & 1) * 4 : 0) + (sy & 1) * 2 + (sx & 1));
    acc_t value;
    int arg;
    if (b.volume) {
      acc_t vals[8];
      for (int i = 0; i < 8; ++i) {
        vals[i] = load_piece(p, base + (i >> 2) * d.stride_d + ((i >> 1) & 1) * d.stride_h + (i & 1) * d.stride_w);
      }
      arg = maxpool_argmax<acc_t, 8>(vals, &value);
    } else {
      arg = maxpool2_argmax<acc_t>(load_piece(p, base), load_piece(p, base + d.stride_w),
                                   load_piece(p, base + d.stride_h), load_piece(p, base + d.stride_h + d.stride_w),
                                   &value);
    }
    if (arg != mine) return static_cast<acc_t>(0);
    return virtual_grad<acc_t>(b, n, ci, vz, vy, vx, load_g, load_w);
  }
  acc_t sum = static_cast<acc_t>(0);
  adjoint_axis<acc_t>(d.mode, b.volume != 0, sz, d.depth, v.depth, [&](int vz, acc_t wz) {
    adjoint_axis<acc_t>(d.mode, true, sy, d.height, v.height, [&](int vy, acc_t wy) {
      adjoint_axis<acc_t>(d.mode, true, sx, d.width, v.width, [&](int vx, acc_t wx) {
        sum += wz * wy * wx * virtual_grad<acc_t>(b, n, ci, vz, vy, vx, load_g, load_w);
      });
    });
  });
  return sum;
}

// Partial weight (tap < taps) or bias (tap == taps, column ci ignored) gradient of output channel
// co over the output pixels [m_begin, m_end) (m = ((n * D + z) * H + y) * W + x).
template <typename acc_t, typename LoadPieceAt, typename LoadG>
UPF_HD acc_t weight_grad_partial(const BwdParams& b, int co, int ci, int tap, int64_t m_begin, int64_t m_end,
                                 LoadPieceAt load_piece, LoadG load_g) {
  const VirtualInput& v = b.input;
  const int k = b.k, pad = k / 2;
  const int kz = tap / (k * k), ky = (tap / k) % k, kx = tap % k;
  const bool bias = tap == bwd_taps(b);
  const int64_t hw = static_cast<int64_t>(v.height) * v.width, dhw = hw * v.depth;
  acc_t sum = static_cast<acc_t>(0);
  for (int64_t m = m_begin; m < m_end; ++m) {
    const int64_t n = m / dhw, r = m - n * dhw;
    const int z = static_cast<int>(r / hw), y = static_cast<int>((r % hw) / v.width), x = static_cast<int>(r % v.width);
    const acc_t g = load_g(n * b.g_stride_n + co * b.g_stride_c + z * b.g_stride_d + y * b.g_stride_h +
                           x * b.g_stride_w);
    if (bias) {
      sum += g;
      continue;
    }
    const int zz = b.volume ? z + kz - pad : 0;
    const acc_t a = b.volume ? sample_virtual_3d<acc_t>(v, n, ci, zz, y + ky - pad, x + kx - pad, load_piece)
                             : sample_virtual<acc_t>(v, n, ci, y + ky - pad, x + kx - pad, load_piece);
    sum += g * a;
  }
  return sum;
}

}  // namespace cuda
}  // namespace unetpp_fast
