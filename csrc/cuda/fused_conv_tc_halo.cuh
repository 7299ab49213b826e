// Halo-tile tensor-core forward (2D, k = 3; pieces channels_last with C % 8 == 0, or `none` pieces of
// any layout and channel count, e.g. the RGB input): included by
// fused_conv_tc.cu only, inside its anonymous namespace (it reuses that file's primitives: Pack,
// swizzle, cp_async_16, ldmatrix_x4, Mma; and what it includes: max2_nan from packed_max.cuh,
// bilinear_tap_scaled from the shared indexing header).
//
// A CTA owns an 8 x 16 block of output pixels of one image (kBM = 128) and BN output channels. Its
// K loop runs over (piece, 32-channel chunk): per chunk it stages the piece's values on the block's
// halo, (8 + 2) x (16 + 2) pixels x 32 channels, in shared memory ONCE, plus the chunk's weights
// for all 9 taps; then the 9 taps run from shared memory. Per tap the A fragments are ldmatrix'ed
// from the halo at the lane's pixel shifted by the tap: with halo rows padded to 80 bytes (instead
// of a 64-byte swizzle) the shift is a compile-time byte offset, so the unrolled tap loop is only
// LDSM + HMMA. The resample (maxpool2, bilinear) is computed once per halo pixel, not once per tap,
// and global loads drop ~6x. Two stages: the next chunk's cp.async runs while this chunk's taps do.
//
//   * halo: 180 pixels x 4 16-byte chunks = 720 items, 6 per thread at fixed (pixel, chunk):
//     `none` / `up_nearest` by cp.async (zero-filled outside the image), `maxpool2` / `up_bilinear(_ac)`
//     by 16-byte loads, fp32 math exactly as PyTorch (as fused_conv_tc.cu's per-row path), 16-byte store;
//     a `none` piece that is not 16-byte vectorisable element by element (the RGB input: 3 loads
//     per halo pixel, once per CTA instead of once per tap);
//   * weights: [tap][co] rows of 64 bytes, swizzled as the linear kernel's B tile (the tap offset is
//     a multiple of BN rows, which keeps the swizzle: a compile-time offset too);
//   * 80-byte halo rows: ldmatrix's 8 row addresses (8 consecutive pixels) fall 80 bytes apart, which
//     covers all 8 16-byte bank groups of a 128-byte line: conflict-free without a swizzle.
//
// Status: compiles for sm_80/sm_90 (SASS checked by the static model); tested through the CPU twin;
// NOT yet run on a GPU.

constexpr int kHaloTileH = 8, kHaloTileW = 16;  // kHaloTileH * kHaloTileW == kBM
constexpr int kHaloH = kHaloTileH + 2, kHaloW = kHaloTileW + 2;
constexpr int kHaloPixels = kHaloH * kHaloW;                               // 180
constexpr int kHaloPitch = kRowBytes + 16;                                 // 80 bytes per halo pixel
constexpr int kHaloBytes = kHaloPixels * kHaloPitch;                       // 14400
constexpr int kHaloItems = (kHaloPixels * 4 + kThreads - 1) / kThreads;  // 6 16-byte items per thread
constexpr int kHaloTaps = 9;
static_assert(kHaloTileH * kHaloTileW == kBM, "one output pixel per A row");
static_assert(kThreads % 4 == 0, "a thread's halo items share one 16-byte chunk column");

template <typename T, int BN>
struct HaloSmem {  // one stage = halo + the 9 taps' weights; two stages, reused by the output tile
  static constexpr int kStage = kHaloBytes + kHaloTaps * BN * kRowBytes;
  static constexpr int kOut = kBM * BN * static_cast<int>(sizeof(T));
  static constexpr int kTotal = 2 * kStage > kOut ? 2 * kStage : kOut;
};

// Narrow images (W <= 7, e.g. 6 x 6 at the bottom of UNet++) are paired: a block holds image n at
// columns 0-7 and image n + 1 at columns 8-15. Halo column 8 is then padding of both (x = 7 of the
// left image, x = -1 of the right one): every tap of either image reads only its own pixels or zeros.
constexpr int kHaloPairWidth = kHaloTileW / 2 - 1;
__host__ __device__ __forceinline__ bool halo_paired(int width) { return width <= kHaloPairWidth; }

// Output blocks along y and x of one image (of one image pair when paired), and image groups.
__host__ __device__ __forceinline__ int halo_tiles_y(int height) { return (height + kHaloTileH - 1) / kHaloTileH; }
__host__ __device__ __forceinline__ int halo_tiles_x(int width, bool paired) {
  return paired ? 1 : (width + kHaloTileW - 1) / kHaloTileW;
}
__host__ __device__ __forceinline__ int halo_image_groups(int batch, bool paired) {
  return paired ? (batch + 1) / 2 : batch;
}

// 8 channels (16 bytes) of a maxpool2 / bilinear value from 4 source pixels at element offsets
// off[0..3] of `base` (sample_piece's expression in fp32; packed NaN-propagating max for the pool).
template <typename T>
__device__ __forceinline__ uint4 resample_chunk(const T* base, const int (&off)[4], bool pool, float wy0, float wy1,
                                                float wx0, float wx1) {
  uint4 v[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) v[s] = __ldg(reinterpret_cast<const uint4*>(base + off[s]));
  const uint32_t* p0 = reinterpret_cast<const uint32_t*>(&v[0]);
  const uint32_t* p1 = reinterpret_cast<const uint32_t*>(&v[1]);
  const uint32_t* p2 = reinterpret_cast<const uint32_t*>(&v[2]);
  const uint32_t* p3 = reinterpret_cast<const uint32_t*>(&v[3]);
  uint4 out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
  if (pool) {
#pragma unroll
    for (int h = 0; h < 4; ++h) o[h] = max2_nan<T>(max2_nan<T>(p0[h], p1[h]), max2_nan<T>(p2[h], p3[h]));
    return out;
  }
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    float r[2];
#pragma unroll
    for (int half = 0; half < Pack<T>::kPerWord; ++half) {
      const float a = Pack<T>::get(p0[h], half), b = Pack<T>::get(p1[h], half);
      const float c = Pack<T>::get(p2[h], half), d = Pack<T>::get(p3[h], half);
      r[half] = wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * c + wx1 * d);
    }
    o[h] = Pack<T>::word(r);
  }
  return out;
}

// This thread's halo items: pixel (tid / 4) + 32 i of the halo, 16-byte chunk tid % 4, for i < kHaloItems.
struct HaloItems {
  int gy[kHaloItems], gx[kHaloItems];  // the pixel in output (= `none` piece) coordinates
  unsigned in_image;                   // bit i: item i is a halo pixel inside the image
  unsigned exists;                     // bit i: item i is a halo pixel (the last round is partial)
  unsigned right;                      // bit i: item i belongs to the right image of a pair (n + 1)

  // Item i is a halo pixel: known at compile time for every round but the last partial one.
  __device__ __forceinline__ bool has(int i) const {
    return (i + 1) * (kThreads / 4) <= kHaloPixels || ((exists >> i) & 1);
  }
};

// Stages chunk (piece, c0) into one stage: the halo values at a_stage, the 9 taps' weights at
// b_stage. cp.async for none / nearest pieces and the weights (the caller commits); loads + stores
// for maxpool2 / bilinear.
template <typename T, int BN, bool PAIRED>
__device__ __forceinline__ void halo_stage(const TcForwardParams& prm, int piece, int c0, int n, const HaloItems& it,
                                           uint32_t a_stage, unsigned char* a_stage_ptr, uint32_t b_stage,
                                           const T* const* w_rows, const bool* b_ok) {
  const int tid = threadIdx.x, chunk = tid & 3;
  const TcPiece& pc = prm.pieces[piece];

  // ---- weights: rows [tap][co], BN / 32 output channels per thread, 16 bytes (chunk) each. Rows
  // 32 j + 8 m apart share the swizzle (it reads row bits 1-2): one thread offset, the rest immediates.
  const uint32_t b_thread = b_stage + swizzle(tid >> 2, chunk);
  const int w_col = pc.packed_offset + c0;
#pragma unroll
  for (int j = 0; j < BN / 32; ++j) {
    const T* w = w_rows[j] + w_col;
#pragma unroll
    for (int tap = 0; tap < kHaloTaps; ++tap) {
      cp_async_16(b_thread + (tap * BN + j * 32) * kRowBytes, w + tap * prm.k_packed, b_ok[j] ? 16 : 0);
    }
  }

  // ---- halo values.
  if (!pc.vectorized) {  // `none` only (halo_applies): NCHW or C % 8 != 0 (the RGB input), per element
    using Bits = typename Pack<T>::Bits;
    const int count = pc.channels - c0 - chunk * kChunkChannels<T>;  // this thread's channels of the chunk (<= 0: none)
    const Bits* src =
        static_cast<const Bits*>(pc.data) + n * pc.stride_n + (c0 + chunk * kChunkChannels<T>) * pc.stride_c;
#pragma unroll
    for (int i = 0; i < kHaloItems; ++i) {
      if (!it.has(i)) continue;
      uint32_t packed[4] = {0u, 0u, 0u, 0u};
      if (count > 0 && ((it.in_image >> i) & 1)) {
        const int img = PAIRED && ((it.right >> i) & 1) ? pc.stride_n : 0;
        const Bits* p = src + img + it.gy[i] * pc.stride_h + it.gx[i] * pc.stride_w;
        constexpr int kPerWord = Pack<T>::kPerWord;
#pragma unroll
        for (int e = 0; e < kChunkChannels<T>; ++e) {
          if (e < count) {
            packed[e / kPerWord] |= static_cast<uint32_t>(__ldg(p + e * pc.stride_c)) << (16 * (e % kPerWord));
          }
        }
      }
      *reinterpret_cast<uint4*>(a_stage_ptr + static_cast<uint32_t>((tid >> 2) * kHaloPitch + chunk * 16) +
                                i * 32 * kHaloPitch) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
    return;
  }
  const bool chunk_ok = chunk * kChunkChannels<T> < pc.channels - c0;  // channels past the piece stay zero
  const T* base = static_cast<const T*>(pc.data) + n * pc.stride_n + c0 + chunk * kChunkChannels<T>;
  const uint32_t a_thread = static_cast<uint32_t>((tid >> 2) * kHaloPitch + chunk * 16);
  const int stride_n = pc.stride_n, stride_h = pc.stride_h, stride_w = pc.stride_w;  // read once, not per item
  if (pc.mode == kResampleNone) {  // straight to shared memory, zero-filled outside the image
#pragma unroll
    for (int i = 0; i < kHaloItems; ++i) {
      if (!it.has(i)) continue;
      const bool inside = chunk_ok && ((it.in_image >> i) & 1);
      const int img = PAIRED && ((it.right >> i) & 1) ? stride_n : 0;
      const int off = inside ? img + it.gy[i] * stride_h + it.gx[i] * stride_w : 0;
      cp_async_16(a_stage + a_thread + i * 32 * kHaloPitch, base + off, inside ? 16 : 0);
    }
    return;
  }
  if (pc.mode == kUpNearest) {  // the source pixel, straight to shared memory
    const int in_h = pc.height, in_w = pc.width;
#pragma unroll
    for (int i = 0; i < kHaloItems; ++i) {
      if (!it.has(i)) continue;
      const bool inside = chunk_ok && ((it.in_image >> i) & 1);
      const int img = PAIRED && ((it.right >> i) & 1) ? stride_n : 0;
      const int off =
          inside ? img + nearest_source(it.gy[i], in_h) * stride_h + nearest_source(it.gx[i], in_w) * stride_w : 0;
      cp_async_16(a_stage + a_thread + i * 32 * kHaloPitch, base + off, inside ? 16 : 0);
    }
    return;
  }
  // One loop per mode (the mode is uniform across the CTA): each item's code is that mode's only.
  if (pc.mode == kMaxPool2) {
#pragma unroll
    for (int i = 0; i < kHaloItems; ++i) {
      if (!it.has(i)) continue;
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (chunk_ok && ((it.in_image >> i) & 1)) {
        const int img = PAIRED && ((it.right >> i) & 1) ? stride_n : 0;
        const int r0 = img + 2 * it.gy[i] * stride_h + 2 * it.gx[i] * stride_w;
        const int off[4] = {r0, r0 + stride_w, r0 + stride_h, r0 + stride_h + stride_w};
        value = resample_chunk<T>(base, off, true, 0.f, 0.f, 0.f, 0.f);
      }
      *reinterpret_cast<uint4*>(a_stage_ptr + a_thread + i * 32 * kHaloPitch) = value;
    }
    return;
  }
  const bool ac = pc.mode == kUpBilinearAC;
#pragma unroll
  for (int i = 0; i < kHaloItems; ++i) {
    if (!it.has(i)) continue;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (chunk_ok && ((it.in_image >> i) & 1)) {
      const LinearTap<float> ty = bilinear_tap_scaled(it.gy[i], pc.height, ac, pc.scale_h);
      const LinearTap<float> tx = bilinear_tap_scaled(it.gx[i], pc.width, ac, pc.scale_w);
      const int img = PAIRED && ((it.right >> i) & 1) ? stride_n : 0;
      const int r0 = img + ty.i0 * stride_h, r1 = img + ty.i1 * stride_h;
      const int off[4] = {r0 + tx.i0 * stride_w, r0 + tx.i1 * stride_w, r1 + tx.i0 * stride_w,
                          r1 + tx.i1 * stride_w};
      value = resample_chunk<T>(base, off, false, ty.w0, ty.w1, tx.w0, tx.w1);
    }
    *reinterpret_cast<uint4*>(a_stage_ptr + a_thread + i * 32 * kHaloPitch) = value;
  }
}

// PAIRS: images per block, 1 or 2 (halo_paired: the launcher picks 2 exactly for W <= 7). A template
// argument so that the unpaired instances carry no per-item image select.
template <typename T, int BN, int PAIRS>
UPF_TC_HALO_KERNEL fused_conv_fwd_tc_halo_kernel(const UPF_TC_GRID_CONSTANT TcForwardParams prm) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kWarpsM = BN == 64 ? 2 : 4;  // BN 64: 2x2 warps of 64x32; BN 32: 4x1 warps of 32x32
  constexpr int kWarpsN = 4 / kWarpsM;
  constexpr int kWarpM = kBM / kWarpsM, kWarpN = BN / kWarpsN;
  constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;  // m16 tiles (= output rows of 16 pixels) and n8 tiles
  constexpr int kStage = HaloSmem<T, BN>::kStage;
  UPF_TC_DYNAMIC_SHARED(smem);
  const uint32_t smem_base = smem_address(smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const int n0 = blockIdx.y * BN;
  constexpr bool paired = PAIRS == 2;
  const int batch = prm.pixels / (prm.height * prm.width);
  int n, y0, x0;
  {  // the block: image n (paired: n and n + 1), output rows y0.., columns x0..
    const int tiles_x = halo_tiles_x(prm.width, paired), per_image = halo_tiles_y(prm.height) * tiles_x;
    const int group = blockIdx.x / per_image;
    n = paired ? 2 * group : group;
    const int t = blockIdx.x - group * per_image;
    const int ty = t / tiles_x;
    y0 = ty * kHaloTileH;
    x0 = (t - ty * tiles_x) * kHaloTileW;
  }

  HaloItems items;
  items.in_image = 0u;
  items.exists = 0u;
  items.right = 0u;
#pragma unroll
  for (int i = 0; i < kHaloItems; ++i) {
    const int hp = (tid >> 2) + i * (kThreads / 4);
    const int hy = hp / kHaloW;  // constant divisor: a multiply
    const int hx = hp - hy * kHaloW;
    const bool right = paired && hx > kHaloTileW / 2;  // halo columns 9-17: x = hx - 9 of image n + 1
    items.gy[i] = y0 - 1 + hy;
    items.gx[i] = right ? hx - kHaloTileW / 2 - 1 : x0 - 1 + hx;
    if (hp < kHaloPixels) items.exists |= 1u << i;
    if (right) items.right |= 1u << i;
    if (items.gy[i] >= 0 && items.gy[i] < prm.height && items.gx[i] >= 0 && items.gx[i] < prm.width &&
        (!right || n + 1 < batch)) {
      items.in_image |= 1u << i;
    }
  }

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  constexpr int kBRows = BN / 32;  // output channels whose weights this thread stages
  const T* w_rows[kBRows];
  bool b_ok[kBRows];
#pragma unroll
  for (int j = 0; j < kBRows; ++j) {
    const int co = n0 + (tid >> 2) + j * 32;
    b_ok[j] = co < prm.c_out;
    w_rows[j] = static_cast<const T*>(prm.weight) + (b_ok[j] ? co : 0) * prm.k_row + (tid & 3) * kChunkChannels<T>;
  }

  // ldmatrix lane addresses: A = halo pixel (first output row of this warp + lane % 16) at k chunk
  // lane / 16; B as the linear kernel. Every tap / tile / k16 step adds a compile-time offset.
  const uint32_t a_lane = static_cast<uint32_t>(((warp_m * kMT) * kHaloW + (lane & 15)) * kHaloPitch + (lane >> 4) * 16);
  const uint32_t b_lane = swizzle(warp_n * kWarpN + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);

  const int chunks = prm.blocks_per_tap;
  int piece = 0, c0 = 0;  // the next chunk to stage
  auto stage_next = [&](int s) {
    const uint32_t base = smem_base + s * kStage;
    halo_stage<T, BN, paired>(prm, piece, c0, n, items, base, smem + s * kStage, base + kHaloBytes, w_rows, b_ok);
    c0 += kBK<T>;
    if (c0 >= prm.pieces[piece].channels) {
      c0 = 0;
      ++piece;
    }
  };
  stage_next(0);
  cp_async_commit();

#pragma unroll 1
  for (int ch = 0; ch < chunks; ++ch) {
    cp_async_wait<0>();
    __syncthreads();  // chunk ch visible to all; everyone is done with the stage refilled below
    if (ch + 1 < chunks) stage_next((ch + 1) & 1);
    cp_async_commit();

    const uint32_t a_base = smem_base + (ch & 1) * kStage + a_lane;
    const uint32_t b_base = smem_base + (ch & 1) * kStage + kHaloBytes;
#pragma unroll
    for (int tap = 0; tap < kHaloTaps; ++tap) {
      const int ky = tap / 3, kx = tap % 3;
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {  // two k16 steps per 32-channel chunk
        uint32_t a_frag[kMT][4], b_frag[kNT][2];
#pragma unroll
        for (int i = 0; i < kMT; ++i) {
          ldmatrix_x4(a_base + ((i + ky) * kHaloW + kx) * kHaloPitch + kk * 32, a_frag[i][0], a_frag[i][1],
                      a_frag[i][2], a_frag[i][3]);
        }
        const uint32_t b_k = b_base + (b_lane ^ (kk << 5)) + tap * BN * kRowBytes;
#pragma unroll
        for (int j = 0; j < kNT; j += 2) {
          ldmatrix_x4(b_k + j * 8 * kRowBytes, b_frag[j][0], b_frag[j][1], b_frag[j + 1][0], b_frag[j + 1][1]);
        }
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int j = 0; j < kNT; ++j) Mma<T>::run(acc[i][j], a_frag[i], b_frag[j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages' shared memory is reused for the output tile

  // ---- epilogue: bias + activation in fp32, tile [kBM][BN] of T (row r = pixel (y0 + r / 16, x0 + r % 16);
  // paired: columns 8-15 are x = r % 16 - 8 of image n + 1).
  T* tile = reinterpret_cast<T*>(smem);
  const T* bias = static_cast<const T*>(prm.bias);
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int col = warp_n * kWarpN + j * 8 + q * 2;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      if (n0 + col < prm.c_out) b0 = Pack<T>::load(bias, n0 + col);
      if (n0 + col + 1 < prm.c_out) b1 = Pack<T>::load(bias, n0 + col + 1);
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp_m * kWarpM + i * 16 + g + half * 8;
        const float v0 = apply_activation<float>(acc[i][j][half * 2] + b0, prm.activation, prm.slope);
        const float v1 = apply_activation<float>(acc[i][j][half * 2 + 1] + b1, prm.activation, prm.slope);
        Pack<T>::store2(tile + r * BN + col, v0, v1);
      }
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(prm.out);
  // Output pixel of tile row r, or false past the image / the batch.
  auto pixel_of = [&](int r, int64_t& off) {
    const int y = y0 + r / kHaloTileW;
    int x = x0 + r % kHaloTileW, image = n;
    if (paired && x >= kHaloTileW / 2) {
      x -= kHaloTileW / 2;
      ++image;
    }
    off = image * prm.out_stride_n + y * prm.out_stride_h + x * prm.out_stride_w;
    return y < prm.height && x < prm.width && image < batch;
  };
  if (prm.out_vectorized) {  // channels_last, C_out % 8 == 0: 16-byte rows
    constexpr int kChunks = BN / kChunkChannels<T>;
#pragma unroll 1
    for (int idx = tid; idx < kBM * kChunks; idx += kThreads) {
      const int r = idx / kChunks, chunk = idx - r * kChunks;
      const int co = n0 + chunk * kChunkChannels<T>;
      int64_t off;
      if (!pixel_of(r, off) || co >= prm.c_out) continue;
      *reinterpret_cast<uint4*>(out + off + co) = *reinterpret_cast<const uint4*>(tile + r * BN + chunk * kChunkChannels<T>);
    }
  } else {  // any strides: consecutive threads along pixels
#pragma unroll 1
    for (int idx = tid; idx < kBM * BN; idx += kThreads) {
      const int col = idx / kBM, r = idx - col * kBM;
      const int co = n0 + col;
      int64_t off;
      if (!pixel_of(r, off) || co >= prm.c_out) continue;
      out[off + static_cast<int64_t>(co) * prm.out_stride_c] = tile[r * BN + col];
    }
  }
#else
  __trap();  // tensor-core kernels need sm_80 or newer
#endif
}
