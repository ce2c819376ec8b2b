// rope_write_kv: the per-layer glue of a decode / latent step fused into one op (CPU, fp32).
//
// From the fused projection qkv (B,C,(H+2Hkv)*D) it returns q rotated (B,C,H,D), and writes k rotated and v
// into the layer's cache rows at slots (B,C). Unfused this is three slices, two rotations of seven torch ops
// each and two advanced-index writes: ~20 dispatches per layer, a third of a batch-1 decode step on a 2-core
// CPU. The rotation is computed exactly as HF's apply_rotary_pos_emb: (x*cos) + (rotate_half(x)*sin), two
// roundings then the sum, no fused multiply-add, so the engine's tokens do not move.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace lvr_engine {
namespace {

// dst[d] = x[d]*c[d] + rot(x)[d]*s[d], rot(x) = [-x[D/2:], x[:D/2]].
__attribute__((optimize("fp-contract=off"))) void rope_row(const float* __restrict x, const float* __restrict c,
                                                            const float* __restrict s, float* __restrict dst,
                                                            int D) {
  const int h = D / 2;
  for (int d = 0; d < h; ++d) {
    const float a = x[d] * c[d];
    const float b = -x[d + h] * s[d];
    dst[d] = b + a;
  }
  for (int d = h; d < D; ++d) {
    const float a = x[d] * c[d];
    const float b = x[d - h] * s[d];
    dst[d] = b + a;
  }
}

at::Tensor rope_write_kv_cpu(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots_in,
                             int64_t H, int64_t Hkv) {
  TORCH_CHECK(qkv_in.dim() == 3 && qkv_in.scalar_type() == at::kFloat, "rope_write_kv: qkv must be (B,C,(H+2Hkv)*D) "
              "float32, got ", qkv_in.sizes(), " ", qkv_in.scalar_type());
  const int64_t B = qkv_in.size(0), C = qkv_in.size(1);
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && qkv_in.size(2) % (H + 2 * Hkv) == 0,
              "rope_write_kv: qkv width ", qkv_in.size(2), " is not (H=", H, " + 2*Hkv=", Hkv, ") * D");
  const int64_t D = qkv_in.size(2) / (H + 2 * Hkv);
  TORCH_CHECK(D % 2 == 0, "rope_write_kv: head_dim must be even, got ", D);
  for (const at::Tensor* t : {&cos_in, &sin_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == B * C * D, "rope_write_kv: cos/sin must hold (B=", B,
                ",C=", C, ",D=", D, ") float32, got ", t->sizes(), " ", t->scalar_type());
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv && t->size(3) == D &&
                    t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "rope_write_kv: caches must be (B=", B, ",Hkv=", Hkv, ",S,D=", D, ") float32 with contiguous rows, got ",
                t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(slots_in.dim() == 2 && slots_in.size(0) == B && slots_in.size(1) == C &&
                  slots_in.scalar_type() == at::kLong,
              "rope_write_kv: slots must be (B=", B, ",C=", C, ") int64, got ", slots_in.sizes(), " ",
              slots_in.scalar_type());
  for (const at::Tensor* t : {&qkv_in, &cos_in, &sin_in, &k_cache, &v_cache, &slots_in})
    TORCH_CHECK(t->device().is_cpu(), "rope_write_kv (cpu): all tensors must be on CPU");
  const at::Tensor qkv = qkv_in.contiguous(), cs = cos_in.contiguous(), sn = sin_in.contiguous();
  const at::Tensor slots = slots_in.contiguous();
  const int64_t S = k_cache.size(2);
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * C; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "rope_write_kv: slot ", sp[i], " outside the cache's ", S, " slots");
  at::Tensor q = at::empty({B, C, H, D}, qkv.options());
  const float* xp = qkv.const_data_ptr<float>();
  const float* cp = cs.const_data_ptr<float>();
  const float* snp = sn.const_data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  const int64_t W = (H + 2 * Hkv) * D;
  at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / C, slot = sp[t];
      const float* x = xp + t * W;
      const float* c = cp + t * D;
      const float* s = snp + t * D;
      for (int64_t h = 0; h < H; ++h) rope_row(x + h * D, c, s, qp + (t * H + h) * D, static_cast<int>(D));
      for (int64_t g = 0; g < Hkv; ++g) {
        float* kd = kp + b * k_cache.stride(0) + g * k_cache.stride(1) + slot * k_cache.stride(2);
        float* vd = vp + b * v_cache.stride(0) + g * v_cache.stride(1) + slot * v_cache.stride(2);
        rope_row(x + (H + g) * D, c, s, kd, static_cast<int>(D));
        std::memcpy(vd, x + (H + Hkv + g) * D, sizeof(float) * D);
      }
    }
  });
  return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lvr_engine, m) {
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "int num_heads, int num_kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(lvr_engine, CPU, m) { m.impl("rope_write_kv", &rope_write_kv_cpu); }

}  // namespace lvr_engine
