"""The engine's outputs do not depend on the ops backend: torch reference, compiled C++, Triton (interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lvr_engine.ops as ops
from benchmarks.baselines import published_latent_generate
from lvr_engine import LatentConfig, LatentGenerator
from tiny_models import END_MARKER, EOS, START_MARKER, make_batch

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]


@pytest.mark.skipif("cpu" not in ops.available_backends()["cpu"], reason="lvr_engine._C not built")
@pytest.mark.parametrize("N,K,position_mode,padding", [(3, 4, "mrope", "left"), (1, 4, "arange", "right"),
                                                       (3, 0, "mrope", "right")])
def test_cpu_kernels_match_published(vlm_qwen2, N, K, position_mode, padding):
    cfg = LatentConfig(num_latent_steps=N, num_selected_patches=K, position_mode=position_mode,
                       start_marker_id=START_MARKER, end_marker_id=END_MARKER, backend="cpu")
    batch, pieces = make_batch(ROWS, padding_side=padding, seed=31)
    out = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=6)
    assert out.stats.ops_backend == "cpu"
    ref_cfg = cfg.replace(backend="torch")
    ref = LatentGenerator(vlm_qwen2, ref_cfg).generate(**batch, max_new_tokens=6)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.selected, ref.selected)
    for b, (ids, pv, thw) in enumerate(pieces):
        toks, sel = published_latent_generate(vlm_qwen2, ids, pixel_values=pv, image_grid_thw=thw, num_latent_steps=N,
                                              num_selected_patches=K, start_marker_id=START_MARKER,
                                              end_marker_id=END_MARKER, position_mode=position_mode,
                                              max_new_tokens=6, eos_token_id=EOS)
        assert out.sequences[b].tolist()[: len(toks)] == toks
        assert torch.equal(out.selected[b], sel)


_TRITON_SCRIPT = r"""
import sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from tiny_models import tiny_vlm, make_batch, START_MARKER, END_MARKER
from lvr_engine import LatentConfig, LatentGenerator
import lvr_engine.ops as ops
assert "triton" in ops.available_backends()["cpu"], ops.available_backends()
model = tiny_vlm("qwen2_vl", seed=0)
batch, _ = make_batch([(3, (4, 8), 2), (5, (4, 4), 1)], padding_side="left", seed=2)
cfg = LatentConfig(num_latent_steps=2, num_selected_patches=2, start_marker_id=START_MARKER, end_marker_id=END_MARKER)
a = LatentGenerator(model, cfg.replace(backend="triton")).generate(**batch, max_new_tokens=3)
b = LatentGenerator(model, cfg.replace(backend="torch")).generate(**batch, max_new_tokens=3)
assert a.stats.ops_backend == "triton"
assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
assert torch.equal(a.selected, b.selected), (a.selected, b.selected)
print("TRITON_ENGINE_OK", a.sequences.tolist())
"""


def test_triton_backend_in_interpreter_matches_torch():
    pytest.importorskip("triton")
    here = os.path.dirname(__file__)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, here, os.path.dirname(here)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON_ENGINE_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
