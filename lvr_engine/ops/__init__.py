"""Fused ops of the latent step, one dispatch over backends (docs/semantics.md), and the CPU hot-path ops the lean
runner uses on a CPU (mixed_linear: fp32 x packed bf16 weights; rope_write_kv; rms_norm; torch references for
other devices).

Every op takes ``backend=`` one of ``"torch"`` (reference), ``"cpu"`` (compiled C++), ``"triton"``,
``"cuda"`` (compiled CUDA) or ``None`` (best available for the tensors' device:
cuda -> triton -> torch on CUDA tensors, cpu -> torch on CPU tensors).
This package imports nothing else from the project.
"""
from __future__ import annotations

from . import reference
from ._dispatch import available_backends, get_impl, resolve_backend
from .reference import PATCH_ORDERS, mean_scores_in_dtype, pack_mixed_weight

__all__ = [
    "image_attention_scores",
    "select_and_feedback",
    "select_patches",
    "mean_scores_in_dtype",
    "chunk_attention_with_scores",
    "mixed_linear",
    "pack_mixed_weight",
    "rope_write_kv",
    "rms_norm",
    "available_backends",
    "resolve_backend",
    "reference",
]


def image_attention_scores(q, k, seq_lens, image_slots, scores, scale, lse=None, prob_dtype=None, backend=None):
    """scores (B,I) float32 += sum over heads of softmax(scale * q.k)[image_slots], each head's probability rounded
    to ``prob_dtype`` first (None: no rounding; torch.bfloat16 / torch.float16); see reference.py."""
    return get_impl("image_attention_scores", backend, q)(q, k, seq_lens, image_slots, scores, scale, lse, prob_dtype)


def select_and_feedback(scores, available, image_embeds, hidden, k, out, patch_order="ascending", backend=None):
    """idx (B,k) int64 top-k of scores (B,I) among available (B,I), in ``patch_order`` ("ascending" index order or
    "official": strictly above the k-th best, then tied with it, each ascending); marks them used, fills
    out (B,k+1,D) with image_embeds (B,I,D) at idx then hidden (B,D), zeroes scores."""
    if patch_order not in PATCH_ORDERS:
        raise ValueError(f"patch_order must be 'ascending' or 'official', got {patch_order!r}")
    return get_impl("select_and_feedback", backend, scores)(scores, available, image_embeds, hidden, k, out,
                                                            patch_order)


def select_patches(scores, available, k, patch_order="ascending"):
    """Selection only (training under autograd builds the block itself): idx (B,k) int64 in ``patch_order``,
    marks them used, zeroes scores. One tiny top-k over (B,I): the torch implementation on every device."""
    return reference.select_patches(scores, available, k, patch_order)


def chunk_attention_with_scores(q, k_cache, v_cache, seq_lens, image_slots, scores, scale, prob_dtype=None,
                                backend=None):
    """out (B,C,H,D): causal attention of C new queries over each row's cache (+ last-query image scores, each
    head's probability rounded to ``prob_dtype`` first, as image_attention_scores; out does not depend on it)."""
    return get_impl("chunk_attention_with_scores", backend, q)(
        q, k_cache, v_cache, seq_lens, image_slots, scores, scale, prob_dtype
    )


def mixed_linear(x, packed_weight, out_features, bias=None, backend=None):
    """(..., N) = x (..., K) float32 @ W^T + bias, W (N, K) bf16 packed by ``pack_mixed_weight`` and widened to
    fp32 on the fly (CPU kernel; torch reference elsewhere). How the engine computes a bf16 model in fp32 on a
    CPU without native bf16: half the weight bytes of an fp32 copy, fp32 arithmetic."""
    return get_impl("mixed_linear", backend, x)(x, packed_weight, out_features, bias)


def rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads, backend=None):
    """A step's per-layer glue in one op: q (B,C,H,D) = rope(q part of qkv (B,C,(H+2Hkv)*D)); rope(k) and v written
    into k_cache/v_cache (B,Hkv,S,D) at slots (B,C). cos/sin hold (B,C,D). CPU kernel for float32; torch
    reference elsewhere."""
    return get_impl("rope_write_kv", backend, qkv)(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)


def rms_norm(x, weight, eps, backend=None):
    """weight * x * rsqrt(mean(x^2, -1) + eps) over the last dim (HF's RMSNorm for float32 input)."""
    return get_impl("rms_norm", backend, x)(x, weight, eps)
