// Opting a kernel into more than 48 KB of dynamic shared memory, once per device rather than per
// launch (cudaFuncSetAttribute is a driver call on every launch otherwise). Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace unetpp_fast {

// `Kernel` as a template argument: one record per kernel (kernels of one signature share a type).
// The limit granted so far is kept per device; a launch needing more raises it again.
template <auto Kernel>
cudaError_t ensure_dynamic_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> granted[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool tracked = device >= 0 && device < kMaxDevices;
  if (tracked && granted[device].load(std::memory_order_acquire) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && tracked) {
    int previous = granted[device].load(std::memory_order_relaxed);
    while (previous < bytes && !granted[device].compare_exchange_weak(previous, bytes, std::memory_order_release)) {
    }
  }
  return err;
}

}  // namespace unetpp_fast
