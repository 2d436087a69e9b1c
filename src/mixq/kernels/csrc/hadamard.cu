// The online input transform of a unit, ((r / s) * d) H_b per block of b inputs (kernels/transform.py),
// with or without the RMSNorm that produces r (kernels/decode_ops.py add_rms_norm), in one launch:
// block (blk, row) of b / 8 threads, each holding 8 consecutive inputs of the block in fp32, a
// Walsh-Hadamard butterfly per input bit (three in registers, five across the warp's lanes by
// __shfl_xor, the rest across warps through shared memory), scaled by 1 / sqrt(b) and rounded once
// to x's dtype. With the norm, every block first sums the squares of the whole row (h + delta,
// rounded to x's dtype as the model rounds it), then normalises its own inputs as the model does
// (x = round(h * rstd), r = round(w * x)) and stores its inputs of h + delta. 256 <= b <= 8192.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gemv_int4.h"
#include "common.cuh"

namespace {

using namespace mixq_kernels;

template <bool kBF16>
__device__ __forceinline__ void load8(const uint16_t* p, float (&o)[8]) {
  using H = Half<kBF16>;
  const uint4 a = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = H::to_float(uint16_t(w[i] & 0xFFFFu));
    o[2 * i + 1] = H::to_float(uint16_t(w[i] >> 16));
  }
}

template <bool kBF16>
__device__ __forceinline__ void store8(uint16_t* p, const float (&v)[8]) {
  using H = Half<kBF16>;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = uint32_t(H::from_float(v[2 * i])) | (uint32_t(H::from_float(v[2 * i + 1])) << 16);
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// h (+ delta) of 8 inputs at column j of a row, rounded to x's dtype
template <bool kBF16, bool kDelta>
__device__ __forceinline__ void load_sum8(const NormTransformParams& p, int64_t row, int j, float (&o)[8]) {
  using H = Half<kBF16>;
  load8<kBF16>(p.h + row * p.ld_h + j, o);
  if (kDelta) {
    float d[8];
    load8<kBF16>(p.delta + row * p.ld_delta + j, d);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = H::to_float(H::from_float(o[e] + d[e]));
  }
}

template <bool kBF16, bool kNorm, bool kDelta>
__global__ void __launch_bounds__(1024) norm_transform_kernel(const NormTransformParams p) {
  using H = Half<kBF16>;
  extern __shared__ float sm[];  // the block's b inputs (cross-warp butterflies), then 32 partial sums
  const int64_t row = blockIdx.y;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nthr = blockDim.x;
  const int j0 = blockIdx.x * p.block + t * 8;
  // the constants first (the norm's weight, the signs, the smoothing scales): they do not depend on the
  // kernels before this one, so with PDL their loads overlap the previous kernel's tail
  float d[8], sv[8], w[8];
  {
    const float4* dp = reinterpret_cast<const float4*>(p.signs + j0);
    const float4 d0 = dp[0], d1 = dp[1];
    d[0] = d0.x, d[1] = d0.y, d[2] = d0.z, d[3] = d0.w, d[4] = d1.x, d[5] = d1.y, d[6] = d1.z, d[7] = d1.w;
    if (p.smooth) {
      const float4* sp = reinterpret_cast<const float4*>(p.smooth + j0);
      const float4 s0 = sp[0], s1 = sp[1];
      sv[0] = s0.x, sv[1] = s0.y, sv[2] = s0.z, sv[3] = s0.w;
      sv[4] = s1.x, sv[5] = s1.y, sv[6] = s1.z, sv[7] = s1.w;
    }
    if (kNorm) load8<kBF16>(p.w + j0, w);
  }
  pdl_launch_dependents();
  pdl_wait();  // h, delta, h_out and y belong to the stream's previous kernels
  float v[8];
  load_sum8<kBF16, kDelta>(p, row, j0, v);
  if (kNorm) {
    float ss = 0.f;
    for (int j = t * 8; j < p.n; j += nthr * 8) {  // the whole row (this block's part is v)
      float o[8];
      if (j == j0) {  // this block's own inputs, loaded above
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = v[e];
      } else {
        load_sum8<kBF16, kDelta>(p, row, j, o);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += o[e] * o[e];
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, m);
    float* part = sm + p.block;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
      ss = lane < (nthr >> 5) ? part[lane] : 0.f;
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, m);
      if (lane == 0) part[32] = ss;
    }
    __syncthreads();
    const float rstd = rsqrtf(part[32] / float(p.n) + p.eps);
    if (kDelta && p.h_out) store8<kBF16>(p.h_out + row * p.ld_hout + j0, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float x = H::to_float(H::from_float(v[e] * rstd));
      v[e] = H::to_float(H::from_float(w[e] * x));
    }
  }
  // (r / s) * d
  if (p.smooth) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = v[e] / sv[e];
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] *= d[e];
  // butterflies: strides 1, 2, 4 in registers
#pragma unroll
  for (int s = 1; s < 8; s <<= 1)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (!(e & s)) {
        const float a = v[e], b = v[e + s];
        v[e] = a + b;
        v[e + s] = a - b;
      }
  // strides 8 .. 128: lanes t ^ m hold inputs j ^ 8m
#pragma unroll
  for (int m = 1; m < 32; m <<= 1)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float o = __shfl_xor_sync(0xFFFFFFFFu, v[e], m);
      v[e] = (lane & m) ? o - v[e] : v[e] + o;
    }
  // strides 256 .. b / 2: threads t ^ m, m = 32, 64, .., through shared memory (element e of
  // thread t at sm[e * nthr + t]: conflict-free)
  for (int m = 32; m < nthr; m <<= 1) {
    __syncthreads();  // the previous stage's reads (and the norm's partial sums) are done
#pragma unroll
    for (int e = 0; e < 8; ++e) sm[e * nthr + t] = v[e];
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float o = sm[e * nthr + (t ^ m)];
      v[e] = (t & m) ? o - v[e] : v[e] + o;
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] *= p.scale;
  store8<kBF16>(p.y + row * p.ld_y + j0, v);
}

template <bool kBF16, bool kNorm, bool kDelta>
cudaError_t launch(const NormTransformParams& p, int rows, cudaStream_t stream) {
  const int nthr = p.block / 8;
  const size_t smem = size_t(p.block + 33) * sizeof(float);
  return launch_ex(norm_transform_kernel<kBF16, kNorm, kDelta>, dim3(p.n / p.block, rows), dim3(nthr), smem, stream,
                   p.pdl, p);
}

}  // namespace

cudaError_t norm_transform_launch(const NormTransformParams& p, bool bf16, int rows, cudaStream_t stream) {
  if (p.block < 256 || p.block > 8192 || (p.block & (p.block - 1)) || p.n % p.block || !p.signs) return cudaErrorInvalidValue;
  const bool norm = p.w != nullptr, delta = p.delta != nullptr;
  if (bf16) {
    if (!norm) return delta ? cudaErrorInvalidValue : launch<true, false, false>(p, rows, stream);
    return delta ? launch<true, true, true>(p, rows, stream) : launch<true, true, false>(p, rows, stream);
  }
  if (!norm) return delta ? cudaErrorInvalidValue : launch<false, false, false>(p, rows, stream);
  return delta ? launch<false, true, true>(p, rows, stream) : launch<false, true, false>(p, rows, stream);
}
