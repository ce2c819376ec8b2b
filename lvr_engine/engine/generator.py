"""LatentGenerator: KV-cached, batched latent decoding with the semantics of docs/semantics.md."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import ops
from ..models import adapter_for
from .config import LatentConfig
from .cuda_graphs import GraphedSteps, Workspace, _round_up, bucket_for
from .hf_runner import HFModuleRunner
from .inputs import as_tensor, check_capacity, consume_placeholders, token_ids, validate_and_layout
from .kv_cache import StaticKVCache
from .latent_step import begin_segment, mirage_switch, run_latent_steps
from .prompt import next_positions, prepare_prompt
from .runner import DecoderRunner
from .sampler import Sampler, SamplingParams
from .weights import auto_compute_dtype


@dataclass
class GenerationStats:
    """Per-call accounting. Times are wall seconds (device-synchronised at phase boundaries)."""

    batch_size: int = 0
    forward_passes: int = 0
    prefill_s: float = 0.0
    latent_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    latent_positions: int = 0      # positions appended by latent steps (and markers), per row
    new_tokens: int = 0            # tokens generated over all rows, up to and including EOS
    ops_backend: str = ""

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.latent_s + self.decode_s


@dataclass
class GenerationOutput:
    sequences: torch.Tensor        # (B, T) new tokens only; rows that stopped at EOS are padded after it
    selected: torch.Tensor         # (B, N, K) chosen image-token indices per latent step
    latents: torch.Tensor | None = None  # (B, N, K+1, h) each latent step's input block, if return_latents
    stats: GenerationStats = field(default_factory=GenerationStats)


class LatentGenerator:
    """Runs latent reasoning (IVT-LR / Coconut / Mirage) or plain decoding on a transformers model.

    ``model`` is a transformers instance of a supported family (Qwen2-VL, Qwen2.5-VL, Qwen2, Llama; other
    ``*ForCausalLM`` models laid out as ``model.model.layers`` run on the HF-module runner);
    ``processor`` (or a tokenizer) is only needed to resolve token names in ``config``;
    ``runner``: "lean" (our decoder loop over the weights), "hf" (the model's own layer modules with our
    cache and ops) or "auto" (lean where the family has it).
    ``compute_dtype``: "auto" computes in the model's dtype, except fp32 for a bf16/fp16 model on a CPU without
    native bf16 arithmetic (AVX2-only CPUs emulate bf16 matmuls several times slower than fp32); the lean
    runner then multiplies by the bf16 weights packed in panels (ops.mixed_linear), with no fp32 copy.
    """

    def __init__(self, model, config: LatentConfig | None = None, processor=None, runner: str = "auto",
                 cuda_graphs: bool | str = "auto", compute_dtype: torch.dtype | str = "auto"):
        if runner not in ("auto", "lean", "hf"):
            raise ValueError(f"runner must be 'auto', 'lean' or 'hf', got {runner!r}")
        if cuda_graphs not in ("auto", True, False, "emulate"):
            raise ValueError(f"cuda_graphs must be 'auto', True, False or 'emulate', got {cuda_graphs!r}")
        self.adapter = adapter_for(model)  # TypeError for unsupported classes
        self.model = model
        self.processor = processor
        config = config if config is not None else LatentConfig()
        if not isinstance(config, LatentConfig):
            raise TypeError(f"config must be a LatentConfig, got {type(config).__name__}")
        if not config.resolved:
            tok = getattr(processor, "tokenizer", processor)
            if tok is None:
                names = {f: getattr(config, f) for f in config.token_fields() if isinstance(getattr(config, f), str)}
                raise ValueError(f"LatentConfig token fields {names} are token names; pass processor= (or a "
                                 "tokenizer) to resolve them, or give ids")
            config = config.resolve_tokens(tok)
        self.config = config.replace()  # the generator's own copy: assigning to it never changes the caller's
        self._built_backend = config.backend  # the runner below is built for it
        self._checked_config()
        if runner == "lean" and not self.adapter.lean_runner:
            raise ValueError(f"no lean runner for {type(model).__name__}; use runner='hf' or 'auto'")
        use_lean = runner == "lean" or (runner == "auto" and self.adapter.lean_runner)
        model_dtype = self.adapter.dtype
        if compute_dtype == "auto":
            compute_dtype = auto_compute_dtype(model_dtype, self.device) if use_lean else model_dtype
        elif not isinstance(compute_dtype, torch.dtype):
            raise TypeError(f"compute_dtype must be 'auto' or a torch.dtype, got {compute_dtype!r}")
        elif compute_dtype != model_dtype and not use_lean:
            raise ValueError("the HF-module runner computes in the model's dtype; compute_dtype needs runner='lean'")
        if use_lean:
            self.runner = DecoderRunner(self.adapter.decoder_weights(), backend=config.backend,
                                        compute_dtype=compute_dtype)
        else:
            self.runner = HFModuleRunner(self.adapter.decoder_weights(), backend=config.backend)
        on_cuda = self.device.type == "cuda"
        if cuda_graphs is True and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        # "emulate" runs the graph path's static-buffer plumbing without capture (tests on CPU)
        self.graph_mode = {"auto": "cuda" if on_cuda else None, True: "cuda", False: None,
                           "emulate": "emulate"}[cuda_graphs]
        self._workspaces: dict[int, tuple] = {}  # bucket -> (Workspace, GraphedSteps)
        self._graph_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, config: LatentConfig | None = None, dtype=None, device=None, runner="auto"):
        """Load a local checkpoint directory (model + its processor/tokenizer) and build a generator.

        With ``config=None`` the latent setup the model was trained with (its ``lvr_config.json``, written by
        ``lvr train``) is used when present, else the defaults."""
        from ..models.loading import load_checkpoint, read_lvr_meta

        meta = read_lvr_meta(path) if config is None and os.path.isdir(os.fspath(path)) else None
        if meta is not None:
            try:
                config = LatentConfig(**meta["latent_config"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"corrupt lvr_config.json in {path}: {e}") from e
        model, processor = load_checkpoint(path, dtype=dtype, device=device)
        return cls(model, config, processor=processor, runner=runner)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, latent_hook=None,
                 return_latents: bool = False) -> GenerationOutput:
        """Generate for a batch of prompts. Shapes: input_ids/attention_mask/mm_token_type_ids (B, S);
        pixel_values (num_patches, C*T*P*P) and image_grid_thw (num_images, 3) as the processor returns.

        ``latent_hook(t, block)`` (analysis / interventions): called with the 0-based latent step and its input
        block (B, K+1, h) = [z_t; h_t] before it is fed; may modify it in place or return a replacement.
        ``return_latents`` keeps every step's (possibly modified) block in ``out.latents`` (B, N, K+1, h).
        With CUDA graphs the batch is padded to its bucket with dummy rows; the hook sees them too.
        The model's weights are read once per call: a hook must not modify them.
        """
        # Thread safety: the eager path keeps every buffer per call; the graph path replays on the bucket's
        # persistent workspace, so graphed calls on one generator run one at a time.
        with self._graph_lock if self.graph_mode is not None else contextlib.nullcontext():
            return self._generate(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                  max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id,
                                  pad_token_id, latent_hook, return_latents)

    def _generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, max_new_tokens,
                  do_sample, temperature, top_k, top_p, seed, eos_token_id, pad_token_id, latent_hook,
                  return_latents):
        cfg = self._checked_config()
        prompt_trigger = cfg.trigger == "prompt"
        N = cfg.num_latent_steps if prompt_trigger else 0
        K = cfg.num_selected_patches if N > 0 else 0
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        vocab = self.adapter.vocab_size
        eos = self._eos_ids(eos_token_id, vocab)
        pad_id = (self.adapter.pad_token_id if pad_token_id is None
                  else token_ids("pad_token_id", pad_token_id, vocab)[0])
        cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids = (
            as_tensor(n, x) for n, x in (("input_ids", input_ids), ("attention_mask", attention_mask),
                                         ("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                                         ("mm_token_type_ids", mm_token_type_ids)))
        input_ids, attention_mask = cpu(input_ids), cpu(attention_mask)
        if prompt_trigger and cfg.placeholder_id is not None:  # the official layout: prompt + N <|latent|> [+ end]
            attention_mask = consume_placeholders(input_ids, attention_mask, cfg.placeholder_id, N,
                                                  cfg.end_marker_id if N > 0 else None)
        batch = validate_and_layout(self.adapter, input_ids, attention_mask, pixel_values,
                                    cpu(image_grid_thw), mm_token_type_ids, max_new_tokens, N, K)
        use_start = N > 0 and cfg.start_marker_id is not None
        use_end = N > 0 and cfg.end_marker_id is not None
        latent_len = N * (K + 1) + (1 if use_end else 0) + (1 if use_start else 0)
        w = self.runner.w
        check_capacity(self.adapter, len(w.layers), w.num_kv_heads, w.head_dim, self.runner.compute_dtype,
                       bucket_for(batch.ids.shape[0]) if self.graph_mode else batch.ids.shape[0],
                       int(batch.lens.max()), latent_len, int(max_new_tokens))
        max_new_tokens = int(max_new_tokens)
        weights = self.runner.forward_weights()  # validated once; every forward of this call reads these
        B_real = batch.ids.shape[0]
        if self.graph_mode is not None and bucket_for(B_real) > B_real:
            # Graph replays have fixed batch sizes: add one-token dummy rows up to the bucket (dropped at the end).
            input_ids, attention_mask, mm_token_type_ids = _pad_rows(
                input_ids, attention_mask, mm_token_type_ids, bucket_for(B_real) - B_real, pad_id)
            batch = validate_and_layout(self.adapter, input_ids, attention_mask, pixel_values, cpu(image_grid_thw),
                                        mm_token_type_ids, max_new_tokens, 0, 0)

        dev, dtype = self.device, self.runner.compute_dtype
        B = batch.ids.shape[0]
        stats = GenerationStats(batch_size=B, ops_backend=ops.resolve_backend(cfg.backend, dev.type))
        t0 = _now(dev)

        # -- prompt: embeddings with images scattered in, positions, optional start marker -----------------
        p = prepare_prompt(self.adapter, self.runner.embed, batch, input_ids, pixel_values, image_grid_thw,
                           mm_token_type_ids, cfg.position_mode, cfg.start_marker_id if use_start else None,
                           dev, dtype)
        S = p.embeds.shape[1]
        stats.prompt_tokens = int(batch.lens.sum())
        stats.latent_positions = latent_len
        steps = self._steps(B, S + latent_len + max_new_tokens, p.image_slots, dtype, dev)
        cache = steps.cache
        if steps.image_slots is not None:  # persistent (graph) buffers are wider: pad the per-call tensors
            width = steps.image_slots.shape[1]
            p.image_slots = steps.image_slots
            p.image_embeds = torch.nn.functional.pad(p.image_embeds, (0, 0, 0, width - p.image_embeds.shape[1]))
        end_embed = self.runner.embed(torch.tensor([cfg.end_marker_id], device=dev))[0] if use_end else None
        seg = begin_segment(p, N, K, patch_order=cfg.patch_order, score_precision=cfg.score_precision,
                            model_dtype=self.adapter.dtype, num_score_terms=len(w.layers) * w.num_heads,
                            end_embed=end_embed, backend=cfg.backend, scores=steps.scores)
        select = K > 0 and N > 0
        steps.bind(p.image_slots, seg.scores, seg.prob_dtype)

        # -- prefill --------------------------------------------------------------------------------------
        h_last = self.runner.prefill(p.embeds, p.positions, p.lens, cache, p.image_slots if select else None,
                                     seg.scores if select else None, last_only=True, weights=weights,
                                     prob_dtype=seg.prob_dtype)[:, 0]
        p.embeds = None  # the prompt's (B,S,h) embeddings are in the cache now
        stats.forward_passes += 1
        t1 = _now(dev)
        stats.prefill_s = t1 - t0

        # -- latent segment (trigger="prompt"): docs/semantics.md ------------------------------------------
        kept = [] if return_latents else None
        if N > 0:
            def forward(chunk, with_scores, _last):
                stats.forward_passes += 1
                return steps.step(chunk, next_positions(cache.lens, p.offset, chunk.shape[1]), with_scores, weights,
                                  last_only=True)

            buf = torch.empty(B, K + 1, w.embed.weight.shape[1], dtype=dtype, device=dev)
            out, _ = run_latent_steps(seg, h_last, forward, hook=_checked_hook(latent_hook), keep=kept, buf=buf)
            h_last = out[:, -1]
        t2 = _now(dev)
        stats.latent_s = t2 - t1

        # -- decoding -------------------------------------------------------------------------------------
        sampler = Sampler(sampling, dev)
        decode = self._decode_text if prompt_trigger else self._decode_token_trigger
        seqs = decode(h_last, steps, p.offset, max_new_tokens, sampler, eos, pad_id, stats, B_real, weights)
        stats.decode_s = _now(dev) - t2
        latents = torch.stack(kept, 1)[:B_real] if kept else None
        stats.batch_size = B_real  # dummy rows of a graph bucket are not questions
        selected = seg.selected_tensor()[:B_real]
        return GenerationOutput(sequences=seqs[:B_real], selected=selected, latents=latents, stats=stats)

    def _steps(self, B, max_len, image_slots, dtype, dev):
        """The step executor: eager on a per-call cache, or graphed on the bucket's persistent workspace."""
        if self.graph_mode is None:
            w = self.runner.w
            cache = StaticKVCache(len(w.layers), B, w.num_kv_heads, max_len, w.head_dim, dtype, dev)
            return _EagerSteps(self.runner, cache)
        ws, graphs = self._workspaces.get(B, (None, None))
        if ws is None or not ws.fits(max_len, image_slots.shape[1]):
            # grow in coarse steps so the captured graphs survive most later calls
            ws = Workspace(self.runner, B, _round_up(max(max_len, ws.max_len if ws else 0), 256),
                           _round_up(max(image_slots.shape[1], ws.max_images if ws else 0, 1), 64), dtype, dev)
            graphs = GraphedSteps(self.runner, ws, self.graph_mode)
            self._workspaces[B] = (ws, graphs)
        ws.load(image_slots)
        return _GraphSteps(graphs)

    # ------------------------------------------------------------------------------------------------
    def _decode_text(self, h_last, steps, offset, max_new_tokens, sampler, eos, pad_id, stats, B_real, weights):
        B, dev = h_last.shape[0], h_last.device
        eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
        finished = torch.arange(B, device=dev) >= B_real  # padding rows of a graph bucket never run
        out = []
        logits = self.runner.logits(h_last, weights)
        for t in range(max_new_tokens):
            tok = sampler(logits)
            tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
            stats.new_tokens += int((~finished).sum())
            out.append(tok)
            if t > 0 or not self.config.ignore_first_eos:  # the official IVT-LR loop never checks the first token
                finished |= torch.isin(tok, eos_t)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            hidden = steps.step(self.runner.embed(tok)[:, None], next_positions(steps.cache.lens, offset, 1), False,
                                weights)
            stats.forward_passes += 1
            logits = self.runner.logits(hidden[:, -1], weights)
        return torch.stack(out, 1)

    def _decode_token_trigger(self, h_last, steps, offset, max_new_tokens, sampler, eos, pad_id, stats, B_real,
                              weights):
        """Mirage: rows switch into hidden-state feedback after ``latent_start_id`` and out at ``latent_end_id``."""
        cfg = self.config
        B, dev = h_last.shape[0], h_last.device
        eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
        finished = torch.arange(B, device=dev) >= B_real
        latent = torch.zeros(B, dtype=torch.bool, device=dev)   # row is inside a latent segment
        count = torch.zeros(B, dtype=torch.long, device=dev)    # latent steps fed in the current segment
        full = lambda v: torch.full((B,), v, dtype=torch.long, device=dev)  # noqa: E731
        out = []
        logits = self.runner.logits(h_last, weights)
        for t in range(max_new_tokens):
            live_latent = latent & ~finished
            tok, feed_hidden, latent, count = mirage_switch(cfg, sampler(logits), live_latent, count)
            tok = torch.where(finished, full(pad_id), tok)  # finished rows' state no longer matters
            stats.new_tokens += int((~finished).sum())
            out.append(tok)
            finished |= ~live_latent & torch.isin(tok, eos_t)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            x = torch.where(feed_hidden[:, None], h_last, self.runner.embed(tok))
            hidden = steps.step(x[:, None], next_positions(steps.cache.lens, offset, 1), False, weights)
            stats.forward_passes += 1
            h_last = hidden[:, -1]
            logits = self.runner.logits(h_last, weights)
        return torch.stack(out, 1)

    # ------------------------------------------------------------------------------------------------
    def _eos_ids(self, eos_token_id, vocab) -> list[int]:
        if eos_token_id is None:
            return self.adapter.eos_token_ids
        return token_ids("eos_token_id", eos_token_id, vocab, allow_empty=True)  # []: no stop token

    def _checked_config(self) -> LatentConfig:
        """``self.config`` re-validated at each call (it is a public, mutable attribute): its values, its token ids
        resolved and within the vocabulary, and what the model supports."""
        cfg = self.config
        if not isinstance(cfg, LatentConfig):
            raise TypeError(f"generator.config must be a LatentConfig, got {type(cfg).__name__}")
        cfg.validate()
        if not cfg.resolved:
            raise ValueError("generator.config has unresolved token names; assign a config resolved with "
                             "LatentConfig.resolve_tokens(tokenizer)")
        vocab = self.adapter.vocab_size
        for name in cfg.token_fields():
            if getattr(cfg, name) is not None:
                token_ids(f"LatentConfig.{name}", getattr(cfg, name), vocab)
        if cfg.trigger == "token":
            missing = [f for f in cfg.token_fields() if getattr(cfg, f) is None]
            if missing:
                raise ValueError(f"trigger='token' needs {missing} to be set")
        if cfg.num_latent_steps > 0 and cfg.num_selected_patches > 0 and not self.adapter.is_multimodal:
            raise ValueError(f"num_selected_patches={cfg.num_selected_patches} > 0 but {type(self.model).__name__} "
                             "is a text-only model (use num_selected_patches=0)")
        if cfg.backend != self._built_backend:
            raise ValueError(f"generator.config.backend changed from {self._built_backend!r} to {cfg.backend!r} "
                             "after the generator was built; build a new LatentGenerator")
        return cfg


class _EagerSteps:
    """Runs each step directly on a per-call cache."""

    image_slots = scores = None

    def __init__(self, runner, cache):
        self.runner, self.cache = runner, cache

    def bind(self, image_slots, scores, prob_dtype):
        self._slots, self._scores, self._prob_dtype = image_slots, scores, prob_dtype

    def step(self, chunk, positions, with_scores, weights, last_only=False):
        return self.runner.step(chunk, positions, self.cache, self._slots if with_scores else None,
                                self._scores if with_scores else None, last_only=last_only, weights=weights,
                                prob_dtype=self._prob_dtype)


class _GraphSteps:
    """Runs each step through the bucket's graphs (buffers are the workspace's)."""

    def __init__(self, graphs):
        self.graphs = graphs
        self.cache, self.image_slots, self.scores = graphs.ws.cache, graphs.ws.image_slots, graphs.ws.scores

    def bind(self, image_slots, scores, prob_dtype):
        self._prob_dtype = prob_dtype  # the workspace's own buffers are what the graphs read

    def step(self, chunk, positions, with_scores, weights, last_only=False):
        return self.graphs.step(chunk, positions, with_scores, last_only, weights, self._prob_dtype)


def _checked_hook(hook):
    """``hook`` with its result checked: a replacement block must have the block's shape, dtype and device."""
    if hook is None:
        return None

    def checked(t, block):
        out = hook(t, block)
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"latent_hook returned {type(out).__name__} at latent step {t}; expected None or a "
                                f"tensor like the block {tuple(block.shape)}")
            if out.shape != block.shape or out.dtype != block.dtype or out.device != block.device:
                raise ValueError(f"latent_hook returned a block of shape {tuple(out.shape)}, {out.dtype} on "
                                 f"{out.device} at latent step {t}; the block is {tuple(block.shape)}, "
                                 f"{block.dtype} on {block.device}")
        return out

    return checked


def _pad_rows(input_ids, attention_mask, mm_token_type_ids, extra, pad_id):
    """Append ``extra`` one-token rows (a single attended pad token, no images) to a batch."""
    B, S = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ids = torch.cat([input_ids, torch.full((extra, S), pad_id, dtype=input_ids.dtype)])
    m = torch.cat([mask, torch.zeros(extra, S, dtype=mask.dtype)])
    m[B:, 0] = 1
    mm = None
    if mm_token_type_ids is not None:
        mm = torch.cat([mm_token_type_ids.cpu(), torch.zeros(extra, S, dtype=mm_token_type_ids.dtype)])
    return ids, m, mm


def _now(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()
