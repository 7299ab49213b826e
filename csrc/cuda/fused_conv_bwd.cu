// Fused backward kernels of the fused convolution (torch-free: CUDA headers only), 2D and 3D.
//
// One thread per result element, running the per-element arithmetic of fused_conv_bwd.h:
//   * dgrad: one launch per piece, a thread per element of the piece's gradient, written through
//     the piece's resample adjoint (no virtual input, no virtual-input gradient in memory);
//   * wgrad + bias grad: split-K over output pixels into an fp32 workspace [splits][C_out][cols],
//     then a reduction kernel summing the splits in index order (deterministic, no atomics).
// Status: SIMT (no tensor cores, no tiling): the arithmetic and the memory footprint of the fused
// route, not its speed; compiles for sm_80/sm_90, NOT yet run on a GPU. fused_conv_cuda.cpp runs it
// when UNETPP_FAST_CUDA_FUSED_BACKWARD=1 for the calls the tensor-core backward (fused_conv_bwd_tc.cu)
// does not take, or =simt for every call; the tensor-core backward also calls its per-piece kernel
// (launch_fused_conv_backward_piece) for a bilinear piece too large for its shared-memory tile.
//
// Compiled by a host compiler with -DUPF_BWD_TWIN it is the CPU twin: the same functions in fp64
// over every element (upf_bwd_twin_f64), for the parity tests.
#if !defined(UPF_BWD_TWIN)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../build_registry.h"
#include "fused_conv_bwd_launch.h"
#include "fused_conv_bwd_tc.h"
#endif
#include "fused_conv_bwd.h"

namespace unetpp_fast {
namespace cuda {

#if !defined(UPF_BWD_TWIN)
namespace {

const KernelRegistrar kBwdFused("cuda:fused_conv_bwd_simt");

template <typename T>
__device__ __forceinline__ float load_as_float(const void* base, int64_t off) {
  if constexpr (std::is_same<T, float>::value) {
    return static_cast<const float*>(base)[off];
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(static_cast<const __half*>(base)[off]);
  } else {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
  }
}

template <typename T>
__device__ __forceinline__ T store_from_float(float v) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

struct PieceGradOut {
  void* data;
  int64_t stride_n, stride_c, stride_d, stride_h, stride_w;
  int piece;
};

template <typename T>
__global__ void piece_grad_kernel(const __grid_constant__ BwdParams b, const __grid_constant__ PieceGradOut o) {
  const PieceDesc& d = b.input.pieces[o.piece];
  const int64_t D = d.depth, H = d.height, W = d.width, C = d.channels;
  const int64_t total = b.batch * C * D * H * W;
  const auto load_g = [&](int64_t off) { return load_as_float<T>(b.grad_pre, off); };
  const auto load_w = [&](int64_t off) { return load_as_float<T>(b.weight, off); };
  const auto load_piece = [&](int p, int64_t off) { return load_as_float<T>(b.input.pieces[p].data, off); };
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (n, z, y, x, c) with c fastest: neighbouring threads share the source pixel and its taps.
    const int64_t c = i % C, x = (i / C) % W, y = (i / (C * W)) % H, z = (i / (C * W * H)) % D, n = i / (C * W * H * D);
    const float g = piece_grad<float>(b, o.piece, n, static_cast<int>(c), static_cast<int>(z), static_cast<int>(y),
                                      static_cast<int>(x), load_piece, load_g, load_w);
    static_cast<T*>(o.data)[n * o.stride_n + c * o.stride_c + z * o.stride_d + y * o.stride_h + x * o.stride_w] =
        store_from_float<T>(g);
  }
}

template <typename T>
__global__ void weight_grad_partial_kernel(const __grid_constant__ BwdParams b, float* partial, int splits,
                                           int64_t chunk) {
  const int cols = b.input.channels * bwd_taps(b) + 1;  // + the bias column
  const int64_t total = static_cast<int64_t>(splits) * b.c_out * cols;
  const int64_t pixels = static_cast<int64_t>(b.batch) * b.input.depth * b.input.height * b.input.width;
  const auto load_g = [&](int64_t off) { return load_as_float<T>(b.grad_pre, off); };
  const auto load_piece = [&](int p, int64_t off) { return load_as_float<T>(b.input.pieces[p].data, off); };
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % cols), co = static_cast<int>((i / cols) % b.c_out);
    const int split = static_cast<int>(i / (static_cast<int64_t>(cols) * b.c_out));
    const int taps = bwd_taps(b);
    const int ci = col < cols - 1 ? col / taps : 0, tap = col < cols - 1 ? col % taps : taps;
    const int64_t begin = split * chunk, end = begin + chunk < pixels ? begin + chunk : pixels;
    partial[i] = weight_grad_partial<float>(b, co, ci, tap, begin, end, load_piece, load_g);
  }
}

// Sums the splits in index order: the same result on every run.
template <typename T>
__global__ void weight_grad_reduce_kernel(const float* partial, int splits, int c_out, int cols, void* grad_weight,
                                          void* grad_bias) {
  const int64_t total = static_cast<int64_t>(c_out) * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += partial[s * total + i];
    const int64_t co = i / cols, col = i % cols;
    if (col < cols - 1) {
      static_cast<T*>(grad_weight)[co * (cols - 1) + col] = store_from_float<T>(sum);
    } else if (grad_bias != nullptr) {
      static_cast<T*>(grad_bias)[co] = store_from_float<T>(sum);
    }
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return static_cast<unsigned>(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);
}

template <typename T>
void launch_piece(const BwdParams& b, const FusedBwdOutputs& out, int p, cudaStream_t stream) {
  const PieceDesc& d = b.input.pieces[p];
  const PieceGradOut o{out.grad_pieces[p], out.piece_strides[p][0], out.piece_strides[p][1],
                       out.piece_strides[p][2], out.piece_strides[p][3], out.piece_strides[p][4], p};
  const int64_t total = static_cast<int64_t>(b.batch) * d.channels * d.depth * d.height * d.width;
  if (total > 0) piece_grad_kernel<T><<<grid_for(total), 256, 0, stream>>>(b, o);
}

template <typename T>
void launch_all(const BwdParams& b, const FusedBwdOutputs& out, float* workspace, int splits, cudaStream_t stream) {
  for (int p = 0; p < b.input.num_pieces; ++p) launch_piece<T>(b, out, p, stream);
  const int cols = b.input.channels * bwd_taps(b) + 1;
  const int64_t pixels = static_cast<int64_t>(b.batch) * b.input.depth * b.input.height * b.input.width;
  const int64_t chunk = (pixels + splits - 1) / splits;
  const int64_t total = static_cast<int64_t>(splits) * b.c_out * cols;
  weight_grad_partial_kernel<T><<<grid_for(total), 256, 0, stream>>>(b, workspace, splits, chunk);
  weight_grad_reduce_kernel<T><<<grid_for(static_cast<int64_t>(b.c_out) * cols), 256, 0, stream>>>(
      workspace, splits, b.c_out, cols, out.grad_weight, out.grad_bias);
}

}  // namespace

int fused_backward_splits(const BwdParams& b) {
  // Enough (split, co, column) threads to fill the GPU, at most one split per 256 pixels.
  const int64_t pixels = static_cast<int64_t>(b.batch) * b.input.depth * b.input.height * b.input.width;
  const int64_t columns = static_cast<int64_t>(b.c_out) * (b.input.channels * bwd_taps(b) + 1);
  if (columns == 0) return 1;  // C_out = 0: nothing to reduce
  int64_t splits = (132 * 2048 + columns - 1) / columns;
  const int64_t most = (pixels + 255) / 256;
  if (splits > most) splits = most;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

cudaError_t launch_fused_conv_backward_fused(const BwdParams& b, DType dtype, const FusedBwdOutputs& out,
                                             float* workspace, int splits, cudaStream_t stream) {
  if ((b.k != 1 && b.k != 3) || splits < 1) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      launch_all<float>(b, out, workspace, splits, stream);
      break;
    case DType::kFloat16:
      launch_all<__half>(b, out, workspace, splits, stream);
      break;
    case DType::kBFloat16:
      launch_all<__nv_bfloat16>(b, out, workspace, splits, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_fused_conv_backward_piece(const BwdParams& b, DType dtype, const FusedBwdOutputs& out, int piece,
                                             cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      launch_piece<float>(b, out, piece, stream);
      break;
    case DType::kFloat16:
      launch_piece<__half>(b, out, piece, stream);
      break;
    case DType::kBFloat16:
      launch_piece<__nv_bfloat16>(b, out, piece, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

#else  // UPF_BWD_TWIN: the same per-element functions over every element, fp64, on the CPU.

// Pieces [N, C, (D,) H, W] of doubles with 5 strides each (stride_d 0 in 2D) and sizes (c, d, h, w);
// g [N, C_out, (D,) H, W] with 5 strides; weight [C_out, C_in, taps] contiguous. Writes each piece's
// gradient (contiguous [N, C, D, H, W]), grad_weight [C_out, C_in * taps] and grad_bias [C_out], the
// weight gradient over `splits` pixel chunks summed in order as the GPU does.
extern "C" int upf_bwd_twin_f64(int volume, int num_pieces, const void* const* data, const int64_t* strides,
                                const int* cdhw, const int* modes, int batch, int out_d, int out_h, int out_w,
                                const double* grad_pre, const int64_t* g_strides, const double* weight, int c_out,
                                int k, int splits, double* const* grad_pieces, double* grad_weight,
                                double* grad_bias) {
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
    d.stride_d = volume ? strides[5 * p + 2] : 0;
    d.stride_h = strides[5 * p + 3];
    d.stride_w = strides[5 * p + 4];
    d.channels = cdhw[4 * p];
    d.depth = volume ? cdhw[4 * p + 1] : 1;
    d.height = cdhw[4 * p + 2];
    d.width = cdhw[4 * p + 3];
    d.resample_depth = volume != 0;
    d.channel_offset = offset;
    d.mode = modes[p];
    offset += d.channels;
  }
  v.channels = offset;
  v.depth = volume ? out_d : 1;
  v.height = out_h;
  v.width = out_w;
  b.grad_pre = grad_pre;
  b.g_stride_n = g_strides[0];
  b.g_stride_c = g_strides[1];
  b.g_stride_d = volume ? g_strides[2] : 0;
  b.g_stride_h = g_strides[3];
  b.g_stride_w = g_strides[4];
  b.weight = weight;
  b.batch = batch;
  b.c_out = c_out;
  b.k = k;
  b.volume = volume;
  const auto load_g = [&](int64_t off) { return grad_pre[off]; };
  const auto load_w = [&](int64_t off) { return weight[off]; };
  const auto load_piece = [&](int p, int64_t off) { return static_cast<const double*>(v.pieces[p].data)[off]; };
  for (int p = 0; p < num_pieces; ++p) {
    const PieceDesc& d = v.pieces[p];
    int64_t i = 0;
    for (int n = 0; n < batch; ++n)
      for (int c = 0; c < d.channels; ++c)
        for (int z = 0; z < d.depth; ++z)
          for (int y = 0; y < d.height; ++y)
            for (int x = 0; x < d.width; ++x) {
              grad_pieces[p][i++] = piece_grad<double>(b, p, n, c, z, y, x, load_piece, load_g, load_w);
            }
  }
  const int taps = bwd_taps(b), cols = v.channels * taps + 1;
  const int64_t pixels = static_cast<int64_t>(batch) * v.depth * v.height * v.width;
  const int64_t chunk = (pixels + splits - 1) / splits;
  for (int co = 0; co < c_out; ++co) {
    for (int col = 0; col < cols; ++col) {
      const int ci = col < cols - 1 ? col / taps : 0, tap = col < cols - 1 ? col % taps : taps;
      double sum = 0.0;
      for (int s = 0; s < splits; ++s) {
        const int64_t begin = s * chunk, end = begin + chunk < pixels ? begin + chunk : pixels;
        sum += weight_grad_partial<double>(b, co, ci, tap, begin, end, load_piece, load_g);
      }
      if (col < cols - 1) {
        grad_weight[static_cast<int64_t>(co) * (cols - 1) + col] = sum;
      } else {
        grad_bias[co] = sum;
      }
    }
  }
  return 0;
}

#endif  // UPF_BWD_TWIN

}  // namespace cuda
}  // namespace unetpp_fast
