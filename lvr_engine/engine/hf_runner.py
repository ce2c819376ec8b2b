"""Fallback runner: the model's own HF decoder-layer modules, with our cache, attention and score ops.

Each HF layer computes its norms, projections, rotary and MLP itself; attention is routed to the
engine through transformers' AttentionInterface (registered as ``"lvr_engine"``), so K/V land in the
engine's compact cache and the image scores come from the same fused ops as the lean runner. It serves
families the lean runner has no weights layout for, and cross-checks the lean runner in tests.
"""
from __future__ import annotations

import contextlib

import torch

from .runner import DecoderRunner

ATTN_NAME = "lvr_engine"


def _engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lvr_ctx=None, **kwargs):
    """HF attention-interface function: query (B,H,C,D), key/value (B,Hkv,C,D) after rotary -> (B,C,H,D)."""
    if lvr_ctx is None:
        raise RuntimeError("the lvr_engine attention function only runs inside lvr_engine's HF-module runner")
    runner, cache, ctx = lvr_ctx
    out = runner.attend(module.layer_idx, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        cache, ctx)
    return out, None


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _engine_attention)


class HFModuleRunner(DecoderRunner):
    """Same interface and results as :class:`DecoderRunner`, computed by the HF layer modules."""

    def __init__(self, weights, backend=None):
        super().__init__(weights, backend)
        if not weights.layer_modules or weights.rotary_module is None:
            raise TypeError("the HF-module runner needs the model's decoder layers and rotary module")
        _register()
        self._configs = []
        for layer in weights.layer_modules:
            cfg = layer.self_attn.config
            if all(c is not cfg for c in self._configs):
                self._configs.append(cfg)

    @contextlib.contextmanager
    def _engine_attention_selected(self):
        saved = [c._attn_implementation for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation_internal = ATTN_NAME
            yield
        finally:
            for c, s in zip(self._configs, saved, strict=True):
                c._attn_implementation_internal = s

    def final_norm(self, x, ctx):
        return self.w.norm(x)

    def rotary(self, positions, dtype):
        """cos, sin (B,C,D) from the model's own rotary module (positions (3,B,C))."""
        dummy = torch.empty(0, dtype=dtype, device=positions.device)
        pos = positions if self.w.mrope_section is not None else positions[0]
        return self.w.rotary_module(dummy, pos)

    def _layers(self, x, positions, cache, ctx):
        cos, sin = self.rotary(positions, x.dtype)
        with self._engine_attention_selected():
            for layer in self.w.layer_modules:
                # no cache argument: the engine's cache is lvr_ctx's (HF renames past_key_values -> cache in 5.x)
                out = layer(x, attention_mask=None, position_embeddings=(cos, sin), use_cache=False,
                            lvr_ctx=(self, cache, ctx))
                x = out[0] if isinstance(out, tuple) else out
        return x
