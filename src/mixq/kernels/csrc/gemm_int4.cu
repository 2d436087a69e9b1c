// Weight-only int4 GEMM on the tensor cores for batches of 1-128 activation rows, reading mixq's
// packed int4 layout directly (row-major int32 words, 8 LSB-first codes each; float16 group
// scales (n, n_groups); optional uint8 zero points): y = x @ dequant(W)^T (+ bias).
//
// It extends the GEMV's lane work (gemv_int4.cu) from one to kT tiles of 8 activation rows, so
// that every decoded weight feeds kT tensor-core products:
//
// * A warp owns kR tiles of 16 weight rows; the warps of a block own consecutive row tiles and
//   walk the same 128-input chunks. Lane (g = lane / 4, q = lane % 4) loads per chunk 16 bytes
//   (32 codes, inputs 32q .. 32q + 31) of rows g and g + 8 of each row tile, two register
//   buffers deep.
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
// * Work split. An output tile is 16 kR x warps weight rows by 8 kT activation rows; its K
//   dimension is 128-input chunks. Split K: block (x, y, z) takes K slice y of tile (x, z).
//   Stream-K: as many blocks as fit on the device at once, each taking the same number of
//   (tile, chunk) units in order, so a block may finish one tile and start the next. A block
//   that covers a whole tile writes y; otherwise it stores its fp32 partial tile in fragment
//   order into its slot of the tile's workspace (plain coalesced 16-byte stores, no atomics)
//   and adds its chunk count to the tile's counter; the block that completes the count sums
//   the slots in order, writes y and resets the counter, so a call is one launch and its
//   result does not depend on arrival order. Rows past n or m are computed on clamped inputs
//   and not stored.

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "gemv_int4.h"

namespace {

using namespace mixq_kernels;

constexpr int kStageUnits = 32;             // 16-byte units of x per row and stage (two chunks)
constexpr int kRowUnits = kStageUnits + 1;  // + one unit of padding: rows start on different banks

// Unit u of a staged row is stored at swizzle(u): lanes q = 2, 3 read units 8 + 4(q - 2) + w,
// moved by two units so that with the padding a quarter warp covers all eight 16-byte banks.
__device__ __forceinline__ int swizzle(int u) { return u ^ (((u >> 3) & 1) << 1); }

// Stream-K: the block holding chunk-unit u (unit = tile * n_chunks + chunk) of W units over
// G blocks, block b taking units [b W / G, (b + 1) W / G).
__host__ __device__ __forceinline__ int block_of_unit(int64_t u, int64_t W, int64_t G) {
  return int(((u + 1) * G + W - 1) / W - 1);
}

template <bool kBF16, int kR, int kT>
__global__ void __launch_bounds__(256) gemm_int4_kernel(const GemmInt4Params P) {
  using H = Half<kBF16>;
  const GemvInt4Params& p = P.b;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n_chunks = (p.k + kChunk - 1) / kChunk;
  const int n_tiles = P.tiles_x * P.tiles_z;
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);

  // x stage buffers: [2][8 kT rows][kRowUnits 16-byte units]; B column g of activation tile t
  // is x row m0 + 8t + g (clamped to m - 1: computed, not stored)
  extern __shared__ uint4 xsm[];
  __shared__ int is_last;
  const uint32_t xs_base = uint32_t(__cvta_generic_to_shared(xsm));
  uint32_t x_lane[kT];  // byte offset of the lane's x row in a buffer
#pragma unroll
  for (int t = 0; t < kT; ++t) x_lane[t] = opaque(uint32_t((8 * t + g) * kRowUnits) * 16u);

  // this block's chunk-units: one K slice of one tile (split K), or a contiguous range of
  // units that may span tiles (stream-K)
  const int64_t W = int64_t(n_tiles) * n_chunks;
  int64_t u, u_end;
  if (P.stream_k_blocks) {
    u = int64_t(blockIdx.x) * W / P.stream_k_blocks;
    u_end = int64_t(blockIdx.x + 1) * W / P.stream_k_blocks;
  } else {
    const int64_t tile = int64_t(blockIdx.z) * P.tiles_x + blockIdx.x;
    u = tile * n_chunks + int64_t(blockIdx.y) * P.chunks_per_split;
    u_end = tile * n_chunks + min(n_chunks, int(blockIdx.y + 1) * P.chunks_per_split);
  }

  pdl_launch_dependents();
  bool waited = false;
  while (u < u_end) {  // block-uniform: one segment (a tile's chunks c_begin .. c_end - 1) per pass
    const int tile = int(u / n_chunks);
    const int c_begin = int(u % n_chunks);
    const int c_end = int(min(int64_t(n_chunks), c_begin + (u_end - u)));
    const int row0 = ((tile % P.tiles_x) * n_warps + warp) * (16 * kR);
    const int m0 = (tile / P.tiles_x) * (8 * kT);
    const bool active = row0 < p.n;  // warp-uniform; idle warps still join the block's barriers
    uint32_t w_off[kR][2], s_off[kR][2], z_off[kR][2];
    row_offsets<kR>(p, row0, 16, g, q * 4, p.zeros != nullptr, w_off, s_off, z_off);

    auto load = [&](Chunk<kR>& ch, int c) {
      if (c >= c_end) return;  // warp-uniform
      const int kq = c * kChunk + q * 32;
      load_chunk<kR>(ch, p, c, kq < p.k, uint32_t(min(kq, p.k - 1) >> p.group_shift), p.zeros != nullptr, w_off,
                     s_off, z_off);
    };

    // stage the x units of chunks c, c + 1 into buffer b: 16-byte cp.async per unit, rows past m
    // read row m - 1, units past k (or past the segment) are zero-filled
    auto stage_x = [&](int b, int c) {
      if (c >= c_end) return;  // block-uniform
      const int units = 8 * kT * kStageUnits;
      for (int e = threadIdx.x; e < units; e += blockDim.x) {
        const int row = e / kStageUnits, un = e % kStageUnits;
        const int kx = c * kChunk + un * 8;
        const bool ok = kx < p.k && c + un / 16 < c_end;
        const uint16_t* src = xs + (size_t(min(m0 + row, p.m - 1)) * p.ldx + (ok ? kx : 0));
        const uint32_t dst = xs_base + uint32_t((b * 8 * kT + row) * kRowUnits + swizzle(un)) * 16u;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    };

    float acc[kR][kT][4] = {};
    const uint32_t mask = 0x000F000Fu, magic = H::kMagic;
    auto compute = [&](const Chunk<kR>& ch, int b, int cc) {  // x from buffer b, chunk cc of the stage
      uint32_t nz[kR][2], ss[kR][2];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const uint32_t sp = pack_rows(ch.s[r]);  // rows g (low half), g + 8
        const uint32_t zp = pack_rows(ch.z[r]);
        nz[r][0] = H::kNegMagic | ((zp & 0xFFu) * 0x10001u);  // -(magic + zero) x2
        nz[r][1] = H::kNegMagic | ((zp >> 16) * 0x10001u);
        ss[r][0] = H::scale_pair(sp & 0xFFFFu);
        ss[r][1] = H::scale_pair(sp >> 16);
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
          for (int i = 0; i < 4; ++i) {  // (code - zero) * scale: exact subtraction, one rounding
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
    Chunk<kR> buf_a, buf_b;
    if (active) load(buf_a, c_begin);  // weights only: may run before the wait
    if (!waited) {
      pdl_wait();  // x, y and the workspace belong to the stream's previous kernels
      waited = true;
    }
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
    auto store_y = [&](const float (&v)[kR][kT][4]) {
      if (!active) return;
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int t = 0; t < kT; ++t)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int row = row0 + r * 16 + g + 8 * (j >> 1);
            const int col = m0 + 8 * t + 2 * q + (j & 1);
            if (row < p.n && col < p.m) {
              float o = v[r][t][j];
              if (p.bias) o += H::to_float(static_cast<const uint16_t*>(p.bias)[row]);
              static_cast<uint16_t*>(p.y)[col * p.ldy + row] = H::from_float(o);
            }
          }
    };

    if (c_end - c_begin == n_chunks) {
      store_y(acc);  // the whole tile: no partial sums
    } else {
      // a partial tile: fp32 partials in fragment order into the tile's slot; the block whose
      // chunks complete the tile (per-tile chunk counter) sums the slots in order, writes y
      // and resets the counter
      int slot, n_slots;
      if (P.stream_k_blocks) {
        const int first = block_of_unit(int64_t(tile) * n_chunks, W, P.stream_k_blocks);
        slot = int(blockIdx.x) - first;
        n_slots = block_of_unit(int64_t(tile) * n_chunks + n_chunks - 1, W, P.stream_k_blocks) - first + 1;
      } else {
        slot = int(blockIdx.y);
        n_slots = int(gridDim.y);
      }
      const size_t tile_floats = size_t(n_warps) * kR * kT * 128;
      const size_t lane_base = (size_t(warp) * kR * kT * 128) + lane * 4;
      float* tile_ws = P.ws + size_t(tile) * P.slots * tile_floats + lane_base;
      if (active) {
        float4* mine = reinterpret_cast<float4*>(tile_ws + size_t(slot) * tile_floats);
#pragma unroll
        for (int r = 0; r < kR; ++r)
#pragma unroll
          for (int t = 0; t < kT; ++t)
            __stcg(mine + (r * kT + t) * 32, make_float4(acc[r][t][0], acc[r][t][1], acc[r][t][2], acc[r][t][3]));
      }
      __threadfence();  // this thread's partials are visible device-wide before the block arrives
      __syncthreads();
      if (threadIdx.x == 0) {
        const int done = c_end - c_begin;
        is_last = atomicAdd(P.cnt + tile, done) + done == n_chunks;
      }
      __syncthreads();
      if (is_last) {
        __threadfence();
        if (active) {  // the sum, in slot order, replaces this block's own partial in acc
          for (int s2 = 0; s2 < n_slots; ++s2) {
            const float4* part = reinterpret_cast<const float4*>(tile_ws + size_t(s2) * tile_floats);
#pragma unroll
            for (int r = 0; r < kR; ++r)
#pragma unroll
              for (int t = 0; t < kT; ++t) {
                const float4 v = __ldcg(part + (r * kT + t) * 32);
                acc[r][t][0] = s2 ? acc[r][t][0] + v.x : v.x;
                acc[r][t][1] = s2 ? acc[r][t][1] + v.y : v.y;
                acc[r][t][2] = s2 ? acc[r][t][2] + v.z : v.z;
                acc[r][t][3] = s2 ? acc[r][t][3] + v.w : v.w;
              }
          }
          store_y(acc);
        }
        if (threadIdx.x == 0) P.cnt[tile] = 0;  // ready for the next call (stream order)
      }
      __syncthreads();  // is_last is reused by the next segment
    }
    u += c_end - c_begin;
  }
  if (!waited) pdl_wait();
}

template <bool kBF16, int kR, int kT>
cudaError_t prepare(int warps, int* blocks_per_sm) {  // opt in to the shared memory; occupancy
  const size_t smem = gemm_int4_smem_bytes(kT);
  auto kernel = gemm_int4_kernel<kBF16, kR, kT>;
  int dev = 0;
  cudaGetDevice(&dev);
  if (smem > 48 * 1024) {  // opt in to this much dynamic shared memory, per instantiation and device
    static size_t opted[64] = {};
    if (smem > opted[dev & 63]) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e != cudaSuccess) return e;  // more than the device allows
      opted[dev & 63] = smem;
    }
  }
  if (blocks_per_sm) {
    static int cached[64][9] = {};
    int& c = cached[dev & 63][warps & 7 ? warps : 8];
    if (!c) {
      const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c, kernel, 32 * warps, smem);
      if (e != cudaSuccess) return e;
    }
    *blocks_per_sm = c;
  }
  return cudaSuccess;
}

template <bool kBF16, int kR, int kT>
cudaError_t launch(const GemmInt4Params& p, int warps, cudaStream_t stream) {
  const cudaError_t e = prepare<kBF16, kR, kT>(warps, nullptr);
  if (e != cudaSuccess) return e;
  const dim3 grid = p.stream_k_blocks ? dim3(p.stream_k_blocks) : dim3(p.tiles_x, p.splits, p.tiles_z);
  return launch_ex(gemm_int4_kernel<kBF16, kR, kT>, grid, dim3(32 * warps), gemm_int4_smem_bytes(kT), stream, p.b.pdl,
                   p);
}

// Calls f(bool tag, row-tile tag, activation-tile tag) with the instantiation of a launch shape.
template <typename F>
cudaError_t with_shape(bool bf16, int row_tiles, int n_tiles, F&& f) {
  using std::integral_constant;
  auto by_t = [&](auto bf, auto r) -> cudaError_t {
    switch (n_tiles) {
      case 1: return f(bf, r, integral_constant<int, 1>{});
      case 2: return f(bf, r, integral_constant<int, 2>{});
      case 4: return f(bf, r, integral_constant<int, 4>{});
      default: return f(bf, r, integral_constant<int, 8>{});
    }
  };
  auto by_r = [&](auto bf) -> cudaError_t {
    return row_tiles == 1 ? by_t(bf, integral_constant<int, 1>{}) : by_t(bf, integral_constant<int, 2>{});
  };
  return bf16 ? by_r(integral_constant<bool, true>{}) : by_r(integral_constant<bool, false>{});
}

}  // namespace

size_t gemm_int4_smem_bytes(int n_tiles) { return size_t(2) * 8 * n_tiles * kRowUnits * 16; }

cudaError_t gemm_int4_plan(GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps, int split, bool stream_k,
                           int n_sms, size_t* ws_floats, int* tiles) {
  const int n_chunks = (p.b.k + kChunk - 1) / kChunk;
  if (p.b.m < 1 || p.b.n < 1 || p.b.k < 32 || p.b.k % 32 || warps < 1 || warps > 8 || split < 1 || n_sms < 1 ||
      (row_tiles != 1 && row_tiles != 2) || (n_tiles != 1 && n_tiles != 2 && n_tiles != 4 && n_tiles != 8) ||
      p.b.group_shift < 5)
    return cudaErrorInvalidValue;
  p.tiles_x = (p.b.n + 16 * row_tiles * warps - 1) / (16 * row_tiles * warps);
  p.tiles_z = (p.b.m + 8 * n_tiles - 1) / (8 * n_tiles);
  const int T = p.tiles_x * p.tiles_z;
  const size_t tile_floats = size_t(warps) * row_tiles * n_tiles * 128;
  *tiles = T;
  if (stream_k) {
    int per_sm = 0;
    const cudaError_t e = with_shape(bf16, row_tiles, n_tiles, [&](auto bf, auto r, auto t) {
      return prepare<decltype(bf)::value, decltype(r)::value, decltype(t)::value>(warps, &per_sm);
    });
    if (e != cudaSuccess) return e;
    const int64_t W = int64_t(T) * n_chunks;
    const int64_t G = std::max<int64_t>(1, std::min<int64_t>(W, int64_t(n_sms) * std::max(per_sm, 1)));
    int slots = 1;
    for (int t = 0; t < T; ++t)
      slots = std::max(slots, block_of_unit(int64_t(t) * n_chunks + n_chunks - 1, W, G) -
                                  block_of_unit(int64_t(t) * n_chunks, W, G) + 1);
    p.stream_k_blocks = int(G);
    p.splits = 1;
    p.chunks_per_split = n_chunks;
    p.slots = slots;
    *ws_floats = slots > 1 ? size_t(T) * slots * tile_floats : 0;
  } else {
    p.stream_k_blocks = 0;
    p.chunks_per_split = (n_chunks + std::min(split, n_chunks) - 1) / std::min(split, n_chunks);
    p.splits = (n_chunks + p.chunks_per_split - 1) / p.chunks_per_split;
    p.slots = p.splits;
    *ws_floats = p.splits > 1 ? size_t(T) * p.splits * tile_floats : 0;
  }
  return cudaSuccess;
}

cudaError_t gemm_int4_launch(const GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps,
                             cudaStream_t stream) {
  if (p.tiles_x < 1 || p.tiles_z < 1 || p.splits < 1 || p.slots < 1 ||
      ((p.splits > 1 || p.slots > 1) && (p.ws == nullptr || p.cnt == nullptr)))
    return cudaErrorInvalidValue;
  return with_shape(bf16, row_tiles, n_tiles, [&](auto bf, auto r, auto t) {
    return launch<decltype(bf)::value, decltype(r)::value, decltype(t)::value>(p, warps, stream);
  });
}
