"""Compiled ops: thin wrappers over ``torch.ops.lvr_engine.*`` (csrc/), for the C++ CPU kernels and the CUDA
kernels alike; the dispatcher picks the kernel from the tensors' device. The backend names are ``"cpu"`` (this
module as the dispatch loads it) and ``"cuda"`` (:mod:`lvr_engine.ops.cuda`, these wrappers when CUDA kernels
are built).

Importing this module raises ImportError when ``lvr_engine._C`` has not been built, which the
dispatch reads as "backend unavailable". The fake (meta) kernels registered here give the ops
shapes without running them, so torch.compile and CUDA-graph capture can trace through them.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers the schema and CPU/CUDA kernels)
from .reference import check_patch_order, prob_rounding_code

_ops = torch.ops.lvr_engine

__all__ = ["image_attention_scores", "select_and_feedback", "chunk_attention_with_scores", "mixed_linear",
           "rope_write_kv", "rms_norm"]


@torch.library.register_fake("lvr_engine::image_attention_scores")
def _image_attention_scores_fake(q, k, seq_lens, image_slots, scores, scale, lse=None, prob_rounding=0):
    return None


@torch.library.register_fake("lvr_engine::select_and_feedback")
def _select_and_feedback_fake(scores, available, image_embeds, hidden, k, out, official_order=False):
    return scores.new_empty((scores.shape[0], k), dtype=torch.long)


@torch.library.register_fake("lvr_engine::chunk_attention_with_scores")
def _chunk_attention_with_scores_fake(q, k_cache, v_cache, seq_lens, image_slots, scores, scale,
                                      prob_rounding=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("lvr_engine::mixed_linear")
def _mixed_linear_fake(x, packed_weight, out_features, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("lvr_engine::rope_write_kv")
def _rope_write_kv_fake(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
    B, C, W = qkv.shape
    return qkv.new_empty((B, C, num_heads, W // (num_heads + 2 * num_kv_heads)))


@torch.library.register_fake("lvr_engine::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def image_attention_scores(q, k, seq_lens, image_slots, scores, scale, lse=None, prob_dtype=None):
    """q (B,H,D), k (B,Hkv,S,D), seq_lens (B,), image_slots (B,I) int (-1 = pad), scores (B,I) float32.

    scores += sum over heads of softmax(scale * q.k over keys [0, seq_lens[b]))[image_slots], each head's
    probability rounded to ``prob_dtype`` first (None: not rounded); lse (B,H) float32 optional, the
    log-sum-exp of those logits. Returns scores (updated in place).
    """
    _ops.image_attention_scores(q, k, seq_lens, image_slots, scores, float(scale), lse, prob_rounding_code(prob_dtype))
    return scores


def select_and_feedback(scores, available, image_embeds, hidden, k, out, patch_order="ascending"):
    """scores (B,I) float32, available (B,I) bool, image_embeds (B,I,D), hidden (B,D), out (B,k+1,D).

    Returns idx (B,k) int64, the top-k of scores among available (lower index wins ties at the k-th score) in
    ``patch_order`` ("ascending" or "official", reference.py); marks them unavailable, writes
    out[:, :k] = image_embeds[idx] in idx's order, out[:, k] = hidden, zeroes scores.
    """
    check_patch_order(patch_order)
    return _ops.select_and_feedback(scores, available, image_embeds, hidden, int(k), out, patch_order == "official")


def chunk_attention_with_scores(q, k_cache, v_cache, seq_lens, image_slots, scores, scale, prob_dtype=None):
    """q (B,C,H,D), k_cache/v_cache (B,Hkv,S,D) holding the chunk at [seq_lens-C, seq_lens) -> out (B,C,H,D).

    Causal attention of the chunk over each row's cache; if scores (B,I) float32 is given, adds the
    last query's probabilities on image_slots (B,I) summed over heads, each rounded to ``prob_dtype`` first, as
    image_attention_scores (out does not depend on ``prob_dtype``).
    """
    return _ops.chunk_attention_with_scores(q, k_cache, v_cache, seq_lens, image_slots, scores, float(scale),
                                            prob_rounding_code(prob_dtype))


def mixed_linear(x, packed_weight, out_features, bias=None):
    """x (..., K) float32 @ W^T + bias (N,) -> (..., N) float32; W (N, K) bf16 as (ceil(N/16), K, 16) panels from
    pack_mixed_weight, widened to fp32 in registers (csrc/mixed_linear.cpp)."""
    return _ops.mixed_linear(x, packed_weight, int(out_features), bias)


def rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
    """qkv (B,C,(H+2Hkv)*D) float32 -> q (B,C,H,D) rotated; k rotated and v written into the caches (B,Hkv,S,D) at
    slots (B,C) int64 (csrc/rope_write_kv.cpp)."""
    return _ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, int(num_heads), int(num_kv_heads))


def rms_norm(x, weight, eps):
    """x (..., h) float32, weight (h,) float32 -> weight * x * rsqrt(mean(x^2) + eps) (csrc/rms_norm.cpp)."""
    return _ops.rms_norm(x, weight, float(eps))
