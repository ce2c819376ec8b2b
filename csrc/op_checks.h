// Argument checks of the latent-step ops, shared by the CPU kernels (ops.cpp, select_and_feedback.cpp) and the
// CUDA kernels (ops_cuda.cu) so that both backends accept and reject the same calls with the same messages.
// Host code only (the header is also compiled by nvcc). Shapes: lvr_engine/ops/reference.py.
//
// The checks here read shapes, dtypes and strides, never tensor contents: per-row lengths are validated by the
// CPU kernels only (reading them on a GPU would synchronise the stream).

#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

namespace lvr_engine {
namespace checks {

inline void float_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", st);
}

inline void index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
              t.scalar_type());
}

// Every tensor on a device of `type` (the backend the dispatcher chose for the op).
inline void devices(const char* op, at::DeviceType type, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device().type() == type, op, " (", type == at::kCUDA ? "cuda" : "cpu",
                "): all tensors must be on ", type == at::kCUDA ? "CUDA" : "CPU", ", got one on ", t->device());
}

// Last dim contiguous (the kernels read rows with unit stride); other dims may be strided, so slices of a static
// KV cache are used without a copy.
inline at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// How the score ops round each per-head probability before adding it into the fp32 scores (the schema's
// `int prob_rounding`; `prob_dtype` in Python): none, or to bfloat16 / float16, round-to-nearest-even.
constexpr int64_t kProbNone = 0, kProbBf16 = 1, kProbFp16 = 2;

inline void prob_rounding(int64_t code) {
  TORCH_CHECK(code == kProbNone || code == kProbBf16 || code == kProbFp16,
              "prob_rounding must be 0 (none), 1 (bfloat16) or 2 (float16), got ", code);
}

// image_slots (B,I) int32/int64 and scores (B,I) float32.
inline void scores_args(const at::Tensor& slots, const at::Tensor& scores, int64_t B) {
  index_dtype(slots, "image_slots");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B, "image_slots must be (B,I) with B=", B, ", got ",
              slots.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.dim() == 2 && scores.sizes() == slots.sizes(), "scores must be (B,I) like image_slots ",
              slots.sizes(), ", got ", scores.sizes());
}

// q (B,H,D) or (B,C,H,D) (`q_dims`) and a cache (B,Hkv,S,D) named `k_name` with H a multiple of Hkv; seq_lens (B,).
inline void attention_args(const at::Tensor& q, int64_t q_dims, const char* q_shape, const at::Tensor& k,
                           const char* k_name, const at::Tensor& seq_lens) {
  TORCH_CHECK(q.dim() == q_dims, "q must be ", q_shape, ", got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, k_name, " must be (B,Hkv,S,D), got ", k.sizes());
  float_dtype(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), k_name, " dtype ", k.scalar_type(), " must match q dtype ",
              q.scalar_type());
  const int64_t B = q.size(0), H = q.size(-2), D = q.size(-1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, k_name, " must be (B=", B, ",Hkv,S,D=", D, "), got ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && H % k.size(1) == 0, "num heads H=", H, " of q must be a multiple of Hkv=", k.size(1),
              " of ", k_name);
  index_dtype(seq_lens, "seq_lens");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, "seq_lens must be (B=", B, "), got ", seq_lens.sizes());
}

// image_attention_scores(q (B,H,D), k (B,Hkv,S,D), seq_lens (B,), image_slots (B,I), scores (B,I), lse (B,H)?,
// prob_rounding code).
inline void image_attention_scores_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& seq_lens,
                                        const at::Tensor& image_slots, const at::Tensor& scores,
                                        const c10::optional<at::Tensor>& lse, int64_t prob_code) {
  attention_args(q, 3, "(B,H,D)", k, "k", seq_lens);
  scores_args(image_slots, scores, q.size(0));
  if (lse) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "lse must be float32, got ", lse->scalar_type());
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == q.size(0) && lse->size(1) == q.size(1), "lse must be (B=",
                q.size(0), ",H=", q.size(1), "), got ", lse->sizes());
  }
  prob_rounding(prob_code);
}

// chunk_attention_with_scores(q (B,C,H,D) with C >= 1, k_cache/v_cache (B,Hkv,S,D), seq_lens (B,),
// image_slots (B,I)?, scores (B,I)?, prob_rounding code). Returns whether scores are to be accumulated (both given).
inline bool chunk_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& seq_lens, const c10::optional<at::Tensor>& image_slots,
                                 const c10::optional<at::Tensor>& scores, int64_t prob_code) {
  attention_args(q, 4, "(B,C,H,D)", k, "k_cache", seq_lens);
  TORCH_CHECK(v.sizes() == k.sizes(), "v_cache must have k_cache's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v_cache dtype ", v.scalar_type(), " must match q dtype ",
              q.scalar_type());
  TORCH_CHECK(q.size(1) >= 1, "q must hold at least one chunk query (C >= 1), got C=", q.size(1));
  const bool with_scores = scores.has_value() && image_slots.has_value();
  if (with_scores) scores_args(*image_slots, *scores, q.size(0));
  prob_rounding(prob_code);
  return with_scores;
}

// select_and_feedback(scores (B,I) float32, available (B,I) bool, image_embeds (B,I,D), hidden (B,D), k in [0, I],
// out (B,k+1,D) in image_embeds' dtype with a contiguous last dim).
inline void select_and_feedback_args(const at::Tensor& scores, const at::Tensor& available,
                                     const at::Tensor& image_embeds, const at::Tensor& hidden, int64_t k,
                                     const at::Tensor& out) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat, "scores must be (B,I) float32, got ",
              scores.sizes(), " ", scores.scalar_type());
  const int64_t B = scores.size(0), I = scores.size(1);
  TORCH_CHECK(available.scalar_type() == at::kBool && available.sizes() == scores.sizes(),
              "available must be (B,I) bool like scores ", scores.sizes(), ", got ", available.sizes(), " ",
              available.scalar_type());
  TORCH_CHECK(image_embeds.dim() == 3 && image_embeds.size(0) == B && image_embeds.size(1) == I,
              "image_embeds must be (B=", B, ",I=", I, ",D), got ", image_embeds.sizes());
  const int64_t D = image_embeds.size(2);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == B && hidden.size(1) == D, "hidden must be (B=", B, ",D=", D,
              "), got ", hidden.sizes());
  TORCH_CHECK(k >= 0 && k <= I, "k=", k, " must lie in [0, I=", I, "]");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == k + 1 && out.size(2) == D, "out must be (B=", B,
              ",k+1=", k + 1, ",D=", D, "), got ", out.sizes());
  TORCH_CHECK(image_embeds.scalar_type() == out.scalar_type(), "image_embeds dtype ", image_embeds.scalar_type(),
              " must match out dtype ", out.scalar_type());
  TORCH_CHECK(out.stride(2) == 1, "out must have a contiguous last dim (it is written in place)");
}

}  // namespace checks
}  // namespace lvr_engine
