"""LatentGenerator vs the published algorithm (benchmarks/baselines.py): identical tokens and selections."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from benchmarks.baselines import published_latent_generate
from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import END_MARKER, EOS, START_MARKER, make_batch, make_text_batch, tiny_text_lm

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]  # 16, 12, 20 image tokens; lengths differ


def _reference(model, pieces, cfg, max_new_tokens):
    toks, sels = [], []
    for ids, pv, thw in pieces:
        t, s = published_latent_generate(
            model, ids, pixel_values=pv, image_grid_thw=thw, num_latent_steps=cfg.num_latent_steps,
            num_selected_patches=cfg.num_selected_patches, start_marker_id=cfg.start_marker_id,
            end_marker_id=cfg.end_marker_id, position_mode=cfg.position_mode, max_new_tokens=max_new_tokens,
            eos_token_id=EOS)
        toks.append(t)
        sels.append(s)
    return toks, sels


def _check_rows(out, ref_toks, ref_sels, pad_id=0):
    for b, (t, s) in enumerate(zip(ref_toks, ref_sels, strict=True)):
        got = out.sequences[b].tolist()
        assert got[: len(t)] == t, f"row {b}: engine {got} vs published {t}"
        assert all(x == pad_id for x in got[len(t):]), f"row {b} not padded after EOS: {got}"
        assert torch.equal(out.selected[b].cpu(), s), f"row {b}: selected {out.selected[b].tolist()} vs {s.tolist()}"


GRID = list(itertools.product([1, 3], [0, 4], [True, False], ["mrope", "arange"], ["left", "right"]))


@pytest.mark.parametrize("N,K,markers,position_mode,padding", GRID)
def test_qwen2_vl_matches_published(vlm_qwen2, N, K, markers, position_mode, padding):
    cfg = LatentConfig(num_latent_steps=N, num_selected_patches=K, position_mode=position_mode,
                       start_marker_id=START_MARKER if markers else None,
                       end_marker_id=END_MARKER if markers else None)
    batch, pieces = make_batch(ROWS, padding_side=padding, seed=N * 10 + K)
    out = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6)
    assert out.sequences.shape[0] == 3 and out.selected.shape == (3, N, K)
    _check_rows(out, *_reference(vlm_qwen2, pieces, cfg, 6))


@pytest.mark.parametrize("N,K,markers,position_mode,padding",
                         [(3, 4, True, "mrope", "left"), (1, 4, False, "arange", "right"),
                          (3, 0, True, "arange", "left"), (1, 0, False, "mrope", "right")])
def test_qwen2_5_vl_matches_published(vlm_qwen25, N, K, markers, position_mode, padding):
    cfg = LatentConfig(num_latent_steps=N, num_selected_patches=K, position_mode=position_mode,
                       start_marker_id=START_MARKER if markers else None,
                       end_marker_id=END_MARKER if markers else None)
    batch, pieces = make_batch(ROWS, padding_side=padding, seed=3)
    out = LatentGenerator(vlm_qwen25, cfg).generate(**batch, max_new_tokens=6)
    _check_rows(out, *_reference(vlm_qwen25, pieces, cfg, 6))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("N,padding", [(1, "left"), (3, "right")])
def test_coconut_on_text_model(family, N, padding):
    model = tiny_text_lm(family, seed=2)
    cfg = LatentConfig.coconut(num_latent_steps=N, start_marker_id=START_MARKER, end_marker_id=END_MARKER)
    batch, rows = make_text_batch([7, 12, 4], padding_side=padding, seed=N)
    out = LatentGenerator(model, cfg).generate(**batch, max_new_tokens=6)
    ref = [published_latent_generate(model, ids, num_latent_steps=N, num_selected_patches=0,
                                     start_marker_id=START_MARKER, end_marker_id=END_MARKER, max_new_tokens=6,
                                     eos_token_id=EOS) for ids in rows]
    _check_rows(out, [r[0] for r in ref], [r[1] for r in ref])


def test_selected_are_distinct_and_ascending(vlm_qwen2):
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4)
    batch, _ = make_batch(ROWS, seed=5)
    out = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=2)
    counts = [16, 12, 20]
    for b in range(3):
        sel = out.selected[b]
        assert (sel[:, 1:] > sel[:, :-1]).all(), "each step's patches must be in ascending order"
        assert sel.flatten().unique().numel() == 12, "a patch chosen in an earlier step was chosen again"
        assert int(sel.max()) < counts[b]


def test_plain_decoding_equals_transformers_generate(vlm_qwen2):
    """num_latent_steps=0 is ordinary decoding: identical to HF generate (greedy, mrope, left padding)."""
    batch, _ = make_batch(ROWS, padding_side="left", seed=7)
    out = LatentGenerator(vlm_qwen2, LatentConfig(num_latent_steps=0)).generate(**batch, max_new_tokens=8)
    hf = vlm_qwen2.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    hf_new = hf[:, batch["input_ids"].shape[1]:]
    for b in range(3):
        ref = hf_new[b].tolist()
        if EOS in ref:
            ref = ref[: ref.index(EOS) + 1]
        assert out.sequences[b].tolist()[: len(ref)] == ref


def test_batch_rows_equal_solo_runs(vlm_qwen2):
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4, start_marker_id=START_MARKER)
    gen = LatentGenerator(vlm_qwen2, cfg)
    batch, pieces = make_batch(ROWS, padding_side="right", seed=11)
    out = gen.generate(**batch, max_new_tokens=8)
    for b, (ids, pv, thw) in enumerate(pieces):
        solo = gen.generate(input_ids=ids[None], pixel_values=pv, image_grid_thw=thw, max_new_tokens=8)
        n = solo.sequences.shape[1]
        assert out.sequences[b, :n].tolist() == solo.sequences[0].tolist()
        assert torch.equal(out.selected[b], solo.selected[0])


def test_stats_count_forward_passes(vlm_qwen2):
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4, end_marker_id=END_MARKER)
    batch, _ = make_batch(ROWS, seed=2)
    out = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=5, eos_token_id=[])
    s = out.stats
    assert out.sequences.shape == (3, 5)
    assert s.forward_passes == 1 + 3 + 4  # prefill, one per latent step, one per decoded token after the first
    assert s.latent_positions == 3 * 5 + 1 and s.new_tokens == 15 and s.batch_size == 3
    assert s.prefill_s > 0 and s.latent_s > 0 and s.decode_s > 0


def test_sampling_is_reproducible(vlm_qwen2):
    gen = LatentGenerator(vlm_qwen2, LatentConfig(num_latent_steps=2, num_selected_patches=4))
    batch, _ = make_batch(ROWS, seed=4)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, eos_token_id=[])
    a = gen.generate(**batch, seed=123, **kw).sequences
    b = gen.generate(**batch, seed=123, **kw).sequences
    c = gen.generate(**batch, seed=124, **kw).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "different seeds gave identical samples"
    greedy = gen.generate(**batch, max_new_tokens=12, eos_token_id=[]).sequences
    top1 = gen.generate(**batch, max_new_tokens=12, do_sample=True, top_k=1, seed=5, eos_token_id=[]).sequences
    assert torch.equal(greedy, top1), "top_k=1 sampling must equal greedy decoding"


def test_latent_hook_intervenes_and_latents_are_returned(vlm_qwen2):
    """Zeroing h_t through the hook equals the published loop with the same intervention (independent check)."""
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    batch, pieces = make_batch(ROWS, seed=13)
    gen = LatentGenerator(vlm_qwen2, cfg)
    plain = gen.generate(**batch, max_new_tokens=6, return_latents=True)
    assert plain.latents.shape == (3, 2, 5, vlm_qwen2.config.text_config.hidden_size)
    # the returned z part is exactly the selected image embeddings of the row
    ids, pv, thw = pieces[0]
    feats = torch.cat(list(vlm_qwen2.model.get_image_features(pv, thw, return_dict=True).pooler_output))
    torch.testing.assert_close(plain.latents[0, 0, :4], feats[plain.selected[0, 0]])

    def zero_hidden(t, block):
        block[:, -1] = 0

    hooked = gen.generate(**batch, max_new_tokens=6, latent_hook=zero_hidden)
    assert not torch.equal(hooked.sequences, plain.sequences)
    # reference: the published loop with h_t replaced by zeros (monkeypatched last hidden state)
    import benchmarks.baselines as bl
    real_run = bl._run

    def run_zero_h(model, embeds, pos, want_attn):
        out = real_run(model, embeds, pos, want_attn)
        if want_attn:  # only latent passes ask for attentions when K > 0
            out.last_hidden_state = out.last_hidden_state.clone()
            out.last_hidden_state[0, -1] = 0
        return out

    bl._run = run_zero_h
    try:
        ref = _reference(vlm_qwen2, pieces, cfg, 6)
    finally:
        bl._run = real_run
    _check_rows(hooked, *ref)


def test_vision_tower_groups_equal_one_call(vlm_qwen2, monkeypatch):
    """Images are encoded in groups to bound memory; results equal one call over every image."""
    import lvr_engine.models.qwen2_vl as q
    from lvr_engine.models import adapter_for

    batch, _ = make_batch(ROWS, seed=3)
    adapter = adapter_for(vlm_qwen2)
    monkeypatch.setattr(q, "VISION_GROUP_PATCHES", 10 ** 9)
    whole = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    monkeypatch.setattr(q, "VISION_GROUP_PATCHES", 100)  # 64-, 48- and 80-patch images: one per group
    grouped = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    assert [g.shape for g in grouped] == [w.shape for w in whole] == [(16, 64), (12, 64), (20, 64)]
    for g, w in zip(grouped, whole, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _recording_linear(seen, x, w, b):
    seen.append((w.shape[0], x.reshape(-1, x.shape[-1]).shape[0]))
    return torch.nn.functional.linear(x, w, b)


def test_mlp_in_chunks_equals_float64_swiglu(monkeypatch):
    """The inference MLP over MLP_CHUNK_TOKENS tokens at a time: with the chunk lowered to 16, 3x37 = 111 tokens go
    through the projections as 6 chunks of 16 and one of 15; the result equals a float64 SwiGLU of the whole input.
    """
    import types

    import torch.nn.functional as F

    import lvr_engine.engine.runner as runner_mod

    g = torch.Generator().manual_seed(0)
    hidden, inter = 24, 40
    m = types.SimpleNamespace(gate_up=torch.randn(2 * inter, hidden, generator=g) / 5,
                              gate_up_b=torch.randn(2 * inter, generator=g),
                              down=torch.randn(hidden, inter, generator=g) / 6,
                              down_b=torch.randn(hidden, generator=g))
    h = torch.randn(3, 37, hidden, generator=g)
    gu = F.linear(h.double(), m.gate_up.double(), m.gate_up_b.double())
    want = F.linear(F.silu(gu[..., :inter]) * gu[..., inter:], m.down.double(), m.down_b.double())

    for chunk, rows in [(16, [16] * 6 + [15]), (10 ** 6, [111])]:
        monkeypatch.setattr(runner_mod, "MLP_CHUNK_TOKENS", chunk)
        seen = []  # (output features, rows) of every projection
        linear = functools.partial(_recording_linear, seen)
        got = runner_mod._mlp_in_chunks(h, m, linear)
        assert got.shape == (3, 37, hidden)
        assert [n for out, n in seen if out == 2 * inter] == rows and [n for out, n in seen if out == hidden] == rows
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_chunked_inference_mlp_gives_same_outputs(vlm_qwen2, monkeypatch):
    """Generation with the MLP chunk lowered to 16 tokens gives the tokens and selections of unchunked MLPs, and
    the chunked path really ran: the 3-row prefill's ~100 tokens reached the MLP projections 16 rows at a time."""
    import lvr_engine.engine.runner as runner_mod

    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4)
    batch, _ = make_batch(ROWS, seed=3)
    monkeypatch.setattr(runner_mod, "MLP_CHUNK_TOKENS", 10 ** 6)
    whole = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6)
    calls = []  # per MLP call: (tokens in, rows of each projection it made)
    real = runner_mod._mlp_in_chunks

    def spy(h, m, linear):
        rows = []
        calls.append((h[..., 0].numel(), rows))
        return real(h, m, lambda x, w, b: rows.append(x.reshape(-1, x.shape[-1]).shape[0]) or linear(x, w, b))

    monkeypatch.setattr(runner_mod, "_mlp_in_chunks", spy)
    monkeypatch.setattr(runner_mod, "MLP_CHUNK_TOKENS", 16)
    chunked = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6)
    big = [rows for n, rows in calls if n >= 3 * 16]
    assert big, [n for n, _ in calls]  # the prefill's MLPs
    assert all(max(rows) <= 16 and len(rows) >= 2 * 3 for rows in big), big  # >= 3 chunks, 2 projections each
    assert torch.equal(whole.sequences, chunked.sequences) and torch.equal(whole.selected, chunked.selected)


@pytest.mark.parametrize("rows_per_group", [1, 2])
def test_prefill_in_row_groups_gives_same_outputs(vlm_qwen2, monkeypatch, rows_per_group):
    """Rows are independent in a prefill: groups of rows (each group's own cache rows, lens and scores) give the
    tokens and selections of one pass over the batch."""
    import lvr_engine.engine.runner as runner_mod
    from lvr_engine.engine.kv_cache import StaticKVCache

    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4)
    batch, _ = make_batch(ROWS, seed=4)
    whole = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6)
    S = int(batch["attention_mask"].sum(1).max())  # the compact prompt length (+ nothing: no start marker)
    monkeypatch.setattr(runner_mod, "PREFILL_CHUNK_TOKENS", rows_per_group * S)
    groups = []
    real_rows = StaticKVCache.rows
    monkeypatch.setattr(StaticKVCache, "rows", lambda self, a, b: groups.append((a, b)) or real_rows(self, a, b))
    grouped = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6)
    assert len(groups) == -(-len(ROWS) // rows_per_group)  # the prompts really went through in groups
    assert torch.equal(whole.sequences, grouped.sequences) and torch.equal(whole.selected, grouped.selected)


@pytest.mark.parametrize("backend", [None, "torch"])  # CPU: compiled glue (rope_write_kv) / the torch glue
def test_last_token_forwards_equal_full_forwards(vlm_qwen2, monkeypatch, backend):
    """Generation runs its prefill and latent steps with last_only=True (the last layer runs attention, o-projection
    and MLP for the last token only). Against full forwards (every token through every layer, then the last one
    picked): the same hidden states fed back (each latent block's h), selections and tokens."""
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4, backend=backend)
    batch, _ = make_batch(ROWS, seed=5)
    gen = LatentGenerator(vlm_qwen2, cfg)
    trimmed = gen.generate(**batch, max_new_tokens=5, return_latents=True)
    calls = []
    real_prefill, real_step = gen.runner.prefill, gen.runner.step

    def full_prefill(embeds, positions, lens, cache, image_slots=None, scores=None, last_only=False, **kw):
        calls.append(("prefill", last_only))
        hidden = real_prefill(embeds, positions, lens, cache, image_slots, scores, last_only=False, **kw)
        assert hidden.shape[:2] == embeds.shape[:2]
        return hidden[torch.arange(hidden.shape[0]), lens - 1][:, None]

    def full_step(embeds, positions, cache, image_slots=None, scores=None, last_only=False, **kw):
        calls.append(("step", last_only))
        hidden = real_step(embeds, positions, cache, image_slots, scores, last_only=False, **kw)
        assert hidden.shape[:2] == embeds.shape[:2]
        return hidden[:, -1:] if last_only else hidden
    monkeypatch.setattr(gen.runner, "prefill", full_prefill)
    monkeypatch.setattr(gen.runner, "step", full_step)
    full = gen.generate(**batch, max_new_tokens=5, return_latents=True)
    assert calls[:4] == [("prefill", True)] + [("step", True)] * 3
    # each latent block's last row is the hidden state the previous forward fed back
    torch.testing.assert_close(trimmed.latents[..., -1, :], full.latents[..., -1, :], rtol=1e-5, atol=1e-5)
    assert torch.equal(trimmed.selected, full.selected) and torch.equal(trimmed.sequences, full.sequences)
