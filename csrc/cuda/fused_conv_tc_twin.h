// CPU twin of the GPU primitives fused_conv_tc.cu uses (DESIGN §6): compiling that file with a host
// compiler and -DUPF_TC_TWIN runs the kernel's own code on the CPU, one std::thread per CUDA thread
// of a CTA, so its indexing, swizzle, fragment bookkeeping and epilogue are tested against the
// reference without a GPU. Only the hardware (timing, the real asynchrony of cp.async) is left.
//
// Per-lane semantics as the PTX ISA documents them:
//   cp.async.cg 16 B (src-size < 16 zero-fills the rest; here the copy completes at once, which
//   the kernel's wait_group + barrier order makes indistinguishable),
//   ldmatrix.m8n8.x4.b16 (lanes 8j..8j+7 give the row addresses of matrix j; lane l receives
//   row l/4, elements 2(l%4), 2(l%4)+1 of each matrix),
//   mma.sync.m16n8k16.row.col.f32.bf16 (g = l/4, t = l%4: a0 = A[g][2t..], a1 = A[g+8][2t..],
//   a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; b0 = B[2t..][g], b1 = B[2t+8..][g];
//   c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]),
//   mma.sync.m16n8k8.row.col.f32.tf32 (a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4];
//   b0 = B[t][g], b1 = B[t+4][g]; C as above), each operand truncated to its top 19 bits.
#pragma once

#include <cuda_bf16.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <vector>

namespace unetpp_fast {
namespace cuda {
namespace twin {

constexpr int kMaxWarps = 4;

struct Block {  // one emulated CTA: its shared memory, barriers and per-warp exchange buffers
  explicit Block(int threads, size_t smem_bytes)
      : smem(smem_bytes + 128, 0), sync(threads), warp_sync{std::barrier<>(32), std::barrier<>(32),
                                                           std::barrier<>(32), std::barrier<>(32)} {}
  std::vector<unsigned char> smem;
  std::barrier<> sync;
  std::barrier<> warp_sync[kMaxWarps];
  uint32_t exchange[kMaxWarps][32][10];
  unsigned bx = 0, by = 0;
  unsigned char* base() { return smem.data(); }
};

inline thread_local Block* block = nullptr;
inline thread_local unsigned thread_id = 0;

struct Index3 {
  unsigned x, y, z;
};
inline Index3 thread_index() { return {thread_id, 0, 0}; }
inline Index3 block_index() { return {block->bx, block->by, 0}; }

inline void sync_threads() { block->sync.arrive_and_wait(); }

inline uint32_t* lane_slot() { return block->exchange[thread_id >> 5][thread_id & 31]; }
inline uint32_t* slot_of(unsigned lane) { return block->exchange[thread_id >> 5][lane]; }
inline void sync_warp() { block->warp_sync[thread_id >> 5].arrive_and_wait(); }

inline float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t wide = bits16 << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

}  // namespace twin

#define threadIdx (::unetpp_fast::cuda::twin::thread_index())
#define blockIdx (::unetpp_fast::cuda::twin::block_index())
#define __syncthreads() ::unetpp_fast::cuda::twin::sync_threads()
#define UPF_TC_SHARED(name, bytes) unsigned char* name = ::unetpp_fast::cuda::twin::block->base()
#define UPF_TC_DYNAMIC_SHARED(name) unsigned char* name = ::unetpp_fast::cuda::twin::block->base()
#define UPF_TC_KERNEL void
#define UPF_TC_HALO_KERNEL void
#define UPF_TC_GRID_CONSTANT
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif

inline float __uint_as_float(uint32_t v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t v;
  std::memcpy(&v, &f, 4);
  return v;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - twin::block->base());
}

inline void cp_async_16(uint32_t dst, const void* src, int bytes) {
  unsigned char* d = twin::block->base() + dst;
  if (bytes > 0) std::memcpy(d, src, bytes);
  std::memset(d + bytes, 0, 16 - bytes);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const unsigned lane = twin::thread_id & 31;
  twin::lane_slot()[0] = addr;
  twin::sync_warp();
  uint32_t r[4];
  for (int j = 0; j < 4; ++j) {
    const uint32_t row = twin::slot_of(j * 8 + lane / 4)[0];
    std::memcpy(&r[j], twin::block->base() + row + (lane % 4) * 4, 4);
  }
  twin::sync_warp();  // the exchange slots are reused by the next collective
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

// One warp MMA: every lane publishes its fragments, then each computes its four C elements,
// C[g (+8)][2t (+1)] += sum over k < K of A[row][k] * B[k][col], through the type's element getters.
template <int K, typename AAt, typename BAt>
inline void mma_emulated(float* d, const uint32_t* a, const uint32_t* b, AAt a_at, BAt b_at) {
  const unsigned lane = twin::thread_id & 31, g = lane / 4, t = lane % 4;
  uint32_t* mine = twin::lane_slot();
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  twin::sync_warp();
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
    float sum = d[e];
    for (int k = 0; k < K; ++k) sum += a_at(row, k) * b_at(k, col);
    out[e] = sum;
  }
  twin::sync_warp();  // the exchange slots are reused by the next collective
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {  // m16n8k16: two bf16 per register
  static void run(float* d, const uint32_t* a, const uint32_t* b) {
    auto a_at = [](int row, int k) {  // A[row][k] from the lane that holds it
      const uint32_t reg = twin::slot_of((row % 8) * 4 + (k % 8) / 2)[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      return twin::bf16_bits_to_float((k % 2) ? reg >> 16 : reg & 0xffffu);
    };
    auto b_at = [](int k, int n) {  // B[k][n]
      const uint32_t reg = twin::slot_of(n * 4 + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)];
      return twin::bf16_bits_to_float((k % 2) ? reg >> 16 : reg & 0xffffu);
    };
    mma_emulated<16>(d, a, b, a_at, b_at);
  }
};
template <>
struct Mma<float> {  // m16n8k8 on TF32: one fp32 per register, its low 13 bits ignored
  static void run(float* d, const uint32_t* a, const uint32_t* b) {
    const auto tf32 = [](uint32_t reg) { return __uint_as_float(reg & 0xffffe000u); };
    auto a_at = [&](int row, int k) {
      return tf32(twin::slot_of((row % 8) * 4 + k % 4)[(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
    };
    auto b_at = [&](int k, int n) { return tf32(twin::slot_of(n * 4 + k % 4)[4 + (k >= 4 ? 1 : 0)]); };
    mma_emulated<8>(d, a, b, a_at, b_at);
  }
};

}  // namespace cuda
}  // namespace unetpp_fast
