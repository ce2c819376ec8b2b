"""Our decoder loop over a Qwen2/Llama-shaped model's weights, on a compact KV cache.

Three kinds of forward, all returning final-norm hidden states:
- ``prefill``: left-aligned prompts (B, S) with per-row lengths; SDPA attention; the last query's image
  scores from ``ops.image_attention_scores``.
- ``step``: a chunk of C new tokens per row (a latent step C = K+1, a decode step C = 1) on the cache;
  inference uses ``ops.chunk_attention_with_scores`` (reads K/V once, scores on the fly), on CPU in fp32
  after ``ops.rms_norm`` and ``ops.rope_write_kv`` (rotation + cache write in one op); with autograd
  on it uses SDPA over an out-of-place cache (the fused kernels have no backward) and the score op.
- ``logits``: the LM head.

Image scores are summed over layers and heads; selection only needs their order, so the mean over
layers and heads (docs/semantics.md) is not divided out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..models.base import DecoderWeights
from .kv_cache import StaticKVCache
from .weights import PackedWeight, compute_weights

# ``weights=`` default of the forwards: resolve the compute weights for this forward (callers outside generate).
_RESOLVE = object()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as HF Qwen2/Llama: normalise in float32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class DecoderRunner:
    """Runs the text decoder of ``weights`` with the engine's cache and ops.

    positions are (3, B, C) int64 (all three equal for text-only models / arange mode).
    """

    def __init__(self, weights: DecoderWeights, backend: str | None = None, compute_dtype: torch.dtype | None = None):
        self.w = weights
        self.backend = backend
        self.scale = weights.head_dim ** -0.5
        self.compute_dtype = compute_dtype or weights.embed.weight.dtype
        self.gradient_checkpointing = False  # training: recompute each layer in backward
        self._cpu_kernels = "cpu" in ops.available_backends()["cpu"]

    def forward_weights(self):
        """Compute-ready weights for inference forwards (fused QKV / gate-up, packed panels; cached and
        re-validated against the model's parameters, ~0.5 ms on a small model), or None under autograd (training
        runs through the modules). ``generate`` calls it once per call and passes the result to every forward
        (``weights=``): a runner holds weights and configuration only, no per-call state."""
        if torch.is_grad_enabled():
            if self.compute_dtype != self.w.embed.weight.dtype:
                raise RuntimeError("training runs in the model's dtype: build the runner without compute_dtype")
            return None
        cw = compute_weights(self.w, self.compute_dtype)
        if cw is None and self.compute_dtype != self.w.embed.weight.dtype:
            raise RuntimeError("wrapped projections (e.g. LoRA) run in the model's dtype only")
        return cw

    def _weights(self, weights):
        """``weights`` as passed to a forward: the caller's resolved compute weights, or resolve them now."""
        if weights is _RESOLVE or torch.is_grad_enabled():
            return self.forward_weights()
        return weights

    # -- rotary ---------------------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, C, 1, D) for positions (3, B, C), in ``dtype`` (HF computes in fp32 then casts)."""
        inv = self.w.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv  # (3,B,C,D/2)
        sec = self.w.mrope_section
        if sec is not None:
            freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(sec, dim=-1))], dim=-1)
        else:
            freqs = freqs[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.w.rope_scaling).to(dtype)
        sin = (emb.sin() * self.w.rope_scaling).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]

    # -- forwards -------------------------------------------------------------------------------
    def prefill(self, embeds, positions, lens, cache, image_slots=None, scores=None, last_only=False,
                weights=_RESOLVE, prob_dtype=None):
        """embeds (B,S,h) left-aligned prompts, row b valid on [0, lens[b]); returns hidden (B,S,h), or with
        ``last_only`` (B,1,h) of each row's last prompt token (slot lens[b]-1).

        ``last_only`` is what generation needs: the cache still gets every token's K/V, but the last layer runs
        its attention output, o-projection and MLP for that one token (on the compute-weight path: ~1/L of
        the prefill's matmuls saved, and no (B,S,h) output).
        Inference on CPU runs the prompts in groups of rows of at most PREFILL_CHUNK_TOKENS tokens (rows are
        independent in a prefill): a large batch's activations stay those of one group. A GPU keeps one
        pass (its matmuls want the whole batch).

        ``weights``: this call's ``forward_weights()`` (resolved now if not given); ``prob_dtype``: round each
        attention probability to this dtype before it is added into ``scores`` (``score_precision="model"``)."""
        weights = self._weights(weights)
        B, S = embeds.shape[:2]
        budget = PREFILL_CHUNK_TOKENS if embeds.device.type == "cpu" else B * S
        rows = max(1, budget // max(S, 1))
        if B > rows and not torch.is_grad_enabled() and isinstance(cache, StaticKVCache):
            out = embeds.new_empty(B, 1 if last_only else S, embeds.shape[2])
            for r0 in range(0, B, rows):
                r1 = min(B, r0 + rows)
                out[r0:r1] = self.prefill(embeds[r0:r1], positions[:, r0:r1], lens[r0:r1], cache.rows(r0, r1),
                                          None if image_slots is None else image_slots[r0:r1],
                                          None if scores is None else scores[r0:r1], last_only, weights, prob_dtype)
            cache.filled = S
            return out
        # Causal attention needs no padding mask here: prompts are left-aligned, so a valid query (slot < lens)
        # only sees keys before it, all valid. Padded queries compute unused values; later steps read the
        # cache only below lens.
        want = scores is not None and image_slots is not None and image_slots.shape[1] > 0
        ctx = _StepContext("prefill", lens, lens, image_slots if want else None, scores if want else None,
                           mask=None, slots=None, mats=weights, last_only=last_only, prob_dtype=prob_dtype)
        x = self._layers(embeds, positions, cache, ctx)
        cache.lens.copy_(lens)  # in place: captured CUDA graphs hold this tensor
        cache.filled = S
        if last_only and not ctx.trimmed:  # every token went through the last layer: keep the last one
            x = _last_rows(x, ctx)
        return self.final_norm(x, ctx)

    def step(self, embeds, positions, cache, image_slots=None, scores=None, last_only=False, weights=_RESOLVE,
             prob_dtype=None):
        """embeds (B,C,h) appended to every row at slots [lens[b], lens[b]+C); returns hidden (B,C,h), or with
        ``last_only`` (B,1,h) of the chunk's last token (a latent step only feeds that one back; the last layer
        then runs attention output, o-projection and MLP for it alone). ``weights``/``prob_dtype`` as in prefill."""
        weights = self._weights(weights)
        B, C, _ = embeds.shape
        if cache.filled + C > cache.max_len:  # host-side count: no device sync inside a step
            raise RuntimeError(f"KV cache overflow: need {cache.filled + C} slots, have {cache.max_len}")
        slots = cache.slots(C)
        new_lens = cache.lens + C
        want = scores is not None and image_slots is not None and image_slots.shape[1] > 0
        mask = None
        if torch.is_grad_enabled():
            # keys up to the filled length only (every row's slots lie below it): no work on empty slots
            ar = torch.arange(cache.filled + C, device=embeds.device)
            mask = (ar[None, None, :] <= slots[:, :, None])[:, None]  # (B,1,C,filled+C)
        ctx = _StepContext("chunk", cache.lens.clone(), new_lens, image_slots if want else None,
                           scores if want else None, mask=mask, slots=slots, mats=weights,
                           last_only=last_only and C > 1, prob_dtype=prob_dtype)
        x = self._layers(embeds, positions, cache, ctx)
        cache.lens.add_(C)  # in place: a captured CUDA graph keeps reading the same tensor
        cache.filled += C
        if ctx.last_only and not ctx.trimmed:  # every token went through the last layer: keep the last one
            x = _last_rows(x, ctx)
        return self.final_norm(x, ctx)

    def _norm(self, x, weight, ctx):
        """RMSNorm: one compiled op on the CPU fp32 inference path (six torch ops otherwise)."""
        if ctx.cpu_fp32:
            return ops.rms_norm(x, weight, self.w.rms_eps, backend="cpu")
        return rms_norm(x, weight, self.w.rms_eps)

    def final_norm(self, x, ctx):
        return self._norm(x, ctx.mats.norm if ctx.mats is not None else self.w.norm.weight, ctx)

    def _layers(self, x, positions, cache, ctx):
        # The compiled CPU glue (rms_norm; rope_write_kv for a chunk on a StaticKVCache): fp32 inference on CPU.
        ctx.cpu_fp32 = (ctx.mats is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                        and self._cpu_kernels and self.backend in (None, "cpu"))
        ctx.fused_glue = (ctx.cpu_fp32 and ctx.mode == "chunk" and ctx.mask is None
                          and isinstance(cache, StaticKVCache) and cache.k.dtype == torch.float32)
        cos, sin = self.rotary(positions, x.dtype)
        n = len(self.w.layers)
        for i in range(n):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._checkpointed_layer(i, x, cos, sin, cache, ctx)
            else:
                # last layer of a last_only inference forward: the rest of the layer for each row's last token
                last = i == n - 1 and ctx.last_only and ctx.mats is not None  # (mats: no autograd)
                x = self._layer(i, x, cos, sin, cache, ctx, last)
                ctx.trimmed = ctx.trimmed or last
        return x

    def _checkpointed_layer(self, i, x, cos, sin, cache, ctx):
        """Recompute layer i in backward. The layer's cache write is made a pure function of the cache it
        started from, so the recomputation sees the same inputs as the forward did."""
        def run(x, k_prev, v_prev):
            cache.k[i], cache.v[i] = k_prev, v_prev
            y = self._layer(i, x, cos, sin, cache, ctx.without_scores() if replaying[0] else ctx)
            return y, cache.k[i], cache.v[i]

        replaying = [False]
        k0, v0 = cache.layer(i)
        from torch.utils.checkpoint import checkpoint

        def run_once_then_replay(*a):
            out = run(*a)
            replaying[0] = True  # later calls are backward recomputations: do not add scores twice
            return out

        y, cache.k[i], cache.v[i] = checkpoint(run_once_then_replay, x, k0, v0, use_reentrant=False)
        return y

    def _layer(self, i, x, cos, sin, cache, ctx, last_token=False):
        """One decoder layer on our fused weights. x (B,C,h); cos/sin (B,C,1,D). The two halves are separate
        calls so each one's temporaries (qkv, rotated q/k, attention output) are freed before the next.
        ``last_token``: every token's K/V go to the cache, the rest of the layer runs for each row's last token
        only, x (B,C,h) -> (B,1,h) (the last layer when a forward's caller feeds back one hidden state)."""
        a = self._attention_block(i, x, cos, sin, cache, ctx, last_token)
        x = (_last_rows(x, ctx) if last_token else x) + a
        return x + self._mlp_block(i, x, ctx)

    def _attention_block(self, i, x, cos, sin, cache, ctx, last_token=False):
        lw = self.w.layers[i]
        m = ctx.mats.layers[i] if ctx.mats is not None else None
        B, C, _ = x.shape
        H, Hkv, D = self.w.num_heads, self.w.num_kv_heads, self.w.head_dim
        h = self._norm(x, m.in_norm if m else lw.input_norm.weight, ctx)
        if m is not None and ctx.fused_glue:  # one op for rope + cache write, then the fused attention
            kc, vc = cache.layer(i)
            qkv = self._linear(h, m.qkv, m.qkv_b)
            if m.q_norm is not None:  # Chameleon: q and k normalised per head before rotary, in place
                nq, nk = H * D, Hkv * D
                qkv[..., :nq] = self._qk_norm(qkv[..., :nq].view(B, C, H, D), *m.q_norm).view(B, C, nq)
                qkv[..., nq:nq + nk] = self._qk_norm(qkv[..., nq:nq + nk].view(B, C, Hkv, D), *m.k_norm).view(B, C, nk)
            q = ops.rope_write_kv(qkv, cos, sin, kc, vc, ctx.slots, H, Hkv, backend="cpu")
            if last_token:
                q = q[:, -1:]
            o = ops.chunk_attention_with_scores(q, kc, vc, ctx.new_lens, ctx.image_slots, ctx.scores, self.scale,
                                                prob_dtype=ctx.prob_dtype, backend=self.backend)
            return self._linear(o.reshape(B, -1, H * D), m.o, m.o_b)
        if m is not None:
            nq, nk = H * D, Hkv * D
            qkv = self._linear(h, m.qkv, m.qkv_b)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = lw.attn.q_proj(h), lw.attn.k_proj(h), lw.attn.v_proj(h)
        del h
        q, k = q.view(B, C, H, D), k.view(B, C, Hkv, D)
        if lw.q_norm is not None:  # Chameleon: per-head LayerNorm of q and k before rotary
            q = self._qk_norm(q, *(m.q_norm if m is not None else (lw.q_norm.weight, lw.q_norm.bias)))
            k = self._qk_norm(k, *(m.k_norm if m is not None else (lw.k_norm.weight, lw.k_norm.bias)))
        q = _rope(q, cos, sin)
        k = _rope(k, cos, sin)
        o = self.attend(i, q, k, v.view(B, C, Hkv, D), cache, ctx, last_token).reshape(B, -1, H * D)
        return self._linear(o, m.o, m.o_b) if m is not None else lw.attn.o_proj(o)

    def _qk_norm(self, x, weight, bias):
        """Chameleon's query/key LayerNorm: x (B,C,heads,D) normalised over D without affine, then each head's own
        weight and bias (heads, D), exactly as its ChameleonLayerNorm computes it."""
        return F.layer_norm(x, (x.shape[-1],), None, None, eps=self.w.qk_norm_eps) * weight + bias

    def _mlp_block(self, i, x, ctx):
        lw = self.w.layers[i]
        m = ctx.mats.layers[i] if ctx.mats is not None else None
        h = self._norm(x, m.post_norm if m else lw.post_norm.weight, ctx)
        if m is not None:
            return _mlp_in_chunks(h, m, self._linear)
        return lw.mlp.down_proj(F.silu(lw.mlp.gate_proj(h)) * lw.mlp.up_proj(h))

    def _linear(self, x, w, b):
        """x @ w.T + b on compute weights: a tensor in the compute dtype, or bf16 panels (PackedWeight)."""
        if isinstance(w, PackedWeight):
            return ops.mixed_linear(x, w.panels, w.out_features, b,
                                    backend="cpu" if self.backend in (None, "cpu") else "torch")
        return F.linear(x, w, b)

    def attend(self, i, q, k, v, cache, ctx, last_token=False):
        """Write layer i's new k, v (B,C,Hkv,D) into the cache and attend with q (B,C,H,D) -> (B,C,H,D), or
        with ``last_token`` only each row's last query -> (B,1,H,D) (inference).

        Also adds the last query's image scores into ``ctx.scores`` when asked. Shared by both runners.
        """
        H, Hkv = q.shape[2], k.shape[2]
        B = q.shape[0]
        if last_token:  # cache every token's K/V, then one query per row over its cache: the chunk kernel
            if ctx.mode == "prefill":
                cache.write_prompt(i, k, v)
                kc, vc = cache.layer(i)
            else:
                kc, vc = cache.write_chunk(i, k, v, ctx.slots)
            return ops.chunk_attention_with_scores(_last_rows(q, ctx), kc, vc, ctx.new_lens, ctx.image_slots,
                                                   ctx.scores, self.scale, prob_dtype=ctx.prob_dtype,
                                                   backend=self.backend)
        if ctx.mode == "prefill":
            cache.write_prompt(i, k, v)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=H != Hkv,
            ).transpose(1, 2)
            if ctx.scores is not None:
                kc, _ = cache.layer(i)
                with torch.no_grad():
                    q_last = q[torch.arange(B, device=q.device), ctx.new_lens - 1].detach()  # (B,H,D)
                    ops.image_attention_scores(q_last, kc.detach(), ctx.new_lens, ctx.image_slots, ctx.scores,
                                               self.scale, prob_dtype=ctx.prob_dtype, backend=self.backend)
            return o
        kc, vc = cache.write_chunk(i, k, v, ctx.slots)
        if ctx.mask is not None:  # autograd on: SDPA (differentiable) + the score op on the side
            n = ctx.mask.shape[-1]
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), kc[:, :, :n], vc[:, :, :n], attn_mask=ctx.mask, scale=self.scale,
                enable_gqa=H != Hkv,
            ).transpose(1, 2)
            if ctx.scores is not None:
                with torch.no_grad():
                    ops.image_attention_scores(q[:, -1].detach(), kc.detach(), ctx.new_lens, ctx.image_slots,
                                               ctx.scores, self.scale, prob_dtype=ctx.prob_dtype, backend=self.backend)
            return o
        return ops.chunk_attention_with_scores(q, kc, vc, ctx.new_lens, ctx.image_slots, ctx.scores, self.scale,
                                               prob_dtype=ctx.prob_dtype, backend=self.backend)

    def logits(self, hidden: torch.Tensor, weights=_RESOLVE) -> torch.Tensor:
        """(..., h) final-norm hidden states -> (..., V) logits. ``weights`` as in prefill."""
        cw = self._weights(weights)
        out = self.w.lm_head(hidden) if cw is None else self._linear(hidden, cw.lm_head, cw.lm_head_b)
        if self.w.suppressed_token_ids is not None:  # what the model's own forward does (Chameleon's image tokens)
            ids = self.w.suppressed_token_ids.to(out.device)
            out = out.index_fill(-1, ids, torch.finfo(out.dtype).min)
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings in the compute dtype."""
        return self.w.embed(ids).to(self.compute_dtype)


# CPU inference prefills run over groups of whole rows of at most this many tokens (one row if it is longer):
# large enough for full-speed matmuls, small enough that a batch's activations stay a few MiB.
PREFILL_CHUNK_TOKENS = 1024

# Inference MLPs run over at most this many tokens at a time: a batched prefill otherwise holds the
# (tokens x 2*intermediate) activations of a whole batch at once, the largest buffer of the forward.
MLP_CHUNK_TOKENS = 512


def _last_rows(t: torch.Tensor, ctx) -> torch.Tensor:
    """(B,C,...) -> (B,1,...): each row's last token of the forward (prefill: slot lens-1; chunk: the last)."""
    if ctx.mode == "prefill":
        return t[torch.arange(t.shape[0], device=t.device), ctx.new_lens - 1][:, None]
    return t[:, -1:]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with two temporaries instead of four (same arithmetic, same order)."""
    r = _rotate_half(x).mul_(sin)
    return r.add_(x * cos)


def _mlp_in_chunks(h: torch.Tensor, m, linear) -> torch.Tensor:
    """SwiGLU MLP of h (B, C, hidden) on fused weights, MLP_CHUNK_TOKENS tokens at a time (inference only).
    ``linear(x, w, b)`` is the runner's projection."""
    def mlp(x):
        g, u = linear(x, m.gate_up, m.gate_up_b).chunk(2, dim=-1)
        return linear(F.silu(g, inplace=True).mul_(u), m.down, m.down_b)

    flat = h.reshape(-1, h.shape[-1])
    if flat.shape[0] <= MLP_CHUNK_TOKENS:
        return mlp(h)
    out = flat.new_empty(flat.shape[0], m.down.shape[0])
    for s in range(0, flat.shape[0], MLP_CHUNK_TOKENS):
        out[s:s + MLP_CHUNK_TOKENS] = mlp(flat[s:s + MLP_CHUNK_TOKENS])
    return out.view(*h.shape[:-1], -1)


@dataclass
class _StepContext:
    """Per-forward metadata every layer needs (one object, as nano-vllm's context)."""

    mode: str                      # "prefill" or "chunk"
    lens: torch.Tensor             # (B,) cache lengths before this forward
    new_lens: torch.Tensor         # (B,) after it
    image_slots: torch.Tensor | None
    scores: torch.Tensor | None    # (B,I) float32 accumulator, or None when no selection follows
    mask: torch.Tensor | None      # bool attention mask for SDPA (a chunk under autograd; prefill is causal)
    slots: torch.Tensor | None     # (B,C) cache slots of the chunk
    mats: object = None            # ComputeWeights of this forward (inference), None: the HF modules (autograd)
    last_only: bool = False        # only each row's last token leaves the last layer (the caller feeds it back)
    prob_dtype: torch.dtype | None = None  # round attention probabilities to it before scoring (or None)
    cpu_fp32: bool = False         # compiled CPU glue ops (rms_norm) on this forward (set by _layers)
    fused_glue: bool = False       # rope + cache write through ops.rope_write_kv (set by _layers)
    trimmed: bool = False          # set by _layers when the last layer ran for that token only

    def without_scores(self) -> "_StepContext":
        return dataclasses.replace(self, image_slots=None, scores=None, trimmed=False)
