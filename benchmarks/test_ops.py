"""Kernel benchmarks: each fused op vs the torch reference and vs materialising the whole row.

Run: ``pytest benchmarks/test_ops.py --benchmark-only`` (groups are per op, shape and dtype, so the
ratios between providers are read off one table). Providers:
  backend   the fused op on the backend for the device ("cpu" here, "cuda"/"triton" on GPU)
  reference lvr_engine.ops.reference (plain torch, fp32 math)
  materialise  what a model without the fused op does: repeat KV heads, full-row matmul + softmax
           in the storage dtype, gather the image columns (and P @ V for the chunk op)
CPU shapes are the engine's 'small' config (8 heads, 2 KV heads, D=64, S~420, I=256); GPU shapes
(28 heads, 4 KV heads, D=128, S~1500, I~1024) are skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

import lvr_engine.ops as ops
from lvr_engine.ops import reference

HAS_CUDA = torch.cuda.is_available()
SMALL = dict(H=8, Hkv=2, D=64, S=420, I=256)
LARGE = dict(H=28, Hkv=4, D=128, S=1500, I=1024)

SHAPES = [
    pytest.param("cpu", 1, SMALL, id="cpu-small-B1"),
    pytest.param("cpu", 8, SMALL, id="cpu-small-B8"),
    pytest.param("cuda", 1, LARGE, id="gpu-large-B1",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")),
    pytest.param("cuda", 8, LARGE, id="gpu-large-B8",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
PROVIDERS = ["backend", "reference", "materialise"]


def _inputs(device, B, shape, C, dtype):
    """q (B,C,H,D), k/v (B,Hkv,S,D), lens (B,) int32 (rows end at S, S-7, ...), slots (B,I) int32."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, S, I = shape["H"], shape["Hkv"], shape["D"], shape["S"], shape["I"]
    q = torch.randn(B, C, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    lens = (S - 7 * torch.arange(B)).to(torch.int32)
    slots = (torch.arange(I, dtype=torch.int32) + 5)[None].repeat(B, 1)  # image tokens after a short prefix
    slots[:, -3:] = -1
    scores = torch.zeros(B, I)
    return [t.to(device) for t in (q, k, v, lens, slots, scores)]


def _materialise(q, k, v, lens, slots, scores, scale):
    """Full-row attention in the storage dtype, as a model without the fused kernel computes it."""
    B, C, H, D = q.shape
    S = k.shape[2]
    rep = H // k.shape[1]
    kk = k.repeat_interleave(rep, dim=1)
    logits = torch.matmul(q.transpose(1, 2), kk.transpose(-1, -2)) * scale  # (B,H,C,S)
    qslot = lens.long()[:, None] - C + torch.arange(C, device=q.device)[None]
    visible = torch.arange(S, device=q.device)[None, None] <= qslot[:, :, None]
    probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    out = None
    if v is not None:
        out = torch.matmul(probs, v.repeat_interleave(rep, dim=1)).transpose(1, 2)
    last = probs[:, :, -1].float().sum(1)
    g = torch.gather(last, 1, slots.long().clamp(min=0))
    scores += torch.where(slots >= 0, g, torch.zeros_like(g))
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [33, 1], ids=["C33", "C1"])
@pytest.mark.parametrize("device,B,shape", SHAPES)
def test_chunk_attention_with_scores(benchmark, device, B, shape, C, dtype, provider):
    q, k, v, lens, slots, scores = _inputs(device, B, shape, C, dtype)
    scale = shape["D"] ** -0.5
    benchmark.group = f"chunk_attention_with_scores {device} B={B} C={C} {str(dtype)[6:]}"
    if provider == "backend":
        fn = lambda: ops.chunk_attention_with_scores(q, k, v, lens, slots, scores, scale)  # noqa: E731
    elif provider == "reference":
        fn = lambda: reference.chunk_attention_with_scores(q, k, v, lens, slots, scores, scale)  # noqa: E731
    else:
        fn = lambda: _materialise(q, k, v, lens, slots, scores, scale)  # noqa: E731

    def run():
        out = fn()
        _sync(device)
        return out

    out = benchmark(run)
    assert out.shape == q.shape


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,B,shape", SHAPES)
def test_image_attention_scores(benchmark, device, B, shape, dtype, provider):
    q, k, _v, lens, slots, scores = _inputs(device, B, shape, 1, dtype)
    scale = shape["D"] ** -0.5
    benchmark.group = f"image_attention_scores {device} B={B} {str(dtype)[6:]}"
    if provider == "backend":
        fn = lambda: ops.image_attention_scores(q[:, 0], k, lens, slots, scores, scale)  # noqa: E731
    elif provider == "reference":
        fn = lambda: reference.image_attention_scores(q[:, 0], k, lens, slots, scores, scale)  # noqa: E731
    else:
        fn = lambda: _materialise(q, k, None, lens, slots, scores, scale)  # noqa: E731

    def run():
        fn()
        _sync(device)

    benchmark(run)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("provider", ["backend", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,B,shape", SHAPES)
def test_select_and_feedback(benchmark, device, B, shape, dtype, provider):
    I, K, D = shape["I"], 32, shape["D"] * shape["H"]  # embeddings live in the model width H*D
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(B, I, generator=g).to(device)
    embeds = torch.randn(B, I, D, generator=g).to(dtype).to(device)
    hidden = torch.randn(B, D, generator=g).to(dtype).to(device)
    out = torch.empty(B, K + 1, D, dtype=dtype, device=device)
    impl = ops.select_and_feedback if provider == "backend" else reference.select_and_feedback
    benchmark.group = f"select_and_feedback {device} B={B} I={I} k={K} {str(dtype)[6:]}"

    def setup():
        # Fresh availability each round: selection consumes slots.
        return (scores.clone(), torch.ones(B, I, dtype=torch.bool, device=device), embeds, hidden, K, out), {}

    def run(*args):
        idx = impl(*args)
        _sync(device)
        return idx

    idx = benchmark.pedantic(run, setup=setup, rounds=200, warmup_rounds=5)
    assert idx.shape == (B, K)


# ------------------------------------------------------------------------------------------------
# mixed_linear: how the engine computes a bf16 model in fp32 on a CPU without native bf16.

SMALL_MATS = [(768, 512), (512, 512), (2752, 512), (512, 1376)]  # one 'small' layer: qkv, o, gate_up, down


@pytest.mark.parametrize("provider", ["mixed_packed_bf16", "fp32_copy", "bf16_native"])
@pytest.mark.parametrize("M", [1, 33, 264, 960], ids=lambda m: f"M{m}")
def test_mixed_linear_small_decoder(benchmark, M, provider):
    """One forward's matrices of the 'small' decoder (8 layers, distinct weights, so they stream from memory as in
    the engine) for M rows: decode (1), a latent step (33), a batch-8 latent step (264), a prefill group (960).
    Providers: ops.mixed_linear on packed bf16 panels (the engine), F.linear on an fp32 copy (the previous
    engine), F.linear in bf16 (torch's emulated bf16 on this CPU)."""
    if provider == "mixed_packed_bf16" and "cpu" not in ops.available_backends()["cpu"]:
        pytest.skip("lvr_engine._C not built")
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(n, k, generator=g).bfloat16() for _ in range(8) for n, k in SMALL_MATS]
    xs = {k: torch.randn(M, k, generator=g) for k in (512, 1376)}
    if provider == "mixed_packed_bf16":
        ws = [(ops.pack_mixed_weight(w), w.shape[0]) for w in mats]

        def run():
            return [ops.mixed_linear(xs[p.shape[1]], p, n) for p, n in ws]
    elif provider == "fp32_copy":
        ws = [w.float() for w in mats]

        def run():
            return [torch.nn.functional.linear(xs[w.shape[1]], w) for w in ws]
    else:
        xb = {k: v.bfloat16() for k, v in xs.items()}

        def run():
            return [torch.nn.functional.linear(xb[w.shape[1]], w) for w in mats]
    benchmark.group = f"mixed_linear cpu 'small' decoder matrices M={M}"
    rounds = 20 if M <= 33 else 5 if provider != "bf16_native" else 2
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
