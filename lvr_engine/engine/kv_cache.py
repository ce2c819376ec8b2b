"""Preallocated per-layer KV cache in the compact layout the fused ops read.

Layout: k[l], v[l] are (B, Hkv, S_max, D); row b holds its tokens left-aligned in slots
[0, lens[b]) whatever padding side its prompt had, so appending C tokens writes slots
[lens[b], lens[b] + C) of each row.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """In-place cache for inference (no autograd through the cache)."""

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.filled = 0  # max over rows of lens, tracked on the host (every row advances by the same C)
        self._rows = torch.arange(batch, device=device)[:, None]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """A cache over rows [start, stop) sharing this one's storage (writes land here; ``filled`` does not)."""
        view = object.__new__(StaticKVCache)
        view.k, view.v, view.lens = self.k[:, start:stop], self.v[:, start:stop], self.lens[start:stop]
        view.max_len, view.filled = self.max_len, self.filled
        view._rows = self._rows[: stop - start]
        return view

    def slots(self, chunk: int) -> torch.Tensor:
        """(B, C) cache slots the next ``chunk`` tokens of each row go to."""
        return self.lens[:, None] + torch.arange(chunk, device=self.lens.device)[None, :]

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, S, Hkv, D) left-aligned prompts -> slots [0, S)."""
        S = k.shape[1]
        self.k[layer, :, :, :S] = k.transpose(1, 2)
        self.v[layer, :, :, :S] = v.transpose(1, 2)

    def write_chunk(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """k, v (B, C, Hkv, D) -> slots (B, C) of each row; returns the layer's (k, v) buffers."""
        self.k[layer][self._rows, :, slots] = k
        self.v[layer][self._rows, :, slots] = v
        return self.k[layer], self.v[layer]

    def layer(self, layer: int):
        return self.k[layer], self.v[layer]


class FunctionalKVCache:
    """Out-of-place cache for training: every write makes a new tensor so autograd sees the whole history."""

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device):
        self.k = [torch.zeros(batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.filled = 0  # max over rows of lens, tracked on the host (every row advances by the same C)
        self._rows = torch.arange(batch, device=device)[:, None]

    def slots(self, chunk: int) -> torch.Tensor:
        return self.lens[:, None] + torch.arange(chunk, device=self.lens.device)[None, :]

    def write_prompt(self, layer, k, v):
        S = k.shape[1]
        pad = self.max_len - S
        self.k[layer] = torch.nn.functional.pad(k.transpose(1, 2), (0, 0, 0, pad))
        self.v[layer] = torch.nn.functional.pad(v.transpose(1, 2), (0, 0, 0, pad))

    def write_chunk(self, layer, k, v, slots):
        rows = self._rows.expand_as(slots)
        # index_put on (B, S, Hkv, D) views: out of place, differentiable w.r.t. both old cache and new k/v.
        kt = self.k[layer].transpose(1, 2).index_put((rows, slots), k)
        vt = self.v[layer].transpose(1, 2).index_put((rows, slots), v)
        self.k[layer], self.v[layer] = kt.transpose(1, 2), vt.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def layer(self, layer):
        return self.k[layer], self.v[layer]
