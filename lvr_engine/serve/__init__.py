"""OpenAI-compatible HTTP serving over the continuous-batching scheduler (``lvr serve``).

``ServingEngine.from_pretrained(dir, max_batch=16, max_len=2048)`` loads a model; ``create_app(engine)`` is the
ASGI app; ``run(engine, host, port)`` serves it with uvicorn. FastAPI and uvicorn are imported when the app is
built, so ``import lvr_engine.serve`` stays light.
"""
from .app import create_app, prometheus_text, run
from .protocol import APIError, ChatRequest, parse_chat_request
from .runtime import ServingEngine

__all__ = ["APIError", "ChatRequest", "ServingEngine", "create_app", "parse_chat_request", "prometheus_text", "run"]
