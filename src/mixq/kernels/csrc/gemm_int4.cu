// Weight-only int4 GEMM on the tensor cores for batches of 1-128 activation rows, reading mixq's
// packed int4 layout directly (row-major int32 words, 8 LSB-first codes each; float16 group
// scales (n, n_groups); optional uint8 zero points): y = x @ dequant(W)^T (+ bias).
//
// It extends the GEMV's lane work (gemv_int4.cu) from one to kT tiles of 8 activation rows, so
// that every decoded weight feeds kT tensor-core products:
//
// * A warp owns kR tiles of 16 weight rows; the warps of a block own consecutive row tiles and
//   walk the same 128-input chunks of one K slice, so the activations they read are shared in
//   L1. Lane (g = lane / 4, q = lane % 4) loads per chunk 16 bytes (32 codes, inputs
//   32q .. 32q + 31) of rows g and g + 8 of each row tile, two register buffers deep.
// * Decoding as in the GEMV (one LOP3 gives codes i, i + 4 of a word as half-precision
//   magic + code), then (code - zero) * scale in x's dtype (two packed FMAs per two weights:
//   the subtraction is exact, the product rounds once), so groups of 32..128 inputs and per
//   channel scales take the same path and the accumulators need no per-chunk rescaling.
// * The block stages x through shared memory, two chunks (256 inputs) of its 8 kT activation
//   rows at a time, double-buffered with cp.async (zero-filled past k): every activation byte
//   is read from L2 once per block instead of once per warp. Rows are padded by 16 bytes and
//   the 16-byte units of lanes q = 2, 3 are swizzled, so a quarter warp's 16-byte reads hit
//   every bank once. Per word and activation tile, the lane reads 16 bytes of x (row 8t + g)
//   and permutes them with four PRMTs into the B pairs (x_i, x_i+4) matching A; then one
//   mma.m16n8k16 per row tile and half word.
// * Programmatic dependent launch (sm_90, MIXQ_PDL=1): the first weights are loaded before
//   waiting on the stream's previous kernel; x, y and the workspace only after.
// * Split K (gridDim.y > 1): each block stores its fp32 partial tile in fragment order into a
//   workspace slice of its own (plain coalesced 16-byte stores, no atomics); the last block of
//   a tile to arrive (a per-tile counter) sums the slices in split order, writes y and resets
//   the counter, so a call is one launch and its result does not depend on arrival order.
// * Batch tiles of 8 kT rows are gridDim.z; rows past m are computed on clamped inputs and not
//   stored.

#include "common.cuh"
#include "gemv_int4.h"

namespace {

using namespace mixq_kernels;

constexpr int kStageUnits = 32;             // 16-byte units of x per row and stage (two chunks)
constexpr int kRowUnits = kStageUnits + 1;  // + one unit of padding: rows start on different banks

// Unit u of a staged row is stored at swizzle(u): lanes q = 2, 3 read units 8 + 4(q - 2) + w,
// moved by two units so that with the padding a quarter warp covers all eight 16-byte banks.
__device__ __forceinline__ int swizzle(int u) { return u ^ (((u >> 3) & 1) << 1); }

template <int kR>
struct GemmChunk {
  uint4 w[kR][2];  // codes of rows g, g + 8 of each row tile
  uint32_t s[kR];  // fp16 scale bits of rows g (low half), g + 8 (high half)
  uint32_t z[kR];  // zero points of rows g (low half), g + 8 (high half)
};

template <bool kBF16, int kR, int kT>
__global__ void __launch_bounds__(256) gemm_int4_kernel(const GemmInt4Params P) {
  using H = Half<kBF16>;
  const GemvInt4Params& p = P.b;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = (blockIdx.x * n_warps + warp) * (16 * kR);
  const bool active = row0 < p.n;  // warp-uniform; idle warps still join the block's barriers
  const int m0 = blockIdx.z * (8 * kT);
  const int n_chunks = (p.k + kChunk - 1) / kChunk;
  const int c_begin = blockIdx.y * P.chunks_per_split;
  const int c_end = min(n_chunks, c_begin + P.chunks_per_split);
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);

  // x stage buffers: [2][8 kT rows][kRowUnits 16-byte units]; B column g of activation tile t
  // is x row m0 + 8t + g (clamped to m - 1: computed, not stored)
  extern __shared__ uint4 xsm[];
  const uint32_t xs_base = uint32_t(__cvta_generic_to_shared(xsm));
  uint32_t x_lane[kT];  // byte offset of the lane's x row in a buffer
#pragma unroll
  for (int t = 0; t < kT; ++t) x_lane[t] = opaque(uint32_t((8 * t + g) * kRowUnits) * 16u);
  uint32_t w_off[kR][2], s_off[kR][2], z_off[kR][2];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t row = min(row0 + r * 16 + h * 8 + g, p.n - 1);
      w_off[r][h] = opaque(row * uint32_t(p.ld_codes) + q * 4);
      s_off[r][h] = opaque(row * uint32_t(p.ld_scales));
      z_off[r][h] = p.zeros ? opaque(row * uint32_t(p.ld_zeros)) : 0u;
    }

  auto load = [&](GemmChunk<kR>& ch, int c) {
    if (c >= c_end) return;  // warp-uniform
    const int kq = c * kChunk + q * 32;
    const bool lane_ok = kq < p.k;
    const uint32_t grp = uint32_t(min(kq, p.k - 1) >> p.group_shift);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      uint32_t s[2], z[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        ch.w[r][h] = lane_ok ? load_stream(p.codes + (w_off[r][h] + c * 16)) : make_uint4(0, 0, 0, 0);
        s[h] = __ldg(p.scales + (s_off[r][h] + grp));
        z[h] = p.zeros ? uint32_t(__ldg(p.zeros + (z_off[r][h] + grp))) : uint32_t(p.code_offset);
      }
      ch.s[r] = s[0] | (s[1] << 16);
      ch.z[r] = z[0] | (z[1] << 16);
    }
  };

  float acc[kR][kT][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[r][t][j] = 0.f;

  // stage the x units of chunks c, c + 1 into buffer b: 16-byte cp.async per unit, rows past m
  // read row m - 1, units past k (or past the slice) are zero-filled
  auto stage_x = [&](int b, int c) {
    if (c >= c_end) return;  // block-uniform
    const int units = 8 * kT * kStageUnits;
    for (int e = threadIdx.x; e < units; e += blockDim.x) {
      const int row = e / kStageUnits, u = e % kStageUnits;
      const int kx = c * kChunk + u * 8;
      const bool ok = kx < p.k && c + u / 16 < c_end;
      const uint16_t* src = xs + (size_t(min(m0 + row, p.m - 1)) * p.ldx + (ok ? kx : 0));
      const uint32_t dst = xs_base + uint32_t((b * 8 * kT + row) * kRowUnits + swizzle(u)) * 16u;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };

  const uint32_t mask = 0x000F000Fu, magic = H::kMagic;
  auto compute = [&](const GemmChunk<kR>& ch, int b, int cc) {  // x from buffer b, chunk cc of the stage
    uint32_t nz[kR][2], ss[kR][2];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      nz[r][0] = H::kNegMagic | ((ch.z[r] & 0xFFu) * 0x10001u);  // -(magic + zero) x2
      nz[r][1] = H::kNegMagic | ((ch.z[r] >> 16) * 0x10001u);
      ss[r][0] = H::scale_pair(ch.s[r] & 0xFFFFu);
      ss[r][1] = H::scale_pair(ch.s[r] >> 16);
    }
    const uint32_t xb = xs_base + uint32_t(b * 8 * kT * kRowUnits) * 16u;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t unit = uint32_t(swizzle(cc * 16 + 4 * q + w)) * 16u;
      uint32_t A[kR][2][4];  // [row tile][half word]: pairs (i, i + 4) of rows g, g + 8
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const uint32_t w0 = word(ch.w[r][0], w), w1 = word(ch.w[r][1], w);
        uint32_t a0[4], a1[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a0[i] = H::fma2(H::fma2(and_or(w0 >> (4 * i), mask, magic), H::kOne, nz[r][0]), ss[r][0], 0x80008000u);
          a1[i] = H::fma2(H::fma2(and_or(w1 >> (4 * i), mask, magic), H::kOne, nz[r][1]), ss[r][1], 0x80008000u);
        }
        A[r][0][0] = a0[0]; A[r][0][1] = a1[0]; A[r][0][2] = a0[1]; A[r][0][3] = a1[1];
        A[r][1][0] = a0[2]; A[r][1][1] = a1[2]; A[r][1][2] = a0[3]; A[r][1][3] = a1[3];
      }
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        uint4 xv;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(xv.x), "=r"(xv.y), "=r"(xv.z), "=r"(xv.w)
                     : "r"(xb + x_lane[t] + unit));
        const uint32_t b0 = __byte_perm(xv.x, xv.z, 0x5410);  // (x0, x4)
        const uint32_t b1 = __byte_perm(xv.x, xv.z, 0x7632);  // (x1, x5)
        const uint32_t b2 = __byte_perm(xv.y, xv.w, 0x5410);  // (x2, x6)
        const uint32_t b3 = __byte_perm(xv.y, xv.w, 0x7632);  // (x3, x7)
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          H::mma(acc[r][t], A[r][0], b0, b1);
          H::mma(acc[r][t], A[r][1], b2, b3);
        }
      }
    }
  };

  // main loop, one stage (two chunks) per iteration: x for the next stage in flight through
  // cp.async, the next chunk's weights in registers
  GemmChunk<kR> buf_a, buf_b;
  pdl_launch_dependents();
  if (active) load(buf_a, c_begin);  // weights only: before the wait
  pdl_wait();                        // x, y and the workspace belong to the previous kernels
  stage_x(0, c_begin);
  for (int c = c_begin, b = 0; c < c_end; c += 2, b ^= 1) {
    stage_x(b ^ 1, c + 2);
    if (c + 2 < c_end) {
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    __syncthreads();  // the stage's x units from every thread have landed
    if (active) {
      load(buf_b, c + 1);
      compute(buf_a, b, 0);
      load(buf_a, c + 2);
      if (c + 1 < c_end) compute(buf_b, b, 1);
    }
    __syncthreads();  // buffer b is refilled by the next iteration's stage_x
  }

  // accumulator j of lane (g, q) in tile (r, t): weight row row0 + 16r + g + 8 (j >> 1),
  // activation row m0 + 8t + 2q + (j & 1)
  auto store_y = [&](int r, int t, const float (&v)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = row0 + r * 16 + g + 8 * (j >> 1);
      const int col = m0 + 8 * t + 2 * q + (j & 1);
      if (row < p.n && col < p.m) {
        float o = v[j];
        if (p.bias) o += H::to_float(static_cast<const uint16_t*>(p.bias)[row]);
        static_cast<uint16_t*>(p.y)[col * p.ldy + row] = H::from_float(o);
      }
    }
  };

  if (gridDim.y == 1) {
    if (active)
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int t = 0; t < kT; ++t) store_y(r, t, acc[r][t]);
    return;
  }

  // split K: partial tile in fragment order -> workspace slice (split, tile); last block sums
  const uint32_t tile = blockIdx.z * gridDim.x + blockIdx.x;
  const uint32_t n_tiles = gridDim.x * gridDim.z;
  const size_t tile_floats = size_t(n_warps) * kR * kT * 128;
  const size_t lane_base = (size_t(warp) * kR * kT * 128) + lane * 4;
  if (active) {
    float4* slice = reinterpret_cast<float4*>(P.ws + (size_t(blockIdx.y) * n_tiles + tile) * tile_floats + lane_base);
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int t = 0; t < kT; ++t)
        __stcg(slice + (r * kT + t) * 32, make_float4(acc[r][t][0], acc[r][t][1], acc[r][t][2], acc[r][t][3]));
  }
  __threadfence();  // this thread's partials are visible device-wide before the block arrives
  __syncthreads();
  __shared__ int is_last;
  if (threadIdx.x == 0) is_last = atomicAdd(P.cnt + tile, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (active) {
    float sum[kR][kT][4];
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int t = 0; t < kT; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[r][t][j] = 0.f;
    for (int s = 0; s < int(gridDim.y); ++s) {
      const float4* slice = reinterpret_cast<const float4*>(P.ws + (size_t(s) * n_tiles + tile) * tile_floats + lane_base);
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          const float4 v = __ldcg(slice + (r * kT + t) * 32);
          sum[r][t][0] += v.x;
          sum[r][t][1] += v.y;
          sum[r][t][2] += v.z;
          sum[r][t][3] += v.w;
        }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int t = 0; t < kT; ++t) store_y(r, t, sum[r][t]);
  }
  if (threadIdx.x == 0) P.cnt[tile] = 0;  // ready for the next call (stream order)
}

template <bool kBF16, int kR, int kT>
cudaError_t launch(const GemmInt4Params& p, int warps, int split, cudaStream_t stream) {
  const dim3 grid((p.b.n + 16 * kR * warps - 1) / (16 * kR * warps), split, (p.b.m + 8 * kT - 1) / (8 * kT));
  const size_t smem = gemm_int4_smem_bytes(kT);
  auto kernel = gemm_int4_kernel<kBF16, kR, kT>;
  if (smem > 48 * 1024) {  // opt in to this much dynamic shared memory, per instantiation and device
    static size_t opted[64] = {};
    int dev = 0;
    cudaGetDevice(&dev);
    if (smem > opted[dev & 63]) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e != cudaSuccess) return e;  // more than the device allows
      opted[dev & 63] = smem;
    }
  }
  return launch_ex(kernel, grid, dim3(32 * warps), smem, stream, p.b.pdl, p);
}

template <bool kBF16, int kR>
cudaError_t launch_t(const GemmInt4Params& p, int n_tiles, int warps, int split, cudaStream_t stream) {
  switch (n_tiles) {
    case 1: return launch<kBF16, kR, 1>(p, warps, split, stream);
    case 2: return launch<kBF16, kR, 2>(p, warps, split, stream);
    case 4: return launch<kBF16, kR, 4>(p, warps, split, stream);
    default: return launch<kBF16, kR, 8>(p, warps, split, stream);
  }
}

}  // namespace

size_t gemm_int4_smem_bytes(int n_tiles) { return size_t(2) * 8 * n_tiles * kRowUnits * 16; }

int gemm_int4_tiles(const GemmInt4Params& p, int row_tiles, int n_tiles, int warps) {
  return ((p.b.n + 16 * row_tiles * warps - 1) / (16 * row_tiles * warps)) * ((p.b.m + 8 * n_tiles - 1) / (8 * n_tiles));
}

cudaError_t gemm_int4_launch(const GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps, int split,
                             cudaStream_t stream) {
  const int n_chunks = (p.b.k + kChunk - 1) / kChunk;
  if (p.b.m < 1 || p.b.n < 1 || p.b.k < 32 || p.b.k % 32 || warps < 1 || warps > 8 || split < 1 ||
      (row_tiles != 1 && row_tiles != 2) || (n_tiles != 1 && n_tiles != 2 && n_tiles != 4 && n_tiles != 8) ||
      p.b.group_shift < 5 || p.chunks_per_split < 1 || (split - 1) * p.chunks_per_split >= n_chunks ||
      split * p.chunks_per_split < n_chunks || (split > 1 && (p.ws == nullptr || p.cnt == nullptr)))
    return cudaErrorInvalidValue;
  if (bf16) return row_tiles == 1 ? launch_t<true, 1>(p, n_tiles, warps, split, stream)
                                  : launch_t<true, 2>(p, n_tiles, warps, split, stream);
  return row_tiles == 1 ? launch_t<false, 1>(p, n_tiles, warps, split, stream)
                        : launch_t<false, 2>(p, n_tiles, warps, split, stream);
}
