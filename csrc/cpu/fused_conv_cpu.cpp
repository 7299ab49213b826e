// CPU implementation of the fused convolution (fp32/fp64; fp16/bf16 compute in fp32), 2D and 3D:
// one code path, 2D being the D = 1 case (one slice, kernel depth kd = 1, no depth resample).
//
// Every path is parallel at exactly one level: the backend's own loops (at::parallel_for) only
// sample, copy and scatter; the arithmetic runs in one library call at a time (oneDNN or BLAS),
// made outside any parallel region, so the library's threads are the only ones inside it: no
// nested parallelism, no oversubscription. Work is cut into chunks by bytes, never by the thread
// count, so a deep node's whole batch is one call that streams the weight once.
//
// fp32 (oneDNN available): the virtual input is built tile by tile (whole samples, or bands of the
// outermost spatial axis with explicit halo rows, at most kChunkBytes), each piece sampled through
// its resample straight into the tile (the concatenation and the resamples fused, the tile written
// once and read from cache); oneDNN's convolution runs on the tile, bias included, the activation
// in place. The backward samples the same tiles again (nothing saved), one convolution_backward per
// tile gives the tile's and the weight's gradients, and the tile's gradient is added through each
// piece's resample adjoint. A single plain piece needs no tile: the convolution reads it directly.
//
// fp64 (no oneDNN kernels) and empty shapes: im2col + GEMM over chunks of whole rows (n, z, y):
//   1. unfold (at::parallel_for over row segments x channel sets) into col[C_in*kd*k*k, T];
//   2. one GEMM over the chunk (at::mm, BLAS threads);
//   3. epilogue / scatter (at::parallel_for).
//   forward: out[C_out, T] = W[C_out, K] @ col[K, T], bias + activation in the epilogue.
//   wgrad:   dW += g[C_out, T] @ col[K, T]^T, one accumulator, chunk after chunk.
//   dgrad:   grad_virtual[C_in, T] = W^T-unfold of grad (all pieces in one GEMM), then routed
//            through each piece's resample adjoint, in parallel over channels (a channel's source
//            plane is written by that channel only: no races, and a fixed summation order).
// Nothing of the virtual input is materialised beyond one chunk or tile (kChunkBytes).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros_like.h>
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
const KernelRegistrar kRegisteredTiles("cpu:fused_conv_forward_virtual_tile_onednn");
const KernelRegistrar kRegisteredTilesBackward("cpu:fused_conv_backward_virtual_tile_onednn");

// Bytes of one chunk's column matrix (one GEMM) or one virtual tile (one convolution). Large
// enough that the call is wide and the weight is streamed rarely (a deep 6x6 node takes its whole
// batch at once), small enough to stay in the last-level cache beside the weight.
constexpr int64_t kChunkBytes = int64_t(1) << 23;
// Parallel work items per thread in the unfold and epilogue phases (load balance on busy cores).
constexpr int64_t kItemsPerThread = 4;


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

// Column matrix rows for channels c_first, c_first + c_step, ... < C_in: col[(c, kz, ky, kx) * ld + (r, x)] =
// virtual[n, c, z + kz - pad_d, y0 + r + ky - pad, x + kx - pad] (0 outside) for r in [0, rows);
// kd = 1 and pad_d = 0 in 2D. `col` points at the segment's first column; `strip` is scratch of
// (rows + 2 pad) * (W + 2 pad).
template <typename scalar_t>
void unfold_virtual(const VirtualInput& v, const ColumnTaps<scalar_t>& ct, int64_t n, int z, int y0, int rows,
                    int k, int kd, int c_first, int c_step, scalar_t* strip, scalar_t* col, int64_t ld) {
  const int pad = k / 2, pad_d = kd / 2, W = v.width, H = v.height;
  const int strip_rows = rows + 2 * pad, strip_cols = W + 2 * pad;
  for (int c = c_first; c < v.channels; c += c_step) {
    const int p = piece_of_channel(v, c);
    const int local = c - v.pieces[p].channel_offset;
    if (k == 1) {  // the strip is the column matrix
      for (int r = 0; r < rows; ++r) sample_row(v, ct, p, n, local, z, y0 + r, col + c * ld + int64_t(r) * W);
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
          scalar_t* dst = col + ((int64_t(c) * kd + kz) * k * k + ky * k + kx) * ld;
          for (int r = 0; r < rows; ++r) {
            std::memcpy(dst + int64_t(r) * W, s + int64_t(r + ky) * strip_cols + kx, sizeof(scalar_t) * W);
          }
        }
      }
    }
  }
}

at::Tensor tensor_options_buffer(int64_t numel, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(numel, 1)}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Kernel geometry of a call: k per in-plane axis, kd along depth (1 in 2D). Rows are numbered
// globally: row r = (n * D + z) * H + y holds the W pixels of (n, z, y).
struct Geometry {
  int64_t N, C_out, K;  // K = C_in * kd * k * k
  int k, kd, D, H, W;
  int64_t rows() const { return N * D * H; }
};

Geometry geometry(const VirtualInput& v, const at::Tensor& weight, int64_t batch) {
  const int k = static_cast<int>(weight.size(-1));
  const int kd = weight.dim() == 5 ? k : 1;
  return {batch, weight.size(0), int64_t(v.channels) * kd * k * k, k, kd, v.depth, v.height, v.width};
}

// Rows per chunk so that a chunk's widest matrix ([height, rows * W], height the largest of the
// matrices the pass builds) stays within kChunkBytes; chunks of equal size.
int64_t chunk_rows(const Geometry& g, int64_t height, size_t elem) {
  if (g.rows() == 0) return 1;  // an empty batch: no chunk runs
  const int64_t per_row = std::max<int64_t>(1, height * g.W * int64_t(elem));
  const int64_t fit = std::clamp<int64_t>(kChunkBytes / per_row, 1, g.rows());
  const int64_t chunks = (g.rows() + fit - 1) / fit;
  return (g.rows() + chunks - 1) / chunks;
}

// Rows [first, first + rows) of one slice (n, z), starting at column `col_offset` of its chunk.
struct RowSegment {
  int64_t n;
  int z, y0, rows;
  int64_t col_offset;
};

// The parallel work of one chunk [r0, r1): row segments (never crossing a slice) times channel
// sets, enough items for every thread a few times over. Channel sets come first (splitting rows
// more finely samples the k - 1 halo rows of each segment again); a set takes every blocks-th
// channel, so that cheap (plain) and dear (bilinear) pieces are spread over all sets, and items are
// numbered set-major, so that at::parallel_for's contiguous ranges get equal shares.
struct ChunkWork {
  std::vector<RowSegment> segments;
  int64_t blocks;  // channel sets: set b holds channels b, b + blocks, ...
  int max_rows;
  int64_t items() const { return int64_t(segments.size()) * blocks; }
  int64_t first_channel(int64_t item) const { return item / static_cast<int64_t>(segments.size()); }
  const RowSegment& segment(int64_t item) const { return segments[item % segments.size()]; }
};

ChunkWork split_chunk(const Geometry& g, int64_t r0, int64_t r1, int64_t channels) {
  const int64_t want = kItemsPerThread * int64_t(at::get_num_threads());
  channels = std::max<int64_t>(channels, 1);                   // no channels: items that do nothing
  const int64_t row_parts = (want + channels - 1) / channels;  // > 1 only when channels are few
  const int64_t max_rows = std::max<int64_t>(1, (r1 - r0 + row_parts - 1) / row_parts);
  ChunkWork work{{}, 1, 0};
  for (int64_t r = r0; r < r1;) {
    const int64_t slice = r / g.H;
    const int y = static_cast<int>(r % g.H);
    const int rows = static_cast<int>(std::min<int64_t>({max_rows, g.H - y, r1 - r}));
    work.segments.push_back({slice / g.D, static_cast<int>(slice % g.D), y, rows, (r - r0) * g.W});
    work.max_rows = std::max(work.max_rows, rows);
    r += rows;
  }
  const int64_t segs = static_cast<int64_t>(work.segments.size());
  work.blocks = std::clamp<int64_t>((want + segs - 1) / segs, 1, channels);
  return work;
}

// The column matrix of chunk [r0, r1) into col[K, ld] (ld = its column count), in parallel.
template <typename scalar_t>
void unfold_chunk(const VirtualInput& v, const ColumnTaps<scalar_t>& ct, const Geometry& g, int64_t r0, int64_t r1,
                  scalar_t* col, int64_t ld) {
  const ChunkWork work = split_chunk(g, r0, r1, v.channels);
  const int pad = g.k / 2;
  at::parallel_for(0, work.items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> strip(size_t(work.max_rows + 2 * pad) * (g.W + 2 * pad));
    for (int64_t item = begin; item < end; ++item) {
      const RowSegment& s = work.segment(item);
      unfold_virtual<scalar_t>(v, ct, s.n, s.z, s.y0, s.rows, g.k, g.kd, static_cast<int>(work.first_channel(item)),
                               static_cast<int>(work.blocks), strip.data(), col + s.col_offset, ld);
    }
  });
}

// The data and strides of a [N, C, (D,) H, W] tensor (sd = 0 for a 4-D one).
template <typename scalar_t>
struct Strided {
  scalar_t* data;
  int64_t sn, sc, sd, sh, sw;
  explicit Strided(at::Tensor& t) : data(t.data_ptr<scalar_t>()) {
    const int r = static_cast<int>(t.dim());
    sn = t.stride(0), sc = t.stride(1), sd = r == 5 ? t.stride(2) : 0, sh = t.stride(r - 2), sw = t.stride(r - 1);
  }
  // Pixel row r = (n * D + z) * H + y of channel c.
  scalar_t* row(int64_t c, int64_t r, int D, int H) const {
    const int64_t slice = r / H;
    return data + (slice / D) * sn + c * sc + (slice % D) * sd + (r % H) * sh;
  }
};

// Grain of a parallel loop over (channel, row) pairs: a few thousand pixels per task at least.
int64_t row_grain(int W) { return std::max<int64_t>(1, 4096 / std::max(1, W)); }

template <typename scalar_t>
void forward_kernel(const VirtualInput& v, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const Activation& act, at::Tensor& out) {
  const Geometry g = geometry(v, weight, out.size(0));
  const int64_t C_out = g.C_out, K = g.K;
  const int W = g.W;
  const at::Tensor wmat = weight.contiguous().view({C_out, K});
  const at::Tensor bias_c = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  const scalar_t* bias_ptr = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
  const ColumnTaps<scalar_t> ct(v);
  const int64_t rows_per_chunk = chunk_rows(g, std::max(K, C_out), sizeof(scalar_t));
  at::Tensor col = tensor_options_buffer(K * rows_per_chunk * W, out);
  at::Tensor acc = tensor_options_buffer(C_out * rows_per_chunk * W, out);
  const Strided<scalar_t> dst(out);
  const scalar_t slope = static_cast<scalar_t>(act.slope);

  for (int64_t r0 = 0; r0 < g.rows(); r0 += rows_per_chunk) {
    const int64_t r1 = std::min(g.rows(), r0 + rows_per_chunk), rows = r1 - r0, T = rows * W;
    unfold_chunk<scalar_t>(v, ct, g, r0, r1, col.data_ptr<scalar_t>(), T);
    at::Tensor acc_view = acc.narrow(0, 0, C_out * T).view({C_out, T});
    at::mm_out(acc_view, wmat, col.narrow(0, 0, K * T).view({K, T}));
    const scalar_t* a = acc_view.data_ptr<scalar_t>();
    at::parallel_for(0, C_out * rows, row_grain(W), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t co = i / rows, rr = i % rows;
        const scalar_t b = bias_ptr ? bias_ptr[co] : scalar_t(0);
        const scalar_t* arow = a + co * T + rr * W;
        scalar_t* orow = dst.row(co, r0 + rr, g.D, g.H);
        const int64_t sw = dst.sw;
        for (int x = 0; x < W; ++x) orow[x * sw] = apply_activation<scalar_t>(arow[x] + b, act.kind, slope);
      }
    });
  }
}

// A forward chunk over the virtual input's tile: samples [n0, n0 + nb) and the band [a0, a0 + len)
// of the outermost spatial axis (depth in 3D, height in 2D).
struct Band {
  int64_t n0, nb;
  int a0, len;
};

// Whole samples per band while one sample's tile fits kChunkBytes, else bands of one sample.
std::vector<Band> plan_bands(int64_t N, int64_t channels, int outer, int64_t inner, int halo, size_t elem) {
  std::vector<Band> bands;
  const int64_t plane_bytes = std::max<int64_t>(1, channels * inner * int64_t(elem));
  const int64_t per_sample = plane_bytes * (outer + 2 * halo);
  if (per_sample <= kChunkBytes) {
    const int64_t nb = std::max<int64_t>(1, kChunkBytes / per_sample);
    for (int64_t n0 = 0; n0 < N; n0 += nb) bands.push_back({n0, std::min(nb, N - n0), 0, outer});
    return bands;
  }
  const int len = static_cast<int>(std::clamp<int64_t>(kChunkBytes / plane_bytes - 2 * halo, 1, outer));
  for (int64_t n = 0; n < N; ++n)
    for (int a0 = 0; a0 < outer; a0 += len) bands.push_back({n, 1, a0, std::min(len, outer - a0)});
  return bands;
}

// tile[n - n0, c, t, ...] = virtual[n, c, a0 - halo + t, ...] (zero outside) for the band's
// samples and every channel, t in [0, len + 2 halo); one (sample, channel) plane per work item,
// lanes interleaving the channels so that cheap and dear pieces spread over the threads.
template <typename scalar_t>
void fill_tile(const VirtualInput& v, const ColumnTaps<scalar_t>& ct, bool volumetric, const Band& b, int halo,
               scalar_t* tile) {
  const int W = v.width, H = v.height;
  const int64_t inner = volumetric ? int64_t(H) * W : W;
  const int outer = volumetric ? v.depth : H, extent = b.len + 2 * halo;
  const int64_t items = b.nb * v.channels;
  const int64_t lanes = std::min<int64_t>(items, kItemsPerThread * at::get_num_threads());
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      for (int64_t item = lane; item < items; item += lanes) {
        const int c = static_cast<int>(item % v.channels);
        const int64_t n = b.n0 + item / v.channels;
        const int p = piece_of_channel(v, c);
        const int local = c - v.pieces[p].channel_offset;
        scalar_t* plane = tile + ((n - b.n0) * v.channels + c) * extent * inner;
        for (int t = 0; t < extent; ++t) {
          const int a = b.a0 - halo + t;
          scalar_t* dst = plane + t * inner;
          if (a < 0 || a >= outer) {
            std::fill(dst, dst + inner, scalar_t(0));
          } else if (volumetric) {
            for (int y = 0; y < H; ++y) sample_row(v, ct, p, n, local, a, y, dst + int64_t(y) * W);
          } else {
            sample_row(v, ct, p, n, local, 0, a, dst);
          }
        }
      }
    }
  });
}

// The forward through the library's convolution (oneDNN) on bounded tiles of the virtual input:
// the resamples and the concatenation are fused into the tile (written once, read from cache),
// the convolution is the one plain PyTorch runs, bias included; the activation runs in place.
template <typename scalar_t>
void forward_tiles(const VirtualInput& v, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const Activation& act, at::Tensor& out) {
  const bool volumetric = weight.dim() == 5;
  const int k = static_cast<int>(weight.size(-1)), pad = k / 2;
  const int outer = volumetric ? v.depth : v.height;
  const int64_t inner = volumetric ? int64_t(v.height) * v.width : v.width;
  const ColumnTaps<scalar_t> ct(v);
  const std::vector<int64_t> padding = volumetric ? std::vector<int64_t>{0, pad, pad} : std::vector<int64_t>{0, pad};
  const std::vector<int64_t> ones(padding.size(), 1), zeros(padding.size(), 0);
  const at::Tensor w = weight.contiguous();
  for (const Band& b : plan_bands(out.size(0), v.channels, outer, inner, pad, sizeof(scalar_t))) {
    std::vector<int64_t> shape{b.nb, v.channels, b.len + 2 * pad};
    if (volumetric) shape.push_back(v.height);
    shape.push_back(v.width);
    at::Tensor tile = at::empty(shape, out.options().memory_format(at::MemoryFormat::Contiguous));
    fill_tile<scalar_t>(v, ct, volumetric, b, pad, tile.data_ptr<scalar_t>());
    at::Tensor result = at::convolution(tile, w, bias, ones, padding, ones, false, zeros, 1);
    if (act.kind == kActRelu) at::relu_(result);
    if (act.kind == kActLeakyRelu) at::leaky_relu_(result, act.slope);
    out.narrow(0, b.n0, b.nb).narrow(2, b.a0, b.len).copy_(result);
  }
}

template <typename scalar_t>
at::Tensor weight_grad(const VirtualInput& v, const at::Tensor& grad_pre, const at::Tensor& weight) {
  const Geometry g = geometry(v, weight, grad_pre.size(0));
  const int64_t C_out = g.C_out, K = g.K;
  const int W = g.W;
  const ColumnTaps<scalar_t> ct(v);
  const int64_t rows_per_chunk = chunk_rows(g, std::max(K, C_out), sizeof(scalar_t));
  at::Tensor col = tensor_options_buffer(K * rows_per_chunk * W, grad_pre);
  at::Tensor gathered = tensor_options_buffer(C_out * rows_per_chunk * W, grad_pre);
  at::Tensor grad_weight = at::empty({C_out, K}, grad_pre.options());
  if (g.rows() == 0) grad_weight.zero_();  // an empty batch: no chunk writes it
  const at::Tensor g2d = grad_pre.view({g.N, C_out, int64_t(g.D) * g.H * W});  // contiguous
  const int64_t sample_rows = int64_t(g.D) * g.H;

  for (int64_t r0 = 0; r0 < g.rows(); r0 += rows_per_chunk) {
    const int64_t r1 = std::min(g.rows(), r0 + rows_per_chunk), rows = r1 - r0, T = rows * W;
    unfold_chunk<scalar_t>(v, ct, g, r0, r1, col.data_ptr<scalar_t>(), T);
    at::Tensor g_chunk;
    const int64_t n0 = r0 / sample_rows;
    if ((r1 - 1) / sample_rows == n0) {  // one sample: the gradient rows are a strided matrix already
      g_chunk = g2d[n0].narrow(1, (r0 - n0 * sample_rows) * W, T);
    } else {  // several samples: gather their rows into [C_out, T]
      g_chunk = gathered.narrow(0, 0, C_out * T).view({C_out, T});
      scalar_t* gp = g_chunk.data_ptr<scalar_t>();
      const scalar_t* src = g2d.data_ptr<scalar_t>();
      at::parallel_for(0, C_out * rows, row_grain(W), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t co = i / rows, r = r0 + i % rows, n = r / sample_rows;
          std::memcpy(gp + co * T + (i % rows) * W, src + (n * C_out + co) * sample_rows * W + (r % sample_rows) * W,
                      sizeof(scalar_t) * W);
        }
      });
    }
    const at::Tensor cols_t = col.narrow(0, 0, K * T).view({K, T}).t();
    if (r0 == 0) {
      at::mm_out(grad_weight, g_chunk, cols_t);
    } else {
      grad_weight.addmm_(g_chunk, cols_t);
    }
  }
  return grad_weight.view(weight.sizes());
}

// Rows co_first, co_first + co_step, ... < C_out of the gradient's column matrix for one segment of virtual rows:
// gcol[(co, kz, ky, kx) * ld + (r, x)] = grad_pre[n, co, vz + pad_d - kz, y0 + r + pad - ky,
// x + pad - kx] (0 outside; kd = 1, pad_d = 0 in 2D). `gstrip`: (rows + 2 pad) * (W + 2 pad).
template <typename scalar_t>
void unfold_grad(const scalar_t* g, const Geometry& geo, const RowSegment& s, int64_t co_first, int64_t co_step,
                 scalar_t* gstrip, scalar_t* gcol, int64_t ld) {
  const int64_t C_out = geo.C_out;
  const int k = geo.k, kd = geo.kd, pad = k / 2, pad_d = kd / 2, D = geo.D, H = geo.H, W = geo.W;
  const int rows = s.rows, vz = s.z, y_lo = s.y0;
  const int64_t n = s.n, plane = int64_t(H) * W;
  if (k == 1) {
    for (int64_t co = co_first; co < C_out; co += co_step) {
      std::memcpy(gcol + co * ld, g + ((n * C_out + co) * D + vz) * plane + int64_t(y_lo) * W,
                  sizeof(scalar_t) * rows * W);
    }
    return;
  }
  // Strip row r holds grad row y_lo - pad + r, strip column q grad column q - pad (0 outside).
  const int strip_rows = rows + 2 * pad, strip_cols = W + 2 * pad;
  for (int64_t co = co_first; co < C_out; co += co_step) {
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
          scalar_t* dst = gcol + (((co * kd + kz) * k + ky) * k + kx) * ld;
          for (int r = 0; r < rows; ++r) {
            std::memcpy(dst + int64_t(r) * W, gstrip + int64_t(r + 2 * pad - ky) * strip_cols + (2 * pad - kx),
                        sizeof(scalar_t) * W);
          }
        }
      }
    }
  }
}

// Add the virtual gradient `gc` (rows [y_lo, y_hi) of virtual slice vz of sample n, local channel
// c) through the piece's resample adjoint into the channel's source gradient `oc` (sample n,
// slice 0; strides `sd`, `sh`, `sw`). Only this channel writes `oc`; a virtual row may come more
// than once (the halo rows of oneDNN's tiles): the adjoint is linear, so the parts add up.
template <typename scalar_t>
void scatter_to_source(const PieceDesc& d, const std::vector<LinearTap<scalar_t>>& taps, int64_t n,
                       const scalar_t* src, int c, int vz, int D, int H, int W, int y_lo, int y_hi,
                       const scalar_t* gc, scalar_t* oc, int64_t sd, int64_t sh, int64_t sw) {
  switch (d.mode) {
    case kResampleNone: {
      scalar_t* os = oc + int64_t(vz) * sd;
      for (int y = y_lo; y < y_hi; ++y)
        for (int x = 0; x < W; ++x) os[int64_t(y) * sh + x * sw] += gc[int64_t(y - y_lo) * W + x];
      return;
    }
    case kUpNearest: {
      const int sz = d.resample_depth ? nearest_source(vz, d.depth) : vz;
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
        scalar_t* os = oc + int64_t(sz) * sd;
        for (int y = y_lo; y < y_hi; ++y) {
          const LinearTap<scalar_t> ty = bilinear_tap_for_mode<scalar_t>(y, d.height, H, d.mode);
          scalar_t* r0 = os + int64_t(ty.i0) * sh;
          scalar_t* r1 = os + int64_t(ty.i1) * sh;
          for (int x = 0; x < W; ++x) {
            const LinearTap<scalar_t>& tx = taps[x];
            const scalar_t g = gc[int64_t(y - y_lo) * W + x];
            const scalar_t gval = d.resample_depth ? wz * g : g;
            r0[tx.i0 * sw] += ty.w0 * tx.w0 * gval;
            r0[tx.i1 * sw] += ty.w0 * tx.w1 * gval;
            r1[tx.i0 * sw] += ty.w1 * tx.w0 * gval;
            r1[tx.i1 * sw] += ty.w1 * tx.w1 * gval;
          }
        }
      }
      return;
    }
    case kMaxPool2: {
      const scalar_t* sbase = src + n * d.stride_n + int64_t(c) * d.stride_c;
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
      // 2x2x2: the window spans source slices 2 vz and 2 vz + 1.
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
          oc[int64_t(sz) * sd + (r0 + ((arg >> 1) & 1)) * sh + (c0 + (arg & 1)) * sw] +=
              gc[int64_t(y - y_lo) * W + x];
        }
      }
      return;
    }
  }
}

// Input gradients of every piece, chunk after chunk of virtual rows: the gradient's column matrix
// (parallel), one GEMM with W^T for all pieces' channels, then each channel's rows routed through
// its piece's resample adjoint (parallel over channels; chunks and rows in a fixed order, so the
// sums are the same for any thread count).
template <typename scalar_t>
void input_grads(const VirtualInput& v, const at::Tensor& grad_pre, const at::Tensor& weight,
                 std::vector<at::Tensor>& grads) {
  const Geometry geo = geometry(v, weight, grad_pre.size(0));
  const int64_t C_out = geo.C_out, C_in = v.channels;
  const int k = geo.k, pad = k / 2, D = geo.D, H = geo.H, W = geo.W;
  const int64_t KK = C_out * geo.kd * k * k;
  // W^T as [C_in, C_out * kd * k * k], matching the unfolded gradient's row order (co, kz, ky, kx).
  const at::Tensor wt = weight.transpose(0, 1).contiguous().view({C_in, KK});
  const ColumnTaps<scalar_t> ct(v);
  const scalar_t* g = grad_pre.data_ptr<scalar_t>();
  const int64_t rows_per_chunk = chunk_rows(geo, std::max(KK, C_in), sizeof(scalar_t));
  at::Tensor gcol = tensor_options_buffer(KK * rows_per_chunk * W, grad_pre);
  at::Tensor gv_buf = tensor_options_buffer(C_in * rows_per_chunk * W, grad_pre);
  std::vector<Strided<scalar_t>> dst;
  for (auto& out : grads) dst.emplace_back(out);

  for (int64_t r0 = 0; r0 < geo.rows(); r0 += rows_per_chunk) {
    const int64_t r1 = std::min(geo.rows(), r0 + rows_per_chunk), T = (r1 - r0) * W;
    const ChunkWork work = split_chunk(geo, r0, r1, C_out);
    scalar_t* gcolp = gcol.data_ptr<scalar_t>();
    at::parallel_for(0, work.items(), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gstrip(size_t(work.max_rows + 2 * pad) * (W + 2 * pad));
      for (int64_t item = begin; item < end; ++item) {
        const RowSegment& s = work.segment(item);
        unfold_grad<scalar_t>(g, geo, s, work.first_channel(item), work.blocks, gstrip.data(), gcolp + s.col_offset, T);
      }
    });
    at::Tensor gv = gv_buf.narrow(0, 0, C_in * T).view({C_in, T});
    at::mm_out(gv, wt, gcol.narrow(0, 0, KK * T).view({KK, T}));
    const scalar_t* gvp = gv.data_ptr<scalar_t>();
    // Lane j takes channels j, j + lanes, ...: pieces of different cost spread over all threads.
    const int64_t lanes = std::min<int64_t>(C_in, kItemsPerThread * at::get_num_threads());
    at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t lane = begin; lane < end; ++lane) {
        for (int64_t c = lane; c < C_in; c += lanes) {
          const int p = piece_of_channel(v, static_cast<int>(c));
          const PieceDesc& d = v.pieces[p];
          const int local = static_cast<int>(c) - d.channel_offset;
          const Strided<scalar_t>& o = dst[p];
          for (const RowSegment& s : work.segments) {
            scatter_to_source<scalar_t>(d, ct.taps[p], s.n, static_cast<const scalar_t*>(d.data), local, s.z, D, H, W,
                                        s.y0, s.y0 + s.rows, gvp + c * T + s.col_offset,
                                        o.data + s.n * o.sn + local * o.sc, o.sd, o.sh, o.sw);
          }
        }
      }
    });
  }
}

// The backward through the library's convolution backward (oneDNN) on the forward's tiles: per
// band the tile is sampled again from the pieces (nothing was saved), one convolution_backward
// gives the tile's gradient and the band's weight gradient; the tile's gradient, halo rows too,
// is added through each piece's resample adjoint in parallel over (sample, channel) planes.
// Returns the weight gradient; `grads` (zeroed) receive the pieces' gradients.
template <typename scalar_t>
at::Tensor backward_tiles(const VirtualInput& v, const at::Tensor& grad_pre, const at::Tensor& weight,
                          std::vector<at::Tensor>& grads) {
  const bool volumetric = weight.dim() == 5;
  const int k = static_cast<int>(weight.size(-1)), pad = k / 2;
  const int D = v.depth, H = v.height, W = v.width;
  const int outer = volumetric ? D : H;
  const int64_t inner = volumetric ? int64_t(H) * W : W;
  const ColumnTaps<scalar_t> ct(v);
  const std::vector<int64_t> padding = volumetric ? std::vector<int64_t>{0, pad, pad} : std::vector<int64_t>{0, pad};
  const std::vector<int64_t> ones(padding.size(), 1), zeros(padding.size(), 0);
  const at::Tensor w = weight.contiguous();
  std::vector<Strided<scalar_t>> dst;
  for (auto& g : grads) dst.emplace_back(g);
  at::Tensor grad_weight;
  for (const Band& b : plan_bands(grad_pre.size(0), v.channels, outer, inner, pad, sizeof(scalar_t))) {
    const int extent = b.len + 2 * pad;
    std::vector<int64_t> shape{b.nb, v.channels, extent};
    if (volumetric) shape.push_back(H);
    shape.push_back(W);
    at::Tensor tile = at::empty(shape, grad_pre.options().memory_format(at::MemoryFormat::Contiguous));
    fill_tile<scalar_t>(v, ct, volumetric, b, pad, tile.data_ptr<scalar_t>());
    const at::Tensor grad_band = grad_pre.narrow(0, b.n0, b.nb).narrow(2, b.a0, b.len).contiguous();
    auto [grad_tile, grad_w, unused] = at::convolution_backward(grad_band, tile, w, std::nullopt, ones, padding, ones,
                                                                false, zeros, 1, {true, true, false});
    grad_weight = grad_weight.defined() ? grad_weight.add_(grad_w) : grad_w;
    const at::Tensor gt = grad_tile.contiguous();
    const scalar_t* gtp = gt.data_ptr<scalar_t>();
    const int64_t items = b.nb * v.channels;
    const int64_t lanes = std::min<int64_t>(items, kItemsPerThread * at::get_num_threads());
    at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t lane = begin; lane < end; ++lane) {
        for (int64_t item = lane; item < items; item += lanes) {
          const int c = static_cast<int>(item % v.channels);
          const int64_t n = b.n0 + item / v.channels;
          const int p = piece_of_channel(v, c);
          const PieceDesc& d = v.pieces[p];
          const int local = c - d.channel_offset;
          const Strided<scalar_t>& o = dst[p];
          scalar_t* oc = o.data + n * o.sn + local * o.sc;
          const scalar_t* src = static_cast<const scalar_t*>(d.data);
          const scalar_t* plane = gtp + ((n - b.n0) * v.channels + c) * extent * inner;
          // Tile rows outside the virtual input are the convolution's zero padding: no source.
          const int t_lo = std::max(0, pad - b.a0), t_hi = std::min(extent, outer - b.a0 + pad);
          if (volumetric) {
            for (int t = t_lo; t < t_hi; ++t) {
              scatter_to_source<scalar_t>(d, ct.taps[p], n, src, local, b.a0 - pad + t, D, H, W, 0, H,
                                          plane + t * inner, oc, o.sd, o.sh, o.sw);
            }
          } else if (t_hi > t_lo) {
            scatter_to_source<scalar_t>(d, ct.taps[p], n, src, local, 0, D, H, W, b.a0 - pad + t_lo,
                                        b.a0 - pad + t_hi, plane + t_lo * inner, oc, o.sd, o.sh, o.sw);
          }
        }
      }
    });
  }
  if (!grad_weight.defined()) grad_weight = at::zeros_like(w);  // an empty batch
  return grad_weight.view(weight.sizes());
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

// fp32 calls with something to compute go through oneDNN; fp64 (no oneDNN kernels) and empty
// shapes take im2col + GEMM.
bool use_library_convolution(const at::Tensor& weight, int64_t batch) {
  return weight.scalar_type() == at::kFloat && weight.numel() > 0 && batch > 0 &&
         at::globalContext().userEnabledMkldnn() && at::hasMKLDNN();
}

// One piece read as stored: nothing to fuse, so the library's convolution reads the piece itself
// (no tile), with the convolution's own zero padding on every axis.
bool single_plain_piece(at::TensorList pieces, at::IntArrayRef resample) {
  return pieces.size() == 1 && resample[0] == kResampleNone;
}

std::vector<int64_t> same_padding(const at::Tensor& weight) {
  return std::vector<int64_t>(weight.dim() - 2, weight.size(-1) / 2);
}

at::Tensor forward_direct(const at::Tensor& piece, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const Activation& act) {
  const std::vector<int64_t> padding = same_padding(weight);
  const std::vector<int64_t> ones(padding.size(), 1), zeros(padding.size(), 0);
  at::Tensor result = at::convolution(piece, weight, bias, ones, padding, ones, false, zeros, 1);
  if (act.kind == kActRelu) at::relu_(result);
  if (act.kind == kActLeakyRelu) at::leaky_relu_(result, act.slope);
  return result.contiguous(output_memory_format(piece));
}

at::Tensor forward_cpu(at::TensorList pieces, at::IntArrayRef resample, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, std::string activation) {
  const auto dhw = check_fused_conv_args_nd(pieces, resample, weight, bias, activation, "fused_conv_forward (cpu)");
  const at::NoGradGuard no_grad;  // the library calls are internal: never recorded by autograd
  const Activation act = parse_activation(activation);
  if (needs_fp32_compute(weight.scalar_type())) {  // no half GEMM worth having on CPU: compute in fp32
    std::optional<at::Tensor> bias32;
    if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat);
    const std::vector<at::Tensor> p32 = upcast(pieces);
    return forward_cpu(p32, resample, weight.to(at::kFloat), bias32, activation)
        .to(weight.scalar_type())
        .contiguous(output_memory_format(pieces[0]));
  }
  const bool library = use_library_convolution(weight, pieces[0].size(0));
  if (library && single_plain_piece(pieces, resample)) return forward_direct(pieces[0], weight, bias, act);
  const VirtualInput v = describe_virtual_input_nd(pieces, resample, dhw);
  at::Tensor out = at::empty(output_shape(pieces[0].size(0), weight, dhw),
                             weight.options().memory_format(output_memory_format(pieces[0])));
  if (library) {
    forward_tiles<float>(v, weight, bias, act, out);  // oneDNN's fp32 convolution on virtual tiles
    return out;
  }
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
  const bool library = use_library_convolution(weight, pieces[0].size(0));
  std::vector<int64_t> reduce{0};
  for (int64_t d = 2; d < grad_pre.dim(); ++d) reduce.push_back(d);
  const at::Tensor grad_bias = has_bias ? grad_pre.sum(reduce) : grad_pre.new_empty({0});
  if (library && single_plain_piece(pieces, resample)) {
    const std::vector<int64_t> padding = same_padding(weight);
    const std::vector<int64_t> ones(padding.size(), 1), zeros(padding.size(), 0);
    auto [grad_input, grad_weight, unused] = at::convolution_backward(
        grad_pre, pieces[0], weight, std::nullopt, ones, padding, ones, false, zeros, 1, {true, true, false});
    return {grad_input.contiguous(output_memory_format(pieces[0])), grad_weight, grad_bias};
  }
  const VirtualInput v = describe_virtual_input_nd(pieces, resample, dhw);
  std::vector<at::Tensor> grads;
  for (const auto& p : pieces) {
    grads.push_back(at::empty(p.sizes(), p.options().memory_format(output_memory_format(p))).zero_());
  }
  at::Tensor grad_weight;
  if (library) {
    grad_weight = backward_tiles<float>(v, grad_pre, weight, grads);  // oneDNN, as the forward
  } else {
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fused_conv_backward_cpu", [&] {
      input_grads<scalar_t>(v, grad_pre, weight, grads);
      grad_weight = weight_grad<scalar_t>(v, grad_pre, weight);
    });
  }
  grads.push_back(grad_weight);
  grads.push_back(grad_bias);
  return grads;
}

}  // namespace
}  // namespace unetpp_fast

TORCH_LIBRARY_IMPL(unetpp_fast_C, CPU, m) {
  m.impl("fused_conv_forward", &unetpp_fast::forward_cpu);
  m.impl("fused_conv_backward", &unetpp_fast::backward_cpu);
}
