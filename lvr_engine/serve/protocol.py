"""The OpenAI chat-completions request, checked field by field, and the response / stream-chunk bodies.

Everything here is plain Python (no web framework): :func:`parse_chat_request` turns a decoded JSON body into a
:class:`ChatRequest` or raises :class:`APIError` (an HTTP status and a message naming the problem), before any
image is decoded or any model work starts.
"""
from __future__ import annotations

import math
import numbers
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI-style error body naming the problem."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class ImagePart:
    url: str            # a data: URL or a local path / file:// URL
    param: str          # where it was in the request, e.g. "messages[0].content[1].image_url"


@dataclass
class Message:
    role: str
    parts: list         # str (text) or ImagePart, in order


@dataclass
class ChatRequest:
    """A checked chat-completions request. ``temperature`` None: the model's generation config decides;
    ``max_tokens`` None: as many as the pool row has room for, up to the server's default. Extensions (as vLLM
    names them): ``top_k``, ``return_token_ids`` (the generated ids in each choice / chunk), ``ignore_eos``
    (the model's EOS does not stop it), ``stop_token_ids`` (stop tokens besides the model's EOS); ``latent``: N and K
    of the latent segment."""

    model: str
    messages: list[Message]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    num_latent_steps: int | None = None
    num_selected_patches: int | None = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, ImagePart) for m in self.messages for p in m.parts)


# Standard fields this server accepts only at their neutral value (anything else is a 400 naming the field).
_NEUTRAL = {
    "n": (1,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
    "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "store": (False,),
}
_IGNORED = {"user": str, "metadata": dict, "service_tier": str}
_KNOWN = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "top_k", "max_tokens",
          "max_completion_tokens", "seed", "stop", "latent", "return_token_ids", "ignore_eos",
          "stop_token_ids"}
_KNOWN |= set(_NEUTRAL) | set(_IGNORED)
LATENT_FIELDS = ("num_latent_steps", "num_selected_patches")


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, numbers.Number) else type(v).__name__)


def _int(body: dict, name: str, lo: int | None = None, param: str | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{param or name}' must be an integer, got {_type_name(v)} {v!r}", param or name)
    if lo is not None and v < lo:
        raise bad(f"'{param or name}' must be >= {lo}, got {v}", param or name)
    return v


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a finite number, got {_type_name(v)} {v!r}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, param: str | None = None) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(f"'{param or name}' must be a boolean, got {_type_name(v)} {v!r}", param or name)
    return v


def parse_chat_request(body: Any, *, max_images: int) -> ChatRequest:
    """Check a decoded chat-completions body: unknown fields, types and ranges, message structure, the image count
    (``max_images``). Raises :class:`APIError` (400) naming the first problem."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad(f"unknown field(s) {unknown}; latent options go in 'latent': "
                  f"{{{', '.join(repr(f) + ': int' for f in LATENT_FIELDS)}}}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad(f"'model' must be a non-empty string, got {_type_name(model)}", "model")
    for name, allowed in _NEUTRAL.items():
        if name in body and body[name] is not None and body[name] not in allowed:
            raise bad(f"'{name}'={body[name]!r} is not supported by this server (only {allowed[0]!r})", name)
    for name, typ in _IGNORED.items():
        if body.get(name) is not None and not isinstance(body[name], typ):
            raise bad(f"'{name}' must be a {_type_name(typ())}, got {_type_name(body[name])}", name)
    req = ChatRequest(model=model, messages=_messages(body.get("messages")))
    req.stream = bool(_bool(body, "stream"))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise bad("'stream_options' must be an object with 'include_usage' (boolean)", "stream_options")
        req.include_usage = bool(_bool(opts, "include_usage", "stream_options.include_usage"))
    req.temperature = _number(body, "temperature", 0.0, 2.0)
    req.top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1)
    req.top_k = None if top_k is None else max(top_k, 0)  # -1 (vLLM's "off") = 0
    mt, mct = _int(body, "max_tokens", 1), _int(body, "max_completion_tokens", 1)
    if mt is not None and mct is not None and mt != mct:
        raise bad(f"'max_tokens'={mt} and 'max_completion_tokens'={mct} disagree", "max_tokens")
    req.max_tokens = mt if mt is not None else mct
    req.seed = _int(body, "seed")
    req.stop = _stop(body.get("stop"))
    req.return_token_ids = bool(_bool(body, "return_token_ids"))
    req.ignore_eos = bool(_bool(body, "ignore_eos"))
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                for t in ids):
            raise bad(f"'stop_token_ids' must be an array of token ids (integers >= 0), got {ids!r}",
                      "stop_token_ids")
        req.stop_token_ids = list(ids)
    latent = body.get("latent")
    if latent is not None:
        if not isinstance(latent, dict):
            raise bad(f"'latent' must be an object like {{'num_latent_steps': 3, 'num_selected_patches': 32}}, "
                      f"got {_type_name(latent)}", "latent")
        extra = sorted(set(latent) - set(LATENT_FIELDS))
        if extra:
            raise bad(f"unknown field(s) {extra} in 'latent'; known: {list(LATENT_FIELDS)}", f"latent.{extra[0]}")
        req.num_latent_steps = _int(latent, "num_latent_steps", 0, "latent.num_latent_steps")
        req.num_selected_patches = _int(latent, "num_selected_patches", 0, "latent.num_selected_patches")
    if req.num_images > max_images:
        raise bad(f"the request has {req.num_images} images; this server takes at most {max_images} per request "
                  "(lvr serve --max-images)", "messages")
    return req


def _stop(v) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad(f"'stop' must be a non-empty string or a list of them, got {v!r}", "stop")
    if len(items) > 4:
        raise bad(f"'stop' takes at most 4 sequences, got {len(items)}", "stop")
    return list(items)


def _messages(v) -> list[Message]:
    if not isinstance(v, list) or not v:
        raise bad(f"'messages' must be a non-empty array, got {_type_name(v)}", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {_type_name(m)}", where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"unknown field(s) {extra} in '{where}'", f"{where}.{extra[0]}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise bad(f"'{where}.role' must be 'system', 'user' or 'assistant', got {role!r}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list) and content:
            parts = [_part(p, f"{where}.content[{j}]", role) for j, p in enumerate(content)]
        else:
            raise bad(f"'{where}.content' must be a string or a non-empty array of parts, got {_type_name(content)}",
                      f"{where}.content")
        out.append(Message(role, parts))
    return out


def _part(p, where: str, role: str):
    if not isinstance(p, dict):
        raise bad(f"'{where}' must be an object, got {_type_name(p)}", where)
    kind = p.get("type")
    if kind == "text":
        text = p.get("text")
        if not isinstance(text, str):
            raise bad(f"'{where}.text' must be a string, got {_type_name(text)}", f"{where}.text")
        return text
    if kind == "image_url":
        if role != "user":
            raise bad(f"'{where}': images are only accepted in user messages", where)
        img = p.get("image_url")
        url = img.get("url") if isinstance(img, dict) else img
        if not isinstance(url, str) or not url:
            raise bad(f"'{where}.image_url' must be {{'url': 'data:image/...;base64,...' or a local path}}",
                      f"{where}.image_url")
        return ImagePart(url, f"{where}.image_url")
    raise bad(f"'{where}.type' must be 'text' or 'image_url', got {kind!r}", f"{where}.type")


# ----------------------------------------------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish_reason: str, usage_: dict, latent: dict,
                    token_ids: list | None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage_, "latent": latent}


def chunk_body(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               token_ids: list | None = None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice],
            **extra}
