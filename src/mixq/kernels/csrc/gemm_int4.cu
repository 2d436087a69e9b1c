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
#include "wgmma.cuh"

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

// This block's chunk-units [u, u_end) of W = tiles x n_chunks: one K slice of one tile (split K,
// grid (tiles_x, splits, tiles_z)), or a contiguous range that may span tiles (stream-K).
__device__ __forceinline__ void block_units(const GemmInt4Params& P, int64_t W, int n_chunks, int64_t& u,
                                            int64_t& u_end) {
  if (P.stream_k_blocks) {
    u = int64_t(blockIdx.x) * W / P.stream_k_blocks;
    u_end = int64_t(blockIdx.x + 1) * W / P.stream_k_blocks;
  } else {
    const int64_t tile = int64_t(blockIdx.z) * P.tiles_x + blockIdx.x;
    u = tile * n_chunks + int64_t(blockIdx.y) * P.chunks_per_split;
    u_end = tile * n_chunks + min(n_chunks, int(blockIdx.y + 1) * P.chunks_per_split);
  }
}

// The part of the chunk-units [u, u_end) that lies in one tile: `tile` (= u / n_chunks) and its
// chunks c_begin .. c_end - 1; the caller then advances u by c_end - c_begin.
__device__ __forceinline__ void tile_segment(int64_t u, int64_t u_end, int n_chunks, int& tile, int& c_begin,
                                             int& c_end) {
  tile = int(u / n_chunks);
  c_begin = int(u % n_chunks);
  c_end = int(min(int64_t(n_chunks), c_begin + (u_end - u)));
}

// This block's partial-sum slot in `tile` and the tile's number of slots.
__device__ __forceinline__ void tile_slot(const GemmInt4Params& P, int tile, int n_chunks, int64_t W, int& slot,
                                          int& n_slots) {
  if (P.stream_k_blocks) {
    const int first = block_of_unit(int64_t(tile) * n_chunks, W, P.stream_k_blocks);
    slot = int(blockIdx.x) - first;
    n_slots = block_of_unit(int64_t(tile) * n_chunks + n_chunks - 1, W, P.stream_k_blocks) - first + 1;
  } else {
    slot = int(blockIdx.y);
    n_slots = int(gridDim.y);
  }
}

// Once this block's partials of `tile` are stored: adds its `done` chunks to the tile's counter.
// True, in every thread, when they complete the tile: this block then sums the slots in order,
// writes y and resets the counter. is_last: a __shared__ int of the kernel.
__device__ __forceinline__ bool arrive_tile(const GemmInt4Params& P, int tile, int done, int n_chunks, int& is_last) {
  __threadfence();  // this thread's partials are visible device-wide before the block arrives
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(P.cnt + tile, done) + done == n_chunks;
  __syncthreads();
  const bool last = is_last;
  if (last) __threadfence();
  return last;
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

  const int64_t W = int64_t(n_tiles) * n_chunks;
  int64_t u, u_end;
  block_units(P, W, n_chunks, u, u_end);

  pdl_launch_dependents();
  bool waited = false;
  while (u < u_end) {  // block-uniform: one segment (a tile's chunks c_begin .. c_end - 1) per pass
    int tile, c_begin, c_end;
    tile_segment(u, u_end, n_chunks, tile, c_begin, c_end);
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
    auto compute = [&](const Chunk<kR>& ch, int b, int cc) {  // x from buffer b, chunk cc of the stage
      uint32_t nz[kR][2], ss[kR][2];
#pragma unroll
      for (int r = 0; r < kR; ++r) prescale_consts<kBF16>(ch, r, nz[r], ss[r]);
      const uint32_t xb = xs_base + uint32_t(b * 8 * kT * kRowUnits) * 16u;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t unit = uint32_t(swizzle(cc * 16 + 4 * q + w)) * 16u;
        uint32_t A[kR][2][4];  // [row tile][half word]: pairs (i, i + 4) of rows g, g + 8
#pragma unroll
        for (int r = 0; r < kR; ++r)
          prescaled_fragments<kBF16>(word(ch.w[r][0], w), word(ch.w[r][1], w), nz[r], ss[r], A[r][0], A[r][1]);
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          uint4 xv;
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                       : "=r"(xv.x), "=r"(xv.y), "=r"(xv.z), "=r"(xv.w)
                       : "r"(xb + x_lane[t] + unit));
          uint32_t b[4];
          x_pairs(xv, b);
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            H::mma(acc[r][t], A[r][0], b[0], b[1]);
            H::mma(acc[r][t], A[r][1], b[2], b[3]);
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
      tile_slot(P, tile, n_chunks, W, slot, n_slots);
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
      if (arrive_tile(P, tile, c_end - c_begin, n_chunks, is_last)) {
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

// ----------------------------------------------------------------------------------------------
// Hopper (sm_90a): the same int4 decoding, the products on wgmma. A warpgroup (4 warps) owns 64
// weight rows; warp w decodes rows 16w .. 16w + 15 exactly as above (lane (g, q): rows g, g + 8,
// inputs 32q .. 32q + 31 of each 128-input chunk, pairs (i, i + 4) of a word) into the A
// fragments of eight k16 steps (32 registers), and one wgmma.m64nNk16 per step multiplies them
// by N = kN activation rows read from shared memory. The wgmmas run asynchronously: a chunk's
// eight are committed as one group, and the next chunk's x is prepared while they run. x arrives by cp.async in a raw ring of two chunks ([kN rows][128 inputs],
// rows padded by 16 bytes) and is then rewritten, by every thread of the block, into the B
// operand in the order of the decoded K ("plane order": step 2w + h, K position 2q + j holds
// input 32q + 8w + 2h + 4j, position 8 + 2q + j input 32q + 8w + 2h + 1 + 4j), laid out as
// 8-row x 16-byte core matrices (no swizzle: K neighbours 128 bytes apart, 8-row groups 256).
// Work split, partial tiles and PDL as in gemm_int4_kernel; a tile is 64 kWG weight rows by kN
// activation rows, and the partial-sum slots hold each thread's accumulators, coalesced.
#ifdef MIXQ_WGMMA  // built for sm_90a only (cuda_gemv.arch_flags)
constexpr uint32_t kRawRowBytes = 17 * 16;  // 128 inputs + 16 bytes of padding

template <int kN>
__host__ __device__ constexpr uint32_t wg_raw_bytes() { return 2u * kN * kRawRowBytes; }  // two chunks, a multiple of 128 bytes

template <int kN>
__host__ __device__ constexpr size_t wg_smem_bytes() { return wg_raw_bytes<kN>() + 2u * kN * 256u; }  // + two chunks of B

template <bool kBF16, int kN, int kWG>
__global__ void __launch_bounds__(128 * kWG) gemm_wgmma_kernel(const GemmInt4Params P) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using H = Half<kBF16>;
  using MMA = Wgmma<kBF16, kN>;
  constexpr int kAcc = kN / 2;
  constexpr int kThreads = 128 * kWG;
  constexpr uint32_t kChunkB = kN * 256u;  // B bytes per chunk: 8 steps x kN rows x 16 inputs x 2 bytes
  constexpr uint32_t kStepB = kN * 32u;
  const GemvInt4Params& p = P.b;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n_chunks = (p.k + kChunk - 1) / kChunk;
  const int n_tiles = P.tiles_x * P.tiles_z;
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);

  extern __shared__ uint4 xsm[];
  __shared__ int is_last;
  const uint32_t raw_base = uint32_t(__cvta_generic_to_shared(xsm));
  const uint32_t b_base = raw_base + wg_raw_bytes<kN>();

  const int64_t W = int64_t(n_tiles) * n_chunks;
  int64_t u, u_end;
  block_units(P, W, n_chunks, u, u_end);

  pdl_launch_dependents();
  bool waited = false;
  while (u < u_end) {  // block-uniform: one segment (a tile's chunks c_begin .. c_end - 1) per pass
    int tile, c_begin, c_end;
    tile_segment(u, u_end, n_chunks, tile, c_begin, c_end);
    const int row0 = (tile % P.tiles_x) * (64 * kWG) + warp * 16;  // rows past n: clamped, not stored
    const int m0 = (tile / P.tiles_x) * kN;
    uint32_t w_off[1][2], s_off[1][2], z_off[1][2];
    row_offsets<1>(p, row0, 16, g, q * 4, p.zeros != nullptr, w_off, s_off, z_off);

    auto load = [&](Chunk<1>& ch, int c) {
      if (c >= c_end) return;  // block-uniform
      const int kq = c * kChunk + q * 32;
      load_chunk<1>(ch, p, c, kq < p.k, uint32_t(min(kq, p.k - 1) >> p.group_shift), p.zeros != nullptr, w_off,
                    s_off, z_off);
    };
    // x rows m0 .. m0 + kN - 1 of chunk c into raw buffer b: thread t copies the 16-byte unit
    // t % 16 of rows t / 16 + i kThreads / 16 (rows past m and inputs past k are zero-filled; the
    // rows' outputs are not stored); one cp.async group per call, empty past the segment
    constexpr int kUnits = kN * 16 / kThreads, kRowStep = kThreads / 16;
    const int un = threadIdx.x & 15, row_t = threadIdx.x >> 4;
    const char* x_src = reinterpret_cast<const char*>(xs + (size_t(min(m0 + row_t, p.m - 1)) * p.ldx + un * 8));
    const size_t x_step = size_t(kRowStep) * p.ldx * 2;  // bytes between a thread's rows
    const uint32_t raw_dst = raw_base + uint32_t(row_t) * kRawRowBytes + uint32_t(un) * 16u;
    auto stage_raw = [&](int b, int c) {
      if (c < c_end) {
        const bool k_ok = c * kChunk + un * 8 < p.k;
#pragma unroll
        for (int i = 0; i < kUnits; ++i) {
          const bool ok = k_ok && m0 + row_t + i * kRowStep < p.m;
          const char* src = ok ? x_src + i * x_step + size_t(c) * (kChunk * 2) : reinterpret_cast<const char*>(xs);
          const uint32_t dst = raw_dst + uint32_t(b * kN + i * kRowStep) * kRawRowBytes;
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
        }
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    };
    // raw buffer b -> B buffer b in the decoded K order: item (n, w) gathers units q = 0..3 of
    // word w of row n and writes one 16-byte core-matrix row to each of four places
    auto permute = [&](int b) {
#pragma unroll
      for (int j = 0; j < (kN * 4 + kThreads - 1) / kThreads; ++j) {
        const int it = threadIdx.x + j * kThreads;
        if (kN * 4 % kThreads != 0 && it >= kN * 4) break;
        const int n = it % kN, w = it / kN;
        const uint32_t src = raw_base + uint32_t(b * kN + n) * kRawRowBytes + uint32_t(w * 16);
        // r0: (x0, x4) to step 2w, K 2qq, 2qq + 1; r1: (x1, x5) to step 2w, K 8 + 2qq, 9 + 2qq;
        // r2, r3: (x2, x6), (x3, x7) the same in step 2w + 1
        uint32_t r0[4], r1[4], r2[4], r3[4];
#pragma unroll
        for (int qq = 0; qq < 4; ++qq) {
          uint4 v;
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                       : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                       : "r"(src + uint32_t(qq * 64)));
          uint32_t pr[4];
          x_pairs(v, pr);
          r0[qq] = pr[0];
          r1[qq] = pr[1];
          r2[qq] = pr[2];
          r3[qq] = pr[3];
        }
        const uint32_t dst = b_base + uint32_t(b) * kChunkB + uint32_t(2 * w) * kStepB + uint32_t(n >> 3) * 256u +
                             uint32_t(n & 7) * 16u;
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(r0[0]), "r"(r0[1]), "r"(r0[2]),
                     "r"(r0[3]) : "memory");
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst + 128u), "r"(r1[0]), "r"(r1[1]),
                     "r"(r1[2]), "r"(r1[3]) : "memory");
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst + kStepB), "r"(r2[0]), "r"(r2[1]),
                     "r"(r2[2]), "r"(r2[3]) : "memory");
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst + kStepB + 128u), "r"(r3[0]), "r"(r3[1]),
                     "r"(r3[2]), "r"(r3[3]) : "memory");
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // st.shared before the wgmmas read them
    };
    // (code - zero) * scale in x's dtype, as in gemm_int4_kernel: A[2w + h] = the fragment of step
    // (word w, half h)
    uint32_t A[8][4];
    auto decode = [&](const Chunk<1>& ch) {
      uint32_t nz[2], ss[2];
      prescale_consts<kBF16>(ch, 0, nz, ss);
#pragma unroll
      for (int w = 0; w < 4; ++w)
        prescaled_fragments<kBF16>(word(ch.w[0][0], w), word(ch.w[0][1], w), nz, ss, A[2 * w], A[2 * w + 1]);
    };

    float acc[kAcc];
#pragma unroll
    for (int j = 0; j < kAcc; ++j) acc[j] = 0.f;
    Chunk<1> ch0, ch1;
    load(ch0, c_begin);  // weights only: may run before the wait
    load(ch1, c_begin + 1);
    if (!waited) {
      pdl_wait();  // x, y and the workspace belong to the stream's previous kernels
      waited = true;
    }
    stage_raw(0, c_begin);
    stage_raw(1, c_begin + 1);
    // chunk c: while the previous chunk's wgmmas run, rewrite its x into B buffer b; then wait for
    // them (ptxas serializes every wgmma if registers they read are written while a group is in
    // flight, so the decoding comes after the wait), decode its weights, refill the register
    // buffer and issue its eight wgmmas as one group
    auto step = [&](int c, int b, Chunk<1>& ch) {
      asm volatile("cp.async.wait_group 1;" ::: "memory");  // raw chunk c has landed (c + 1 may not)
      __syncthreads();  // ... from every thread; B buffer b is no longer read (chunk c - 2 is done)
      permute(b);
      __syncthreads();  // B buffer b complete; raw buffer b free
      stage_raw(b, c + 2);
      wgmma_wait<0>();
      decode(ch);
      load(ch, c + 2);
      const uint64_t desc = smem_desc(b_base + uint32_t(b) * kChunkB, 128u, 256u);
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < 8; ++s) MMA::mma(acc, A[s], desc + uint64_t(s) * (kStepB >> 4));  // start address + step
      wgmma_commit();
    };
    for (int c = c_begin; c < c_end; c += 2) {
      step(c, 0, ch0);
      if (c + 1 < c_end) step(c + 1, 1, ch1);
    }
    wgmma_wait<0>();
    asm volatile("cp.async.wait_group 0;" ::: "memory");

    auto store_y = [&](const float (&v)[kAcc]) {
#pragma unroll
      for (int j = 0; j < kAcc; ++j) {
        const int row = row0 + g + 8 * ((j >> 1) & 1);
        const int col = m0 + 8 * (j >> 2) + 2 * q + (j & 1);
        if (row < p.n && col < p.m) {
          float o = v[j];
          if (p.bias) o += H::to_float(static_cast<const uint16_t*>(p.bias)[row]);
          static_cast<uint16_t*>(p.y)[col * p.ldy + row] = H::from_float(o);
        }
      }
    };

    if (c_end - c_begin == n_chunks) {
      store_y(acc);
    } else {
      int slot, n_slots;
      tile_slot(P, tile, n_chunks, W, slot, n_slots);
      constexpr size_t kTileFloats = size_t(kWG) * 64 * kN;
      float4* tile_ws = reinterpret_cast<float4*>(P.ws + size_t(tile) * P.slots * kTileFloats) + threadIdx.x;
      float4* mine = tile_ws + size_t(slot) * (kTileFloats / 4);
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j)
        __stcg(mine + j * kThreads, make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]));
      if (arrive_tile(P, tile, c_end - c_begin, n_chunks, is_last)) {
        for (int s2 = 0; s2 < n_slots; ++s2) {
          const float4* part = tile_ws + size_t(s2) * (kTileFloats / 4);
#pragma unroll
          for (int j = 0; j < kAcc / 4; ++j) {
            const float4 v = __ldcg(part + j * kThreads);
            acc[4 * j] = s2 ? acc[4 * j] + v.x : v.x;
            acc[4 * j + 1] = s2 ? acc[4 * j + 1] + v.y : v.y;
            acc[4 * j + 2] = s2 ? acc[4 * j + 2] + v.z : v.z;
            acc[4 * j + 3] = s2 ? acc[4 * j + 3] + v.w : v.w;
          }
        }
        store_y(acc);
        if (threadIdx.x == 0) P.cnt[tile] = 0;
      }
    }
    __syncthreads();  // the next segment (stream-K) restages the buffers and reuses is_last
    u += c_end - c_begin;
  }
  if (!waited) pdl_wait();
#endif
}

#endif  // MIXQ_WGMMA

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


#ifdef MIXQ_WGMMA
template <bool kBF16, int kN, int kWG>
cudaError_t prepare_wg(int* blocks_per_sm) {  // opt in to the shared memory; occupancy
  constexpr size_t smem = wg_smem_bytes<kN>();
  auto kernel = gemm_wgmma_kernel<kBF16, kN, kWG>;
  int dev = 0;
  cudaGetDevice(&dev);
  static size_t opted[64] = {};
  if (smem > 48 * 1024 && smem > opted[dev & 63]) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    opted[dev & 63] = smem;
  }
  if (blocks_per_sm) {
    static int cached[64] = {};
    int& c = cached[dev & 63];
    if (!c) {
      const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c, kernel, 128 * kWG, smem);
      if (e != cudaSuccess) return e;
    }
    *blocks_per_sm = c;
  }
  return cudaSuccess;
}

// Calls f(bool tag, N tag, warpgroup tag) with the wgmma kernel of n_tiles (N = 8 n_tiles: 16,
// 32, 64, 128) and warps (4 per warpgroup: 4, 8).
template <typename F>
cudaError_t with_wg_shape(bool bf16, int n_tiles, int warps, F&& f) {
  using std::integral_constant;
  auto by_n = [&](auto bf, auto wg) -> cudaError_t {
    switch (n_tiles) {
      case 2: return f(bf, integral_constant<int, 16>{}, wg);
      case 4: return f(bf, integral_constant<int, 32>{}, wg);
      case 8: return f(bf, integral_constant<int, 64>{}, wg);
      default: return f(bf, integral_constant<int, 128>{}, wg);
    }
  };
  auto by_wg = [&](auto bf) -> cudaError_t {
    return warps == 4 ? by_n(bf, integral_constant<int, 1>{}) : by_n(bf, integral_constant<int, 2>{});
  };
  return bf16 ? by_wg(integral_constant<bool, true>{}) : by_wg(integral_constant<bool, false>{});
}
#endif

}  // namespace

size_t gemm_int4_smem_bytes(int n_tiles) { return size_t(2) * 8 * n_tiles * kRowUnits * 16; }

bool gemm_wgmma_built() {
#ifdef MIXQ_WGMMA
  return true;
#else
  return false;
#endif
}

cudaError_t gemm_int4_plan(GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps, int split, bool stream_k,
                           bool wgmma, int n_sms, size_t* ws_floats, int* tiles) {
  const int n_chunks = (p.b.k + kChunk - 1) / kChunk;
  if (p.b.m < 1 || p.b.n < 1 || p.b.k < 32 || p.b.k % 32 || warps < 1 || warps > 8 || split < 1 || n_sms < 1 ||
      p.b.group_shift < 5)
    return cudaErrorInvalidValue;
  if (wgmma) {  // one 16-row tile per warp, whole warpgroups, N = 16 .. 128
    if (!gemm_wgmma_built()) return cudaErrorNotSupported;
    if (row_tiles != 1 || (warps != 4 && warps != 8) ||
        (n_tiles != 2 && n_tiles != 4 && n_tiles != 8 && n_tiles != 16))
      return cudaErrorInvalidValue;
  } else if ((row_tiles != 1 && row_tiles != 2) || (n_tiles != 1 && n_tiles != 2 && n_tiles != 4 && n_tiles != 8)) {
    return cudaErrorInvalidValue;
  }
  p.tiles_x = (p.b.n + 16 * row_tiles * warps - 1) / (16 * row_tiles * warps);
  p.tiles_z = (p.b.m + 8 * n_tiles - 1) / (8 * n_tiles);
  const int T = p.tiles_x * p.tiles_z;
  const size_t tile_floats = size_t(warps) * row_tiles * n_tiles * 128;
  *tiles = T;
  if (stream_k) {
    int per_sm = 0;
    cudaError_t e = cudaErrorNotSupported;
    if (!wgmma) {
      e = with_shape(bf16, row_tiles, n_tiles, [&](auto bf, auto r, auto t) {
        return prepare<decltype(bf)::value, decltype(r)::value, decltype(t)::value>(warps, &per_sm);
      });
    }
#ifdef MIXQ_WGMMA
    if (wgmma) {
      e = with_wg_shape(bf16, n_tiles, warps, [&](auto bf, auto n, auto wg) {
        return prepare_wg<decltype(bf)::value, decltype(n)::value, decltype(wg)::value>(&per_sm);
      });
    }
#endif
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

cudaError_t gemm_int4_launch(const GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps, bool wgmma,
                             cudaStream_t stream) {
  if (p.tiles_x < 1 || p.tiles_z < 1 || p.splits < 1 || p.slots < 1 ||
      ((p.splits > 1 || p.slots > 1) && (p.ws == nullptr || p.cnt == nullptr)))
    return cudaErrorInvalidValue;
  if (wgmma) {
#ifdef MIXQ_WGMMA
    return with_wg_shape(bf16, n_tiles, warps, [&](auto bf, auto n, auto wg) -> cudaError_t {
      constexpr bool kB = decltype(bf)::value;
      constexpr int kN = decltype(n)::value, kWG = decltype(wg)::value;
      const cudaError_t e = prepare_wg<kB, kN, kWG>(nullptr);
      if (e != cudaSuccess) return e;
      const dim3 grid = p.stream_k_blocks ? dim3(p.stream_k_blocks) : dim3(p.tiles_x, p.splits, p.tiles_z);
      return launch_ex(gemm_wgmma_kernel<kB, kN, kWG>, grid, dim3(128 * kWG), wg_smem_bytes<kN>(), stream, p.b.pdl, p);
    });
#else
    return cudaErrorNotSupported;
#endif
  }
  return with_shape(bf16, row_tiles, n_tiles, [&](auto bf, auto r, auto t) {
    return launch<decltype(bf)::value, decltype(r)::value, decltype(t)::value>(p, warps, stream);
  });
}
