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

// Programmatic dependent launch (sm_90+, opt-in: gemv_int4.h pdl_enabled). A kernel launched
// with `launch_ex(..., pdl = true)`
// may start while the previous kernel of the stream is still running: it lets the next kernel
// start too (`pdl_launch_dependents`), reads only its weights before `pdl_wait` (which returns
// once the previous grid has completed and its memory is visible), and touches its inputs,
// outputs and workspaces only after it. Both are no-ops on older devices and without the
// launch attribute.
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
