// Tensor-core fused backward of the fused convolution, 2D, fp16 / bf16 (torch-free: CUDA headers only).
// Neither the virtual input nor its gradient is ever stored; no float atomics (bitwise repeatable).
//
//   * dgrad, one launch per piece: an implicit GEMM  G[m, c] = sum_{tap, co} g[m - tap + pad, co] * W[co, c, tap]
//     with M = virtual pixels, N = the piece's channels, K = taps x C_out. A (64 pixels x 32 C_out)
//     is read from grad_pre (channels_last) with 16-byte cp.async, zero-filled outside the image;
//     B (64 channels x 32 C_out) from the weight packed [C_in][taps][C_out] by a small kernel.
//     The epilogue stages the fp32 tile in shared memory and applies the piece's adjoint:
//       none       -> the value, stored once;
//       up_nearest -> the M rows are ordered (source pixel, 2x2 child), so a source pixel's 4 children
//                     are 4 consecutive rows of one CTA: summed in a fixed order, stored once;
//       maxpool2   -> each virtual pixel owns its 2x2 window: the gradient goes to the argmax
//                     recomputed from the piece (maxpool2_argmax: max_pool2d's tie and NaN rule),
//                     zeros to the other 3 (dropped odd rows / columns: the caller zero-fills).
//       up_bilinear(_ac) -> a CTA owns 4 x 8 source pixels: the same GEMM over the virtual pixels of
//                     their support (64 rows at a time) into an fp32 tile in (dynamic) shared memory,
//                     then each source pixel gathers its 2-6 x 2-6 children with the forward's tap
//                     weights in a fixed order (~1.5x the GEMM rows of the children; no atomics).
//                     A piece whose tile would exceed 99 KB stays on the SIMT kernel (fused_conv_bwd.cu).
//   * wgrad: dW[co, c, tap] = sum_m g[m, co] * virtual[m + tap - pad, c]: M = C_out (64), N = 64
//     virtual channels, for the k taps of one kernel row at once; K = pixels, in segments of 32
//     along x of one image row; grid z = segment chunks (split-K) whose fp32 partials a second
//     kernel sums in index order. A (the segment's grad_pre [pixels][C_out], cp.async) is shared by
//     the k taps and fed with ldmatrix.trans; B is a halo tile of 32 + k - 1 virtual pixels built
//     once per segment as the forward builds its input (none / up_nearest: cp.async from the source
//     pixel; maxpool2 / bilinear: 16-byte loads of the 4 source pixels combined in fp32, stored to
//     shared memory); tap kx reads it kx rows down. The bias gradient (column sums of g) comes from
//     the kernel-row-0, channel-tile-0 CTAs' A tiles, summed in pixel order.
//   * Both GEMMs: 64 x 64 CTA tiles, ldmatrix.x4 + mma.sync m16n8k16 with fp32 accumulation, a
//     2-stage cp.async pipeline; shared rows padded (80 / 144 bytes) so that the 8 row addresses of
//     an ldmatrix fall into 8 different 16-byte bank groups. dgrad: 2 warps, warp tile 64 x 32 (the
//     per-trip pipeline code amortised over 32 MMAs per warp); wgrad: 4 warps as 2 x 2, warp tile
//     32 x 32 (its k taps already give each warp 16 k MMAs per trip).
//
// Status: compiles for sm_80 / sm_90; its CPU twin (-DUPF_BWD_TC_TWIN: tc_primitives.cuh emulates
// smem, cp.async, ldmatrix, mma per thread) is tested against the fp64 reference
// (tests/ops/test_native_cuda_bwd_tc_twin.py); NOT yet run on a GPU.
#include "tc_primitives.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#if defined(UPF_BWD_TC_TWIN)
#include <limits>
#include <vector>
#endif

#include "../build_registry.h"
#include "fused_conv_bwd_tc.h"
#include "packed_max.cuh"
#if !defined(UPF_BWD_TC_TWIN)
#include "smem_opt_in.h"
#endif

namespace unetpp_fast {
namespace cuda {
namespace {

using tcp::Elem;
using tcp::Mma;

const KernelRegistrar kBwdTc("cuda:fused_conv_bwd_tc");

constexpr int kThreads = 128;                            // wgrad: 4 warps as 2 x 2, warp tiles 32 x 32
// dgrad: 2 warps side by side along N, warp tiles 64 x 32: twice the MMAs per warp and K block of a
// 32 x 32 warp tile for the same per-trip pipeline code (cp.async issue, waits, barriers, loop).
constexpr int kDgradThreads = 64;
constexpr int kDgradRowsPerThread = kTcBwdTile * 4 / kDgradThreads;  // 16-byte chunks j = tid % 4
constexpr int kTile = kTcBwdTile;
constexpr int kBK = 32;                                  // dgrad: C_out per K block
constexpr int kDgradRow = (kBK + 8) * 2;                 // 80 bytes
constexpr int kDgradStage = 2 * kTile * kDgradRow;       // A and B
constexpr int kDgradSmem = 2 * kDgradStage;              // 20480: 2 stages; the fp32 epilogue tile fits
constexpr int kEpiStride = kTile + 1;                    // floats per staged row
constexpr int kPix = kTcBwdPixels;                       // wgrad: pixels per K block
constexpr int kWgradRow = (kTile + 8) * 2;               // 144 bytes
constexpr int kWgradStage = (2 * kPix + 2) * kWgradRow;  // A (kPix rows) and the B halo (kPix + 2 rows)
constexpr int kWgradSmem = 2 * kWgradStage;              // 19008
static_assert(kTile * kEpiStride * 4 <= kDgradSmem, "the epilogue tile reuses the pipeline's shared memory");
static_assert(kDgradSmem == kTcBwdDgradSmem, "fused_conv_bwd_tc.h sizes the bilinear CTA's shared memory");

struct DgradArgs {
  BwdParams b;
  const void* packed;  // [C_in][taps][C_out]
  void* out;           // the piece's gradient
  int64_t out_n, out_c, out_h, out_w;
  int64_t rows;        // M
  int piece;
};

struct WgradArgs {
  BwdParams b;
  float* partial;  // [splits][C_out][C_in * taps + 1]
  int64_t chunk;   // row segments (kPix pixels along x) per split
  int ci_tiles;
};

// (n, y, x) of GEMM row m: virtual pixels in order, or for up_nearest (source pixel, 2x2 child).
struct Pixel {
  int64_t n;
  int y, x;
};
UPF_TCP_DEVICE Pixel dgrad_row_pixel(const BwdParams& b, int mode, int64_t m) {
  const VirtualInput& v = b.input;
  if (mode == kUpNearest) {
    const int hs = v.height / 2, ws = v.width / 2, child = static_cast<int>(m & 3);
    const int64_t s = m >> 2, plane = static_cast<int64_t>(hs) * ws;
    const int r = static_cast<int>(s % plane);
    return {s / plane, 2 * (r / ws) + (child >> 1), 2 * (r % ws) + (child & 1)};
  }
  const int64_t plane = static_cast<int64_t>(v.height) * v.width;
  const int r = static_cast<int>(m % plane);
  return {m / plane, r / v.width, r % v.width};
}

// One dgrad warp's 64 x 32 tile: 2 k16 steps of 4 x 4 mma over the smem tiles, A stored [m][k] (rows
// 0..63, all of the CTA's), B stored [n][k] (columns wn * 32 ..).
template <typename T>
UPF_TCP_DEVICE void warp_mma(float (&acc)[4][4][4], uint32_t a_base, uint32_t b_base, int row_bytes, int wn,
                             int lane) {
  for (int ks = 0; ks < 2; ++ks) {
    uint32_t a[4][4], b[4][2];
    for (int mi = 0; mi < 4; ++mi) {
      tcp::ldmatrix_x4(a_base + (mi * 16 + (lane % 16)) * row_bytes + (ks * 16 + (lane / 16) * 8) * 2, a[mi]);
    }
    for (int p = 0; p < 2; ++p) {
      uint32_t r[4];
      const int n = wn * 32 + p * 16 + (lane / 16) * 8 + (lane % 8), k = ks * 16 + ((lane / 8) % 2) * 8;
      tcp::ldmatrix_x4(b_base + n * row_bytes + k * 2, r);
      b[2 * p][0] = r[0];
      b[2 * p][1] = r[1];
      b[2 * p + 1][0] = r[2];
      b[2 * p + 1][1] = r[3];
    }
    for (int mi = 0; mi < 4; ++mi)
      for (int ni = 0; ni < 4; ++ni) Mma<T>::run(acc[mi][ni], a[mi], b[ni]);
  }
}

template <typename T>
UPF_TCP_DEVICE float load_elem(const void* base, int64_t off) {
  return Elem<T>::to_float(static_cast<const uint16_t*>(base)[off]);
}
template <typename T>
UPF_TCP_DEVICE void store_elem(void* base, int64_t off, float v) {
  static_cast<uint16_t*>(base)[off] = Elem<T>::from_float(v);
}

// One 64 x 64 dgrad tile: rows = this thread's A rows (pix, row_ok: rows (tid + i * 64) / 4),
// columns = channels c0 .. c0 + 63 of piece d; the fp32 accumulators of this warp's 64 x 32 part.
// Starts and ends with the pipeline's shared memory free (a barrier on both sides of each K block).
template <typename T>
UPF_TCP_DEVICE void dgrad_gemm(const BwdParams& b, const PieceDesc& d, const uint16_t* wt, int c0,
                               const Pixel (&pix)[kDgradRowsPerThread], const bool (&row_ok)[kDgradRowsPerThread],
                               unsigned char* smem, float (&acc)[4][4][4]) {
  const int tid = static_cast<int>(UPF_TCP_THREAD.x), lane = tid & 31, wn = tid >> 5;
  const int k = b.k, pad = k / 2, taps = bwd_taps(b), co_blocks = (b.c_out + kBK - 1) / kBK;
  const int k_blocks = taps * co_blocks;
  const uint16_t* g = static_cast<const uint16_t*>(b.grad_pre);
  const uint32_t base = tcp::smem_address(smem);
  // Per thread, fixed over the K loop: its 16-byte chunk j (the same for all its rows), its rows' pixel
  // offsets in grad_pre and weight rows; per K block only the tap's uniform shift is added.
  const int j = tid % 4;
  // Per row, bit t of tap_ok: tap t reads grad_pre inside the image (else zeros), on a real row.
  int64_t g_row[kDgradRowsPerThread], w_row[kDgradRowsPerThread];
  bool w_row_ok[kDgradRowsPerThread];
  uint32_t tap_ok[kDgradRowsPerThread];
  for (int i = 0; i < kDgradRowsPerThread; ++i) {
    const int c = c0 + (tid + i * kDgradThreads) / 4;
    g_row[i] = pix[i].n * b.g_stride_n + pix[i].y * b.g_stride_h + pix[i].x * b.g_stride_w + 8 * j;
    w_row_ok[i] = c < d.channels;
    w_row[i] = static_cast<int64_t>(d.channel_offset + (w_row_ok[i] ? c : 0)) * taps * b.c_out + 8 * j;
    tap_ok[i] = 0;
    for (int ky = 0, t = 0; ky < k; ++ky)
      for (int kx = 0; kx < k; ++kx, ++t) {
        const int oy = pix[i].y + pad - ky, ox = pix[i].x + pad - kx;
        if (row_ok[i] && in_bounds(oy, ox, b.input.height, b.input.width)) tap_ok[i] |= 1u << t;
      }
  }
  // tap_shift: grad_pre elements from a row's pixel to the one tap (ky, kx) reads, (pad - ky, pad - kx)
  // away; w_tap: the packed weight's offset of the tap. Both advanced by additions with the tap.
  const auto load_stage = [&](int tap, int64_t tap_shift, int64_t w_tap, int co0, int stage) {
    const uint32_t a_s = base + stage * kDgradStage, b_s = a_s + kTile * kDgradRow;
    const int64_t shift = tap_shift + co0, w_shift = w_tap + co0;
    const bool co_ok = co0 + 8 * j < b.c_out;
#pragma unroll
    for (int i = 0; i < kDgradRowsPerThread; ++i) {
      const int row = (tid + i * kDgradThreads) / 4;
      const bool ok = co_ok && ((tap_ok[i] >> tap) & 1u);
      tcp::cp_async_16(a_s + row * kDgradRow + j * 16, g + (ok ? g_row[i] + shift : 0), ok ? 16 : 0);
      const bool w_ok = w_row_ok[i] && co_ok;
      tcp::cp_async_16(b_s + row * kDgradRow + j * 16, wt + (w_ok ? w_row[i] + w_shift : 0), w_ok ? 16 : 0);
    }
    tcp::cp_async_commit();
  };
  // The K blocks in order (tap, co0), advanced without divisions or multiplications.
  int next_tap = 0, next_kx = 0, next_co0 = 0;
  int64_t next_shift = pad * (b.g_stride_h + b.g_stride_w), next_w_tap = 0;
  const auto load_next = [&](int stage) {
    load_stage(next_tap, next_shift, next_w_tap, next_co0, stage);
    next_co0 += kBK;
    if (next_co0 >= b.c_out) {
      next_co0 = 0;
      ++next_tap;
      next_w_tap += b.c_out;
      next_shift -= b.g_stride_w;
      if (++next_kx == k) {
        next_kx = 0;
        next_shift += k * b.g_stride_w - b.g_stride_h;
      }
    }
  };

  for (int mi = 0; mi < 4; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
  load_next(0);
  for (int kb = 0; kb < k_blocks; ++kb) {
    if (kb + 1 < k_blocks) {
      load_next((kb + 1) & 1);
      tcp::cp_async_wait<1>();
    } else {
      tcp::cp_async_wait<0>();
    }
    UPF_TCP_SYNC();
    const uint32_t a_s = base + (kb & 1) * kDgradStage;
    warp_mma<T>(acc, a_s, a_s + kTile * kDgradRow, kDgradRow, wn, lane);
    UPF_TCP_SYNC();
  }
}

// The dgrad accumulators of this thread into an fp32 tile [64][kEpiStride] (row offset `row0`).
UPF_TCP_DEVICE void stage_tile(const float (&acc)[4][4][4], float* tile, int row0) {
  const int tid = static_cast<int>(UPF_TCP_THREAD.x), lane = tid & 31, wn = tid >> 5, gq = lane / 4, t4 = lane % 4;
  for (int mi = 0; mi < 4; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int e = 0; e < 4; ++e) {
        const int row = mi * 16 + gq + (e >= 2 ? 8 : 0), col = wn * 32 + ni * 8 + 2 * t4 + (e % 2);
        tile[(row0 + row) * kEpiStride + col] = acc[mi][ni][e];
      }
}

template <typename T>
UPF_TCP_GLOBAL dgrad_kernel(const UPF_TCP_GRID_CONSTANT DgradArgs args) {
  UPF_TCP_SHARED(smem, kDgradSmem);
  const BwdParams& b = args.b;
  const PieceDesc& d = b.input.pieces[args.piece];
  const int tid = static_cast<int>(UPF_TCP_THREAD.x);
  const int64_t m0 = static_cast<int64_t>(UPF_TCP_BLOCK.x) * kTile;
  const int c0 = static_cast<int>(UPF_TCP_BLOCK.y) * kTile;
  Pixel pix[kDgradRowsPerThread];
  bool row_ok[kDgradRowsPerThread];
  for (int i = 0; i < kDgradRowsPerThread; ++i) {
    const int64_t m = m0 + (tid + i * kDgradThreads) / 4;
    row_ok[i] = m < args.rows;
    pix[i] = dgrad_row_pixel(b, d.mode, row_ok[i] ? m : 0);
  }
  float acc[4][4][4];
  dgrad_gemm<T>(b, d, static_cast<const uint16_t*>(args.packed), c0, pix, row_ok, smem, acc);

  // Epilogue: the fp32 tile through shared memory, then the piece's adjoint.
  float* tile = reinterpret_cast<float*>(smem);
  stage_tile(acc, tile, 0);
  UPF_TCP_SYNC();
  if (d.mode == kUpNearest) {
    for (int idx = tid; idx < (kTile / 4) * kTile; idx += kDgradThreads) {
      const int s = idx / kTile, col = idx % kTile, c = c0 + col;
      const int64_t m = m0 + 4 * s;
      if (m >= args.rows || c >= d.channels) continue;
      const float* t = tile + 4 * s * kEpiStride + col;
      const float sum = ((t[0] + t[kEpiStride]) + t[2 * kEpiStride]) + t[3 * kEpiStride];
      const Pixel p = dgrad_row_pixel(b, d.mode, m);  // child 0: (2 sy, 2 sx)
      store_elem<T>(args.out, p.n * args.out_n + c * args.out_c + (p.y / 2) * args.out_h + (p.x / 2) * args.out_w,
                    sum);
    }
    return;
  }
  for (int idx = tid; idx < kTile * kTile; idx += kDgradThreads) {
    const int row = idx / kTile, col = idx % kTile, c = c0 + col;
    const int64_t m = m0 + row;
    if (m >= args.rows || c >= d.channels) continue;
    const float value = tile[row * kEpiStride + col];
    const Pixel p = dgrad_row_pixel(b, d.mode, m);
    if (d.mode != kMaxPool2) {
      store_elem<T>(args.out, p.n * args.out_n + c * args.out_c + p.y * args.out_h + p.x * args.out_w, value);
      continue;
    }
    const int64_t in = p.n * d.stride_n + c * d.stride_c + 2 * p.y * d.stride_h + 2 * p.x * d.stride_w;
    float window_max;
    const int arg = maxpool2_argmax<float>(load_elem<T>(d.data, in), load_elem<T>(d.data, in + d.stride_w),
                                           load_elem<T>(d.data, in + d.stride_h),
                                           load_elem<T>(d.data, in + d.stride_h + d.stride_w), &window_max);
    const int64_t out = p.n * args.out_n + c * args.out_c + 2 * p.y * args.out_h + 2 * p.x * args.out_w;
    for (int i = 0; i < 4; ++i) {
      store_elem<T>(args.out, out + (i >> 1) * args.out_h + (i & 1) * args.out_w, i == arg ? value : 0.f);
    }
  }
}

struct BilinearArgs {
  BwdParams b;
  const void* packed;
  void* out;
  int64_t out_n, out_c, out_h, out_w;
  int piece, tiles_y, tiles_x;
};

// up_bilinear(_ac) dgrad: a CTA owns kSrcH x kSrcW source pixels (of one image) x 64 channels. It runs
// the dgrad GEMM over the virtual pixels of their support (tc_bwd_bilinear_support: the rectangle of
// virtual pixels whose taps read one of them; ~1.5x the 4 x 32 children), 64 rows at a time, into an
// fp32 tile in shared memory, then gathers each source pixel's gradient with the forward's tap
// weights (adjoint_axis) in a fixed order: no scatter, no atomics.
template <typename T>
UPF_TCP_GLOBAL dgrad_bilinear_kernel(const UPF_TCP_GRID_CONSTANT BilinearArgs args) {
  UPF_TCP_DYNAMIC_SHARED(smem);
  const BwdParams& b = args.b;
  const VirtualInput& v = b.input;
  const PieceDesc& d = v.pieces[args.piece];
  const int tid = static_cast<int>(UPF_TCP_THREAD.x);
  const int per_image = args.tiles_y * args.tiles_x, block = static_cast<int>(UPF_TCP_BLOCK.x);
  const int64_t n = block / per_image;
  const int sy0 = (block % per_image) / args.tiles_x * kTcBwdSrcH;
  const int sx0 = (block % per_image) % args.tiles_x * kTcBwdSrcW;
  const int sy1 = (sy0 + kTcBwdSrcH < d.height ? sy0 + kTcBwdSrcH : d.height) - 1;
  const int sx1 = (sx0 + kTcBwdSrcW < d.width ? sx0 + kTcBwdSrcW : d.width) - 1;
  const int c0 = static_cast<int>(UPF_TCP_BLOCK.y) * kTile;
  int ly, hy, lx, hx;
  tc_bwd_bilinear_support(d.mode, sy0, sy1, d.height, v.height, &ly, &hy);
  tc_bwd_bilinear_support(d.mode, sx0, sx1, d.width, v.width, &lx, &hx);
  const int bw = hx - lx + 1, rows = (hy - ly + 1) * bw;
  float* tile = reinterpret_cast<float*>(smem + kDgradSmem);
  for (int r0 = 0; r0 < rows; r0 += kTile) {
    Pixel pix[kDgradRowsPerThread];
    bool row_ok[kDgradRowsPerThread];
    for (int i = 0; i < kDgradRowsPerThread; ++i) {
      const int row = r0 + (tid + i * kDgradThreads) / 4;
      row_ok[i] = row < rows;
      pix[i] = row_ok[i] ? Pixel{n, ly + row / bw, lx + row % bw} : Pixel{n, ly, lx};
    }
    float acc[4][4][4];
    dgrad_gemm<T>(b, d, static_cast<const uint16_t*>(args.packed), c0, pix, row_ok, smem, acc);
    stage_tile(acc, tile, r0);
  }
  UPF_TCP_SYNC();
  for (int idx = tid; idx < kTcBwdSrcH * kTcBwdSrcW * kTile; idx += kDgradThreads) {
    const int s = idx / kTile, col = idx % kTile, c = c0 + col;
    const int sy = sy0 + s / kTcBwdSrcW, sx = sx0 + s % kTcBwdSrcW;
    if (sy > sy1 || sx > sx1 || c >= d.channels) continue;
    float sum = 0.f;
    adjoint_axis<float>(d.mode, true, sy, d.height, v.height, [&](int vy, float wy) {
      adjoint_axis<float>(d.mode, true, sx, d.width, v.width, [&](int vx, float wx) {
        sum += wy * wx * tile[((vy - ly) * bw + (vx - lx)) * kEpiStride + col];
      });
    });
    store_elem<T>(args.out, n * args.out_n + c * args.out_c + sy * args.out_h + sx * args.out_w, sum);
  }
}

BilinearArgs bilinear_args(const BwdParams& b, const FusedBwdOutputs& out, const void* packed, int piece) {
  const PieceDesc& d = b.input.pieces[piece];
  return {b,
          packed,
          out.grad_pieces[piece],
          out.piece_strides[piece][0],
          out.piece_strides[piece][1],
          out.piece_strides[piece][3],
          out.piece_strides[piece][4],
          piece,
          (d.height + kTcBwdSrcH - 1) / kTcBwdSrcH,
          (d.width + kTcBwdSrcW - 1) / kTcBwdSrcW};
}

// What one wgrad thread reads of its piece (its 8 channels), held in registers for the whole K loop
// (not re-read from the kernel parameters per chunk), and the two source rows of the current virtual
// row: none / up_nearest its one source row, max-pool rows 2vy and 2vy + 1, bilinear its taps' rows
// i0 and i1 (`ty`). Rows change once per row of segments, not per K block.
struct ChunkSource {
  const uint16_t* data;  // the piece at the thread's first channel
  int64_t stride_n, stride_h, stride_w;
  int height, width, mode;
  float scale_h, scale_w;  // bilinear (bilinear_scale), else unused
  const uint16_t* row_a;
  const uint16_t* row_b;
  LinearTap<float> ty;
};

// The source rows of virtual row vy of image n (vy inside the image).
UPF_TCP_DEVICE void set_rows(ChunkSource& s, int64_t n, int vy) {
  const uint16_t* image = s.data + n * s.stride_n;
  if (s.mode == kResampleNone || s.mode == kUpNearest) {
    s.row_a = image + (s.mode == kUpNearest ? nearest_source(vy, s.height) : vy) * s.stride_h;
    s.row_b = s.row_a;
  } else if (s.mode == kMaxPool2) {
    s.row_a = image + 2 * static_cast<int64_t>(vy) * s.stride_h;
    s.row_b = s.row_a + s.stride_h;
  } else {
    s.ty = bilinear_tap_scaled(vy, s.height, s.mode == kUpBilinearAC, s.scale_h);
    s.row_a = image + s.ty.i0 * s.stride_h;
    s.row_b = image + s.ty.i1 * s.stride_h;
  }
}

// 8 channels of the virtual input at column vx of the current row (inside the image) into the 16 smem
// bytes at `dst`: by cp.async for none / up_nearest, else computed as the forward does: the max-pool
// window by packed NaN-propagating maxima (exact: the value is one of the four), bilinear in fp32.
template <typename T>
UPF_TCP_DEVICE void virtual_chunk(const ChunkSource& s, int vx, unsigned char* smem, uint32_t dst) {
  if (s.mode == kResampleNone || s.mode == kUpNearest) {
    tcp::cp_async_16(dst, s.row_a + (s.mode == kUpNearest ? nearest_source(vx, s.width) : vx) * s.stride_w, 16);
    return;
  }
  unsigned char* out = smem + (dst - tcp::smem_address(smem));
  if (s.mode == kMaxPool2) {
    const int64_t x0 = 2 * static_cast<int64_t>(vx) * s.stride_w;
    const uint4 q0 = *reinterpret_cast<const uint4*>(s.row_a + x0);  // 16-byte aligned (tc_bwd_qualifies)
    const uint4 q1 = *reinterpret_cast<const uint4*>(s.row_a + x0 + s.stride_w);
    const uint4 q2 = *reinterpret_cast<const uint4*>(s.row_b + x0);
    const uint4 q3 = *reinterpret_cast<const uint4*>(s.row_b + x0 + s.stride_w);
    uint4 m;
    m.x = max2_nan<T>(max2_nan<T>(q0.x, q1.x), max2_nan<T>(q2.x, q3.x));
    m.y = max2_nan<T>(max2_nan<T>(q0.y, q1.y), max2_nan<T>(q2.y, q3.y));
    m.z = max2_nan<T>(max2_nan<T>(q0.z, q1.z), max2_nan<T>(q2.z, q3.z));
    m.w = max2_nan<T>(max2_nan<T>(q0.w, q1.w), max2_nan<T>(q2.w, q3.w));
    *reinterpret_cast<uint4*>(out) = m;
    return;
  }
  const LinearTap<float> tx = bilinear_tap_scaled(vx, s.width, s.mode == kUpBilinearAC, s.scale_w);
  const int64_t x0 = tx.i0 * s.stride_w, x1 = tx.i1 * s.stride_w;
  const uint16_t* at[4] = {s.row_a + x0, s.row_a + x1, s.row_b + x0, s.row_b + x1};
  uint32_t words[4][4], result[4];
  for (int i = 0; i < 4; ++i) {
    const uint4 q = *reinterpret_cast<const uint4*>(at[i]);  // 16-byte aligned (tc_bwd_qualifies)
    memcpy(words[i], &q, 16);
  }
  const LinearTap<float>& ty = s.ty;
  const auto blend = [&](float v00, float v01, float v10, float v11) {
    return ty.w0 * (tx.w0 * v00 + tx.w1 * v01) + ty.w1 * (tx.w0 * v10 + tx.w1 * v11);
  };
  for (int h = 0; h < 4; ++h) {  // two channels per word, rounded in pairs
    const float low = blend(Elem<T>::low_float(words[0][h]), Elem<T>::low_float(words[1][h]),
                            Elem<T>::low_float(words[2][h]), Elem<T>::low_float(words[3][h]));
    const float high = blend(Elem<T>::high_float(words[0][h]), Elem<T>::high_float(words[1][h]),
                             Elem<T>::high_float(words[2][h]), Elem<T>::high_float(words[3][h]));
    result[h] = Elem<T>::pack2(low, high);
  }
  *reinterpret_cast<uint4*>(out) = make_uint4(result[0], result[1], result[2], result[3]);  // one 16-byte store
}

// The wgrad MMAs of one K block for the KS taps of a kernel row: the A fragments (grad_pre, stored
// [pixel][C_out]) are loaded once per k16 step and reused for every tap; tap kx reads the B halo
// tile (stored [halo pixel][channel]) kx rows further down (ldmatrix takes one row address per lane).
template <typename T, int KS>
UPF_TCP_DEVICE void warp_mma_taps(float (&acc)[KS][2][4][4], uint32_t a_base, uint32_t b_base, int wm, int wn,
                                  int lane) {
  for (int ks = 0; ks < 2; ++ks) {
    uint32_t a[2][4];
    const int j = lane / 8;
    for (int mi = 0; mi < 2; ++mi) {
      const int k = ks * 16 + (lane % 8) + (j >= 2 ? 8 : 0);
      tcp::ldmatrix_x4_trans(a_base + k * kWgradRow + (wm * 32 + mi * 16 + (j % 2) * 8) * 2, a[mi]);
    }
#pragma unroll
    for (int kx = 0; kx < KS; ++kx) {
      uint32_t b[4][2];
      for (int p = 0; p < 2; ++p) {
        uint32_t r[4];
        const int k = ks * 16 + (lane % 8) + (j % 2) * 8 + kx, n = wn * 32 + p * 16 + (j / 2) * 8;
        tcp::ldmatrix_x4_trans(b_base + k * kWgradRow + n * 2, r);
        b[2 * p][0] = r[0];
        b[2 * p][1] = r[1];
        b[2 * p + 1][0] = r[2];
        b[2 * p + 1][1] = r[3];
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni) Mma<T>::run(acc[kx][mi][ni], a[mi], b[ni]);
    }
  }
}

// wgrad for the KS taps (ky, 0..KS-1) of one kernel row, 64 output x 64 virtual channels. A K block
// is a segment of kPix pixels along x of one image row (n, y, xs..xs+31, masked past the width); its
// grad_pre tile A is shared by the KS taps and the virtual input is built once per block as a halo
// tile of kPix + KS - 1 pixels (x from xs - pad), so a resampled piece is computed 1/KS as often as
// with one CTA per tap. Split-K over segments (grid z).
template <typename T, int KS>
UPF_TCP_GLOBAL wgrad_kernel(const UPF_TCP_GRID_CONSTANT WgradArgs args) {
  UPF_TCP_SHARED(smem, kWgradSmem);
  const BwdParams& b = args.b;
  const VirtualInput& v = b.input;
  const int tid = static_cast<int>(UPF_TCP_THREAD.x), lane = tid & 31, warp = tid >> 5, wm = warp >> 1,
            wn = warp & 1;
  const int co0 = static_cast<int>(UPF_TCP_BLOCK.x) * kTile;
  const int ky = static_cast<int>(UPF_TCP_BLOCK.y) / args.ci_tiles;
  const int ci0 = (static_cast<int>(UPF_TCP_BLOCK.y) % args.ci_tiles) * kTile;
  const int split = static_cast<int>(UPF_TCP_BLOCK.z);
  const bool bias_cta = UPF_TCP_BLOCK.y == 0;
  constexpr int pad = KS / 2, taps = KS * KS, halo = kPix + KS - 1;
  const int64_t per_row = (v.width + kPix - 1) / kPix, segments = b.batch * static_cast<int64_t>(v.height) * per_row;
  const int64_t begin = split * args.chunk, end = begin + args.chunk < segments ? begin + args.chunk : segments;
  const int k_blocks = begin < end ? static_cast<int>(end - begin) : 0;
  const uint16_t* g = static_cast<const uint16_t*>(b.grad_pre);
  const uint32_t base = tcp::smem_address(smem);

  // Per thread, fixed over the K loop: its 16-byte chunk j (8 output channels of A, 8 virtual
  // channels of B: one piece). The segment (n, y, xs) is the CTA's, advanced without divisions.
  const int j = tid % 8, co = co0 + 8 * j, ci = ci0 + 8 * j;
  const bool co_ok = co < b.c_out, ci_ok = ci < v.channels;
  const PieceDesc& piece = v.pieces[ci_ok ? piece_of_channel(v, ci) : 0];
  const bool ac = piece.mode == kUpBilinearAC;
  ChunkSource source{static_cast<const uint16_t*>(piece.data) + (ci_ok ? ci - piece.channel_offset : 0),
                     piece.stride_n,
                     piece.stride_h,
                     piece.stride_w,
                     piece.height,
                     piece.width,
                     piece.mode,
                     bilinear_scale<float>(piece.height, v.height, ac),  // one division per thread, not per chunk
                     bilinear_scale<float>(piece.width, v.width, ac),
                     nullptr,
                     nullptr,
                     LinearTap<float>{}};
  int64_t seg_n = begin / (static_cast<int64_t>(v.height) * per_row);
  const int64_t seg_r = begin - seg_n * v.height * per_row;
  int seg_y = static_cast<int>(seg_r / per_row), seg_x = static_cast<int>(seg_r % per_row) * kPix;
  // The source rows of the virtual row vy = seg_y + ky - pad, set when the segment changes rows.
  const auto set_row = [&] {
    const int vy = seg_y + ky - pad;
    if (ci_ok && vy >= 0 && vy < v.height) set_rows(source, seg_n, vy);
  };
  if (k_blocks > 0) set_row();
  const auto load_stage = [&](int stage) {
    const uint32_t a_s = base + stage * kWgradStage, b_s = a_s + kPix * kWgradRow;
    constexpr int kRowsPerPass = kThreads / 8;
#pragma unroll
    for (int pass = 0; pass < kPix / kRowsPerPass; ++pass) {  // A: the segment's pixels
      const int row = tid / 8 + pass * kRowsPerPass, x = seg_x + row;
      const bool g_ok = co_ok && x < v.width;
      const uint16_t* src = g_ok ? g + seg_n * b.g_stride_n + seg_y * b.g_stride_h + x * b.g_stride_w + co : g;
      tcp::cp_async_16(a_s + row * kWgradRow + j * 16, src, g_ok ? 16 : 0);
    }
    const int vy = seg_y + ky - pad;
#pragma unroll
    for (int pass = 0; pass < (halo + kRowsPerPass - 1) / kRowsPerPass; ++pass) {  // B: virtual, x from xs - pad
      const int row = tid / 8 + pass * kRowsPerPass, vx = seg_x + row - pad;
      if (row >= halo) break;
      const uint32_t dst = b_s + row * kWgradRow + j * 16;
      if (ci_ok && in_bounds(vy, vx, v.height, v.width)) {
        virtual_chunk<T>(source, vx, smem, dst);
      } else {
        tcp::cp_async_16(dst, g, 0);  // zeros: padding, channels beyond C_in
      }
    }
    tcp::cp_async_commit();
    seg_x += kPix;  // the next segment
    if (seg_x >= v.width) {
      seg_x = 0;
      if (++seg_y == v.height) {
        seg_y = 0;
        ++seg_n;
      }
      set_row();  // a new row: on the rare path, not per K block
    }
  };

  float acc[KS][2][4][4] = {};
  float bias_sum = 0.f;
  if (k_blocks > 0) load_stage(0);
  for (int kb = 0; kb < k_blocks; ++kb) {
    if (kb + 1 < k_blocks) {
      load_stage((kb + 1) & 1);
      tcp::cp_async_wait<1>();
    } else {
      tcp::cp_async_wait<0>();
    }
    UPF_TCP_SYNC();
    const uint32_t a_s = base + (kb & 1) * kWgradStage;
    warp_mma_taps<T, KS>(acc, a_s, a_s + kPix * kWgradRow, wm, wn, lane);
    if (bias_cta && tid < kTile) {  // column sums of g, in pixel order (masked pixels are zeros)
      const unsigned char* a_tile = smem + (kb & 1) * kWgradStage;
      for (int row = 0; row < kPix; ++row) {
        uint16_t bits;
        memcpy(&bits, a_tile + row * kWgradRow + tid * 2, 2);
        bias_sum += Elem<T>::to_float(bits);
      }
    }
    UPF_TCP_SYNC();
  }

  const int64_t cols = static_cast<int64_t>(v.channels) * taps + 1;
  float* out = args.partial + static_cast<int64_t>(split) * b.c_out * cols;
  const int gq = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int kx = 0; kx < KS; ++kx)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
      for (int ni = 0; ni < 4; ++ni)
        for (int e = 0; e < 4; ++e) {
          const int co_e = co0 + wm * 32 + mi * 16 + gq + (e >= 2 ? 8 : 0);
          const int ci_e = ci0 + wn * 32 + ni * 8 + 2 * t4 + (e % 2);
          if (co_e < b.c_out && ci_e < v.channels) {
            out[co_e * cols + static_cast<int64_t>(ci_e) * taps + ky * KS + kx] = acc[kx][mi][ni][e];
          }
        }
  if (bias_cta && tid < kTile && co0 + tid < b.c_out) out[(co0 + tid) * cols + cols - 1] = bias_sum;
}

// Packed weight element i ([C_in][taps][C_out]) from W [C_out][C_in][taps].
UPF_HD int64_t packed_source(int64_t i, int c_in, int taps, int c_out) {
  const int64_t co = i % c_out, tap = (i / c_out) % taps, ci = i / (static_cast<int64_t>(c_out) * taps);
  return (co * c_in + ci) * taps + tap;
}

// Sum of the splits of partial column i, in split order.
UPF_HD float reduce_splits(const float* partial, int splits, int64_t total, int64_t i) {
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[s * total + i];
  return sum;
}

int64_t dgrad_rows(const BwdParams& b, int piece) {
  const PieceDesc& d = b.input.pieces[piece];
  const int64_t pixels = static_cast<int64_t>(b.batch) * b.input.height * b.input.width;
  return d.mode == kUpNearest ? 4 * (static_cast<int64_t>(b.batch) * d.height * d.width) : pixels;
}

DgradArgs dgrad_args(const BwdParams& b, const FusedBwdOutputs& out, const void* packed, int piece) {
  return {b, packed, out.grad_pieces[piece], out.piece_strides[piece][0], out.piece_strides[piece][1],
          out.piece_strides[piece][3], out.piece_strides[piece][4], dgrad_rows(b, piece), piece};
}

WgradArgs wgrad_args(const BwdParams& b, float* partial, int splits) {
  const int64_t segments = tc_bwd_segments(b);
  return {b, partial, (segments + splits - 1) / splits, (b.input.channels + kTile - 1) / kTile};
}

#if !defined(UPF_BWD_TC_TWIN)

template <typename T>
__global__ void pack_weight_kernel(const uint16_t* w, uint16_t* packed, int c_in, int taps, int c_out) {
  const int64_t total = static_cast<int64_t>(c_in) * taps * c_out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    packed[i] = w[packed_source(i, c_in, taps, c_out)];
  }
}

template <typename T>
__global__ void reduce_kernel(const float* partial, int splits, int c_out, int64_t cols, void* grad_weight,
                              void* grad_bias) {
  const int64_t total = c_out * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float sum = reduce_splits(partial, splits, total, i);
    const int64_t co = i / cols, col = i % cols;
    if (col < cols - 1) {
      static_cast<uint16_t*>(grad_weight)[co * (cols - 1) + col] = Elem<T>::from_float(sum);
    } else if (grad_bias != nullptr) {
      static_cast<uint16_t*>(grad_bias)[co] = Elem<T>::from_float(sum);
    }
  }
}

unsigned grid_1d(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return static_cast<unsigned>(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);
}

template <typename T>
cudaError_t launch_all(const BwdParams& b, DType dtype, const FusedBwdOutputs& out, void* packed, float* partial,
                       int splits, cudaStream_t stream) {
  const int taps = bwd_taps(b), c_in = b.input.channels;
  const int64_t packed_total = static_cast<int64_t>(c_in) * taps * b.c_out;
  pack_weight_kernel<T><<<grid_1d(packed_total), 256, 0, stream>>>(static_cast<const uint16_t*>(b.weight),
                                                                    static_cast<uint16_t*>(packed), c_in, taps,
                                                                    b.c_out);
  for (int p = 0; p < b.input.num_pieces; ++p) {
    if (!tc_bwd_dgrad_covers(b, p)) {
      const cudaError_t err = launch_fused_conv_backward_piece(b, dtype, out, p, stream);
      if (err != cudaSuccess) return err;
      continue;
    }
    const unsigned channel_tiles = static_cast<unsigned>((b.input.pieces[p].channels + kTile - 1) / kTile);
    const int mode = b.input.pieces[p].mode;
    if (mode == kUpBilinear || mode == kUpBilinearAC) {
      const BilinearArgs args = bilinear_args(b, out, packed, p);
      const int smem = static_cast<int>(tc_bwd_bilinear_smem(b, p));
      const cudaError_t err = ensure_dynamic_smem<dgrad_bilinear_kernel<T>>(smem);  // once per device
      if (err != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>(b.batch * args.tiles_y * args.tiles_x), channel_tiles);
      dgrad_bilinear_kernel<T><<<grid, kDgradThreads, smem, stream>>>(args);
      continue;
    }
    const DgradArgs args = dgrad_args(b, out, packed, p);
    dgrad_kernel<T><<<dim3(static_cast<unsigned>((args.rows + kTile - 1) / kTile), channel_tiles), kDgradThreads,
                      0, stream>>>(args);
  }
  const WgradArgs w = wgrad_args(b, partial, splits);
  const dim3 grid(static_cast<unsigned>((b.c_out + kTile - 1) / kTile), static_cast<unsigned>(b.k * w.ci_tiles),
                  static_cast<unsigned>(splits));
  if (b.k == 3) {
    wgrad_kernel<T, 3><<<grid, kThreads, 0, stream>>>(w);
  } else {
    wgrad_kernel<T, 1><<<grid, kThreads, 0, stream>>>(w);
  }
  const int64_t cols = static_cast<int64_t>(c_in) * taps + 1;
  reduce_kernel<T><<<grid_1d(b.c_out * cols), 256, 0, stream>>>(partial, splits, b.c_out, cols, out.grad_weight,
                                                                  out.grad_bias);
  return cudaGetLastError();
}

#endif  // !UPF_BWD_TC_TWIN

}  // namespace

#if !defined(UPF_BWD_TC_TWIN)

cudaError_t launch_fused_conv_backward_tc(const BwdParams& b, DType dtype, const FusedBwdOutputs& out,
                                          void* packed_weight, float* partial, int splits, cudaStream_t stream) {
  if (!tc_bwd_qualifies(b, dtype) || splits < 1) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16) {
    return launch_all<__nv_bfloat16>(b, dtype, out, packed_weight, partial, splits, stream);
  }
  return launch_all<__half>(b, dtype, out, packed_weight, partial, splits, stream);
}

#else  // UPF_BWD_TC_TWIN: the kernels' own code on the CPU (bf16), for the parity tests.

namespace {
void store_reduced(int64_t i, float sum, int64_t cols, void* grad_weight, void* grad_bias) {
  const int64_t co = i / cols, col = i % cols;
  const uint16_t bits = Elem<__nv_bfloat16>::from_float(sum);
  if (col < cols - 1) {
    static_cast<uint16_t*>(grad_weight)[co * (cols - 1) + col] = bits;
  } else if (grad_bias != nullptr) {
    static_cast<uint16_t*>(grad_bias)[co] = bits;
  }
}
}  // namespace

// bf16 pieces / grad_pre (channels_last, 5 strides each: n, c, d, h, w; d ignored) and weight
// [C_out, C_in, k, k]; writes each piece's gradient (strides as given; every piece the TC dgrad
// covers), grad_weight [C_out, C_in * k * k] and grad_bias [C_out] (bf16). `only` >= 0 runs one
// kernel: 0 dgrad, 1 wgrad. Returns 2 when the call does not qualify.
extern "C" int upf_bwd_tc_twin_bf16(int num_pieces, const void* const* data, const int64_t* strides, const int* chw,
                                    const int* modes, int batch, int out_h, int out_w, const void* grad_pre,
                                    const int64_t* g_strides, const void* weight, int c_out, int k, int splits,
                                    void* const* grad_pieces, const int64_t* grad_strides, void* grad_weight,
                                    void* grad_bias) {
  if (num_pieces < 1 || num_pieces > kMaxPieces || splits < 1) return 1;
  BwdParams b{};
  VirtualInput& v = b.input;
  v.num_pieces = num_pieces;
  int offset = 0;
  for (int p = 0; p < num_pieces; ++p) {
    PieceDesc& d = v.pieces[p];
    d.data = data[p];
    d.stride_n = strides[5 * p];
    d.stride_c = strides[5 * p + 1];
    d.stride_h = strides[5 * p + 3];
    d.stride_w = strides[5 * p + 4];
    d.channels = chw[3 * p];
    d.height = chw[3 * p + 1];
    d.width = chw[3 * p + 2];
    d.depth = 1;
    d.channel_offset = offset;
    d.mode = modes[p];
    offset += d.channels;
  }
  v.channels = offset;
  v.depth = 1;
  v.height = out_h;
  v.width = out_w;
  b.grad_pre = grad_pre;
  b.g_stride_n = g_strides[0];
  b.g_stride_c = g_strides[1];
  b.g_stride_h = g_strides[3];
  b.g_stride_w = g_strides[4];
  b.weight = weight;
  b.batch = batch;
  b.c_out = c_out;
  b.k = k;
  if (!tc_bwd_qualifies(b, DType::kBFloat16)) return 2;
  const int taps = bwd_taps(b);
  std::vector<uint16_t> packed(static_cast<size_t>(tc_bwd_packed_weight_elements(b)));
  for (int64_t i = 0; i < static_cast<int64_t>(packed.size()); ++i) {
    packed[i] = static_cast<const uint16_t*>(weight)[packed_source(i, v.channels, taps, c_out)];
  }
  FusedBwdOutputs out{};
  for (int p = 0; p < num_pieces; ++p) {
    out.grad_pieces[p] = grad_pieces[p];
    for (int i = 0; i < 5; ++i) out.piece_strides[p][i] = grad_strides[5 * p + i];
  }
  for (int p = 0; p < num_pieces; ++p) {
    if (!tc_bwd_dgrad_covers(b, p)) continue;
    const unsigned channel_tiles = static_cast<unsigned>((v.pieces[p].channels + kTile - 1) / kTile);
    if (v.pieces[p].mode == kUpBilinear || v.pieces[p].mode == kUpBilinearAC) {
      const BilinearArgs args = bilinear_args(b, out, packed.data(), p);
      tcp::run_grid(static_cast<unsigned>(batch * args.tiles_y * args.tiles_x), channel_tiles, 1, kDgradThreads,
                    static_cast<size_t>(tc_bwd_bilinear_smem(b, p)),
                    [&args] { dgrad_bilinear_kernel<__nv_bfloat16>(args); });
      continue;
    }
    const DgradArgs args = dgrad_args(b, out, packed.data(), p);
    const unsigned gx = static_cast<unsigned>((args.rows + kTile - 1) / kTile);
    const unsigned gy = static_cast<unsigned>((v.pieces[p].channels + kTile - 1) / kTile);
    tcp::run_grid(gx, gy, 1, kDgradThreads, kDgradSmem, [&args] { dgrad_kernel<__nv_bfloat16>(args); });
  }
  std::vector<float> partial(static_cast<size_t>(tc_bwd_partial_elements(b, splits)),
                             std::numeric_limits<float>::quiet_NaN());  // poisoned: every entry is written
  const WgradArgs w = wgrad_args(b, partial.data(), splits);
  tcp::run_grid(static_cast<unsigned>((c_out + kTile - 1) / kTile), static_cast<unsigned>(k * w.ci_tiles),
                static_cast<unsigned>(splits), kThreads, kWgradSmem, [&w, k] {
                  if (k == 3) {
                    wgrad_kernel<__nv_bfloat16, 3>(w);
                  } else {
                    wgrad_kernel<__nv_bfloat16, 1>(w);
                  }
                });
  const int64_t cols = static_cast<int64_t>(v.channels) * taps + 1, total = c_out * cols;
  for (int64_t i = 0; i < total; ++i) {
    store_reduced(i, reduce_splits(partial.data(), splits, total, i), cols, grad_weight, grad_bias);
  }
  return 0;
}

#endif  // UPF_BWD_TC_TWIN

}  // namespace cuda
}  // namespace unetpp_fast
