// Schemas of the compiled fused-convolution operators and the argument checks every backend shares.
//
//   fused_conv_forward(pieces, resample, weight, bias, activation) -> out
//   fused_conv_backward(grad_out, pieces, resample, weight, out, has_bias, activation)
//       -> [grad_piece_0 .. grad_piece_{n-1}, grad_weight, grad_bias (empty without bias)]
//
// The CPU and CUDA kernels register their implementations with TORCH_LIBRARY_IMPL in their own files.
#include "fused_conv_ops.h"

#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <sstream>

namespace unetpp_fast {

namespace {

const char* kModeNames[] = {"none", "up_nearest", "up_bilinear", "up_bilinear_ac", "maxpool2"};
const char* kModeNames3d[] = {"none", "up_nearest", "up_trilinear", "up_trilinear_ac", "maxpool2"};

int64_t resampled_extent(int64_t size, int64_t mode) {
  if (mode == kUpNearest || mode == kUpBilinear || mode == kUpBilinearAC) return 2 * size;
  if (mode == kMaxPool2) return size / 2;
  return size;
}

std::string spatial_text(const std::array<int64_t, 3>& dhw, bool three_d) {
  std::ostringstream s;
  if (three_d) s << dhw[0] << "x";
  s << dhw[1] << "x" << dhw[2];
  return s.str();
}

}  // namespace

namespace {

// SLOPE of the activation grammar (as conv_spec.py's _SLOPE): ASCII digits with an optional '.' and
// fraction (or '.' digits), then an optional exponent e/E [+/-] digits. Nothing else: no sign,
// spaces, '_', "inf"/"nan" or hex, which strtod would otherwise accept.
bool is_slope_literal(const std::string& s) {
  size_t i = 0;
  const auto digits = [&]() {
    const size_t start = i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    return i - start;
  };
  size_t mantissa = digits();
  if (i < s.size() && s[i] == '.') {
    ++i;
    mantissa += digits();
  }
  if (mantissa == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    if (digits() == 0) return false;
  }
  return i == s.size();
}

// glibc's strtod rounds correctly as Python's float() does (overflow gives inf, refused below). Under
// a locale whose decimal point is not '.', it stops early: refused too, never misread.
bool parse_slope(const std::string& s, double* value) {
  char* end = nullptr;
  *value = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size();
}

}  // namespace

Activation parse_activation(const std::string& activation) {
  if (activation == "none") return {kActNone, 0.0};
  if (activation == "relu") return {kActRelu, 0.0};
  if (activation == "leaky_relu") return {kActLeakyRelu, 0.01};
  const std::string prefix = "leaky_relu:";
  if (activation.rfind(prefix, 0) == 0) {
    const std::string number = activation.substr(prefix.size());
    double slope = 0.0;
    if (is_slope_literal(number) && parse_slope(number, &slope) && slope > 0.0 && std::isfinite(slope)) {
      return {kActLeakyRelu, slope};
    }
  }
  TORCH_CHECK_VALUE(false,
                    "activation must be 'none', 'relu', 'leaky_relu' or 'leaky_relu:<positive slope>' (the slope "
                    "an ASCII decimal literal, e.g. 0.2 or 1e-3), got '",
                    activation, "'");
}

std::pair<int64_t, int64_t> check_fused_conv_args(at::TensorList pieces, at::IntArrayRef resample,
                                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                  const std::string& activation, const char* op_name) {
  TORCH_CHECK_VALUE(weight.dim() == 4, op_name, ": weight must be 4-D [C_out, C_in, k, k], got shape ",
                    weight.sizes());
  const auto dhw = check_fused_conv_args_nd(pieces, resample, weight, bias, activation, op_name);
  return {dhw[1], dhw[2]};
}

std::array<int64_t, 3> check_fused_conv_args_nd(at::TensorList pieces, at::IntArrayRef resample,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const std::string& activation, const char* op_name) {
  TORCH_CHECK_VALUE(!pieces.empty(), op_name,
                    ": pieces must be a non-empty list of 4-D tensors [N, C_p, H_p, W_p] (or 5-D with a 5-D weight)");
  TORCH_CHECK_VALUE(static_cast<int>(pieces.size()) <= kMaxPieces, op_name, ": at most ", kMaxPieces,
                    " pieces are supported, got ", pieces.size());
  TORCH_CHECK_VALUE(resample.size() == pieces.size(), op_name, ": resample has ", resample.size(),
                    " entries but there are ", pieces.size(), " pieces");
  TORCH_CHECK_VALUE(weight.dim() == 4 || weight.dim() == 5, op_name,
                    ": weight must be 4-D [C_out, C_in, k, k] or 5-D [C_out, C_in, k, k, k], got shape ",
                    weight.sizes());
  const int64_t rank = weight.dim();
  const bool three_d = rank == 5;
  const auto dtype = weight.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   op_name, ": weight dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t k = weight.size(2);
  bool same = k == 1 || k == 3;
  for (int64_t d = 3; d < rank; ++d) same = same && weight.size(d) == k;
  std::ostringstream kernel;
  for (int64_t d = 2; d < rank; ++d) kernel << (d > 2 ? "x" : "") << weight.size(d);
  TORCH_CHECK_VALUE(same, op_name, ": weight must have a ", three_d ? "cubic" : "square",
                    " kernel of size 1 or 3, got ", kernel.str());
  parse_activation(activation);

  std::array<int64_t, 3> out{-1, -1, -1};
  int64_t channels = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const at::Tensor& piece = pieces[i];
    TORCH_CHECK_VALUE(piece.dim() == rank, op_name, ": pieces[", i, "] must be ", rank, "-D ",
                      three_d ? "[N, C, D, H, W]" : "[N, C, H, W]", " to match the ", rank,
                      "-D weight, got shape ", piece.sizes());
    TORCH_CHECK_TYPE(piece.scalar_type() == dtype, op_name, ": pieces[", i, "] has dtype ", piece.scalar_type(),
                     " but weight has ", dtype, ": all must match");
    TORCH_CHECK_VALUE(piece.device() == weight.device(), op_name, ": pieces[", i, "] is on ", piece.device(),
                      " but weight is on ", weight.device(), ": all must match");
    TORCH_CHECK_VALUE(piece.size(0) == pieces[0].size(0), op_name, ": pieces[", i, "] has batch size ",
                      piece.size(0), " but pieces[0] has ", pieces[0].size(0));
    const int64_t mode = resample[i];
    TORCH_CHECK_VALUE(mode >= 0 && mode <= kMaxPool2, op_name, ": resample[", i,
                      "] must be a code 0..4 (none, up_nearest, up_bilinear, up_bilinear_ac, maxpool2), got ", mode);
    const std::array<int64_t, 3> src{three_d ? piece.size(2) : 1, piece.size(rank - 2), piece.size(rank - 1)};
    const std::array<int64_t, 3> dhw{three_d ? resampled_extent(src[0], mode) : 1, resampled_extent(src[1], mode),
                                     resampled_extent(src[2], mode)};
    if (i == 0) {
      out = dhw;
    } else {
      TORCH_CHECK_VALUE(dhw == out, op_name, ": pieces[", i, "] of spatial size ", spatial_text(src, three_d),
                        " with resample '", (three_d ? kModeNames3d : kModeNames)[mode], "' becomes ",
                        spatial_text(dhw, three_d), ", but pieces[0] becomes ", spatial_text(out, three_d),
                        ": every piece must have the same size after its resample");
    }
    channels += piece.size(1);
  }
  const int64_t height = out[1], width = out[2];
  TORCH_CHECK_VALUE(out[0] >= 1 && height >= 1 && width >= 1, op_name, ": the output spatial size would be ",
                    spatial_text(out, three_d), "; it must be at least ", three_d ? "1x1x1" : "1x1");
  TORCH_CHECK_VALUE(channels == weight.size(1), op_name, ": the pieces have ", channels,
                    " channels in all but weight expects C_in = ", weight.size(1));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op_name,
                      ": bias must be 1-D of length C_out = ", weight.size(0), ", got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype && bias->device() == weight.device(), op_name, ": bias is ",
                     bias->scalar_type(), " on ", bias->device(), " but weight is ", dtype, " on ", weight.device());
  }
  // The kernels index rows, columns and channels with 32-bit ints (element offsets are 64-bit).
  TORCH_CHECK_VALUE(channels < (int64_t(1) << 31) / (three_d ? 27 : 9) && out[0] < (int64_t(1) << 30) &&
                        height < (int64_t(1) << 30) && width < (int64_t(1) << 30),
                    op_name, ": sizes beyond the supported 32-bit channel/slice/row/column range");
  return out;
}

VirtualInput describe_virtual_input(at::TensorList pieces, at::IntArrayRef resample, int64_t height,
                                    int64_t width) {
  return describe_virtual_input_nd(pieces, resample, {1, height, width});
}

VirtualInput describe_virtual_input_nd(at::TensorList pieces, at::IntArrayRef resample,
                                       const std::array<int64_t, 3>& dhw) {
  VirtualInput v{};
  v.num_pieces = static_cast<int>(pieces.size());
  int offset = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const at::Tensor& t = pieces[i];
    const int64_t r = t.dim();  // 4 or 5: H and W are always the last two axes
    PieceDesc& d = v.pieces[i];
    d.data = t.data_ptr();
    d.stride_n = t.stride(0);
    d.stride_c = t.stride(1);
    d.stride_h = t.stride(r - 2);
    d.stride_w = t.stride(r - 1);
    d.channels = static_cast<int>(t.size(1));
    d.height = static_cast<int>(t.size(r - 2));
    d.width = static_cast<int>(t.size(r - 1));
    d.channel_offset = offset;
    d.mode = static_cast<int>(resample[i]);
    d.resample_depth = r == 5;
    d.depth = r == 5 ? static_cast<int>(t.size(2)) : 1;
    d.stride_d = r == 5 ? t.stride(2) : 0;
    offset += d.channels;
  }
  v.channels = offset;
  v.depth = static_cast<int>(dhw[0]);
  v.height = static_cast<int>(dhw[1]);
  v.width = static_cast<int>(dhw[2]);
  return v;
}

at::MemoryFormat output_memory_format(const at::Tensor& first_piece) {
  if (first_piece.dim() == 4 && first_piece.size(1) > 1 &&
      first_piece.is_contiguous(at::MemoryFormat::ChannelsLast) && !first_piece.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (first_piece.dim() == 5 && first_piece.size(1) > 1 &&
      first_piece.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !first_piece.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

at::Tensor activation_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                               const Activation& activation) {
  if (activation.kind == kActNone) return grad_out;
  TORCH_CHECK_VALUE(out.has_value() && out->defined(),
                    "fused_conv_backward: `out` (the forward output) is required for the activation mask");
  TORCH_CHECK_VALUE(out->sizes() == grad_out.sizes(), "fused_conv_backward: out has shape ", out->sizes(),
                    " but grad_out has ", grad_out.sizes());
  if (activation.kind == kActRelu) return at::threshold_backward(grad_out, *out, 0);
  return at::leaky_relu_backward(grad_out, *out, activation.slope, /*self_is_result=*/true);
}

}  // namespace unetpp_fast

TORCH_LIBRARY(unetpp_fast_C, m) {
  m.def(
      "fused_conv_forward(Tensor[] pieces, int[] resample, Tensor weight, Tensor? bias, str activation) -> Tensor");
  m.def(
      "fused_conv_backward(Tensor grad_out, Tensor[] pieces, int[] resample, Tensor weight, Tensor? out, "
      "bool has_bias, str activation) -> Tensor[]");
}
