"""Triton kernels of the latent-step ops (semantics: lvr_engine/ops/reference.py).

One program per (row b, query head h) for the attention ops, one per row for the selection.
Everything is computed in fp32: under TRITON_INTERPRET=1 bf16 arithmetic is wrong, and the GPU
path keeps the same code so that what the interpreter tests is what runs (the dot products of the
attention ops use fp32 inputs, IEEE precision, i.e. no TF32 rounding of the logits).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_prob(p, PROB_ROUND: tl.constexpr):
    """p (fp32) rounded to bf16 (PROB_ROUND=1) or fp16 (2) with round-to-nearest-even and widened back; p if 0.

    bf16 by the bits (add half an ulp, ties to even, drop the low 16 bits): the interpreter's fp32 -> bf16 cast
    truncates. Probabilities are finite and >= 0, so the carry can only move into the exponent, as it should.
    """
    if PROB_ROUND == 1:
        u = p.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        p = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    elif PROB_ROUND == 2:
        p = p.to(tl.float16).to(tl.float32)
    return p


@triton.jit
def _add_image_scores(SCORES, SLOTS, k_base, q, m_row, l_row, b, ssb, ssi, scb, sci, sks, offs_d, dmask, I, L,
                      BLOCK_I: tl.constexpr, PROB_ROUND: tl.constexpr):
    """scores[b, i] += round(exp(q . k[slots[b, i]] - m_row) / l_row) for every image token i of row b whose slot
    is in [0, L): one query's probabilities (q (BLOCK_D,) already scaled; m_row/l_row its softmax max and sum)."""
    offs_i = tl.arange(0, BLOCK_I)
    for i0 in range(0, I, BLOCK_I):
        ii = i0 + offs_i
        imask = ii < I
        slot = tl.load(SLOTS + b * ssb + ii * ssi, mask=imask, other=-1).to(tl.int64)
        valid = imask & (slot >= 0) & (slot < L)
        kk = tl.load(k_base + slot[:, None] * sks + offs_d[None, :], mask=valid[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        logit = tl.sum(kk * q[None, :], axis=1)
        p = _round_prob(tl.exp(logit - m_row) / l_row, PROB_ROUND)
        tl.atomic_add(SCORES + b * scb + ii * sci, p, mask=valid)


@triton.jit
def _image_scores_kernel(
    Q, K, LENS, SLOTS, SCORES, LSE, scale,
    sqb, sqh, skb, skh, sks, ssb, ssi, scb, sci, slb, slh,
    I, GROUP, D,
    HAS_LSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
    PROB_ROUND: tl.constexpr,
):
    """scores[b, i] += round(softmax(scale * q[b,h] . k[b, h // GROUP, :L])[slots[b, i]]) for this (b, h)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    L = tl.load(LENS + b).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_d, mask=dmask, other=0.0).to(tl.float32) * scale
    k_base = K + b * skb + kvh * skh
    if HAS_LSE:
        m_row = tl.load(LSE + b * slb + h * slh)
        l_row = 1.0
    else:
        # Per-lane online softmax (each lane sees keys n = lane mod BLOCK_N), merged at the end:
        # no loop-carried scalars, and the lanes' exp rescalings are exact to fp32 rounding.
        offs_n = tl.arange(0, BLOCK_N)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, L, BLOCK_N):
            n = start + offs_n
            nmask = n < L
            k = tl.load(k_base + n[:, None].to(tl.int64) * sks + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            s = tl.where(nmask, s, float("-inf"))
            m_new = tl.maximum(m, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_safe) + tl.exp(s - m_safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        l_row = tl.sum(l * tl.exp(m - m_row), axis=0)
    _add_image_scores(SCORES, SLOTS, k_base, q, m_row, l_row, b, ssb, ssi, scb, sci, sks, offs_d, dmask, I, L,
                      BLOCK_I, PROB_ROUND)


@triton.jit
def _chunk_attention_kernel(
    Q, K, V, O, LENS, SLOTS, SCORES, scale,
    sqb, sqc, sqh, skb, skh, sks, svb, svh, svs, sob, soc, soh, ssb, ssi, scb, sci,
    C, I, GROUP, D,
    HAS_SCORES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr, PROB_ROUND: tl.constexpr,
):
    """Causal attention of chunk queries [c0, c0 + BLOCK_C) of (b, h) over the row's cache, online softmax;
    program (b, h, j) takes query block c0 = j * BLOCK_C, so a chunk of any length C runs as ceil(C / BLOCK_C)
    blocks.

    Query c sits at slot L - C + c; a block reads keys only up to its last query's slot. With HAS_SCORES
    the block holding query C - 1 adds that query's probabilities on the image slots to scores[b, :]: a
    second, short pass recomputes only those logits and divides by the final normaliser, so they are
    exact rather than rescaled block by block; each is rounded as PROB_ROUND says (_round_prob) before
    it is added.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    c0 = tl.program_id(2) * BLOCK_C
    kvh = h // GROUP
    L = tl.load(LENS + b).to(tl.int64)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    cmask = offs_c < C
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + offs_c[:, None] * sqc + h * sqh + offs_d[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    qslot = L - C + offs_c
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_C], tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    hi = tl.minimum(L, L - C + c0 + BLOCK_C)  # keys past the block's last query are masked for all its rows
    for start in range(0, hi, BLOCK_N):
        n = start + offs_n
        nmask = n < L
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + n[:, None].to(tl.int64) * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        visible = (n[None, :] <= qslot[:, None]) & nmask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay 0
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m = m_new
    l_div = tl.where(cmask, l, 1.0)
    out = acc / l_div[:, None]
    tl.store(O + b * sob + offs_c[:, None] * soc + h * soh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=cmask[:, None] & dmask[None, :])
    if HAS_SCORES:
        if c0 + BLOCK_C >= C:  # only the block that holds the chunk's last query
            is_last = offs_c == C - 1
            m_last = tl.sum(tl.where(is_last, m, 0.0), axis=0)
            l_last = tl.sum(tl.where(is_last, l, 0.0), axis=0)
            q_last = tl.sum(tl.where(is_last[:, None], q, 0.0), axis=0)
            _add_image_scores(SCORES, SLOTS, k_base, q_last, m_last, l_last, b, ssb, ssi, scb, sci, sks, offs_d,
                              dmask, I, L, BLOCK_I, PROB_ROUND)


@triton.jit
def _select_kernel(
    SCORES, AVAIL, EMB, HID, OUT, IDX,
    ssb, ssi, sab, sai, seb, sei, shb, sob, soj, k,
    I, D,
    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, OFFICIAL: tl.constexpr,
):
    """Row b: top-k of scores among available (ties at the k-th -> lower index) in the patch order (ascending, or
    with OFFICIAL those strictly above the k-th best first, then those tied with it, each ascending), feedback
    block, reset."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs < I
    dmask = offs_d < D
    sc = tl.load(SCORES + b * ssb + offs * ssi, mask=imask, other=0.0).to(tl.float32)
    av = tl.load(AVAIL + b * sab + offs * sai, mask=imask, other=0) != 0
    key = tl.where(av, sc, float("-inf"))
    taken = offs < 0
    kth = tl.max(key, axis=0)  # after the loop: the k-th best key (the last round's maximum)
    # k rounds of argmax over the not-yet-taken slots; the min index among the maxima breaks ties.
    for _ in range(0, k):
        cand = imask & (taken == 0)
        best = tl.max(tl.where(cand, key, float("-inf")), axis=0)
        first = tl.min(tl.where(cand & (key == best), offs, BLOCK_I), axis=0)
        taken = taken | (offs == first)
        kth = best
    if OFFICIAL:
        # Those strictly above the k-th best first, then the tied ones; each group in ascending index order.
        above = taken & (key > kth)
        tied = taken & (key <= kth)
        n_above = tl.sum(above.to(tl.int32), axis=0)
        pos = tl.where(above, tl.cumsum(above.to(tl.int32), axis=0) - 1,
                       n_above + tl.cumsum(tied.to(tl.int32), axis=0) - 1)
    else:
        # Selected slots in ascending index order: slot i goes to position (number taken before it).
        pos = tl.cumsum(taken.to(tl.int32), axis=0) - 1
    tl.store(IDX + b * k + pos, offs.to(tl.int64), mask=taken)
    tl.store(AVAIL + b * sab + offs * sai, tl.zeros([BLOCK_I], tl.int1), mask=taken)
    for j in range(0, k):
        i_j = tl.sum(tl.where(taken & (pos == j), offs, 0), axis=0).to(tl.int64)
        row = tl.load(EMB + b * seb + i_j * sei + offs_d, mask=dmask)
        tl.store(OUT + b * sob + j * soj + offs_d, row.to(OUT.dtype.element_ty), mask=dmask)
    hid = tl.load(HID + b * shb + offs_d, mask=dmask)
    tl.store(OUT + b * sob + k * soj + offs_d, hid.to(OUT.dtype.element_ty), mask=dmask)
    tl.store(SCORES + b * ssb + offs * ssi, tl.zeros([BLOCK_I], tl.float32), mask=imask)
