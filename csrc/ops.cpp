// CPU kernels of the attention ops image_attention_scores and chunk_attention_with_scores (semantics:
// lvr_engine/ops/reference.py), their torch.library schema (shared with the CUDA kernels in ops_cuda.cu; the other
// ops define theirs in their own files) and the `lvr_engine._C` Python module. Argument checks: op_checks.h.
//
// Layout conventions (element strides, last dim contiguous):
//   q (B,H,D) / (B,C,H,D), k/v cache (B,Hkv,S,D), seq_lens (B) int32/int64,
//   image_slots (B,I) int32/int64 with -1 = pad, scores (B,I) float32.
// All arithmetic is fp32 whatever the storage dtype (fp32 / bf16 / fp16); the scores may round each per-head
// probability to bf16 / fp16 before adding it (prob_rounding: what eager attention in a bf16 model returns).
//
// Work split: one task per (row b, kv head, slice of that kv head's query heads). Tasks of one KV
// group convert each K/V block to fp32 once and reuse it for every query row of the group (GQA), so
// the cache is read once per task. The last query's image-slot probabilities are written to a
// per-task partial buffer and reduced in a fixed order afterwards, so results are deterministic.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "op_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace lvr_engine {
namespace {

constexpr int kBlockKeys = 32;  // keys per block: one row of logits stays in a few vector registers

template <typename T>
inline T from_f(float x) {
  return static_cast<T>(x);
}

// ---------------------------------------------------------------------------------------------
// Vectorised building blocks (fp32 only; callers convert storage dtypes into fp32 scratch first).

// S[r][s] = sum_d Q[r][d] * Kt[d][s] for r < rows, s < kBlockKeys. Kt is the transposed key block,
// so the inner loop runs over keys and needs no horizontal sums. The register tile is an sgemm one: MR rows x
// 16 keys = 2*MR accumulators; per d, two Kt loads and MR broadcasts feed 2*MR FMAs (MR = 6 keeps the FMA
// units, not the load ports, the limit on AVX2).
static_assert(kBlockKeys % 16 == 0, "qk_block tiles keys by 16");
constexpr int kTileRows = 6;

template <int MR>
__attribute__((always_inline)) inline void qk_tile(const float* __restrict Q, const float* __restrict Kt,
                                                   float* __restrict S, int D) {
  for (int h = 0; h < kBlockKeys; h += 16) {
    v8 a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) a0[m] = v8{}, a1[m] = v8{};
    for (int d = 0; d < D; ++d) {
      const float* kd = Kt + static_cast<int64_t>(d) * kBlockKeys + h;
      const v8 k0 = ld8(kd), k1 = ld8(kd + 8);
      for (int m = 0; m < MR; ++m) {
        const float qm = Q[static_cast<int64_t>(m) * D + d];
        a0[m] += qm * k0;
        a1[m] += qm * k1;
      }
    }
    for (int m = 0; m < MR; ++m) st8(S + m * kBlockKeys + h, a0[m]), st8(S + m * kBlockKeys + h + 8, a1[m]);
  }
}

LVR_CLONES
void qk_block(const float* __restrict Q, const float* __restrict Kt, float* __restrict S, int rows, int D) {
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    qk_tile<kTileRows>(Q + static_cast<int64_t>(r) * D, Kt, S + static_cast<int64_t>(r) * kBlockKeys, D);
  const float* q = Q + static_cast<int64_t>(r) * D;
  float* out = S + static_cast<int64_t>(r) * kBlockKeys;
  switch (rows - r) {  // the remainder keeps its own register tile
    case 5: qk_tile<5>(q, Kt, out, D); break;
    case 4: qk_tile<4>(q, Kt, out, D); break;
    case 3: qk_tile<3>(q, Kt, out, D); break;
    case 2: qk_tile<2>(q, Kt, out, D); break;
    case 1: qk_tile<1>(q, Kt, out, D); break;
    default: break;
  }
}

typedef int32_t i8v __attribute__((vector_size(32)));

// exp of 8 lanes for x <= ~88 with ~2 ulp error (libm's expf only vectorises under -ffast-math, which we do
// not want for the rest of the code). Written in GCC vector code: a scalar version looped over did not
// vectorise on AVX2 (GCC kept its clamps as branches), which left exp_sub_sum scalar and the largest cost of
// a C=33 chunk attention (29% of its time under perf).
inline v8 exp_approx8(v8 x) {
  const v8 lo = v8{} - 87.0f, hi = v8{} + 88.0f, magic = v8{} + 12582912.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8 n = (x * 1.44269504088896341f + magic) - magic;
  v8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v8 p = v8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i8v bits = (__builtin_convertvector(n, i8v) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// max_s x[s] for 1 <= n (a max is exact, so the order of comparisons does not change the result).
LVR_CLONES
float row_max(const float* __restrict x, int n) {
  float m = x[0];
  int s = 1;
  if (n >= 8) {
    v8 a = ld8(x);
    for (s = 8; s + 8 <= n; s += 8) {
      const v8 b = ld8(x + s);
      a = a > b ? a : b;
    }
    for (int j = 0; j < 8; ++j) m = std::max(m, a[j]);
  }
  for (; s < n; ++s) m = std::max(m, x[s]);
  return m;
}

// p[s] = exp(x[s] - m) for s < n; returns sum_s p[s].
LVR_CLONES
float exp_sub_sum(const float* __restrict x, float* __restrict p, int n, float m) {
  v8 acc = {};
  int s = 0;
  for (; s + 8 <= n; s += 8) {
    const v8 e = exp_approx8(ld8(x + s) - m);
    st8(p + s, e);
    acc += e;
  }
  float total = hsum8(acc);
  if (s < n) {  // the last n - s < 8 values through one padded vector
    float tail[8] = {0.f};
    for (int j = 0; j < n - s; ++j) tail[j] = x[s + j] - m;
    const v8 e = exp_approx8(ld8(tail));
    for (int j = 0; j < n - s; ++j) {
      p[s + j] = e[j];
      total += e[j];
    }
  }
  return total;
}

// acc[r][d] = acc[r][d] * alpha[r] + sum_{s<n} P[r][s] * V[s][d] for r < MR; P rows are kBlockKeys apart, V
// rows ldv apart, acc rows D apart. A tile is MR rows x 16 columns of acc in registers: each V load serves MR
// rows (a row at a time re-read the whole V block from L1 for every query row: load-bound).
template <int MR>
__attribute__((always_inline)) inline void pv_tile(float* __restrict acc, const float* __restrict alpha,
                                                   const float* __restrict P, const float* __restrict V,
                                                   int64_t ldv, int n, int D) {
  int d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    v8 a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) {
      a0[m] = ld8(acc + static_cast<int64_t>(m) * D + d0) * alpha[m];
      a1[m] = ld8(acc + static_cast<int64_t>(m) * D + d0 + 8) * alpha[m];
    }
    for (int s = 0; s < n; ++s) {
      const float* vs = V + s * ldv + d0;
      const v8 v0 = ld8(vs), v1 = ld8(vs + 8);
      for (int m = 0; m < MR; ++m) {
        const float pm = P[m * kBlockKeys + s];
        a0[m] += pm * v0;
        a1[m] += pm * v1;
      }
    }
    for (int m = 0; m < MR; ++m) {
      st8(acc + static_cast<int64_t>(m) * D + d0, a0[m]);
      st8(acc + static_cast<int64_t>(m) * D + d0 + 8, a1[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {  // head dims that are not a multiple of 16
    float* ar = acc + static_cast<int64_t>(m) * D;
    for (int d = d0; d < D; ++d) {
      float t = ar[d] * alpha[m];
      for (int s = 0; s < n; ++s) t += P[m * kBlockKeys + s] * V[s * ldv + d];
      ar[d] = t;
    }
  }
}

LVR_CLONES
void pv_block(float* __restrict acc, const float* __restrict alpha, const float* __restrict P,
              const float* __restrict V, int64_t ldv, int rows, int n, int D) {
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    pv_tile<kTileRows>(acc + static_cast<int64_t>(r) * D, alpha + r, P + r * kBlockKeys, V, ldv, n, D);
  float* ar = acc + static_cast<int64_t>(r) * D;
  const float* pr = P + r * kBlockKeys;
  switch (rows - r) {
    case 5: pv_tile<5>(ar, alpha + r, pr, V, ldv, n, D); break;
    case 4: pv_tile<4>(ar, alpha + r, pr, V, ldv, n, D); break;
    case 3: pv_tile<3>(ar, alpha + r, pr, V, ldv, n, D); break;
    case 2: pv_tile<2>(ar, alpha + r, pr, V, ldv, n, D); break;
    case 1: pv_tile<1>(ar, alpha + r, pr, V, ldv, n, D); break;
    default: break;
  }
}

LVR_CLONES
float dot(const float* __restrict a, const float* __restrict b, int D) {
  float lanes[16] = {0.f};
  int d = 0;
  for (; d + 16 <= D; d += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[d + j] * b[d + j];
  float total = 0.f;
  for (; d < D; ++d) total += a[d] * b[d];
  for (int j = 0; j < 16; ++j) total += lanes[j];
  return total;
}

template <typename T>
void convert_row(const T* __restrict src, float* __restrict dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

// Kt[d][s] = K[s0 + s][d] as fp32 for s < n; columns n..kBlockKeys-1 are zeroed so qk_block can
// always run full width without reading garbage.
template <typename T>
void load_kt(const T* __restrict K, int64_t lds, int n, int D, float* __restrict Kt) {
  for (int s = 0; s < n; ++s) {
    const T* ks = K + s * lds;
    for (int d = 0; d < D; ++d) Kt[static_cast<int64_t>(d) * kBlockKeys + s] = to_f(ks[d]);
  }
  if (n < kBlockKeys)
    for (int d = 0; d < D; ++d)
      std::fill(Kt + static_cast<int64_t>(d) * kBlockKeys + n, Kt + static_cast<int64_t>(d + 1) * kBlockKeys, 0.f);
}

// ---------------------------------------------------------------------------------------------
// Argument reading helpers.

using checks::rows_contiguous;

inline int64_t read_index(const at::Tensor& t, const void* base, int64_t offset) {
  return t.scalar_type() == at::kInt ? static_cast<const int32_t*>(base)[offset]
                                     : static_cast<const int64_t*>(base)[offset];
}

// Work split over (b, kv head, head slice): enough tasks to keep every thread busy even for B=1.
int head_splits(int64_t B, int64_t Hkv, int64_t G) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t groups = std::max<int64_t>(1, B * Hkv);
  const int64_t want = (threads + groups - 1) / groups;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(G, want)));
}

// ---------------------------------------------------------------------------------------------
// Core: attention of rows = C chunk queries x nh query heads (one KV head) over one cache row.

struct GroupArgs {
  int64_t L;       // valid keys of the row
  int C;           // chunk length; query c sits at slot L - C + c
  int nh;          // query heads in this task (all read the same KV head)
  int D;
  float scale;
  // q element (c, j, d) at q + c*sq_c + j*sq_h + d
  int64_t sq_c, sq_h;
  int64_t sk, sv;  // key / value slot strides
  // out element (c, j, d) at out + c*so_c + j*so_h + d (only when with_v)
  int64_t so_c, so_h;
};

struct Workspace {
  std::vector<float> q, kt, vf, s, p, alpha, acc, m, l, last;
  void reserve(int rows, int D, int64_t L, int nh) {
    q.resize(static_cast<size_t>(rows) * D);
    kt.resize(static_cast<size_t>(D) * kBlockKeys);
    vf.resize(static_cast<size_t>(kBlockKeys) * D);
    s.resize(static_cast<size_t>(rows) * kBlockKeys);
    p.resize(static_cast<size_t>(rows) * kBlockKeys);
    alpha.resize(rows);
    acc.resize(static_cast<size_t>(rows) * D);
    m.resize(rows);
    l.resize(rows);
    last.resize(static_cast<size_t>(nh) * std::max<int64_t>(L, 1));
  }
};

// Flash-style pass over the cache row in kBlockKeys blocks with an online softmax per query row.
// Rows are ordered r = c * nh + j. When last_probs is given, the raw logits of the last query
// (c = C-1) are kept for the whole row and turned into probabilities with the final normaliser,
// which makes the image-slot probabilities exact (no per-block rescaling error).
// Writes out (if WITH_V) and, for each head j, last_probs-ready data via ws.last / ws.m / ws.l.
template <typename T, bool WITH_V>
void attend_group(const T* q, const T* k, const T* v, T* out, const GroupArgs& a, bool keep_last,
                  Workspace& ws) {
  const int C = a.C, nh = a.nh, D = a.D;
  const int rows = C * nh;
  const int64_t L = a.L;
  const int64_t first_q_slot = L - C;  // slot of query c = first_q_slot + c
  ws.reserve(rows, D, L, nh);
  float* Q = ws.q.data();
  for (int c = 0; c < C; ++c)
    for (int j = 0; j < nh; ++j) {
      float* dst = Q + static_cast<int64_t>(c * nh + j) * D;
      convert_row(q + c * a.sq_c + j * a.sq_h, dst, D);
      for (int d = 0; d < D; ++d) dst[d] *= a.scale;
    }
  float* M = ws.m.data();
  float* Lsum = ws.l.data();
  float* acc = ws.acc.data();
  std::fill(M, M + rows, -std::numeric_limits<float>::infinity());
  std::fill(Lsum, Lsum + rows, 0.f);
  if (WITH_V) std::fill(acc, acc + static_cast<int64_t>(rows) * D, 0.f);

  for (int64_t s0 = 0; s0 < L; s0 += kBlockKeys) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlockKeys, L - s0));
    // Queries before this block's first key see none of it; causal order makes them a prefix in c.
    const int c_begin = static_cast<int>(std::max<int64_t>(0, s0 - first_q_slot));
    const int r_begin = c_begin * nh;
    load_kt(k + s0 * a.sk, a.sk, nb, D, ws.kt.data());
    qk_block(Q + static_cast<int64_t>(r_begin) * D, ws.kt.data(),
             ws.s.data() + static_cast<int64_t>(r_begin) * kBlockKeys, rows - r_begin, D);
    const float* Vb = nullptr;
    int64_t ldv = D;
    if (WITH_V) {
      if constexpr (std::is_same_v<T, float>) {
        Vb = v + s0 * a.sv;
        ldv = a.sv;
      } else {
        for (int s = 0; s < nb; ++s) convert_row(v + (s0 + s) * a.sv, ws.vf.data() + static_cast<int64_t>(s) * D, D);
        Vb = ws.vf.data();
      }
    }
    // Softmax bookkeeping row by row, then one tiled P.V for all rows that see this block. P rows are zero past
    // a row's visible keys, so the tile runs every row over the whole block.
    for (int c = c_begin; c < C; ++c) {
      // Keys s0 .. first_q_slot + c are visible to query c.
      const int nvis = static_cast<int>(std::min<int64_t>(nb, first_q_slot + c - s0 + 1));
      for (int j = 0; j < nh; ++j) {
        const int r = c * nh + j;
        const float* srow = ws.s.data() + static_cast<int64_t>(r) * kBlockKeys;
        float* prow = ws.p.data() + static_cast<int64_t>(r) * kBlockKeys;
        if (keep_last && c == C - 1)
          std::memcpy(ws.last.data() + j * L + s0, srow, sizeof(float) * nb);
        const float bmax = row_max(srow, nvis);
        const float m_new = std::max(M[r], bmax);
        const float alpha = std::exp(M[r] - m_new);  // exp(-inf) = 0 on the first visible block
        const float bsum = exp_sub_sum(srow, prow, nvis, m_new);
        std::fill(prow + nvis, prow + nb, 0.f);
        Lsum[r] = Lsum[r] * alpha + bsum;
        M[r] = m_new;
        ws.alpha[r] = alpha;
      }
    }
    if (WITH_V)
      pv_block(acc + static_cast<int64_t>(r_begin) * D, ws.alpha.data() + r_begin,
               ws.p.data() + static_cast<int64_t>(r_begin) * kBlockKeys, Vb, ldv, rows - r_begin, nb, D);
  }
  if (WITH_V) {
    for (int c = 0; c < C; ++c)
      for (int j = 0; j < nh; ++j) {
        const int r = c * nh + j;
        const float inv = 1.f / Lsum[r];
        const float* ar = acc + static_cast<int64_t>(r) * D;
        T* o = out + c * a.so_c + j * a.so_h;
        for (int d = 0; d < D; ++d) o[d] = from_f<T>(ar[d] * inv);
      }
  }
}

// A probability rounded as the schema's prob_rounding code says (op_checks.h): unchanged, or to bfloat16 /
// float16 with round-to-nearest-even (c10's conversions, what torch's .to() does) and back to fp32.
inline float round_prob(float p, int64_t code) {
  if (code == checks::kProbBf16) return static_cast<float>(c10::BFloat16(p));
  if (code == checks::kProbFp16) return static_cast<float>(c10::Half(p));
  return p;
}

// partial[i] += sum_j round(exp(last[j][slot_i] - lse_j)) over the task's heads, for valid slots < L.
void gather_last_probs(const Workspace& ws, int nh, int C, int64_t L, const at::Tensor& slots,
                       const void* slots_base, int64_t slot_off, int64_t slot_stride, int64_t I,
                       int64_t prob_code, float* partial) {
  for (int j = 0; j < nh; ++j) {
    const int r = (C - 1) * nh + j;
    const float lse = ws.m[r] + std::log(ws.l[r]);
    const float* lg = ws.last.data() + j * L;
    for (int64_t i = 0; i < I; ++i) {
      const int64_t slot = read_index(slots, slots_base, slot_off + i * slot_stride);
      if (slot >= 0 && slot < L) partial[i] += round_prob(std::exp(lg[slot] - lse), prob_code);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Op 1: image_attention_scores.

template <typename T>
void image_scores_impl(const at::Tensor& q, const at::Tensor& k, const std::vector<int64_t>& lens,
                       const at::Tensor& slots, const at::Tensor& scores, double scale,
                       const c10::optional<at::Tensor>& lse, int64_t prob_code) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), I = slots.size(1);
  const int64_t G = H / Hkv;
  const int splits = head_splits(B, Hkv, G);
  const int64_t per_split = (G + splits - 1) / splits;
  const int64_t tasks_per_row = Hkv * splits;
  std::vector<float> partial(static_cast<size_t>(B * tasks_per_row * I), 0.f);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const void* sp = slots.const_data_ptr();
  const float* lsep = lse ? lse->const_data_ptr<float>() : nullptr;
  const int64_t lse_s0 = lse ? lse->stride(0) : 0, lse_s1 = lse ? lse->stride(1) : 0;

  at::parallel_for(0, B * tasks_per_row, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    std::vector<float> qf(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tasks_per_row, kvh = (t % tasks_per_row) / splits, sp_i = t % splits;
      const int64_t h0 = kvh * G + sp_i * per_split;
      const int64_t h1 = std::min(kvh * G + G, h0 + per_split);
      if (h0 >= h1) continue;
      const int64_t L = lens[b];
      if (L == 0) continue;  // no keys: nothing to attend to, the row adds nothing
      float* part = partial.data() + t * I;
      const T* kb = kp + b * k.stride(0) + kvh * k.stride(1);
      if (lsep) {
        // The normaliser is given: only the image slots' logits are needed, not the whole row.
        for (int64_t h = h0; h < h1; ++h) {
          convert_row(qp + b * q.stride(0) + h * q.stride(1), qf.data(), static_cast<int>(D));
          const float lse_h = lsep[b * lse_s0 + h * lse_s1];
          for (int64_t i = 0; i < I; ++i) {
            const int64_t slot = read_index(slots, sp, b * slots.stride(0) + i * slots.stride(1));
            if (slot < 0 || slot >= L) continue;
            std::vector<float>& kf = ws.vf;
            kf.resize(D);
            convert_row(kb + slot * k.stride(2), kf.data(), static_cast<int>(D));
            const float logit = dot(qf.data(), kf.data(), static_cast<int>(D)) * static_cast<float>(scale);
            part[i] += round_prob(std::exp(logit - lse_h), prob_code);
          }
        }
        continue;
      }
      GroupArgs a{L, 1, static_cast<int>(h1 - h0), static_cast<int>(D), static_cast<float>(scale),
                  0, q.stride(1), k.stride(2), 0, 0, 0};
      attend_group<T, false>(qp + b * q.stride(0) + h0 * q.stride(1), kb, nullptr, nullptr, a, true, ws);
      gather_last_probs(ws, a.nh, 1, L, slots, sp, b * slots.stride(0), slots.stride(1), I, prob_code, part);
    }
  });
  float* sc = scores.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < tasks_per_row; ++t) {
      const float* part = partial.data() + (b * tasks_per_row + t) * I;
      for (int64_t i = 0; i < I; ++i) sc[b * scores.stride(0) + i * scores.stride(1)] += part[i];
    }
}

std::vector<int64_t> read_lens(const at::Tensor& seq_lens) {
  auto l = seq_lens.to(at::kLong).contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + l.numel());
}

void image_attention_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& seq_lens,
                                const at::Tensor& image_slots, const at::Tensor& scores, double scale,
                                const c10::optional<at::Tensor>& lse, int64_t prob_rounding) {
  checks::image_attention_scores_args(q_in, k_in, seq_lens, image_slots, scores, lse, prob_rounding);
  checks::devices("image_attention_scores", at::kCPU, {&q_in, &k_in, &seq_lens, &image_slots, &scores});
  const int64_t B = q_in.size(0);
  const auto lens = read_lens(seq_lens);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= k_in.size(2), "seq_lens[", b, "]=", lens[b], " outside [0, S=",
                k_in.size(2), "]");
  if (B == 0 || image_slots.size(1) == 0) return;
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in);
  switch (q.scalar_type()) {
    case at::kFloat: image_scores_impl<float>(q, k, lens, image_slots, scores, scale, lse, prob_rounding); break;
    case at::kBFloat16:
      image_scores_impl<c10::BFloat16>(q, k, lens, image_slots, scores, scale, lse, prob_rounding);
      break;
    default: image_scores_impl<c10::Half>(q, k, lens, image_slots, scores, scale, lse, prob_rounding); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Op 3: chunk_attention_with_scores.

template <typename T>
void chunk_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& lens,
                const at::Tensor* slots, const at::Tensor* scores, double scale, int64_t prob_code, at::Tensor& out) {
  const int64_t B = q.size(0), C = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t G = H / Hkv;
  const int64_t I = slots ? slots->size(1) : 0;
  const bool with_scores = scores != nullptr && I > 0;
  const int splits = head_splits(B, Hkv, G);
  const int64_t per_split = (G + splits - 1) / splits;
  const int64_t tasks_per_row = Hkv * splits;
  std::vector<float> partial(with_scores ? static_cast<size_t>(B * tasks_per_row * I) : 0, 0.f);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const void* sp = with_scores ? slots->const_data_ptr() : nullptr;

  at::parallel_for(0, B * tasks_per_row, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tasks_per_row, kvh = (t % tasks_per_row) / splits, sp_i = t % splits;
      const int64_t h0 = kvh * G + sp_i * per_split;
      const int64_t h1 = std::min(kvh * G + G, h0 + per_split);
      if (h0 >= h1) continue;
      const int64_t L = lens[b];
      GroupArgs a{L, static_cast<int>(C), static_cast<int>(h1 - h0), static_cast<int>(D), static_cast<float>(scale),
                  q.stride(1), q.stride(2), k.stride(2), v.stride(2), out.stride(1), out.stride(2)};
      attend_group<T, true>(qp + b * q.stride(0) + h0 * q.stride(2), kp + b * k.stride(0) + kvh * k.stride(1),
                            vp + b * v.stride(0) + kvh * v.stride(1), op + b * out.stride(0) + h0 * out.stride(2),
                            a, with_scores, ws);
      if (with_scores)
        gather_last_probs(ws, a.nh, a.C, L, *slots, sp, b * slots->stride(0), slots->stride(1), I, prob_code,
                          partial.data() + t * I);
    }
  });
  if (with_scores) {
    float* sc = scores->data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < tasks_per_row; ++t) {
        const float* part = partial.data() + (b * tasks_per_row + t) * I;
        for (int64_t i = 0; i < I; ++i) sc[b * scores->stride(0) + i * scores->stride(1)] += part[i];
      }
  }
}

at::Tensor chunk_attention_with_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           const at::Tensor& seq_lens, const c10::optional<at::Tensor>& image_slots,
                                           const c10::optional<at::Tensor>& scores, double scale,
                                           int64_t prob_rounding) {
  const bool with_scores =
      checks::chunk_attention_args(q_in, k_in, v_in, seq_lens, image_slots, scores, prob_rounding);
  checks::devices("chunk_attention_with_scores", at::kCPU, {&q_in, &k_in, &v_in, &seq_lens});
  if (with_scores) checks::devices("chunk_attention_with_scores", at::kCPU, {&*image_slots, &*scores});
  const int64_t B = q_in.size(0), C = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const auto lens = read_lens(seq_lens);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= C && lens[b] <= k_in.size(2), "seq_lens[", b, "]=", lens[b],
                " must lie in [C=", C, ", S=", k_in.size(2), "]: the cache must already hold the chunk");
  at::Tensor out = at::empty({B, C, H, D}, q_in.options());
  if (B == 0) return out;
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor* sc = with_scores ? &*scores : nullptr;
  const at::Tensor* sl = with_scores ? &*image_slots : nullptr;
  switch (q.scalar_type()) {
    case at::kFloat: chunk_impl<float>(q, k, v, lens, sl, sc, scale, prob_rounding, out); break;
    case at::kBFloat16: chunk_impl<c10::BFloat16>(q, k, v, lens, sl, sc, scale, prob_rounding, out); break;
    default: chunk_impl<c10::Half>(q, k, v, lens, sl, sc, scale, prob_rounding, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lvr_engine, m) {
  m.def(
      "image_attention_scores(Tensor q, Tensor k, Tensor seq_lens, Tensor image_slots, Tensor(a!) scores, "
      "float scale, Tensor? lse=None, int prob_rounding=0) -> ()");
  m.def(
      "chunk_attention_with_scores(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, "
      "Tensor? image_slots, Tensor(a!)? scores, float scale, int prob_rounding=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(lvr_engine, CPU, m) {
  m.impl("image_attention_scores", &image_attention_scores_cpu);
  m.impl("chunk_attention_with_scores", &chunk_attention_with_scores_cpu);
}

}  // namespace lvr_engine

// An importable module so `import lvr_engine._C` loads the library and runs the registrations.
#include <Python.h>
static struct PyModuleDef lvr_engine_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lvr_engine_C_module); }
