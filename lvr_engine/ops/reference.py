"""Plain-torch reference implementations of the fused ops (docs/semantics.md).

These define the semantics every other backend is tested against. They are written for
clarity, not speed, and work for any floating dtype (float64 included, which the kernel
tests use as ground truth).
"""
from __future__ import annotations

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32 for half precisions and fp32, fp64 kept as fp64 (ground-truth checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kv_head_of(num_heads: int, num_kv_heads: int, device) -> torch.Tensor:
    """Index of the KV head that query head h reads (grouped-query attention, repeat_kv order)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)


PATCH_ORDERS = ("ascending", "official")
PROB_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def check_patch_order(patch_order) -> None:
    """ValueError unless ``patch_order`` is one of :data:`PATCH_ORDERS`."""
    if patch_order not in PATCH_ORDERS:
        raise ValueError(f"patch_order must be 'ascending' or 'official', got {patch_order!r}")


def check_prob_dtype(prob_dtype) -> None:
    """ValueError unless ``prob_dtype`` is None (no rounding), torch.float32, torch.bfloat16 or torch.float16."""
    if prob_dtype not in PROB_DTYPES:
        raise ValueError(f"prob_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {prob_dtype!r}")


# The compiled and Triton kernels take prob_dtype as an int (the schema's `int prob_rounding`, csrc/op_checks.h).
_PROB_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def prob_rounding_code(prob_dtype) -> int:
    """The kernels' code of ``prob_dtype``: 0 = none (None or float32), 1 = bfloat16, 2 = float16."""
    try:
        return _PROB_CODES[prob_dtype]
    except (KeyError, TypeError):
        check_prob_dtype(prob_dtype)  # raises the ValueError naming the allowed values
        raise


def round_probs(p: torch.Tensor, prob_dtype) -> torch.Tensor:
    """``p`` with every element rounded to ``prob_dtype`` (round-to-nearest-even, as ``p.to(prob_dtype)``) and
    widened back to ``p``'s dtype; ``p`` itself when ``prob_dtype`` is None."""
    check_prob_dtype(prob_dtype)
    return p if prob_dtype is None else p.to(prob_dtype).to(p.dtype)


def mean_scores_in_dtype(scores: torch.Tensor, num_terms: int, dtype) -> torch.Tensor:
    """(B,I) float32 = ``(scores / num_terms)`` rounded to ``dtype`` and widened back to float32.

    ``scores`` (B,I) float32 are attention probabilities summed over ``num_terms`` = layers x heads; the result is
    their mean in the model's ``dtype``, what the official IVT-LR code's ``torch.mean`` over the bf16 attentions
    gives (``score_precision="model"``), ready for :func:`select_and_feedback`. ``dtype`` None or float32: the mean
    in float32.
    """
    mean = scores / num_terms
    return mean if dtype is None or dtype == torch.float32 else mean.to(dtype).to(torch.float32)


def image_attention_scores(q, k, seq_lens, image_slots, scores, scale, lse=None, prob_dtype=None):
    """Add the last query's attention mass on each image slot, summed over heads, into ``scores``.

    q (B,H,D) last query per row after rotary; k (B,Hkv,S,D) key cache after rotary, row b valid on
    [0, seq_lens[b]); image_slots (B,I) int cache slot of each image token, -1 = pad;
    scores (B,I) float32, updated in place: += sum_h softmax(scale * q_h . k)[slot].
    lse (B,H) optional float32 log-sum-exp of scale*q.k over the row's valid keys (skips the normaliser).
    prob_dtype: None, or round each per-head probability to it (torch.bfloat16 / torch.float16, round-to-nearest-
    even) before the sum over heads (what eager attention in a bf16 model returns: softmax in fp32, cast to bf16).
    """
    B, H, D = q.shape
    S = k.shape[2]
    kh = _kv_head_of(H, k.shape[1], q.device)
    logits = torch.einsum("bhd,bhsd->bhs", _acc(q), _acc(k[:, kh])) * scale  # (B,H,S)
    valid = torch.arange(S, device=q.device)[None, :] < seq_lens.to(q.device).long()[:, None]  # (B,S)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    probs = round_probs(torch.exp(logits - lse.to(logits.dtype)[..., None]), prob_dtype).sum(dim=1)  # (B,S)
    slots = image_slots.long()
    gathered = torch.gather(probs, 1, slots.clamp(min=0))
    scores += torch.where(slots >= 0, gathered, torch.zeros_like(gathered)).to(scores.dtype)
    return scores


def topk_ascending(scores, available, k):
    """(B,k) int64: indices of the k largest ``scores`` among ``available``, ascending; ties -> lower index."""
    masked = _acc(scores).masked_fill(~available, float("-inf"))
    # A stable descending sort keeps equal scores in index order, so the lower index wins ties.
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def order_official(scores, available, idx):
    """Reorder the chosen indices idx (B,k), ascending, as CUDA ``topk(sorted=False)`` returns them (the official
    IVT-LR feed order): those scoring strictly above the k-th best first, then those tied with it, each ascending.

    scores (B,I) and available (B,I) bool as given to :func:`topk_ascending` (unavailable slots rank as -inf); NaN
    ranks above every number, as in the selection.
    """
    if idx.shape[1] == 0:
        return idx
    chosen = torch.gather(_acc(scores).masked_fill(~available, float("-inf")), 1, idx)
    nan = chosen.isnan()
    # The k-th best is the worst chosen: the smallest number, or NaN when every chosen one is NaN.
    kth = chosen.masked_fill(nan, float("inf")).min(dim=1, keepdim=True).values
    kth = torch.where(nan.all(dim=1, keepdim=True), torch.full_like(kth, float("nan")), kth)
    tied = (chosen == kth) | (nan & kth.isnan())
    return torch.gather(idx, 1, torch.sort(tied.to(torch.int8), dim=1, stable=True).indices)


def select_patches(scores, available, k, patch_order="ascending"):
    """The selection half of :func:`select_and_feedback` (what training uses under autograd, where the block is a
    differentiable gather): idx (B,k) int64 in ``patch_order``; available[b, idx] = False; scores reset to 0."""
    check_patch_order(patch_order)
    if k > 0:
        idx = topk_ascending(scores, available, k)
        if patch_order == "official":
            idx = order_official(scores, available, idx)
        available.scatter_(1, idx, False)
    else:
        idx = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    scores.zero_()
    return idx


def select_and_feedback(scores, available, image_embeds, hidden, k, out, patch_order="ascending"):
    """Choose the next latent step's patches and build its input block.

    scores (B,I) float32; available (B,I) bool; image_embeds (B,I,D); hidden (B,D); out (B,k+1,D).
    Returns idx (B,k) int64: the top-k of scores among available slots (lower index wins ties at the k-th
    score), in ``patch_order``: "ascending" index order, or "official" (:func:`order_official`).
    Side effects: available[b, idx] = False; out[:, :k] = image_embeds at idx (in idx's order);
    out[:, k] = hidden; scores reset to 0.
    """
    idx = select_patches(scores, available, k, patch_order)
    if k > 0:
        out[:, :k] = torch.gather(image_embeds, 1, idx[..., None].expand(-1, -1, image_embeds.shape[-1]))
    out[:, k] = hidden
    return idx


def chunk_attention_with_scores(q, k_cache, v_cache, seq_lens, image_slots, scores, scale, prob_dtype=None):
    """Attention of a chunk of C new queries per row over that row's cache, plus the last query's image scores.

    q (B,C,H,D) after rotary; k_cache, v_cache (B,Hkv,S,D), already holding the chunk's keys/values in
    slots [seq_lens[b]-C, seq_lens[b]); query c of row b sits at slot seq_lens[b]-C+c and sees keys
    [0, that slot] (causal inside the chunk). Returns out (B,C,H,D) in q's dtype.
    If ``scores`` (B,I) float32 is given, += sum over heads of the last query's probabilities on
    ``image_slots`` (B,I) (-1 = pad), each rounded to ``prob_dtype`` first, exactly as
    :func:`image_attention_scores`. ``prob_dtype`` changes the scores only, never ``out``.
    """
    check_prob_dtype(prob_dtype)
    B, C, H, D = q.shape
    S = k_cache.shape[2]
    kh = _kv_head_of(H, k_cache.shape[1], q.device)
    kk = _acc(k_cache[:, kh])  # (B,H,S,D)
    vv = _acc(v_cache[:, kh])
    logits = torch.einsum("bchd,bhsd->bhcs", _acc(q), kk) * scale  # (B,H,C,S)
    lens = seq_lens.to(q.device).long()
    qslot = lens[:, None] - C + torch.arange(C, device=q.device)[None, :]  # (B,C)
    visible = torch.arange(S, device=q.device)[None, None, :] <= qslot[:, :, None]  # (B,C,S)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhcs,bhsd->bchd", probs, vv).to(q.dtype)
    if scores is not None and image_slots is not None and image_slots.shape[1] > 0:
        last = round_probs(probs[:, :, -1, :], prob_dtype).sum(dim=1)  # (B,S)
        slots = image_slots.long()
        gathered = torch.gather(last, 1, slots.clamp(min=0))
        scores += torch.where(slots >= 0, gathered, torch.zeros_like(gathered)).to(scores.dtype)
    return out


# mixed_linear's packed weight layout: panels of 16 output rows, k-major, each k-row of a panel stored in this
# order of its rows (the order the CPU kernel widens bf16 -> fp32 with in-lane interleaves; csrc/mixed_linear.cpp).
MIXED_PANEL = 16
MIXED_PANEL_ORDER = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)


def pack_mixed_weight(weight):
    """(N, K) weight -> (ceil(N/16), K, 16) bfloat16 panels: packed[p, k, j] = W[16p + MIXED_PANEL_ORDER[j], k],
    rows past N zero. One copy, made once per model (engine/weights.py)."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16:
        raise TypeError(f"pack_mixed_weight packs a 2-D bfloat16 weight, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    P, full = -(-N // MIXED_PANEL), N // MIXED_PANEL
    # One strided copy into the result, no transients (a model's worth of packing transients stayed resident in
    # the allocator): with row 16p + 8b + 4a + i and slot j = 8a + 4b + i (MIXED_PANEL_ORDER swaps the middle
    # quarters), out viewed as [p, b, a, i, k] is the weight viewed as (P, 2, 2, 4, K).
    out = weight.new_empty(P, K, MIXED_PANEL)
    as_rows = lambda t: t.view(t.shape[0], K, 2, 2, 4).permute(0, 3, 2, 4, 1)  # noqa: E731
    w = weight.detach()
    as_rows(out[:full]).copy_(w[:full * MIXED_PANEL].view(full, 2, 2, 4, K))
    if full < P:  # the last, partial panel: zero rows past N
        last = w.new_zeros(MIXED_PANEL, K)
        last[:N - full * MIXED_PANEL] = w[full * MIXED_PANEL:]
        as_rows(out[full:]).copy_(last.view(1, 2, 2, 4, K))
    return out


def unpack_mixed_weight(packed, out_features):
    """Inverse of pack_mixed_weight: (N, K) bfloat16."""
    P, K, _ = packed.shape
    inverse = torch.argsort(torch.tensor(MIXED_PANEL_ORDER, device=packed.device))
    return packed.transpose(1, 2)[:, inverse].reshape(P * MIXED_PANEL, K)[:out_features]


def mixed_linear(x, packed_weight, out_features, bias=None):
    """x (..., K) float @ W^T + bias -> (..., N) in x's dtype, W (N, K) bf16 given packed (pack_mixed_weight) and
    widened to x's dtype (exact), so this is the matmul on the widened weight."""
    w = unpack_mixed_weight(packed_weight, out_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
    """qkv (B,C,(H+2Hkv)*D) -> q (B,C,H,D) rotated; k rotated and v written into k_cache/v_cache (B,Hkv,S,D) at
    slots (B,C). cos/sin hold (B,C,D). Rotation as HF: (x*cos) + (rotate_half(x)*sin)."""
    B, C, W = qkv.shape
    H, Hkv = num_heads, num_kv_heads
    D = W // (H + 2 * Hkv)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    cos, sin = cos.reshape(B, C, 1, D), sin.reshape(B, C, 1, D)

    def rope(x):
        return x * cos + torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1) * sin
    q, k = rope(q.reshape(B, C, H, D)), rope(k.reshape(B, C, Hkv, D))
    rows = torch.arange(B, device=qkv.device)[:, None]
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v.reshape(B, C, Hkv, D)
    return q


def rms_norm(x, weight, eps):
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) in x's dtype (float32 or float64)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
