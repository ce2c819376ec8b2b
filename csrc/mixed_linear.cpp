// mixed_linear: y (M,N) fp32 = x (M,K) fp32 @ W (N,K)^T + bias, W stored in bf16, fp32 arithmetic.
//
// Why: a decode or latent step multiplies few rows (M = batch x chunk) by every weight of the model, so it
// is bound by the bytes of weights streamed from memory. On a CPU without native bf16 the engine computes a
// bf16 model in fp32; an fp32 copy of the weights streams twice the bytes of the bf16 original. This kernel
// reads bf16 and widens in registers (exact: bf16 is the top half of an fp32), so results equal an fp32
// matmul on the widened weights up to summation order.
//
// Layout: W is pre-packed once (ops.pack_mixed_weight) into panels of 16 output rows, k-major:
// packed[p][k][:] = W[16p + r][k] for r in PANEL_ORDER (rows past N zero; see ld16_bf16 for the order). Per k, one panel row is two 8-lane vectors of outputs,
// so the register tile is that of an sgemm micro-kernel: 6 x rows x 16 outputs = 12 accumulators, each
// weight vector reused for 6 rows, each broadcast x value for 16 outputs, no horizontal sums.
// Work split: tasks own panels; x rows go 6 at a time through each panel (the panel stays in L1/L2).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>

namespace lvr_engine {
namespace {

constexpr int kPanel = 16;  // output rows per packed panel: two 8-float vectors
constexpr int kRowsX = 6;   // x rows per register tile
constexpr int64_t kBlockM = 120;  // at most this many x rows per task: <= ~240-660 KB of x for K = 512-1376

constexpr int kBlockK = 128;  // k steps accumulated in registers before being added to the running sum

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16u __attribute__((vector_size(32), aligned(2), may_alias));

// One packed panel row (16 bf16) widened to two fp32 vectors: outputs 0-7 and 8-15. The packing stores the
// row as [r0-3, r8-11, r4-7, r12-15] so that each half is one in-lane interleave with zeros (vpunpck[lh]wd):
// the bf16 bits land in the high half of each fp32, which is the exact widening.
inline void ld16_bf16(const uint16_t* p, v8& lo, v8& hi) {
  const u16x16 w = *reinterpret_cast<const u16x16u*>(p);
  const u16x16 z = {};
  const u16x16 a = __builtin_shufflevector(z, w, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
  const u16x16 b = __builtin_shufflevector(z, w, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
  std::memcpy(&lo, &a, sizeof(lo));
  std::memcpy(&hi, &b, sizeof(hi));
}

// y[m*ldy + r] = bias[r] + sum_k x[m*ldx + k] * W[r][k], m < MR, r < 16. The k axis runs in blocks of kBlockK
// summed separately (fp32 rounding error grows with the length of one accumulation chain, as in sgemm). Short
// tiles (1-2 rows: decode) interleave U independent k-streams so FMA latency, not one dependency chain, bounds
// them.
template <int MR>
__attribute__((always_inline)) inline void tile(const float* __restrict x, int64_t ldx,
                                                const uint16_t* __restrict panel, int64_t K,
                                                const float* __restrict bias, float* __restrict y, int64_t ldy) {
  constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  v8 s0[MR], s1[MR];
  for (int m = 0; m < MR; ++m) s0[m] = v8{}, s1[m] = v8{};
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min<int64_t>(K, k0 + kBlockK);
    v8 c0[U][MR], c1[U][MR];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MR; ++m) c0[u][m] = v8{}, c1[u][m] = v8{};
    int64_t k = k0;
    for (; k + U <= k1; k += U)
      for (int u = 0; u < U; ++u) {
        v8 w0, w1;
        ld16_bf16(panel + (k + u) * kPanel, w0, w1);
        for (int m = 0; m < MR; ++m) {
          const float xm = x[m * ldx + k + u];
          c0[u][m] += xm * w0;
          c1[u][m] += xm * w1;
        }
      }
    for (; k < k1; ++k) {
      v8 w0, w1;
      ld16_bf16(panel + k * kPanel, w0, w1);
      for (int m = 0; m < MR; ++m) {
        const float xm = x[m * ldx + k];
        c0[0][m] += xm * w0;
        c1[0][m] += xm * w1;
      }
    }
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MR; ++m) s0[m] += c0[u][m], s1[m] += c1[u][m];
  }
  const v8 b0 = ld8(bias), b1 = ld8(bias + 8);
  for (int m = 0; m < MR; ++m) st8(y + m * ldy, s0[m] + b0), st8(y + m * ldy + 8, s1[m] + b1);
}

// One clone set per tile height: the full 6-row tile and the remainders 1..5 (each keeps its accumulators in
// registers; a 1-row loop over the remainder would cost a full tile per row).
#define LVR_TILE(MR)                                                                                         \
  LVR_CLONES void tile_##MR(const float* x, int64_t ldx, const uint16_t* panel, int64_t K, const float* bias, \
                            float* y, int64_t ldy) {                                                         \
    tile<MR>(x, ldx, panel, K, bias, y, ldy);                                                                \
  }
LVR_TILE(1)
LVR_TILE(2)
LVR_TILE(3)
LVR_TILE(4)
LVR_TILE(5)
LVR_TILE(6)
#undef LVR_TILE

using TileFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t);
constexpr TileFn kTiles[kRowsX + 1] = {nullptr, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};

at::Tensor mixed_linear_cpu(const at::Tensor& x_in, const at::Tensor& packed_in, int64_t N,
                            const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "mixed_linear: x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK(packed_in.scalar_type() == at::kBFloat16, "mixed_linear: packed weight must be bfloat16, got ",
              packed_in.scalar_type());
  TORCH_CHECK(packed_in.dim() == 3 && packed_in.size(2) == kPanel,
              "mixed_linear: packed weight must be (ceil(N/16), K, 16) from ops.pack_mixed_weight, got ",
              packed_in.sizes());
  const int64_t P = packed_in.size(0), K = packed_in.size(1);
  TORCH_CHECK(N > (P - 1) * kPanel && N <= P * kPanel, "mixed_linear: out_features=", N, " does not match ", P,
              " packed panels of 16 rows");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "mixed_linear: x (..., K) with K=", K,
              " expected for the packed weight ", packed_in.sizes(), ", got x ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && packed_in.device().is_cpu(), "mixed_linear (cpu): tensors must be on CPU");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "mixed_linear: bias must be (N=", N, "), got ",
                bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const at::Tensor packed = packed_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  const float* xp = x.const_data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>());
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Tasks are (block of kBlockM x rows, panel), row-block-major: a thread's consecutive tasks reuse one block of x
  // from L2 while panels stream by. At least ~16k weights x rows of work per task.
  const int64_t MB = (M + kBlockM - 1) / kBlockM;
  const int64_t bm = (M + MB - 1) / MB;  // equal row blocks (132 rows: 66 + 66, not 120 + 12)
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * kPanel * bm, 1));
  at::parallel_for(0, MB * P, grain, [&](int64_t begin, int64_t end) {
    float out[kRowsX * kPanel];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t % P, m_end = std::min<int64_t>(M, (t / P + 1) * bm);
      const uint16_t* panel = wp + p * K * kPanel;
      const int64_t n0 = p * kPanel;
      const int nr = static_cast<int>(std::min<int64_t>(kPanel, N - n0));
      float b[kPanel] = {};  // this panel's bias (zero past N, or without a bias)
      if (bp != nullptr) std::copy(bp + n0, bp + n0 + nr, b);
      for (int64_t m = (t / P) * bm; m < m_end; m += kRowsX) {
        const int mr = static_cast<int>(std::min<int64_t>(kRowsX, m_end - m));
        if (nr == kPanel) {
          kTiles[mr](xp + m * K, K, panel, K, b, yp + m * N + n0, N);
        } else {  // the last, partial panel: through a scratch tile
          kTiles[mr](xp + m * K, K, panel, K, b, out, kPanel);
          for (int i = 0; i < mr; ++i) std::copy(out + i * kPanel, out + i * kPanel + nr, yp + (m + i) * N + n0);
        }
      }
    }
  });
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lvr_engine, m) {
  m.def("mixed_linear(Tensor x, Tensor packed_weight, int out_features, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lvr_engine, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }

}  // namespace lvr_engine
