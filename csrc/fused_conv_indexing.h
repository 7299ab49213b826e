// Virtual-input addressing of the fused convolution, shared by the C++ CPU path and the CUDA
// kernels (torch-free, __host__ __device__).
//
//   virtual[n, c, y, x] = R_p(pieces[p])[n, c - channel_offset_p, y, x],  p = piece of channel c
//
// Each resample reproduces PyTorch exactly (same index and weight arithmetic, same precision), so
// the fused result matches `cat(interpolate/max_pool2d(...))` up to summation order.
//
// 3D (5-D pieces [N, C, D, H, W]) is the same addressing with a depth axis: the modes act on depth
// too (nearest, trilinear = linear taps on depth around the bilinear plane, 2x2x2 max-pool). A 2D
// piece is the D = 1 case: depth 1, stride_d 0, resample_depth false (no depth tap), so the code
// that reads depth reduces to the 2D arithmetic exactly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UPF_HD __host__ __device__ __forceinline__
#else
#define UPF_HD inline
#endif

namespace unetpp_fast {

// Codes as in unetpp_fast/conv_spec.py.
enum ResampleMode : int {
  kResampleNone = 0,
  kUpNearest = 1,
  kUpBilinear = 2,    // x2, align_corners=False
  kUpBilinearAC = 3,  // x2, align_corners=True
  kMaxPool2 = 4,      // 2x2, stride 2, floor
};

constexpr int kMaxPieces = 8;

enum ActivationKind : int { kActNone = 0, kActRelu = 1, kActLeakyRelu = 2 };

// One input piece as stored (any strides: NCHW or channels_last), with its place in the virtual input.
struct PieceDesc {
  const void* data;
  int64_t stride_n, stride_c, stride_h, stride_w;  // in elements
  int channels, height, width;                     // the stored piece
  int channel_offset;                              // first virtual channel of this piece
  int mode;                                        // ResampleMode
  // Depth axis (3D). 2D pieces: depth 1, stride_d 0, resample_depth false.
  int64_t stride_d;
  int depth;
  bool resample_depth;  // the mode acts on depth too (5-D pieces)
};

struct VirtualInput {
  PieceDesc pieces[kMaxPieces];
  int num_pieces;
  int channels;       // sum of piece channels (C_in)
  int height, width;  // size after resampling (= output size)
  int depth;          // size after resampling along depth (1 in 2D)
};

UPF_HD bool in_bounds(int y, int x, int height, int width) {
  return y >= 0 && y < height && x >= 0 && x < width;
}

// The piece holding virtual channel c (pieces are few: a linear scan is cheapest).
UPF_HD int piece_of_channel(const VirtualInput& v, int c) {
  int p = 0;
  while (p + 1 < v.num_pieces && c >= v.pieces[p + 1].channel_offset) ++p;
  return p;
}

UPF_HD int64_t element_offset(const PieceDesc& p, int64_t n, int64_t c, int64_t y, int64_t x) {
  return n * p.stride_n + c * p.stride_c + y * p.stride_h + x * p.stride_w;
}

// Nearest x2: PyTorch computes floor(dst * 0.5) clamped to the input.
UPF_HD int nearest_source(int dst, int in_size) {
  const int s = dst >> 1;
  return s < in_size - 1 ? s : in_size - 1;
}

// One axis of a bilinear x2 upsample: out = w0 * in[i0] + w1 * in[i1].
template <typename acc_t>
struct LinearTap {
  int i0, i1;
  acc_t w0, w1;
};

// As aten/src/ATen/native/UpSample.h: area_pixel_compute_scale / _source_index and
// guard_index_and_lambda, with scale 1/2 for align_corners=False (F.interpolate passes
// scale_factor=2 through) and (in-1)/(out-1) for align_corners=True; acc_t is float for fp32 data.
// The scale depends on the sizes only: kernels compute it once (the same IEEE division, so the same
// value) and call bilinear_tap_scaled in their loops.
template <typename acc_t>
UPF_HD acc_t bilinear_scale(int in_size, int out_size, bool align_corners) {
  if (!align_corners) return static_cast<acc_t>(0.5);
  return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : static_cast<acc_t>(0);
}

template <typename acc_t>
UPF_HD LinearTap<acc_t> bilinear_tap_scaled(int dst, int in_size, bool align_corners, acc_t scale) {
  acc_t src;
  if (align_corners) {
    src = scale * static_cast<acc_t>(dst);
  } else {
    src = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
    if (src < static_cast<acc_t>(0)) src = static_cast<acc_t>(0);
  }
  int i0 = static_cast<int>(src);  // src >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  acc_t w1 = src - static_cast<acc_t>(i0);
  if (w1 < static_cast<acc_t>(0)) w1 = static_cast<acc_t>(0);
  if (w1 > static_cast<acc_t>(1)) w1 = static_cast<acc_t>(1);
  LinearTap<acc_t> tap;
  tap.i0 = i0;
  tap.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  tap.w1 = w1;
  tap.w0 = static_cast<acc_t>(1) - w1;
  return tap;
}

template <typename acc_t>
UPF_HD LinearTap<acc_t> bilinear_tap(int dst, int in_size, int out_size, bool align_corners) {
  return bilinear_tap_scaled<acc_t>(dst, in_size, align_corners,
                                    bilinear_scale<acc_t>(in_size, out_size, align_corners));
}

template <typename acc_t>
UPF_HD LinearTap<acc_t> bilinear_tap_for_mode(int dst, int in_size, int out_size, int mode) {
  return bilinear_tap<acc_t>(dst, in_size, out_size, mode == kUpBilinearAC);
}

// 2x2 max-pool window element (0..3, row-major) that PyTorch picks: scan order, strictly greater
// wins, NaN always wins (so the window's last NaN), as max_pool2d_with_indices.
template <typename acc_t>
UPF_HD int maxpool2_argmax(acc_t v0, acc_t v1, acc_t v2, acc_t v3, acc_t* value) {
  const acc_t vals[4] = {v0, v1, v2, v3};
  int best = 0;
  acc_t m = -static_cast<acc_t>(INFINITY);
  for (int i = 0; i < 4; ++i) {  // fully unrolled by both compilers: constant trip count
    const acc_t v = vals[i];
    if (v > m || v != v) {
      m = v;
      best = i;
    }
  }
  *value = m;
  return best;
}

// Max of N window values and the index PyTorch picks (scan order, strictly greater wins, NaN
// always wins), as max_pool3d_with_indices for N = 8 (window order d, h, w).
template <typename acc_t, int N>
UPF_HD int maxpool_argmax(const acc_t (&vals)[N], acc_t* value) {
  int best = 0;
  acc_t m = -static_cast<acc_t>(INFINITY);
  for (int i = 0; i < N; ++i) {
    const acc_t v = vals[i];
    if (v > m || v != v) {
      m = v;
      best = i;
    }
  }
  *value = m;
  return best;
}

// The source slices of virtual slice z of a piece: i0/i1 with weights w0/w1 for the linear modes,
// one slice (i0 == i1, w0 = 1, w1 = 0) for none / nearest, and for maxpool2 the window's two
// slices 2z, 2z + 1 (weights unused). Without a depth resample (2D) the slice itself.
template <typename acc_t>
UPF_HD LinearTap<acc_t> depth_tap(const PieceDesc& d, int z, int out_depth) {
  LinearTap<acc_t> t;
  t.i0 = t.i1 = z;
  t.w0 = static_cast<acc_t>(1);
  t.w1 = static_cast<acc_t>(0);
  if (!d.resample_depth) return t;
  switch (d.mode) {
    case kUpNearest:
      t.i0 = t.i1 = nearest_source(z, d.depth);
      return t;
    case kUpBilinear:
    case kUpBilinearAC:
      return bilinear_tap_for_mode<acc_t>(z, d.depth, out_depth, d.mode);
    case kMaxPool2:
      t.i0 = 2 * z;
      t.i1 = 2 * z + 1;
      return t;
    default:
      return t;
  }
}

// Value of virtual position (n, local channel c of piece p, y, x), (y, x) inside the virtual
// image. `load(offset)` reads element `offset` of the piece's storage as acc_t.
template <typename acc_t, typename Load>
UPF_HD acc_t sample_piece(const PieceDesc& p, int64_t n, int c, int y, int x, Load load) {
  const int64_t base = n * p.stride_n + static_cast<int64_t>(c) * p.stride_c;
  switch (p.mode) {
    case kUpNearest:
      return load(base + nearest_source(y, p.height) * p.stride_h + nearest_source(x, p.width) * p.stride_w);
    case kUpBilinear:
    case kUpBilinearAC: {
      const LinearTap<acc_t> ty = bilinear_tap_for_mode<acc_t>(y, p.height, 2 * p.height, p.mode);
      const LinearTap<acc_t> tx = bilinear_tap_for_mode<acc_t>(x, p.width, 2 * p.width, p.mode);
      const int64_t r0 = base + ty.i0 * p.stride_h, r1 = base + ty.i1 * p.stride_h;
      const int64_t c0 = tx.i0 * p.stride_w, c1 = tx.i1 * p.stride_w;
      return ty.w0 * (tx.w0 * load(r0 + c0) + tx.w1 * load(r0 + c1)) +
             ty.w1 * (tx.w0 * load(r1 + c0) + tx.w1 * load(r1 + c1));
    }
    case kMaxPool2: {
      const int64_t r0 = base + (2 * static_cast<int64_t>(y)) * p.stride_h;
      const int64_t c0 = (2 * static_cast<int64_t>(x)) * p.stride_w;
      acc_t value;
      maxpool2_argmax<acc_t>(load(r0 + c0), load(r0 + c0 + p.stride_w), load(r0 + p.stride_h + c0),
                             load(r0 + p.stride_h + c0 + p.stride_w), &value);
      return value;
    }
    default:
      return load(base + y * p.stride_h + x * p.stride_w);
  }
}

// Value of the virtual input at (n, c, y, x); zero outside the image (the convolution's padding).
template <typename acc_t, typename Load>
UPF_HD acc_t sample_virtual(const VirtualInput& v, int64_t n, int c, int y, int x, Load load_piece) {
  if (!in_bounds(y, x, v.height, v.width)) return static_cast<acc_t>(0);
  const int p = piece_of_channel(v, c);
  const PieceDesc& d = v.pieces[p];
  return sample_piece<acc_t>(d, n, c - d.channel_offset, y, x,
                             [&](int64_t off) { return load_piece(p, off); });
}

// 3D value of position (n, local channel c of piece p, z, y, x), (z, y, x) inside the virtual
// volume of depth `out_depth`: the 2D sample of the source slice(s) depth_tap picks, combined as
// PyTorch does (trilinear: t0 * bilinear(slice i0) + t1 * bilinear(slice i1); 2x2x2 max-pool: the
// window in (d, h, w) scan order). A 2D piece (no depth resample, stride_d 0) reads its one plane.
template <typename acc_t, typename Load>
UPF_HD acc_t sample_piece_3d(const PieceDesc& p, int64_t n, int c, int z, int y, int x, int out_depth, Load load) {
  auto slice = [&](int s) {
    const int64_t dz = static_cast<int64_t>(s) * p.stride_d;
    return sample_piece<acc_t>(p, n, c, y, x, [&](int64_t off) { return load(off + dz); });
  };
  if (!p.resample_depth) return slice(z);
  if (p.mode == kMaxPool2) {
    const int64_t b = n * p.stride_n + static_cast<int64_t>(c) * p.stride_c + (2 * static_cast<int64_t>(z)) * p.stride_d +
                      (2 * static_cast<int64_t>(y)) * p.stride_h + (2 * static_cast<int64_t>(x)) * p.stride_w;
    const acc_t vals[8] = {load(b),
                           load(b + p.stride_w),
                           load(b + p.stride_h),
                           load(b + p.stride_h + p.stride_w),
                           load(b + p.stride_d),
                           load(b + p.stride_d + p.stride_w),
                           load(b + p.stride_d + p.stride_h),
                           load(b + p.stride_d + p.stride_h + p.stride_w)};
    acc_t value;
    maxpool_argmax<acc_t, 8>(vals, &value);
    return value;
  }
  const LinearTap<acc_t> t = depth_tap<acc_t>(p, z, out_depth);
  if (p.mode == kUpBilinear || p.mode == kUpBilinearAC) return t.w0 * slice(t.i0) + t.w1 * slice(t.i1);
  return slice(t.i0);  // none, nearest: one slice
}

// Value of the virtual input at (n, c, z, y, x); zero outside the volume (the padding). With
// v.depth 1 and 2D pieces this is sample_virtual at z = 0.
template <typename acc_t, typename Load>
UPF_HD acc_t sample_virtual_3d(const VirtualInput& v, int64_t n, int c, int z, int y, int x, Load load_piece) {
  if (z < 0 || z >= v.depth || !in_bounds(y, x, v.height, v.width)) return static_cast<acc_t>(0);
  const int p = piece_of_channel(v, c);
  const PieceDesc& d = v.pieces[p];
  return sample_piece_3d<acc_t>(d, n, c - d.channel_offset, z, y, x, v.depth,
                                [&](int64_t off) { return load_piece(p, off); });
}

// Rows [lo, hi) of the virtual image whose resample reads any source row in [src_lo, src_hi)
// of a piece with `mode` (source height `in_h`, virtual height `out_h`). Used by the backward
// to give each thread the source rows it owns plus the virtual rows that feed them.
template <typename acc_t>
UPF_HD void virtual_rows_reading(int mode, int src_lo, int src_hi, int in_h, int out_h, int* lo, int* hi) {
  switch (mode) {
    case kUpNearest:
      *lo = 2 * src_lo;
      *hi = 2 * src_hi < out_h ? 2 * src_hi : out_h;
      return;
    case kMaxPool2:
      *lo = src_lo / 2;
      *hi = (src_hi + 1) / 2 < out_h ? (src_hi + 1) / 2 : out_h;
      return;
    case kUpBilinear:
    case kUpBilinearAC: {
      // i0 and i1 are non-decreasing in the output row: a scan finds the first and last.
      int first = out_h, last = -1;
      for (int y = 0; y < out_h; ++y) {
        const LinearTap<acc_t> t = bilinear_tap_for_mode<acc_t>(y, in_h, out_h, mode);
        if (t.i1 >= src_lo && t.i0 < src_hi) {
          if (first == out_h) first = y;
          last = y;
        } else if (t.i0 >= src_hi) {
          break;
        }
      }
      *lo = first;
      *hi = last + 1 > first ? last + 1 : first;
      return;
    }
    default:
      *lo = src_lo;
      *hi = src_hi < out_h ? src_hi : out_h;
      return;
  }
}

template <typename acc_t>
UPF_HD acc_t apply_activation(acc_t x, int kind, acc_t slope) {
  if (kind == kActRelu) return x < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : x;  // NaN stays NaN
  if (kind == kActLeakyRelu) return x > static_cast<acc_t>(0) ? x : x * slope;
  return x;
}

}  // namespace unetpp_fast
