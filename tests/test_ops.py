"""Fused ops: every available backend against the torch reference and a float64 ground truth.

Error bounds follow flash-attention's tests: a kernel's max error vs float64 must stay within twice
the error of a plain torch implementation computed in the same storage dtype (plus a small floor),
with inputs quantised to that dtype first so only compute error is measured.
Triton runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported, and the interpreter must not leak into the other tests), on tiny shapes only.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lvr_engine.ops as ops
from lvr_engine.ops import reference

IN_TRITON_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# Scores are fp32 sums of fp32-computed probabilities whatever the input dtype.
SCORE_ATOL = 2e-5


def _backends():
    have = ops.available_backends()
    out = []
    if "cpu" in have["cpu"]:
        out.append(("cpu", "cpu"))
    if HAS_CUDA:
        out += [(b, "cuda") for b in ("cuda", "triton") if b in have["cuda"]]
    return out


BACKENDS = _backends()
BACKEND_IDS = [b for b, _ in BACKENDS]


def test_cpu_backend_is_built_and_default():
    """The compiled backend must load here and be what backend=None picks for CPU tensors."""
    assert ops.available_backends()["cpu"][0] == "cpu"
    assert ops.resolve_backend(None, "cpu") == "cpu"


# ------------------------------------------------------------------------------------------------
# Inputs and ground truth.


def _make_case(B, H, Hkv, D, S, I, C, dtype, seed=0, lens_dtype=torch.int32, strided=False):
    """Random inputs with per-row lengths, -1 pads and a few slots past the row's length.

    q (B,C,H,D); k, v (B,Hkv,S,D) (views into a wider cache when ``strided``); lens (B,);
    slots (B,I) int32.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, H, D, generator=g).to(dtype)
    if strided:  # a layer/length slice of a larger static cache: non-contiguous head and slot strides
        big = torch.randn(2, B, Hkv, S + 7, D, generator=g).to(dtype)
        k, v = big[0, :, :, :S], big[1, :, :, :S]
    else:
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    lo = max(C, min(S, I + 2))
    lens = torch.randint(lo, S + 1, (B,), generator=g)
    lens[0] = S
    slots = torch.empty(B, I, dtype=torch.int32)
    for b in range(B):
        slots[b] = torch.randperm(S, generator=g)[:I].sort().values.to(torch.int32)
        slots[b, torch.randperm(I, generator=g)[: I // 5]] = -1
    return q, k, v, lens.to(lens_dtype), slots


def _attention64(q, k, v, lens, scale, dtype=torch.float64):
    """Independent computation of the chunk attention in ``dtype``.

    q (B,C,H,D), k/v (B,Hkv,S,D) -> (out (B,C,H,D), last-query probs summed over heads (B,S)),
    all arithmetic in ``dtype`` (float64 for the ground truth, the storage dtype for the bound).
    """
    B, C, H, D = q.shape
    S = k.shape[2]
    rep = H // k.shape[1]
    kk = k.to(dtype).repeat_interleave(rep, dim=1)
    vv = v.to(dtype).repeat_interleave(rep, dim=1)
    logits = torch.einsum("bchd,bhsd->bhcs", q.to(dtype), kk) * scale
    qslot = lens.long()[:, None] - C + torch.arange(C)[None]
    visible = torch.arange(S)[None, None] <= qslot[:, :, None]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhcs,bhsd->bchd", probs, vv)
    return out, probs[:, :, -1].sum(dim=1)


def _gather(probs, slots):
    """(B,I) probs at slots, 0 at -1 pads."""
    g = torch.gather(probs, 1, slots.long().clamp(min=0))
    return torch.where(slots >= 0, g, torch.zeros_like(g))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


# ------------------------------------------------------------------------------------------------
# The reference itself against float64.

REF_CASES = [(3, 8, 2, 64, 200, 40, 5), (1, 12, 4, 72, 130, 30, 1)]


@pytest.mark.parametrize("case", REF_CASES)
def test_reference_matches_float64(case):
    B, H, Hkv, D, S, I, C = case
    q, k, v, lens, slots = _make_case(B, H, Hkv, D, S, I, C, torch.float32)
    scale = D**-0.5
    out64, last64 = _attention64(q, k, v, lens, scale)
    scores = torch.zeros(B, I)
    out = reference.chunk_attention_with_scores(q, k, v, lens, slots, scores, scale)
    assert _max_err(out, out64) < 1e-5
    assert _max_err(scores, _gather(last64, slots)) < 1e-6
    s2 = torch.zeros(B, I)
    reference.image_attention_scores(q[:, -1], k, lens, slots, s2, scale)
    assert _max_err(s2, _gather(last64, slots)) < 1e-6


# ------------------------------------------------------------------------------------------------
# chunk_attention_with_scores and image_attention_scores on every backend.

# (B, H, Hkv, D, S, I, C): B in {1,3}, MHA and GQA, D 64/128 and odd 72/80, C from decode (1) to 65.
CASES = [
    (1, 4, 4, 64, 37, 8, 1),
    (3, 8, 2, 128, 600, 256, 33),
    (3, 12, 4, 72, 300, 100, 65),
    (1, 8, 2, 80, 129, 64, 17),
    (3, 4, 4, 64, 600, 256, 1),
    (2, 4, 4, 40, 90, 20, 11),  # 11 query rows per task (6-row tiles + a 5-row rest), D=40 (a 16-column tail)
]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}D{}S{}I{}C{}".format(*c))
def test_chunk_attention(case, dtype, backend, device):
    B, H, Hkv, D, S, I, C = case
    q, k, v, lens, slots = _make_case(B, H, Hkv, D, S, I, C, dtype, seed=sum(case), strided=(C == 33))
    scale = D**-0.5
    out64, last64 = _attention64(q, k, v, lens, scale)
    out_same, last_same = _attention64(q, k, v, lens, scale, dtype=dtype)
    want = _gather(last64, slots)
    init = torch.rand(B, I)  # scores accumulate: start from non-zero values
    scores = init.clone()
    qd, kd, vd, ld, sd, scd = _to(device, q, k, v, lens, slots, scores)
    out = ops.chunk_attention_with_scores(qd, kd, vd, ld, sd, scd, scale, backend=backend)
    assert out.dtype == dtype and out.shape == (B, C, H, D)
    bound = 2 * _max_err(out_same, out64) + FLOOR[dtype]
    assert _max_err(out.cpu(), out64) <= bound
    score_bound = min(2 * _max_err(_gather(last_same, slots), want) + FLOOR[dtype], SCORE_ATOL)
    assert _max_err(scd.cpu() - init, want) <= score_bound
    # Without scores the attention output is unchanged.
    out2 = ops.chunk_attention_with_scores(qd, kd, vd, ld, None, None, scale, backend=backend)
    assert torch.equal(out2, out)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "B{}H{}kv{}D{}S{}I{}".format(*c[:6]))
def test_image_attention_scores(case, dtype, backend, device):
    B, H, Hkv, D, S, I, _ = case
    # The op sees all of the row's keys: the chunk of length 1 at the end of the row.
    q, k, _v, lens, slots = _make_case(B, H, Hkv, D, S, I, 1, dtype, seed=7 + sum(case),
                                       lens_dtype=torch.int64, strided=True)
    scale = D**-0.5
    _out64, last64 = _attention64(q, k, k, lens, scale)
    want = _gather(last64, slots)
    _o, last_same = _attention64(q, k, k, lens, scale, dtype=dtype)
    bound = min(2 * _max_err(_gather(last_same, slots), want) + FLOOR[dtype], SCORE_ATOL)
    init = torch.rand(B, I)
    qd, kd, ld, sd = _to(device, q[:, 0], k, lens, slots)
    scores = init.clone().to(device)
    ret = ops.image_attention_scores(qd, kd, ld, sd, scores, scale, backend=backend)
    assert ret is scores
    assert _max_err(scores.cpu() - init, want) <= bound
    # Given the log-sum-exp, the op must use it instead of its own normaliser: a shifted lse
    # scales every probability by exp(-shift).
    logits = torch.einsum("bhd,bhsd->bhs", q[:, 0].double(), k.double().repeat_interleave(H // Hkv, 1)) * scale
    logits = logits.masked_fill(torch.arange(S)[None, None] >= lens[:, None, None], float("-inf"))
    lse = (torch.logsumexp(logits, -1) + 0.5).float()
    scores2 = torch.zeros(B, I, device=device)
    ops.image_attention_scores(qd, kd, ld, sd, scores2, scale, lse.to(device), backend=backend)
    assert _max_err(scores2.cpu(), want * torch.exp(torch.tensor(-0.5, dtype=torch.float64))) <= SCORE_ATOL


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_chunk_matches_reference_and_scores_op(backend, device):
    """The fused chunk kernel's scores equal image_attention_scores on the last query (one layer)."""
    q, k, v, lens, slots = _make_case(2, 8, 2, 64, 90, 20, 9, torch.float32, seed=3)
    s_ref, s_chunk, s_op = torch.zeros(2, 20), torch.zeros(2, 20, device=device), torch.zeros(2, 20, device=device)
    ref = reference.chunk_attention_with_scores(q, k, v, lens, slots, s_ref, 0.125)
    qd, kd, vd, ld, sd = _to(device, q, k, v, lens, slots)
    out = ops.chunk_attention_with_scores(qd, kd, vd, ld, sd, s_chunk, 0.125, backend=backend)
    ops.image_attention_scores(qd[:, -1], kd, ld, sd, s_op, 0.125, backend=backend)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(s_chunk.cpu(), s_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_op, s_chunk, atol=1e-6, rtol=1e-5)


def test_cpu_argument_errors_name_the_argument():
    q, k, v, lens, slots = _make_case(1, 4, 2, 64, 20, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="k_cache"):
        ops.chunk_attention_with_scores(q, k[..., :32], v, lens, None, None, 0.1, backend="cpu")
    with pytest.raises(RuntimeError, match="seq_lens"):
        ops.chunk_attention_with_scores(q, k, v, torch.tensor([1]), None, None, 0.1, backend="cpu")
    with pytest.raises(RuntimeError, match="scores"):
        ops.image_attention_scores(q[:, -1], k, lens, slots, torch.zeros(1, 4, dtype=torch.float64), 0.1,
                                   backend="cpu")
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        ops.image_attention_scores(q[:, -1, :3], k, lens, slots, torch.zeros(1, 4), 0.1, backend="cpu")
    with pytest.raises(RuntimeError, match="k="):
        ops.select_and_feedback(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, 8),
                                torch.zeros(1, 8), 5, torch.zeros(1, 6, 8), backend="cpu")


# ------------------------------------------------------------------------------------------------
# select_and_feedback.


def _select_inputs(B, I, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Well separated: distinct multiples of 1/I, so any correct top-k is unique.
    scores = torch.stack([torch.randperm(I, generator=g) for _ in range(B)]).float() / I
    available = torch.rand(B, I, generator=g) > 0.3
    embeds = torch.randn(B, I, D, generator=g).to(dtype)
    hidden = torch.randn(B, D, generator=g).to(dtype)
    return [t.to(device) for t in (scores, available, embeds, hidden)]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("B,I,D,k", [(1, 16, 8, 3), (3, 256, 64, 32), (3, 1000, 80, 7), (2, 40, 16, 0)])
def test_select_and_feedback(B, I, D, k, dtype, backend, device):
    scores, available, embeds, hidden = _select_inputs(B, I, D, dtype, device, seed=I + k)
    avail0 = available.clone()
    out = torch.full((B, k + 1, D), float("nan"), dtype=dtype, device=device)
    idx = ops.select_and_feedback(scores.clone(), available, embeds, hidden, k, out, backend=backend)
    # Expected, by brute force on CPU.
    s = scores.cpu().masked_fill(~avail0.cpu(), -1.0)
    want = torch.stack([torch.tensor(sorted(s[b].argsort(descending=True)[:k].tolist()), dtype=torch.long)
                        for b in range(B)]) if k else torch.empty(B, 0, dtype=torch.long)
    assert idx.dtype == torch.long and idx.shape == (B, k)
    assert torch.equal(idx.cpu(), want)
    expect_avail = avail0.cpu().clone()
    if k:
        expect_avail.scatter_(1, want, False)
    assert torch.equal(available.cpu(), expect_avail)
    for b in range(B):
        assert torch.equal(out[b, :k].cpu(), embeds[b, want[b]].cpu())
    assert torch.equal(out[:, k].cpu(), hidden.cpu())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_select_and_feedback_resets_scores_and_matches_reference(backend, device):
    scores, available, embeds, hidden = _select_inputs(3, 300, 32, torch.float32, device, seed=11)
    ref_args = [t.clone().cpu() for t in (scores, available, embeds, hidden)]
    ref_out = torch.zeros(3, 9, 32)
    ref_idx = reference.select_and_feedback(*ref_args, 8, ref_out)
    out = torch.zeros(3, 9, 32, device=device)
    sc = scores.clone()
    idx = ops.select_and_feedback(sc, available, embeds, hidden, 8, out, backend=backend)
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(out.cpu(), ref_out)
    assert torch.equal(available.cpu(), ref_args[1])
    assert torch.count_nonzero(sc) == 0


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_select_and_feedback_ties_lower_index_wins(backend, device):
    # Row 0: a run of equal maxima; row 1: the best slot is unavailable and ties surround it.
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 2.0, 0.0],
                           [5.0, 3.0, 1.0, 3.0, 3.0, 1.0, 1.0, 3.0]], device=device)
    available = torch.ones(2, 8, dtype=torch.bool, device=device)
    available[1, 0] = False
    embeds = torch.arange(2 * 8 * 4, dtype=torch.float32, device=device).reshape(2, 8, 4)
    hidden = -torch.ones(2, 4, device=device)
    out = torch.zeros(2, 4, 4, device=device)
    idx = ops.select_and_feedback(scores, available, embeds, hidden, 3, out, backend=backend)
    assert idx.cpu().tolist() == [[1, 2, 3], [1, 3, 4]]
    assert available.cpu().tolist() == [[True, False, False, False, True, True, True, True],
                                         [False, False, True, False, False, True, True, True]]
    # The next step never re-picks a used slot: ties now resolve to the remaining lowest indices.
    scores2 = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 2.0, 0.0],
                            [5.0, 3.0, 1.0, 3.0, 3.0, 1.0, 1.0, 3.0]], device=device)
    idx2 = ops.select_and_feedback(scores2, available, embeds, hidden, 3, out, backend=backend)
    assert idx2.cpu().tolist() == [[0, 5, 6], [2, 5, 7]]
    assert torch.equal(out[0, :3].cpu(), embeds[0, [0, 5, 6]].cpu())


# ------------------------------------------------------------------------------------------------
# mixed_linear: fp32 activations x bf16 weights in packed panels (CPU kernel), against a float64 matmul.

needs_cpu = pytest.mark.skipif("cpu" not in BACKEND_IDS, reason="lvr_engine._C not built")


def test_pack_mixed_weight_round_trip():
    w = torch.randn(37, 11).bfloat16()
    packed = ops.pack_mixed_weight(w)
    assert packed.shape == (3, 11, 16) and packed.dtype == torch.bfloat16
    assert torch.equal(reference.unpack_mixed_weight(packed, 37), w)
    assert torch.equal(packed[0, 5], w[list(reference.MIXED_PANEL_ORDER), 5])  # k-major, rows in panel order
    # rows past N are zero
    assert torch.equal(reference.unpack_mixed_weight(packed, 48)[37:], torch.zeros(11, 11, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        ops.pack_mixed_weight(w.float())


@needs_cpu
@pytest.mark.parametrize("lead,N,K", [((1,), 768, 512), ((2, 5), 7, 13), ((33,), 37, 72), ((4,), 16, 8),
                                      ((3, 1), 130, 1376), ((0,), 5, 16), ((7,), 1, 3), ((250,), 50, 300)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_mixed_linear_matches_float64(lead, N, K, with_bias):
    """Row counts cover every tile height (1..6 rows), several row blocks (250) and a partial last panel."""
    g = torch.Generator().manual_seed(N * 131 + K)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g) if with_bias else None
    y = ops.mixed_linear(x, ops.pack_mixed_weight(w), N, b, backend="cpu")
    assert y.shape == (*lead, N) and y.dtype == torch.float32
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # an fp32 matmul on the widened weight has error ~ K * eps32 * |x||w|; ours must be as good
    fp32 = torch.nn.functional.linear(x, w.float(), b)
    assert _max_err(y, want) <= 2 * _max_err(fp32, want) + 1e-6
    torch.testing.assert_close(reference.mixed_linear(x, ops.pack_mixed_weight(w), N, b), fp32)


@needs_cpu
def test_mixed_linear_strided_input_and_errors():
    x = torch.randn(6, 40)[:, ::2]  # non-contiguous rows
    w = torch.randn(9, 20).bfloat16()
    packed = ops.pack_mixed_weight(w)
    want = torch.nn.functional.linear(x.double(), w.double())
    assert _max_err(ops.mixed_linear(x, packed, 9, backend="cpu"), want) < 1e-4
    with pytest.raises(RuntimeError, match="K=20"):
        ops.mixed_linear(torch.randn(3, 21), packed, 9, backend="cpu")
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.mixed_linear(torch.randn(3, 20).bfloat16(), packed, 9, backend="cpu")
    with pytest.raises(RuntimeError, match="packed weight must be bfloat16"):
        ops.mixed_linear(torch.randn(3, 20), packed.float(), 9, backend="cpu")
    with pytest.raises(RuntimeError, match="pack_mixed_weight"):
        ops.mixed_linear(torch.randn(3, 20), w, 9, backend="cpu")
    with pytest.raises(RuntimeError, match="out_features=17"):
        ops.mixed_linear(torch.randn(3, 20), packed, 17, backend="cpu")
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.mixed_linear(torch.randn(3, 20), packed, 9, torch.randn(8), backend="cpu")


@needs_cpu
@pytest.mark.parametrize("B,C,H,Hkv,D", [(1, 1, 8, 2, 64), (3, 33, 4, 2, 16), (2, 5, 2, 1, 6)])
def test_rope_write_kv_equals_the_torch_glue_bitwise(B, C, H, Hkv, D):
    """Same bits as the unfused path (and HF's rotation order): q out, k/v written at each row's own slots into a
    strided layer view of a 5-D cache, everything else in the cache untouched."""
    g = torch.Generator().manual_seed(B * 100 + C)
    qkv = torch.randn(B, C, (H + 2 * Hkv) * D, generator=g)
    pos = torch.randn(B, C, D, generator=g)
    cos, sin = pos.cos()[:, :, None], pos.sin()[:, :, None]
    S = C + 7
    start = torch.randint(0, S - C + 1, (B,), generator=g)
    slots = start[:, None] + torch.arange(C)[None]
    cache = torch.randn(3, B, Hkv, S, D, generator=g)
    want_k, want_v = cache.clone(), cache.clone()
    q_ref = reference.rope_write_kv(qkv, cos, sin, want_k[1], want_v[1], slots, H, Hkv)
    got_k, got_v = cache.clone(), cache.clone()
    q = ops.rope_write_kv(qkv, cos, sin, got_k[1], got_v[1], slots, H, Hkv, backend="cpu")
    assert torch.equal(q, q_ref) and torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_write_kv(qkv, cos, sin, got_k[1], got_v[1], slots + S, H, Hkv, backend="cpu")
    with pytest.raises(RuntimeError, match="not \\(H="):
        ops.rope_write_kv(qkv[..., 1:], cos, sin, got_k[1], got_v[1], slots, H, Hkv, backend="cpu")


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 33, 64), (7, 13), (2, 0, 8)])
def test_rms_norm_matches_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    y = ops.rms_norm(x, w, 1e-6, backend="cpu")
    want = reference.rms_norm(x.double(), w.double(), 1e-6)
    fp32 = reference.rms_norm(x, w, 1e-6)  # HF's ops in fp32
    assert y.shape == x.shape and _max_err(y, want) <= 2 * _max_err(fp32, want) + 1e-7
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, w[:-1], 1e-6, backend="cpu")
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(x.double(), w, 1e-6, backend="cpu")


# ------------------------------------------------------------------------------------------------
# torch.library checks of the compiled CPU ops (schema, fake kernels, mutation declarations).


@pytest.mark.skipif("cpu" not in BACKEND_IDS, reason="lvr_engine._C not built")
def test_opcheck_cpu_ops():
    import lvr_engine.ops.compiled  # noqa: F401  (registers the fake kernels)

    lib = torch.ops.lvr_engine
    q, k, v, lens, slots = _make_case(2, 4, 2, 64, 40, 6, 3, torch.float32)
    torch.library.opcheck(lib.chunk_attention_with_scores.default, (q, k, v, lens, slots, torch.zeros(2, 6), 0.125))
    torch.library.opcheck(lib.chunk_attention_with_scores.default, (q, k, v, lens, None, None, 0.125))
    torch.library.opcheck(lib.image_attention_scores.default,
                          (q[:, -1], k, lens, slots, torch.zeros(2, 6), 0.125, None))
    scores, available, embeds, hidden = _select_inputs(2, 30, 8, torch.float32, "cpu")
    torch.library.opcheck(lib.select_and_feedback.default, (scores, available, embeds, hidden, 4, torch.zeros(2, 5, 8)))
    packed = ops.pack_mixed_weight(torch.randn(6, 24).bfloat16())
    torch.library.opcheck(lib.mixed_linear.default, (torch.randn(5, 24), packed, 6, torch.randn(6)))
    kc, vc = torch.zeros(2, 1, 9, 4), torch.zeros(2, 1, 9, 4)
    torch.library.opcheck(lib.rope_write_kv.default, (torch.randn(2, 3, 16), torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                                      kc, vc, torch.tensor([[0, 1, 2], [4, 5, 6]]), 2, 1))
    torch.library.opcheck(lib.rms_norm.default, (torch.randn(3, 5, 16), torch.randn(16), 1e-6))


# ------------------------------------------------------------------------------------------------
# Triton under the interpreter (tiny shapes; a subprocess sets TRITON_INTERPRET=1 before import).

# Tiny: the interpreter is slow. Covers decode (C=1), GQA, an odd D and a chunk wider than a key tile.
TRITON_CASES = [(1, 2, 2, 16, 12, 4, 1), (2, 4, 2, 16, 20, 5, 3), (1, 4, 1, 20, 45, 6, 33)]


def _triton_importable():
    try:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(IN_TRITON_INTERP or HAS_CUDA or not _triton_importable(),
                    reason="runs the interpreter subprocess only from a normal CPU session")
def test_triton_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton_interp_", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


needs_interp = pytest.mark.skipif(not IN_TRITON_INTERP, reason="only inside the TRITON_INTERPRET=1 subprocess")


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_interp_chunk_and_scores(case, dtype):
    from lvr_engine.ops import triton as tri

    assert tri.is_available()
    B, H, Hkv, D, S, I, C = case
    q, k, v, lens, slots = _make_case(B, H, Hkv, D, S, I, C, dtype, seed=5)
    scale = D**-0.5
    out64, last64 = _attention64(q, k, v, lens, scale)
    out_same, _ = _attention64(q, k, v, lens, scale, dtype=dtype)
    scores = torch.zeros(B, I)
    out = tri.chunk_attention_with_scores(q, k, v, lens, slots, scores, scale)
    assert out.dtype == dtype
    assert _max_err(out, out64) <= 2 * _max_err(out_same, out64) + FLOOR[dtype]
    assert _max_err(scores, _gather(last64, slots)) <= SCORE_ATOL
    s2 = torch.zeros(B, I)
    tri.image_attention_scores(q[:, -1], k, lens, slots, s2, scale)
    assert _max_err(s2, _gather(last64, slots)) <= SCORE_ATOL
    # With a given log-sum-exp shifted by 0.5, every probability scales by exp(-0.5).
    logits = torch.einsum("bhd,bhsd->bhs", q[:, -1].double(), k.double().repeat_interleave(H // Hkv, 1)) * scale
    logits = logits.masked_fill(torch.arange(S)[None, None] >= lens[:, None, None].long(), float("-inf"))
    s3 = torch.zeros(B, I)
    tri.image_attention_scores(q[:, -1], k, lens, slots, s3, scale, (torch.logsumexp(logits, -1) + 0.5).float())
    assert _max_err(s3, _gather(last64, slots) * torch.exp(torch.tensor(-0.5, dtype=torch.float64))) <= SCORE_ATOL


@needs_interp
@pytest.mark.parametrize("k", [0, 3])
def test_triton_interp_select(k):
    from lvr_engine.ops import triton as tri

    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 2.0, 0.0], [5.0, 3.0, 1.0, 3.0, 3.0, 1.0, 1.0, 3.0]])
    available = torch.ones(2, 8, dtype=torch.bool)
    available[1, 0] = False
    embeds = torch.randn(2, 8, 4)
    hidden = torch.randn(2, 4)
    args = [t.clone() for t in (scores, available, embeds, hidden)]
    ref_out, out = torch.zeros(2, k + 1, 4), torch.zeros(2, k + 1, 4)
    ref_idx = reference.select_and_feedback(*args, k, ref_out)
    idx = tri.select_and_feedback(scores, available, embeds, hidden, k, out)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out, ref_out)
    assert torch.equal(available, args[1])
    assert torch.count_nonzero(scores) == 0
