// Max of two pairs of 16-bit floats (two channels per 32-bit word; or one fp32, T = float), NaN-propagating: the value
// max_pool2d picks (its scan keeps the first maximum, so only the sign of a tied zero may differ,
// which a convolution cannot see). One HMNMX2 on the GPU; the CPU twins of the tensor-core kernels
// (UPF_TC_TWIN, UPF_BWD_TC_TWIN) compare as floats, bf16 only. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace unetpp_fast {
namespace cuda {

#if defined(UPF_TC_TWIN) || defined(UPF_BWD_TC_TWIN)
template <typename T>
inline uint32_t max2_nan(uint32_t a, uint32_t b) {
  const auto widen = [](uint32_t bits16) {
    const uint32_t wide = bits16 << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  };
  uint32_t out = 0;
  for (int half = 0; half < 2; ++half) {
    const uint32_t ha = (a >> (16 * half)) & 0xffffu, hb = (b >> (16 * half)) & 0xffffu;
    const float fa = widen(ha), fb = widen(hb);
    const uint32_t pick = (fa != fa) ? ha : (fb != fb) ? hb : (fb > fa ? hb : ha);
    out |= pick << (16 * half);
  }
  return out;
}
template <>
inline uint32_t max2_nan<float>(uint32_t a, uint32_t b) {
  float fa, fb;
  std::memcpy(&fa, &a, 4);
  std::memcpy(&fb, &b, 4);
  return (fa != fa) ? a : (fb != fb) ? b : (fb > fa ? b : a);
}
#else
template <typename T>
__device__ __forceinline__ uint32_t max2_nan(uint32_t a, uint32_t b) {
  using Pair = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
  Pair x, y;
  memcpy(&x, &a, 4);
  memcpy(&y, &b, 4);
  const Pair m = __hmax2_nan(x, y);
  uint32_t out;
  memcpy(&out, &m, 4);
  return out;
}
template <>
__device__ __forceinline__ uint32_t max2_nan<float>(uint32_t a, uint32_t b) {
  uint32_t out;
  asm("max.NaN.f32 %0, %1, %2;" : "=r"(out) : "r"(a), "r"(b));
  return out;
}
#endif

}  // namespace cuda
}  // namespace unetpp_fast
