"""Engine vs baselines on the same model and inputs, one process (``pytest benchmarks/ --benchmark-only``).

Contenders, all answering the same question(s) with N=3 latent steps of K=32 patches and 8 answer tokens:
  (a) ``published``     the published IVT-LR algorithm (benchmarks/baselines.py), batch 1;
  (b) ``cached_eager``  the same algorithm in careful plain transformers (KV cache, attentions only where
                        needed), batch 1;
  (c) ``explicit_cot``  ``model.generate`` of a 128-token rationale + 8 answer tokens, batch 1;
  (d) ``lvr_b{1,8,32}`` lvr_engine LatentGenerator at batch 1, 8, 32 (per question = call time / batch), and
      ``lvr_plain_b1``  the same engine with num_latent_steps=0 (plain decoding, same prompt, 8 tokens).
``test_latent_vs_plain_paired`` also times the batch-1 latent run and the plain run in alternating pairs (the
median per-pair ratio: robust to the machine drifting between the two separate benchmarks).
Groups are per model (``small-fp32``, ``small-bf16``, ``7b-bf16`` on CUDA only) so contenders sit side by side;
``extra_info`` carries per-question seconds and the ratio to lvr batch 1. The final ratio table is printed by
benchmarks/conftest.py at the end of the session.

Rounds: each benchmark makes one timed warm-up call (not counted), then ``rounds`` = as many as fit in
``LVR_BENCH_BUDGET_S`` seconds (default 20) per benchmark, at least 1 and at most the contender's cap
(9 for lvr batch 1 and the plain run, 5 for lvr batch 8, 3 for the others); lvr batch 32 runs one round without
a warm-up call. This keeps the whole suite near 10 minutes on the 2-core CPU.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from benchmarks.baselines import cached_eager_latent_generate, explicit_cot_generate, published_latent_generate
from benchmarks.conftest import (
    ANSWER_TOKENS,
    COT_RATIONALE,
    IMAGE_TOKEN,
    K_PATCHES,
    MODELS,
    N_LATENT,
    RESULTS,
    model_device,
    per_question,
    record,
)
from lvr_engine import LatentConfig, LatentGenerator

BUDGET_S = float(os.environ.get("LVR_BENCH_BUDGET_S", "20"))

# contender -> (batch size, max rounds). lvr_b1 first: the others' ratios are relative to it.
CONTENDERS = {
    "lvr_b1": (1, 9),
    "lvr_plain_b1": (1, 9),
    "lvr_b8": (8, 5),
    "lvr_b32": (32, 3),
    "cached_eager": (1, 3),
    "explicit_cot": (1, 3),
    "published": (1, 3),
}
# one call of these takes minutes in bf16 on a 2-core CPU: a single round, no separate warm-up call
NO_WARMUP = {"lvr_b32"}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _on(batch, dev):
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _make_call(model, model_key, contender, bench_inputs):
    """A zero-argument callable running one contender once, and a function turning its last result into
    (question-0 tokens, question-0 selections) for the agreement check."""
    dev = model_device(model_key)
    B, _ = CONTENDERS[contender]
    batch, pieces = bench_inputs(model_key, B)
    last = {}
    if contender.startswith("lvr"):
        n = 0 if contender == "lvr_plain_b1" else N_LATENT
        gen = LatentGenerator(model, LatentConfig(num_latent_steps=n, num_selected_patches=K_PATCHES))
        inputs = _on(batch, dev)

        def call():
            out = gen.generate(**inputs, max_new_tokens=ANSWER_TOKENS, eos_token_id=[])
            _sync(dev)
            assert out.sequences.shape == (B, ANSWER_TOKENS)
            last["out"] = out
            return out

        def answer():
            out = last["out"]
            return out.sequences[0].tolist(), out.selected[0].cpu().tolist()
        return call, (answer if n else None)

    if contender in ("published", "cached_eager"):
        fn = published_latent_generate if contender == "published" else cached_eager_latent_generate
        ids, pv, thw = (t.to(dev) for t in pieces[0])

        def call():
            # factory calls inside the baselines (arange, tensor, zeros) land on the model's device
            with torch.device(dev):
                toks, sel = fn(model, ids, pixel_values=pv, image_grid_thw=thw, num_latent_steps=N_LATENT,
                               num_selected_patches=K_PATCHES, max_new_tokens=ANSWER_TOKENS, eos_token_id=None)
            _sync(dev)
            assert len(toks) == ANSWER_TOKENS
            last["out"] = (toks, sel)
            return toks, sel

        def answer():
            toks, sel = last["out"]
            return list(toks), sel.cpu().tolist()
        return call, answer

    if contender == "explicit_cot":
        inputs = _on(batch, dev)
        n = COT_RATIONALE + ANSWER_TOKENS

        def call():
            out = explicit_cot_generate(model, inputs, n)
            _sync(dev)
            assert out.shape == (B, n)
            return out
        return call, None
    raise ValueError(contender)


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("model_key", list(MODELS))
def test_engine(benchmark, bench_model, bench_inputs, model_key, contender):
    model = bench_model(model_key)           # skips 7b without CUDA before anything is allocated
    B, max_rounds = CONTENDERS[contender]
    call, answer = _make_call(model, model_key, contender, bench_inputs)

    if contender in NO_WARMUP:
        warm, rounds = None, 1
    else:
        t0 = time.perf_counter()
        call()                              # warm-up round (not counted); sizes the number of rounds
        warm = time.perf_counter() - t0
        rounds = max(1, min(max_rounds, int(BUDGET_S // max(warm, 1e-6))))

    benchmark.group = f"engine {model_key}"
    benchmark.name = f"{contender} [{model_key}]"
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)

    batch, _ = bench_inputs(model_key, B)
    S, n_img = batch["input_ids"].shape[1], int((batch["input_ids"][0] == IMAGE_TOKEN).sum())
    median = benchmark.stats.stats.median
    record(model_key, contender, median, B, rounds)
    if answer is not None:
        RESULTS["tokens"].setdefault(model_key, {})[contender] = answer()
    pq = median / B
    ref = per_question(model_key, "lvr_b1")
    benchmark.extra_info.update(
        model=model_key, batch_size=B, rounds=rounds, per_question_s=pq, warmup_s=warm,
        ratio_vs_lvr_b1=(pq / ref) if ref else None,
        workload=f"prompt {S} tokens ({n_img} image), N={N_LATENT}, K={K_PATCHES}, {ANSWER_TOKENS} answer tokens"
                 + (f", explicit CoT {COT_RATIONALE}+{ANSWER_TOKENS} tokens" if contender == "explicit_cot" else ""))


@pytest.mark.parametrize("model_key", list(MODELS))
def test_latent_vs_plain_paired(benchmark, bench_model, bench_inputs, model_key):
    """latent/plain measured in alternating pairs: each round runs the batch-1 latent run and the plain run (N=0)
    back to back (which goes first alternates), and the ratio is the median of the per-pair ratios. The separate
    lvr_b1 / lvr_plain_b1 benchmarks run minutes apart, and this VM's speed drifts 10-15% in that time; a pair
    sees the same machine state."""
    model = bench_model(model_key)
    dev = model_device(model_key)
    batch, _ = bench_inputs(model_key, 1)
    inputs = _on(batch, dev)
    gens = {n: LatentGenerator(model, LatentConfig(num_latent_steps=n, num_selected_patches=K_PATCHES))
            for n in (N_LATENT, 0)}
    times = {N_LATENT: [], 0: []}

    def timed(n):
        t0 = time.perf_counter()
        out = gens[n].generate(**inputs, max_new_tokens=ANSWER_TOKENS, eos_token_id=[])
        _sync(dev)
        times[n].append(time.perf_counter() - t0)
        assert out.sequences.shape == (1, ANSWER_TOKENS)

    order = [0]

    def pair():
        first, second = (N_LATENT, 0) if order[0] % 2 == 0 else (0, N_LATENT)
        order[0] += 1
        timed(first)
        timed(second)

    t0 = time.perf_counter()
    pair()  # warm-up pair (not counted); sizes the number of rounds
    warm = time.perf_counter() - t0
    for t in times.values():
        t.clear()
    benchmark.group = f"engine {model_key} paired"
    benchmark.name = f"latent+plain pair [{model_key}]"
    benchmark.pedantic(pair, rounds=max(3, min(15, int(BUDGET_S // max(warm, 1e-6)))), iterations=1,
                       warmup_rounds=0)
    ratios = sorted(a / b for a, b in zip(times[N_LATENT], times[0], strict=True))
    median = statistics.median(ratios)
    RESULTS["paired"][model_key] = dict(ratio=median, pairs=len(ratios), min=ratios[0], max=ratios[-1],
                                        latent_s=sorted(times[N_LATENT]), plain_s=sorted(times[0]))
    benchmark.extra_info.update(model=model_key, latent_over_plain_paired=median, pair_ratios=ratios)
