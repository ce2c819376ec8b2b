"""Shared builders for the engine benchmarks: the benchmark models, processor-shaped batches, and the
session-end ratio table (printed and written to ``benchmarks/.benchmarks/last_engine_results.json``,
git-ignored by the ``.benchmarks/`` rule).

Models
- ``small``: a random Qwen2-VL (text hidden 512, 8 layers, 8 heads, 2 KV heads, MLP 1376, vocab 2048; vision
  depth 2, embed 128, patch 14, merge 2); eager attention in the text decoder so the baselines can read
  attention probabilities, SDPA in the vision tower (see ATTN_IMPLEMENTATION).
  One prompt = 30 text tokens, <vision_start>, 256 image tokens (1x32x32 patches), <vision_end>, 32 text
  tokens = 320 tokens. fp32 and bf16 (the bf16 model is the fp32 one cast with ``.to(torch.bfloat16)``).
- ``7b``: Qwen2-VL-7B shapes (text hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064;
  vision depth 32, embed 1280) with random bf16 weights, 196 image tokens (1x28x28 patches). CUDA only: it is
  never allocated without a CUDA device.
"""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "tests")):   # benchmarks.baselines; tests/tiny_models (batch builder)
    if p not in sys.path:
        sys.path.insert(0, p)

from tiny_models import EOS, IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, make_batch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

RESULTS_PATH = os.path.join(HERE, ".benchmarks", "last_engine_results.json")

# The workload (IVT-LR defaults, docs/semantics.md): N latent steps of K patches, then ANSWER_TOKENS answer tokens.
N_LATENT, K_PATCHES, ANSWER_TOKENS = 3, 32, 8
COT_RATIONALE = 128                  # explicit chain of thought: 128 rationale tokens + the 8 answer tokens
TEXT_BEFORE, TEXT_AFTER = 30, 32

# model key -> (spec name, dtype, image grid in 14-px patches (h, w), needs CUDA)
MODELS = {
    "small-fp32": ("small", torch.float32, (32, 32), False),
    "small-bf16": ("small", torch.bfloat16, (32, 32), False),
    "7b-bf16": ("7b", torch.bfloat16, (28, 28), True),
}

INIT_RANGE = 0.05


def _ids():
    return dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END)


def _mrope(head_dim):
    half = head_dim // 2
    a = half // 4
    return [a, (half - a) // 2, half - a - (half - a) // 2]   # 64 -> [8, 12, 12]; 128 -> [16, 24, 24]


def model_config(spec: str):
    """The transformers Qwen2VLConfig of a benchmark model ("small" or "7b")."""
    import transformers

    if spec == "small":
        text = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=1376, vocab_size=2048, rope_theta=10000.0)
        vision = dict(depth=2, embed_dim=128, num_heads=4, hidden_size=512, mlp_ratio=4)
    elif spec == "7b":
        text = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0)
        vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584, mlp_ratio=4)
    else:
        raise ValueError(spec)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": _mrope(head_dim)}
    text_cfg = dict(text, rope_parameters=rope, max_position_embeddings=32768, initializer_range=INIT_RANGE,
                    eos_token_id=EOS, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    vision_cfg = dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
                      initializer_range=INIT_RANGE)
    cfg = transformers.Qwen2VLConfig(text_config=text_cfg, vision_config=vision_cfg, **_ids())
    cfg.initializer_range = INIT_RANGE
    cfg.text_config.initializer_range = INIT_RANGE
    return cfg


# Eager attention in the text decoder (the baselines read its attention probabilities); SDPA in the vision
# tower, which no contender needs probabilities from and which every contender runs once per question.
ATTN_IMPLEMENTATION = {"": "eager", "text_config": "eager", "vision_config": "sdpa"}


def build_model(spec: str, dtype=torch.float32, device="cpu", seed=0, init_dtype=None):
    """A random-init Qwen2VLForConditionalGeneration (text attention eager, vision SDPA), in eval mode.

    Initialised in ``init_dtype`` (default float32 on CPU, so the fp32 and bf16 'small' models hold the same
    weights up to rounding; ``dtype`` on CUDA) and then cast to ``dtype``."""
    import transformers

    if spec == "7b" and torch.device(device).type != "cuda":
        raise RuntimeError("the 7b benchmark model is only built on CUDA")
    torch.manual_seed(seed)
    init_dtype = init_dtype or (dtype if torch.device(device).type == "cuda" else torch.float32)
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration._from_config(
            model_config(spec), attn_implementation=dict(ATTN_IMPLEMENTATION), dtype=init_dtype)
    model = model.to(dtype)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(model_key: str, batch_size: int, seed: int = 0):
    """(processor-shaped batch dict, unpadded per-row pieces [(ids, pixel_values, grid)]) for ``batch_size``
    questions of the same length. Row 0 is the same question for every batch size (same seed)."""
    _, _, grid, _ = MODELS[model_key]
    return make_batch([(TEXT_BEFORE, grid, TEXT_AFTER)] * batch_size, seed=seed)


def model_available(model_key: str) -> bool:
    return not MODELS[model_key][3] or torch.cuda.is_available()


def model_device(model_key: str) -> torch.device:
    return torch.device("cuda" if MODELS[model_key][3] else "cpu")


@lru_cache(maxsize=None)
def _cached_model(model_key):
    spec, dtype, _, cuda = MODELS[model_key]
    return build_model(spec, dtype, device="cuda" if cuda else "cpu")


@pytest.fixture(scope="session")
def bench_model():
    """Session-scoped model cache: ``bench_model(model_key)`` builds each benchmark model once."""
    def get(model_key):
        if not model_available(model_key):
            pytest.skip(f"{model_key} needs CUDA")
        return _cached_model(model_key)
    yield get
    _cached_model.cache_clear()


@pytest.fixture(scope="session")
def bench_inputs():
    """``bench_inputs(model_key, batch_size)`` -> (batch dict, pieces), cached for the session."""
    cache = {}

    def get(model_key, batch_size):
        if (model_key, batch_size) not in cache:
            cache[(model_key, batch_size)] = make_inputs(model_key, batch_size)
        return cache[(model_key, batch_size)]
    return get


# ------------------------------------------------------------------------------------------------------------
# Session results and the final ratio table
# ------------------------------------------------------------------------------------------------------------
RESULTS: dict = {"engine": {}, "tokens": {}, "memory": None, "paired": {}}

CONTENDER_NAMES = {
    "lvr_b1": "(d) lvr_engine, batch 1",
    "lvr_plain_b1": "(d) lvr_engine num_latent_steps=0, batch 1",
    "lvr_b8": "(d) lvr_engine, batch 8",
    "lvr_b32": "(d) lvr_engine, batch 32",
    "lvr_hf_b1": "(d) lvr_engine HF-module runner, batch 1",
    "published": "(a) published IVT-LR algorithm, batch 1",
    "cached_eager": "(b) plain transformers + KV cache, batch 1",
    "explicit_cot": "(c) explicit CoT generate 136 tokens, batch 1",
}

# ratio name -> (numerator, denominator, target, "<=" or ">=")
RATIOS = [
    ("a/lvr1", "published", "lvr_b1", 5.0, ">="),
    ("b/lvr1", "cached_eager", "lvr_b1", 3.0, ">="),
    ("c/lvr1", "explicit_cot", "lvr_b1", None, None),
    ("latent/plain", "lvr_b1", "lvr_plain_b1", 1.3, "<="),
    ("lvr8/lvr1", "lvr_b8", "lvr_b1", 0.67, "<="),
    ("lvr32/lvr1", "lvr_b32", "lvr_b1", None, None),
]
# the acceptance targets apply to bf16 (the model the engine is tuned for)
TARGET_MODELS = ("small-bf16", "7b-bf16")


def record(model_key, contender, median_s, batch_size, rounds, stats=None):
    RESULTS["engine"].setdefault(model_key, {})[contender] = dict(
        median_s=median_s, per_question_s=median_s / batch_size, batch_size=batch_size, rounds=rounds,
        **(stats or {}))


def per_question(model_key, contender):
    r = RESULTS["engine"].get(model_key, {}).get(contender)
    return None if r is None else r["per_question_s"]


def ratio_table():
    rows = {}
    for model_key in RESULTS["engine"]:
        out = {}
        for name, num, den, target, op in RATIOS:
            a, b = per_question(model_key, num), per_question(model_key, den)
            if a is None or b is None:
                continue
            value = a / b
            entry = {"value": value}
            if target is not None and model_key in TARGET_MODELS:
                entry["target"] = f"{op} {target}"
                entry["met"] = value >= target if op == ">=" else value <= target
            out[name] = entry
        rows[model_key] = out
    return rows


def _agreement():
    """Do the contenders give the same answer tokens / selections for question 0 (per model)?"""
    out = {}
    for model_key, toks in RESULTS["tokens"].items():
        ref = toks.get("published")
        if ref is None:
            continue
        out[model_key] = {c: (t == ref) for c, t in toks.items() if c != "published"}
    return out


def pytest_terminal_summary(terminalreporter):
    if not RESULTS["engine"] and RESULTS["memory"] is None and not RESULTS["paired"]:
        return
    tr = terminalreporter
    ratios = ratio_table()
    tr.section("lvr_engine benchmark summary")
    for model_key, res in RESULTS["engine"].items():
        tr.write_line(f"[{model_key}] per-question seconds (median over rounds / batch size)")
        for c, name in CONTENDER_NAMES.items():
            if c in res:
                r = res[c]
                tr.write_line(f"  {name:<48s} {r['per_question_s']:9.4f} s   (call {r['median_s']:.4f} s, "
                              f"{r['rounds']} rounds)")
        tr.write_line(f"[{model_key}] ratios (per-question time)")
        for name, entry in ratios.get(model_key, {}).items():
            verdict = ""
            if "target" in entry:
                verdict = f"   target {entry['target']}: {'met' if entry['met'] else 'NOT met'}"
            tr.write_line(f"  {name:<14s} {entry['value']:8.2f}x{verdict}")
    for model_key, p in RESULTS["paired"].items():
        verdict = ""
        if model_key in TARGET_MODELS:
            verdict = f"   target <= 1.3: {'met' if p['ratio'] <= 1.3 else 'NOT met'}"
        tr.write_line(f"[{model_key}] latent/plain in alternating pairs: median {p['ratio']:.2f}x over {p['pairs']} "
                      f"pairs (range {p['min']:.2f}-{p['max']:.2f}){verdict}")
    agree = _agreement()
    for model_key, a in agree.items():
        tr.write_line(f"[{model_key}] question-0 answer tokens + selections equal to (a): "
                      + ", ".join(f"{c}={'yes' if v else 'NO'}" for c, v in a.items()))
    if RESULTS["memory"] is not None:
        m = RESULTS["memory"]
        tr.write_line("[memory] " + m["summary"])
    os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
    payload = dict(engine=RESULTS["engine"], ratios=ratios, paired=RESULTS["paired"], agreement=agree,
                   memory=RESULTS["memory"],
                   torch=torch.__version__, threads=torch.get_num_threads())
    with open(RESULTS_PATH, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    tr.write_line(f"results written to {os.path.relpath(RESULTS_PATH, ROOT)}")
