// ATen wrappers of the CUDA kernels (compiled by the host compiler; the kernels live in torch-free .cu files).
//
// Forward: fp16 / bf16 run the tensor-core kernel (fused_conv_tc.cu; UNETPP_FAST_CUDA_LEGACY_FORWARD=1
// selects the first WMMA kernel); fp32 runs it on TF32 where torch.backends.cuda.matmul.allow_tf32
// allows it, else the exact SIMT kernel (fused_conv_kernels.cu).
// 2D and 3D (5-D pieces, channels_last_3d or NCDHW) share every path: the kernels take 3D as
// their DIMS = 3 instance, the backward's cuDNN call and adjoints switch to their 3D forms.
// Backward (first version): the virtual input of this one node is rebuilt by a gather kernel
// into a transient buffer, cuDNN computes dgrad / wgrad / bias grad, and the virtual-input
// gradient is routed through each piece's resample adjoint. Nothing is saved between forward
// and backward, so the training-memory saving holds; the transient buffer lives only during
// this node's backward. Fused backwards (no virtual input, no virtual-input gradient; both compile,
// untested on GPU), chosen at every call by UNETPP_FAST_CUDA_FUSED_BACKWARD:
//   unset / "auto": the tensor-core backward (fused_conv_bwd_tc.cu) for the calls it qualifies for
//     (tc_bwd_qualifies: 2D, fp16 / bf16, channels_last, C % 8 == 0) whose every piece gradient it
//     computes (tc_bwd_dgrad_covers: every mode; bilinear while its tile fits in shared memory);
//     every other call gathers + cuDNN;
//   "1": fused for every call: tensor cores where the call qualifies (a piece the TC dgrad does not
//     cover on the SIMT kernel), else the SIMT backward of fused_conv_bwd.cu;
//   "simt": the SIMT backward for every call;  "0" / "gather": gather + cuDNN for every call.
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d_with_indices.h>
#include <ATen/ops/max_pool2d_with_indices_backward.h>
#include <ATen/ops/max_pool3d_with_indices.h>
#include <ATen/ops/max_pool3d_with_indices_backward.h>
#include <ATen/ops/upsample_bilinear2d_backward.h>
#include <ATen/ops/upsample_nearest2d_backward.h>
#include <ATen/ops/upsample_nearest3d_backward.h>
#include <ATen/ops/upsample_trilinear3d_backward.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../fused_conv_ops.h"
#include "fused_conv_bwd_launch.h"
#include "fused_conv_bwd_tc.h"
#include "fused_conv_kernels.h"
#include "fused_conv_tc.h"

namespace unetpp_fast {
namespace {

cuda::DType kernel_dtype(at::ScalarType t, const char* op_name) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op_name, ": the cuda backend runs float32, float16 and bfloat16, got ", t,
                       " (use the 'reference' backend for float64 on a GPU)");
  }
}

void check_cuda_tensors(at::TensorList pieces, const at::Tensor& weight, const char* op_name) {
  TORCH_CHECK_VALUE(weight.is_cuda(), op_name, ": weight must be a CUDA tensor, got ", weight.device());
  for (size_t i = 0; i < pieces.size(); ++i) {
    TORCH_CHECK_VALUE(pieces[i].is_cuda(), op_name, ": pieces[", i, "] must be a CUDA tensor, got ",
                      pieces[i].device());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Kernel taps of a 4-D (k^2) or 5-D (k^3) weight; no division, so empty weights are fine.
int64_t weight_taps(const at::Tensor& weight) {
  int64_t taps = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) taps *= weight.size(d);
  return taps;
}

// [N, C, (D,) H, W] of a 2D (dhw[0] = 1, 4-D) or 3D (5-D) call.
std::vector<int64_t> nd_shape(int64_t batch, int64_t channels, const std::array<int64_t, 3>& dhw, bool volume) {
  if (volume) return {batch, channels, dhw[0], dhw[1], dhw[2]};
  return {batch, channels, dhw[1], dhw[2]};
}

at::Tensor forward_cuda(at::TensorList pieces, at::IntArrayRef resample, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, std::string activation) {
  const char* op_name = "fused_conv_forward (cuda)";
  const auto dhw = check_fused_conv_args_nd(pieces, resample, weight, bias, activation, op_name);
  const bool volume = weight.dim() == 5;
  check_cuda_tensors(pieces, weight, op_name);
  const cuda::DType dtype = kernel_dtype(weight.scalar_type(), op_name);
  const Activation act = parse_activation(activation);
  const at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard device_guard(weight.device());

  const int64_t batch = pieces[0].size(0);
  const int64_t pixels = batch * dhw[0] * dhw[1] * dhw[2];
  TORCH_CHECK_VALUE(pixels < std::numeric_limits<int32_t>::max(), op_name, volume ? ": N*D*H*W = " : ": N*H*W = ",
                    pixels, " exceeds the kernel's 32-bit pixel index; split the batch");
  TORCH_CHECK_VALUE(weight.size(1) * weight_taps(weight) < std::numeric_limits<int32_t>::max() &&
                        weight.size(0) < 65535 * 64,
                    op_name, ": weight of shape ", weight.sizes(), " is beyond the kernel's limits");

  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty(nd_shape(batch, weight.size(0), dhw, volume),
                             weight.options().memory_format(output_memory_format(pieces[0])));
  if (out.numel() == 0) return out;

  const int64_t r = out.dim();  // H and W are the last two axes
  cuda::ConvForwardParams prm{};
  prm.input = describe_virtual_input_nd(pieces, resample, dhw);
  prm.weight = weight_c.data_ptr();
  prm.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  prm.out = out.data_ptr();
  prm.out_stride_n = out.stride(0);
  prm.out_stride_c = out.stride(1);
  prm.out_stride_d = volume ? out.stride(2) : 0;
  prm.out_stride_h = out.stride(r - 2);
  prm.out_stride_w = out.stride(r - 1);
  prm.batch = static_cast<int>(batch);
  prm.c_out = static_cast<int>(weight.size(0));
  prm.k = static_cast<int>(weight.size(2));
  prm.activation = act.kind;
  prm.slope = static_cast<float>(act.slope);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // fp32 takes TF32 tensor cores where torch.backends.cuda.matmul.allow_tf32 allows it (the switch
  // the Triton backend follows too), the exact SIMT kernel otherwise.
  const bool tensor_cores = dtype != cuda::DType::kFloat32 || at::globalContext().allowTF32CuBLAS();
  if (tensor_cores && cuda::tc_forward_enabled()) {
    // Tensor-core kernel; the workspace receives the weight packed per K block (by a kernel: one
    // launch, no host-side tensor ops per call).
    at::Tensor workspace = at::empty(
        {weight.size(0) * weight_taps(weight) * cuda::tc_packed_row_length(prm.input, dtype)}, weight.options());
    const cudaError_t err = cuda::launch_fused_conv_forward_tc(prm, workspace.data_ptr(), dtype, stream);
    if (err != cudaErrorNotSupported) {  // not supported: a piece spans 2^31 elements; the WMMA kernel runs
      check_launch(err, "fused_conv_forward tensor-core kernel launch");
      return out;
    }
  }
  check_launch(cuda::launch_fused_conv_forward(prm, dtype, stream), "fused_conv_forward kernel launch");
  return out;
}

at::Tensor gather_virtual_input(at::TensorList pieces, at::IntArrayRef resample, const std::array<int64_t, 3>& dhw,
                                int64_t channels, cuda::DType dtype) {
  const bool volume = pieces[0].dim() == 5;
  at::Tensor virt = at::empty(nd_shape(pieces[0].size(0), channels, dhw, volume),
                              pieces[0].options().memory_format(output_memory_format(pieces[0])));
  if (virt.numel() == 0) return virt;
  const VirtualInput v = describe_virtual_input_nd(pieces, resample, dhw);
  const int64_t r = virt.dim();
  check_launch(cuda::launch_gather_virtual_input(v, static_cast<int>(pieces[0].size(0)), dtype, virt.data_ptr(),
                                                 virt.stride(0), virt.stride(1), virt.stride(r - 2),
                                                 virt.stride(r - 1), volume ? virt.stride(2) : 0,
                                                 c10::cuda::getCurrentCUDAStream()),
               "gather_virtual_input kernel launch");
  return virt;
}

// 3D form of resample_adjoint (5-D grad and piece), PyTorch's adjoints as reference.py uses them.
at::Tensor resample_adjoint_3d(const at::Tensor& grad, const at::Tensor& piece, int64_t mode) {
  const std::vector<int64_t> size(piece.sizes().begin(), piece.sizes().end());
  const std::array<int64_t, 3> out_dhw{grad.size(2), grad.size(3), grad.size(4)};
  switch (mode) {
    case kUpNearest:
      return at::upsample_nearest3d_backward(grad, out_dhw, size, 2.0, 2.0, 2.0);
    case kUpBilinear:
    case kUpBilinearAC:
      return at::upsample_trilinear3d_backward(grad, out_dhw, size, mode == kUpBilinearAC, std::nullopt,
                                               std::nullopt, std::nullopt);
    case kMaxPool2: {
      const auto pooled = at::max_pool3d_with_indices(piece, {2, 2, 2}, {2, 2, 2}, {0, 0, 0}, {1, 1, 1}, false);
      return at::max_pool3d_with_indices_backward(grad, piece, {2, 2, 2}, {2, 2, 2}, {0, 0, 0}, {1, 1, 1}, false,
                                                  std::get<1>(pooled));
    }
    default:
      return grad;
  }
}

// Gradient of one piece from the gradient of its resampled version (PyTorch's own adjoints).
at::Tensor resample_adjoint(const at::Tensor& grad, const at::Tensor& piece, int64_t mode) {
  if (piece.dim() == 5) return resample_adjoint_3d(grad, piece, mode);
  const std::vector<int64_t> size(piece.sizes().begin(), piece.sizes().end());
  const std::array<int64_t, 2> out_hw{grad.size(2), grad.size(3)};
  switch (mode) {
    case kUpNearest:
      return at::upsample_nearest2d_backward(grad, out_hw, size, 2.0, 2.0);
    case kUpBilinear:
    case kUpBilinearAC:
      return at::upsample_bilinear2d_backward(grad, out_hw, size, mode == kUpBilinearAC, std::nullopt,
                                              std::nullopt);
    case kMaxPool2: {
      const auto pooled = at::max_pool2d_with_indices(piece, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false);
      return at::max_pool2d_with_indices_backward(grad, piece, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false,
                                                  std::get<1>(pooled));
    }
    default:
      return grad;
  }
}

enum class BackwardRoute { kAuto, kFused, kSimt, kGather };

BackwardRoute backward_route() {  // UNETPP_FAST_CUDA_FUSED_BACKWARD, see the header comment
  const char* env = std::getenv("UNETPP_FAST_CUDA_FUSED_BACKWARD");
  const std::string value = env == nullptr ? "" : env;
  if (value.empty() || value == "auto") return BackwardRoute::kAuto;
  if (value == "1") return BackwardRoute::kFused;
  if (value == "simt") return BackwardRoute::kSimt;
  TORCH_CHECK_VALUE(value == "0" || value == "gather",
                    "UNETPP_FAST_CUDA_FUSED_BACKWARD must be unset, auto, 1, simt, 0 or gather, got '", value, "'");
  return BackwardRoute::kGather;
}

// The fused route: every piece's gradient, the weight and bias gradients from grad_pre and the
// pieces, with an fp32 split-K workspace but no virtual input and no virtual-input gradient:
// on tensor cores when the call qualifies (and `route` allows), else the SIMT kernels. Returns
// nothing when `route` is auto and the call is not the tensor-core backward's (gather + cuDNN then).
std::optional<std::vector<at::Tensor>> backward_fused(const at::Tensor& grad_pre_in, at::TensorList pieces,
                                                      at::IntArrayRef resample, const at::Tensor& weight,
                                                      const std::array<int64_t, 3>& dhw, bool has_bias,
                                                      cuda::DType dtype, BackwardRoute route) {
  const bool volume = weight.dim() == 5;
  const at::Tensor weight_c = weight.contiguous();
  bool pieces_channels_last = !volume;
  for (const at::Tensor& p : pieces) pieces_channels_last &= p.is_contiguous(at::MemoryFormat::ChannelsLast);
  // The tensor-core kernels read grad_pre channels_last (a copy only when the model runs NCHW pieces
  // channels_last, which the forward's output format makes rare).
  const at::Tensor grad_pre = route != BackwardRoute::kSimt && pieces_channels_last
                                  ? grad_pre_in.contiguous(at::MemoryFormat::ChannelsLast)
                                  : grad_pre_in;
  const auto five = [volume](const at::Tensor& t, int64_t out[5]) {
    const int64_t r = t.dim();
    out[0] = t.stride(0);
    out[1] = t.stride(1);
    out[2] = volume ? t.stride(2) : 0;
    out[3] = t.stride(r - 2);
    out[4] = t.stride(r - 1);
  };
  cuda::BwdParams b{};
  b.input = describe_virtual_input_nd(pieces, resample, dhw);
  int64_t g_strides[5];
  five(grad_pre, g_strides);
  b.grad_pre = grad_pre.data_ptr();
  b.g_stride_n = g_strides[0];
  b.g_stride_c = g_strides[1];
  b.g_stride_d = g_strides[2];
  b.g_stride_h = g_strides[3];
  b.g_stride_w = g_strides[4];
  b.weight = weight_c.data_ptr();
  b.batch = static_cast<int>(pieces[0].size(0));
  b.c_out = static_cast<int>(weight.size(0));
  b.k = static_cast<int>(weight.size(2));
  b.volume = volume ? 1 : 0;
  const bool tensor_cores = route != BackwardRoute::kSimt && cuda::tc_bwd_qualifies(b, dtype);
  bool all_pieces_on_tensor_cores = tensor_cores;
  for (int p = 0; p < b.input.num_pieces; ++p) all_pieces_on_tensor_cores &= cuda::tc_bwd_dgrad_covers(b, p);
  if (route == BackwardRoute::kAuto && !all_pieces_on_tensor_cores) return std::nullopt;

  std::vector<at::Tensor> grads;
  cuda::FusedBwdOutputs out{};
  for (size_t i = 0; i < pieces.size(); ++i) {
    // The tensor-core max-pool epilogue writes each window once; floor pooling's dropped rows / columns
    // are zero-filled here.
    const bool dropped =
        resample[i] == kMaxPool2 && (pieces[i].size(-2) != 2 * dhw[1] || pieces[i].size(-1) != 2 * dhw[2]);
    const at::TensorOptions options = pieces[i].options().memory_format(output_memory_format(pieces[i]));
    grads.push_back(tensor_cores && dropped ? at::zeros(pieces[i].sizes(), options)
                                            : at::empty(pieces[i].sizes(), options));
    out.grad_pieces[i] = grads.back().data_ptr();
    five(grads.back(), out.piece_strides[i]);
  }
  at::Tensor grad_weight = at::empty(weight_c.sizes(), weight_c.options());
  at::Tensor grad_bias = has_bias ? at::empty({weight.size(0)}, weight_c.options()) : at::Tensor();
  out.grad_weight = grad_weight.data_ptr();
  out.grad_bias = has_bias ? grad_bias.data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (tensor_cores) {
    const int splits = cuda::tc_bwd_splits(b);
    const at::Tensor packed = at::empty({cuda::tc_bwd_packed_weight_elements(b)}, weight_c.options());
    const at::Tensor partial =
        at::empty({cuda::tc_bwd_partial_elements(b, splits)}, weight_c.options().dtype(at::kFloat));
    check_launch(cuda::launch_fused_conv_backward_tc(b, dtype, out, packed.data_ptr(), partial.data_ptr<float>(),
                                                     splits, stream),
                 "tensor-core fused backward kernel launch");
  } else {
    const int splits = cuda::fused_backward_splits(b);
    const at::Tensor workspace =
        at::empty({static_cast<int64_t>(splits) * weight.size(0) * (weight.size(1) * weight_taps(weight) + 1)},
                  weight_c.options().dtype(at::kFloat));
    check_launch(cuda::launch_fused_conv_backward_fused(b, dtype, out, workspace.data_ptr<float>(), splits, stream),
                 "fused backward kernel launch");
  }
  grads.push_back(grad_weight);
  grads.push_back(has_bias ? grad_bias : grad_pre.new_empty({0}));
  return grads;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, at::TensorList pieces, at::IntArrayRef resample,
                                      const at::Tensor& weight, const std::optional<at::Tensor>& out, bool has_bias,
                                      std::string activation) {
  const char* op_name = "fused_conv_backward (cuda)";
  const auto dhw = check_fused_conv_args_nd(pieces, resample, weight, std::nullopt, activation, op_name);
  const bool volume = weight.dim() == 5;
  check_cuda_tensors(pieces, weight, op_name);
  const cuda::DType dtype = kernel_dtype(weight.scalar_type(), op_name);
  const std::vector<int64_t> out_shape = nd_shape(pieces[0].size(0), weight.size(0), dhw, volume);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), op_name, ": grad_out must have shape ",
                    at::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  const at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const Activation act = parse_activation(activation);
  const at::Tensor grad_pre = activation_backward(grad_out, out, act);
  const BackwardRoute route = backward_route();
  if (route != BackwardRoute::kGather && grad_pre.scalar_type() == weight.scalar_type()) {
    auto fused = backward_fused(grad_pre, pieces, resample, weight, dhw, has_bias, dtype, route);
    if (fused.has_value()) return std::move(*fused);
  }

  at::Tensor grad_virtual, grad_weight, grad_bias;
  {
    const at::Tensor virt = gather_virtual_input(pieces, resample, dhw, weight.size(1), dtype);
    const int64_t pad = weight.size(2) / 2, spatial = weight.dim() - 2;
    const std::vector<int64_t> bias_sizes{weight.size(0)};
    const std::vector<int64_t> ones(spatial, 1), pads(spatial, pad), zeros(spatial, 0);
    std::tie(grad_virtual, grad_weight, grad_bias) = at::convolution_backward(
        grad_pre.contiguous(virt.suggest_memory_format()), virt, weight, at::OptionalIntArrayRef(bias_sizes), ones,
        pads, ones, false, zeros, 1, {true, true, has_bias});
  }  // the transient virtual input is released here

  std::vector<at::Tensor> grads;
  int64_t offset = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t channels = pieces[i].size(1);
    const at::Tensor g = grad_virtual.narrow(1, offset, channels).contiguous(output_memory_format(pieces[i]));
    grads.push_back(resample_adjoint(g, pieces[i], resample[i]).contiguous(output_memory_format(pieces[i])));
    offset += channels;
  }
  grads.push_back(grad_weight.contiguous());
  grads.push_back(has_bias ? grad_bias : grad_pre.new_empty({0}));
  return grads;
}

}  // namespace
}  // namespace unetpp_fast

TORCH_LIBRARY_IMPL(unetpp_fast_C, CUDA, m) {
  m.impl("fused_conv_forward", &unetpp_fast::forward_cuda);
  m.impl("fused_conv_backward", &unetpp_fast::backward_cuda);
}
