// Tensor-core forward of the fused convolution for fp16 / bf16, and fp32 on TF32 (torch-free: CUDA
// headers only). The text below counts in fp16 / bf16 elements; in fp32 every 32 channels read 16 and
// every 8 read 4 (kBK, kChunkChannels), while every byte count stays the same.
//
// Implicit GEMM  out[m, co] = act(bias[co] + sum_k A[m, k] * W[co, k]),  m = output pixel (n, z, y, x),
// K ordered (tap, piece, channel): one K block = one tap x 32 channels of ONE piece, so the piece
// and its resample are decided per K block (uniform across the CTA), never per element.
// 2D and 3D are one kernel: DIMS = 3 adds the depth axis (pixel z, tap kz, source slice), DIMS = 2
// is its depth-tap-count-1 instance where every depth term is a compile-time zero (the 2D SASS is
// unchanged, checked by the static model's hot-loop counts).
//
//   * A (128 pixels x 32 channels): `none` and `up_nearest` pieces in channels_last go straight
//     from global memory to shared memory with 16-byte cp.async (LDGSTS), zero-filled outside the
//     image / the piece; `up_bilinear(_ac)` and `maxpool2` read their 4 source pixels with 16-byte
//     loads (8 channels each), combine them in fp32 exactly as PyTorch does, and store 16 bytes;
//     the source pixels and weights of a row are computed once per (row, tap), not per element.
//     In 3D the same per source slice: trilinear blends two bilinear slices (t0 * s0 + t1 * s1, as
//     PyTorch), the 2x2x2 max-pool takes the max of two 2x2 slices.
//     Pieces that are not 16-byte vectorisable (NCHW, C % 8 != 0: the RGB input) take a generic
//     per-element path through the shared indexing header.
//   * W is packed by a small kernel launched just before (into a caller-provided workspace) as
//     [C_out][k*k][Kp], every piece's channels padded to a multiple of 32 with zeros, so every B
//     tile is 64 contiguous, aligned bytes per output channel.
//   * Shared memory rows are 64 bytes (32 channels); 16-byte chunks are XOR-swizzled with
//     (row >> 1) & 3 so that ldmatrix's 8 row addresses hit 8 different bank groups.
//   * ldmatrix.x4 + mma.sync m16n8k16 (fp32 accumulation), 4 warps, kStages-deep cp.async pipeline.
//   * Epilogue: bias + activation in fp32, the tile is staged through shared memory and written as
//     16-byte rows (channels_last) or element-wise (NCHW / odd channel counts).
//
// 2D k = 3 calls whose pieces are vectorised (or `none`, any layout) run the halo-tile kernel instead
// (fused_conv_tc_halo.cuh, chosen by `halo_applies`): a 32-channel chunk is staged once per 8 x 16
// output block and all 9 taps read it from shared memory. This file's kernel keeps k = 1, 3D, and
// resampled pieces that are not 16-byte vectorisable.
//
// Status: compiles for sm_80/sm_90 and its SASS is checked (LDGSTS, LDSM, HMMA in the hot loop, no
// spills); NOT yet run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#if defined(UPF_TC_TWIN)
#include <thread>
#include <vector>
#endif

#include "../build_registry.h"
#include "fused_conv_kernels.h"
#include "fused_conv_tc.h"
#include "packed_max.cuh"
#if !defined(UPF_TC_TWIN)
#include "smem_opt_in.h"
#endif

namespace unetpp_fast {
namespace cuda {
namespace {

const KernelRegistrar kTcF16("cuda:fused_conv_fwd_tc_f16");
const KernelRegistrar kTcBf16("cuda:fused_conv_fwd_tc_bf16");

const KernelRegistrar kTcTf32("cuda:fused_conv_fwd_tc_tf32");

constexpr int kBM = 128;       // output pixels per CTA
constexpr int kThreads = 128;  // 4 warps
constexpr int kStages = 3;
constexpr int kRowBytes = 64;  // one smem row of A or B: one K block of one pixel / output channel
// Channels per K block (one tap, one piece) and per 16-byte chunk: 32 and 8 for fp16 / bf16, 16 and 4
// for fp32 (TF32). A K block is 64 bytes of every row either way, so shared memory, swizzle and
// ldmatrix addressing are byte-identical across types; only the MMA instruction differs (m16n8k16
// for 16-bit types, m16n8k8.tf32 for fp32: each takes 32 bytes of K per row).
template <typename T>
constexpr int kBK = kRowBytes / static_cast<int>(sizeof(T));
template <typename T>
constexpr int kChunkChannels = 16 / static_cast<int>(sizeof(T));

// Byte offset of 16-byte chunk `chunk` (0..3) of smem row `row`, swizzled (see header comment).
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4));
}

#if defined(UPF_TC_TWIN)
}  // namespace
}  // namespace cuda
}  // namespace unetpp_fast
#include "fused_conv_tc_twin.h"
namespace unetpp_fast {
namespace cuda {
namespace {
#else
#define UPF_TC_SHARED(name, bytes) __shared__ __align__(128) unsigned char name[bytes]
#define UPF_TC_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define UPF_TC_KERNEL __global__ void __maxnreg__(168)
// The halo kernel's two stages (65-102 KB of shared memory) allow 2 CTAs per SM: 255 registers fit.
#define UPF_TC_HALO_KERNEL __global__ void __launch_bounds__(128, 2)
#define UPF_TC_GRID_CONSTANT __grid_constant__

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte cp.async; `bytes` = 0 zero-fills the destination without reading the source.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
// fp32 on TF32 tensor cores: m16n8k8, whose A (4 registers) and B (2) fragments hold one fp32 per
// register at the lane positions ldmatrix hands out for 32 bytes of K (row g, column t and t + 4).
// The MMA reads the top 19 bits of each operand: A is truncated, B was rounded by the pack kernel.
template <>
struct Mma<float> {
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

#endif  // UPF_TC_TWIN

// The elements of a 32-bit word <-> fp32: two 16-bit floats (the low half first) or one fp32.
//   kPerWord: elements per word; get(word, i): element i; word(r): r[0 .. kPerWord) packed;
//   store2(p, v0, v1): two consecutive elements; load / zero / bits: one element.
template <typename T>
struct Pack;
// What every 16-bit type derives from its lo / hi / pack.
template <typename T, typename Self>
struct PackPair {
  using Bits = uint16_t;
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static float get(uint32_t v, int half) { return half ? Self::hi(v) : Self::lo(v); }
  __device__ __forceinline__ static uint32_t word(const float* r) { return Self::pack(r[0], r[1]); }
  __device__ __forceinline__ static void store2(T* p, float v0, float v1) {
    *reinterpret_cast<uint32_t*>(p) = Self::pack(v0, v1);
  }
  // The packed weight keeps its values as they are.
  __device__ __forceinline__ static T weight(T v) { return v; }
};
template <>
struct Pack<__nv_bfloat16> : PackPair<__nv_bfloat16, Pack<__nv_bfloat16>> {
  __device__ __forceinline__ static float lo(uint32_t v) { return __uint_as_float(v << 16); }
  __device__ __forceinline__ static float hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ __forceinline__ static float load(const void* base, int64_t off) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
  }
  __device__ __forceinline__ static __nv_bfloat16 zero() { return __float2bfloat16_rn(0.f); }
  __device__ __forceinline__ static uint16_t bits(float v) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
  }
};
#if !defined(UPF_TC_TWIN)
template <>
struct Pack<__half> : PackPair<__half, Pack<__half>> {
  __device__ __forceinline__ static float lo(uint32_t v) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(v & 0xffffu)));
  }
  __device__ __forceinline__ static float hi(uint32_t v) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(v >> 16)));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ __forceinline__ static float load(const void* base, int64_t off) {
    return __half2float(static_cast<const __half*>(base)[off]);
  }
  __device__ __forceinline__ static __half zero() { return __float2half_rn(0.f); }
  __device__ __forceinline__ static uint16_t bits(float v) {
    const __half h = __float2half_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
  }
};
#endif
template <>
struct Pack<float> {
  using Bits = uint32_t;
  static constexpr int kPerWord = 1;
  __device__ __forceinline__ static float get(uint32_t v, int) { return __uint_as_float(v); }
  __device__ __forceinline__ static uint32_t word(const float* r) { return __float_as_uint(r[0]); }
  __device__ __forceinline__ static void store2(float* p, float v0, float v1) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  }
  __device__ __forceinline__ static float load(const void* base, int64_t off) {
    return static_cast<const float*>(base)[off];
  }
  __device__ __forceinline__ static float zero() { return 0.f; }
  __device__ __forceinline__ static uint32_t bits(float v) { return __float_as_uint(v); }
  // The packed weight is rounded to TF32 (nearest, ties away: cvt.rna.tf32.f32) once, so that the
  // MMA's truncation leaves it exact; NaN and infinity pass unchanged.
  __device__ __forceinline__ static float weight(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u) return v;
    return __uint_as_float((u + 0x1000u) & 0xffffe000u);
  }
};

// The next K block to load: channels [c0, c0 + 32) of `piece` at tap (ky, kx). Advanced by one
// block per trip (K order: tap, piece, channel block), so no division in the loop.
struct Cursor {
  int kz, ky, kx, piece, c0;  // kz stays 0 in 2D
};

template <typename T, int DIMS>
__device__ __forceinline__ void advance(const TcForwardParams& prm, Cursor& c, int ks) {
  c.c0 += kBK<T>;
  if (c.c0 >= prm.pieces[c.piece].channels) {
    c.c0 = 0;
    if (++c.piece == prm.num_pieces) {
      c.piece = 0;
      if (++c.kx == ks) {
        c.kx = 0;
        ++c.ky;
        if constexpr (DIMS == 3) {
          if (c.ky == ks) {
            c.ky = 0;
            ++c.kz;
          }
        }
      }
    }
  }
}

// This thread's output pixel (one A row per thread: kBM == kThreads).
struct Row {
  int n, z, y, x;  // z = 0 in 2D
  bool valid;
};

// Pixel m of the output (n, z, y, x): the decode the prologue and the epilogue share.
template <int DIMS>
__device__ __forceinline__ void decode_row(const TcForwardParams& prm, int m, Row& row) {
  const int hw = prm.height * prm.width;
  int r;
  if constexpr (DIMS == 3) {
    const int dhw = prm.depth * hw;
    row.n = m / dhw;
    r = m - row.n * dhw;
    row.z = r / hw;
    r -= row.z * hw;
  } else {
    row.n = m / hw;
    row.z = 0;
    r = m - row.n * hw;
  }
  row.y = r / prm.width;
  row.x = r - row.y * prm.width;
}

// Generic A row: any layout / channel count / mode, one element at a time through the shared
// indexing header. Cold (the RGB input conv, NCHW inputs): kept out of line so that it does not
// weigh on the registers and the code of the hot paths.
template <typename T, int DIMS>
__device__ __noinline__ void load_row_generic(const TcPiece& pc, const TcPieceDepth& pd, int n, int c0, int zz, int yy,
                                              int xx, int out_depth, bool inside, unsigned char* dst, int row) {
  PieceDesc d;
  d.stride_d = pd.stride_d;
  d.depth = pd.depth;
  d.resample_depth = DIMS == 3;
  d.data = pc.data;
  d.stride_n = pc.stride_n;
  d.stride_c = pc.stride_c;
  d.stride_h = pc.stride_h;
  d.stride_w = pc.stride_w;
  d.channels = pc.channels;
  d.height = pc.height;
  d.width = pc.width;
  d.channel_offset = 0;
  d.mode = pc.mode;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int chunk = 0; chunk < 4; ++chunk) *reinterpret_cast<uint4*>(dst + swizzle(row, chunk)) = zero;
  if (!inside) return;
  const int c_end = pc.channels < c0 + kBK<T> ? pc.channels : c0 + kBK<T>;
#pragma unroll 1
  for (int c = c0; c < c_end; ++c) {  // only the piece's channels: 3 for the RGB input
    const auto load = [&](int64_t off) { return Pack<T>::load(pc.data, off); };
    float value;
    if constexpr (DIMS == 3) {
      value = sample_piece_3d<float>(d, n, c, zz, yy, xx, out_depth, load);
    } else {
      (void)zz;
      (void)out_depth;
      value = sample_piece<float>(d, n, c, yy, xx, load);
    }
    const int j = c - c0;
    *reinterpret_cast<typename Pack<T>::Bits*>(dst + swizzle(row, j / kChunkChannels<T>) +
                                               (j % kChunkChannels<T>) * sizeof(T)) = Pack<T>::bits(value);
  }
}

// Loads the K block at `cur` into one pipeline stage (shared-memory addresses a_stage / b_stage).
// Element offsets are 32-bit: the launcher checks that every piece and the weight fit.
template <typename T, int BN, int KS, int DIMS>
__device__ __forceinline__ void load_block(const TcForwardParams& prm, const Cursor& cur, const Row& row,
                                           uint32_t a_stage, uint32_t b_stage, unsigned char* a_stage_ptr,
                                           const T* const* w_rows, const bool* b_ok) {
  const int tid = threadIdx.x;
  const TcPiece& pc = prm.pieces[cur.piece];

  // ---- B: BN output channels x 64 bytes, 16-byte chunks; rows past C_out zero-filled (their
  // pointers are clamped to weight row 0 by the caller).
  const int tap = DIMS == 3 ? (cur.kz * KS + cur.ky) * KS + cur.kx : cur.ky * KS + cur.kx;
  const int w_col = tap * prm.k_packed + pc.packed_offset + cur.c0;
#pragma unroll
  for (int i = 0; i < BN * 4 / kThreads; ++i) {
    const int r = (tid >> 2) + i * (kThreads / 4), chunk = tid & 3;
    cp_async_16(b_stage + swizzle(r, chunk), w_rows[i] + w_col, b_ok[i] ? 16 : 0);
  }

  // ---- A: this thread's pixel row, one K block = 4 16-byte chunks.
  const int yy = row.y + cur.ky - KS / 2, xx = row.x + cur.kx - KS / 2;
  const int zz = DIMS == 3 ? row.z + cur.kz - KS / 2 : 0;
  bool inside = row.valid && yy >= 0 && yy < prm.height && xx >= 0 && xx < prm.width;
  if constexpr (DIMS == 3) inside = inside && zz >= 0 && zz < prm.depth;
  const int left = pc.channels - cur.c0;  // channels of this piece from c0 on (>= 1)
  if (pc.vectorized && pc.mode <= kUpNearest) {  // none / nearest: straight to shared memory
    int sy = yy, sx = xx, sz = zz;
    if (pc.mode == kUpNearest) {
      sy = nearest_source(yy, pc.height);
      sx = nearest_source(xx, pc.width);
      if constexpr (DIMS == 3) sz = nearest_source(zz, prm.depths[cur.piece].depth);
    }
    const int slice_off = DIMS == 3 ? sz * prm.depths[cur.piece].stride_d : 0;  // a compile-time 0 in 2D
    const int off = inside ? row.n * pc.stride_n + slice_off + sy * pc.stride_h + sx * pc.stride_w + cur.c0 : 0;
    const T* src = static_cast<const T*>(pc.data) + off;
#pragma unroll
    for (int chunk = 0; chunk < 4; ++chunk) {
      cp_async_16(a_stage + swizzle(tid, chunk), src + chunk * kChunkChannels<T>,
                  inside && chunk * kChunkChannels<T> < left ? 16 : 0);
    }
    return;
  }
  if (!pc.vectorized) {
    load_row_generic<T, DIMS>(pc, prm.depths[cur.piece], row.n, cur.c0, zz, yy, xx, prm.depth, inside, a_stage_ptr,
                              tid);
    return;
  }
  // bilinear or maxpool2: 4 source pixels, 16-byte loads of 8 channels, fp32 math as PyTorch.
  // 3D: the same 4 pixels in each of two source slices, `slice1` elements after the first.
  int off[4];
  float wy0 = 0.f, wy1 = 0.f, wx0 = 0.f, wx1 = 0.f, wz0 = 1.f, wz1 = 0.f;
  int base_n = row.n * pc.stride_n + cur.c0, slice1 = 0;
  if constexpr (DIMS == 3) {
    const TcPieceDepth& pd = prm.depths[cur.piece];
    if (pc.mode == kMaxPool2) {
      base_n += 2 * zz * pd.stride_d;
      slice1 = pd.stride_d;
    } else {
      const LinearTap<float> tz = bilinear_tap_scaled(inside ? zz : 0, pd.depth, pc.mode == kUpBilinearAC, pd.scale_d);
      base_n += tz.i0 * pd.stride_d;
      slice1 = (tz.i1 - tz.i0) * pd.stride_d;
      wz0 = tz.w0;
      wz1 = tz.w1;
    }
  }
  if (pc.mode == kMaxPool2) {
    const int r0 = base_n + 2 * yy * pc.stride_h + 2 * xx * pc.stride_w;
    off[0] = r0;
    off[1] = r0 + pc.stride_w;
    off[2] = r0 + pc.stride_h;
    off[3] = r0 + pc.stride_h + pc.stride_w;
  } else {
    const bool ac = pc.mode == kUpBilinearAC;
    const LinearTap<float> ty = bilinear_tap_scaled(inside ? yy : 0, pc.height, ac, pc.scale_h);
    const LinearTap<float> tx = bilinear_tap_scaled(inside ? xx : 0, pc.width, ac, pc.scale_w);
    const int r0 = base_n + ty.i0 * pc.stride_h, r1 = base_n + ty.i1 * pc.stride_h;
    off[0] = r0 + tx.i0 * pc.stride_w;
    off[1] = r0 + tx.i1 * pc.stride_w;
    off[2] = r1 + tx.i0 * pc.stride_w;
    off[3] = r1 + tx.i1 * pc.stride_w;
    wy0 = ty.w0;
    wy1 = ty.w1;
    wx0 = tx.w0;
    wx1 = tx.w1;
  }
  const T* base = static_cast<const T*>(pc.data);
#pragma unroll
  for (int chunk = 0; chunk < 4; ++chunk) {
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    if (inside && chunk * kChunkChannels<T> < left) {
      uint32_t* o = reinterpret_cast<uint32_t*>(&out);
      float acc[8];  // 3D linear: the first slice's value, in fp32 until both slices are blended
#pragma unroll
      for (int slice = 0; slice < (DIMS == 3 ? 2 : 1); ++slice) {
        uint4 v[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          v[s] = __ldg(reinterpret_cast<const uint4*>(base + off[s] + slice * slice1 + chunk * kChunkChannels<T>));
        }
        const uint32_t* p0 = reinterpret_cast<const uint32_t*>(&v[0]);
        const uint32_t* p1 = reinterpret_cast<const uint32_t*>(&v[1]);
        const uint32_t* p2 = reinterpret_cast<const uint32_t*>(&v[2]);
        const uint32_t* p3 = reinterpret_cast<const uint32_t*>(&v[3]);
        if (pc.mode == kMaxPool2) {  // exact in 16 bits: packed max, 3 instructions per channel pair
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const uint32_t m = max2_nan<T>(max2_nan<T>(p0[h], p1[h]), max2_nan<T>(p2[h], p3[h]));
            o[h] = slice == 0 ? m : max2_nan<T>(o[h], m);
          }
        } else {
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            float r[2];
#pragma unroll
            for (int half = 0; half < Pack<T>::kPerWord; ++half) {
              const float a = Pack<T>::get(p0[h], half), b = Pack<T>::get(p1[h], half);
              const float c = Pack<T>::get(p2[h], half), d = Pack<T>::get(p3[h], half);
              r[half] = wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * c + wx1 * d);  // sample_piece's expression
              if constexpr (DIMS == 3) {  // sample_piece_3d: t0 * slice i0 + t1 * slice i1
                if (slice == 0) acc[2 * h + half] = r[half];
                r[half] = wz0 * acc[2 * h + half] + wz1 * r[half];
              }
            }
            o[h] = Pack<T>::word(r);
          }
        }
      }
      (void)acc;
      (void)wz0;
    }
    *reinterpret_cast<uint4*>(a_stage_ptr + swizzle(tid, chunk)) = out;
  }
}

template <typename T, int BN, int KS, int DIMS>
UPF_TC_KERNEL fused_conv_fwd_tc_kernel(const UPF_TC_GRID_CONSTANT TcForwardParams prm) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kWarpsM = BN == 64 ? 2 : 4;  // BN 64: 2x2 warps of 64x32; BN 32: 4x1 warps of 32x32
  constexpr int kWarpsN = 4 / kWarpsM;
  constexpr int kWarpM = kBM / kWarpsM, kWarpN = BN / kWarpsN;
  constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;  // m16 and n8 tiles per warp
  constexpr int kAStage = kBM * kRowBytes, kBStage = BN * kRowBytes;
  constexpr int kPipeBytes = kStages * (kAStage + kBStage);
  constexpr int kOutBytes = kBM * BN * static_cast<int>(sizeof(T));
  UPF_TC_SHARED(smem, kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes);
  const uint32_t smem_base = smem_address(smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * BN;

  Row row;
  {
    const int m = m0 + tid;
    row.valid = m < prm.pixels;
    if constexpr (DIMS == 3) {
      decode_row<DIMS>(prm, row.valid ? m : 0, row);  // pixel 0 for rows past the end (never stored)
    } else {  // 2D: this form keeps !valid in a predicate across the main loop (1 instruction per trip)
      const int hw = prm.height * prm.width;
      row.n = row.valid ? m / hw : 0;
      const int r = m - row.n * hw;
      row.y = row.valid ? r / prm.width : 0;
      row.x = row.valid ? r - row.y * prm.width : 0;
      row.z = 0;
    }
  }

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // This thread's B rows (output channels), clamped to row 0 past C_out (then zero-filled).
  constexpr int kBRows = BN * 4 / kThreads;
  const T* w_rows[kBRows];
  bool b_ok[kBRows];
#pragma unroll
  for (int i = 0; i < kBRows; ++i) {
    const int co = n0 + (tid >> 2) + i * (kThreads / 4);
    b_ok[i] = co < prm.c_out;
    w_rows[i] = static_cast<const T*>(prm.weight) + (b_ok[i] ? co : 0) * prm.k_row + (tid & 3) * kChunkChannels<T>;
  }

  const int num_blocks = prm.blocks_per_tap * (DIMS == 3 ? KS * KS * KS : KS * KS);
  auto a_stage = [&](int s) { return smem_base + s * kAStage; };
  auto b_stage = [&](int s) { return smem_base + kStages * kAStage + s * kBStage; };
  Cursor cur{0, 0, 0, 0, 0};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_blocks) {
      load_block<T, BN, KS, DIMS>(prm, cur, row, a_stage(s), b_stage(s), smem + s * kAStage, w_rows, b_ok);
      advance<T, DIMS>(prm, cur, KS);
    }
    cp_async_commit();
  }

  // ldmatrix lane roles: A x4 = (rows 0-7 | 8-15) x (k 0-7 | 8-15); B x4 = (n 0-7, k 0-7 | 8-15),
  // (n 8-15, ...). Fragments 16 rows apart share the swizzle (it depends on row bits 1-2 only) and
  // the second k16 step is chunk + 2 = chunk ^ 2: one lane offset each, the rest are immediates.
  const uint32_t a_lane = swizzle(warp_m * kWarpM + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
  const uint32_t b_lane = swizzle(warp_n * kWarpN + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);

  int load_stage = kStages - 1, read_stage = 0;
#pragma unroll 1
  for (int kb = 0; kb < num_blocks; ++kb) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // block kb visible to all; everyone is done with the stage refilled below
    if (kb + kStages - 1 < num_blocks) {
      load_block<T, BN, KS, DIMS>(prm, cur, row, a_stage(load_stage), b_stage(load_stage),
                                  smem + load_stage * kAStage, w_rows, b_ok);
      advance<T, DIMS>(prm, cur, KS);
    }
    cp_async_commit();
    load_stage = load_stage + 1 == kStages ? 0 : load_stage + 1;

    const uint32_t a_base = a_stage(read_stage), b_base = b_stage(read_stage);
    read_stage = read_stage + 1 == kStages ? 0 : read_stage + 1;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {  // two k16 steps per 32-channel block
      uint32_t a_frag[kMT][4], b_frag[kNT][2];
      const uint32_t a_k = a_base + (a_lane ^ (kk << 5)), b_k = b_base + (b_lane ^ (kk << 5));
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        ldmatrix_x4(a_k + i * 16 * kRowBytes, a_frag[i][0], a_frag[i][1], a_frag[i][2], a_frag[i][3]);
      }
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        ldmatrix_x4(b_k + j * 8 * kRowBytes, b_frag[j][0], b_frag[j][1], b_frag[j + 1][0], b_frag[j + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) Mma<T>::run(acc[i][j], a_frag[i], b_frag[j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused for the output tile

  // ---- epilogue: bias + activation in fp32, tile [kBM][BN] of T staged in shared memory.
  T* tile = reinterpret_cast<T*>(smem);
  const T* bias = static_cast<const T*>(prm.bias);
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int col = warp_n * kWarpN + j * 8 + q * 2;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      if (n0 + col < prm.c_out) b0 = Pack<T>::load(bias, n0 + col);
      if (n0 + col + 1 < prm.c_out) b1 = Pack<T>::load(bias, n0 + col + 1);
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp_m * kWarpM + i * 16 + g + half * 8;
        const float v0 = apply_activation<float>(acc[i][j][half * 2] + b0, prm.activation, prm.slope);
        const float v1 = apply_activation<float>(acc[i][j][half * 2 + 1] + b1, prm.activation, prm.slope);
        Pack<T>::store2(tile + r * BN + col, v0, v1);
      }
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(prm.out);
  if (prm.out_vectorized) {  // channels_last, C_out a multiple of a 16-byte chunk: 16-byte rows
    constexpr int kChunks = BN / kChunkChannels<T>;
#pragma unroll 1
    for (int idx = tid; idx < kBM * kChunks; idx += kThreads) {
      const int r = idx / kChunks, chunk = idx - r * kChunks;
      const int m = m0 + r, co = n0 + chunk * kChunkChannels<T>;
      if (m >= prm.pixels || co >= prm.c_out) continue;
      Row px;
      decode_row<DIMS>(prm, m, px);
      int64_t off = px.n * prm.out_stride_n + px.y * prm.out_stride_h + px.x * prm.out_stride_w + co;
      if constexpr (DIMS == 3) off += px.z * prm.out_stride_d;
      *reinterpret_cast<uint4*>(out + off) = *reinterpret_cast<const uint4*>(tile + r * BN + chunk * kChunkChannels<T>);
    }
  } else {  // any strides: consecutive threads along pixels (coalesced for NCHW)
#pragma unroll 1
    for (int idx = tid; idx < kBM * BN; idx += kThreads) {
      const int col = idx / kBM, r = idx - col * kBM;
      const int m = m0 + r, co = n0 + col;
      if (m >= prm.pixels || co >= prm.c_out) continue;
      Row px;
      decode_row<DIMS>(prm, m, px);
      int64_t off = px.n * prm.out_stride_n + static_cast<int64_t>(co) * prm.out_stride_c +
                    px.y * prm.out_stride_h + px.x * prm.out_stride_w;
      if constexpr (DIMS == 3) off += px.z * prm.out_stride_d;
      out[off] = tile[r * BN + col];
    }
  }
#else
  __trap();  // tensor-core kernels need sm_80 or newer
#endif
}

#include "fused_conv_tc_halo.cuh"

// Element `index` of the packed weight [C_out][taps][Kp] reads weight element `return` of
// [C_out][C_in][taps], or is padding (-1). Shared by the pack kernel and the CPU twin.
UPF_HD int64_t packed_weight_source(const TcForwardParams& prm, int64_t index) {
  const int64_t co = index / prm.k_row;
  const int r = static_cast<int>(index - co * prm.k_row);
  const int tap = r / prm.k_packed, j = r - tap * prm.k_packed;
  int p = 0;
  while (p + 1 < prm.num_pieces && j >= prm.pieces[p + 1].packed_offset) ++p;
  const int c = j - prm.pieces[p].packed_offset;
  if (c >= prm.pieces[p].channels) return -1;
  return (co * prm.c_in + prm.pieces[p].channel_offset + c) * prm.taps + tap;
}

#if !defined(UPF_TC_TWIN)
template <typename T>
__global__ void pack_weight_kernel(const __grid_constant__ TcForwardParams prm) {
  const int64_t total = static_cast<int64_t>(prm.c_out) * prm.k_row;
  const T* src = static_cast<const T*>(prm.weight_src);
  T* dst = static_cast<T*>(const_cast<void*>(prm.weight));
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t from = packed_weight_source(prm, i);
    dst[i] = from < 0 ? Pack<T>::zero() : Pack<T>::weight(src[from]);
  }
}
#endif

template <typename T>
void pack_weight(const TcForwardParams& prm, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(prm.c_out) * prm.k_row;
#if defined(UPF_TC_TWIN)
  (void)stream;
  const T* src = static_cast<const T*>(prm.weight_src);
  T* dst = static_cast<T*>(const_cast<void*>(prm.weight));
  for (int64_t i = 0; i < total; ++i) {
    const int64_t from = packed_weight_source(prm, i);
    dst[i] = from < 0 ? Pack<T>::zero() : Pack<T>::weight(src[from]);
  }
#else
  const int64_t blocks = (total + 255) / 256;
  pack_weight_kernel<T><<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(prm);
#endif
}

template <typename T, int BN, int KS, int DIMS>
void launch(const TcForwardParams& prm, cudaStream_t stream) {
  const unsigned grid_x = static_cast<unsigned>((prm.pixels + kBM - 1) / kBM);
  const unsigned grid_y = static_cast<unsigned>((prm.c_out + BN - 1) / BN);
#if defined(UPF_TC_TWIN)
  (void)stream;  // the CPU twin: CTAs one after another, one std::thread per CUDA thread
  constexpr size_t kOut = kBM * BN * sizeof(T);
  constexpr size_t kSmem = kStages * (kBM + BN) * kRowBytes > kOut ? kStages * (kBM + BN) * kRowBytes : kOut;
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      twin::Block cta(kThreads, kSmem);
      cta.bx = bx;
      cta.by = by;
      std::vector<std::thread> threads;
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&cta, &prm, t] {
          twin::block = &cta;
          twin::thread_id = static_cast<unsigned>(t);
          fused_conv_fwd_tc_kernel<T, BN, KS, DIMS>(prm);
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
#else
  fused_conv_fwd_tc_kernel<T, BN, KS, DIMS><<<dim3(grid_x, grid_y), kThreads, 0, stream>>>(prm);
#endif
}

template <typename T, int BN, int PAIRS>
void launch_halo(const TcForwardParams& prm, cudaStream_t stream) {
  const int batch = prm.pixels / (prm.height * prm.width);
  const unsigned grid_x = static_cast<unsigned>(halo_image_groups(batch, PAIRS == 2) * halo_tiles_y(prm.height) *
                                                halo_tiles_x(prm.width, PAIRS == 2));
  const unsigned grid_y = static_cast<unsigned>((prm.c_out + BN - 1) / BN);
  constexpr int kSmem = HaloSmem<T, BN>::kTotal;
#if defined(UPF_TC_TWIN)
  (void)stream;
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      twin::Block cta(kThreads, kSmem);
      cta.bx = bx;
      cta.by = by;
      std::vector<std::thread> threads;
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&cta, &prm, t] {
          twin::block = &cta;
          twin::thread_id = static_cast<unsigned>(t);
          fused_conv_fwd_tc_halo_kernel<T, BN, PAIRS>(prm);
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
#else
  // Over 48 KB of dynamic shared memory (two stages): an opt-in per kernel and device, made once
  // (its error, if any, is what the caller's cudaGetLastError reports).
  if (ensure_dynamic_smem<fused_conv_fwd_tc_halo_kernel<T, BN, PAIRS>>(kSmem) != cudaSuccess) {
    return;
  }
  fused_conv_fwd_tc_halo_kernel<T, BN, PAIRS><<<dim3(grid_x, grid_y), kThreads, kSmem, stream>>>(prm);
#endif
}

// -1 / 1: the halo kernel wherever it applies; 0: never (set by the twin's tests only).
#if defined(UPF_TC_TWIN)
int halo_policy = -1;
int last_was_halo = -1;  // which kernel the last launch ran (the twin's tests check the choice)
#else
constexpr int halo_policy = -1;
#endif

// The halo kernel takes 2D k = 3 calls whose pieces are all 16-byte vectorised (channels_last,
// C % 8 == 0) or `none` (any layout: staged element by element). Also on small images (6 x 6: 72%
// of its 8 x 16 block is padding): by the static model it still beats the linear kernel there,
// whose few CTAs re-blend every tap. Keep in step: static_kernels.cuda_halo_applies.
bool halo_applies(const TcForwardParams& prm, int k, bool volume) {
  if (volume || k != 3 || halo_policy == 0) return false;
  for (int p = 0; p < prm.num_pieces; ++p) {
    if (!prm.pieces[p].vectorized && prm.pieces[p].mode != kResampleNone) return false;
  }
#if !defined(UPF_TC_TWIN)
  // Its two stages need up to 100 KB of shared memory per block: more than some GPUs (sm_86 / sm_89:
  // 99 KB) allow. There the linear kernel runs.
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return false;
  }
  if (optin < HaloSmem<float, 64>::kTotal) return false;  // the largest of the types
#endif
  return true;
}

template <typename T, int DIMS>
void dispatch_dims(const TcForwardParams& prm, int k, cudaStream_t stream) {  // keep in step: static_kernels.cuda_select
  const bool narrow = prm.c_out <= 32;  // UNet++ level 0: C_out = 32 would waste half of a 64-wide tile
  if (k == 3) {
    narrow ? launch<T, 32, 3, DIMS>(prm, stream) : launch<T, 64, 3, DIMS>(prm, stream);
  } else {
    narrow ? launch<T, 32, 1, DIMS>(prm, stream) : launch<T, 64, 1, DIMS>(prm, stream);
  }
}

template <typename T>
void dispatch(const TcForwardParams& prm, int k, bool volume, cudaStream_t stream) {
  pack_weight<T>(prm, stream);
  const bool halo = halo_applies(prm, k, volume);
#if defined(UPF_TC_TWIN)
  last_was_halo = halo ? 1 : 0;
#endif
  if (halo) {
    // Paired narrow images take BN 32: twice the CTAs of a grid that is small (6 x 6 x 16 images:
    // 8 blocks) and would leave SMs idle. Keep in step: static_kernels.cuda_select.
    if (halo_paired(prm.width)) {
      launch_halo<T, 32, 2>(prm, stream);
    } else {
      prm.c_out <= 32 ? launch_halo<T, 32, 1>(prm, stream) : launch_halo<T, 64, 1>(prm, stream);
    }
    return;
  }
  volume ? dispatch_dims<T, 3>(prm, k, stream) : dispatch_dims<T, 2>(prm, k, stream);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Largest element offset a piece can be read at, + 1 (strides are non-negative in PyTorch here).
int64_t span(const PieceDesc& d, int batch) {
  return (batch - 1) * d.stride_n + (d.channels - 1) * d.stride_c + (d.depth - 1) * d.stride_d +
         (d.height - 1) * d.stride_h + (d.width - 1) * d.stride_w + 1;
}

constexpr int64_t kMaxOffset = (int64_t{1} << 31) - 1;

}  // namespace

// Channels per K block of the data type (kBK<T>).
int block_channels(DType dtype) { return dtype == DType::kFloat32 ? kBK<float> : kBK<__nv_bfloat16>; }

int tc_packed_row_length(const VirtualInput& input, DType dtype) {
  const int bk = block_channels(dtype);
  int kp = 0;
  for (int p = 0; p < input.num_pieces; ++p) kp += (input.pieces[p].channels + bk - 1) / bk * bk;
  return kp;
}

bool tc_forward_enabled() {
  const char* legacy = std::getenv("UNETPP_FAST_CUDA_LEGACY_FORWARD");
  return legacy == nullptr || legacy[0] == '\0' || legacy[0] == '0';
}

cudaError_t launch_fused_conv_forward_tc(const ConvForwardParams& prm, void* workspace, DType dtype,
                                         cudaStream_t stream) {
  if (prm.k != 1 && prm.k != 3) return cudaErrorInvalidValue;
  const int bk = block_channels(dtype);
  const int chunk = bk / 4;  // elements per 16-byte chunk
  const VirtualInput& v = prm.input;
  const bool volume = is_volume(v);
  const int taps = volume ? prm.k * prm.k * prm.k : prm.k * prm.k;
  TcForwardParams tc{};
  int offset = 0, blocks = 0;
  for (int p = 0; p < v.num_pieces; ++p) {
    const PieceDesc& d = v.pieces[p];
    if (d.stride_n < 0 || d.stride_c < 0 || d.stride_d < 0 || d.stride_h < 0 || d.stride_w < 0 ||
        span(d, prm.batch) > kMaxOffset) {
      return cudaErrorNotSupported;
    }
    TcPiece& t = tc.pieces[p];
    t.data = d.data;
    t.stride_n = static_cast<int>(d.stride_n);
    t.stride_c = static_cast<int>(d.stride_c);
    t.stride_h = static_cast<int>(d.stride_h);
    t.stride_w = static_cast<int>(d.stride_w);
    t.channels = d.channels;
    t.height = d.height;
    t.width = d.width;
    TcPieceDepth& td = tc.depths[p];
    td.stride_d = static_cast<int>(d.stride_d);
    td.depth = d.depth;
    t.mode = d.mode;
    t.channel_blocks = (d.channels + bk - 1) / bk;
    t.channel_offset = d.channel_offset;
    // The shared header's scale, computed once here: (in - 1) / (out - 1) for align_corners, else 1/2.
    auto scale = [&](int in, int out) { return bilinear_scale<float>(in, out, d.mode == kUpBilinearAC); };
    t.scale_h = scale(d.height, v.height);
    t.scale_w = scale(d.width, v.width);
    td.scale_d = scale(d.depth, v.depth);
    t.packed_offset = offset;
    // 16-byte chunks (8 channels; 4 in fp32): channels_last with aligned base and strides.
    t.vectorized = d.stride_c == 1 && d.channels % chunk == 0 && aligned16(d.data) && d.stride_n % chunk == 0 &&
                   d.stride_d % chunk == 0 && d.stride_h % chunk == 0 && d.stride_w % chunk == 0;
    offset += t.channel_blocks * bk;
    blocks += t.channel_blocks;
  }
  if (static_cast<int64_t>(prm.c_out) * offset * taps > kMaxOffset) return cudaErrorNotSupported;
  tc.num_pieces = v.num_pieces;
  tc.blocks_per_tap = blocks;
  tc.k_packed = offset;
  tc.k_row = offset * taps;
  tc.depth = volume ? v.depth : 1;
  tc.height = v.height;
  tc.width = v.width;
  tc.pixels = prm.batch * tc.depth * v.height * v.width;
  tc.c_out = prm.c_out;
  tc.c_in = v.channels;
  tc.taps = taps;
  tc.weight = workspace;
  tc.weight_src = prm.weight;
  tc.bias = prm.bias;
  tc.out = prm.out;
  tc.out_stride_n = prm.out_stride_n;
  tc.out_stride_c = prm.out_stride_c;
  tc.out_stride_h = prm.out_stride_h;
  tc.out_stride_w = prm.out_stride_w;
  tc.out_stride_d = volume ? prm.out_stride_d : 0;
  tc.out_vectorized = prm.out_stride_c == 1 && prm.c_out % chunk == 0 && aligned16(prm.out) &&
                      prm.out_stride_n % chunk == 0 && tc.out_stride_d % chunk == 0 &&
                      prm.out_stride_h % chunk == 0 && prm.out_stride_w % chunk == 0;
  tc.activation = prm.activation;
  tc.slope = prm.slope;
  if (tc.pixels == 0 || blocks == 0) return cudaErrorInvalidValue;
#if defined(UPF_TC_TWIN)
  // The twin emulates the bf16 and TF32 MMAs (fp16 differs from bf16 in rounding alone).
  if (dtype == DType::kFloat16) return cudaErrorNotSupported;
  dtype == DType::kFloat32 ? dispatch<float>(tc, prm.k, volume, stream)
                           : dispatch<__nv_bfloat16>(tc, prm.k, volume, stream);
  return cudaSuccess;
#else
  if (dtype == DType::kBFloat16) {
    dispatch<__nv_bfloat16>(tc, prm.k, volume, stream);
  } else if (dtype == DType::kFloat16) {
    dispatch<__half>(tc, prm.k, volume, stream);
  } else {
    dispatch<float>(tc, prm.k, volume, stream);
  }
  return cudaGetLastError();
#endif
}

#if defined(UPF_TC_TWIN)
// C entries of the CPU twin for tests (ctypes). The nd entry: `dims` 2 or 3, per piece 5 strides
// (n, c, d, h, w; d ignored in 2D) and 4 sizes (c, d, h, w; d = 1 in 2D), output strides likewise.
// `dtype`: DType (0 fp32 on TF32, 2 bf16).
extern "C" int upf_tc_twin_forward_nd(int dtype, int dims, int num_pieces, const void* const* data,
                                      const int64_t* strides, const int* cdhw, const int* modes, int batch, int out_d,
                                      int out_h, int out_w, const void* weight, void* workspace, const void* bias,
                                      int c_out, int k, void* out, const int64_t* out_strides, int activation,
                                      float slope) {
  ConvForwardParams prm{};
  VirtualInput& v = prm.input;
  v.num_pieces = num_pieces;
  int offset = 0;
  for (int p = 0; p < num_pieces; ++p) {
    PieceDesc& d = v.pieces[p];
    d.data = data[p];
    d.stride_n = strides[5 * p];
    d.stride_c = strides[5 * p + 1];
    d.stride_d = dims == 3 ? strides[5 * p + 2] : 0;
    d.stride_h = strides[5 * p + 3];
    d.stride_w = strides[5 * p + 4];
    d.channels = cdhw[4 * p];
    d.depth = dims == 3 ? cdhw[4 * p + 1] : 1;
    d.height = cdhw[4 * p + 2];
    d.width = cdhw[4 * p + 3];
    d.resample_depth = dims == 3;
    d.channel_offset = offset;
    d.mode = modes[p];
    offset += d.channels;
  }
  v.channels = offset;
  v.depth = dims == 3 ? out_d : 1;
  v.height = out_h;
  v.width = out_w;
  prm.weight = weight;
  prm.bias = bias;
  prm.out = out;
  prm.out_stride_n = out_strides[0];
  prm.out_stride_c = out_strides[1];
  prm.out_stride_d = dims == 3 ? out_strides[2] : 0;
  prm.out_stride_h = out_strides[3];
  prm.out_stride_w = out_strides[4];
  prm.batch = batch;
  prm.c_out = c_out;
  prm.k = k;
  prm.activation = activation;
  prm.slope = slope;
  return static_cast<int>(launch_fused_conv_forward_tc(prm, workspace, static_cast<DType>(dtype), nullptr));
}

extern "C" int upf_tc_twin_forward_bf16_nd(int dims, int num_pieces, const void* const* data, const int64_t* strides,
                                           const int* cdhw, const int* modes, int batch, int out_d, int out_h,
                                           int out_w, const void* weight, void* workspace, const void* bias,
                                           int c_out, int k, void* out, const int64_t* out_strides, int activation,
                                           float slope) {
  return upf_tc_twin_forward_nd(static_cast<int>(DType::kBFloat16), dims, num_pieces, data, strides, cdhw, modes,
                                batch, out_d, out_h, out_w, weight, workspace, bias, c_out, k, out, out_strides,
                                activation, slope);
}

// Which forward kernel the launcher picks for 2D k = 3 calls: 0 the linear kernel, else the halo
// kernel wherever it applies (every piece vectorised).
extern "C" void upf_tc_twin_set_halo_policy(int policy) { halo_policy = policy; }
// 1 when the last forward ran the halo kernel, 0 the linear one, -1 none yet.
extern "C" int upf_tc_twin_last_was_halo() { return last_was_halo; }

// The 2D entry: strides 4 per piece (n, c, h, w), sizes 3 (c, h, w).
extern "C" int upf_tc_twin_forward(int dtype, int num_pieces, const void* const* data, const int64_t* strides,
                                   const int* chw, const int* modes, int batch, int out_h, int out_w,
                                   const void* weight, void* workspace, const void* bias, int c_out, int k, void* out,
                                   const int64_t* out_strides, int activation, float slope) {
  int64_t strides5[5 * kMaxPieces];
  int cdhw[4 * kMaxPieces];
  if (num_pieces < 1 || num_pieces > kMaxPieces) return static_cast<int>(cudaErrorInvalidValue);
  for (int p = 0; p < num_pieces; ++p) {
    const int64_t s[5] = {strides[4 * p], strides[4 * p + 1], 0, strides[4 * p + 2], strides[4 * p + 3]};
    const int c[4] = {chw[3 * p], 1, chw[3 * p + 1], chw[3 * p + 2]};
    for (int i = 0; i < 5; ++i) strides5[5 * p + i] = s[i];
    for (int i = 0; i < 4; ++i) cdhw[4 * p + i] = c[i];
  }
  const int64_t out5[5] = {out_strides[0], out_strides[1], 0, out_strides[2], out_strides[3]};
  return upf_tc_twin_forward_nd(dtype, 2, num_pieces, data, strides5, cdhw, modes, batch, 1, out_h, out_w, weight,
                                workspace, bias, c_out, k, out, out5, activation, slope);
}

extern "C" int upf_tc_twin_forward_bf16(int num_pieces, const void* const* data, const int64_t* strides,
                                        const int* chw, const int* modes, int batch, int out_h, int out_w,
                                        const void* weight, void* workspace, const void* bias, int c_out, int k,
                                        void* out, const int64_t* out_strides, int activation, float slope) {
  return upf_tc_twin_forward(static_cast<int>(DType::kBFloat16), num_pieces, data, strides, chw, modes, batch, out_h,
                             out_w, weight, workspace, bias, c_out, k, out, out_strides, activation, slope);
}
#endif

}  // namespace cuda
}  // namespace unetpp_fast
