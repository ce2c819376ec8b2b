// select_and_feedback (CPU): choose the next latent step's patches and build its input block in one op.
//
// Per row: the k largest scores among the available image tokens (ties at the k-th score: the lower index wins),
// marked used; idx and out[:, :k] = their embeddings in the patch order: ascending index, or with official_order
// the order CUDA topk(sorted=False) returns them (the official IVT-LR code): those scoring strictly above the
// k-th best first, then those tied with it, each in ascending index order; out[:, k] = the hidden state; scores
// reset to 0. Semantics: lvr_engine/ops/reference.py; the CUDA kernel is in ops_cuda.cu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace lvr_engine {
namespace {

at::Tensor select_and_feedback_cpu(const at::Tensor& scores, const at::Tensor& available,
                                   const at::Tensor& image_embeds_in, const at::Tensor& hidden_in, int64_t k,
                                   const at::Tensor& out, bool official_order) {
  checks::select_and_feedback_args(scores, available, image_embeds_in, hidden_in, k, out);
  checks::devices("select_and_feedback", at::kCPU, {&scores, &available, &image_embeds_in, &hidden_in, &out});
  const int64_t B = scores.size(0), I = scores.size(1), D = image_embeds_in.size(2);
  const at::Tensor embeds = checks::rows_contiguous(image_embeds_in);
  const at::Tensor hidden = checks::rows_contiguous(hidden_in.to(out.scalar_type()));
  at::Tensor idx = at::empty({B, k}, scores.options().dtype(at::kLong));
  const int64_t esz = out.element_size();
  const float* sp = scores.const_data_ptr<float>();
  bool* ap = available.data_ptr<bool>();
  const char* ep = static_cast<const char*>(embeds.const_data_ptr());
  const char* hp = static_cast<const char*>(hidden.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  int64_t* ip = idx.data_ptr<int64_t>();

  // A row's selection is a few microseconds of work: only fan out when there are many rows.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(I * (k + 1), 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> key(I);
    std::vector<int64_t> order(I);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < I; ++i)
        key[i] = ap[b * available.stride(0) + i * available.stride(1)]
                     ? sp[b * scores.stride(0) + i * scores.stride(1)]
                     : -std::numeric_limits<float>::infinity();
      // Order of torch's stable descending sort: NaN first, then larger, ties by lower index.
      auto above = [](float kx, float ky) {  // kx ranks strictly above ky by key alone
        const bool nx = std::isnan(kx), ny = std::isnan(ky);
        return nx != ny ? nx : (!nx && kx > ky);
      };
      auto before = [&](int64_t x, int64_t y) {
        const float kx = key[x], ky = key[y];
        if (above(kx, ky) || above(ky, kx)) return above(kx, ky);
        return x < y;
      };
      std::iota(order.begin(), order.end(), 0);
      if (k > 0 && k < I) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
      std::sort(order.begin(), order.begin() + k);
      if (official_order && k > 0) {
        // The k-th best is the worst chosen one; those strictly above it go first, each group stays ascending.
        int64_t worst = order[0];
        for (int64_t j = 1; j < k; ++j)
          if (before(worst, order[j])) worst = order[j];
        const float kth = key[worst];
        std::stable_partition(order.begin(), order.begin() + k, [&](int64_t i) { return above(key[i], kth); });
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = order[j];
        ip[b * k + j] = i;
        ap[b * available.stride(0) + i * available.stride(1)] = false;
        std::memcpy(op + (b * out.stride(0) + j * out.stride(1)) * esz,
                    ep + (b * embeds.stride(0) + i * embeds.stride(1)) * esz, D * esz);
      }
      std::memcpy(op + (b * out.stride(0) + k * out.stride(1)) * esz, hp + b * hidden.stride(0) * esz, D * esz);
    }
  });
  scores.zero_();
  return idx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lvr_engine, m) {
  m.def(
      "select_and_feedback(Tensor(a!) scores, Tensor(b!) available, Tensor image_embeds, Tensor hidden, "
      "int k, Tensor(c!) out, bool official_order=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lvr_engine, CPU, m) { m.impl("select_and_feedback", &select_and_feedback_cpu); }

}  // namespace lvr_engine
