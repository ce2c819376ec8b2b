"""A model part converted to another dtype for inference, cached per module and kept in sync with it.

Used for the vision tower when the engine computes a bf16/fp16 model in fp32 (CPUs without native bf16
arithmetic run half-precision convolutions and matmuls emulated, several times slower). The copy is
validated on every use by each parameter's storage pointer and version counter, so ``model.to(...)``,
``load_state_dict`` or an optimizer step on the original is picked up.
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

# original module -> {dtype: (signature, converted copy)}
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def tensor_signature(tensors) -> tuple:
    """Storage pointer, version counter, dtype and device of each tensor: changes when any of them is replaced,
    moved, cast or updated in place (what a cache of derived copies must be validated against)."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def converted(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself when it already is in ``dtype``; otherwise a cached eval-mode copy in ``dtype``
    (parameters and floating buffers converted, no gradients)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    per_module = _CACHE.setdefault(module, {})
    sig = tensor_signature(list(module.parameters()) + list(module.buffers()))
    hit = per_module.get(dtype)
    if hit is not None and hit[0] == sig:
        return hit[1]
    per_module.pop(dtype, None)  # drop a stale copy before building the next one
    # Convert tensor by tensor into the copy's memo: a plain deepcopy would first duplicate the originals.
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.detach().to(dtype) if b.is_floating_point() else b
    copy_ = copy.deepcopy(module, memo).eval()
    per_module[dtype] = (sig, copy_)
    return copy_
