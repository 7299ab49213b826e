// Tensor-core building blocks of the fused backward kernels (fused_conv_bwd_tc.cu), and their CPU
// twin. Torch-free.
//
// On the GPU: 16-byte cp.async (LDGSTS), ldmatrix.x4 (.trans too: LDSM), mma.sync m16n8k16 with
// fp32 accumulation (HMMA), bf16 and fp16.
// Compiled by a host compiler with -DUPF_BWD_TC_TWIN: the same names run on the CPU, one std::thread
// per CUDA thread of a CTA (run_cta), with the per-lane semantics the PTX ISA documents:
//   cp.async.cg 16 B (src-size < 16 zero-fills; the copy completes at once, which the kernels'
//   wait_group + barrier order makes indistinguishable);
//   ldmatrix.m8n8.x4.b16: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives row
//   l/4, elements 2(l%4), 2(l%4)+1 of each matrix; .trans hands out the transposed matrix;
//   mma m16n8k16.row.col (g = l/4, t = l%4): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
//   a3 = A[g+8][2t+8..]; b0 = B[2t..][g], b1 = B[2t+8..][g]; c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][..].
// The twin emulates the bf16 MMA only (fp16 differs in rounding alone, which the twin cannot
// usefully model); the GPU tests cover fp16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#if defined(UPF_BWD_TC_TWIN)
#include <barrier>
#include <thread>
#include <vector>
#endif

namespace unetpp_fast {
namespace cuda {
namespace tcp {

#if defined(UPF_BWD_TC_TWIN)

constexpr int kMaxWarps = 4;

struct Cta {  // one emulated CTA: its shared memory, barriers and per-warp exchange slots
  Cta(int threads, size_t smem_bytes)
      : smem(smem_bytes + 128, 0), sync(threads), warp_sync{std::barrier<>(32), std::barrier<>(32),
                                                           std::barrier<>(32), std::barrier<>(32)} {}
  std::vector<unsigned char> smem;
  std::barrier<> sync;
  std::barrier<> warp_sync[kMaxWarps];
  uint32_t exchange[kMaxWarps][32][8];
  unsigned bx = 0, by = 0, bz = 0;
};

inline thread_local Cta* cta = nullptr;
inline thread_local unsigned tid = 0;

struct Index3 {
  unsigned x, y, z;
};
inline Index3 thread_index() { return {tid, 0, 0}; }
inline Index3 block_index() { return {cta->bx, cta->by, cta->bz}; }
inline void sync_threads() { cta->sync.arrive_and_wait(); }
inline uint32_t* slot_of(unsigned lane) { return cta->exchange[tid >> 5][lane]; }
inline void sync_warp() { cta->warp_sync[tid >> 5].arrive_and_wait(); }

inline float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t wide = bits16 << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

// Runs kernel() as every thread of every CTA of the grid, CTA after CTA.
template <typename Kernel>
void run_grid(unsigned gx, unsigned gy, unsigned gz, int threads, size_t smem_bytes, Kernel kernel) {
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        Cta block(threads, smem_bytes);
        block.bx = x;
        block.by = y;
        block.bz = z;
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&block, &kernel, t] {
            cta = &block;
            tid = static_cast<unsigned>(t);
            kernel();
          });
        }
        for (auto& thread : pool) thread.join();
      }
}

#define UPF_TCP_THREAD ::unetpp_fast::cuda::tcp::thread_index()
#define UPF_TCP_BLOCK ::unetpp_fast::cuda::tcp::block_index()
#define UPF_TCP_SYNC() ::unetpp_fast::cuda::tcp::sync_threads()
#define UPF_TCP_SHARED(name, bytes) unsigned char* name = ::unetpp_fast::cuda::tcp::cta->smem.data()
#define UPF_TCP_DYNAMIC_SHARED(name) unsigned char* name = ::unetpp_fast::cuda::tcp::cta->smem.data()
#define UPF_TCP_DEVICE inline
#define UPF_TCP_GLOBAL inline void
#define UPF_TCP_GRID_CONSTANT

inline uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - cta->smem.data());
}
inline unsigned char* smem_pointer(uint32_t address) { return cta->smem.data() + address; }

inline void cp_async_16(uint32_t dst, const void* src, int bytes) {
  unsigned char* d = smem_pointer(dst);
  if (bytes > 0) std::memcpy(d, src, bytes);
  std::memset(d + bytes, 0, 16 - bytes);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

// ldmatrix x4; `transposed` hands lane l column l/4, rows 2(l%4), 2(l%4)+1 of each stored matrix.
inline void ldmatrix_x4_impl(uint32_t addr, uint32_t* r, bool transposed) {
  const unsigned lane = tid & 31;
  slot_of(lane)[0] = addr;
  sync_warp();
  for (int j = 0; j < 4; ++j) {
    if (!transposed) {
      const uint32_t row = slot_of(j * 8 + lane / 4)[0];
      std::memcpy(&r[j], smem_pointer(row) + (lane % 4) * 4, 4);
    } else {
      uint16_t lo, hi;
      const uint32_t row0 = slot_of(j * 8 + 2 * (lane % 4))[0], row1 = slot_of(j * 8 + 2 * (lane % 4) + 1)[0];
      std::memcpy(&lo, smem_pointer(row0) + (lane / 4) * 2, 2);
      std::memcpy(&hi, smem_pointer(row1) + (lane / 4) * 2, 2);
      r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  sync_warp();  // the exchange slots are reused by the next collective
}
inline void ldmatrix_x4(uint32_t addr, uint32_t* r) { ldmatrix_x4_impl(addr, r, false); }
inline void ldmatrix_x4_trans(uint32_t addr, uint32_t* r) { ldmatrix_x4_impl(addr, r, true); }

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static void run(float* d, const uint32_t* a, const uint32_t* b) {
    const unsigned lane = tid & 31, g = lane / 4, t = lane % 4;
    uint32_t* mine = slot_of(lane);
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b[0];
    mine[5] = b[1];
    sync_warp();
    auto a_at = [&](int row, int k) {  // A[row][k] from the lane that holds it
      const uint32_t reg = slot_of((row % 8) * 4 + (k % 8) / 2)[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      return bf16_bits_to_float((k % 2) ? reg >> 16 : reg & 0xffffu);
    };
    auto b_at = [&](int k, int n) {  // B[k][n]
      const uint32_t reg = slot_of(n * 4 + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)];
      return bf16_bits_to_float((k % 2) ? reg >> 16 : reg & 0xffffu);
    };
    float out[4];
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
      float sum = d[e];
      for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
      out[e] = sum;
    }
    sync_warp();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
  }
};

#else  // the GPU

#define UPF_TCP_THREAD threadIdx
#define UPF_TCP_BLOCK blockIdx
#define UPF_TCP_SYNC() __syncthreads()
#define UPF_TCP_SHARED(name, bytes) __shared__ __align__(128) unsigned char name[bytes]
#define UPF_TCP_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define UPF_TCP_DEVICE __device__ __forceinline__
#define UPF_TCP_GLOBAL __global__ void
#define UPF_TCP_GRID_CONSTANT __grid_constant__

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

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
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

#endif  // UPF_BWD_TC_TWIN

// One 16-bit element <-> fp32, and the two elements of a 32-bit word (channel c in the low half,
// c + 1 in the high half, as channels_last stores them).
template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  UPF_TCP_DEVICE static float to_float(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    memcpy(&f, &wide, 4);
    return f;
  }
  UPF_TCP_DEVICE static uint16_t from_float(float v) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
  }
  UPF_TCP_DEVICE static float low_float(uint32_t word) { return to_float(static_cast<uint16_t>(word)); }
  UPF_TCP_DEVICE static float high_float(uint32_t word) {  // a bf16 is the top half of its fp32
    const uint32_t top = word & 0xffff0000u;
    float f;
    memcpy(&f, &top, 4);
    return f;
  }
  UPF_TCP_DEVICE static uint32_t pack2(float low, float high) {  // both rounded to nearest even
#if defined(UPF_BWD_TC_TWIN)
    return static_cast<uint32_t>(from_float(low)) | (static_cast<uint32_t>(from_float(high)) << 16);
#else
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    uint32_t word;
    memcpy(&word, &pair, 4);
    return word;
#endif
  }
};
#if !defined(UPF_BWD_TC_TWIN)
template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ __forceinline__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static float low_float(uint32_t word) { return to_float(static_cast<uint16_t>(word)); }
  __device__ __forceinline__ static float high_float(uint32_t word) { return to_float(static_cast<uint16_t>(word >> 16)); }
  __device__ __forceinline__ static uint32_t pack2(float low, float high) {
    const __half2 pair = __floats2half2_rn(low, high);
    uint32_t word;
    memcpy(&word, &pair, 4);
    return word;
  }
};
#endif

}  // namespace tcp
}  // namespace cuda
}  // namespace unetpp_fast
