// Python-facing helpers of unetpp_fast._C (pybind11). Operator kernels register themselves
// through TORCH_LIBRARY in their own files; this file only reports what was built.
#include <torch/extension.h>

#include <string>

#include "build_registry.h"

#ifndef UNETPP_FAST_TORCH_VERSION
#define UNETPP_FAST_TORCH_VERSION "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(UNETPP_FAST_TORCH_VERSION);
  info["cxx"] = true;
#ifdef UNETPP_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(UNETPP_FAST_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
#endif
  pybind11::list kernels;
  for (const auto& name : unetpp_fast::registered_kernels()) kernels.append(name);
  info["kernels"] = kernels;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unetpp_fast compiled extension: fused virtual-concatenation convolution kernels";
  m.def("build_info", &build_info, "What this extension was compiled with.");
}
