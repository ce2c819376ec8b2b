"""IVT-LR on Chameleon: the engine vs the published algorithm vs careful transformers, one process, CPU
(``pytest benchmarks/test_chameleon.py --benchmark-only``; issue #16, acceptance 3).

Model ``chameleon-small-fp32``: a random ``ChameleonForConditionalGeneration`` (text hidden 512, 8 layers, 8 heads,
8 KV heads as Chameleon-7B (no GQA), MLP 1376, q/k LayerNorms; a VQ-VAE of 3 levels, 1,024 codes; vocabulary 1,539)
in fp32, eager attention (the baselines read attention probabilities). One question = the official ScienceQA
Chameleon prompt through ``ChameleonProcessor``: BOS, the image's 1,024 tokens (128x128 pixels; Chameleon-7B's
512x512 images give 1,024 too) between its markers, the question and options, three ``<|latent|>``, the separator:
1,103 tokens. Workload: the official setup, N = 3 latent steps of K = 64 patches, then 8 answer tokens (no EOS).

Contenders (per-question seconds, median over rounds / batch):
  (a) ``published``     the official algorithm (benchmarks/chameleon_baselines.py), batch 1;
  (b) ``cached_eager``  the same algorithm in careful plain transformers (KV cache), batch 1;
  (d) ``lvr_b1`` / ``lvr_b8``  LatentGenerator with ``LatentConfig.ivtlr_chameleon()`` (lean runner) at batch 1, 8;
      ``lvr_hf_b1``     the same on the HF-module runner (the model's own layers, the engine's cache and ops);
      ``lvr_plain_b1``  the engine without latent steps (the prompt without the placeholders, 8 tokens).
Question 0's answer tokens and selections of every latent contender are recorded and compared with (a) in the
session summary (benchmarks/conftest.py). Rounds: one warm-up call, then as many as fit in ``LVR_BENCH_BUDGET_S``
(default 20) seconds per contender, at least 1, at most the contender's cap.
"""
from __future__ import annotations

import os
import time
from functools import lru_cache

import numpy as np
import pytest

from benchmarks.chameleon_baselines import cached_eager_chameleon_generate, published_chameleon_generate
from benchmarks.conftest import RESULTS, per_question, record
from lvr_engine import LatentConfig, LatentGenerator

BUDGET_S = float(os.environ.get("LVR_BENCH_BUDGET_S", "20"))
MODEL_KEY = "chameleon-small-fp32"
N_LATENT, K_PATCHES, ANSWER_TOKENS, IMAGE_SIZE = 3, 64, 8, 128
QUESTION = ("<image>[Question]:{Which property do these three objects have in common?}\n[Options]:\n(A).{hard}\n"
            "(B).{soft}\n(C).{stretchy}\nAnswer:")
CONTENDERS = {  # name -> (batch size, max rounds)
    "lvr_b1": (1, 9),
    "lvr_hf_b1": (1, 5),
    "lvr_plain_b1": (1, 9),
    "lvr_b8": (8, 3),
    "cached_eager": (1, 3),
    "published": (1, 3),
}


@lru_cache(maxsize=None)
def _setup():
    """(model, processor): the benchmark model and its processor (built once)."""
    from lvr_engine.models.tiny_chameleon import (
        build_tiny_chameleon_processor,
        build_tiny_chameleon_tokenizer,
        tiny_chameleon_config,
        tiny_chameleon_model,
    )

    tok = build_tiny_chameleon_tokenizer(num_image_codes=1024)
    proc = build_tiny_chameleon_processor(tok, image_size=IMAGE_SIZE, vq_levels=3)
    cfg = tiny_chameleon_config(tok, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                                intermediate_size=1376, image_size=IMAGE_SIZE, vq_levels=3, initializer_range=0.05)
    return tiny_chameleon_model(cfg, seed=0, attn_implementation="eager"), proc


@lru_cache(maxsize=None)
def _batch(batch_size: int, latent: bool):
    """The processor's left-padded batch of ``batch_size`` questions (the same text, different images; row 0 the
    same for every size), with the three placeholders (official layout) or without them."""
    from PIL import Image

    _, proc = _setup()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((160, 200, 3)) * 255).astype("uint8")) for _ in range(batch_size)]
    text = QUESTION + ("<|latent|>" * N_LATENT if latent else "")
    proc.tokenizer.padding_side = "left"
    enc = proc(images=images, text=[text] * batch_size, return_tensors="pt", padding=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _call(contender):
    """A zero-argument callable running ``contender`` once, and one returning question 0's (tokens, selections)."""
    model, proc = _setup()
    B, _ = CONTENDERS[contender]
    last = {}
    if contender.startswith("lvr"):
        plain = contender == "lvr_plain_b1"
        cfg = LatentConfig(num_latent_steps=0, num_selected_patches=0) if plain else LatentConfig.ivtlr_chameleon()
        gen = LatentGenerator(model, cfg, processor=proc, runner="hf" if contender == "lvr_hf_b1" else "auto")
        assert type(gen.runner).__name__ == ("HFModuleRunner" if contender == "lvr_hf_b1" else "DecoderRunner")
        inputs = _batch(B, not plain)

        def call():
            out = gen.generate(**inputs, max_new_tokens=ANSWER_TOKENS, eos_token_id=[])
            assert out.sequences.shape == (B, ANSWER_TOKENS)
            last["out"] = out

        def answer():
            return last["out"].sequences[0].tolist(), last["out"].selected[0].tolist()
        return call, (None if plain else answer)

    fn = published_chameleon_generate if contender == "published" else cached_eager_chameleon_generate
    inputs = _batch(1, True)
    tok = proc.tokenizer
    ids = {"latent_id": tok.convert_tokens_to_ids("<|latent|>"), "image_id": tok.convert_tokens_to_ids("<image>")}

    def call():
        toks, sel = fn(model, inputs["input_ids"][0], inputs["pixel_values"], num_selected_patches=K_PATCHES,
                       max_new_tokens=ANSWER_TOKENS, **ids)
        assert len(toks) == ANSWER_TOKENS
        last["out"] = (toks, sel.tolist())

    return call, lambda: last["out"]


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_chameleon_engine(benchmark, contender):
    B, max_rounds = CONTENDERS[contender]
    call, answer = _call(contender)
    t0 = time.perf_counter()
    call()                                   # warm-up (not counted); sizes the number of rounds
    warm = time.perf_counter() - t0
    rounds = max(1, min(max_rounds, int(BUDGET_S // max(warm, 1e-6))))
    benchmark.group = f"engine {MODEL_KEY}"
    benchmark.name = f"{contender} [{MODEL_KEY}]"
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    record(MODEL_KEY, contender, median, B, rounds)
    if answer is not None:
        RESULTS["tokens"].setdefault(MODEL_KEY, {})[contender] = answer()
    ref = per_question(MODEL_KEY, "lvr_b1")
    S = int(_batch(1, contender != "lvr_plain_b1")["input_ids"].shape[1])
    benchmark.extra_info.update(
        model=MODEL_KEY, batch_size=B, rounds=rounds, per_question_s=median / B, warmup_s=warm,
        ratio_vs_lvr_b1=(median / B / ref) if ref else None,
        workload=f"prompt {S} tokens (1024 image), "
                 + ("no latent steps" if contender == "lvr_plain_b1" else f"N={N_LATENT}, K={K_PATCHES}")
                 + f", {ANSWER_TOKENS} answer tokens")
