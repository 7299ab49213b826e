// A list of the compiled kernel families, filled by static registrars in each kernel file so
// build_info() can report what this build contains without knowing the files.
#pragma once

#include <string>
#include <vector>

namespace unetpp_fast {

inline std::vector<std::string>& registered_kernels() {
  static std::vector<std::string> names;
  return names;
}

struct KernelRegistrar {
  explicit KernelRegistrar(const char* name) { registered_kernels().emplace_back(name); }
};

}  // namespace unetpp_fast
