"""The engine with ``LatentConfig.ivtlr_chameleon()`` vs the official IVT-LR Chameleon inference (issue #16,
acceptance 1).

``official_ivtlr_chameleon.py`` re-implements FYYDCC/IVT-LR's ``chameleon_ivtlr.py`` + ``infer_chameleon_scienceqa.py``
inference on transformers' own Chameleon modules (VQ image tokens, eager attention, whole sequence re-run per
latent pass, CUDA ``topk(sorted=False)`` order, the separator fed after the latent passes, EOS never checked on the
first answer token). Prompts are built as the official script builds them: ``"<image>[Question]:{...}\\n[Options]:
\\n(A).{...}\\nAnswer:" + "<|latent|>" * 3`` through ``ChameleonProcessor`` (BOS, image markers, separator). The
engine gets the same prompts (it consumes the placeholders and the separator and feeds the separator after the
latent steps) or the prompts without the placeholders and the separator (it runs the steps after the prompt, then
the separator as its end marker), batched with rows of different lengths, left or right padded; every row must give
the reference's tokens and selections (``out.selected``: 0-based image-token indices, in the order they were fed).

The tiny models have random q/k LayerNorm weights and biases, and a random VQ-VAE: 32x32 images -> 64 image tokens
(K = 4 or 8), and one case at the official sizes, 128x128 -> 1,024 image tokens with K = 64.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from official_ivtlr import OfficialResult
from official_ivtlr_chameleon import official_chameleon_generate

N_LATENT = 3
QUESTIONS = [
    "<image>[Question]:{Which shape is below the red square?}\n[Options]:\n(A).{circle}\n(B).{square}\n"
    "(C).{star}\nAnswer:",
    "<image>[Question]:{Which?}\nAnswer:",
    "<image>[Question]:{Is the blue square left of the green circle?}\n[Options]:\n(A).{yes}\n(B).{no}\nAnswer:",
    "<image>[Question]:{Count the red shapes.}\n[Options]:\n(A).{one}\n(B).{two}\n(C).{three}\n(D).{four}\nAnswer:",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def _tok():
    from lvr_engine.models.tiny_chameleon import build_tiny_chameleon_tokenizer
    return build_tiny_chameleon_tokenizer()


@functools.lru_cache(maxsize=None)
def _processor(image_size, vq_levels):
    from lvr_engine.models.tiny_chameleon import build_tiny_chameleon_processor
    return build_tiny_chameleon_processor(_tok(), image_size=image_size, vq_levels=vq_levels)


@functools.lru_cache(maxsize=None)
def _model(seed, image_size=32, vq_levels=3, qk_scale=1.0):
    """A tiny random fp32 Chameleon (eager attention). ``qk_scale`` multiplies every layer's q/k LayerNorm weight
    and bias (peaked attention: exact zero scores, ties at the K-th score)."""
    from lvr_engine.models.tiny_chameleon import tiny_chameleon_config, tiny_chameleon_model

    cfg = tiny_chameleon_config(_tok(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                image_size=image_size, vq_levels=vq_levels, initializer_range=0.08)
    model = tiny_chameleon_model(cfg, seed=seed, attn_implementation="eager")
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.mul_(qk_scale)
                    norm.bias.mul_(qk_scale)
    return model


def _ids(name):
    return _tok().convert_tokens_to_ids(name)


def _rows(questions, seed, image_size=32, vq_levels=3):
    """Per row (input_ids (S,) of the official prompt, pixel_values (1,3,H,W)), built as the official script."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    proc = _processor(image_size, vq_levels)
    rows = []
    for q in questions:
        h, w = (int(x) for x in rng.integers(image_size, 2 * image_size, 2))
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
        enc = proc(images=image, text=QUESTIONS[q] + "<|latent|>" * N_LATENT, return_tensors="pt")
        rows.append((enc["input_ids"][0], enc["pixel_values"]))
    return rows


def _batch(rows, padding_side, official_layout):
    """Pad the rows into one engine batch: the official prompts, or the prompts without ``<|latent|> x3 <sep>``."""
    ids_list = [ids if official_layout else ids[:-(N_LATENT + 1)] for ids, _ in rows]
    B, S = len(ids_list), max(len(i) for i in ids_list)
    input_ids = torch.full((B, S), _ids("<pad>"), dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, ids in enumerate(ids_list):
        span = slice(S - len(ids), S) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, span] = ids
        mask[b, span] = 1
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat([pv for _, pv in rows]))


def _reference(model, rows, K, eos, max_new, patch_order="official"):
    return [official_chameleon_generate(model, ids, pv, latent_token_id=_ids("<|latent|>"),
                                        image_token_id=_ids("<image>"), num_selected_patches=K, eos_token_id=eos,
                                        max_new_tokens=max_new, patch_order=patch_order)
            for ids, pv in rows]


def _engine(model, batch, K, eos, max_new, config=None, runner="auto"):
    from lvr_engine import LatentConfig, LatentGenerator

    config = LatentConfig.ivtlr_chameleon(num_selected_patches=K) if config is None else config
    gen = LatentGenerator(model, config, processor=_tok(), runner=runner)
    out = gen.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=_ids("<pad>"))
    return gen, out


def _compare(out, ref_rows, K):
    pad = _ids("<pad>")
    assert tuple(out.selected.shape) == (len(ref_rows), N_LATENT, K), f"selected {tuple(out.selected.shape)}"
    problems = []
    for b, ref in enumerate(ref_rows):
        got, got_sel = out.sequences[b].tolist(), out.selected[b].tolist()
        toks_ok = got[:len(ref.tokens)] == ref.tokens and all(t == pad for t in got[len(ref.tokens):])
        if not toks_ok or got_sel != ref.selected:
            same_set = [sorted(s) for s in got_sel] == [sorted(s) for s in ref.selected]
            why = "same patches, another feeding order" if same_set and got_sel != ref.selected else ""
            problems.append(f"row {b}: {why}\n   engine tokens    {got}\n   official tokens  {ref.tokens}\n"
                            f"   engine selected  {got_sel}\n   official selected {ref.selected}")
    assert not problems, "engine != official IVT-LR Chameleon inference:\n" + "\n".join(problems)


def _truncate(tokens, eos):
    """The official stop rule on a run that did not stop: cut after the first EOS at index >= 1."""
    for i, t in enumerate(tokens):
        if i > 0 and t == eos:
            return tokens[: i + 1]
    return tokens


def _unused_token(free):
    """An ordinary token id no row emitted: as EOS it never stops anything."""
    seen = {t for r in free for t in r.tokens}
    return next(i for i in range(8, 300) if i not in seen)


# -- the acceptance cases -------------------------------------------------------------------------------
CASES = [  # seed, K, padding side, official layout (placeholders + separator), questions, EOS choice, runner
    (0, 4, "left", True, [0, 1, 2], "first", "auto"),
    (1, 8, "right", True, [1, 3, 0], "later", "auto"),
    (2, 8, "left", False, [2, 0, 1], "later", "auto"),
    (3, 4, "right", False, [3, 2, 1], "first", "auto"),
    (4, 8, "left", True, [1, 2, 3, 0], "first", "hf"),
    (5, 4, "right", True, [3, 1], "later", "hf"),
]


@pytest.mark.parametrize("seed,K,padding,official,questions,eos_mode,runner", CASES,
                         ids=[f"seed{c[0]}-K{c[1]}-{c[2]}-{'official' if c[3] else 'plain'}-{c[6]}" for c in CASES])
def test_engine_matches_official(seed, K, padding, official, questions, eos_mode, runner):
    model = _model(seed)
    rows = _rows(questions, seed)
    assert len({len(ids) for ids, _ in rows}) == len(rows), "fixture: rows must differ in length"
    max_new = 10 if seed % 2 else 8
    free = _reference(model, rows, K, None, max_new)
    eos = free[0].tokens[0] if eos_mode == "first" else free[1].tokens[3]
    ref = [OfficialResult(_truncate(f.tokens, eos), f.selected, f.scores) for f in free]
    if eos_mode == "first":
        assert len(ref[0].tokens) > 1, "fixture: row 0 must run past its first token (== EOS)"
    else:
        assert len(ref[1].tokens) < max_new, "fixture: row 1 must stop at EOS"
    gen, out = _engine(model, _batch(rows, padding, official), K, eos, max_new, runner=runner)
    assert type(gen.runner).__name__ == ("HFModuleRunner" if runner == "hf" else "DecoderRunner")
    _compare(out, ref, K)


def test_official_sizes_1024_tokens_k64():
    """The official sizes: 1,024 image tokens per image (Chameleon-7B: 512x512 pixels, VQ downsampling 16; here
    128x128 pixels, downsampling 4), K = 64, three steps."""
    model = _model(6, image_size=128, vq_levels=3)
    rows = _rows([0, 1], 6, image_size=128, vq_levels=3)
    assert all(int((ids == _ids("<image>")).sum()) == 1024 for ids, _ in rows)
    free = _reference(model, rows, 64, None, 6)
    eos = _unused_token(free)
    _, out = _engine(model, _batch(rows, "left", True), 64, eos, 6)
    _compare(out, free, 64)


def test_reference_stop_rule():
    """Control: the reference never checks the first token for EOS, stops after a later EOS."""
    model = _model(0)
    rows = _rows([1], 0)
    free = _reference(model, rows, 4, None, 6)[0]
    for eos in (free.tokens[0], free.tokens[2]):
        got = _reference(model, rows, 4, eos, 6)[0]
        assert got.tokens == _truncate(free.tokens, eos) and got.selected == free.selected
        assert len(got.tokens) > 1


def test_reference_ascending_matches_engine_without_presets():
    """Control: with ascending feeding and no early stop the reference is the engine's plain semantics (arange
    positions, the separator as an explicit end marker, fp32 scores, prompt without placeholders): pins the
    reference's VQ tokens, embeddings, positions, hidden-state feedback, separator and decoding independently of
    the preset."""
    from lvr_engine import LatentConfig

    K, max_new = 4, 8
    model = _model(7)
    rows = _rows([0, 3, 1], 7)
    ref = _reference(model, rows, K, None, max_new, patch_order="ascending")
    cfg = LatentConfig(num_latent_steps=N_LATENT, num_selected_patches=K, position_mode="arange",
                       end_marker_id=_ids("<reserved08706>"))
    _, out = _engine(model, _batch(rows, "right", False), K, _unused_token(ref), max_new, config=cfg)
    _compare(out, ref, K)


# -- exact ties at the K-th score ----------------------------------------------------------------------
PEAKED = 300.0  # q/k LayerNorm scale: attention logits far apart, softmax underflows to exactly 0


@pytest.mark.parametrize("seed,padding,official", [(0, "left", True), (3, "right", False)])
def test_order_with_exact_ties(seed, padding, official):
    """A peaked model: most image tokens score exactly 0 in every layer and head, so the K-th best score is tied
    and the official order (strictly-above first, then tied from the lowest index) differs from ascending."""
    K = 8
    model = _model(seed, qk_scale=PEAKED)
    rows = _rows([0, 3, 2], seed)
    ref = _reference(model, rows, K, None, 6)
    tie_and_reorder = False
    for r in ref:
        for scores, chosen in zip(r.scores, r.selected, strict=True):
            finite = scores[torch.isfinite(scores)]
            kth = sorted(finite.tolist(), reverse=True)[K - 1]
            tie_and_reorder |= int((finite == kth).sum()) > 1 and chosen != sorted(chosen)
            assert not bool(((finite > 0) & (finite < 1e-30)).any()), "fixture: a score near underflow"
    assert tie_and_reorder, "fixture: no tie at the K-th score with an official order != ascending"
    _, out = _engine(model, _batch(rows, padding, official), K, _unused_token(ref), 6)
    _compare(out, ref, K)
