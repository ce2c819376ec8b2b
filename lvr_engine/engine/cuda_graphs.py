"""CUDA graphs for the fixed-shape forwards: every latent step (C = K+1 new positions) and decode step (C = 1).

A captured graph replays kernels on fixed addresses, so the cache, image slots and score buffer live in a
persistent per-batch-bucket :class:`Workspace` reused across ``generate`` calls (nano-vllm style); batches
are padded up to the bucket with one-token dummy rows. Only the decoder step is captured; embedding,
selection and sampling run eagerly between replays (they are cheap and data-dependent).

``mode="emulate"`` runs the very same static-buffer plumbing without capturing (any device), which is how
the shape logic is tested on CPU.
"""
from __future__ import annotations

import torch

from .kv_cache import StaticKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(batch: int, buckets=BUCKETS) -> int:
    """Smallest bucket >= batch; batches larger than every bucket run at their own size."""
    for b in buckets:
        if b >= batch:
            return b
    return batch


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Workspace:
    """Persistent buffers of one batch bucket. Shapes: cache (L, B, Hkv, S_cap, D); image_slots/scores (B, I_cap)."""

    def __init__(self, runner, batch, max_len, max_images, dtype, device):
        w = runner.w
        self.cache = StaticKVCache(len(w.layers), batch, w.num_kv_heads, max_len, w.head_dim, dtype, device)
        self.image_slots = torch.full((batch, max_images), -1, dtype=torch.int32, device=device)
        self.scores = torch.zeros(batch, max_images, dtype=torch.float32, device=device)
        self.batch, self.max_len, self.max_images = batch, max_len, max_images

    def fits(self, max_len, max_images) -> bool:
        return max_len <= self.max_len and max_images <= self.max_images

    def load(self, image_slots: torch.Tensor):
        """Reset for a new call: image slots (B, I) copied in (rest -1), scores zeroed, cache lengths cleared."""
        self.image_slots.fill_(-1)
        self.image_slots[:, : image_slots.shape[1]] = image_slots
        self.scores.zero_()
        self.cache.lens.zero_()
        self.cache.filled = 0


class GraphedSteps:
    """Replays ``runner.step`` for each (chunk size, with scores, last token only) shape on one workspace."""

    def __init__(self, runner, workspace: Workspace, mode: str):
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"graph mode must be 'cuda' or 'emulate', got {mode!r}")
        self.runner, self.ws, self.mode = runner, workspace, mode
        self.graphs = {}  # (C, with_scores, last_only) -> (graph or None, static input, static positions, output)

    def step(self, chunk: torch.Tensor, positions: torch.Tensor, with_scores: bool, last_only: bool = False,
             weights=None, prob_dtype=None) -> torch.Tensor:
        """chunk (B, C, h), positions (3, B, C) -> hidden (B, C, h), or (B, 1, h) of the last token with
        ``last_only``; the cache advances by C. ``weights``: the call's compute weights (a captured graph keeps
        reading the tensors it was captured with; the runner's weight cache keeps them stable across calls);
        ``prob_dtype``: score rounding (runner.step)."""
        C = chunk.shape[1]
        key = (C, with_scores, last_only, prob_dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(chunk, positions, with_scores, last_only, weights, prob_dtype)
        graph, s_in, s_pos, s_out = self.graphs[key]
        cache = self.ws.cache
        if cache.filled + C > cache.max_len:
            raise RuntimeError(f"KV cache overflow: need {cache.filled + C} slots, have {cache.max_len}")
        s_in.copy_(chunk)
        s_pos.copy_(positions)
        if graph is None:  # emulation: same buffers, eager kernels
            s_out.copy_(self._run(s_in, s_pos, with_scores, last_only, weights, prob_dtype))
        else:
            graph.replay()
            cache.filled += C  # the captured step advanced lens on the device; mirror the host counter
        return s_out

    def _run(self, x, pos, with_scores, last_only, weights, prob_dtype):
        ws = self.ws
        return self.runner.step(x, pos, ws.cache, ws.image_slots if with_scores else None,
                                ws.scores if with_scores else None, last_only=last_only, weights=weights,
                                prob_dtype=prob_dtype)

    def _capture(self, chunk, positions, with_scores, last_only, weights, prob_dtype):
        s_in, s_pos = chunk.clone(), positions.clone()
        if self.mode == "emulate":
            return None, s_in, s_pos, torch.empty_like(chunk[:, -1:] if last_only else chunk)
        cache, scores = self.ws.cache, self.ws.scores
        lens, filled, saved_scores = cache.lens.clone(), cache.filled, scores.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up run: lazy initialisation must not happen during capture
            self._run(s_in, s_pos, with_scores, last_only, weights, prob_dtype)
        torch.cuda.current_stream().wait_stream(side)
        cache.lens.copy_(lens)
        cache.filled = filled
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = self._run(s_in, s_pos, with_scores, last_only, weights, prob_dtype)
        # Capturing records kernels without running them; undo the host-side bookkeeping and the warm-up.
        cache.lens.copy_(lens)
        cache.filled = filled
        scores.copy_(saved_scores)
        return graph, s_in, s_pos, s_out
