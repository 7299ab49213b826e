// CPU implementation of the fused convolution (fp32/fp64; fp16/bf16 compute in fp32), 2D and 3D:
// one code path, 2D being the D = 1 case (one slice, kernel depth kd = 1, no depth resample).
//
// Nothing of the virtual input is materialised beyond a bounded per-thread tile: a strip of
// `rows` virtual rows (+ halo) is sampled through the resample of each piece, unfolded into a
// column matrix [C_in*k*k, rows*W] and multiplied by the weight matrix (at::mm on the tile).
//   forward: out_tile[C_out, T] = W[C_out, K] @ col[K, T], bias + activation in the epilogue.
//   wgrad:   dW += g_tile[C_out, T] @ col[K, T]^T, one accumulator per work group, summed at the end.
//   dgrad:   per piece and per block of *source* rows of one source slice (owned by one thread, so
//            no races): the virtual rows (of every virtual slice) that read the block get
//            grad_virtual = W_p^T-unfold of grad, routed through the resample adjoint into the
//            owned rows only.
// In 3D a work item is a tile of rows of one slice; the column matrix gains the kz taps.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../build_registry.h"
#include "../fused_conv_ops.h"

namespace unetpp_fast {
namespace {

const KernelRegistrar kRegistered("cpu:fused_conv_forward_im2col_gemm");
const KernelRegistrar kRegisteredBackward("cpu:fused_conv_backward_im2col_gemm");

constexpr int64_t kTileBytes = int64_t(1) << 21;           // column tile budget per thread
constexpr int64_t kWgradPartialBytes = int64_t(1) << 28;  // all per-group weight-gradient partials

template <typename scalar_t>
struct ReadPiece {
  const VirtualInput* v;
  int p;
  scalar_t operator()(int64_t offset) const {
    return static_cast<const scalar_t*>(v->pieces[p].data)[offset];
  }
};

// Bilinear taps along x of every piece, computed once per call.
template <typename scalar_t>
struct ColumnTaps {
  std::vector<LinearTap<scalar_t>> taps[kMaxPieces];

  explicit ColumnTaps(const VirtualInput& v) {
    for (int p = 0; p < v.num_pieces; ++p) {
      const PieceDesc& d = v.pieces[p];
      if (d.mode != kUpBilinear && d.mode != kUpBilinearAC) continue;
      taps[p].resize(v.width);
      for (int x = 0; x < v.width; ++x) taps[p][x] = bilinear_tap_for_mode<scalar_t>(x, d.width, v.width, d.mode);
    }
  }
};

// The 2D part of a row: dst[x] = plane[y, x] of one source slice `base` (already offset to
// (n, c, slice)) through the piece's in-plane resample.
template <typename scalar_t>
void sample_plane_row(const PieceDesc& d, const std::vector<LinearTap<scalar_t>>& taps, const scalar_t* base,
                      int y, int H, int W, scalar_t* dst) {
  switch (d.mode) {
    case kResampleNone: {
      const scalar_t* row = base + int64_t(y) * d.stride_h;
      if (d.stride_w == 1) {
        std::memcpy(dst, row, sizeof(scalar_t) * W);
      } else {
        for (int x = 0; x < W; ++x) dst[x] = row[x * d.stride_w];
      }
      return;
    }
    case kUpNearest: {
      const scalar_t* row = base + int64_t(nearest_source(y, d.height)) * d.stride_h;
      for (int x = 0; x < W; ++x) dst[x] = row[int64_t(nearest_source(x, d.width)) * d.stride_w];
      return;
    }
    case kUpBilinear:
    case kUpBilinearAC: {
      const LinearTap<scalar_t> ty = bilinear_tap_for_mode<scalar_t>(y, d.height, H, d.mode);
      const scalar_t* r0 = base + int64_t(ty.i0) * d.stride_h;
      const scalar_t* r1 = base + int64_t(ty.i1) * d.stride_h;
      for (int x = 0; x < W; ++x) {
        const LinearTap<scalar_t>& tx = taps[x];
        const int64_t c0 = tx.i0 * d.stride_w, c1 = tx.i1 * d.stride_w;
        dst[x] = ty.w0 * (tx.w0 * r0[c0] + tx.w1 * r0[c1]) + ty.w1 * (tx.w0 * r1[c0] + tx.w1 * r1[c1]);
      }
      return;
    }
    case kMaxPool2: {
      const scalar_t* r0 = base + int64_t(2 * y) * d.stride_h;
      const scalar_t* r1 = r0 + d.stride_h;
      for (int x = 0; x < W; ++x) {
        const int64_t c0 = int64_t(2 * x) * d.stride_w, c1 = c0 + d.stride_w;
        scalar_t value;
        maxpool2_argmax<scalar_t>(r0[c0], r0[c1], r1[c0], r1[c1], &value);
        dst[x] = value;
      }
      return;
    }
  }
}

// dst[x] = virtual[n, channel c of piece p, z, y, x] for x in [0, W); (z, y) inside the volume.
// 2D pieces (no depth resample, stride_d 0) read their one plane: exactly the 2D arithmetic.
template <typename scalar_t>
void sample_row(const VirtualInput& v, const ColumnTaps<scalar_t>& ct, int p, int64_t n, int c, int z, int y,
                scalar_t* dst) {
  const PieceDesc& d = v.pieces[p];
  const scalar_t* base = static_cast<const scalar_t*>(d.data) + n * d.stride_n + int64_t(c) * d.stride_c;
  const int W = v.width;
  const LinearTap<scalar_t> tz = depth_tap<scalar_t>(d, z, v.depth);
  if (!d.resample_depth || d.mode == kResampleNone || d.mode == kUpNearest) {
    sample_plane_row(d, ct.taps[p], base + int64_t(tz.i0) * d.stride_d, y, v.height, W, dst);
    return;
  }
  if (d.mode == kMaxPool2) {  // 2x2x2 window, PyTorch's scan order (d, h, w)
    const scalar_t* s0 = base + int64_t(tz.i0) * d.stride_d + int64_t(2 * y) * d.stride_h;
    const int64_t sd = d.stride_d, sh = d.stride_h;
    for (int x = 0; x < W; ++x) {
      const scalar_t* q = s0 + int64_t(2 * x) * d.stride_w;
      const int64_t sw = d.stride_w;
      const scalar_t vals[8] = {q[0],      q[sw],      q[sh],      q[sh + sw],
                                q[sd],     q[sd + sw], q[sd + sh], q[sd + sh + sw]};
      scalar_t value;
      maxpool_argmax<scalar_t, 8>(vals, &value);
      dst[x] = value;
    }
    return;
  }
  // Trilinear: the bilinear rows of the two source slices, then the depth taps (PyTorch's order).
  thread_local std::vector<scalar_t> second;
  second.resize(W);
  sample_plane_row(d, ct.taps[p], base + int64_t(tz.i0) * d.stride_d, y, v.height, W, dst);
  sample_plane_row(d, ct.taps[p], base + int64_t(tz.i1) * d.stride_d, y, v.height, W, second.data());
  for (int x = 0; x < W; ++x) dst[x] = tz.w0 * dst[x] + tz.w1 * second[x];
}

// Column matrix col[(c, kz, ky, kx), (r, x)] = virtual[n, c, z + kz - pad_d, y0 + r + ky - pad,
// x + kx - pad] (0 outside) for r in [0, rows), all channels; kd = 1 and pad_d = 0 in 2D. `strip`
// is scratch of (rows + 2 pad) * (W + 2 pad) per channel.
template <typename scalar_t>
void unfold_virtual(const VirtualInput& v, const ColumnTaps<scalar_t>& ct, int64_t n, int z, int y0, int rows,
                    int k, int kd, scalar_t* strip, scalar_t* col) {
  const int pad = k / 2, pad_d = kd / 2, W = v.width, H = v.height;
  const int strip_rows = rows + 2 * pad, strip_cols = W + 2 * pad;
  const int64_t tile = int64_t(rows) * W;
  for (int c = 0; c < v.channels; ++c) {
    const int p = piece_of_channel(v, c);
    const int local = c - v.pieces[p].channel_offset;
    if (k == 1) {  // the strip is the column matrix
      for (int r = 0; r < rows; ++r) sample_row(v, ct, p, n, local, z, y0 + r, col + c * tile + int64_t(r) * W);
      continue;
    }
    for (int kz = 0; kz < kd; ++kz) {
      const int vz = z + kz - pad_d;
      scalar_t* s = strip;  // one channel and slice at a time: the strip stays in cache
      for (int r = 0; r < strip_rows; ++r) {
        scalar_t* srow = s + int64_t(r) * strip_cols;
        const int y = y0 - pad + r;
        srow[0] = srow[strip_cols - 1] = scalar_t(0);
        if (y < 0 || y >= H || vz < 0 || vz >= v.depth) {
          std::fill(srow, srow + strip_cols, scalar_t(0));
        } else {
          sample_row(v, ct, p, n, local, vz, y, srow + pad);
        }
      }
      for (int ky = 0; ky < k; ++ky) {
        for (int kx = 0; kx < k; ++kx) {
          scalar_t* dst = col + ((int64_t(c) * kd + kz) * k * k + ky * k + kx) * tile;
          for (int r = 0; r < rows; ++r) {
            std::memcpy(dst + int64_t(r) * W, s + int64_t(r + ky) * strip_cols + kx, sizeof(scalar_t) * W);
          }
        }
      }
    }
  }
}

struct Tiling {
  int rows;            // virtual rows per tile
  int tiles_per_image;
};

// `budget`: column-tile bytes per thread (kTileBytes in 2D; kd times that in 3D, where K holds the
// kz taps too, so that a tile keeps as many pixels and the GEMM stays as wide).
Tiling choose_tiling(int64_t batch, int H, int W, int64_t K, size_t elem, int64_t budget) {
  const int64_t per_row = std::max<int64_t>(1, K * W * int64_t(elem));
  int64_t rows = std::max<int64_t>(1, budget / per_row);
  // Enough tiles for every thread a few times over.
  const int64_t want_tiles = 4 * int64_t(at::get_num_threads());
  const int64_t rows_for_threads = std::max<int64_t>(1, (batch * H + want_tiles - 1) / want_tiles);
  rows = std::min<int64_t>({rows, rows_for_threads, H});
  return {static_cast<int>(rows), static_cast<int>((H + rows - 1) / rows)};
}

at::Tensor tensor_options_buffer(int64_t numel, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(numel, 1)}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Kernel geometry of a call: k per in-plane axis, kd along depth (1 in 2D); one work item is a
// tile of rows of one slice z of one sample n.
struct Geometry {
  int64_t N, C_out, K;  // K = C_in * kd * k * k
  int k, kd, D, H, W;
};

Geometry geometry(const VirtualInput& v, const at::Tensor& weight, int64_t batch) {
  const int k = static_cast<int>(weight.size(-1));
  const int kd = weight.dim() == 5 ? k : 1;
  return {batch, weight.size(0), int64_t(v.channels) * kd * k * k, k, kd, v.depth, v.height, v.width};
}

template <typename scalar_t>
void forward_kernel(const VirtualInput& v, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const Activation& act, at::Tensor& out) {
  const Geometry g = geometry(v, weight, out.size(0));
  const int64_t C_out = g.C_out, K = g.K;
  const int k = g.k, pad = k / 2, D = g.D, H = g.H, W = g.W;
  const at::Tensor wmat = weight.contiguous().view({C_out, K});
  const at::Tensor bias_c = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  const scalar_t* bias_ptr = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
  const Tiling tiling = choose_tiling(g.N * D, H, W, K, sizeof(scalar_t), kTileBytes * g.kd);
  const ColumnTaps<scalar_t> ct(v);
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int r = static_cast<int>(out.dim());
  const int64_t osn = out.stride(0), osc = out.stride(1), osd = r == 5 ? out.stride(2) : 0;
  const int64_t osh = out.stride(r - 2), osw = out.stride(r - 1);
  const scalar_t slope = static_cast<scalar_t>(act.slope);

  at::parallel_for(0, g.N * D * tiling.tiles_per_image, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile_max = int64_t(tiling.rows) * W;
    at::Tensor strip = tensor_options_buffer(int64_t(tiling.rows + 2 * pad) * (W + 2 * pad), out);
    at::Tensor col = tensor_options_buffer(K * tile_max, out);
    at::Tensor acc = tensor_options_buffer(C_out * tile_max, out);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slice = item / tiling.tiles_per_image;  // n * D + z
      const int64_t n = slice / D;
      const int z = static_cast<int>(slice % D);
      const int y0 = static_cast<int>(item % tiling.tiles_per_image) * tiling.rows;
      const int rows = std::min(tiling.rows, H - y0);
      const int64_t T = int64_t(rows) * W;
      unfold_virtual<scalar_t>(v, ct, n, z, y0, rows, k, g.kd, strip.data_ptr<scalar_t>(), col.data_ptr<scalar_t>());
      at::Tensor acc_view = acc.narrow(0, 0, C_out * T).view({C_out, T});
      at::mm_out(acc_view, wmat, col.narrow(0, 0, K * T).view({K, T}));
      const scalar_t* a = acc_view.data_ptr<scalar_t>();
      for (int64_t co = 0; co < C_out; ++co) {
        const scalar_t b = bias_ptr ? bias_ptr[co] : scalar_t(0);
        const scalar_t* arow = a + co * T;
        scalar_t* obase = out_ptr + n * osn + co * osc + z * osd;
        for (int rr = 0; rr < rows; ++rr) {
          scalar_t* orow = obase + int64_t(y0 + rr) * osh;
          for (int x = 0; x < W; ++x) {
            orow[x * osw] = apply_activation<scalar_t>(arow[int64_t(rr) * W + x] + b, act.kind, slope);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
at::Tensor weight_grad(const VirtualInput& v, const at::Tensor& grad_pre, const at::Tensor& weight) {
  const Geometry g = geometry(v, weight, grad_pre.size(0));
  const int64_t C_out = g.C_out, K = g.K;
  const int k = g.k, pad = k / 2, D = g.D, H = g.H, W = g.W;
  const Tiling tiling = choose_tiling(g.N * D, H, W, K, sizeof(scalar_t), kTileBytes * g.kd);
  const ColumnTaps<scalar_t> ct(v);
  const int64_t items = g.N * D * tiling.tiles_per_image;
  // A fixed number of groups, each with its own accumulator: no races, deterministic for a thread count.
  // Partial weight gradients are capped at kWgradPartialBytes in all (many threads, big layers).
  const int64_t weight_bytes = C_out * K * int64_t(sizeof(scalar_t));
  const int64_t max_groups = std::max<int64_t>(1, kWgradPartialBytes / std::max<int64_t>(1, weight_bytes));
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>({items, int64_t(at::get_num_threads()), max_groups}));
  at::Tensor partial = at::zeros({groups, C_out, K}, grad_pre.options());
  const at::Tensor g2d = grad_pre.view({g.N, C_out, int64_t(D) * H * W});

  at::parallel_for(0, groups, 1, [&](int64_t gbegin, int64_t gend) {
    const int64_t tile_max = int64_t(tiling.rows) * W;
    at::Tensor strip = tensor_options_buffer(int64_t(tiling.rows + 2 * pad) * (W + 2 * pad), grad_pre);
    at::Tensor col = tensor_options_buffer(K * tile_max, grad_pre);
    for (int64_t gi = gbegin; gi < gend; ++gi) {
      at::Tensor acc = partial[gi];
      for (int64_t item = gi * items / groups; item < (gi + 1) * items / groups; ++item) {
        const int64_t slice = item / tiling.tiles_per_image;
        const int64_t n = slice / D;
        const int z = static_cast<int>(slice % D);
        const int y0 = static_cast<int>(item % tiling.tiles_per_image) * tiling.rows;
        const int rows = std::min(tiling.rows, H - y0);
        const int64_t T = int64_t(rows) * W;
        unfold_virtual<scalar_t>(v, ct, n, z, y0, rows, k, g.kd, strip.data_ptr<scalar_t>(),
                                 col.data_ptr<scalar_t>());
        const at::Tensor g_tile = g2d[n].narrow(1, (int64_t(z) * H + y0) * W, T);
        acc.addmm_(g_tile, col.narrow(0, 0, K * T).view({K, T}).t());
      }
    }
  });
  return partial.sum(0).view(weight.sizes());
}

// grad_virtual of piece p's channels over virtual rows [y_lo, y_hi) of slice vz: out[c, (r, x)] =
// sum_{co, kz, ky, kx} W[co, off + c, kz, ky, kx] * grad_pre[n, co, vz + pad_d - kz, y + pad - ky,
// x + pad - kx] (kd = 1, pad_d = 0 in 2D).
template <typename scalar_t>
void piece_virtual_grad(const scalar_t* g, const Geometry& geo, int64_t n, int vz, int y_lo, int y_hi,
                        const at::Tensor& wp_mat, scalar_t* gstrip, scalar_t* gcol, at::Tensor& result) {
  const int64_t C_out = geo.C_out;
  const int k = geo.k, kd = geo.kd, pad = k / 2, pad_d = kd / 2, D = geo.D, H = geo.H, W = geo.W;
  const int rows = y_hi - y_lo;
  const int64_t T = int64_t(rows) * W;
  const int64_t KK = C_out * kd * k * k;
  const int64_t plane = int64_t(H) * W;
  if (k == 1) {
    for (int64_t co = 0; co < C_out; ++co) {
      std::memcpy(gcol + co * T, g + ((n * C_out + co) * D + vz) * plane + int64_t(y_lo) * W, sizeof(scalar_t) * T);
    }
  } else {
    // Strip row r holds grad row y_lo - pad + r, strip column q grad column q - pad (0 outside).
    const int strip_rows = rows + 2 * pad, strip_cols = W + 2 * pad;
    for (int64_t co = 0; co < C_out; ++co) {
      for (int kz = 0; kz < kd; ++kz) {
        const int gz = vz + pad_d - kz;
        const bool inside = gz >= 0 && gz < D;
        const scalar_t* gc = g + ((n * C_out + co) * D + (inside ? gz : 0)) * plane;
        for (int r = 0; r < strip_rows; ++r) {
          scalar_t* srow = gstrip + int64_t(r) * strip_cols;
          const int y = y_lo - pad + r;
          std::fill(srow, srow + strip_cols, scalar_t(0));
          if (inside && y >= 0 && y < H) std::memcpy(srow + pad, gc + int64_t(y) * W, sizeof(scalar_t) * W);
        }
        // grad[y + pad - ky, x + pad - kx] for y = y_lo + r is strip (r + 2 pad - ky, x + 2 pad - kx).
        for (int ky = 0; ky < k; ++ky) {
          for (int kx = 0; kx < k; ++kx) {
            scalar_t* dst = gcol + (((co * kd + kz) * k + ky) * k + kx) * T;
            for (int r = 0; r < rows; ++r) {
              std::memcpy(dst + int64_t(r) * W, gstrip + int64_t(r + 2 * pad - ky) * strip_cols + (2 * pad - kx),
                          sizeof(scalar_t) * W);
            }
          }
        }
      }
    }
  }
  at::mm_out(result, wp_mat, at::from_blob(gcol, {KK, T}, result.options()));
}

struct DgradItem {
  int piece;
  int64_t n;
  int src_z_lo, src_z_hi;  // owned source slices ([0, 1) in 2D)
  int src_lo, src_hi;      // owned source rows of those slices
};

// Route the virtual gradient `gc` (rows [y_lo, y_hi) of virtual slice vz, one channel) through the
// piece's resample adjoint into the owned source slices and rows only. `oc` is the channel's
// gradient (slice 0), `sd`, `sh`, `sw` its strides.
template <typename scalar_t>
void scatter_to_source(const PieceDesc& d, const std::vector<LinearTap<scalar_t>>& taps, const DgradItem& it,
                       const scalar_t* src, int c, int vz, int D, int H, int W, int y_lo, int y_hi,
                       const scalar_t* gc, scalar_t* oc, int64_t sd, int64_t sh, int64_t sw) {
  const auto owned = [&](int sz) { return sz >= it.src_z_lo && sz < it.src_z_hi; };
  switch (d.mode) {
    case kResampleNone: {
      if (!owned(vz)) return;
      scalar_t* os = oc + int64_t(vz) * sd;
      for (int y = y_lo; y < y_hi; ++y)
        for (int x = 0; x < W; ++x) os[int64_t(y) * sh + x * sw] = gc[int64_t(y - y_lo) * W + x];
      return;
    }
    case kUpNearest: {
      const int sz = d.resample_depth ? nearest_source(vz, d.depth) : vz;
      if (!owned(sz)) return;
      scalar_t* os = oc + int64_t(sz) * sd;
      for (int y = y_lo; y < y_hi; ++y) {
        const int sy = nearest_source(y, d.height);
        for (int x = 0; x < W; ++x)
          os[int64_t(sy) * sh + int64_t(nearest_source(x, d.width)) * sw] += gc[int64_t(y - y_lo) * W + x];
      }
      return;
    }
    case kUpBilinear:
    case kUpBilinearAC: {
      // The depth taps of this virtual slice (one tap of weight 1 in 2D, applied without a multiply).
      const LinearTap<scalar_t> tz = depth_tap<scalar_t>(d, vz, D);
      const int ntaps = d.resample_depth ? 2 : 1;
      for (int t = 0; t < ntaps; ++t) {
        const int sz = t == 0 ? tz.i0 : tz.i1;
        const scalar_t wz = t == 0 ? tz.w0 : tz.w1;
        if (!owned(sz)) continue;
        scalar_t* os = oc + int64_t(sz) * sd;
        for (int y = y_lo; y < y_hi; ++y) {
          const LinearTap<scalar_t> ty = bilinear_tap_for_mode<scalar_t>(y, d.height, H, d.mode);
          const bool own0 = ty.i0 >= it.src_lo && ty.i0 < it.src_hi;
          const bool own1 = ty.i1 >= it.src_lo && ty.i1 < it.src_hi;
          scalar_t* r0 = os + int64_t(ty.i0) * sh;
          scalar_t* r1 = os + int64_t(ty.i1) * sh;
          for (int x = 0; x < W; ++x) {
            const LinearTap<scalar_t>& tx = taps[x];
            const scalar_t g = gc[int64_t(y - y_lo) * W + x];
            const scalar_t gval = d.resample_depth ? wz * g : g;
            if (own0) {
              r0[tx.i0 * sw] += ty.w0 * tx.w0 * gval;
              r0[tx.i1 * sw] += ty.w0 * tx.w1 * gval;
            }
            if (own1) {
              r1[tx.i0 * sw] += ty.w1 * tx.w0 * gval;
              r1[tx.i1 * sw] += ty.w1 * tx.w1 * gval;
            }
          }
        }
      }
      return;
    }
    case kMaxPool2: {
      const scalar_t* sbase = src + it.n * d.stride_n + int64_t(c) * d.stride_c;
      if (!d.resample_depth) {
        for (int y = y_lo; y < y_hi; ++y) {
          for (int x = 0; x < W; ++x) {
            const int64_t r0 = int64_t(2 * y), c0 = int64_t(2 * x);
            const scalar_t* s0 = sbase + r0 * d.stride_h + c0 * d.stride_w;
            scalar_t value;
            const int arg = maxpool2_argmax<scalar_t>(s0[0], s0[d.stride_w], s0[d.stride_h],
                                                      s0[d.stride_h + d.stride_w], &value);
            oc[(r0 + (arg >> 1)) * sh + (c0 + (arg & 1)) * sw] += gc[int64_t(y - y_lo) * W + x];
          }
        }
        return;
      }
      // 2x2x2: the window spans source slices 2 vz and 2 vz + 1 (owned together: even slice blocks).
      const int64_t pd = d.stride_d, ph = d.stride_h, pw = d.stride_w;
      for (int y = y_lo; y < y_hi; ++y) {
        for (int x = 0; x < W; ++x) {
          const int64_t r0 = int64_t(2 * y), c0 = int64_t(2 * x);
          const scalar_t* q = sbase + int64_t(2 * vz) * pd + r0 * ph + c0 * pw;
          const scalar_t vals[8] = {q[0],      q[pw],      q[ph],      q[ph + pw],
                                    q[pd],     q[pd + pw], q[pd + ph], q[pd + ph + pw]};
          scalar_t value;
          const int arg = maxpool_argmax<scalar_t, 8>(vals, &value);
          const int sz = 2 * vz + (arg >> 2);
          if (!owned(sz)) continue;
          oc[int64_t(sz) * sd + (r0 + ((arg >> 1) & 1)) * sh + (c0 + (arg & 1)) * sw] +=
              gc[int64_t(y - y_lo) * W + x];
        }
      }
      return;
    }
  }
}

template <typename scalar_t>
void piece_grads(const VirtualInput& v, const at::Tensor& grad_pre, const at::Tensor& weight,
                 std::vector<at::Tensor>& grads) {
  const Geometry geo = geometry(v, weight, grad_pre.size(0));
  const int64_t N = geo.N, C_out = geo.C_out;
  const int k = geo.k, kd = geo.kd, pad = k / 2, D = geo.D, H = geo.H, W = geo.W;
  const int64_t KK = C_out * kd * k * k;
  std::vector<at::Tensor> wp_mats;
  std::vector<DgradItem> items;
  int max_cp = 1;
  for (int p = 0; p < v.num_pieces; ++p) {
    const PieceDesc& d = v.pieces[p];
    max_cp = std::max(max_cp, d.channels);
    // W_p^T as [C_p, C_out * kd * k * k], matching the unfolded gradient's row order (co, kz, ky, kx).
    wp_mats.push_back(weight.narrow(1, d.channel_offset, d.channels).transpose(0, 1).contiguous().view({d.channels, KK}));
    // Source rows per block: about one tile of virtual rows, enough blocks for every thread, and
    // even so that a 2x2 pooling window never straddles two blocks.
    const int64_t rows_budget = std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, KK * W * int64_t(sizeof(scalar_t))));
    int64_t block = rows_budget;
    if (d.mode == kUpNearest || d.mode == kUpBilinear || d.mode == kUpBilinearAC) block = rows_budget / 2;
    if (d.mode == kMaxPool2) block = rows_budget * 2;
    const int64_t want = 4 * int64_t(at::get_num_threads());
    block = std::min<int64_t>(block, (N * d.depth * d.height + want - 1) / want);
    block = std::max<int64_t>(2, block + block % 2);
    // Source slices per block: two where a virtual slice reads two source slices (a 2x2x2 window
    // then never straddles blocks, and a trilinear slice is computed for fewer blocks), else one.
    const int zblock = d.resample_depth && (d.mode == kMaxPool2 || d.mode == kUpBilinear || d.mode == kUpBilinearAC)
                           ? 2 : 1;
    for (int64_t n = 0; n < N; ++n) {
      for (int sz = 0; sz < d.depth; sz += zblock) {
        for (int lo = 0; lo < d.height; lo += static_cast<int>(block)) {
          items.push_back({p, n, sz, std::min(sz + zblock, d.depth), lo, std::min(lo + static_cast<int>(block), d.height)});
        }
      }
    }
  }
  const ColumnTaps<scalar_t> ct(v);
  const scalar_t* g = grad_pre.data_ptr<scalar_t>();

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> gstrip, gcol;
    at::Tensor result_buf;
    for (int64_t i = begin; i < end; ++i) {
      const DgradItem& it = items[i];
      const PieceDesc& d = v.pieces[it.piece];
      int y_lo, y_hi, z_lo, z_hi;
      virtual_rows_reading<scalar_t>(d.mode, it.src_lo, it.src_hi, d.height, H, &y_lo, &y_hi);
      // The virtual slices that read the owned source slices (the one slice itself in 2D).
      virtual_rows_reading<scalar_t>(d.resample_depth ? d.mode : kResampleNone, it.src_z_lo, it.src_z_hi, d.depth, D,
                                     &z_lo, &z_hi);
      if (y_hi <= y_lo) continue;  // rows no output reads (odd row under maxpool2): gradient stays 0
      const int rows = y_hi - y_lo;
      const int64_t T = int64_t(rows) * W;
      gstrip.resize(size_t(rows + 2 * pad) * (W + 2 * pad));
      gcol.resize(size_t(KK * T));
      if (!result_buf.defined() || result_buf.numel() < int64_t(max_cp) * T) {
        result_buf = at::empty({int64_t(max_cp) * T}, grad_pre.options());
      }
      at::Tensor gv = result_buf.narrow(0, 0, int64_t(d.channels) * T).view({d.channels, T});
      at::Tensor& out = grads[it.piece];
      scalar_t* o = out.data_ptr<scalar_t>();
      const int r = static_cast<int>(out.dim());
      const int64_t sn = out.stride(0), sc = out.stride(1), sd = r == 5 ? out.stride(2) : 0;
      const int64_t sh = out.stride(r - 2), sw = out.stride(r - 1);
      const scalar_t* src = static_cast<const scalar_t*>(d.data);
      for (int vz = z_lo; vz < z_hi; ++vz) {
        piece_virtual_grad<scalar_t>(g, geo, it.n, vz, y_lo, y_hi, wp_mats[it.piece], gstrip.data(), gcol.data(),
                                     gv);
        const scalar_t* gvp = gv.data_ptr<scalar_t>();
        for (int c = 0; c < d.channels; ++c) {
          scatter_to_source<scalar_t>(d, ct.taps[it.piece], it, src, c, vz, D, H, W, y_lo, y_hi,
                                      gvp + int64_t(c) * T, o + it.n * sn + c * sc, sd, sh, sw);
        }
      }
    }
  });
}

// [N, C_out, H, W] for a 4-D weight, [N, C_out, D, H, W] for a 5-D one.
std::vector<int64_t> output_shape(int64_t batch, const at::Tensor& weight, const std::array<int64_t, 3>& dhw) {
  if (weight.dim() == 5) return {batch, weight.size(0), dhw[0], dhw[1], dhw[2]};
  return {batch, weight.size(0), dhw[1], dhw[2]};
}

bool needs_fp32_compute(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

std::vector<at::Tensor> upcast(at::TensorList pieces) {
  std::vector<at::Tensor> result;
  for (const auto& p : pieces) result.push_back(p.to(at::kFloat));
  return result;
}

at::Tensor forward_cpu(at::TensorList pieces, at::IntArrayRef resample, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, std::string activation) {
  const auto dhw = check_fused_conv_args_nd(pieces, resample, weight, bias, activation, "fused_conv_forward (cpu)");
  const at::NoGradGuard no_grad;  // the tile GEMMs are internal: never recorded by autograd
  const Activation act = parse_activation(activation);
  if (needs_fp32_compute(weight.scalar_type())) {  // no half GEMM worth having on CPU: compute in fp32
    std::optional<at::Tensor> bias32;
    if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat);
    const std::vector<at::Tensor> p32 = upcast(pieces);
    return forward_cpu(p32, resample, weight.to(at::kFloat), bias32, activation)
        .to(weight.scalar_type())
        .contiguous(output_memory_format(pieces[0]));
  }
  const VirtualInput v = describe_virtual_input_nd(pieces, resample, dhw);
  at::Tensor out = at::empty(output_shape(pieces[0].size(0), weight, dhw),
                             weight.options().memory_format(output_memory_format(pieces[0])));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fused_conv_forward_cpu",
                             [&] { forward_kernel<scalar_t>(v, weight, bias, act, out); });
  return out;
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_out, at::TensorList pieces, at::IntArrayRef resample,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& out, bool has_bias,
                                     std::string activation) {
  const auto dhw =
      check_fused_conv_args_nd(pieces, resample, weight, std::nullopt, activation, "fused_conv_backward (cpu)");
  const at::NoGradGuard no_grad;
  const std::vector<int64_t> expected = output_shape(pieces[0].size(0), weight, dhw);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(expected), "fused_conv_backward (cpu): grad_out must have shape ",
                    at::IntArrayRef(expected), ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == weight.scalar_type(), "fused_conv_backward (cpu): grad_out has dtype ",
                   grad_out.scalar_type(), " but weight has ", weight.scalar_type());
  const Activation act = parse_activation(activation);
  if (needs_fp32_compute(weight.scalar_type())) {
    std::optional<at::Tensor> out32;
    if (out.has_value() && out->defined()) out32 = out->to(at::kFloat);
    std::vector<at::Tensor> grads = backward_cpu(grad_out.to(at::kFloat), upcast(pieces), resample,
                                                 weight.to(at::kFloat), out32, has_bias, activation);
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::MemoryFormat fmt = i < pieces.size() ? output_memory_format(pieces[i]) : at::MemoryFormat::Contiguous;
      grads[i] = grads[i].to(weight.scalar_type()).contiguous(fmt);
    }
    return grads;
  }
  const at::Tensor grad_pre = activation_backward(grad_out, out, act).contiguous();
  const VirtualInput v = describe_virtual_input_nd(pieces, resample, dhw);
  std::vector<at::Tensor> grads;
  for (const auto& p : pieces) {
    grads.push_back(at::empty(p.sizes(), p.options().memory_format(output_memory_format(p))).zero_());
  }
  at::Tensor grad_weight;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fused_conv_backward_cpu", [&] {
    piece_grads<scalar_t>(v, grad_pre, weight, grads);
    grad_weight = weight_grad<scalar_t>(v, grad_pre, weight);
  });
  grads.push_back(grad_weight);
  std::vector<int64_t> reduce{0};
  for (int64_t d = 2; d < grad_pre.dim(); ++d) reduce.push_back(d);
  grads.push_back(has_bias ? grad_pre.sum(reduce) : grad_pre.new_empty({0}));
  return grads;
}

}  // namespace
}  // namespace unetpp_fast

TORCH_LIBRARY_IMPL(unetpp_fast_C, CPU, m) {
  m.impl("fused_conv_forward", &unetpp_fast::forward_cpu);
  m.impl("fused_conv_backward", &unetpp_fast::backward_cpu);
}
