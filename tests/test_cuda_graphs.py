"""The CUDA-graph path's shape logic (buckets, persistent workspaces, static buffers), exercised on CPU in
emulation mode (same plumbing, no capture); real capture runs when CUDA is present."""
from __future__ import annotations

import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator
from lvr_engine.engine.cuda_graphs import bucket_for
from tiny_models import END_MARKER, LAT_END, LAT_PAD, LAT_START, START_MARKER, make_batch

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3), (2, (8, 10), 12)]


def test_bucket_for():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 8, 9, 33, 200)] == [1, 2, 4, 8, 8, 16, 64, 200]


@pytest.mark.parametrize("N,K,padding", [(3, 4, "left"), (0, 0, "right"), (2, 0, "left")])
def test_emulated_graphs_equal_eager(vlm_qwen2, N, K, padding):
    cfg = LatentConfig(num_latent_steps=N, num_selected_patches=K, start_marker_id=START_MARKER,
                       end_marker_id=END_MARKER)
    batch, _ = make_batch(ROWS, padding_side=padding, seed=41)  # 3 rows -> bucket 4 (one dummy row)
    eager = LatentGenerator(vlm_qwen2, cfg).generate(**batch, max_new_tokens=7)
    gen = LatentGenerator(vlm_qwen2, cfg, cuda_graphs="emulate")
    graphed = gen.generate(**batch, max_new_tokens=7)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert torch.equal(graphed.selected, eager.selected)
    assert graphed.stats.batch_size == 3
    ws, graphs = gen._workspaces[4]
    assert ws.cache.k.shape[1] == 4 and ws.max_len % 256 == 0
    shapes = set(graphs.graphs)
    # a second call with a shorter batch of the same bucket reuses the workspace and its captured shapes
    small, _ = make_batch(ROWS[:2], padding_side=padding, seed=42)
    again = gen.generate(**small, max_new_tokens=7)
    assert gen._workspaces[4][0] is ws and set(graphs.graphs) == shapes
    ref = LatentGenerator(vlm_qwen2, cfg).generate(**small, max_new_tokens=7)
    assert torch.equal(again.sequences, ref.sequences) and torch.equal(again.selected, ref.selected)


def test_emulated_graphs_mirage():
    from test_engine_mirage import _mirage_model

    model = _mirage_model(5.0, 2.5)
    cfg = LatentConfig.mirage(latent_start_id=LAT_START, latent_end_id=LAT_END, latent_pad_id=LAT_PAD,
                              max_latent_steps=4)
    batch, _ = make_batch(ROWS, seed=1)
    a = LatentGenerator(model, cfg).generate(**batch, max_new_tokens=16).sequences
    b = LatentGenerator(model, cfg, cuda_graphs="emulate").generate(**batch, max_new_tokens=16).sequences
    assert torch.equal(a, b)


def test_graphs_need_cuda(vlm_qwen2):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA"):
        LatentGenerator(vlm_qwen2, LatentConfig(num_selected_patches=2), cuda_graphs=True)


@pytest.mark.cuda
def test_cuda_graphs_equal_eager_on_gpu(vlm_qwen2):
    model = vlm_qwen2.to("cuda")
    try:
        cfg = LatentConfig(num_latent_steps=3, num_selected_patches=4)
        batch, _ = make_batch(ROWS, seed=43)
        batch = {k: v.cuda() for k, v in batch.items()}
        eager = LatentGenerator(model, cfg, cuda_graphs=False).generate(**batch, max_new_tokens=6)
        graphed = LatentGenerator(model, cfg, cuda_graphs=True).generate(**batch, max_new_tokens=6)
        assert torch.equal(eager.sequences, graphed.sequences) and torch.equal(eager.selected, graphed.selected)
    finally:
        model.to("cpu")
