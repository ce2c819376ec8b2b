// rms_norm: y = weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, fp32 (CPU). One dispatch instead of the
// six torch ops HF's RMSNorm runs (pow, mean, add, rsqrt, mul, mul): two per layer in every decode step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu_vec.h"

namespace lvr_engine {
namespace {

LVR_CLONES
float sum_squares(const float* __restrict x, int n) {
  float lanes[16] = {0.f};  // independent partial sums, as torch's vectorised reduction keeps
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += x[i + j] * x[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += x[i] * x[i];
  float total = 0.f;
  for (int j = 0; j < 16; ++j) total += lanes[j];
  return total + tail;
}

__attribute__((optimize("fp-contract=off"))) void scale_row(const float* __restrict x, const float* __restrict w,
                                                             float r, float* __restrict y, int n) {
  for (int i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat,
              "rms_norm: x and weight must be float32, got ", x_in.scalar_type(), " and ", w_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 1 && w_in.size(0) == x_in.size(-1), "rms_norm: weight (",
              x_in.size(-1), ",) expected for x ", x_in.sizes(), ", got ", w_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "rms_norm (cpu): tensors must be on CPU");
  const int64_t n = x_in.size(-1);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * n;
      const float mean = sum_squares(xr, static_cast<int>(n)) / static_cast<float>(n);
      scale_row(xr, wp, 1.f / std::sqrt(mean + static_cast<float>(eps)), yp + r * n, static_cast<int>(n));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lvr_engine, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(lvr_engine, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace lvr_engine
