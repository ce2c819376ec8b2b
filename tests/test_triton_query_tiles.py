"""Triton chunk attention on chunks longer than one query block (128 queries): the queries run as several blocks,
one program each, against a float64 torch reference of causal chunk attention and the last query's image scores.

On CPU the Triton cases run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported and must not leak into other tests), with a tiny head dim and few keys so the interpreter stays fast; on
a CUDA machine the same cases run on the GPU (``cuda`` marker).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

IN_TRITON_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (B, H, Hkv, D, keys before the chunk in the last row, I, C): C = 128 is one full block, 130 two blocks (the
# second with 2 queries), 257 three (the last with 1); each row has 5 more keys than the next.
CASES = [(2, 2, 1, 8, 6, 5, 128), (2, 2, 1, 8, 6, 5, 130), (2, 4, 2, 12, 3, 7, 257)]


def _case(B, H, Hkv, D, extra, I, C, dtype, device, seed=0):
    """q (B,C,H,D); k, v (B,Hkv,S,D) with row b valid on [0, lens[b]) and holding the chunk at its end
    (lens[b] - C >= 0); slots (B,I) int32 of image keys: prompt positions, one -1 pad, one past the row's length."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([C + extra + 5 * (B - 1 - b) for b in range(B)], dtype=torch.int32)
    S = int(lens.max()) + 3
    q = torch.randn(B, C, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(int(n), generator=g)[:I] for n in lens]).to(torch.int32)
    slots[0, 1] = -1
    slots[1, 2] = int(lens[1]) + 1  # past the row's keys: never scored
    return [t.to(device) for t in (q, k, v, lens, slots)]


def _reference(q, k, v, lens, slots, scale):
    """float64: out (B,C,H,D) of causal chunk attention (query c at slot lens[b]-C+c sees keys [0, slot]) and the
    image scores (B,I) = sum over heads of the last query's softmax probability on each valid slot."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    lens, slots = lens.long().cpu(), slots.long().cpu()
    B, C, H, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, C, H, D, dtype=torch.float64)
    scores = torch.zeros(slots.shape, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        kk = k[b, :, :L].repeat_interleave(group, 0)  # (H, L, D)
        vv = v[b, :, :L].repeat_interleave(group, 0)
        logits = torch.einsum("chd,hld->hcl", q[b], kk) * scale
        qslot = L - C + torch.arange(C)
        logits = logits.masked_fill(torch.arange(L)[None, None, :] > qslot[None, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (H, C, L)
        out[b] = torch.einsum("hcl,hld->chd", probs, vv)
        last = probs[:, -1].sum(0)  # (L,)
        for i, s in enumerate(slots[b].tolist()):
            if 0 <= s < L:
                scores[b, i] = last[s]
    return out, scores


def _check(case, dtype, device):
    from lvr_engine.ops import triton as tri

    assert tri.is_available()
    B, H, Hkv, D, extra, I, C = case
    q, k, v, lens, slots = _case(B, H, Hkv, D, extra, I, C, dtype, device, seed=C)
    scale = D ** -0.5
    want_out, want_scores = _reference(q, k, v, lens, slots, scale)
    scores = torch.zeros(B, I, device=device)
    out = tri.chunk_attention_with_scores(q, k, v, lens, slots, scores, scale)
    assert out.shape == (B, C, H, D) and out.dtype == dtype
    # fp32 inputs: fp32 arithmetic error only; bf16: the output's own rounding (2^-8 relative) dominates
    tol = 2e-5 if dtype == torch.float32 else 2 ** -8 * float(want_out.abs().max()) + 1e-4
    err = (out.double().cpu() - want_out).abs()
    assert float(err.max()) <= tol, f"C={C}: max error {float(err.max()):.2e} at {divmod(int(err.argmax()), H * D)}"
    assert float((scores.double().cpu() - want_scores).abs().max()) <= 2e-5
    assert scores[1, 2] == 0 and scores[0, 1] == 0  # the slot past row 1's length and the -1 pad
    # without scores the output is the same (the score pass only reads)
    again = tri.chunk_attention_with_scores(q, k, v, lens, slots, None, scale)
    assert torch.equal(again, out)


@pytest.mark.skipif(IN_TRITON_INTERP or torch.cuda.is_available() or not HAS_TRITON,
                    reason="runs the interpreter subprocess only from a normal CPU session with triton installed")
def test_triton_query_tiles_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-k", "interp_", "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.skipif(not IN_TRITON_INTERP, reason="only inside the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("case", CASES, ids=[f"C{c[-1]}" for c in CASES])
def test_interp_query_tiles(case):
    _check(case, torch.float32, "cpu")
    if case[-1] == 257:
        _check(case, torch.bfloat16, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"C{c[-1]}" for c in CASES])
def test_cuda_query_tiles(case, dtype):
    _check(case, dtype, "cuda")
