"""One optimizer step at curriculum stage 3 (N=3, K=32) on the 'small' model, batch 4: lvr_engine's training forward
(one prefix pass + one K+1-position pass per latent step on the KV cache, fused score/selection ops) vs the published
training forward (every latent pass re-runs the whole prefix with eager attention and output_attentions=True).

Speed side by side with pytest-benchmark; peak memory of each in a fresh subprocess (the process's own RSS
high-water mark over the step, reset right before it with model and AdamW built; benchmarks/_rss.py).
Run: ``pytest benchmarks/test_train.py --benchmark-only -s``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B, T, N, K = 4, 24, 3, 32
MiB = 2 ** 20
_TIMES = {}


def _setup():
    from benchmarks.conftest import build_model, make_inputs

    torch.manual_seed(0)
    model = build_model("small", torch.float32).train()
    batch, pieces = make_inputs("small-fp32", B)
    g = torch.Generator().manual_seed(1)
    tgt = torch.randint(1, 2000, (B, T), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, opt, batch, pieces, tgt


def _step_lvr(model, opt, batch, pieces, tgt):
    from lvr_engine.engine.runner import DecoderRunner
    from lvr_engine.models import adapter_for
    from lvr_engine.training.latent_forward import latent_forward

    adapter = adapter_for(model)
    out = latent_forward(DecoderRunner(adapter.decoder_weights()), adapter, **batch, target_ids=tgt,
                         num_latent_steps=N, num_selected_patches=K)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def _step_published(model, opt, batch, pieces, tgt):
    from benchmarks.baselines import published_latent_train_loss

    ce, n = 0.0, 0
    for b, (ids, pv, thw) in enumerate(pieces):
        c, k = published_latent_train_loss(model, ids, tgt[b], pixel_values=pv, image_grid_thw=thw,
                                           num_latent_steps=N, num_selected_patches=K)
        ce, n = ce + c, n + k
    loss = ce / n
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


STEPS = {"lvr": _step_lvr, "published": _step_published}


def child(which: str):
    """Subprocess body: one step of ``which``; prints the peak RSS growth over the pre-step RSS as JSON."""
    from benchmarks._rss import peak_rss, reset_peak, rss

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    state = _setup()
    if not reset_peak():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs): the peak would include setup")
    base = rss()
    loss = STEPS[which](*state)
    peak = peak_rss()
    print("TRAIN_MEM " + json.dumps({"which": which, "base": base, "peak": peak, "delta": peak - base, "loss": loss}))


@pytest.fixture(scope="module")
def state():
    return _setup()


@pytest.mark.parametrize("which", ["lvr", "published"])
def test_train_step_speed(benchmark, state, which):
    benchmark.group = "train step stage 3 small fp32 batch 4"
    benchmark.pedantic(STEPS[which], args=state, rounds=2, iterations=1, warmup_rounds=1)
    _TIMES[which] = benchmark.stats.stats.median
    if len(_TIMES) == 2:
        ratio = _TIMES["published"] / _TIMES["lvr"]
        print(f"\n[train step] lvr {_TIMES['lvr']:.3f} s, published {_TIMES['published']:.3f} s -> {ratio:.2f}x faster")
        benchmark.extra_info["published_over_lvr"] = ratio


def test_train_step_memory(benchmark):
    def measure(which):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", f"from benchmarks.test_train import child; child({which!r})"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        line = [l for l in proc.stdout.splitlines() if l.startswith("TRAIN_MEM ")][-1]
        return json.loads(line[len("TRAIN_MEM "):])

    benchmark.group = "train step memory"
    res = benchmark.pedantic(lambda: {w: measure(w) for w in ("lvr", "published")}, rounds=1, iterations=1)
    ratio = res["lvr"]["delta"] / res["published"]["delta"]
    print(f"\n[train step memory] peak RSS growth: lvr {res['lvr']['delta'] / MiB:.1f} MiB, published "
          f"{res['published']['delta'] / MiB:.1f} MiB -> {ratio:.2f}x; losses {res['lvr']['loss']:.4f} / "
          f"{res['published']['loss']:.4f}")
    benchmark.extra_info.update(lvr_over_published_memory=ratio, **{f"{w}_delta": r["delta"] for w, r in res.items()})
