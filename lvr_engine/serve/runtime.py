"""The serving runtime: a loaded model, the continuous-batching scheduler on its own thread, and chat prompts.

:class:`ServingEngine` turns a checked :class:`~lvr_engine.serve.protocol.ChatRequest` into the scheduler's
:class:`~lvr_engine.engine.scheduler.Request` (the chat template and the processor, as ``lvr generate`` and the
evaluator build prompts) and streams its tokens back to asyncio code as :class:`Update` s. It keeps no state
across requests beyond the pool, so replicas behind any load balancer scale it out.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.config import LatentConfig
from ..engine.generator import LatentGenerator
from ..engine.scheduler import BackgroundScheduler, Request, Scheduler, Sequence
from .media import load_image
from .protocol import APIError, ChatRequest, ImagePart, bad


@dataclass
class Update:
    """New tokens of a request (``finished`` once, with the last ones)."""

    tokens: list
    finished: bool


@dataclass
class Handle:
    """A submitted request: its scheduler sequence and the asyncio queue its updates arrive on."""

    seq: Sequence
    queue: asyncio.Queue
    text: str = ""                      # decoded so far (stop strings cut here)
    stopped_by_string: bool = False
    token_ids: list = field(default_factory=list)


class ServingEngine:
    """A model served with continuous batching.

    ``generator``: a :class:`LatentGenerator` (its config is the model's latent setup: markers, positions, patch
    order, score precision, trigger; requests may change N and K of a ``trigger="prompt"`` model);
    ``max_batch`` rows of ``max_len`` positions each (see :class:`Scheduler`); ``max_images`` per request;
    ``allowed_local_media``: directories local image paths may point into (none: data: URLs only);
    ``image_size``: resize every image to this side first (the model's ``lvr_config.json`` value, e.g. IVT-LR's
    280); ``default_max_tokens``: ``max_tokens`` of a request that gives none (capped by the row's room).
    """

    def __init__(self, generator: LatentGenerator, *, model_name: str, max_batch: int = 16, max_len: int = 2048,
                 max_images: int = 4, allowed_local_media=(), image_size: int | None = None,
                 default_max_tokens: int = 512, max_prefill_tokens: int = 8192):
        if generator.processor is None or not hasattr(generator.processor, "apply_chat_template"):
            raise ValueError("serving needs the checkpoint's processor or tokenizer with a chat template")
        self.generator = generator
        self.model_name = model_name
        self.processor = generator.processor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.multimodal = generator.adapter.is_multimodal and hasattr(self.processor, "image_processor")
        self.scheduler = Scheduler(generator, max_batch=max_batch, max_len=max_len,
                                   max_prefill_tokens=max_prefill_tokens)
        self.loop = BackgroundScheduler(self.scheduler)  # the scheduler's iterations: start() or loop.run()
        self.max_images = int(max_images)
        self.allowed_local = [Path(p).expanduser().resolve() for p in allowed_local_media]
        for p in self.allowed_local:
            if not p.is_dir():
                raise ValueError(f"--allowed-local-media {p} is not a directory")
        self.image_size = image_size
        self.default_max_tokens = int(default_max_tokens)
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to call from two threads at once
        self.rejected = 0
        self.started_at = time.time()
        gc = getattr(generator.model, "generation_config", None)
        self._gen_defaults = dict(do_sample=bool(getattr(gc, "do_sample", False)),
                                  temperature=float(getattr(gc, "temperature", None) or 1.0),
                                  top_p=float(getattr(gc, "top_p", None) or 1.0),
                                  top_k=int(getattr(gc, "top_k", None) or 0))

    @classmethod
    def from_pretrained(cls, path, *, device=None, model_name: str | None = None, **kw) -> "ServingEngine":
        """Load a local checkpoint directory with the latent setup it was trained with (its ``lvr_config.json``;
        plain decoding without one) and its template's image size."""
        from ..models.loading import read_lvr_meta

        meta = read_lvr_meta(path)
        lc = dict((meta or {}).get("latent_config", {}))
        cfg = LatentConfig(**lc) if lc else LatentConfig(num_latent_steps=0, num_selected_patches=0)
        gen = LatentGenerator.from_pretrained(path, cfg, device=device)
        if "image_size" not in kw and meta is not None and meta.get("image_size"):
            kw["image_size"] = int(meta["image_size"])
        name = model_name or Path(os.fspath(path)).resolve().name
        return cls(gen, model_name=name, **kw)

    # ------------------------------------------------------------------------------------------------------------
    def start(self) -> "ServingEngine":
        """Run the scheduler loop on a thread of its own (embedding the app; ``lvr serve`` runs it on the main
        thread instead: :func:`lvr_engine.serve.app.run`)."""
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()

    @property
    def latent_config(self) -> LatentConfig:
        return self.scheduler.config

    # ------------------------------------------------------------------------------------------------------------
    def build_request(self, req: ChatRequest) -> Request:
        """The scheduler request of a chat request: images decoded, the chat template rendered, the processor run.
        Blocking (image decoding, tokenization): run it off the event loop. APIError (400) for what the client
        can fix."""
        images = []
        hf_messages = []
        for m in req.messages:
            if all(isinstance(p, str) for p in m.parts) and len(m.parts) == 1:
                hf_messages.append({"role": m.role, "content": m.parts[0]})
                continue
            content = []
            for p in m.parts:
                if isinstance(p, ImagePart):
                    if not self.multimodal:
                        raise bad(f"'{p.param}': {self.model_name} is a text-only model; it takes no images", p.param)
                    images.append(self._resize(load_image(p, self.allowed_local)))
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": p})
            hf_messages.append({"role": m.role, "content": content})
        with self._tok_lock:
            try:
                text = self.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 - the template rejects the conversation (e.g. role order)
                raise bad(f"the chat template rejects these messages: {e}", "messages") from None
            if images:
                enc = self.processor(text=[text], images=images, return_tensors="pt")
            elif self.tokenizer is self.processor:
                enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
            else:
                enc = self.processor(text=[text], return_tensors="pt")
        sampling = self._sampling(req)
        return Request(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                       pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
                       mm_token_type_ids=enc.get("mm_token_type_ids"), max_new_tokens=req.max_tokens,
                       num_latent_steps=req.num_latent_steps, num_selected_patches=req.num_selected_patches,
                       eos_token_id=self._stop_ids(req), **sampling)

    def _stop_ids(self, req: ChatRequest):
        """The request's stop tokens: ``stop_token_ids`` and, unless ``ignore_eos``, the model's EOS ids."""
        if not req.stop_token_ids:
            return [] if req.ignore_eos else None  # None: the model's
        eos = set() if req.ignore_eos else set(self.generator.adapter.eos_token_ids)
        return sorted(eos | set(req.stop_token_ids))

    def _resize(self, image):
        if self.image_size is None or image.size == (self.image_size, self.image_size):
            return image
        from PIL import Image

        return image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)

    def _sampling(self, req: ChatRequest) -> dict:
        """temperature 0: greedy; > 0: sampling; not given: the model's generation config (greedy without one)."""
        d = self._gen_defaults
        do_sample = d["do_sample"] if req.temperature is None else req.temperature > 0
        if not do_sample:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=req.temperature or d["temperature"],
                    top_p=req.top_p if req.top_p is not None else d["top_p"],
                    top_k=req.top_k if req.top_k is not None else d["top_k"], seed=req.seed)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue ``request`` in the pool; its updates arrive on the returned handle's queue (on ``loop``).
        ValueError/TypeError from the scheduler's checks become APIError (400); the pool is not touched."""
        if request.max_new_tokens is None:
            request.max_new_tokens = self._room(request)
        queue: asyncio.Queue = asyncio.Queue()

        def listener(seq, tokens, finished):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, Update(list(tokens), finished))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        try:
            seq = self.loop.submit(request, listener)
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        return Handle(seq, queue)

    def _room(self, request: Request) -> int:
        """``max_tokens`` of a request that gives none: the row's room after prompt and latent positions, at most
        ``default_max_tokens`` (at least 1, so that a prompt too long gets the scheduler's message)."""
        probe = Request(**{**request.__dict__, "max_new_tokens": 1})
        try:
            seq = self.scheduler.prepare(probe)
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        N, K = seq.num_latent_steps, seq.num_selected_patches
        latent = N * (K + 1) + int(seq.use_start) + int(seq.use_end)
        return max(1, min(self.default_max_tokens, self.scheduler.max_len - seq.prompt_tokens - latent))

    def cancel(self, handle: Handle, reason: str = "cancelled") -> None:
        self.loop.cancel(handle.seq, reason)

    def decode(self, tokens: list) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def latent_info(self, seq: Sequence) -> dict:
        """The response's ``latent`` extension: the latent setup and what the steps chose."""
        cfg = self.latent_config
        if cfg.trigger == "token":
            fed = sum(1 for t in seq.tokens if t == cfg.latent_pad_id)
            return {"trigger": "token", "latent_steps": fed}
        return {"trigger": "prompt", "num_latent_steps": seq.num_latent_steps,
                "num_selected_patches": seq.num_selected_patches, "selected": [list(s) for s in seq.selected]}


def check_model(engine: ServingEngine, name: str) -> None:
    if name != engine.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{engine.model_name}'", "model",
                       code="model_not_found")
