"""The official IVT-LR selection order and score precision, on every ops backend.

* ``patch_order="official"``: the same K patches as ``"ascending"``, fed in the order CUDA
  ``topk(sorted=False)`` returns them (what the official code feeds): those scoring strictly above the K-th best
  in ascending index order, then those tied with it, ascending. Checked against a plain-Python simulation.
* ``prob_dtype``: the score ops round each per-head probability to bf16 / fp16 before adding it into the fp32
  scores (eager attention in a bf16 model); checked against float64 probabilities rounded with ``.to(dtype)``.
* ``mean_scores_in_dtype``: the mean over layers x heads rounded to the model dtype.

Triton runs under TRITON_INTERPRET=1 in a subprocess (as in test_ops.py), on tiny shapes.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import lvr_engine.ops as ops
from lvr_engine.ops import reference

IN_TRITON_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _backends():
    """(backend, device) pairs to run: the torch reference everywhere, the compiled CPU kernels when built, the
    CUDA and Triton kernels on a GPU, and Triton on CPU inside the interpreter subprocess."""
    have = ops.available_backends()
    out = [("torch", "cpu")]
    if "cpu" in have["cpu"]:
        out.append(("cpu", "cpu"))
    if HAS_CUDA:
        out += [(b, "cuda") for b in ("cuda", "triton") if b in have["cuda"]]
    if IN_TRITON_INTERP:  # the interpreter subprocess tests Triton only
        out = [("triton", "cpu")]
    return out


BACKENDS = _backends()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


# ------------------------------------------------------------------------------------------------
# patch_order="official"


def _simulate_official(scores, available, k):
    """Independent plain-Python selection of one row: (ascending idx, official idx).

    The K chosen: the K largest available scores, ties at the K-th score to the lower index. The official order,
    as CUDA topk(sorted=False) hands them out: a first pass over the image tokens in index order emits the chosen
    ones scoring strictly above the K-th best, a second pass emits the chosen ones equal to it.
    """
    cand = [i for i in range(len(scores)) if available[i]]
    ranked = sorted(cand, key=lambda i: (-scores[i], i))
    chosen = set(ranked[:k])
    kth = scores[ranked[k - 1]] if k else None
    first = [i for i in range(len(scores)) if i in chosen and scores[i] > kth]
    second = [i for i in range(len(scores)) if i in chosen and scores[i] == kth]
    return sorted(chosen), first + second


def _tie_case():
    """Two rows with several patches above the K-th best score and more tied with it than fit in K.

    K = 5. Row 0: 9.0 at 6, 7.0 at 2 and 11, then 5.0 at 0, 4, 8, 9 (four tied, two fit): official =
    [2, 6, 11, 0, 4], ascending = [0, 2, 4, 6, 11]. Row 1: the best score (index 3) is unavailable; 3.0 above at
    10 and 1, ties of 2.0 at 0, 5, 7, 9: official = [1, 10, 0, 5, 7].
    """
    scores = torch.tensor([
        [5.0, 1.0, 7.0, 0.5, 5.0, 1.0, 9.0, 0.0, 5.0, 5.0, 1.0, 7.0],
        [2.0, 3.0, 1.0, 8.0, 0.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 0.5],
    ])
    available = torch.ones(2, 12, dtype=torch.bool)
    available[1, 3] = False
    return scores, available, 5


def _run_select(backend, device, scores, available, k, patch_order, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, I = scores.shape
    embeds = torch.randn(B, I, D, generator=g).to(device)
    hidden = torch.randn(B, D, generator=g).to(device)
    sc, av = scores.clone().to(device), available.clone().to(device)
    out = torch.full((B, k + 1, D), float("nan"), device=device)
    idx = ops.select_and_feedback(sc, av, embeds, hidden, k, out, patch_order=patch_order, backend=backend)
    return idx.cpu(), out.cpu(), av.cpu(), sc.cpu(), embeds.cpu(), hidden.cpu()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_official_order_with_ties_at_kth(backend, device):
    scores, available, k = _tie_case()
    idx, out, av, sc, embeds, hidden = _run_select(backend, device, scores, available, k, "official")
    asc, *_ = _run_select(backend, device, scores, available, k, "ascending")
    assert idx.tolist() == [[2, 6, 11, 0, 4], [1, 10, 0, 5, 7]]  # worked out by hand in _tie_case's docstring
    for b in range(2):
        want_asc, want_official = _simulate_official(scores[b].tolist(), available[b].tolist(), k)
        assert idx[b].tolist() == want_official
        assert asc[b].tolist() == want_asc
        assert sorted(idx[b].tolist()) == asc[b].tolist()  # the same K, only the order differs
        assert torch.equal(out[b, :k], embeds[b, idx[b]])  # fed in idx's order
        assert torch.equal(out[b, k], hidden[b])
        want_av = available[b].clone()
        want_av[idx[b]] = False
        assert torch.equal(av[b], want_av)
    assert torch.count_nonzero(sc) == 0


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("k", [1, 5, 13])
def test_official_order_random_ties(backend, device, k):
    """Scores on six levels (many ties everywhere), random availability: official and ascending orders against
    the simulation, row by row."""
    g = torch.Generator().manual_seed(100 + k)
    B, I = 4, 24 if IN_TRITON_INTERP else 61
    scores = torch.randint(0, 6, (B, I), generator=g).float() / 6
    available = torch.rand(B, I, generator=g) > 0.25
    available[:, :k] = True  # at least k available per row
    for order in ("official", "ascending"):
        idx, out, _, _, embeds, _ = _run_select(backend, device, scores, available, k, order, seed=k)
        for b in range(B):
            want_asc, want_official = _simulate_official(scores[b].tolist(), available[b].tolist(), k)
            assert idx[b].tolist() == (want_official if order == "official" else want_asc), (order, b)
            assert torch.equal(out[b, :k], embeds[b, idx[b]])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_official_order_without_ties_and_k0(backend, device):
    """No tie at the K-th score: every chosen patch but the K-th is above it, so official = ascending order of
    the K-1 best, then the K-th. K = 0 returns an empty selection in either order."""
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
    available = torch.ones(1, 6, dtype=torch.bool)
    idx, *_ = _run_select(backend, device, scores, available, 3, "official")
    assert idx.tolist() == [[1, 3, 5]]  # 0.9, 0.8 above the 3rd best 0.7, which is last anyway
    scores = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.2, 0.8]])
    idx, *_ = _run_select(backend, device, scores, available, 3, "official")
    assert idx.tolist() == [[3, 5, 1]]  # the 3rd best (index 1) comes after the two above it
    idx, out, *_ = _run_select(backend, device, scores, available, 0, "official")
    assert idx.shape == (1, 0) and out.shape == (1, 1, 6)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_unknown_patch_order_is_a_value_error(backend, device):
    scores, available, k = _tie_case()
    with pytest.raises(ValueError, match="patch_order"):
        _run_select(backend, device, scores, available, k, "descending")
    with pytest.raises(ValueError, match="patch_order"):
        reference.select_patches(scores.clone(), available.clone(), k, patch_order="sorted")


# ------------------------------------------------------------------------------------------------
# prob_dtype: each per-head probability rounded to the model dtype before it is summed


def _score_case(B=2, H=4, Hkv=2, D=16, S=23, I=9, C=3, seed=0):
    """q (B,C,H,D), k/v (B,Hkv,S,D) float32, lens (B,), slots (B,I) int32 (-1 pads). Short rows (S ~ 20), so the
    probabilities are large and their bf16 rounding (~0.2% relative) dwarfs fp32 rounding (~1e-7)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, H, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    lens = torch.tensor([S] + [S - 4] * (B - 1), dtype=torch.int32)
    slots = torch.stack([torch.randperm(S - 4, generator=g)[:I].sort().values for _ in range(B)]).to(torch.int32)
    slots[:, 1] = -1
    return q, k, v, lens, slots


def _rounded_score_bounds(q_last, k, lens, slots, scale, dtype):
    """float64 probabilities of the last query, per head, each rounded with ``.to(dtype)`` and summed over heads.

    Returns (lo, hi, unrounded) (B,I) float64: a kernel computes each probability in fp32, a few ulps (relative
    ~1e-6) from the float64 one, which can put it on the other side of a rounding boundary only when the float64
    probability is that close to the boundary; lo and hi round p * (1 -/+ 2e-5), so they differ only there.
    """
    B, H, D = q_last.shape
    S = k.shape[2]
    kk = k.double().repeat_interleave(H // k.shape[1], dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", q_last.double(), kk) * scale
    logits = logits.masked_fill(torch.arange(S)[None, None] >= lens.long()[:, None, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)  # (B,H,S) float64

    def at_slots(x):  # (B,H,S) -> (B,I) summed over heads, 0 at pads
        g = torch.gather(x.sum(1), 1, slots.long().clamp(min=0))
        return torch.where(slots >= 0, g, torch.zeros_like(g))

    lo = at_slots((p * (1 - 2e-5)).to(dtype).double())
    hi = at_slots((p * (1 + 2e-5)).to(dtype).double())
    return lo, hi, at_slots(p)


def _assert_within(got, lo, hi, unrounded):
    got = got.double()
    slack = 1e-6 * hi.abs() + 1e-9  # the fp32 sum over heads
    assert bool(((got >= lo - slack) & (got <= hi + slack)).all()), (got - lo).abs().max()
    # The case is sharp: the unrounded sum lies outside the rounded interval for most image tokens.
    valid = hi > 0
    outside = (unrounded < lo - slack) | (unrounded > hi + slack)
    assert outside[valid].float().mean() > 0.5


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("prob_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_image_attention_scores_round_each_probability(backend, device, prob_dtype):
    q, k, _, lens, slots = _score_case(seed=1)
    q_last, scale = q[:, -1], 0.3
    lo, hi, unrounded = _rounded_score_bounds(q_last, k, lens, slots, scale, prob_dtype)
    qd, kd, ld, sd = (t.to(device) for t in (q_last, k, lens, slots))
    scores = torch.zeros(slots.shape, device=device)
    ops.image_attention_scores(qd, kd, ld, sd, scores, scale, prob_dtype=prob_dtype, backend=backend)
    _assert_within(scores.cpu(), lo, hi, unrounded)
    # With the log-sum-exp given (the prefill path), the same rounded probabilities.
    kk = k.double().repeat_interleave(q.shape[2] // k.shape[1], dim=1)
    logits = (torch.einsum("bhd,bhsd->bhs", q_last.double(), kk) * scale).masked_fill(
        torch.arange(k.shape[2])[None, None] >= lens.long()[:, None, None], float("-inf"))
    lse = torch.logsumexp(logits, -1).float().to(device)
    s2 = torch.zeros(slots.shape, device=device)
    ops.image_attention_scores(qd, kd, ld, sd, s2, scale, lse, prob_dtype=prob_dtype, backend=backend)
    _assert_within(s2.cpu(), lo, hi, unrounded)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("prob_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunk_attention_rounds_scores_not_output(backend, device, prob_dtype):
    q, k, v, lens, slots = _score_case(seed=2)
    scale = 0.3
    lo, hi, unrounded = _rounded_score_bounds(q[:, -1], k, lens, slots, scale, prob_dtype)
    qd, kd, vd, ld, sd = (t.to(device) for t in (q, k, v, lens, slots))
    s_round, s_plain = torch.zeros(slots.shape, device=device), torch.zeros(slots.shape, device=device)
    out_round = ops.chunk_attention_with_scores(qd, kd, vd, ld, sd, s_round, scale, prob_dtype=prob_dtype,
                                                backend=backend)
    out_plain = ops.chunk_attention_with_scores(qd, kd, vd, ld, sd, s_plain, scale, backend=backend)
    _assert_within(s_round.cpu(), lo, hi, unrounded)
    assert torch.equal(out_round, out_plain)  # only the scores change
    assert not torch.equal(s_round, s_plain)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_prob_dtype_none_and_float32_do_not_round(backend, device):
    q, k, _, lens, slots = _score_case(seed=3)
    qd, kd, ld, sd = (t.to(device) for t in (q[:, -1], k, lens, slots))
    a, b = torch.zeros(slots.shape, device=device), torch.zeros(slots.shape, device=device)
    ops.image_attention_scores(qd, kd, ld, sd, a, 0.3, backend=backend)
    ops.image_attention_scores(qd, kd, ld, sd, b, 0.3, prob_dtype=torch.float32, backend=backend)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prob_dtype"):
        ops.image_attention_scores(qd, kd, ld, sd, b, 0.3, prob_dtype=torch.float64, backend=backend)


def test_mean_scores_in_dtype():
    """The official mean over layers x heads in the model dtype: (sum / n) rounded to bf16, back in fp32."""
    g = torch.Generator().manual_seed(4)
    sums = torch.rand(3, 50, generator=g) * 7
    got = ops.mean_scores_in_dtype(sums, 28 * 12, torch.bfloat16)
    assert got.dtype == torch.float32
    assert torch.equal(got, got.to(torch.bfloat16).float())  # every mean is a bf16 value
    want = torch.tensor([[float(torch.tensor(x / 336, dtype=torch.float64).to(torch.bfloat16)) for x in row]
                         for row in sums.double().tolist()], dtype=torch.float64)
    # float32 division then bf16 vs float64 division then bf16: equal except at a rounding boundary (one ulp)
    assert (got.double() == want).float().mean() > 0.98
    assert bool(((got.double() - want).abs() <= want.abs() * 2 ** -7).all())
    assert torch.equal(ops.mean_scores_in_dtype(sums, 336, None), sums / 336)


@pytest.mark.skipif("cpu" not in ops.available_backends()["cpu"], reason="lvr_engine._C not built")
def test_opcheck_new_schema_arguments():
    import lvr_engine.ops.compiled  # noqa: F401  (registers the fake kernels)

    lib = torch.ops.lvr_engine
    q, k, v, lens, slots = _score_case()
    torch.library.opcheck(lib.chunk_attention_with_scores.default, (q, k, v, lens, slots, torch.zeros(2, 9), 0.3, 1))
    torch.library.opcheck(lib.image_attention_scores.default, (q[:, -1], k, lens, slots, torch.zeros(2, 9), 0.3,
                                                               None, 2))
    scores, available, _ = _tie_case()
    torch.library.opcheck(lib.select_and_feedback.default, (scores, available, torch.randn(2, 12, 4),
                                                            torch.randn(2, 4), 5, torch.zeros(2, 6, 4), True))
    with pytest.raises(RuntimeError, match="prob_rounding"):
        lib.image_attention_scores(q[:, -1], k, lens, slots, torch.zeros(2, 9), 0.3, None, 3)


# ------------------------------------------------------------------------------------------------
# Triton under the interpreter: this file again in a subprocess with TRITON_INTERPRET=1 (BACKENDS = triton).


@pytest.mark.skipif(IN_TRITON_INTERP or HAS_CUDA or importlib.util.find_spec("triton") is None,
                    reason="runs the interpreter subprocess only from a normal CPU session")
def test_triton_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
