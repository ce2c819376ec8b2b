"""Triton backend of the fused ops (kernels in ``_kernels.py``).

Usable on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; tests only). The
kernels module is imported lazily so that importing this package never needs triton itself:
:func:`is_available` says whether the ops can run here.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..reference import check_patch_order, prob_rounding_code

__all__ = ["is_available", "image_attention_scores", "select_and_feedback", "chunk_attention_with_scores"]

# Fixed launch shapes: under the interpreter a multi-config autotune fails, and these ops are
# memory-bound on GPU, where one reasonable tile per op is within noise of a tuned one.
_BLOCK_N = 64
_BLOCK_I = 128
# Chunk queries per program: a longer chunk runs as ceil(C / _QUERY_BLOCK) query blocks (grid axis 2).
_QUERY_BLOCK = 128
_NUM_WARPS = 4


def is_available() -> bool:
    """triton importable, and either a CUDA device or the CPU interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _k():
    from . import _kernels

    return _kernels


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Unit stride on the last dim (kernels index rows with offs_d); other strides pass through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_common(q, k, seq_lens, name_k):
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{name_k} dtype {k.dtype} must match q dtype {q.dtype}")
    if k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[-1]:
        raise ValueError(f"{name_k} must be (B,Hkv,S,D) matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.shape[-2] % k.shape[1]:
        raise ValueError(f"num heads {q.shape[-2]} of q must be a multiple of Hkv={k.shape[1]} of {name_k}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != q.shape[0]:
        raise ValueError(f"seq_lens must be (B={q.shape[0]},), got {tuple(seq_lens.shape)}")


def image_attention_scores(q, k, seq_lens, image_slots, scores, scale, lse=None, prob_dtype=None):
    """q (B,H,D), k (B,Hkv,S,D), seq_lens (B,), image_slots (B,I) int (-1 pad), scores (B,I) float32.

    scores += sum over heads of softmax(scale * q.k over keys [0, seq_lens[b]))[image_slots], each head's
    probability rounded to ``prob_dtype`` first (None: not rounded); lse (B,H) float32 optional (skips the
    normaliser pass). Returns scores.
    """
    _check_common(q, k, seq_lens, "k")
    prob_round = prob_rounding_code(prob_dtype)
    if scores.dtype != torch.float32 or scores.shape != image_slots.shape:
        raise ValueError(f"scores must be float32 shaped like image_slots {tuple(image_slots.shape)}")
    B, H, D = q.shape
    I = image_slots.shape[1]
    if B == 0 or I == 0:
        return scores
    q, k = _rows(q), _rows(k)
    lse_t = lse if lse is not None else scores  # any valid pointer: never read when HAS_LSE is False
    _k()._image_scores_kernel[(B, H)](
        q, k, seq_lens, image_slots, scores, lse_t, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        image_slots.stride(0), image_slots.stride(1), scores.stride(0), scores.stride(1),
        lse_t.stride(0), lse_t.stride(1),
        I, H // k.shape[1], D,
        HAS_LSE=lse is not None, BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(D), BLOCK_I=_BLOCK_I, PROB_ROUND=prob_round,
        num_warps=_NUM_WARPS,
    )
    return scores


def chunk_attention_with_scores(q, k_cache, v_cache, seq_lens, image_slots, scores, scale, prob_dtype=None):
    """q (B,C,H,D), k_cache/v_cache (B,Hkv,S,D) holding the chunk at [seq_lens-C, seq_lens) -> out (B,C,H,D).

    Causal attention of the chunk; if scores (B,I) float32 is given, adds the last query's
    probabilities on image_slots (B,I) summed over heads, each rounded to ``prob_dtype`` first (out does not
    depend on it). Any C: the queries run in blocks of at most _QUERY_BLOCK, one program per (b, h, block).
    """
    _check_common(q, k_cache, seq_lens, "k_cache")
    prob_round = prob_rounding_code(prob_dtype)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError("v_cache must match k_cache in shape and dtype")
    B, C, H, D = q.shape
    has_scores = scores is not None and image_slots is not None and image_slots.shape[1] > 0
    q, k_cache, v_cache = _rows(q), _rows(k_cache), _rows(v_cache)
    # The interpreter truncates fp32 -> bf16/fp16 on store instead of rounding to nearest: there
    # the kernel writes fp32 and torch rounds. On GPU the kernel stores q's dtype directly.
    store_fp32 = _interpreting() and q.dtype != torch.float32
    out = torch.empty(B, C, H, D, dtype=torch.float32 if store_fp32 else q.dtype, device=q.device)
    if B == 0 or C == 0:
        return out.to(q.dtype)
    slots = image_slots if has_scores else seq_lens  # any valid pointers: never read without scores
    sc = scores if has_scores else out
    block_c = min(_pow2(C), _QUERY_BLOCK)
    _k()._chunk_attention_kernel[(B, H, -(-C // block_c))](
        q, k_cache, v_cache, out, seq_lens, slots, sc, float(scale),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        slots.stride(0), slots.stride(-1), sc.stride(0), sc.stride(1),
        C, image_slots.shape[1] if has_scores else 0, H // k_cache.shape[1], D,
        HAS_SCORES=has_scores, BLOCK_C=block_c, BLOCK_N=_BLOCK_N if block_c <= 32 else 32, BLOCK_D=_pow2(D),
        BLOCK_I=_BLOCK_I, PROB_ROUND=prob_round if has_scores else 0, num_warps=_NUM_WARPS,
    )
    return out.to(q.dtype) if store_fp32 else out


def select_and_feedback(scores, available, image_embeds, hidden, k, out, patch_order="ascending"):
    """scores (B,I) float32, available (B,I) bool, image_embeds (B,I,D), hidden (B,D), out (B,k+1,D).

    Returns idx (B,k) int64 top-k among available (lower index wins ties at the k-th score) in
    ``patch_order`` ("ascending" or "official", reference.py); marks them unavailable, fills out[:, :k]
    with their embeddings in idx's order and out[:, k] with hidden, zeroes scores. One launch, one
    program per row. NaN scores are outside this kernel's contract (the C++/CUDA ones rank NaN first).
    """
    check_patch_order(patch_order)
    B, I = scores.shape
    D = image_embeds.shape[-1]
    k = int(k)
    if not 0 <= k <= I:
        raise ValueError(f"k={k} must lie in [0, I={I}]")
    if tuple(out.shape) != (B, k + 1, D) or out.stride(-1) != 1:
        raise ValueError(f"out must be (B={B}, k+1={k + 1}, D={D}) with a contiguous last dim, got {tuple(out.shape)}")
    if available.dtype != torch.bool or available.shape != scores.shape:
        raise ValueError("available must be a bool tensor shaped like scores")
    idx = torch.empty(B, k, dtype=torch.long, device=scores.device)
    if B == 0:
        return idx
    emb, hid = _rows(image_embeds), _rows(hidden)
    _k()._select_kernel[(B,)](
        scores, available, emb, hid, out, idx,
        scores.stride(0), scores.stride(1), available.stride(0), available.stride(1),
        emb.stride(0), emb.stride(1), hid.stride(0), out.stride(0), out.stride(1), k,
        I, D, BLOCK_I=_pow2(I), BLOCK_D=_pow2(D), OFFICIAL=patch_order == "official", num_warps=_NUM_WARPS,
    )
    return idx
