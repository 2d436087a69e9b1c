// torch binding of the int4 / 3-bit GEMVs (gemv_int4.cu) and the int4 tensor-core GEMM
// (gemm_int4.cu); checks shapes, dtypes and alignment and launches on the current CUDA stream
// (so CUDA-graph capture records it).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/cuda/CUDAContext.h>

#include <cmath>

#include "gemv_int4.h"

namespace {

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int group_shift(const char* op, int64_t group_size, int64_t k) {
  if (group_size >= k) return 30;  // one group per row
  TORCH_CHECK(group_size >= 32 && (group_size & (group_size - 1)) == 0,
              op, ": group_size must be a power of two >= 32, got ", group_size);
  int s = 0;
  while ((int64_t(1) << s) < group_size) ++s;
  return s;
}

// Checks the operands of y (m, n) = x (m, k) @ dequant(codes, scales, zeros)^T (+ bias) and
// fills the kernel parameters; y is `out` if given, else a new tensor. words_per_32: int32
// words per 32 inputs in a row of codes (4 for int4, 3 for the split 3-bit layout).
GemvInt4Params make_params(const char* op, const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& zeros, const c10::optional<torch::Tensor>& bias,
                           const c10::optional<torch::Tensor>& out, int64_t group_size, int64_t code_offset,
                           int64_t words_per_32, int64_t max_m, int64_t k_multiple, torch::Tensor& y,
                           int64_t n_out = -1) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, op, ": x must be a 2-D CUDA tensor with unit column stride");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf, op, ": x must be bf16 or fp16");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  if (n_out < 0) n_out = n;
  TORCH_CHECK(m >= 1 && m <= max_m, op, ": 1 <= m <= ", max_m, ", got m=", m);
  TORCH_CHECK(k % k_multiple == 0, op, ": in_features must be a multiple of ", k_multiple, ", got ", k);
  TORCH_CHECK(aligned16(x) && x.stride(0) % 8 == 0, op, ": x rows must be 16-byte aligned");
  TORCH_CHECK(codes.scalar_type() == torch::kInt32 && codes.dim() == 2 && codes.size(1) == words_per_32 * k / 32 &&
                  codes.stride(1) == 1 && codes.stride(0) % 4 == 0 && aligned16(codes),
              op, ": codes must be (n, ", words_per_32, " * k / 32) int32 with 16-byte aligned rows");
  const int64_t n_groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.dim() == 2 && scales.size(0) == n &&
                  scales.size(1) == n_groups && scales.stride(1) == 1,
              op, ": scales must be (n, n_groups) float16");
  TORCH_CHECK(codes.numel() < (int64_t(1) << 32) && scales.numel() < (int64_t(1) << 32) &&
                  m * x.stride(0) < (int64_t(1) << 32),
              op, ": tensors too large for 32-bit offsets");
  GemvInt4Params p{};
  if (zeros.has_value()) {
    const auto& z = *zeros;
    TORCH_CHECK(z.scalar_type() == torch::kUInt8 && z.dim() == 2 && z.size(0) == n && z.size(1) == n_groups && z.stride(1) == 1,
                op, ": zeros must be (n, n_groups) uint8");
    p.zeros = z.data_ptr<uint8_t>();
    p.ld_zeros = z.stride(0);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                op, ": bias must be (n,) contiguous in x's dtype");
    p.bias = bias->data_ptr();
  }
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.dim() == 2 && y.size(0) == m && y.size(1) == n_out &&
                    y.stride(1) == 1,
                op, ": out must be (m, ", n_out, ") in x's dtype with unit column stride");
  } else {
    y = torch::empty({m, n_out}, x.options());
  }
  p.x = x.data_ptr();
  p.ldx = x.stride(0);
  p.codes = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  p.ld_codes = codes.stride(0);
  p.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  p.ld_scales = scales.stride(0);
  p.y = y.data_ptr();
  p.ldy = y.stride(0);
  p.m = int(m);
  p.n = int(n);
  p.k = int(k);
  p.group_shift = group_shift(op, group_size, k);
  p.code_offset = int(code_offset);
  p.pdl = pdl_enabled(at::cuda::getDeviceProperties(x.device().index())->major);
  const char* post3 = std::getenv("MIXQ_GEMV3_POST");  // 0: the pre-scaled 3-bit kernel up to 8 rows
  p.int3_post = !(post3 && post3[0] == '0');
  return p;
}

}  // namespace

// y (m, n) = x (m, k) @ dequant(codes, scales, zeros)^T (+ bias), written into `out` if given.
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out, int64_t group_size,
                        int64_t code_offset, bool pre_scale, int64_t row_tiles, int64_t unroll, int64_t stages,
                        int64_t warps, bool silu_mul) {
  torch::Tensor y;
  const int64_t n = codes.size(0);
  TORCH_CHECK(!silu_mul || (n % 2 == 0 && row_tiles == 2 && unroll == 1),
              "gemv_int4: silu_mul needs an even number of rows (gate half, up half), row_tiles 2, unroll 1");
  GemvInt4Params p = make_params("gemv_int4", x, codes, scales, zeros, bias, out, group_size, code_offset, 4, 16, 32, y,
                                 silu_mul ? n / 2 : n);
  p.glu_half = silu_mul ? int(n / 2) : 0;
  TORCH_CHECK(pre_scale || p.group_shift >= 7, "gemv_int4: scales after the product need group_size >= 128");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = gemv_int4_launch(p, x.scalar_type() == torch::kBFloat16, pre_scale, int(row_tiles), int(unroll),
                                           int(stages), int(warps), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gemv_int4 launch failed: ", cudaGetErrorString(err));
  return y;
}

// y (m, n) = x (m, k) @ dequant(codes, scales, zeros)^T (+ bias) for 3-bit codes in mixq's 3-bit
// layout (codes (n, 3 * k / 32) int32, planar), written into `out` if given; silu_mul: y (m, n / 2)
// = silu(rows < n / 2) * (rows >= n / 2), as gemv_int4's.
torch::Tensor gemv_int3(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out, int64_t group_size,
                        int64_t code_offset, int64_t warps, bool silu_mul) {
  torch::Tensor y;
  const int64_t n = codes.size(0);
  TORCH_CHECK(!silu_mul || n % 2 == 0, "gemv_int3: silu_mul needs an even number of rows (gate half, up half)");
  GemvInt4Params p = make_params("gemv_int3", x, codes, scales, zeros, bias, out, group_size, code_offset, 3, 16, 128, y,
                                 silu_mul ? n / 2 : n);
  p.glu_half = silu_mul ? int(n / 2) : 0;
  TORCH_CHECK(x.size(0) <= 8 || p.group_shift >= 7, "gemv_int3: 9-16 rows need groups of >= 128 inputs, got ", group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = gemv_int3_launch(p, x.scalar_type() == torch::kBFloat16, int(warps),
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gemv_int3 launch failed: ", cudaGetErrorString(err));
  return y;
}

// y (m, n) = x (m, k) @ dequant(codes, scales, zeros)^T (+ bias) for 8-bit codes (codes (n, k / 4)
// int32, 4 LSB-first bytes per word), written into `out` if given.
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out, int64_t group_size,
                        int64_t code_offset, int64_t warps) {
  torch::Tensor y;
  const GemvInt4Params p = make_params("gemv_int8", x, codes, scales, zeros, bias, out, group_size, code_offset, 8, 16, 128, y);
  TORCH_CHECK(p.group_shift >= 7, "gemv_int8: needs groups of >= 128 inputs or one per row, got ", group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = gemv_int8_launch(p, x.scalar_type() == torch::kBFloat16, int(warps),
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gemv_int8 launch failed: ", cudaGetErrorString(err));
  return y;
}

int sm_count(const torch::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
}

// Tensor-core int4 GEMM at any batch (gemm_int4.cu). ws / cnt: the workspace (fp32) and
// per-tile counters (int32, zero between calls) of `gemm_int4_workspace`; unused (any tensor)
// when it says 0 floats.
torch::Tensor gemm_int4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out, torch::Tensor ws,
                        torch::Tensor cnt, int64_t group_size, int64_t code_offset, int64_t row_tiles, int64_t n_tiles,
                        int64_t warps, int64_t split, bool stream_k, bool wgmma) {
  torch::Tensor y;
  GemmInt4Params p{};
  p.b = make_params("gemm_int4", x, codes, scales, zeros, bias, out, group_size, code_offset, 4, int64_t(1) << 20, 32, y);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  size_t need = 0;
  int tiles = 0;
  cudaError_t err = gemm_int4_plan(p, bf16, int(row_tiles), int(n_tiles), int(warps), int(split), stream_k, wgmma,
                                   sm_count(x.device()), &need, &tiles);
  TORCH_CHECK(err == cudaSuccess, "gemm_int4: launch shape rejected (row_tiles ", row_tiles, ", n_tiles ", n_tiles,
              ", warps ", warps, ", split ", split, ", wgmma ", wgmma, "): ", cudaGetErrorString(err));
  if (need > 0) {
    TORCH_CHECK(ws.scalar_type() == torch::kFloat && ws.is_cuda() && size_t(ws.numel()) >= need && aligned16(ws),
                "gemm_int4: workspace must hold ", need, " float32");
    TORCH_CHECK(cnt.scalar_type() == torch::kInt && cnt.is_cuda() && cnt.numel() >= tiles,
                "gemm_int4: counters must hold ", tiles, " int32");
    p.ws = ws.data_ptr<float>();
    p.cnt = cnt.data_ptr<int>();
  }
  err = gemm_int4_launch(p, bf16, int(row_tiles), int(n_tiles), int(warps), wgmma,
                         c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gemm_int4 launch failed: ", cudaGetErrorString(err));
  return y;
}

// [workspace float32 count, counter count] of a gemm_int4 call with this shape and launch.
std::vector<int64_t> gemm_int4_workspace(int64_t m, int64_t n, int64_t k, int64_t group_size, int64_t row_tiles,
                                         int64_t n_tiles, int64_t warps, int64_t split, bool stream_k, bool wgmma,
                                         bool bf16, int64_t device) {
  GemmInt4Params p{};
  p.b.m = int(m);
  p.b.n = int(n);
  p.b.k = int(k);
  p.b.group_shift = group_shift("gemm_int4", group_size, k);
  const torch::Device dev(torch::kCUDA, c10::DeviceIndex(device));
  const c10::cuda::CUDAGuard guard(dev);
  size_t need = 0;
  int tiles = 0;
  const cudaError_t err = gemm_int4_plan(p, bf16, int(row_tiles), int(n_tiles), int(warps), int(split), stream_k,
                                         wgmma, sm_count(dev), &need, &tiles);
  TORCH_CHECK(err == cudaSuccess, "gemm_int4: launch shape rejected: ", cudaGetErrorString(err));
  return {int64_t(need), int64_t(tiles)};
}

namespace {

void check_rows(const char* name, const torch::Tensor& t, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == like.scalar_type() && t.dim() == 2 &&
                  t.size(0) == like.size(0) && t.size(1) == like.size(1) && t.stride(1) == 1 && t.stride(0) % 8 == 0 &&
                  aligned16(t),
              "norm_transform: ", name, " must be (", like.size(0), ", ", like.size(1), ") in h's dtype and device with ",
              "16-byte aligned rows");
}

void check_vector(const char* name, const torch::Tensor& t, const torch::Tensor& like, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.size(0) == like.size(1) && t.is_contiguous() && aligned16(t),
              "norm_transform: ", name, " must be a contiguous (", like.size(1), ",) ", dtype, " tensor on h's device");
}

}  // namespace

// y = ((r / smooth) * signs) H_block per block of `block` inputs of each row, with r = h, or with w
// given r = RMSNorm(h (+ delta)) * w as Hugging Face's Llama rounds it; h_out (if given) receives
// h + delta. Launches on the current stream (hadamard.cu).
void norm_transform(torch::Tensor h, c10::optional<torch::Tensor> delta, c10::optional<torch::Tensor> w,
                    c10::optional<torch::Tensor> smooth, torch::Tensor signs, c10::optional<torch::Tensor> h_out,
                    torch::Tensor y, int64_t block, double eps) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && (h.scalar_type() == torch::kBFloat16 || h.scalar_type() == torch::kHalf),
              "norm_transform: h must be a 2-D bf16 or fp16 CUDA tensor");
  check_rows("h", h, h);
  check_rows("y", y, h);
  const int64_t n = h.size(1);
  TORCH_CHECK(block >= 256 && block <= 8192 && (block & (block - 1)) == 0 && n % block == 0,
              "norm_transform: block must be a power of two in 256..8192 dividing ", n, ", got ", block);
  TORCH_CHECK(!delta.has_value() || w.has_value(), "norm_transform: delta needs the norm's weight w");
  NormTransformParams p{};
  p.h = reinterpret_cast<const uint16_t*>(h.data_ptr());
  p.ld_h = h.stride(0);
  if (delta.has_value()) {
    check_rows("delta", *delta, h);
    p.delta = reinterpret_cast<const uint16_t*>(delta->data_ptr());
    p.ld_delta = delta->stride(0);
  }
  if (w.has_value()) {
    check_vector("w", *w, h, h.scalar_type());
    p.w = reinterpret_cast<const uint16_t*>(w->data_ptr());
  }
  if (h_out.has_value()) {
    check_rows("h_out", *h_out, h);
    p.h_out = reinterpret_cast<uint16_t*>(h_out->data_ptr());
    p.ld_hout = h_out->stride(0);
  }
  if (smooth.has_value()) {
    check_vector("smooth", *smooth, h, torch::kFloat);
    p.smooth = smooth->data_ptr<float>();
  }
  check_vector("signs", signs, h, torch::kFloat);
  p.signs = signs.data_ptr<float>();
  p.y = reinterpret_cast<uint16_t*>(y.data_ptr());
  p.ld_y = y.stride(0);
  p.n = int(n);
  p.block = int(block);
  p.eps = float(eps);
  p.scale = float(1.0 / std::sqrt(double(block)));
  p.pdl = pdl_enabled(at::cuda::getDeviceProperties(h.device().index())->major);
  if (h.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaError_t err = norm_transform_launch(p, h.scalar_type() == torch::kBFloat16, int(h.size(0)),
                                                c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "norm_transform launch failed: ", cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_transform", &norm_transform, "online Hadamard transform, optionally of a fused RMSNorm (mixq)");
  m.def("gemv_int4", &gemv_int4, "int4 weight-only GEMV for <= 16 activation rows (mixq)");
  m.def("gemv_int8", &gemv_int8, "int8 weight-only GEMV for <= 16 activation rows (mixq)");
  m.def("gemv_int3", &gemv_int3, "3-bit weight-only GEMV for <= 16 activation rows (groups >= 128 past 8), optionally SiLU x up (mixq)");
  m.def("gemm_int4", &gemm_int4, "int4 weight-only tensor-core GEMM at any batch (mixq)");
  m.def("gemm_wgmma_built", &gemm_wgmma_built, "whether the sm_90a wgmma GEMM was built (mixq)");
  m.def("gemm_int4_workspace", &gemm_int4_workspace, "workspace floats and counters of a gemm_int4 call (mixq)");
}
