// mixed_linear: y (M,N) fp32 = x (M,K) fp32 @ W (N,K)^T + bias, W stored in bf16 or fp16, fp32 arithmetic.
//
// Why: a decode or latent step multiplies few rows (M = batch x chunk) by every weight of the model, so it
// is bound by the bytes of weights streamed from memory. On a CPU without native bf16 the engine computes a
// bf16 model in fp32; reading the fp32 copy streams twice the bytes of the bf16 original. This kernel reads
// the original and widens it on the fly (exact: bf16 is the top half of an fp32), so results equal an fp32
// matmul on the converted weights up to summation order.
//
// Work split: tasks own blocks of kRowsW weight rows. A task widens its block into an fp32 scratch once
// (L1-resident) and multiplies it with every x row, 3 rows at a time: 4 x 3 accumulators in registers, each
// weight load reused for three rows and each x load for four weight rows. (A k-major packed block with an
// sgemm-style 16x6 register tile measured slower here: the transposing pack costs more than the horizontal
// sums it saves at these row counts.)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <vector>

namespace lvr_engine {
namespace {

constexpr int kRowsW = 4;

// y[m*ldy + r] = sum_k w[r*K + k] * x[m*ldx + k] for r < 4, m < 3 (the full tile).
LVR_CLONES
void tile_4x3(const float* __restrict x, int64_t ldx, const float* __restrict w, int K, float* __restrict y,
              int64_t ldy) {
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx;
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  v8 a00 = {}, a01 = {}, a02 = {}, a10 = {}, a11 = {}, a12 = {};
  v8 a20 = {}, a21 = {}, a22 = {}, a30 = {}, a31 = {}, a32 = {};
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    const v8 u0 = ld8(x0 + k), u1 = ld8(x1 + k), u2 = ld8(x2 + k);
    v8 v = ld8(w0 + k);
    a00 += v * u0; a01 += v * u1; a02 += v * u2;
    v = ld8(w1 + k);
    a10 += v * u0; a11 += v * u1; a12 += v * u2;
    v = ld8(w2 + k);
    a20 += v * u0; a21 += v * u1; a22 += v * u2;
    v = ld8(w3 + k);
    a30 += v * u0; a31 += v * u1; a32 += v * u2;
  }
  float s[4][3] = {{hsum8(a00), hsum8(a01), hsum8(a02)}, {hsum8(a10), hsum8(a11), hsum8(a12)},
                   {hsum8(a20), hsum8(a21), hsum8(a22)}, {hsum8(a30), hsum8(a31), hsum8(a32)}};
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) {
      s[r][0] += w[r * K + k] * x0[k];
      s[r][1] += w[r * K + k] * x1[k];
      s[r][2] += w[r * K + k] * x2[k];
    }
  for (int m = 0; m < 3; ++m)
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = s[r][m];
}

// The same for one x row.
LVR_CLONES
void tile_4x1(const float* __restrict x, const float* __restrict w, int K, float* __restrict y) {
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    const v8 u = ld8(x + k);
    a0 += ld8(w0 + k) * u; a1 += ld8(w1 + k) * u; a2 += ld8(w2 + k) * u; a3 += ld8(w3 + k) * u;
  }
  float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) s[r] += w[r * K + k] * x[k];
  for (int r = 0; r < 4; ++r) y[r] = s[r];
}

LVR_CLONES
void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int n) {
  for (int i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

void widen(const c10::BFloat16* src, float* dst, int n) { widen_bf16(reinterpret_cast<const uint16_t*>(src), dst, n); }
void widen(const c10::Half* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void mixed_linear_impl(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.const_data_ptr<float>();
  const T* wp = w.const_data_ptr<T>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kRowsW - 1) / kRowsW;
  // ~16k weights per task at least: fewer, larger tasks when M is small (each task is then memory-bound).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * kRowsW, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wf(kRowsW * K);
    float out[3 * kRowsW];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRowsW;
      const int nr = static_cast<int>(std::min<int64_t>(kRowsW, N - n0));
      for (int r = 0; r < nr; ++r) widen(wp + (n0 + r) * K, wf.data() + r * K, static_cast<int>(K));
      if (nr < kRowsW) std::fill(wf.begin() + nr * K, wf.end(), 0.f);  // a partial block: zero rows
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) {
        tile_4x3(xp + m * K, K, wf.data(), static_cast<int>(K), out, kRowsW);
        for (int i = 0; i < 3; ++i)
          for (int r = 0; r < nr; ++r) yp[(m + i) * N + n0 + r] = out[i * kRowsW + r] + (bias ? bias[n0 + r] : 0.f);
      }
      for (; m < M; ++m) {
        tile_4x1(xp + m * K, wf.data(), static_cast<int>(K), out);
        for (int r = 0; r < nr; ++r) yp[m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.f);
      }
    }
  });
}

at::Tensor mixed_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "mixed_linear: x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK(weight_in.dim() == 2, "mixed_linear: weight must be (N,K), got ", weight_in.sizes());
  const auto wt = weight_in.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf, "mixed_linear: weight must be bfloat16 or float16, got ", wt);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == weight_in.size(1), "mixed_linear: x (..., K) with K=",
              weight_in.size(1), " expected for weight ", weight_in.sizes(), ", got x ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "mixed_linear (cpu): tensors must be on CPU");
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "mixed_linear: bias must be (N=", N, "), got ",
                bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const at::Tensor w = weight_in.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (x.size(0) > 0 && N > 0) {
    const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    if (wt == at::kBFloat16)
      mixed_linear_impl<c10::BFloat16>(x, w, bp, y);
    else
      mixed_linear_impl<c10::Half>(x, w, bp, y);
  }
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lvr_engine, m) {
  m.def("mixed_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lvr_engine, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }

}  // namespace lvr_engine
