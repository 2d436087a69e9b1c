// Device helpers shared by the int4 / 3-bit GEMV (gemv_int4.cu) and the int4 tensor-core GEMM
// (gemm_int4.cu): half-precision "magic" decoding constants, the m16n8k16 mma, streaming loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace mixq_kernels {

constexpr int kChunk = 128;  // inputs per warp per chunk: 4 lanes x 32 codes

template <bool kBF16>
struct Half;

template <>
struct Half<true> {  // bfloat16: 0x4300 = 128.0 (7 mantissa bits: 128 + c exact for c < 128)
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicF = 128.f;
  static constexpr uint32_t kNegMagic = 0xC300C300u;  // -(128 + z) = kNegMagic | z (per half)
  static constexpr uint32_t kOne = 0x3F803F80u;
  // 3-bit fields stored 3 or 4 bits up in a mantissa (magic + 8 c, magic + 16 c; gemv_int4.cu):
  // (magic + k c) / k + (magic - magic / k) = magic + c with 1/8, 1/16 and 128 - 16, 128 - 8
  static constexpr uint32_t kInv8 = 0x3E003E00u, kInv16 = 0x3D803D80u;
  static constexpr uint32_t kRest8 = 0x42E042E0u, kRest16 = 0x42F042F0u;
  static __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t scale_pair(uint32_t fp16_bits) {  // fp16 -> bf16 x2
    const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(__half2float(__ushort_as_half((unsigned short)fp16_bits))));
    return b | (b << 16);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }
  static __device__ __forceinline__ uint16_t from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <>
struct Half<false> {  // float16: 0x6400 = 1024.0 (10 mantissa bits)
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicF = 1024.f;
  static constexpr uint32_t kNegMagic = 0xE400E400u;
  static constexpr uint32_t kOne = 0x3C003C00u;
  // as for bfloat16: 1/8, 1/16, 1024 - 128, 1024 - 64
  static constexpr uint32_t kInv8 = 0x30003000u, kInv16 = 0x2C002C00u;
  static constexpr uint32_t kRest8 = 0x63006300u, kRest16 = 0x63806380u;
  static __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t scale_pair(uint32_t fp16_bits) { return (fp16_bits & 0xFFFFu) * 0x10001u; }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

__device__ __forceinline__ uint4 load_stream(const uint32_t* p) {  // weights: read once, skip L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// PTX prmt.b32 in its generic mode: bit 3 of a selector nibble replicates the sign (msb) of the
// selected byte over the result byte (CUDA's __byte_perm uses only the low three bits).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// (a & mask) | magic in one LOP3 (written in C, ptxas splits it in two: two immediates)
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
  return d;
}

// Hide a value's origin from the compiler so it stays in a register instead of being
// recomputed from threadIdx / blockIdx / kernel parameters inside the loop.
__device__ __forceinline__ uint32_t opaque(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Element offsets of rows g and g + 8 of a lane's kR 16-row tiles, tile r from row0 + r *
// tile_stride (rows past n clamped to n - 1: computed, not stored), into the codes (+ the lane's
// first word, word_off), scales and zero points (0 without zeros), kept in registers.
template <int kR, typename Params>
__device__ __forceinline__ void row_offsets(const Params& p, int row0, int tile_stride, int g, int word_off, bool zeros,
                                            uint32_t (&w_off)[kR][2], uint32_t (&s_off)[kR][2],
                                            uint32_t (&z_off)[kR][2]) {
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t row = min(row0 + r * tile_stride + h * 8 + g, p.n - 1);
      w_off[r][h] = opaque(row * uint32_t(p.ld_codes) + word_off);
      s_off[r][h] = opaque(row * uint32_t(p.ld_scales));
      z_off[r][h] = zeros ? opaque(row * uint32_t(p.ld_zeros)) : 0u;
    }
}

// One 128-input chunk of a lane's int4 weights: 16 bytes (32 codes) of rows g and g + 8 of
// each of its kR row tiles, with their scale and zero point of the lane's group. The loaded
// values stay as loaded until the chunk is decoded (pack_rows): combining the two rows' loads
// into one register at load time would stall the warp there on them, a memory latency per chunk.
template <int kR>
struct Chunk {
  uint4 w[kR][2];     // codes of rows g, g + 8 of each row tile
  uint32_t s[kR][2];  // fp16 scale bits of rows g, g + 8
  uint32_t z[kR][2];  // zero points of rows g, g + 8 (code_offset without zero points)
};

// Loads chunk c (word offset c * 16 in each row) into registers: zero codes for lanes past k
// (lane_ok false), the scales and zero points (code_offset without zeros) of group grp.
template <int kR, typename Params>
__device__ __forceinline__ void load_chunk(Chunk<kR>& ch, const Params& p, int c, bool lane_ok, uint32_t grp, bool zeros,
                                           const uint32_t (&w_off)[kR][2], const uint32_t (&s_off)[kR][2],
                                           const uint32_t (&z_off)[kR][2]) {
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ch.w[r][h] = lane_ok ? load_stream(p.codes + (w_off[r][h] + c * 16)) : make_uint4(0, 0, 0, 0);
      ch.s[r][h] = __ldg(p.scales + (s_off[r][h] + grp));
      ch.z[r][h] = zeros ? uint32_t(__ldg(p.zeros + (z_off[r][h] + grp))) : uint32_t(p.code_offset);
    }
}

// (row g) | (row g + 8) << 16 of a chunk's two per-row values, when the chunk is decoded.
__device__ __forceinline__ uint32_t pack_rows(const uint32_t (&v)[2]) { return v[0] | (v[1] << 16); }

// 16 bytes of x, inputs 0..7 of one code word, as the B operand pairs that match the decoded A
// fragments (pairs (i, i + 4) of the word): b = (x0, x4), (x1, x5), (x2, x6), (x3, x7).
__device__ __forceinline__ void x_pairs(const uint4& v, uint32_t (&b)[4]) {
  b[0] = __byte_perm(v.x, v.z, 0x5410);
  b[1] = __byte_perm(v.x, v.z, 0x7632);
  b[2] = __byte_perm(v.y, v.w, 0x5410);
  b[3] = __byte_perm(v.y, v.w, 0x7632);
}

// The constants of pre-scaled decoding for row tile r of a chunk: -(magic + zero) (nz) and the
// scale in x's dtype (ss), each as a pair, of rows g ([0]) and g + 8 ([1]).
template <bool kBF16, int kR>
__device__ __forceinline__ void prescale_consts(const Chunk<kR>& ch, int r, uint32_t (&nz)[2], uint32_t (&ss)[2]) {
  using H = Half<kBF16>;
  const uint32_t sp = pack_rows(ch.s[r]);  // rows g (low half), g + 8
  const uint32_t zp = pack_rows(ch.z[r]);
  nz[0] = H::kNegMagic | ((zp & 0xFFu) * 0x10001u);
  nz[1] = H::kNegMagic | ((zp >> 16) * 0x10001u);
  ss[0] = H::scale_pair(sp & 0xFFFFu);
  ss[1] = H::scale_pair(sp >> 16);
}

// Word w0 of row g and w1 of row g + 8 (8 LSB-first int4 codes each) as (code - zero) * scale
// in x's dtype (exact subtraction, one rounding), in the A fragments of two mma.m16n8k16 k16
// steps: pairs (i, i + 4) of the word, A0 from i = 0, 1 and A1 from i = 2, 3.
template <bool kBF16>
__device__ __forceinline__ void prescaled_fragments(uint32_t w0, uint32_t w1, const uint32_t (&nz)[2],
                                                    const uint32_t (&ss)[2], uint32_t (&A0)[4], uint32_t (&A1)[4]) {
  using H = Half<kBF16>;
  uint32_t a0[4], a1[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a0[i] = H::fma2(H::fma2(and_or(w0 >> (4 * i), 0x000F000Fu, H::kMagic), H::kOne, nz[0]), ss[0], 0x80008000u);
    a1[i] = H::fma2(H::fma2(and_or(w1 >> (4 * i), 0x000F000Fu, H::kMagic), H::kOne, nz[1]), ss[1], 0x80008000u);
  }
  A0[0] = a0[0]; A0[1] = a1[0]; A0[2] = a0[1]; A0[3] = a1[1];
  A1[0] = a0[2]; A1[1] = a1[2]; A1[2] = a0[3]; A1[3] = a1[3];
}

// Programmatic dependent launch (sm_90+, opt-in: gemv_int4.h pdl_enabled). A kernel launched
// with `launch_ex(..., pdl = true)` may start while the previous kernel of the stream is still
// running: it lets the next kernel start too (`pdl_launch_dependents`), reads only its weights
// before `pdl_wait` (which returns once the previous grid has completed and its memory is
// visible), and touches its inputs, outputs and workspaces only after it. Both are no-ops on
// older devices and without the launch attribute.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <typename Kernel, typename Params>
cudaError_t launch_ex(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                      const Params& params) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, params);
}

}  // namespace mixq_kernels
