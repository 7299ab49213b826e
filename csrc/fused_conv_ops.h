// Argument checking and descriptors shared by the CPU and CUDA implementations of the
// unetpp_fast_C operators (defined in fused_conv_ops.cpp, where the schemas live).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <utility>

#include "fused_conv_indexing.h"

namespace unetpp_fast {

struct Activation {
  int kind;      // ActivationKind
  double slope;  // negative slope of leaky_relu
};

// 'none' | 'relu' | 'leaky_relu' | 'leaky_relu:<positive slope>'; anything else raises.
Activation parse_activation(const std::string& activation);

// Checks one 2D call (4-D pieces and weight) the way unetpp_fast/conv_spec.py does; returns the
// output size (H, W).
std::pair<int64_t, int64_t> check_fused_conv_args(at::TensorList pieces, at::IntArrayRef resample,
                                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                  const std::string& activation, const char* op_name);

// Checks one 2D or 3D call (4-D or 5-D pieces and weight, every one the same rank); returns the
// output size (D, H, W), D = 1 in 2D.
std::array<int64_t, 3> check_fused_conv_args_nd(at::TensorList pieces, at::IntArrayRef resample,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const std::string& activation, const char* op_name);

// Descriptor of the virtual input over the pieces' storage (any strides), 4-D pieces.
VirtualInput describe_virtual_input(at::TensorList pieces, at::IntArrayRef resample, int64_t height,
                                    int64_t width);

// The same for 4-D or 5-D pieces; `dhw` as check_fused_conv_args_nd returns it. 4-D pieces get
// depth 1, stride_d 0 and no depth resample (2D is the D = 1 case).
VirtualInput describe_virtual_input_nd(at::TensorList pieces, at::IntArrayRef resample,
                                       const std::array<int64_t, 3>& dhw);

// The output takes the first piece's memory format (as conv_spec.output_memory_format):
// channels_last for 4-D, channels_last_3d for 5-D pieces.
at::MemoryFormat output_memory_format(const at::Tensor& first_piece);

// Gradient before the activation, from the gradient after it and the saved output.
at::Tensor activation_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                               const Activation& activation);

}  // namespace unetpp_fast
