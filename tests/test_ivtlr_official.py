"""The engine with ``LatentConfig.ivtlr()`` vs the official IVT-LR inference (issue #12, acceptance 1).

``official_ivtlr.py`` is an independent re-implementation of FYYDCC/IVT-LR's ``qwen_ivtlr.py`` +
``infer.py`` inference on transformers' own Qwen2-VL modules (eager attention, whole sequence re-run per
latent pass, CUDA ``topk(sorted=False)`` order, EOS never checked on the first answer token).  Prompts
are built as ``infer.py`` builds them: the Qwen2-VL chat template with the image, then three
``<|latent|>`` placeholders.  The engine gets the same prompts with the placeholders (it consumes them as
the latent steps) or without them (it runs the three steps after the prompt), batched with rows of
different lengths and image sizes, left or right padded; every row must give the reference's tokens and
selections (``out.selected``: 0-based image-token indices, in the order they were fed).

``test_order_with_exact_ties``: a model whose attention is so peaked that most image tokens get a score of
exactly 0 in every layer and head, so the K-th best score is tied and the official order (strictly-above
patches first, then the tied ones from the lowest index) differs from ascending order.  (An image of
identical patches does not give ties here: the keys of identical embeddings still differ by their
rotary position.)

The controls (``test_cuda_topk_order_*``, ``test_tie_fixture_*``, ``test_reference_ascending_matches_engine``)
do not depend on the official-order engine features: they pin the reference itself.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from official_ivtlr import OfficialResult, cuda_topk_unsorted, official_ivtlr_generate

N_LATENT = 3
PAD = 0  # <|endoftext|> in the tiny tokenizer

# (question, image size in pixels): 112 -> 16 image tokens, 168 -> 36, 224 -> 64
QUESTIONS = [
    "[Question]:{What shape is directly below the red square?}\n[Options]:\nA.{circle}\nB.{square}\nC.{star}\nAnswer:",
    "[Question]:{Which?}\nAnswer:",
    "[Question]:{Is the blue square left of the green circle?}\n[Options]:\nA.{yes}\nB.{no}\nAnswer:",
    "[Question]:{Count the red shapes.}\n[Options]:\nA.{one}\nB.{two}\nC.{three}\nD.{four}\nAnswer:",
]


# -- fixtures: the tiny tokenizer / processors / models -------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    from lvr_engine.models.tiny import build_tiny_tokenizer
    return build_tiny_tokenizer()


@functools.lru_cache(maxsize=None)
def _processor(tok, image_size):
    from lvr_engine.models.tiny import build_tiny_processor
    return build_tiny_processor(tok, image_size=image_size)


@functools.lru_cache(maxsize=None)
def _model(vocab, seed, qk_scale=1.0):
    """A tiny random fp32 Qwen2-VL (eager attention) with the tiny tokenizer's special-token ids.
    ``qk_scale`` multiplies every decoder layer's q/k projections (peaked attention: exact zero scores)."""
    import transformers

    from lvr_engine.models.tiny import tiny_qwen2vl_config

    cfg = tiny_qwen2vl_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=vocab,
                              initializer_range=0.08, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation="eager",
                                                                      dtype=torch.float32).eval()
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model


def _rows(tok, specs, seed):
    """specs: [(question index, image size)] -> per row (input_ids (S,) ending with the placeholders,
    pixel_values, image_grid_thw), built as infer.py builds them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for q, size in specs:
        processor = _processor(tok, size)
        image = Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": QUESTIONS[q]}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text + "<|latent|>" * N_LATENT], images=[image], return_tensors="pt")
        rows.append((inputs["input_ids"][0], inputs["pixel_values"], inputs["image_grid_thw"]))
    return rows


def _batch(rows, padding_side, with_placeholders, image_token_id):
    """Pad the rows into one engine batch (with or without the trailing placeholders)."""
    ids_list = [ids if with_placeholders else ids[:-N_LATENT] for ids, _, _ in rows]
    B, S = len(ids_list), max(len(i) for i in ids_list)
    input_ids = torch.full((B, S), PAD, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, ids in enumerate(ids_list):
        span = slice(S - len(ids), S) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, span] = ids
        mask[b, span] = 1
    return dict(input_ids=input_ids, attention_mask=mask,
                pixel_values=torch.cat([pv for _, pv, _ in rows]),
                image_grid_thw=torch.cat([thw for _, _, thw in rows]),
                mm_token_type_ids=((input_ids == image_token_id) & (mask == 1)).int())


def _reference(model, tok, rows, K, eos, max_new_tokens, patch_order="official"):
    latent = tok.convert_tokens_to_ids("<|latent|>")
    return [official_ivtlr_generate(model, ids, pv, thw, latent_token_id=latent, num_selected_patches=K,
                                    eos_token_id=eos, max_new_tokens=max_new_tokens, patch_order=patch_order)
            for ids, pv, thw in rows]


def _engine(model, tok, batch, K, eos, max_new_tokens, config=None):
    from lvr_engine import LatentConfig, LatentGenerator

    config = LatentConfig.ivtlr(num_selected_patches=K) if config is None else config
    gen = LatentGenerator(model, config, processor=tok)
    return gen.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                        pad_token_id=PAD)


def _diagnose(got_toks, got_sel, ref):
    """What kind of mismatch this is, for the failure message."""
    notes = []
    want_sel = ref.selected
    if got_sel != want_sel:
        if [sorted(s) for s in got_sel] == [sorted(s) for s in want_sel]:
            notes.append("same patches, different feeding order (patch_order='official' expected)")
        elif sorted(got_sel[0]) == sorted(want_sel[0]) and got_sel[0] != want_sel[0]:
            notes.append("step 0 chose the same patches in another order; later steps diverge from it")
        else:
            notes.append("different patches chosen")
    if len(ref.tokens) > 1 and got_toks[:1] == ref.tokens[:1] and all(t == PAD for t in got_toks[1:]):
        notes.append("engine stopped after the first token (EOS must not be checked on the first token)")
    return "; ".join(notes) or "tokens differ"


def _compare(out, ref_rows, K):
    B = len(ref_rows)
    assert tuple(out.selected.shape) == (B, N_LATENT, K), f"selected shape {tuple(out.selected.shape)}"
    problems = []
    for b, ref in enumerate(ref_rows):
        got = out.sequences[b].tolist()
        got_sel = out.selected[b].tolist()
        toks_ok = got[: len(ref.tokens)] == ref.tokens and all(t == PAD for t in got[len(ref.tokens):])
        if not toks_ok or got_sel != ref.selected:
            problems.append(f"row {b}: {_diagnose(got, got_sel, ref)}\n"
                            f"   engine tokens    {got}\n   official tokens  {ref.tokens}\n"
                            f"   engine selected  {got_sel}\n   official selected {ref.selected}")
    assert not problems, "engine != official IVT-LR inference:\n" + "\n".join(problems)


def _pick_eos(free, mode):
    """An EOS id taken from the answers themselves (random models rarely emit the real one):
    'first' = row 0's first token (must not stop there), 'later' = a token row 1 emits later."""
    if mode == "first":
        return free[0].tokens[0]
    return free[1].tokens[3]


def _unused_token(free, tok):
    """An ordinary token id that no row emitted: as EOS it never stops anything (the engine's stand-in
    for the reference's eos_token_id=None)."""
    from lvr_engine.models.tiny import TINY_SPECIAL_TOKENS

    seen = {t for r in free for t in r.tokens}
    return next(i for i in range(len(TINY_SPECIAL_TOKENS), len(tok)) if i not in seen)


def _truncate(tokens, eos):
    """The official stop rule on a run that did not stop: cut after the first EOS at index >= 1."""
    for i, t in enumerate(tokens):
        if i > 0 and t == eos:
            return tokens[: i + 1]
    return tokens


# -- the acceptance cases -------------------------------------------------------------------------------
CASES = [  # seed, K, padding side, prompts carry the placeholders, rows (question, image size), EOS choice
    (0, 4, "left", True, [(0, 168), (1, 112), (2, 224)], "first"),
    (1, 8, "right", True, [(1, 224), (3, 168), (0, 168)], "later"),
    (2, 8, "left", False, [(2, 168), (0, 224), (1, 168)], "later"),
    (3, 4, "right", False, [(3, 112), (2, 168), (1, 224)], "first"),
    (4, 8, "left", True, [(1, 168), (2, 168), (3, 224)], "first"),
    (5, 4, "left", False, [(0, 112), (3, 224), (2, 168), (1, 168)], "later"),
    (6, 8, "right", True, [(2, 224), (0, 168), (1, 224), (3, 168)], "first"),
    (7, 4, "right", True, [(3, 168), (1, 112)], "later"),
]


@pytest.mark.parametrize("seed,K,padding,placeholders,specs,eos_mode", CASES,
                         ids=[f"seed{c[0]}-K{c[1]}-{c[2]}-{'placeholders' if c[3] else 'plain'}" for c in CASES])
def test_engine_matches_official(tok, seed, K, padding, placeholders, specs, eos_mode):
    model = _model(len(tok), seed)
    rows = _rows(tok, specs, seed)
    assert len({len(ids) for ids, _, _ in rows}) == len(rows), "fixture: rows must differ in length"
    max_new = 12 if seed % 2 else 10
    free = _reference(model, tok, rows, K, None, max_new)   # no early stop
    eos = _pick_eos(free, eos_mode)
    assert eos != PAD
    # the official stop rule applied to the free run (the reference applies the same rule itself when given
    # eos_token_id; re-running it would cost as much again)
    ref = [OfficialResult(_truncate(f.tokens, eos), f.selected, f.scores) for f in free]
    if eos_mode == "first":
        assert len(ref[0].tokens) > 1, "fixture: row 0 must run past its first token (== EOS)"
    else:
        assert len(ref[1].tokens) < max_new, "fixture: row 1 must stop at EOS"
    batch = _batch(rows, padding, placeholders, model.config.image_token_id)
    out = _engine(model, tok, batch, K, eos, max_new)
    _compare(out, ref, K)


def test_reference_stop_rule(tok):
    """Control: the reference itself never checks the first token for EOS, stops after a later EOS."""
    model = _model(len(tok), 0)
    rows = _rows(tok, [(1, 112)], 0)
    free = _reference(model, tok, rows, 4, None, 6)[0]
    for eos in (free.tokens[0], free.tokens[2]):
        got = _reference(model, tok, rows, 4, eos, 6)[0]
        assert got.tokens == _truncate(free.tokens, eos) and got.selected == free.selected
        assert len(got.tokens) > 1


# -- exact ties at the K-th score ----------------------------------------------------------------------
PEAKED = 300.0  # q/k scale: attention logits ~1e4-1e5 apart, softmax underflows to exactly 0
TIE_K, TIE_MAX_NEW = 8, 8
_TIE_CACHE: dict = {}


def _tie_case(tok, seed):
    """(model, rows, reference results) for the peaked model; the reference is computed once per seed."""
    key = (id(tok), seed)
    if key not in _TIE_CACHE:
        model = _model(len(tok), seed, PEAKED)
        rows = _rows(tok, [(0, 168), (3, 168), (1, 224)], seed)
        _TIE_CACHE[key] = model, rows, _reference(model, tok, rows, TIE_K, None, TIE_MAX_NEW)
    return _TIE_CACHE[key]


def _has_official_ties(ref_rows, K):
    """(some pass has a tie at the K-th score and a non-ascending official order, no score is near underflow)"""
    tie_and_reorder, clean = False, True
    for ref in ref_rows:
        for scores, chosen in zip(ref.scores, ref.selected, strict=True):
            finite = scores[torch.isfinite(scores)]
            clean &= not bool(((finite > 0) & (finite < 1e-30)).any())
            kth = sorted(finite.tolist(), reverse=True)[K - 1]
            tied = int((finite == kth).sum())
            tie_and_reorder |= tied > 1 and chosen != sorted(chosen)
    return tie_and_reorder, clean


@pytest.mark.parametrize("seed", [0, 2])
def test_tie_fixture_has_exact_ties(tok, seed):
    """Control: the peaked model really ties at the K-th score (scores exactly 0), far from underflow."""
    _, _, ref = _tie_case(tok, seed)
    tie_and_reorder, clean = _has_official_ties(ref, TIE_K)
    assert tie_and_reorder, "fixture: no tie at the K-th score with an official order != ascending"
    assert clean, "fixture: a score lies in (0, 1e-30): tie membership would depend on rounding"


@pytest.mark.parametrize("seed,padding,placeholders,backend",
                         [(0, "left", True, None), (2, "right", False, None), (2, "left", True, "torch")])
def test_order_with_exact_ties(tok, seed, padding, placeholders, backend):
    from lvr_engine import LatentConfig

    model, rows, ref = _tie_case(tok, seed)
    assert all(_has_official_ties(ref, TIE_K)), "fixture lost its ties (see test_tie_fixture_has_exact_ties)"
    batch = _batch(rows, padding, placeholders, model.config.image_token_id)
    config = LatentConfig.ivtlr(num_selected_patches=TIE_K, backend=backend)
    out = _engine(model, tok, batch, TIE_K, _unused_token(ref, tok), TIE_MAX_NEW, config)
    _compare(out, ref, TIE_K)


# -- controls that pin the reference itself -----------------------------------------------------------
def test_cuda_topk_order_hand_examples():
    s = torch.tensor
    # no ties: the K-th best (index 2, 0.3) comes last, after the strictly larger ones in index order
    assert cuda_topk_unsorted(s([0.1, 0.5, 0.3, 0.6, 0.2]), 3) == [1, 3, 2]
    # ties at the K-th value: strictly-above first (1, 4), then the tied ones from the lowest index
    assert cuda_topk_unsorted(s([0.2, 0.9, 0.2, 0.2, 0.5]), 3) == [1, 4, 0]
    assert cuda_topk_unsorted(s([0.0, 0.0, 0.7, 0.0, 0.1, 0.0]), 4) == [2, 4, 0, 1]
    # taken patches (-inf) are never chosen while enough remain
    assert cuda_topk_unsorted(s([float("-inf"), 0.0, 0.3, float("-inf"), 0.0]), 2) == [2, 1]
    # every value tied: lowest indices
    assert cuda_topk_unsorted(torch.zeros(6), 3) == [0, 1, 2]


def test_cuda_topk_order_same_set_as_torch_topk():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randint(0, 6, (40,), generator=g).float() / 8  # many ties
        k = int(torch.randint(1, 40, (1,), generator=g))
        got = cuda_topk_unsorted(x, k)
        assert len(set(got)) == k
        assert sorted(x[got].tolist(), reverse=True) == torch.topk(x, k).values.tolist()
        kth = torch.topk(x, k).values[-1]
        tied = [i for i in got if x[i] == kth]
        assert tied == sorted(tied) and tied == [i for i in range(40) if x[i] == kth][: len(tied)]


@pytest.mark.cuda  # checks the simulated order against the real one
def test_cuda_topk_order_is_cudas():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in [(100, 32), (64, 8), (324, 32), (1024, 64)]:
            for _ in range(20):
                x = (torch.rand(n, generator=g) * 8).floor().to(dtype) / 8  # heavy ties
                got = torch.topk(x.cuda(), k, sorted=False).indices.tolist()
                assert got == cuda_topk_unsorted(x, k), (n, k, dtype)


def test_reference_ascending_matches_engine(tok):
    """Control: with ascending feeding and no early stop, the reference is the engine's long-standing
    semantics (arange positions, no markers, prompt without placeholders): pins the reference's
    embeddings, positions, hidden-state feedback and decoding independently of the new features."""
    from lvr_engine import LatentConfig

    K, max_new = 4, 8
    model = _model(len(tok), 5)
    rows = _rows(tok, [(0, 168), (1, 112), (3, 224)], 5)
    ref = _reference(model, tok, rows, K, None, max_new, patch_order="ascending")
    cfg = LatentConfig(num_latent_steps=N_LATENT, num_selected_patches=K, position_mode="arange",
                       start_marker_id=None, end_marker_id=None)
    batch = _batch(rows, "left", False, model.config.image_token_id)
    out = _engine(model, tok, batch, K, _unused_token(ref, tok), max_new, cfg)
    _compare(out, ref, K)
