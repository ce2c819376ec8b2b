"""Compiled CUDA backend: the ``torch.ops.lvr_engine`` ops with their CUDA kernels (csrc/ops_cuda.cu).

Shares the schema, fake kernels and wrappers with :mod:`lvr_engine.ops.compiled`; the dispatcher picks
the kernel from the tensors' device. Available only when a GPU is present and ``lvr_engine._C``
was built with the CUDA sources (a CUDA torch and nvcc at build time).
"""
from __future__ import annotations

import torch

from .compiled import chunk_attention_with_scores, image_attention_scores, select_and_feedback

__all__ = ["is_available", "image_attention_scores", "select_and_feedback", "chunk_attention_with_scores"]

_OPS = ("image_attention_scores", "select_and_feedback", "chunk_attention_with_scores")


def is_available() -> bool:
    """A CUDA device is usable and every op has a CUDA kernel registered in ``lvr_engine._C``."""
    if not torch.cuda.is_available():
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lvr_engine::{op}", "CUDA") for op in _OPS)
