// Weight-only int4 GEMV / small-batch GEMM, y = x @ dequant(W)^T, for m <= 16 activation rows,
// reading mixq's packed int4 layout directly (row-major int32 words, 8 LSB-first codes each;
// float16 group scales (n, n_groups); optional uint8 zero points).
//
// Work split. A warp owns a 16-row tile (two with kR = 2) and a set of 128-input chunks; the
// warps of a block share the tile and split the chunks (chunk c goes to warp c % warps), and
// their fp32 partials are summed through shared memory at the end. Lane (g = lane / 4,
// q = lane % 4) loads, per chunk, 16 bytes (32 codes, inputs 32q .. 32q + 31 of the chunk)
// of rows g and g + 8: a warp load covers 8 rows x 64 contiguous bytes, every sector whole.
//
// Arithmetic on the tensor cores: mma.m16n8k16 with the 16 weight rows as A and the (<= 8)
// activation rows as B, fp32 accumulation; at 9-16 rows (kB = 2, here and in the int8 and
// post-scaled 3-bit kernels) each decoded A meets two B tiles (activation rows 0-7 and 8-15),
// so the decode is shared by both. The k order inside an mma is free as long as A and B agree, so a lane's A pair i of word w holds the codes of inputs (8w + i, 8w + i + 4):
// nibbles i and i + 4 of the word, which one LOP3 ((w >> 4i) & 0x000F000F | magic) turns into
// two half-precision values magic + code, exact (bf16 128 + c, fp16 1024 + c). The lane's
// activations are permuted to match with four PRMTs per word.
//
// Scales and zero points. group_size >= 128 (post-scale): a chunk lies in one group, so the
// mmas run on magic + code directly and the chunk's fp32 result is corrected and scaled once:
// s * (sum (magic + c) x - (magic + zero) * sum x), sum x coming from an mma of all-ones A
// with the same B (exact products, fp32 sums; the cancellation costs ~1e-5 relative).
// group_size 32 or 64 (pre-scale): the four lanes of an mma see different groups, so
// (code - zero) * scale is formed in x's dtype before the mma (two packed ops per two
// weights, one rounding of the weight to bf16/fp16).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gemv_int4.h"
#include "common.cuh"

namespace {

using namespace mixq_kernels;


// The block's end: each warp's kR x kB x 4 fp32 accumulators summed over the warps through
// shared memory `partials` (warps, kR * kB * 4, 32), plus bias, stored in x's dtype.
// Accumulator j of lane (g, q) of row tile r and B tile b: row row0 + 16r + g + 8 (j >> 1),
// activation row 8b + 2q + (j & 1).
template <bool kBF16, int kR, int kB>
__device__ __forceinline__ void reduce_store(const GemvInt4Params& p, float* partials, const float (&acc)[kR][kB][4],
                                             int row0) {
  using H = Half<kBF16>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int b = 0; b < kB; ++b)
#pragma unroll
      for (int j = 0; j < 4; ++j) partials[(warp * kR * kB * 4 + (r * kB + b) * 4 + j) * 32 + lane] = acc[r][b][j];
  __syncthreads();
  for (int e = threadIdx.x; e < kR * kB * 128; e += blockDim.x) {
    float v = 0.f;
    for (int wi = 0; wi < n_warps; ++wi) v += partials[wi * kR * kB * 128 + e];
    const int ln = e & 31, j = (e >> 5) & 3, r = (e >> 7) / kB, b = (e >> 7) % kB;
    const int row = row0 + r * 16 + (ln >> 2) + 8 * (j >> 1);
    const int col = 8 * b + 2 * (ln & 3) + (j & 1);
    if (row < p.n && col < p.m) {
      if (p.bias) v += H::to_float(static_cast<const uint16_t*>(p.bias)[row]);
      static_cast<uint16_t*>(p.y)[col * p.ldy + row] = H::from_float(v);
    }
  }
}

// Element offsets into x of a lane's activation row in each of kB B tiles, at input column
// `col`: tile b holds activation rows 8b .. 8b + 7, lane group g reads row 8b + g, and lanes past
// m read row m - 1 (their columns are computed, not stored). 32-bit, since a 64-bit pointer per
// row gets rematerialized.
template <int kB>
__device__ __forceinline__ void x_offsets(const GemvInt4Params& p, int g, uint32_t col, uint32_t (&off)[kB]) {
#pragma unroll
  for (int b = 0; b < kB; ++b) off[b] = opaque(uint32_t(min(8 * b + g, p.m - 1)) * uint32_t(p.ldx) + col);
}

// The register double buffer of the int8 and 3-bit GEMVs: a warp takes chunks warp, warp + step,
// ... of n_chunks; both buffers' weights are issued before the PDL wait (x and y belong to the
// stream's previous kernels), and each buffer is refilled right after it is decoded.
template <class Buf, class Load, class Compute>
__device__ __forceinline__ void double_buffered(int warp, int step, int n_chunks, Load&& load, Compute&& compute) {
  Buf buf_a, buf_b;
  load(buf_a, warp);
  load(buf_b, warp + step);
  pdl_wait();
  for (int c = warp; c < n_chunks; c += 2 * step) {
    compute(buf_a, c);
    load(buf_a, c + 2 * step);
    if (c + step < n_chunks) compute(buf_b, c + step);
    load(buf_b, c + 3 * step);
  }
}

// Scales after the product: acc[j] += s (t[j] - (magic + zero) sx[j]) for one mma's fp32 sums
// t of magic + code against the activations and sx of the activations alone (an all-ones A);
// accumulators 0, 1 are row g (fp16 scale bits s0, zero point z0), 2, 3 row g + 8 (s1, z1).
template <bool kBF16>
__device__ __forceinline__ void post_scale(float (&acc)[4], const float (&t)[4], const float (&sx)[4], uint32_t s0,
                                           uint32_t s1, uint32_t z0, uint32_t z1) {
  using H = Half<kBF16>;
  const float f0 = __half2float(__ushort_as_half((unsigned short)s0));
  const float f1 = __half2float(__ushort_as_half((unsigned short)s1));
  const float mz0 = H::kMagicF + float(z0), mz1 = H::kMagicF + float(z1);
  acc[0] = fmaf(fmaf(-mz0, sx[0], t[0]), f0, acc[0]);
  acc[1] = fmaf(fmaf(-mz0, sx[1], t[1]), f0, acc[1]);
  acc[2] = fmaf(fmaf(-mz1, sx[2], t[2]), f1, acc[2]);
  acc[3] = fmaf(fmaf(-mz1, sx[3], t[3]), f1, acc[3]);
}

// reduce_store for the SiLU x up product (p.glu_half): tile 0 holds gate rows, tile 1 the up
// rows of the same outputs; each is rounded to x's dtype (+ its bias) as the separate matmuls'
// outputs would be, then silu(gate) is rounded and multiplied by up, rounded: what the unfused
// step computes (decode_ops.silu_mul). Output row j < glu_half of y.
template <bool kBF16>
__device__ __forceinline__ void glu_store(const GemvInt4Params& p, float gate, float up, int row, int col) {
  using H = Half<kBF16>;
  if (row < p.glu_half && col < p.m) {
    if (p.bias) {
      gate += H::to_float(static_cast<const uint16_t*>(p.bias)[row]);
      up += H::to_float(static_cast<const uint16_t*>(p.bias)[p.glu_half + row]);
    }
    const float g = H::to_float(H::from_float(gate)), u = H::to_float(H::from_float(up));
    const float s = H::to_float(H::from_float(g / (1.f + expf(-g))));
    static_cast<uint16_t*>(p.y)[col * p.ldy + row] = H::from_float(s * u);
  }
}

template <bool kBF16, int kB>
__device__ __forceinline__ void reduce_store_glu(const GemvInt4Params& p, float* partials, const float (&acc)[2][kB][4],
                                                 int row0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int b = 0; b < kB; ++b)
#pragma unroll
      for (int j = 0; j < 4; ++j) partials[(warp * 8 * kB + (r * kB + b) * 4 + j) * 32 + lane] = acc[r][b][j];
  __syncthreads();
  for (int e = threadIdx.x; e < kB * 128; e += blockDim.x) {
    float gate = 0.f, up = 0.f;
    for (int wi = 0; wi < n_warps; ++wi) {
      gate += partials[wi * 256 * kB + e];
      up += partials[wi * 256 * kB + 128 * kB + e];
    }
    const int ln = e & 31, j = (e >> 5) & 3, b = e >> 7;
    glu_store<kBF16>(p, gate, up, row0 + (ln >> 2) + 8 * (j >> 1), 8 * b + 2 * (ln & 3) + (j & 1));
  }
}

// reduce_store for the SiLU x up product with one 16-row tile (the 3-bit kernels, p.glu_half): its
// rows 0-7 are the gate rows row0 .. row0 + 7 (accumulators 0, 1 of a lane), rows 8-15 the up rows
// of the same outputs (accumulators 2, 3), rounded as reduce_store_glu rounds them.
template <bool kBF16, int kB>
__device__ __forceinline__ void reduce_store_glu8(const GemvInt4Params& p, float* partials, const float (&acc)[1][kB][4],
                                                  int row0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int b = 0; b < kB; ++b)
#pragma unroll
    for (int j = 0; j < 4; ++j) partials[(warp * kB * 4 + b * 4 + j) * 32 + lane] = acc[0][b][j];
  __syncthreads();
  for (int e = threadIdx.x; e < kB * 64; e += blockDim.x) {
    const int ln = e & 31, jj = (e >> 5) & 1, b = e >> 6;
    float gate = 0.f, up = 0.f;
    for (int wi = 0; wi < n_warps; ++wi) {
      gate += partials[wi * kB * 128 + (b * 4 + jj) * 32 + ln];
      up += partials[wi * kB * 128 + (b * 4 + 2 + jj) * 32 + ln];
    }
    glu_store<kBF16>(p, gate, up, row0 + (ln >> 2), 8 * b + 2 * (ln & 3) + jj);
  }
}

// One 16-row tile, one chunk per buffer: at most 64 registers (two 512-thread blocks, or eight of
// 128 threads, per SM), so the 896 blocks of a 14336-row batch-1 GEMV fit one wave on 132 SMs (73
// registers left six 128-thread blocks per SM: 1.13 waves, Nsight Compute on the H200).
//
// kS > 0 (the ring): instead of two register buffers, each warp streams its chunks' weights
// through a ring of kS slots in shared memory with cp.async (16 bytes per lane and row half,
// each lane reading back only what it copied, so no barrier), kS - 1 chunks in flight while one
// is decoded; the scales and zero points ride in a register ring alongside (the loop is unrolled
// over the kS slots). It keeps more bytes in flight per SM than the register pipeline can at the
// same register count, for the weights where a warp has only a few chunks and DRAM latency, not
// bandwidth, sets the time.
//
// kB = 2 (9-16 activation rows): each decoded A meets two B tiles, activation rows 0-7 and 8-15.
template <bool kBF16, bool kPre, bool kZeros, int kR, int kU, int kS, int kB>
__global__ void __launch_bounds__(512, (kR == 1 && kU == 1 && kB == 1) ? 2 : 1) gemv_int4_kernel(const GemvInt4Params p) {
  using H = Half<kBF16>;
  // kS == 0: partials (warps, kR * 4, 32) floats; kS > 0: the ring (warps, kS, kR * 2, 32) uint4 first
  extern __shared__ uint4 smem_u4[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  float* partials = reinterpret_cast<float*>(smem_u4 + (kS > 0 ? n_warps * kS * kR * 64 : 0));
  const int g = lane >> 2, q = lane & 3;
  // p.glu_half (two row tiles): tile 0 is rows row0.. of the gate half, tile 1 the same rows of
  // the up half, glu_half rows further
  const int row0 = blockIdx.x * (p.glu_half ? 16 : 16 * kR);
  const int tile_stride = p.glu_half ? p.glu_half : 16;
  const int n_chunks = (p.k + kChunk - 1) / kChunk;
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);
  uint32_t x_off[kB];
  x_offsets<kB>(p, g, q * 32, x_off);

  // rows g and g + 8 of each tile (tail rows clamped: computed, not stored)
  uint32_t w_off[kR][2], s_off[kR][2], z_off[kR][2];
  row_offsets<kR>(p, row0, tile_stride, g, q * 4, kZeros, w_off, s_off, z_off);

  auto load = [&](Chunk<kR>& ch, int c) {
    if (c >= n_chunks) return;  // warp-uniform
    const int kq = c * kChunk + q * 32;
    const uint32_t grp = uint32_t((kPre ? min(kq, p.k - 1) : c * kChunk) >> p.group_shift);
    load_chunk<kR>(ch, p, c, kq < p.k, grp, kZeros, w_off, s_off, z_off);
  };

  float acc[kR][kB][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int b = 0; b < kB; ++b)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[r][b][j] = 0.f;

  const uint32_t mask = 0x000F000Fu, magic = H::kMagic;
  auto compute = [&](const Chunk<kR>& ch, int c) {
    const int kq = c * kChunk + q * 32;
    // B operands of tile bt: word w covers inputs 8w .. 8w + 7 = xv[w] = (x0x1, x2x3, x4x5, x6x7)
    uint32_t b[kB][4][4];
    // kPre == false: the mma runs on magic + code (no subtraction), and the offset is taken
    // out in fp32 afterwards: sum (magic + c) x - (magic + zero) sum x, with sum x (per
    // activation row, over the chunk) from an mma of all-ones A with the same B
    float sx[kB][4];
#pragma unroll
    for (int bt = 0; bt < kB; ++bt) {
      uint4 xv[4] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
      if (kq < p.k) {
        const uint4* xp = reinterpret_cast<const uint4*>(xs + (x_off[bt] + c * kChunk));
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = __ldg(xp + i);
      }
#pragma unroll
      for (int w = 0; w < 4; ++w) x_pairs(xv[w], b[bt][w]);
#pragma unroll
      for (int j = 0; j < 4; ++j) sx[bt][j] = 0.f;
      if (!kPre) {
        const uint32_t ones[4] = {H::kOne, H::kOne, H::kOne, H::kOne};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          H::mma(sx[bt], ones, b[bt][w][0], b[bt][w][1]);
          H::mma(sx[bt], ones, b[bt][w][2], b[bt][w][3]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const uint32_t sp = pack_rows(ch.s[r]);  // scales of rows g (low half), g + 8
      const uint32_t zp = pack_rows(ch.z[r]);
      const uint32_t z0 = zp & 0xFFu, z1 = zp >> 16;  // rows g, g + 8
      const uint32_t nz0 = H::kNegMagic | (z0 * 0x10001u);      // -(magic + zero) x2
      const uint32_t nz1 = H::kNegMagic | (z1 * 0x10001u);
      uint32_t ss0 = 0, ss1 = 0;
      if (kPre) {
        ss0 = H::scale_pair(sp & 0xFFFFu);
        ss1 = H::scale_pair(sp >> 16);
      }
      float t[kB][4];
#pragma unroll
      for (int bt = 0; bt < kB; ++bt)
#pragma unroll
        for (int j = 0; j < 4; ++j) t[bt][j] = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t w0 = word(ch.w[r][0], w), w1 = word(ch.w[r][1], w);
        uint32_t a0[4], a1[4];  // pair i: codes (i, i + 4) of rows g, g + 8
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a0[i] = and_or(w0 >> (4 * i), mask, magic);  // magic + code, exact
          a1[i] = and_or(w1 >> (4 * i), mask, magic);
          if (kPre) {
            a0[i] = H::fma2(H::fma2(a0[i], H::kOne, nz0), ss0, 0x80008000u);  // (code - zero) * scale
            a1[i] = H::fma2(H::fma2(a1[i], H::kOne, nz1), ss1, 0x80008000u);
          }
        }
        const uint32_t A0[4] = {a0[0], a1[0], a0[1], a1[1]};
        const uint32_t A1[4] = {a0[2], a1[2], a0[3], a1[3]};
#pragma unroll
        for (int bt = 0; bt < kB; ++bt) {
          if constexpr (kPre) {
            H::mma(acc[r][bt], A0, b[bt][w][0], b[bt][w][1]);
            H::mma(acc[r][bt], A1, b[bt][w][2], b[bt][w][3]);
          } else {
            H::mma(t[bt], A0, b[bt][w][0], b[bt][w][1]);
            H::mma(t[bt], A1, b[bt][w][2], b[bt][w][3]);
          }
        }
      }
      if (!kPre) {
#pragma unroll
        for (int bt = 0; bt < kB; ++bt) post_scale<kBF16>(acc[r][bt], t[bt], sx[bt], sp & 0xFFFFu, sp >> 16, z0, z1);
      }
    }
  };

  const int step = n_warps;
  if constexpr (kS == 0) {
    // software pipeline, two register buffers: the next kU chunks are in flight while kU are
    // decoded, and both buffers are issued before the wait (weights only)
    Chunk<kR> buf_a[kU], buf_b[kU];
    pdl_launch_dependents();
#pragma unroll
    for (int u = 0; u < kU; ++u) load(buf_a[u], warp + u * step);
#pragma unroll
    for (int u = 0; u < kU; ++u) load(buf_b[u], warp + (kU + u) * step);
    pdl_wait();  // x and y belong to the stream's previous kernels
    for (int c = warp; c < n_chunks; c += 2 * kU * step) {
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (c + u * step < n_chunks) compute(buf_a[u], c + u * step);
#pragma unroll
      for (int u = 0; u < kU; ++u) load(buf_a[u], c + (2 * kU + u) * step);
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (c + (kU + u) * step < n_chunks) compute(buf_b[u], c + (kU + u) * step);
#pragma unroll
      for (int u = 0; u < kU; ++u) load(buf_b[u], c + (3 * kU + u) * step);
    }
  } else {
    // the ring: slot s of this warp holds chunk warp + (i * kS + s) * step; lane-private 16-byte
    // cells (kR * 2 per slot), so a lane's ld.shared reads what its own cp.async wrote
    uint4* ring = smem_u4 + warp * (kS * kR * 64) + lane;
    const uint32_t ring_base = uint32_t(__cvta_generic_to_shared(ring));
    uint32_t s_ring[kS][kR][2], z_ring[kS][kR][2];  // as Chunk::s, Chunk::z
    // issue chunk c into slot `slot` (one commit group, empty past the end)
    // chunk c to warp c % warps (a run of consecutive chunks per warp measured the same)
    const int c_first = warp, c_step = step, c_end = n_chunks;
    auto issue = [&](int slot, int c) {
      if (c < c_end) {  // warp-uniform
        const int kq = c * kChunk + q * 32;
        const bool ok = kq < p.k;
        const uint32_t grp = uint32_t((kPre ? min(kq, p.k - 1) : c * kChunk) >> p.group_shift);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t dst = ring_base + uint32_t((slot * kR * 2 + r * 2 + h) * 32 * 16);
            const uint32_t* src = p.codes + (w_off[r][h] + (ok ? c * 16 : 0));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s_ring[slot][r][h] = __ldg(p.scales + (s_off[r][h] + grp));
            if (kZeros) z_ring[slot][r][h] = __ldg(p.zeros + (z_off[r][h] + grp));
          }
        }
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    };
    pdl_launch_dependents();
#pragma unroll
    for (int s = 0; s < kS - 1; ++s) issue(s, c_first + s * c_step);  // weights only: before the wait
    pdl_wait();
    for (int c0 = c_first; c0 < c_end; c0 += kS * c_step) {
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const int c = c0 + s * c_step;
        asm volatile("cp.async.wait_group %0;" ::"n"(kS - 2) : "memory");  // chunk c has landed
        Chunk<kR> ch;
#pragma unroll
        for (int r = 0; r < kR; ++r) {
#pragma unroll
          for (int h = 0; h < 2; ++h) ch.w[r][h] = ring[(s * kR * 2 + r * 2 + h) * 32];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            ch.s[r][h] = s_ring[s][r][h];
            ch.z[r][h] = kZeros ? z_ring[s][r][h] : uint32_t(p.code_offset);
          }
        }
        // refill the slot decoded one step ago (its words are in registers already)
        issue((s + kS - 1) % kS, c + (kS - 1) * c_step);
        if (c < c_end) compute(ch, c);
      }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
  }

  if constexpr (kR == 2) {
    if (p.glu_half) {
      reduce_store_glu<kBF16, kB>(p, partials, acc, row0);
      return;
    }
  }
  reduce_store<kBF16, kR, kB>(p, partials, acc, row0);
}

template <bool kBF16, bool kPre, bool kZeros, int kR, int kU, int kS, int kB>
cudaError_t launch(const GemvInt4Params& p, int warps, cudaStream_t stream) {
  const dim3 grid(p.glu_half ? (p.glu_half + 15) / 16 : (p.n + 16 * kR - 1) / (16 * kR));
  const dim3 block(32 * warps);
  const size_t smem = size_t(warps) * kR * kB * 128 * sizeof(float) + gemv_int4_ring_bytes(kR, kS, warps);
  auto kernel = gemv_int4_kernel<kBF16, kPre, kZeros, kR, kU, kS, kB>;
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
  return launch_ex(kernel, grid, block, smem, stream, p.pdl, p);
}

template <bool kBF16, bool kPre, bool kZeros, int kR>
cudaError_t launch_pipe(const GemvInt4Params& p, int unroll, int stages, int warps, cudaStream_t stream) {
  if (p.m > 8) {  // two B tiles: the register pipeline (unroll 1) or the 4-slot ring
    switch (stages) {
      case 0: return launch<kBF16, kPre, kZeros, kR, 1, 0, 2>(p, warps, stream);
      case 4: return launch<kBF16, kPre, kZeros, kR, 1, 4, 2>(p, warps, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (stages) {
    case 0: return unroll == 1 ? launch<kBF16, kPre, kZeros, kR, 1, 0, 1>(p, warps, stream)
                               : launch<kBF16, kPre, kZeros, kR, 2, 0, 1>(p, warps, stream);
    case 4: return launch<kBF16, kPre, kZeros, kR, 1, 4, 1>(p, warps, stream);
    case 8: return launch<kBF16, kPre, kZeros, kR, 1, 8, 1>(p, warps, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool kBF16, bool kPre, bool kZeros>
cudaError_t launch_shape(const GemvInt4Params& p, int row_tiles, int unroll, int stages, int warps, cudaStream_t stream) {
  return row_tiles == 1 ? launch_pipe<kBF16, kPre, kZeros, 1>(p, unroll, stages, warps, stream)
                        : launch_pipe<kBF16, kPre, kZeros, 2>(p, unroll, stages, warps, stream);
}

template <bool kBF16, bool kPre>
cudaError_t launch_zeros(const GemvInt4Params& p, int row_tiles, int unroll, int stages, int warps, cudaStream_t stream) {
  return p.zeros ? launch_shape<kBF16, kPre, true>(p, row_tiles, unroll, stages, warps, stream)
                 : launch_shape<kBF16, kPre, false>(p, row_tiles, unroll, stages, warps, stream);
}


// ----------------------------------------------------------------------------------------------
// 3-bit codes, mixq's 3-bit unit layout (packed.py): a unit of 32 inputs is 3 words, stored
// planar (plane u of unit j at codes[n, u * J + j]). Its codes form 16 pairs, slot i < 8 codes
// (i, i + 8), slot 8 + i codes (16 + i, 24 + i), 16 bits apart in their word. Slot s < 15 is
// field s % 5 of word s / 5, at bits 0, 3 (inside a half-precision mantissa as stored: one LOP3
// gives magic + code, or magic + 8 code), 7, 10 (the same after a shift by 7) or 13 (by 13); the
// last slot has bit j of its codes at bits 6 and 22 of word j (three LOP3s: magic + 16 code).
// So a unit's 16 pairs take 24 LOP3s and 8 shifts.
//
// Work split as for int4, with 512-input chunks: at step t of a chunk lane (g, q) decodes unit
// 4t + q of rows g and g + 8; packed.py stores a chunk's units in that order (load_units3), so
// each lane loads 16 bytes of each plane per chunk (load_chunk3). This kernel takes groups under 128 inputs
// (and, with MIXQ_GEMV3_POST=0, any): an mma's k-slots span the four lanes' units, which may
// then lie in different groups, so (code - zero) * scale is formed in x's dtype before the mma
// (two packed FMAs per pair).

constexpr int kChunk3 = 512;  // inputs per warp per chunk: 4 lanes x 4 units x 32 codes

// The factor a pair slot's field carries as decoded: magic + mult * code.
__host__ __device__ constexpr int split3_mult(int s) { return s == 15 ? 16 : ((s % 5) & 1) ? 8 : 1; }

// Half-precision magic + mult * code of pair slot s (0..15, a compile-time constant once
// unrolled) of a unit with words w0, w1, w2.
__device__ __forceinline__ uint32_t decode3(uint32_t w0, uint32_t w1, uint32_t w2, int s, uint32_t magic) {
  if (s == 15) return and_or(w2, 0x00400040u, and_or(w1 >> 1, 0x00200020u, and_or(w0 >> 2, 0x00100010u, magic)));
  const uint32_t w = s < 5 ? w0 : (s < 10 ? w1 : w2);
  const int r = s % 5;
  return and_or(w >> (r < 2 ? 0 : (r < 4 ? 7 : 13)), (r & 1) ? 0x00380038u : 0x00070007u, magic);
}

// magic + mult * code -> magic + code (exact: the product by 1/mult is exact, and so is the sum)
template <bool kBF16>
__device__ __forceinline__ uint32_t unscale3(uint32_t v, int s) {
  using H = Half<kBF16>;
  const int k = split3_mult(s);
  return k == 1 ? v : H::fma2(v, k == 8 ? H::kInv8 : H::kInv16, k == 8 ? H::kRest8 : H::kRest16);
}

// B operands of pairs i, i + 1 (i even) of a 3-bit unit from its 32 activations xv, as both
// 3-bit kernels pair the codes: (x[i], x[i + 8]) and (x[i + 1], x[i + 9]) of the low half-unit
// (bl), the same 16 inputs later of the high one (bh).
__device__ __forceinline__ void unit3_b(const uint4 (&xv)[4], int i, uint32_t (&bl)[2], uint32_t (&bh)[2]) {
  const uint32_t sel0 = 0x5410u, sel1 = 0x7632u;  // ii even: low halves; odd: high halves
  bl[0] = __byte_perm(word(xv[0], i >> 1), word(xv[1], i >> 1), sel0);
  bl[1] = __byte_perm(word(xv[0], i >> 1), word(xv[1], i >> 1), sel1);
  bh[0] = __byte_perm(word(xv[2], i >> 1), word(xv[3], i >> 1), sel0);
  bh[1] = __byte_perm(word(xv[2], i >> 1), word(xv[3], i >> 1), sel1);
}

// A lane's words of one plane of a 3-bit row for steps t = 0..3 of the last chunk c when it is
// partial (u = 4, 8 or 12 units, stored with stride S = u / 4: see Chunk3); steps past it get 0.
__device__ __forceinline__ uint4 load_units3_tail(const uint32_t* plane, int c, int q, int n_units) {
  const int S = (n_units - c * 16) >> 2;
  const uint32_t* w = plane + c * 16 + q * S;
  return make_uint4(__ldg(w), S > 1 ? __ldg(w + 1) : 0u, S > 2 ? __ldg(w + 2) : 0u, 0u);
}

// The end of a 3-bit kernel (one 16-row tile): reduce_store, or with p.glu_half its SiLU x up.
template <bool kBF16, int kB>
__device__ __forceinline__ void reduce_store3(const GemvInt4Params& p, float* partials, const float (&acc)[1][kB][4],
                                              int row0) {
  if (p.glu_half)
    reduce_store_glu8<kBF16, kB>(p, partials, acc, row0);
  else
    reduce_store<kBF16, 1, kB>(p, partials, acc, row0);
}

// Rows of a 3-bit kernel's 16-row tile: row0 + g and row0 + 8 + g; with p.glu_half (SiLU x up,
// row0 = 8 per block) the gate row row0 + g and the up row of the same output, glu_half further.
__device__ __forceinline__ void row_offsets3(const GemvInt4Params& p, int row0, int g, bool zeros,
                                             uint32_t (&w_off)[1][2], uint32_t (&s_off)[1][2], uint32_t (&z_off)[1][2]) {
  if (!p.glu_half) return row_offsets<1>(p, row0, 16, g, 0, zeros, w_off, s_off, z_off);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t row = min(row0 + g, p.glu_half - 1) + h * p.glu_half;
    w_off[0][h] = opaque(row * uint32_t(p.ld_codes));
    s_off[0][h] = opaque(row * uint32_t(p.ld_scales));
    z_off[0][h] = zeros ? opaque(row * uint32_t(p.ld_zeros)) : 0u;
  }
}

struct Chunk3 {
  uint4 w[2][3];     // rows g, g + 8: planes 0, 1, 2; word t = step t's unit c * 16 + 4t + q
  uint32_t s[2][4];  // fp16 scale bits per row and step
  uint32_t z[2][4];  // zero points per row and step
};

// Chunk c of rows g, g + 8: for steps t = 0..3 the words of units c * 16 + 4t + q, and the scale
// and zero point of each step's unit. packed.py stores a chunk's units interleaved by four (unit
// c * 16 + 4t + q at word c * 16 + q S + t, S = the chunk's units / 4: 4, or fewer in a last,
// partial chunk), so a full chunk is one 16-byte load per lane, plane and row.
template <bool kZeros, class Params>
__device__ __forceinline__ void load_chunk3(Chunk3& ch, const Params& p, int c, int q, int n_units,
                                            const uint32_t (&w_off)[2], const uint32_t (&s_off)[2],
                                            const uint32_t (&z_off)[2]) {
  if (c * 16 + 16 <= n_units) {  // a full chunk (warp-uniform)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int u = 0; u < 3; ++u) ch.w[h][u] = load_stream(p.codes + (w_off[h] + u * n_units + c * 16 + 4 * q));
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int u = 0; u < 3; ++u) ch.w[h][u] = load_units3_tail(p.codes + (w_off[h] + u * n_units), c, q, n_units);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t grp = uint32_t((min(c * 16 + 4 * t + q, n_units - 1) * 32) >> p.group_shift);
      ch.s[h][t] = __ldg(p.scales + (s_off[h] + grp));
      ch.z[h][t] = kZeros ? uint32_t(__ldg(p.zeros + (z_off[h] + grp))) : uint32_t(p.code_offset);
    }
  }
}

template <bool kBF16, bool kZeros>
__global__ void __launch_bounds__(512) gemv_int3_kernel(const GemvInt4Params p) {
  using H = Half<kBF16>;
  extern __shared__ float partials[];  // (warps, 4, 32)
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * (p.glu_half ? 8 : 16);
  const int n_units = p.k >> 5;  // J, a multiple of 4
  const int n_chunks = (n_units + 15) >> 4;
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);
  uint32_t x_offs[1];
  x_offsets<1>(p, g, q * 32, x_offs);
  const uint32_t x_off = x_offs[0];
  uint32_t w_offs[1][2], s_offs[1][2], z_offs[1][2];  // rows g, g + 8
  row_offsets3(p, row0, g, kZeros, w_offs, s_offs, z_offs);
  const uint32_t (&w_off)[2] = w_offs[0], (&s_off)[2] = s_offs[0], (&z_off)[2] = z_offs[0];

  auto load = [&](Chunk3& ch, int c) {
    if (c < n_chunks) load_chunk3<kZeros>(ch, p, c, q, n_units, w_off, s_off, z_off);  // warp-uniform
  };

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t magic = opaque(H::kMagic);
  auto compute = [&](const Chunk3& ch, int c) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {  // the lane's unit c * 16 + 4t + q
      if (c * 16 + 4 * t >= n_units) break;  // past a partial last chunk: warp-uniform
      uint4 xv[4];
      const uint4* xp = reinterpret_cast<const uint4*>(xs + (x_off + c * kChunk3 + t * 128));
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = __ldg(xp + i);
      uint32_t p0[2], p1[2], p2[2], nz[2], ss[2];  // rows g, g + 8
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        p0[h] = word(ch.w[h][0], t);
        p1[h] = word(ch.w[h][1], t);
        p2[h] = word(ch.w[h][2], t);
        nz[h] = H::kNegMagic | (ch.z[h][t] * 0x10001u);  // -(magic + zero) x2
        ss[h] = H::scale_pair(ch.s[h][t]);
      }
      // (code - zero) * scale of pair slot s, from magic + code
      auto value = [&](int h, int s) {
        const uint32_t v = unscale3<kBF16>(decode3(p0[h], p1[h], p2[h], s, magic), s);
        return H::fma2(H::fma2(v, H::kOne, nz[h]), ss[h], 0x80008000u);
      };
      // slot i: codes (i, i + 8) of the low half-unit, slot 8 + i: (16 + i, 24 + i) of the high
      // one, with B pairs (x[i], x[i + 8]), (x[16 + i], x[24 + i]); two pairs per mma
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        uint32_t lo[2][2], hi[2][2];  // [row half][pair]
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            lo[h][e] = value(h, i + e);
            hi[h][e] = value(h, 8 + i + e);
          }
        uint32_t bl[2], bh[2];
        unit3_b(xv, i, bl, bh);
        const uint32_t A0[4] = {lo[0][0], lo[1][0], lo[0][1], lo[1][1]};
        const uint32_t A1[4] = {hi[0][0], hi[1][0], hi[0][1], hi[1][1]};
        H::mma(acc, A0, bl[0], bl[1]);
        H::mma(acc, A1, bh[0], bh[1]);
      }
    }
  };

  pdl_launch_dependents();
  double_buffered<Chunk3>(warp, n_warps, n_chunks, load, compute);

  const float acc1[1][1][4] = {{{acc[0], acc[1], acc[2], acc[3]}}};
  reduce_store3<kBF16, 1>(p, partials, acc1, row0);
}

// ----------------------------------------------------------------------------------------------
// 3-bit codes with groups of >= 128 inputs (or one per row), post-scaled. At step t of a
// 512-input chunk lane q decodes unit 4t + q (the interleaved order above), so the four lanes of
// an mma hold units 4t .. 4t + 3 = one 128-input group. Its mmas then run on magic + code
// directly (no per-weight scaling: decode3, and one packed FMA for the 7 of 16 pair slots stored
// 3 or 4 bits up in the mantissa), and each step's fp32 result is corrected and scaled once, as
// int4's post-scale path does: s * (sum (magic + c) x - (magic + zero) * sum x), sum x from an mma
// of all-ones A. One activation tile (kB = 1): a lane's four units of a chunk are one 16-byte load
// per plane and row, two chunks in flight per warp (as the pre-scaled kernel). kB = 2 (9-16
// activation rows): each decoded pair meets two B tiles, as in the int4 kernel; to stay within
// 128 registers it holds one chunk in flight, as a ring of two half-chunk slots refilled by 8-byte
// loads (steps 2k and 2k + 1 of a lane are adjacent words).

struct Step3 {      // one step t of a chunk: unit 4t + q of the chunk, rows g and g + 8
  uint32_t w[2][3];  // [row half][plane] words
  uint32_t s[2];     // fp16 scale bits of the step's group per row
  uint32_t z[2];     // zero points per row
};

template <bool kBF16, bool kZeros, int kB>
__global__ void __launch_bounds__(512) gemv_int3p_kernel(const GemvInt4Params p) {
  using H = Half<kBF16>;
  extern __shared__ float partials3[];  // (warps, kB * 4, 32)
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * (p.glu_half ? 8 : 16);
  const int n_units = p.k >> 5;  // J, a multiple of 4
  const int n_chunks = (n_units + 15) >> 4;
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);
  uint32_t x_off[kB];
  x_offsets<kB>(p, g, q * 32, x_off);
  uint32_t w_offs[1][2], s_offs[1][2], z_offs[1][2];  // rows g, g + 8
  row_offsets3(p, row0, g, kZeros, w_offs, s_offs, z_offs);
  const uint32_t (&w_off)[2] = w_offs[0], (&s_off)[2] = s_offs[0], (&z_off)[2] = z_offs[0];

  float acc[1][kB][4] = {};  // reduce_store's (row tiles, B tiles, 4)
  const uint32_t magic = opaque(H::kMagic);
  const uint32_t ones[4] = {H::kOne, H::kOne, H::kOne, H::kOne};
  // mma chains per B tile and sum: one B tile keeps the low and high half-units apart (four
  // chains of four), two tiles share one chain per tile and sum (four chains of eight)
  constexpr int kC = kB == 1 ? 2 : 1;
  auto compute = [&](const Step3& st, int c, int t) {
    const int j0 = c * 16 + 4 * t;
    if (c >= n_chunks || j0 >= n_units) return;  // warp-uniform
    uint4 xv[kB][4];
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const uint4* xp = reinterpret_cast<const uint4*>(xs + (x_off[b] + j0 * 32));
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[b][i] = __ldg(xp + i);
    }
    float tt[kB][kC][4] = {}, sx[kB][kC][4] = {};
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      uint32_t lo[2][2], hi[2][2];  // [row half][pair]: magic + code
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // slots i + e (low half-unit) and 8 + i + e (high)
          lo[h][e] = unscale3<kBF16>(decode3(st.w[h][0], st.w[h][1], st.w[h][2], i + e, magic), i + e);
          hi[h][e] = unscale3<kBF16>(decode3(st.w[h][0], st.w[h][1], st.w[h][2], 8 + i + e, magic), 8 + i + e);
        }
      }
      const uint32_t A0[4] = {lo[0][0], lo[1][0], lo[0][1], lo[1][1]};
      const uint32_t A1[4] = {hi[0][0], hi[1][0], hi[0][1], hi[1][1]};
#pragma unroll
      for (int b = 0; b < kB; ++b) {
        uint32_t bl[2], bh[2];
        unit3_b(xv[b], i, bl, bh);
        H::mma(tt[b][0], A0, bl[0], bl[1]);
        H::mma(tt[b][kC - 1], A1, bh[0], bh[1]);
        H::mma(sx[b][0], ones, bl[0], bl[1]);
        H::mma(sx[b][kC - 1], ones, bh[0], bh[1]);
      }
    }
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      if constexpr (kC == 2) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          tt[b][0][j] += tt[b][1][j];
          sx[b][0][j] += sx[b][1][j];
        }
      }
      post_scale<kBF16>(acc[0][b], tt[b][0], sx[b][0], st.s[0], st.s[1], st.z[0], st.z[1]);
    }
  };

  const int step = n_warps;
  pdl_launch_dependents();
  if constexpr (kB == 1) {
    auto load = [&](Chunk3& ch, int c) {
      if (c < n_chunks) load_chunk3<kZeros>(ch, p, c, q, n_units, w_off, s_off, z_off);  // warp-uniform
    };
    auto compute_chunk = [&](const Chunk3& ch, int c) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        Step3 st;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int u = 0; u < 3; ++u) st.w[h][u] = word(ch.w[h][u], t);
          st.s[h] = ch.s[h][t];
          st.z[h] = ch.z[h][t];
        }
        compute(st, c, t);
      }
    };
    double_buffered<Chunk3>(warp, step, n_chunks, load, compute_chunk);
  } else {
    // steps 2k, 2k + 1 of chunk c (units c * 16 + 4t + q at words c * 16 + q S + t): one 8-byte
    // load per plane and row in a full chunk; nothing past the last chunk or unit (warp-uniform)
    struct Pair3 {
      uint2 w[2][3];               // [row half][plane]: words of steps 2k, 2k + 1
      uint32_t s[2][2], z[2][2];   // [row half][step]
    };
    auto load = [&](Pair3& pr, int c, int k) {
      const int u = min(16, n_units - c * 16);  // the chunk's units
      if (c >= n_chunks || 8 * k >= u) return;
      const int S = u >> 2;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int u3 = 0; u3 < 3; ++u3) {
          const uint32_t* w = p.codes + (w_off[h] + u3 * n_units + c * 16 + q * S + 2 * k);
          pr.w[h][u3] = S == 4 ? __ldg(reinterpret_cast<const uint2*>(w)) : make_uint2(__ldg(w), 2 * k + 1 < S ? __ldg(w + 1) : 0u);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const uint32_t grp = uint32_t((min(c * 16 + 4 * (2 * k + e), n_units - 1) * 32) >> p.group_shift);
          pr.s[h][e] = __ldg(p.scales + (s_off[h] + grp));
          pr.z[h][e] = kZeros ? uint32_t(__ldg(p.zeros + (z_off[h] + grp))) : uint32_t(p.code_offset);
        }
      }
    };
    // one chunk in flight: each half-chunk slot is refilled with the next chunk's as it is taken
    Pair3 ring[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) load(ring[k], warp, k);  // weights only: before the wait
    pdl_wait();
    for (int c = warp; c < n_chunks; c += step) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const Pair3 cur = ring[k];
        load(ring[k], c + step, k);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          Step3 st;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int u3 = 0; u3 < 3; ++u3) st.w[h][u3] = e ? cur.w[h][u3].y : cur.w[h][u3].x;
            st.s[h] = cur.s[h][e];
            st.z[h] = cur.z[h][e];
          }
          compute(st, c, 2 * k + e);
        }
      }
    }
  }

  reduce_store3<kBF16, kB>(p, partials3, acc, row0);
}

// ----------------------------------------------------------------------------------------------
// 8-bit codes (4 LSB-first bytes per int32 word, row-major), groups of >= 128 inputs or one per
// row, post-scaled as int4's path. Work split as for int4 (128-input chunks, warp c % warps),
// lane (g, q) holding inputs 16q .. 16q + 15 and 64 + 16q .. 64 + 16q + 15 of a chunk for rows g
// and g + 8: two 16-byte loads per row, each warp load 8 rows x 64 contiguous bytes. Inputs
// 8v .. 8v + 7 of the lane are words 2v, 2v + 1; the mma pair i holds codes (i, i + 4) = byte i
// of both words, which one PRMT gathers and one LOP3 turns into half-precision magic + code:
// fp16 1024 + c, exact. bf16 holds 128 + c exactly only below 128, so there the low seven bits
// (128 + l) and the top bit (128 h: a sign-replicating PTX prmt and an AND) go to two mmas on the
// same accumulator: their sum is 128 + c, each product exact. kB = 2 (9-16 activation rows):
// each decoded pair meets two B tiles, as in the int4 kernel.

template <bool kBF16, bool kZeros, int kB>
__global__ void __launch_bounds__(512) gemv_int8_kernel(const GemvInt4Params p) {
  using H = Half<kBF16>;
  extern __shared__ float partials8[];  // (warps, kB * 4, 32)
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int n_chunks = p.k >> 7;  // k a multiple of 128
  const uint16_t* xs = static_cast<const uint16_t*>(p.x);
  uint32_t x_off[kB];
  x_offsets<kB>(p, g, q * 16, x_off);
  uint32_t w_offs[1][2], s_offs[1][2], z_offs[1][2];  // rows g, g + 8
  row_offsets<1>(p, row0, 16, g, q * 4, kZeros, w_offs, s_offs, z_offs);
  const uint32_t (&w_off)[2] = w_offs[0], (&s_off)[2] = s_offs[0], (&z_off)[2] = z_offs[0];

  struct Chunk8 {
    uint4 w[2][2];  // [row half][inputs 16q.. / 64 + 16q..]
    uint32_t s[2], z[2];
  };
  auto load = [&](Chunk8& ch, int c) {
    if (c >= n_chunks) return;  // warp-uniform
    const uint32_t grp = uint32_t((c * 128) >> p.group_shift);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) ch.w[h][e] = load_stream(p.codes + (w_off[h] + c * 32 + e * 16));
      ch.s[h] = __ldg(p.scales + (s_off[h] + grp));
      ch.z[h] = kZeros ? uint32_t(__ldg(p.zeros + (z_off[h] + grp))) : uint32_t(p.code_offset);
    }
  };

  float acc[1][kB][4] = {};  // reduce_store's (row tiles, B tiles, 4)
  const uint32_t ones[4] = {H::kOne, H::kOne, H::kOne, H::kOne};
  auto compute = [&](const Chunk8& ch, int c) {
    uint4 xv[kB][4];
#pragma unroll
    for (int bt = 0; bt < kB; ++bt) {
      const uint4* xp = reinterpret_cast<const uint4*>(xs + (x_off[bt] + c * 128));
      xv[bt][0] = __ldg(xp);
      xv[bt][1] = __ldg(xp + 1);
      xv[bt][2] = __ldg(xp + 8);  // inputs 64 + 16q ..
      xv[bt][3] = __ldg(xp + 9);
    }
    float t[kB][4] = {}, sx[kB][4] = {};
#pragma unroll
    for (int v = 0; v < 4; ++v) {  // inputs 8v .. 8v + 7 of the lane: x in xv[.][v]
      uint32_t b[kB][4];
#pragma unroll
      for (int bt = 0; bt < kB; ++bt) {
        x_pairs(xv[bt][v], b[bt]);
        H::mma(sx[bt], ones, b[bt][0], b[bt][1]);
        H::mma(sx[bt], ones, b[bt][2], b[bt][3]);
      }
      uint32_t lo[2][4], hi[2][4];  // [row half][pair i]: magic + code (bf16: low seven bits, 128 h)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t wa = word(ch.w[h][v >> 1], 2 * (v & 1)), wb = word(ch.w[h][v >> 1], 2 * (v & 1) + 1);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t pair = __byte_perm(wa, wb, uint32_t(i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12)));
          if (kBF16) {
            lo[h][i] = and_or(pair, 0x007F007Fu, H::kMagic);
            const uint32_t sign = prmt(wa, wb, uint32_t((8 + i) | ((8 + i) << 4) | ((12 + i) << 8) | ((12 + i) << 12)));
            hi[h][i] = sign & 0x43004300u;  // 128 where the code's top bit is set
          } else {
            lo[h][i] = and_or(pair, 0x00FF00FFu, H::kMagic);
          }
        }
      }
      const uint32_t A0[4] = {lo[0][0], lo[1][0], lo[0][1], lo[1][1]};
      const uint32_t A1[4] = {lo[0][2], lo[1][2], lo[0][3], lo[1][3]};
#pragma unroll
      for (int bt = 0; bt < kB; ++bt) {
        H::mma(t[bt], A0, b[bt][0], b[bt][1]);
        H::mma(t[bt], A1, b[bt][2], b[bt][3]);
        if (kBF16) {
          const uint32_t B0[4] = {hi[0][0], hi[1][0], hi[0][1], hi[1][1]};
          const uint32_t B1[4] = {hi[0][2], hi[1][2], hi[0][3], hi[1][3]};
          H::mma(t[bt], B0, b[bt][0], b[bt][1]);
          H::mma(t[bt], B1, b[bt][2], b[bt][3]);
        }
      }
    }
#pragma unroll
    for (int bt = 0; bt < kB; ++bt) post_scale<kBF16>(acc[0][bt], t[bt], sx[bt], ch.s[0], ch.s[1], ch.z[0], ch.z[1]);
  };

  pdl_launch_dependents();
  double_buffered<Chunk8>(warp, n_warps, n_chunks, load, compute);
  reduce_store<kBF16, 1, kB>(p, partials8, acc, row0);
}

template <bool kBF16, bool kZeros>
cudaError_t launch8(const GemvInt4Params& p, int warps, cudaStream_t stream) {
  const dim3 grid((p.n + 15) / 16);
  const dim3 block(32 * warps);
  if (p.m > 8)  // two B tiles
    return launch_ex(gemv_int8_kernel<kBF16, kZeros, 2>, grid, block, size_t(warps) * 256 * sizeof(float), stream,
                     p.pdl, p);
  return launch_ex(gemv_int8_kernel<kBF16, kZeros, 1>, grid, block, size_t(warps) * 128 * sizeof(float), stream, p.pdl,
                   p);
}

template <bool kBF16, bool kZeros>
cudaError_t launch3(const GemvInt4Params& p, int warps, cudaStream_t stream) {
  const dim3 grid(p.glu_half ? (p.glu_half + 7) / 8 : (p.n + 15) / 16);  // SiLU x up: 8 outputs per block
  const dim3 block(32 * warps);
  const size_t smem = size_t(warps) * 128 * sizeof(float);
  // groups of >= 128 inputs: the post-scaled kernel at every batch (H200, int3:g128 28672x4096:
  // 24.4 vs 26.2 us at 1 row, 31.4 vs 32.5 at 8); 9-16 rows: with two B tiles (groups >= 128 only)
  if (p.m > 8)
    return p.group_shift >= 7 ? launch_ex(gemv_int3p_kernel<kBF16, kZeros, 2>, grid, block, 2 * smem, stream, p.pdl, p)
                              : cudaErrorInvalidValue;
  if (p.group_shift >= 7 && p.int3_post)
    return launch_ex(gemv_int3p_kernel<kBF16, kZeros, 1>, grid, block, smem, stream, p.pdl, p);
  return launch_ex(gemv_int3_kernel<kBF16, kZeros>, grid, block, smem, stream, p.pdl, p);
}

}  // namespace

size_t gemv_int4_ring_bytes(int row_tiles, int stages, int warps) {
  return size_t(warps) * stages * row_tiles * 2 * 32 * 16;
}

cudaError_t gemv_int4_launch(const GemvInt4Params& p, bool bf16, bool pre_scale, int row_tiles, int unroll,
                             int stages, int warps, cudaStream_t stream) {
  if (p.m < 1 || p.m > 16 || p.n < 1 || p.k < 32 || p.k % 32 || warps < 1 || warps > 16 ||
      (row_tiles != 1 && row_tiles != 2) || (unroll != 1 && unroll != 2) ||
      (stages != 0 && stages != 4 && stages != 8) || (stages && unroll != 1) ||
      (p.m > 8 && (unroll != 1 || stages == 8)) ||
      (p.glu_half && (row_tiles != 2 || 2 * p.glu_half != p.n)) ||
      (!pre_scale && p.group_shift < 7) || p.group_shift < 5)
    return cudaErrorInvalidValue;
  if (bf16) return pre_scale ? launch_zeros<true, true>(p, row_tiles, unroll, stages, warps, stream)
                             : launch_zeros<true, false>(p, row_tiles, unroll, stages, warps, stream);
  return pre_scale ? launch_zeros<false, true>(p, row_tiles, unroll, stages, warps, stream)
                   : launch_zeros<false, false>(p, row_tiles, unroll, stages, warps, stream);
}

cudaError_t gemv_int3_launch(const GemvInt4Params& p, bool bf16, int warps, cudaStream_t stream) {
  if (p.m < 1 || p.m > 16 || p.n < 1 || p.k < 128 || p.k % 128 || warps < 1 || warps > 16 || p.group_shift < 5 ||
      (p.glu_half && 2 * p.glu_half != p.n))
    return cudaErrorInvalidValue;
  if (bf16) return p.zeros ? launch3<true, true>(p, warps, stream) : launch3<true, false>(p, warps, stream);
  return p.zeros ? launch3<false, true>(p, warps, stream) : launch3<false, false>(p, warps, stream);
}

cudaError_t gemv_int8_launch(const GemvInt4Params& p, bool bf16, int warps, cudaStream_t stream) {
  if (p.m < 1 || p.m > 16 || p.n < 1 || p.k < 128 || p.k % 128 || warps < 1 || warps > 16 || p.group_shift < 7)
    return cudaErrorInvalidValue;
  if (bf16) return p.zeros ? launch8<true, true>(p, warps, stream) : launch8<true, false>(p, warps, stream);
  return p.zeros ? launch8<false, true>(p, warps, stream) : launch8<false, false>(p, warps, stream);
}
