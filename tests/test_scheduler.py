"""Continuous batching (engine/scheduler.py): every request's tokens and selections equal ``LatentGenerator.generate``
run alone on it, while rows at different phases (prefill, latent steps of different K, decoding) share iterations,
requests are admitted into rows freed mid-flight, leave at EOS, and the pool never exceeds its bound."""
from __future__ import annotations

import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator
from lvr_engine.engine.scheduler import Request, Scheduler
from tiny_models import END_MARKER, EOS, LAT_END, LAT_PAD, LAT_START, START_MARKER, make_batch, tiny_vlm

PLACEHOLDER = 245
# (text before, image grid, text after): 16, 12, 20, 4, 16, 20, 12 image tokens; prompt lengths 7..34
ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12), (3, (4, 4), 2), (7, (8, 8), 1), (11, (8, 10), 9),
        (4, (6, 8), 5)]


def _solo(model, cfg, piece, spec, **kw):
    """``generate`` alone on one request: (tokens, selected)."""
    ids, pv, thw = piece
    N, K, T = spec
    gen = LatentGenerator(model, cfg.replace(num_latent_steps=N, num_selected_patches=K))
    out = gen.generate(input_ids=ids[None], pixel_values=pv, image_grid_thw=thw, max_new_tokens=T, **kw)
    return out.sequences[0].tolist(), out.selected[0].tolist()


def _request(piece, spec, **kw):
    ids, pv, thw = piece
    N, K, T = spec
    return Request(ids, pixel_values=pv, image_grid_thw=thw, max_new_tokens=T, num_latent_steps=N,
                   num_selected_patches=K, **kw)


def _drain(sched, max_steps=500):
    reports = []
    while sched.has_work():
        reports.append(sched.step())
        assert sched.num_running <= sched.max_batch
        assert len(reports) < max_steps, "the pool does not drain"
    return reports


CONFIGS = {
    # markers, multimodal positions, fp32 scores, ascending order
    "markers-mrope": (torch.float32, dict(start_marker_id=START_MARKER, end_marker_id=END_MARKER)),
    # the official IVT-LR setup on a bf16 model: arange positions, official order, scores rounded to bf16
    "ivtlr-bf16": (torch.bfloat16, dict(position_mode="arange", patch_order="official", score_precision="model",
                                        ignore_first_eos=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_pool_equals_solo_generate(name):
    """7 requests through a 3-row pool: mixed N (0..3), K (0, 2..5), max_new_tokens, prompt lengths. Every
    request equals generate alone; latent steps of different K and decode steps share iterations; later
    requests are admitted into rows freed mid-flight; rows move to keep groups contiguous."""
    dtype, fields = CONFIGS[name]
    model = tiny_vlm(seed=0, dtype=dtype)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4, **fields)
    specs = [(2, 4, 6), (0, 0, 9), (3, 3, 4), (1, 0, 7), (2, 2, 5), (3, 5, 3), (2, 4, 8)]
    _, pieces = make_batch(ROWS, seed=3)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=3, max_len=160)
    seqs = [sched.submit(_request(p, s, eos_token_id=[])) for p, s in zip(pieces, specs, strict=True)]
    reports = _drain(sched)
    for seq, piece, spec in zip(seqs, pieces, specs, strict=True):
        assert seq.finish_reason == "length"
        assert (seq.tokens, seq.selected) == _solo(model, cfg, piece, spec, eos_token_id=[]), f"request {seq.id}"
    kinds = [{k for k, _, _ in r.forwards} for r in reports]
    assert any({"latent", "decode"} <= k for k in kinds), "no iteration ran a latent step next to decode steps"
    widths = [{c for k, c, _ in r.forwards if k == "latent"} for r in reports]
    assert any(len(w) >= 2 for w in widths), "no iteration ran latent steps of two chunk widths"
    assert any(r.admitted and r.forwards and any(k != "prefill" for k, _, _ in r.forwards) for r in reports[1:]), \
        "no request was admitted while others were running"
    assert sum(r.moved_rows for r in reports) > 0
    assert sched.num_running == 0 and sched.num_waiting == 0


def test_admission_into_freed_rows_mid_flight():
    """A request submitted while the pool is full waits, then takes the row the first finisher frees."""
    model = tiny_vlm(seed=0)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    _, pieces = make_batch(ROWS[:3], seed=5)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=2, max_len=128)
    specs = [(2, 4, 3), (0, 0, 12), (2, 3, 5)]
    a, b = (sched.submit(_request(p, s, eos_token_id=[])) for p, s in zip(pieces[:2], specs[:2], strict=True))
    for _ in range(2):
        sched.step()
    c = sched.submit(_request(pieces[2], specs[2], eos_token_id=[]))
    admitted_at = None
    step = 2
    while sched.has_work():
        rep = sched.step()
        step += 1
        assert sched.num_running <= 2
        if c in rep.admitted:
            admitted_at = step
            assert a.finished and not b.finished, "c must take a's row while b is still decoding"
    assert admitted_at is not None
    for seq, piece, spec in zip((a, b, c), pieces, specs, strict=True):
        assert (seq.tokens, seq.selected) == _solo(model, cfg, piece, spec, eos_token_id=[])


def test_latent_row_and_decode_row_in_the_same_step():
    model = tiny_vlm(seed=0)
    cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4)
    _, pieces = make_batch(ROWS[:2], seed=7)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=4, max_len=128)
    plain = sched.submit(_request(pieces[0], (0, 0, 6), eos_token_id=[]))
    latent = sched.submit(_request(pieces[1], (3, 4, 4), eos_token_id=[]))
    first = sched.step()
    assert first.forwards == [("prefill", None, [plain.id]), ("prefill", None, [latent.id])]
    second = sched.step()  # the plain row decodes its first token while the latent row runs its first step
    assert sorted(second.forwards) == [("decode", 1, [plain.id]), ("latent", 5, [latent.id])]
    assert len(plain.tokens) == 1 and len(latent.selected) == 1
    _drain(sched)
    assert (plain.tokens, plain.selected) == _solo(model, cfg, pieces[0], (0, 0, 6), eos_token_id=[])
    assert (latent.tokens, latent.selected) == _solo(model, cfg, pieces[1], (3, 4, 4), eos_token_id=[])


def test_eviction_at_eos_frees_the_row():
    model = tiny_vlm(seed=0)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    _, pieces = make_batch(ROWS[:2], seed=9)
    ref, _ = _solo(model, cfg, pieces[0], (2, 4, 10), eos_token_id=[])
    stop = ref[3]
    cut = ref.index(stop) + 1  # generate stops at the first occurrence
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=2, max_len=128)
    a = sched.submit(_request(pieces[0], (2, 4, 10), eos_token_id=[stop]))
    b = sched.submit(_request(pieces[1], (0, 0, 20), eos_token_id=[]))
    while not a.finished:
        rep = sched.step()
    assert a in rep.finished and a.finish_reason == "stop" and a.row is None
    assert a.tokens == ref[:cut] == _solo(model, cfg, pieces[0], (2, 4, 10), eos_token_id=[stop])[0]
    assert sched.num_running == 1 and not b.finished
    _drain(sched)
    assert b.tokens == _solo(model, cfg, pieces[1], (0, 0, 20), eos_token_id=[])[0]


def test_pool_never_exceeds_its_bound_and_rejects_what_never_fits():
    model = tiny_vlm(seed=0)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    _, pieces = make_batch(ROWS, seed=2)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=2, max_len=64)
    cache_shape = tuple(sched.cache.k.shape)
    seqs = [sched.submit(_request(p, (2, 2, 4), eos_token_id=[])) for p in pieces[:5]]
    peak = 0
    while sched.has_work():
        sched.step()
        peak = max(peak, sched.num_running)
        assert sched.num_running <= 2
    assert peak == 2 and all(s.finish_reason == "length" for s in seqs)
    assert tuple(sched.cache.k.shape) == cache_shape
    # 42 prompt tokens + 2 x 5 latent + 20 new > 64: rejected at once, with the numbers
    with pytest.raises(ValueError, match=r"needs 72 positions \(42 prompt \+ 10 latent .* max_len=64"):
        sched.submit(_request(pieces[5], (2, 4, 20)))
    with pytest.raises(ValueError, match=r"12 image tokens but 3 latent steps x 5 patches need 15"):
        sched.submit(_request(pieces[1], (3, 5, 2)))
    assert sched.num_waiting == 0


def test_cancel_frees_the_row():
    model = tiny_vlm(seed=0)
    _, pieces = make_batch(ROWS[:3], seed=4)
    sched = Scheduler(LatentGenerator(model, LatentConfig(num_latent_steps=0)), max_batch=2, max_len=128)
    a, b, c = (sched.submit(_request(p, (0, 0, 30), eos_token_id=[])) for p in pieces)
    for _ in range(3):
        sched.step()
    sched.cancel(a)
    rep = sched.step()
    assert a in rep.finished and a.finish_reason == "cancelled" and c in rep.admitted
    _drain(sched)
    cfg = LatentConfig(num_latent_steps=0)
    assert c.tokens == _solo(model, cfg, pieces[2], (0, 0, 30), eos_token_id=[])[0]


def test_sampled_requests_equal_generate_with_their_seed():
    model = tiny_vlm(seed=0)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    _, pieces = make_batch(ROWS[:3], seed=6)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=3, max_len=128)
    kw = [dict(do_sample=True, temperature=1.3, top_p=0.9, seed=11), dict(), dict(do_sample=True, top_k=20, seed=5)]
    seqs = [sched.submit(_request(p, (2, 4, 10), eos_token_id=[], **k)) for p, k in zip(pieces, kw, strict=True)]
    _drain(sched)
    for seq, p, k in zip(seqs, pieces, kw, strict=True):
        assert (seq.tokens, seq.selected) == _solo(model, cfg, p, (2, 4, 10), eos_token_id=[], **k)


def test_official_placeholders_are_consumed_per_request():
    """A prompt ending with N <|latent|> placeholders is the same request (docs/semantics.md), per request N."""
    model = tiny_vlm(seed=0)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4, placeholder_id=PLACEHOLDER)
    _, pieces = make_batch(ROWS[:2], seed=8)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=4, max_len=128)
    with_ph = [(torch.cat([ids, torch.full((n,), PLACEHOLDER)]), pv, thw)
               for (ids, pv, thw), n in zip(pieces, (2, 3), strict=True)]
    specs = [(2, 4, 5), (3, 3, 5)]
    seqs = [sched.submit(_request(p, s, eos_token_id=[])) for p, s in zip(with_ph + pieces, specs + specs, strict=True)]
    _drain(sched)
    for seq, piece, spec in zip(seqs, pieces + pieces, specs + specs, strict=True):
        assert (seq.tokens, seq.selected) == _solo(model, cfg, piece, spec, eos_token_id=[])
    with pytest.raises(ValueError, match="ends with 3 latent placeholder"):
        sched.submit(_request(with_ph[1], (2, 4, 5)))


def test_mirage_rows_switch_independently_as_generate():
    """trigger="token": rows enter and leave latent mode at their own steps inside one pool."""
    model = tiny_vlm(seed=3)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, model.lm_head.weight.shape[1], generator=g)
    with torch.no_grad():
        model.lm_head.weight[LAT_START] = 5.0 * u / u.norm()
        model.lm_head.weight[LAT_END] = 2.5 * v / v.norm()
    cfg = LatentConfig.mirage(latent_start_id=LAT_START, latent_end_id=LAT_END, latent_pad_id=LAT_PAD,
                              max_latent_steps=4)
    _, pieces = make_batch(ROWS[:5], seed=1)
    sched = Scheduler(LatentGenerator(model, cfg), max_batch=3, max_len=128)
    lengths = [20, 14, 20, 9, 16]
    seqs = [sched.submit(Request(ids, pixel_values=pv, image_grid_thw=thw, max_new_tokens=n, eos_token_id=EOS))
            for (ids, pv, thw), n in zip(pieces, lengths, strict=True)]
    _drain(sched)
    entered = set()
    for seq, (ids, pv, thw), n in zip(seqs, pieces, lengths, strict=True):
        ref = LatentGenerator(model, cfg).generate(input_ids=ids[None], pixel_values=pv, image_grid_thw=thw,
                                                   max_new_tokens=n, eos_token_id=EOS).sequences[0].tolist()
        assert seq.tokens == ref, f"request {seq.id}"
        if LAT_START in ref:
            entered.add(ref.index(LAT_START))
    assert len(entered) >= 2, "the rows should enter latent mode at different steps"
    assert sched.stats.latent_steps == sum(s.tokens.count(LAT_PAD) for s in seqs) > 0
    with pytest.raises(ValueError, match="switches into latent mode by itself"):
        sched.submit(Request(pieces[0][0], pixel_values=pieces[0][1], image_grid_thw=pieces[0][2], num_latent_steps=2))
