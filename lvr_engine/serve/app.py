"""The OpenAI-compatible HTTP app (FastAPI on uvicorn) over a :class:`~lvr_engine.serve.runtime.ServingEngine`.

Endpoints: ``POST /v1/chat/completions`` (streaming with server-sent events or not), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). A bad request is a 4xx with an OpenAI-style error body and
never reaches the pool; a client that disconnects has its request cancelled, which frees its row.
"""
import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from .protocol import APIError, bad, chunk_body, completion_body, new_id, parse_chat_request, usage
from .runtime import Handle, ServingEngine, check_model

log = logging.getLogger(__name__)


def create_app(engine: ServingEngine, manage_engine: bool = True):
    """The ASGI app. (No ``from __future__ import annotations`` in this module: FastAPI reads the endpoints'
    annotations, and ``Request`` is imported here so that importing the package does not import FastAPI.)
    ``manage_engine``: start the engine's scheduler thread with the app and stop it on shutdown."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="lvr_engine", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        if e.status < 500:
            engine.rejected += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        if not engine.loop.alive:
            return JSONResponse({"status": "error", "message": "the scheduler thread is not running"},
                                status_code=503)
        s = engine.scheduler
        return {"status": "ok", "running": s.num_running, "waiting": s.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model",
                                            "created": int(engine.started_at), "owned_by": "lvr_engine",
                                            "max_model_len": engine.scheduler.max_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        req = parse_chat_request(body, max_images=engine.max_images)
        check_model(engine, req.model)
        loop = asyncio.get_running_loop()
        sched_req = await loop.run_in_executor(None, engine.build_request, req)
        handle = await loop.run_in_executor(None, engine.submit, sched_req, loop)
        rid = new_id()
        if req.stream:
            return StreamingResponse(_stream(engine, handle, req, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_on_disconnect(engine, handle, request))
        try:
            await _collect(engine, handle, req)
        finally:
            watcher.cancel()
        seq = handle.seq
        if seq.finish_reason == "error":
            raise APIError(500, f"generation failed: {seq.error}", kind="server_error")
        return completion_body(rid, engine.model_name, handle.text, _finish_reason(handle),
                               usage(seq.prompt_tokens, len(handle.token_ids)), engine.latent_info(seq),
                               handle.token_ids if req.return_token_ids else None)

    return app


def _finish_reason(handle: Handle) -> str:
    return "stop" if handle.stopped_by_string else {"stop": "stop", "length": "length"}.get(
        handle.seq.finish_reason, handle.seq.finish_reason)


async def _cancel_on_disconnect(engine: ServingEngine, handle: Handle, request) -> None:
    """Wait for the client to go away (the body is read: the next ASGI message is the disconnect); cancel then."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.cancel(handle)
            return


def _apply(engine: ServingEngine, handle: Handle, req, tokens: list, final: bool = True) -> bool:
    """Add ``tokens`` to the handle's text; True when a stop string ended the request (text cut before it).
    ``final=False`` (a non-streaming answer without stop strings, not finished yet): keep the ids, decode later."""
    handle.token_ids.extend(tokens)
    if not (final or req.stop):
        return False
    text = engine.decode(handle.token_ids)
    if req.stop:
        hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
        if hits:
            handle.text = text[:min(hits)]
            handle.stopped_by_string = True
            engine.cancel(handle, "stop")
            return True
    handle.text = text
    return False


async def _collect(engine: ServingEngine, handle: Handle, req) -> None:
    """The whole answer of a non-streaming request (decoded once at the end unless stop strings are watched)."""
    while True:
        up = await handle.queue.get()
        if _apply(engine, handle, req, up.tokens, final=up.finished) or up.finished:
            return


async def _stream(engine: ServingEngine, handle: Handle, req, rid: str):
    """Server-sent events: a role chunk, content deltas, the finishing chunk (with the ``latent`` extension), the
    usage chunk when asked (``stream_options.include_usage``), then ``[DONE]``. Text that might be the start of
    a stop string, or half of a multi-byte character, is held back until it is certain."""
    created = int(time.time())
    model = engine.model_name
    ids = req.return_token_ids
    sent = 0
    hold = max((len(s) for s in req.stop), default=1) - 1

    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    finished = False
    try:
        yield event(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
        while not finished:
            up = await handle.queue.get()
            stopped = _apply(engine, handle, req, up.tokens)
            finished = stopped or up.finished
            text = handle.text
            upto = len(text) if finished else max(sent, len(text) - hold)
            if not finished and text[sent:upto].endswith("\ufffd"):
                upto = sent  # an incomplete UTF-8 sequence: wait for the next token
            delta = text[sent:upto]
            sent = upto
            if delta or (ids and up.tokens):
                yield event(chunk_body(rid, model, created, {"content": delta},
                                       token_ids=list(up.tokens) if ids else None))
        seq = handle.seq
        if seq.finish_reason == "error":
            yield event(APIError(500, f"generation failed: {seq.error}", kind="server_error").body())
        else:
            yield event(chunk_body(rid, model, created, {}, _finish_reason(handle), latent=engine.latent_info(seq)))
            if req.include_usage:
                yield event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": usage(seq.prompt_tokens, len(handle.token_ids))})
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (the response task was cancelled): free the row
            engine.cancel(handle)


def prometheus_text(engine: ServingEngine) -> str:
    """The /metrics page (Prometheus text exposition format 0.0.4)."""
    s = engine.scheduler
    st = s.stats
    tok_rate, lat_rate = engine.loop.rates()
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    outcomes = [(f'{{outcome="{k}"}}', v) for k, v in sorted(st.finished.items())]
    metric("lvr_requests_total", "counter", "Requests that left the pool, by outcome (stop, length, cancelled, error).",
           outcomes)
    metric("lvr_requests_rejected_total", "counter", "Requests answered with a 4xx before reaching the pool.",
           [("", engine.rejected)])
    metric("lvr_requests_submitted_total", "counter", "Requests queued for the pool.", [("", st.submitted)])
    metric("lvr_queue_length", "gauge", "Requests waiting for a pool row.", [("", s.num_waiting)])
    metric("lvr_running_rows", "gauge", "Pool rows in use.", [("", s.num_running)])
    metric("lvr_pool_rows", "gauge", "Pool rows (--max-batch).", [("", s.max_batch)])
    metric("lvr_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
    metric("lvr_generated_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens)])
    metric("lvr_latent_steps_total", "counter", "Latent steps run (per request row).", [("", st.latent_steps)])
    metric("lvr_generated_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [("", f"{tok_rate:.3f}")])
    metric("lvr_latent_steps_per_second", "gauge", "Latent steps per second over the last 10 s.",
           [("", f"{lat_rate:.3f}")])
    metric("lvr_forward_passes_total", "counter", "Model forwards (one per prefill batch and step group).",
           [("", st.forward_passes)])
    metric("lvr_row_moves_total", "counter", "Pool rows copied to keep step groups contiguous.", [("", st.moved_rows)])
    return "\n".join(lines) + "\n"


def run(engine: ServingEngine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``engine`` until SIGINT or SIGTERM (the requests in flight finish first; a second signal stops at
    once): uvicorn on a thread, the scheduler loop on this thread, the main thread of ``lvr serve`` (on CPU, torch's
    OpenMP parallel regions started from the process's first thread run 1.3-1.5x faster than from any other, with
    2 threads). OSError when the HTTP server cannot start (e.g. the port is taken)."""
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(engine, manage_engine=False), host=host, port=port,
                                           log_level=log_level))
    http = threading.Thread(target=server.run, name="lvr-http", daemon=True)
    signals = []

    def shutdown(signum, frame):  # the first: stop accepting, finish the requests in flight; a second: stop now
        signals.append(signum)
        server.should_exit = True
        if len(signals) > 1:
            server.force_exit = True
            engine.loop.stop(timeout=0)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, shutdown) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        http.start()
        engine.loop.run(until=lambda: not http.is_alive())
    finally:
        server.should_exit = True
        http.join(30)
        for s, h in previous.items():
            signal.signal(s, h)
    if not server.started:
        raise OSError(f"the HTTP server did not start on {host}:{port} (see uvicorn's message above)")
