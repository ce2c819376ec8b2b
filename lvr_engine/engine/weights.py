"""Compute-ready decoder weights for the lean runner, cached per model and shared by every runner.

In the model's own dtype the QKV and gate/up projections are fused by concatenation and the HF parameters
are re-pointed to views of the fused tensors, so there is still one copy of every weight. In another compute
dtype (fp32 for a bf16 model on a CPU without native bf16, where bf16 matmuls are emulated and several
times slower) the runner holds a converted copy. The cache is validated on every forward by each
parameter's storage pointer and version counter, so ``model.to(...)`` or an optimizer step is picked up.
"""
from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..models.base import DecoderWeights
from ..models.converted import tensor_signature


@dataclass
class PackedWeight:
    """A bf16 (N, K) matrix in ops.mixed_linear's panel layout: multiplied in fp32 without an fp32 copy."""

    panels: torch.Tensor  # (ceil(N/16), K, 16) bfloat16
    out_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.panels.shape[1]


@dataclass
class LayerMats:
    """One layer's matrices (tensors in the compute dtype, or PackedWeight) and biases/norms (compute dtype)."""

    qkv: torch.Tensor | PackedWeight
    qkv_b: torch.Tensor | None
    o: torch.Tensor | PackedWeight
    o_b: torch.Tensor | None
    gate_up: torch.Tensor | PackedWeight
    gate_up_b: torch.Tensor | None
    down: torch.Tensor | PackedWeight
    down_b: torch.Tensor | None
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: tuple[torch.Tensor, torch.Tensor] | None = None  # Chameleon: (weight, bias) (heads, head_dim) of q's
    k_norm: tuple[torch.Tensor, torch.Tensor] | None = None  # LayerNorm and k's; None for Qwen2/Llama layers


@dataclass
class ComputeWeights:
    dtype: torch.dtype
    layers: list[LayerMats]
    norm: torch.Tensor
    lm_head: torch.Tensor | PackedWeight
    lm_head_b: torch.Tensor | None


# model (its embedding module) -> {compute dtype: (signature, ComputeWeights)}
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); otherwise torch emulates it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        cap = torch.backends.cpu.get_cpu_capability().upper()
        return "BF16" in cap or "AMX" in cap


def auto_compute_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The model's dtype, except fp32 for half-precision models on CPUs without native bf16 arithmetic."""
    if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        return torch.float32
    return model_dtype


def _params(w: DecoderWeights) -> list[torch.Tensor]:
    out = []
    for l in w.layers:
        for m in (l.attn.q_proj, l.attn.k_proj, l.attn.v_proj, l.attn.o_proj, l.mlp.gate_proj, l.mlp.up_proj,
                  l.mlp.down_proj):
            out.append(m.weight)
            if m.bias is not None:
                out.append(m.bias)
        out += [l.input_norm.weight, l.post_norm.weight]
        for qk in (l.q_norm, l.k_norm):
            if qk is not None:
                out += [qk.weight, qk.bias]
    out += [w.norm.weight, w.lm_head.weight]
    return out


def _signature(w: DecoderWeights):
    return tensor_signature(_params(w))


def plain_linears(w: DecoderWeights) -> bool:
    """False when some projection is wrapped (e.g. peft LoRA): then the runner must call the modules."""
    return all(type(m) is nn.Linear for l in w.layers for m in (l.attn.q_proj, l.attn.k_proj, l.attn.v_proj,
               l.attn.o_proj, l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj)) and type(w.lm_head) is nn.Linear


def compute_weights(w: DecoderWeights, dtype: torch.dtype) -> ComputeWeights | None:
    """Cached compute-ready weights in ``dtype`` (None when the projections are wrapped modules). Thread-safe:
    concurrent ``generate`` calls validate (and at most one builds or re-points) under one lock."""
    if not plain_linears(w):
        return None
    with _BUILD_LOCK:
        return _compute_weights(w, dtype)


# building re-points the HF parameters into fused tensors: two threads must not do it at once
_BUILD_LOCK = threading.RLock()


def _compute_weights(w: DecoderWeights, dtype: torch.dtype) -> ComputeWeights:
    per_model = _CACHE.setdefault(w.embed, {})
    sig = _signature(w)
    hit = per_model.get(dtype)
    if hit is not None and hit[0] == sig:
        return hit[1]
    same = w.embed.weight.dtype == dtype
    conv = (lambda t: t) if same else (lambda t: None if t is None else t.detach().to(dtype).contiguous())
    packed = not same and packs_for_mixed_linear(w, dtype)

    def mat(linears: list[nn.Linear]):
        """(weight, bias) of the projections fused along the output axis."""
        if len(linears) == 1:  # o, down, lm_head (possibly tied to the embeddings): never re-pointed
            W, b = linears[0].weight.data, _data(linears[0].bias)
            if same:
                return W, b
        elif same:  # fuse and re-point the HF parameters into the fused tensors: still one copy
            return _fuse_in_place(linears)
        else:  # packed: concatenate in bf16 and pack; otherwise concatenate straight in the compute dtype
            W, b = _fused_copy(linears, w.embed.weight.dtype if packed else dtype)
        if packed:
            return PackedWeight(ops.pack_mixed_weight(W), W.shape[0]), conv(b)
        return conv(W), conv(b)

    layers = []
    for l in w.layers:
        a, m = l.attn, l.mlp
        qk = [None if n is None else (conv(n.weight.data), conv(n.bias.data)) for n in (l.q_norm, l.k_norm)]
        layers.append(LayerMats(*mat([a.q_proj, a.k_proj, a.v_proj]), *mat([a.o_proj]),
                                *mat([m.gate_proj, m.up_proj]), *mat([m.down_proj]),
                                conv(l.input_norm.weight.data), conv(l.post_norm.weight.data), *qk))
    cw = ComputeWeights(dtype, layers, conv(w.norm.weight.data), *mat([w.lm_head]))
    per_model[dtype] = (_signature(w), cw)  # after re-pointing, so the next call hits
    return cw


def packs_for_mixed_linear(w: DecoderWeights, dtype: torch.dtype) -> bool:
    """fp32 compute of a bf16 model on CPU with the compiled kernel: packed bf16 panels instead of an fp32 copy
    (ops.mixed_linear reads half the bytes and, measured on AVX2, multiplies faster than sgemm on the copy)."""
    if dtype != torch.float32 or w.embed.weight.dtype != torch.bfloat16 or w.embed.weight.device.type != "cpu":
        return False
    return "cpu" in ops.available_backends()["cpu"]


def _data(t):
    return None if t is None else t.data


def _fused_copy(linears: list[nn.Linear], dtype):
    W = torch.cat([m.weight.detach().to(dtype) for m in linears], dim=0)
    if not any(m.bias is not None for m in linears):
        return W, None
    b = torch.cat([(m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)).to(dtype)
                   for m in linears])
    return W, b


def _fuse_in_place(linears: list[nn.Linear]):
    """Concatenate the weights (and biases) of ``linears`` and re-point each module at its slice.

    Already fused (each weight the next slice of one storage, as a previous call leaves them): the fused
    view is returned without copying, so rebuilding the cache after an in-place update (a version bump, e.g.
    an optimizer step) does not copy the weights again."""
    W = _fused_view([m.weight.data for m in linears])
    b = None
    if all(m.bias is not None for m in linears):
        b = _fused_view([m.bias.data for m in linears])
    if W is not None and (b is not None or not any(m.bias is not None for m in linears)):
        return W, b
    W = torch.cat([m.weight.data for m in linears], dim=0)
    if any(m.bias is not None for m in linears):
        b = torch.cat([m.bias.data if m.bias is not None else
                       torch.zeros(m.out_features, dtype=W.dtype, device=W.device) for m in linears])
    off = 0
    for m in linears:
        n = m.out_features
        m.weight.data = W[off:off + n]
        if m.bias is not None:
            m.bias.data = b[off:off + n]
        off += n
    return W, b


def _fused_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor over ``parts`` concatenated on dim 0 when they already lie back to back in one storage."""
    first = parts[0]
    if not all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:] and
               p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for p in parts):
        return None
    off = first.storage_offset()
    for p in parts:
        if p.storage_offset() != off:
            return None
        off += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))
