// Shared between the CUDA kernels (gemv_int4.cu, no torch headers) and the torch binding
// (gemv_int4.cpp). See mixq/kernels/cuda_gemv.py for the math and the weight layout.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cuda_runtime.h>

// Whether launches use programmatic dependent launch (common.cuh): on sm_90+ devices unless
// MIXQ_PDL=0 (read at every call). With the decode step's Triton kernels launched the same way
// (kernels/pdl.py), each matmul streams its first weights while the kernel before it
// runs: 2.53 -> 2.36 ms/token for the int4 Llama-3-8B shape on the H200 (bench/KERNEL_NOTES.md).
inline bool pdl_enabled(int device_major) {
  const char* off = std::getenv("MIXQ_PDL");
  return device_major >= 9 && !(off && off[0] == '0' && off[1] == 0);
}

struct GemvInt4Params {
  const void* x;          // (m, k) bf16 | fp16, row stride ldx elements, unit column stride
  int64_t ldx;
  const uint32_t* codes;  // (n, k / 8) int32 words, 8 LSB-first 4-bit codes each (mixq.kernels.packed)
  int64_t ld_codes;       // words per row
  const uint16_t* scales; // (n, n_groups) float16 bits
  int64_t ld_scales;
  const uint8_t* zeros;   // (n, n_groups) uint8 zero points, or nullptr: value = code - code_offset
  int64_t ld_zeros;
  const void* bias;       // (n,) in x's dtype, or nullptr
  void* y;                // (m, n) in x's dtype, row stride ldy elements
  int64_t ldy;
  int m, n, k;
  int group_shift;        // log2(group_size); >= 30 when one group spans the whole row
  int code_offset;        // symmetric formats: value = code - code_offset
  bool pdl;               // launch with programmatic dependent launch (common.cuh: pdl_enabled)
  bool int3_post;         // 3-bit codes, groups >= 128: the post-scaled kernel (else pre-scaled)
  int glu_half;           // > 0 = n / 2: y = silu(rows < n / 2) * (rows >= n / 2) (int4: two row tiles; 3-bit: 8 + 8 rows)
};

// Launches on `stream`; returns the launch error (cudaSuccess if none). int4: m <= 16 (two B
// tiles of 8 activation rows from 9).
// bf16: x is bfloat16 (else float16). pre_scale: scales are folded into the decoded weights
// before the tensor-core product (group_size >= 32); else they are applied to fp32 partial
// sums per 128-input chunk (group_size >= 128). group_size is a power of two. row_tiles:
// 16-row tiles per warp (1 or 2); unroll: 128-input chunks per buffer of the two-buffer
// register pipeline (1 or 2); stages: 0 for that register pipeline, or 4 / 8 for a ring of
// that many chunk slots per warp in shared memory filled by cp.async (unroll 1; dynamic shared
// memory gemv_int4_ring_bytes more); warps: per block (1..16), splitting the input dimension.
cudaError_t gemv_int4_launch(const GemvInt4Params& p, bool bf16, bool pre_scale, int row_tiles,
                             int unroll, int stages, int warps, cudaStream_t stream);
size_t gemv_int4_ring_bytes(int row_tiles, int stages, int warps);

// 3-bit codes in the split layout (codes: (n, 3 * k / 32) int32, planar; ld_codes = words per
// row), k a multiple of 128, group_size a power of two >= 32; m <= 8, or <= 16 with groups of
// >= 128 inputs. Groups of >= 128 from 5 rows (and always from 9) take the post-scaled kernel;
// otherwise the weights are formed as (code - zero) * scale in x's dtype before the tensor-core
// product. warps: per block (1..16).
cudaError_t gemv_int3_launch(const GemvInt4Params& p, bool bf16, int warps, cudaStream_t stream);

// 8-bit codes (codes: (n, k / 4) int32, 4 LSB-first bytes per word), k a multiple of 128, groups
// of >= 128 inputs (power of two) or one per row, scales after the product; m <= 16. warps: 1..16.
cudaError_t gemv_int8_launch(const GemvInt4Params& p, bool bf16, int warps, cudaStream_t stream);

// Tensor-core GEMM for int4 codes at any batch (gemm_int4.cu). b: as for the GEMV (any m >= 1;
// group_size a power of two >= 32 or one group per row). gemm_int4_plan fills the rest from a
// launch shape and says how much workspace the call needs: ws_floats fp32 values (any contents)
// and `tiles` int32 counters that are zero before the call and zero again after it.
struct GemmInt4Params {
  GemvInt4Params b;
  float* ws;
  int* cnt;
  int tiles_x, tiles_z;     // output tiles: 16 row_tiles warps weight rows x 8 n_tiles activation rows
  int chunks_per_split;     // split K: 128-input chunks per K slice
  int splits;               //   K slices per tile (gridDim.y)
  int stream_k_blocks;      // > 0: stream-K instead, this many blocks sharing all chunk-units evenly
  int slots;                // partial-sum slots per tile in ws
};

// row_tiles: 16-row weight tiles per warp (1, 2); n_tiles: 8-row activation tiles per block
// (1, 2, 4, 8; more activation rows go to further tiles); warps per block (1..8), each on its
// own row tiles of the same chunks; split: K slices per tile (split K), or with stream_k every
// block (n_sms x the blocks that fit per SM) takes the same number of chunks, across tiles.
// Dynamic shared memory: gemm_int4_smem_bytes(n_tiles) (two buffers of 8 n_tiles x 256
// activations, padded).
// wgmma: the Hopper kernel instead (built only for sm_90a, see gemm_wgmma_built): one 16-row tile
// per warp (row_tiles 1), warps 4 or 8 (one or two warpgroups of 64 weight rows each), n_tiles
// 2, 4, 8, 16 (N = 16 .. 128 activation rows per tile); the same work split and workspace.
cudaError_t gemm_int4_plan(GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps, int split, bool stream_k,
                           bool wgmma, int n_sms, size_t* ws_floats, int* tiles);
cudaError_t gemm_int4_launch(const GemmInt4Params& p, bool bf16, int row_tiles, int n_tiles, int warps, bool wgmma,
                             cudaStream_t stream);
bool gemm_wgmma_built();  // whether this build has the wgmma kernel (MIXQ_WGMMA: compiled for sm_90a)
size_t gemm_int4_smem_bytes(int n_tiles);

// The online input transform ((r / s) * d) H_b of rows of n inputs, per block of b inputs (hadamard.cu),
// optionally of r = RMSNorm(h + delta) * w computed in the same launch. h, delta, w, h_out, y in x's
// dtype (bf16 | fp16), 16-byte aligned rows; smooth (n,) fp32 or nullptr; signs (n,) fp32 (+-1).
// w nullptr: r = h (no norm; delta must be nullptr). h_out: where h + delta is stored (nullptr: not).
struct NormTransformParams {
  const uint16_t* h;
  const uint16_t* delta;
  const uint16_t* w;
  uint16_t* h_out;
  uint16_t* y;
  const float* smooth;
  const float* signs;
  int64_t ld_h, ld_delta, ld_hout, ld_y;
  int n;          // inputs per row, a multiple of block
  int block;      // b: a power of two, 256 .. 8192
  float eps;      // the RMSNorm's epsilon
  float scale;    // 1 / sqrt(b)
  bool pdl;
};

cudaError_t norm_transform_launch(const NormTransformParams& p, bool bf16, int rows, cudaStream_t stream);
