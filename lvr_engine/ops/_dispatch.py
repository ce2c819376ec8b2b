"""Backend discovery and selection for the fused ops."""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import reference

BACKENDS = ("torch", "cpu", "triton", "cuda")
OPS = ("image_attention_scores", "select_and_feedback", "chunk_attention_with_scores", "mixed_linear",
       "rope_write_kv", "rms_norm")


@functools.lru_cache(maxsize=None)
def _module(backend: str):
    """The module implementing ``backend``'s ops, or None when it cannot be loaded here."""
    if backend == "torch":
        return reference
    try:
        if backend == "cpu":  # the compiled C++ kernels (ops/compiled.py also wraps the CUDA ones)
            return importlib.import_module("lvr_engine.ops.compiled")
        if backend in ("cuda", "triton"):
            mod = importlib.import_module(f"lvr_engine.ops.{backend}")
            return mod if mod.is_available() else None
    except (ImportError, OSError, RuntimeError, AttributeError):
        return None
    raise ValueError(f"unknown ops backend {backend!r}; expected one of {BACKENDS} or None")


def available_backends() -> dict[str, list[str]]:
    """Backends usable in this process, in the order ``backend=None`` tries them, per device type."""
    have = [b for b in BACKENDS if _module(b) is not None]
    order = {"cuda": ["cuda", "triton", "torch"], "cpu": ["cpu", "torch"]}
    if os.environ.get("TRITON_INTERPRET") == "1":
        order["cpu"] = ["cpu", "torch", "triton"]
    return {dev: [b for b in pref if b in have] for dev, pref in order.items()}


def resolve_backend(backend: str | None, device_type: str) -> str:
    """The concrete backend name ``backend`` means for tensors on ``device_type``."""
    if backend is None:
        prefs = available_backends().get(device_type, ["torch"])
        return prefs[0] if prefs else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown ops backend {backend!r}; expected one of {BACKENDS} or None")
    if _module(backend) is None:
        raise RuntimeError(f"ops backend {backend!r} is not available here; available: {available_backends()}")
    return backend


def get_impl(op: str, backend: str | None, like):
    """The callable implementing ``op`` on ``backend`` for tensors like ``like``.

    float64 (used for ground-truth checks) always runs the torch reference when no backend is named.
    Resolved once per (op, backend, device type): a decode step calls ~70 ops, and re-resolving each call
    cost ~10 us of Python per op.
    """
    if backend is None and like.dtype == torch.float64:
        return getattr(reference, op)
    return _impl(op, backend, like.device.type, os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=None)
def _impl(op: str, backend: str | None, device_type: str, _triton_interpret: str | None):
    # _triton_interpret is part of the key: it changes which backends ``backend=None`` may pick
    name = resolve_backend(backend, device_type)
    impl = getattr(_module(name), op, None)
    if impl is None:
        raise NotImplementedError(f"op {op!r} has no {name!r} backend")
    return impl
