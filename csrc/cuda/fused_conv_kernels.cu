// CUDA kernels of the fused convolution (torch-free: CUDA headers only, compiles in seconds).
//
// Forward = implicit GEMM  out[m, co] = sum_k A[m, k] * Wt[k, co]  with
//   m = (n, y, x) output pixel, k = (c, ky, kx), A[m, k] = virtual[n, c, y + ky - pad, x + kx - pad]
// where the virtual input is sampled through each piece's resample in the tile loader, never stored.
// 3D (DIMS = 3): m = (n, z, y, x), k = (c, kz, ky, kx); 2D is the DIMS = 2 instance of the same code.
//   fp16 / bf16: tensor cores (WMMA 16x16x16, fp32 accumulation), 64x64x32 tiles, 4 warps.
//   fp32:        SIMT FMA, 64x64x16 tiles, 256 threads with 4x4 outputs each (exact fp32, no TF32).
// Both prefetch the next K slice into registers while the current one is multiplied, and apply
// bias + activation in the epilogue, writing NCHW or channels_last through the output strides.
// Element offsets are 64-bit; pixel and K indices are 32-bit (the launcher's caller checks M < 2^31).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "../build_registry.h"
#include "fused_conv_kernels.h"

namespace unetpp_fast {
namespace cuda {
namespace {

const KernelRegistrar kFwdF16("cuda:fused_conv_fwd_wmma_f16");
const KernelRegistrar kFwdBf16("cuda:fused_conv_fwd_wmma_bf16");
const KernelRegistrar kFwdF32("cuda:fused_conv_fwd_simt_f32");
const KernelRegistrar kGather("cuda:gather_virtual_input");

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Where an output pixel sits.
struct Pixel {
  int n, z, y, x;  // z = 0 in 2D
  bool valid;
};

template <int DIMS>
__device__ __forceinline__ Pixel decode_pixel(int m, int M, int D, int H, int W) {
  Pixel p{0, 0, 0, 0, m < M};
  if (p.valid) {
    const int hw = H * W;
    int r;
    if constexpr (DIMS == 3) {
      p.n = m / (D * hw);
      r = m - p.n * D * hw;
      p.z = r / hw;
      r -= p.z * hw;
    } else {
      p.n = m / hw;
      r = m - p.n * hw;
    }
    p.y = r / W;
    p.x = r - p.y * W;
  }
  return p;
}

template <int KS, int DIMS>
constexpr int kTapsOf = DIMS == 3 ? KS * KS * KS : KS * KS;

// A[m, kidx] of the implicit GEMM, read through the resamples (0 outside the image / the matrix).
template <typename T, int KS, int DIMS>
__device__ __forceinline__ float load_a(const VirtualInput& v, const Pixel& px, int kidx, int K) {
  if (!px.valid || kidx >= K) return 0.f;
  constexpr int kTaps = kTapsOf<KS, DIMS>, kPad = KS / 2;
  const int c = kidx / kTaps;
  const int tap = kidx - c * kTaps;
  const int kz = tap / (KS * KS), t2 = tap - kz * KS * KS;  // kz = 0 in 2D
  const int ky = t2 / KS, kx = t2 - ky * KS;
  const auto load = [&](int p, int64_t off) { return to_float(static_cast<const T*>(v.pieces[p].data)[off]); };
  if constexpr (DIMS == 3) {
    return sample_virtual_3d<float>(v, px.n, c, px.z + kz - kPad, px.y + ky - kPad, px.x + kx - kPad, load);
  } else {
    return sample_virtual<float>(v, px.n, c, px.y + ky - kPad, px.x + kx - kPad, load);
  }
}

__device__ __forceinline__ int64_t out_offset(const ConvForwardParams& prm, const Pixel& px, int co) {
  return px.n * prm.out_stride_n + static_cast<int64_t>(co) * prm.out_stride_c + px.z * prm.out_stride_d +
         px.y * prm.out_stride_h + px.x * prm.out_stride_w;
}

template <typename T>
__device__ __forceinline__ void store_output(const ConvForwardParams& prm, const Pixel& px, int co, float acc) {
  if (prm.bias != nullptr) acc += to_float(static_cast<const T*>(prm.bias)[co]);
  acc = apply_activation<float>(acc, prm.activation, prm.slope);
  static_cast<T*>(prm.out)[out_offset(prm, px, co)] = from_float<T>(acc);
}

// ---------------------------------------------------------------- tensor cores (fp16 / bf16)
constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32, kTcThreads = 128;
constexpr int kTcLdA = kTcBK + 8, kTcLdB = kTcBK + 8, kTcLdC = kTcBN + 4;  // WMMA ldm: multiples of 16 bytes
constexpr int kTcAPerThread = kTcBM * kTcBK / kTcThreads;                   // 16
constexpr int kTcBPerThread = kTcBN * kTcBK / kTcThreads;                   // 16
constexpr int kTcInputBytes = (kTcBM * kTcLdA + kTcBN * kTcLdB) * 2;
constexpr int kTcOutputBytes = kTcBM * kTcLdC * 4;
constexpr int kTcSmemBytes = kTcInputBytes > kTcOutputBytes ? kTcInputBytes : kTcOutputBytes;

template <typename T, int KS, int DIMS>
__global__ void __launch_bounds__(kTcThreads)
    fused_conv_fwd_wmma_kernel(const __grid_constant__ ConvForwardParams prm) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[kTcSmemBytes];
  T* As = reinterpret_cast<T*>(smem);     // [BM][LdA]: pixel-major, k contiguous
  T* Bs = As + kTcBM * kTcLdA;            // [BN][LdB]: out-channel-major, k contiguous
  float* Cs = reinterpret_cast<float*>(smem);  // [BM][LdC], reused after the main loop

  const VirtualInput& v = prm.input;
  const int M = prm.batch * v.depth * v.height * v.width;
  const int K = v.channels * kTapsOf<KS, DIMS>;
  const int m0 = blockIdx.x * kTcBM, n0 = blockIdx.y * kTcBN;
  const int tid = threadIdx.x;
  const T* weight = static_cast<const T*>(prm.weight);

  // Each thread loads A for one fixed pixel (consecutive threads: consecutive pixels, coalesced
  // on NCHW) and B for one fixed k (consecutive threads: consecutive k of a weight row).
  const int a_row = tid % kTcBM, a_col0 = tid / kTcBM;
  const Pixel px = decode_pixel<DIMS>(m0 + a_row, M, v.depth, v.height, v.width);
  const int b_col = tid % kTcBK, b_row0 = tid / kTcBK;
  constexpr int kAStep = kTcThreads / kTcBM, kBStep = kTcThreads / kTcBK;

  T a_reg[kTcAPerThread], b_reg[kTcBPerThread];
  auto load_tiles = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kTcAPerThread; ++i) {
      a_reg[i] = from_float<T>(load_a<T, KS, DIMS>(v, px, k0 + a_col0 + kAStep * i, K));
    }
#pragma unroll
    for (int i = 0; i < kTcBPerThread; ++i) {
      const int co = n0 + b_row0 + kBStep * i, kidx = k0 + b_col;
      b_reg[i] = (co < prm.c_out && kidx < K) ? weight[static_cast<int64_t>(co) * K + kidx] : from_float<T>(0.f);
    }
  };

  const int warp = tid / 32, warp_m = warp % 2, warp_n = warp / 2;  // 2x2 warps, 32x32 each
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  load_tiles(0);
  for (int k0 = 0; k0 < K; k0 += kTcBK) {
#pragma unroll
    for (int i = 0; i < kTcAPerThread; ++i) As[a_row * kTcLdA + a_col0 + kAStep * i] = a_reg[i];
#pragma unroll
    for (int i = 0; i < kTcBPerThread; ++i) Bs[(b_row0 + kBStep * i) * kTcLdB + b_col] = b_reg[i];
    __syncthreads();
    if (k0 + kTcBK < K) load_tiles(k0 + kTcBK);  // global loads in flight during the MMAs
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], As + (warp_m * 32 + i * 16) * kTcLdA + kk, kTcLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], Bs + (warp_n * 32 + j * 16) * kTcLdB + kk, kTcLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (warp_m * 32 + i * 16) * kTcLdC + warp_n * 32 + j * 16, acc[i][j], kTcLdC,
                              wmma::mem_row_major);
  __syncthreads();

  // Consecutive threads write consecutive addresses: along pixels for NCHW, channels for NHWC.
  const bool channels_last = prm.out_stride_c == 1;
  for (int idx = tid; idx < kTcBM * kTcBN; idx += kTcThreads) {
    const int row = channels_last ? idx / kTcBN : idx % kTcBM;
    const int col = channels_last ? idx % kTcBN : idx / kTcBM;
    const int co = n0 + col;
    const Pixel out_px = decode_pixel<DIMS>(m0 + row, M, v.depth, v.height, v.width);
    if (out_px.valid && co < prm.c_out) store_output<T>(prm, out_px, co, Cs[row * kTcLdC + col]);
  }
#else
  __trap();  // tensor-core kernels need sm_80 or newer
#endif
}

// ---------------------------------------------------------------- SIMT (fp32)
constexpr int kSBM = 64, kSBN = 64, kSBK = 16, kSThreads = 256;
constexpr int kSAPerThread = kSBM * kSBK / kSThreads;  // 4
constexpr int kSBPerThread = kSBN * kSBK / kSThreads;  // 4

template <int KS, int DIMS>
__global__ void __launch_bounds__(kSThreads) fused_conv_fwd_simt_kernel(const __grid_constant__ ConvForwardParams prm) {
  __shared__ float As[kSBK][kSBM];
  __shared__ float Bs[kSBK][kSBN + 1];  // +1: the k-strided stores hit distinct banks

  const VirtualInput& v = prm.input;
  const int M = prm.batch * v.depth * v.height * v.width;
  const int K = v.channels * kTapsOf<KS, DIMS>;
  const int m0 = blockIdx.x * kSBM, n0 = blockIdx.y * kSBN;
  const int tid = threadIdx.x;
  const float* weight = static_cast<const float*>(prm.weight);

  const int a_row = tid % kSBM, a_k0 = tid / kSBM;
  const Pixel px = decode_pixel<DIMS>(m0 + a_row, M, v.depth, v.height, v.width);
  const int b_k = tid % kSBK, b_co0 = tid / kSBK;
  constexpr int kAStep = kSThreads / kSBM, kBStep = kSThreads / kSBK;

  float a_reg[kSAPerThread], b_reg[kSBPerThread];
  auto load_tiles = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kSAPerThread; ++i) a_reg[i] = load_a<float, KS, DIMS>(v, px, k0 + a_k0 + kAStep * i, K);
#pragma unroll
    for (int i = 0; i < kSBPerThread; ++i) {
      const int co = n0 + b_co0 + kBStep * i, kidx = k0 + b_k;
      b_reg[i] = (co < prm.c_out && kidx < K) ? weight[static_cast<int64_t>(co) * K + kidx] : 0.f;
    }
  };

  // Thread (tx, ty) owns pixels tx + 16 i and channels ty + 16 j.
  const int tx = tid % 16, ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  load_tiles(0);
  for (int k0 = 0; k0 < K; k0 += kSBK) {
#pragma unroll
    for (int i = 0; i < kSAPerThread; ++i) As[a_k0 + kAStep * i][a_row] = a_reg[i];
#pragma unroll
    for (int i = 0; i < kSBPerThread; ++i) Bs[b_k][b_co0 + kBStep * i] = b_reg[i];
    __syncthreads();
    if (k0 + kSBK < K) load_tiles(k0 + kSBK);
#pragma unroll
    for (int kk = 0; kk < kSBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][tx + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][ty + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const Pixel out_px = decode_pixel<DIMS>(m0 + tx + 16 * i, M, v.depth, v.height, v.width);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int co = n0 + ty + 16 * j;
      if (out_px.valid && co < prm.c_out) store_output<float>(prm, out_px, co, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------- virtual input rebuild (backward)
struct GatherParams {
  VirtualInput input;
  void* out;
  int64_t stride_n, stride_c, stride_h, stride_w, stride_d;
  int batch;
  bool channels_last;  // walk memory order (n, (z,) y, x, c) instead of (n, c, (z,) y, x)
};

// One code path for 2D and 3D: a 2D call is depth 1 (z = 0, stride_d unused, no depth resample).
template <typename T>
__global__ void gather_virtual_input_kernel(const __grid_constant__ GatherParams g) {
  const VirtualInput& v = g.input;
  const int64_t C = v.channels, D = v.depth, H = v.height, W = v.width;
  const int64_t total = g.batch * C * D * H * W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, z, y, x;
    if (g.channels_last) {
      c = i % C;
      x = (i / C) % W;
      y = (i / (C * W)) % H;
      z = (i / (C * W * H)) % D;
      n = i / (C * W * H * D);
    } else {
      x = i % W;
      y = (i / W) % H;
      z = (i / (W * H)) % D;
      c = (i / (W * H * D)) % C;
      n = i / (W * H * D * C);
    }
    const float value = sample_virtual_3d<float>(
        v, n, static_cast<int>(c), static_cast<int>(z), static_cast<int>(y), static_cast<int>(x),
        [&](int p, int64_t off) { return to_float(static_cast<const T*>(v.pieces[p].data)[off]); });
    static_cast<T*>(g.out)[n * g.stride_n + c * g.stride_c + z * g.stride_d + y * g.stride_h + x * g.stride_w] =
        from_float<T>(value);
  }
}

template <typename T, int KS, int DIMS>
void launch_wmma(const ConvForwardParams& prm, cudaStream_t stream) {
  const int64_t M = static_cast<int64_t>(prm.batch) * prm.input.depth * prm.input.height * prm.input.width;
  const dim3 grid(static_cast<unsigned>((M + kTcBM - 1) / kTcBM), static_cast<unsigned>((prm.c_out + kTcBN - 1) / kTcBN));
  fused_conv_fwd_wmma_kernel<T, KS, DIMS><<<grid, kTcThreads, 0, stream>>>(prm);
}

template <int KS, int DIMS>
void launch_simt(const ConvForwardParams& prm, cudaStream_t stream) {
  const int64_t M = static_cast<int64_t>(prm.batch) * prm.input.depth * prm.input.height * prm.input.width;
  const dim3 grid(static_cast<unsigned>((M + kSBM - 1) / kSBM), static_cast<unsigned>((prm.c_out + kSBN - 1) / kSBN));
  fused_conv_fwd_simt_kernel<KS, DIMS><<<grid, kSThreads, 0, stream>>>(prm);
}

template <typename T>
void launch_gather(const GatherParams& g, cudaStream_t stream) {
  const int64_t total =
      static_cast<int64_t>(g.batch) * g.input.channels * g.input.depth * g.input.height * g.input.width;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);
  gather_virtual_input_kernel<T><<<grid, threads, 0, stream>>>(g);
}

template <int DIMS>
cudaError_t launch_forward_dims(const ConvForwardParams& prm, DType dtype, cudaStream_t stream) {
  const bool k3 = prm.k == 3;
  switch (dtype) {
    case DType::kFloat16:
      k3 ? launch_wmma<__half, 3, DIMS>(prm, stream) : launch_wmma<__half, 1, DIMS>(prm, stream);
      break;
    case DType::kBFloat16:
      k3 ? launch_wmma<__nv_bfloat16, 3, DIMS>(prm, stream) : launch_wmma<__nv_bfloat16, 1, DIMS>(prm, stream);
      break;
    case DType::kFloat32:
      k3 ? launch_simt<3, DIMS>(prm, stream) : launch_simt<1, DIMS>(prm, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_conv_forward(const ConvForwardParams& prm, DType dtype, cudaStream_t stream) {
  if (prm.k != 1 && prm.k != 3) return cudaErrorInvalidValue;
  return is_volume(prm.input) ? launch_forward_dims<3>(prm, dtype, stream) : launch_forward_dims<2>(prm, dtype, stream);
}

cudaError_t launch_gather_virtual_input(const VirtualInput& input, int batch, DType dtype, void* out,
                                        int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                                        int64_t stride_d, cudaStream_t stream) {
  GatherParams g{input,    out,   stride_n, stride_c, stride_h, stride_w, is_volume(input) ? stride_d : 0,
                 batch, stride_c == 1 && input.channels > 1};
  switch (dtype) {
    case DType::kFloat16:
      launch_gather<__half>(g, stream);
      break;
    case DType::kBFloat16:
      launch_gather<__nv_bfloat16>(g, stream);
      break;
    case DType::kFloat32:
      launch_gather<float>(g, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace unetpp_fast
