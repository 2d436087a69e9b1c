// torch binding of the int4 GEMV (gemv_int4.cu); checks shapes, dtypes and alignment and
// launches on the current CUDA stream (so CUDA-graph capture records it).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "gemv_int4.h"

namespace {

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int group_shift(int64_t group_size, int64_t k) {
  if (group_size >= k) return 30;  // one group per row
  TORCH_CHECK(group_size >= 32 && (group_size & (group_size - 1)) == 0,
              "gemv_int4: group_size must be a power of two >= 32, got ", group_size);
  int s = 0;
  while ((int64_t(1) << s) < group_size) ++s;
  return s;
}

}  // namespace

// y (m, n) = x (m, k) @ dequant(codes, scales, zeros)^T (+ bias), written into `out` if given.
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out, int64_t group_size,
                        int64_t code_offset, bool pre_scale, int64_t row_tiles, int64_t unroll, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "gemv_int4: x must be a 2-D CUDA tensor with unit column stride");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf, "gemv_int4: x must be bf16 or fp16");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(m >= 1 && m <= 8, "gemv_int4: 1 <= m <= 8, got m=", m);
  TORCH_CHECK(k % 32 == 0, "gemv_int4: in_features must be a multiple of 32, got ", k);
  TORCH_CHECK(aligned16(x) && x.stride(0) % 8 == 0, "gemv_int4: x rows must be 16-byte aligned");
  TORCH_CHECK(codes.scalar_type() == torch::kInt32 && codes.dim() == 2 && codes.size(1) == k / 8 && codes.stride(1) == 1 &&
                  codes.stride(0) % 4 == 0 && aligned16(codes),
              "gemv_int4: codes must be (n, k / 8) int32 with 16-byte aligned rows");
  const int64_t n_groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.dim() == 2 && scales.size(0) == n && scales.size(1) == n_groups &&
                  scales.stride(1) == 1,
              "gemv_int4: scales must be (n, n_groups) float16");
  TORCH_CHECK(codes.numel() < (int64_t(1) << 32) && scales.numel() < (int64_t(1) << 32) &&
                  m * x.stride(0) < (int64_t(1) << 32),
              "gemv_int4: tensors too large for 32-bit offsets");
  GemvInt4Params p{};
  if (zeros.has_value()) {
    const auto& z = *zeros;
    TORCH_CHECK(z.scalar_type() == torch::kUInt8 && z.dim() == 2 && z.size(0) == n && z.size(1) == n_groups && z.stride(1) == 1,
                "gemv_int4: zeros must be (n, n_groups) uint8");
    p.zeros = z.data_ptr<uint8_t>();
    p.ld_zeros = z.stride(0);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                "gemv_int4: bias must be (n,) contiguous in x's dtype");
    p.bias = bias->data_ptr();
  }
  torch::Tensor y;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.dim() == 2 && y.size(0) == m && y.size(1) == n && y.stride(1) == 1,
                "gemv_int4: out must be (m, n) in x's dtype with unit column stride");
  } else {
    y = torch::empty({m, n}, x.options());
  }
  const c10::cuda::CUDAGuard guard(x.device());
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
  p.group_shift = group_shift(group_size, k);
  p.code_offset = int(code_offset);
  TORCH_CHECK(pre_scale || p.group_shift >= 7, "gemv_int4: scales after the product need group_size >= 128");
  const cudaError_t err = gemv_int4_launch(p, x.scalar_type() == torch::kBFloat16, pre_scale, int(row_tiles), int(unroll),
                                           int(warps), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gemv_int4 launch failed: ", cudaGetErrorString(err));
  return y;
}

// y (m, n) = x (m, k) @ dequant(codes, scales, zeros)^T (+ bias) for 3-bit codes in mixq's split
// layout (codes (n, 3 * k / 32) int32, planar), written into `out` if given.
torch::Tensor gemv_int3(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out, int64_t group_size,
                        int64_t code_offset, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "gemv_int3: x must be a 2-D CUDA tensor with unit column stride");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf, "gemv_int3: x must be bf16 or fp16");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(m >= 1 && m <= 8, "gemv_int3: 1 <= m <= 8, got m=", m);
  TORCH_CHECK(k % 128 == 0, "gemv_int3: in_features must be a multiple of 128, got ", k);
  TORCH_CHECK(aligned16(x) && x.stride(0) % 8 == 0, "gemv_int3: x rows must be 16-byte aligned");
  TORCH_CHECK(codes.scalar_type() == torch::kInt32 && codes.dim() == 2 && codes.size(1) == 3 * k / 32 && codes.stride(1) == 1 &&
                  codes.stride(0) % 4 == 0 && aligned16(codes),
              "gemv_int3: codes must be (n, 3 * k / 32) int32 with 16-byte aligned rows");
  const int64_t n_groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.dim() == 2 && scales.size(0) == n && scales.size(1) == n_groups &&
                  scales.stride(1) == 1,
              "gemv_int3: scales must be (n, n_groups) float16");
  TORCH_CHECK(codes.numel() < (int64_t(1) << 32) && scales.numel() < (int64_t(1) << 32) &&
                  m * x.stride(0) < (int64_t(1) << 32),
              "gemv_int3: tensors too large for 32-bit offsets");
  GemvInt4Params p{};
  if (zeros.has_value()) {
    const auto& z = *zeros;
    TORCH_CHECK(z.scalar_type() == torch::kUInt8 && z.dim() == 2 && z.size(0) == n && z.size(1) == n_groups && z.stride(1) == 1,
                "gemv_int3: zeros must be (n, n_groups) uint8");
    p.zeros = z.data_ptr<uint8_t>();
    p.ld_zeros = z.stride(0);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                "gemv_int3: bias must be (n,) contiguous in x's dtype");
    p.bias = bias->data_ptr();
  }
  torch::Tensor y;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.dim() == 2 && y.size(0) == m && y.size(1) == n && y.stride(1) == 1,
                "gemv_int3: out must be (m, n) in x's dtype with unit column stride");
  } else {
    y = torch::empty({m, n}, x.options());
  }
  const c10::cuda::CUDAGuard guard(x.device());
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
  p.group_shift = group_shift(group_size, k);
  p.code_offset = int(code_offset);
  const cudaError_t err = gemv_int3_launch(p, x.scalar_type() == torch::kBFloat16, int(warps),
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "gemv_int3 launch failed: ", cudaGetErrorString(err));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_int4", &gemv_int4, "int4 weight-only GEMV for <= 8 activation rows (mixq)");
  m.def("gemv_int3", &gemv_int3, "3-bit (split layout) weight-only GEMV for <= 8 activation rows (mixq)");
}
