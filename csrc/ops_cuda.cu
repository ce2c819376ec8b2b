// CUDA kernels of the latent-step ops (semantics: lvr_engine/ops/reference.py; schema: ops.cpp and
// select_and_feedback.cpp; argument checks shared with the CPU kernels: op_checks.h).
//
//   image_attention_scores       grid (B, H), one block per (row, query head); warps stride over keys.
//   chunk_attention_with_scores  grid (B, H), one block per (row, query head) holding all C chunk
//                                queries: each K/V tile is staged once in shared memory (fp32) and
//                                read by every query of the chunk; online softmax per query.
//   select_and_feedback          grid (B), one block per row: k rounds of block-wide argmax, then the k
//                                placed in the patch order (ascending, or official: above the k-th best first).
// All arithmetic is fp32; the score ops may round each probability to bf16/fp16 before adding it
// (prob_rounding). Index tensors (seq_lens, image_slots) may be int32 or int64.

#include <ATen/ATen.h>
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a
// compile-only toolkit (the CI image) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "op_checks.h"

#include <climits>
#include <cmath>

namespace lvr_engine {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 32;  // one key per lane when scoring a tile

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ int64_t read_index(const void* p, bool is64, int64_t off) {
  return is64 ? static_cast<const int64_t*>(p)[off] : static_cast<int64_t>(static_cast<const int32_t*>(p)[off]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sequence length clamped to the cache: lengths are not validated on the host for CUDA tensors
// (that would need a device sync), so the kernels never read past S.
__device__ __forceinline__ int64_t row_len(const void* lens, bool lens64, int64_t b, int64_t S) {
  const int64_t L = read_index(lens, lens64, b);
  return L < 0 ? 0 : (L > S ? S : L);
}

struct AttnStrides {
  int64_t qb, qc, qh;   // q (B,C,H,D) or (B,H,D) with qc = 0
  int64_t kb, kh, ks;   // k cache
  int64_t vb, vh, vs;   // v cache
  int64_t ob, oc, oh;   // out
  int64_t sb, si;       // image_slots
  int64_t cb, ci;       // scores
  int64_t lb, lh;       // lse
};

// A probability rounded as the schema's prob_rounding code says (op_checks.h): unchanged, or to bfloat16 /
// float16 with round-to-nearest-even (c10's conversions, as torch's .to()) and back to fp32.
__device__ __forceinline__ float round_prob(float p, int code) {
  if (code == checks::kProbBf16) return static_cast<float>(c10::BFloat16(p));
  if (code == checks::kProbFp16) return static_cast<float>(c10::Half(p));
  return p;
}

// Adds round(exp(scale*q.k[slot] - M) / Lsum) for each valid image slot of row b; warps stride over I.
template <typename T>
__device__ void add_image_probs(const float* q_s, const T* k_row, int64_t ks, int D, float M, float Lsum,
                                const void* slots, bool slots64, int64_t slot_off, int64_t si, float* scores,
                                int64_t ci, int64_t I, int64_t L, int prob_code) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t i = warp; i < I; i += kWarps) {
    const int64_t slot = read_index(slots, slots64, slot_off + i * si);
    if (slot < 0 || slot >= L) continue;
    const T* kr = k_row + slot * ks;
    float part = 0.f;
    for (int d = lane; d < D; d += 32) part += q_s[d] * to_f(kr[d]);
    const float s = warp_sum(part);
    if (lane == 0) atomicAdd(scores + i * ci, round_prob(expf(s - M) / Lsum, prob_code));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) image_scores_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const void* lens, bool lens64, const void* slots,
    bool slots64, float* scores, const float* lse, float scale, AttnStrides st, int G, int D, int64_t S,
    int64_t I, int prob_code) {
  extern __shared__ float smem[];
  float* q_s = smem;  // D floats, pre-scaled
  __shared__ float wm[kWarps], wl[kWarps];
  const int64_t b = blockIdx.x, h = blockIdx.y, kvh = h / G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t L = row_len(lens, lens64, b, S);
  if (L == 0) return;  // no keys: the row adds nothing
  for (int d = threadIdx.x; d < D; d += kThreads) q_s[d] = to_f(q[b * st.qb + h * st.qh + d]) * scale;
  __syncthreads();
  const T* k_row = k + b * st.kb + kvh * st.kh;
  float M, Lsum;
  if (lse != nullptr) {
    M = lse[b * st.lb + h * st.lh];
    Lsum = 1.f;
  } else {
    float m = -INFINITY, l = 0.f;  // this warp's running max / sum (identical in all lanes)
    for (int64_t n = warp; n < L; n += kWarps) {
      const T* kr = k_row + n * st.ks;
      float part = 0.f;
      for (int d = lane; d < D; d += 32) part += q_s[d] * to_f(kr[d]);
      const float s = warp_sum(part);
      const float m_new = fmaxf(m, s);
      l = l * expf(m - m_new) + expf(s - m_new);
      m = m_new;
    }
    if (lane == 0) {
      wm[warp] = m;
      wl[warp] = l;
    }
    __syncthreads();
    M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wm[w]);
    Lsum = 0.f;
    for (int w = 0; w < kWarps; ++w) Lsum += wm[w] == -INFINITY ? 0.f : wl[w] * expf(wm[w] - M);
  }
  add_image_probs(q_s, k_row, st.ks, D, M, Lsum, slots, slots64, b * st.sb, st.si, scores + b * st.cb, st.ci, I, L,
                  prob_code);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_attention_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    const void* lens, bool lens64, const void* slots, bool slots64, float* scores, float scale, AttnStrides st,
    int C, int G, int D, int64_t S, int64_t I, int prob_code) {
  extern __shared__ float smem[];
  const int ldt = D + 1;  // padded tile rows: lane j reads row j, column d without bank conflicts
  float* q_s = smem;                        // C x D, pre-scaled queries
  float* acc_s = q_s + C * D;               // C x D, unnormalised outputs
  float* k_s = acc_s + C * D;               // kTileKeys x ldt
  float* v_s = k_s + kTileKeys * ldt;       // kTileKeys x ldt
  float* m_s = v_s + kTileKeys * ldt;       // C running maxima
  float* l_s = m_s + C;                     // C running sums
  float* p_s = l_s + C;                     // kWarps x 32 probabilities of the current tile
  const int64_t b = blockIdx.x, h = blockIdx.y, kvh = h / G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t L = row_len(lens, lens64, b, S);
  const int64_t first_q = L - C;  // query c sits at slot first_q + c

  for (int e = threadIdx.x; e < C * D; e += kThreads) {
    const int c = e / D, d = e % D;
    q_s[e] = to_f(q[b * st.qb + c * st.qc + h * st.qh + d]) * scale;
    acc_s[e] = 0.f;
  }
  for (int c = threadIdx.x; c < C; c += kThreads) {
    m_s[c] = -INFINITY;
    l_s[c] = 0.f;
  }
  const T* k_row = k + b * st.kb + kvh * st.kh;
  const T* v_row = v + b * st.vb + kvh * st.vh;
  for (int64_t start = 0; start < L; start += kTileKeys) {
    __syncthreads();  // previous tile fully consumed (and init done on the first pass)
    for (int e = threadIdx.x; e < kTileKeys * D; e += kThreads) {
      const int j = e / D, d = e % D;
      const int64_t n = start + j;
      const bool in = n < L;
      k_s[j * ldt + d] = in ? to_f(k_row[n * st.ks + d]) : 0.f;
      v_s[j * ldt + d] = in ? to_f(v_row[n * st.vs + d]) : 0.f;
    }
    __syncthreads();
    for (int c = warp; c < C; c += kWarps) {
      const int64_t qslot = first_q + c;
      if (start > qslot) continue;  // causal: this query sees none of the tile
      const int64_t n = start + lane;
      const bool vis = n <= qslot && n < L;
      float s = -INFINITY;
      if (vis) {
        const float* qc = q_s + c * D;
        const float* kr = k_s + lane * ldt;
        float a = 0.f;
        for (int d = 0; d < D; ++d) a += qc[d] * kr[d];
        s = a;
      }
      const float m_old = m_s[c];
      const float m_new = fmaxf(m_old, warp_max(s));  // finite: key `start` is visible
      const float alpha = expf(m_old - m_new);         // 0 on the query's first tile
      const float p = vis ? expf(s - m_new) : 0.f;
      const float psum = warp_sum(p);
      p_s[warp * 32 + lane] = p;
      __syncwarp();
      float* ac = acc_s + c * D;
      for (int d = lane; d < D; d += 32) {
        float a = ac[d] * alpha;
#pragma unroll 8
        for (int j = 0; j < kTileKeys; ++j) a += p_s[warp * 32 + j] * v_s[j * ldt + d];
        ac[d] = a;
      }
      __syncwarp();
      if (lane == 0) {
        m_s[c] = m_new;
        l_s[c] = l_s[c] * alpha + psum;
      }
      __syncwarp();
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < C * D; e += kThreads) {
    const int c = e / D, d = e % D;
    out[b * st.ob + c * st.oc + h * st.oh + d] = static_cast<T>(acc_s[e] / l_s[c]);
  }
  if (scores != nullptr) {
    const float M = m_s[C - 1];
    const float Lsum = l_s[C - 1];
    add_image_probs(q_s + (C - 1) * D, k_row, st.ks, D, M, Lsum, slots, slots64, b * st.sb, st.si,
                    scores + b * st.cb, st.ci, I, L, prob_code);
  }
}

// Total order of torch's stable descending sort: NaN first, then larger keys, ties by lower index.
// best_i == INT_MAX marks "nothing chosen yet".
__device__ __forceinline__ bool better(float ka, int ia, float kb, int ib) {
  if (ib == INT_MAX) return ia != INT_MAX;
  if (ia == INT_MAX) return false;
  const bool na = isnan(ka), nb = isnan(kb);
  if (na != nb) return na;
  if (!na && ka != kb) return ka > kb;
  return ia < ib;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) select_kernel(
    float* scores, bool* avail, const T* __restrict__ emb, const T* __restrict__ hid, T* __restrict__ out,
    int64_t* __restrict__ idx, int64_t ssb, int64_t ssi, int64_t sab, int64_t sai, int64_t seb, int64_t sei,
    int64_t shb, int64_t sob, int64_t soj, int I, int D, int k, bool official) {
  extern __shared__ float smem[];
  float* key = smem;                                          // I
  int* sel = reinterpret_cast<int*>(key + I);                 // k, in selection order
  int* sorted = sel + k;                                      // k, ascending
  unsigned char* taken = reinterpret_cast<unsigned char*>(sorted + k);  // I
  __shared__ float red_k[kWarps];
  __shared__ int red_i[kWarps];
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < I; i += kThreads) {
    key[i] = avail[b * sab + i * sai] ? scores[b * ssb + i * ssi] : -INFINITY;
    taken[i] = 0;
  }
  __syncthreads();
  for (int r = 0; r < k; ++r) {
    float bk = 0.f;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < I; i += kThreads)
      if (!taken[i] && better(key[i], i, bk, bi)) {
        bk = key[i];
        bi = i;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ok, oi, bk, bi)) {
        bk = ok;
        bi = oi;
      }
    }
    if (lane == 0) {
      red_k[warp] = bk;
      red_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float fk = red_k[0];
      int fi = red_i[0];
      for (int w = 1; w < kWarps; ++w)
        if (better(red_k[w], red_i[w], fk, fi)) {
          fk = red_k[w];
          fi = red_i[w];
        }
      sel[r] = fi;
      taken[fi] = 1;
    }
    __syncthreads();
  }
  // Feed order: ascending index; with `official`, as CUDA topk(sorted=False) returns the k: those strictly above
  // the k-th best (sel[k-1], the last one chosen) first, then those tied with it, each group ascending.
  const float kth = k > 0 ? key[sel[k - 1]] : 0.f;
  for (int j = threadIdx.x; j < k; j += kThreads) {
    // better(key, 1, kth, 0): equal keys fall to the index test 1 < 0, so it is true only strictly above.
    const bool above_j = official && better(key[sel[j]], 1, kth, 0);
    int rank = 0;
    for (int x = 0; x < k; ++x) {
      const bool above_x = official && better(key[sel[x]], 1, kth, 0);
      rank += above_x != above_j ? above_x : sel[x] < sel[j];
    }
    sorted[rank] = sel[j];
    idx[b * k + rank] = sel[j];
    avail[b * sab + static_cast<int64_t>(sel[j]) * sai] = false;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < k * D; e += kThreads) {
    const int j = e / D, d = e % D;
    out[b * sob + j * soj + d] = emb[b * seb + static_cast<int64_t>(sorted[j]) * sei + d];
  }
  for (int d = threadIdx.x; d < D; d += kThreads) out[b * sob + k * soj + d] = hid[b * shb + d];
  for (int i = threadIdx.x; i < I; i += kThreads) scores[b * ssb + i * ssi] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// Host side.

using checks::rows_contiguous;

size_t set_smem(const void* kernel, size_t bytes) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "chunk/head size needs ", bytes,
              " bytes of shared memory per block; this GPU allows ", optin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: f(at::Half{}); break;
  }
}

void image_attention_scores_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& seq_lens,
                                 const at::Tensor& image_slots, const at::Tensor& scores, double scale,
                                 const c10::optional<at::Tensor>& lse, int64_t prob_rounding) {
  checks::image_attention_scores_args(q_in, k_in, seq_lens, image_slots, scores, lse, prob_rounding);
  checks::devices("image_attention_scores", at::kCUDA, {&q_in, &k_in, &seq_lens, &image_slots, &scores});
  if (lse) checks::devices("image_attention_scores", at::kCUDA, {&*lse});
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2), Hkv = k_in.size(1), S = k_in.size(2);
  const int64_t I = image_slots.size(1);
  if (B == 0 || I == 0) return;
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in);
  AttnStrides st{};
  st.qb = q.stride(0); st.qh = q.stride(1);
  st.kb = k.stride(0); st.kh = k.stride(1); st.ks = k.stride(2);
  st.sb = image_slots.stride(0); st.si = image_slots.stride(1);
  st.cb = scores.stride(0); st.ci = scores.stride(1);
  if (lse) { st.lb = lse->stride(0); st.lh = lse->stride(1); }
  const size_t smem = D * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    image_scores_kernel<T><<<dim3(B, H), kThreads, smem, stream>>>(
        q.const_data_ptr<T>(), k.const_data_ptr<T>(), seq_lens.const_data_ptr(), seq_lens.scalar_type() == at::kLong,
        image_slots.const_data_ptr(), image_slots.scalar_type() == at::kLong, scores.data_ptr<float>(),
        lse ? lse->const_data_ptr<float>() : nullptr, static_cast<float>(scale), st, static_cast<int>(H / Hkv),
        static_cast<int>(D), S, I, static_cast<int>(prob_rounding));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor chunk_attention_with_scores_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const at::Tensor& seq_lens, const c10::optional<at::Tensor>& image_slots,
                                            const c10::optional<at::Tensor>& scores, double scale,
                                            int64_t prob_rounding) {
  const bool have_scores =
      checks::chunk_attention_args(q_in, k_in, v_in, seq_lens, image_slots, scores, prob_rounding);
  checks::devices("chunk_attention_with_scores", at::kCUDA, {&q_in, &k_in, &v_in, &seq_lens});
  if (have_scores) checks::devices("chunk_attention_with_scores", at::kCUDA, {&*image_slots, &*scores});
  const bool with_scores = have_scores && image_slots->size(1) > 0;
  const int64_t B = q_in.size(0), C = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({B, C, H, D}, q_in.options());
  if (B == 0) return out;
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  AttnStrides st{};
  st.qb = q.stride(0); st.qc = q.stride(1); st.qh = q.stride(2);
  st.kb = k.stride(0); st.kh = k.stride(1); st.ks = k.stride(2);
  st.vb = v.stride(0); st.vh = v.stride(1); st.vs = v.stride(2);
  st.ob = out.stride(0); st.oc = out.stride(1); st.oh = out.stride(2);
  if (with_scores) {
    st.sb = image_slots->stride(0); st.si = image_slots->stride(1);
    st.cb = scores->stride(0); st.ci = scores->stride(1);
  }
  const size_t smem = (2 * C * D + 2 * kTileKeys * (D + 1) + 2 * C + kWarps * 32) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    set_smem(reinterpret_cast<const void*>(&chunk_attention_kernel<T>), smem);
    chunk_attention_kernel<T><<<dim3(B, H), kThreads, smem, stream>>>(
        q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), out.data_ptr<T>(),
        seq_lens.const_data_ptr(), seq_lens.scalar_type() == at::kLong,
        with_scores ? image_slots->const_data_ptr() : nullptr,
        with_scores && image_slots->scalar_type() == at::kLong, with_scores ? scores->data_ptr<float>() : nullptr,
        static_cast<float>(scale), st, static_cast<int>(C), static_cast<int>(H / Hkv), static_cast<int>(D), S,
        with_scores ? image_slots->size(1) : 0, static_cast<int>(prob_rounding));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor select_and_feedback_cuda(const at::Tensor& scores, const at::Tensor& available,
                                    const at::Tensor& image_embeds_in, const at::Tensor& hidden_in, int64_t k,
                                    const at::Tensor& out, bool official_order) {
  checks::select_and_feedback_args(scores, available, image_embeds_in, hidden_in, k, out);
  checks::float_dtype(out, "out");  // the kernel is instantiated for the float types only
  checks::devices("select_and_feedback", at::kCUDA, {&scores, &available, &image_embeds_in, &hidden_in, &out});
  const int64_t B = scores.size(0), I = scores.size(1), D = image_embeds_in.size(2);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor idx = at::empty({B, k}, scores.options().dtype(at::kLong));
  if (B == 0) return idx;
  const at::Tensor emb = rows_contiguous(image_embeds_in);
  const at::Tensor hid = rows_contiguous(hidden_in.to(out.scalar_type()));
  const size_t smem = I * sizeof(float) + 2 * k * sizeof(int) + I;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    set_smem(reinterpret_cast<const void*>(&select_kernel<T>), smem);
    select_kernel<T><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
        scores.data_ptr<float>(), available.data_ptr<bool>(), emb.const_data_ptr<T>(), hid.const_data_ptr<T>(),
        out.data_ptr<T>(), idx.data_ptr<int64_t>(), scores.stride(0), scores.stride(1), available.stride(0),
        available.stride(1), emb.stride(0), emb.stride(1), hid.stride(0), out.stride(0), out.stride(1),
        static_cast<int>(I), static_cast<int>(D), static_cast<int>(k), official_order);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lvr_engine, CUDA, m) {
  m.impl("image_attention_scores", &image_attention_scores_cuda);
  m.impl("select_and_feedback", &select_and_feedback_cuda);
  m.impl("chunk_attention_with_scores", &chunk_attention_with_scores_cuda);
}

}  // namespace lvr_engine
