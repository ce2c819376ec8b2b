"""A model part converted to another dtype for inference, cached per module and kept in sync with it.

Used for the vision tower when the engine computes a bf16/fp16 model in fp32 (CPUs without native bf16
arithmetic run half-precision convolutions and matmuls emulated, several times slower). The copy is
validated on every use by each parameter's storage pointer and version counter, so ``model.to(...)``,
``load_state_dict`` or an optimizer step on the original is picked up. In the copy, patchify convolutions
(kernel = stride, as the Qwen2-VL patch embedding) run as one matmul when the input is a single patch.
"""
from __future__ import annotations

import copy
import threading
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
    with _LOCK:  # concurrent generate calls: one builds, the others then hit the cache
        return _converted(module, dtype)


_LOCK = threading.Lock()


def _converted(module: nn.Module, dtype: torch.dtype) -> nn.Module:
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
    _patchify_as_matmul(copy_)
    per_module[dtype] = (sig, copy_)
    return copy_


class PatchConv(nn.Module):
    """A patchify convolution (kernel = stride, no padding/dilation/groups) that runs as one matmul when each
    input is exactly one patch: (n, C, *kernel) -> (n, out, 1, ..., 1). The Qwen2-VL tower feeds its Conv3d one
    patch per row, and the convolution path (oneDNN) cost ~6 ms per 1024 patches against ~2 ms as a matmul.
    Other inputs go through the convolution. Holds the original module, so the parameters are the same."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    @property
    def weight(self):  # callers read the projection's dtype from .weight (HF PatchEmbed does)
        return self.conv.weight

    @property
    def bias(self):
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        if tuple(x.shape[2:]) != tuple(w.shape[2:]) or x.shape[1] != w.shape[1]:
            return self.conv(x)
        y = torch.nn.functional.linear(x.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1), self.conv.bias)
        return y.view(x.shape[0], w.shape[0], *([1] * (x.dim() - 2)))


def _is_patchify(m: nn.Module) -> bool:
    if not isinstance(m, (nn.Conv2d, nn.Conv3d)):
        return False
    zero = all(p == 0 for p in m.padding) if not isinstance(m.padding, str) else False
    return (tuple(m.kernel_size) == tuple(m.stride) and zero and m.groups == 1 and
            all(d == 1 for d in m.dilation) and m.padding_mode == "zeros")


def _patchify_as_matmul(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if _is_patchify(child):
            setattr(module, name, PatchConv(child))
        else:
            _patchify_as_matmul(child)
