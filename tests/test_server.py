"""The OpenAI-compatible server (lvr_engine/serve) on a real uvicorn on a loopback port, driven by the real ``openai``
client: every greedy answer equals ``LatentGenerator.generate`` run alone on the same prompt; streaming; 32
concurrent mixed requests; a cancelled stream frees its row; bad requests get a 4xx naming the problem while a
good request completes; ``lvr serve`` itself."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from lvr_engine import LatentGenerator  # noqa: E402
from lvr_engine.serve import ServingEngine, create_app, parse_chat_request  # noqa: E402

MAX_LEN = 2048
IMAGE_SIZE = 112  # 16 image tokens per image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_model(path):
    from lvr_engine.models.tiny import write_tiny_model

    write_tiny_model(path, hidden_size=64, num_layers=2, image_size=IMAGE_SIZE, initializer_range=0.08, seed=3)
    # the model's latent setup (as `lvr train` writes it): 2 steps of 4 patches between markers
    meta = {"latent_config": {"num_latent_steps": 2, "num_selected_patches": 4, "start_marker_id": "<|start-latent|>",
                              "end_marker_id": "<|end-latent|>"}}
    (path / "lvr_config.json").write_text(json.dumps(meta))
    return path


class Server:
    """A ServingEngine behind uvicorn on a thread, on a free loopback port."""

    def __init__(self, engine):
        self.engine = engine
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # keep-alive longer than any pause between tests: the client never reuses a connection the server is closing
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_keep_alive=300))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict:
        text = httpx.get(self.base + "/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(lvr_\S+) (\S+)$", text, re.M)}

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _write_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = ServingEngine.from_pretrained(model_dir, max_batch=8, max_len=MAX_LEN, max_images=4,
                                           allowed_local_media=[model_dir], model_name="tiny")
    srv = Server(engine)
    yield srv
    srv.close()


def _image_url(seed: int, fmt="PNG") -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


WORDS = "the red square is left of the blue circle and above a green triangle near the corner".split()


def _body(i: int, images: int = 1, max_tokens: int = 8, latent=None, **kw) -> dict:
    """A chat request: ``images`` images and a question of a length that depends on i."""
    text = " ".join(WORDS[: 3 + (i * 5) % len(WORDS)]) + f" question {i}?"
    parts = [{"type": "image_url", "image_url": {"url": _image_url(100 + i + j)}} for j in range(images)]
    parts.append({"type": "text", "text": text})
    body = {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True, **kw}
    if latent is not None:
        body["latent"] = latent
    return body


def _solo(engine, body) -> tuple[list, list]:
    """``generate`` alone on the request: (tokens, selected)."""
    req = engine.build_request(parse_chat_request(body, max_images=engine.max_images))
    cfg = engine.latent_config
    N = cfg.num_latent_steps if req.num_latent_steps is None else req.num_latent_steps
    K = cfg.num_selected_patches if req.num_selected_patches is None else req.num_selected_patches
    gen = LatentGenerator(engine.generator.model, cfg.replace(num_latent_steps=N, num_selected_patches=K))
    out = gen.generate(input_ids=req.input_ids, attention_mask=req.attention_mask, pixel_values=req.pixel_values,
                       image_grid_thw=req.image_grid_thw, mm_token_type_ids=req.mm_token_type_ids,
                       max_new_tokens=body["max_tokens"], eos_token_id=[] if body.get("ignore_eos") else None)
    return out.sequences[0].tolist(), out.selected[0].tolist()


def _create(server, body, **kw):
    extra = {k: body[k] for k in ("latent", "return_token_ids", "ignore_eos", "stop_token_ids") if k in body}
    std = {k: v for k, v in body.items() if k not in extra}
    return server.client.chat.completions.create(**std, extra_body=extra, **kw)


def test_models_health_and_prompt(server, model_dir):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.base + "/health").json()["status"] == "ok"
    # the prompt is the processor's chat template over the messages (an independent rendering)
    engine = server.engine
    body = _body(3, images=1)
    req = engine.build_request(parse_chat_request(body, max_images=4))
    from PIL import Image

    from lvr_engine.models.processors import load_processor

    proc = load_processor(model_dir)
    raw = base64.b64decode(body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1])
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": _body(3)["messages"][0]
                                                                   ["content"][1]["text"]}]}],
                                    add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[Image.open(io.BytesIO(raw)).convert("RGB")], return_tensors="pt")
    assert torch.equal(req.input_ids, enc["input_ids"]) and torch.equal(req.pixel_values, enc["pixel_values"])


def test_non_streaming_and_streaming_equal_generate(server):
    engine = server.engine
    body = _body(1, max_tokens=10)  # the model's own latent setup: 2 steps of 4 patches, markers
    r = _create(server, body)
    tokens, selected = _solo(engine, body)
    choice = r.choices[0]
    assert choice.token_ids == tokens and choice.finish_reason in ("stop", "length")
    assert choice.message.content == engine.decode(tokens)
    assert r.usage.completion_tokens == len(tokens) and r.usage.prompt_tokens > 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.latent["selected"] == selected and len(selected) == 2 and r.latent["num_selected_patches"] == 4

    body = _body(2, max_tokens=12, latent={"num_latent_steps": 3, "num_selected_patches": 3})
    stream = _create(server, body, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    tokens, selected = _solo(engine, body)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for c in chunks if c.choices for t in (getattr(c.choices[0], "token_ids", None) or [])] == tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == engine.decode(tokens)
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.latent["selected"] == selected and len(selected) == 3
    assert chunks[-1].usage.completion_tokens == len(tokens) and chunks[-1].choices == []


def test_32_concurrent_mixed_requests_equal_generate(server):
    """Mixed prompt lengths (0-2 images, question lengths), max_tokens 3-16, latent (N, K of the model or the
    request's, Coconut K=0) and plain; 32 at once through 8 rows: every answer equals its solo generate."""
    plain, coconut = {"num_latent_steps": 0}, {"num_latent_steps": 2, "num_selected_patches": 0}
    choices = [None, plain, {"num_latent_steps": 1, "num_selected_patches": 5}, coconut,
               {"num_latent_steps": 3, "num_selected_patches": 4}]  # None: the model's 2 steps of 4 patches
    specs = []
    for i in range(32):
        images = (0, 1, 1, 2)[i % 4]
        latent = choices[i % 5]
        if not images and (latent is None or latent.get("num_selected_patches")):
            latent = (plain, coconut)[i % 2]  # no image to select from
        specs.append(_body(i, images=images, max_tokens=3 + (i * 7) % 14, latent=latent))
    assert {json.dumps(b.get("latent")) for b in specs} == {json.dumps(c) for c in choices}
    before = server.metrics()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda b: _create(server, b), specs))
    assert len(results) == 32
    for i, (body, r) in enumerate(zip(specs, results, strict=True)):
        tokens, selected = _solo(server.engine, body)
        assert r.choices[0].token_ids == tokens, f"request {i}"
        assert r.latent["selected"] == selected, f"request {i}"
    after = server.metrics()
    assert after["lvr_requests_submitted_total"] - before["lvr_requests_submitted_total"] == 32
    assert after["lvr_running_rows"] == 0 and after["lvr_queue_length"] == 0
    assert after["lvr_latent_steps_total"] > before["lvr_latent_steps_total"]


def _wait_cancelled(server, before) -> dict:
    """Metrics once one more request left the pool cancelled (fails after 20 s)."""
    key = 'lvr_requests_total{outcome="cancelled"}'
    deadline = time.time() + 20
    while True:
        m = server.metrics()
        if m[key] > before[key]:
            return m
        assert time.time() < deadline, f"the cancelled request did not leave the pool: {m}"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_row(server, stream):
    before = server.metrics()
    body = _body(5, max_tokens=MAX_LEN - 60, latent={"num_latent_steps": 0}, ignore_eos=True)
    if stream:
        chunks = _create(server, body, stream=True)
        for got, _ in enumerate(chunks):
            if got == 2:
                break
        chunks.close()  # the client goes away mid-stream
    else:  # the client gives up waiting for the whole answer and closes the connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    m = _wait_cancelled(server, before)
    assert m["lvr_running_rows"] == 0 and m["lvr_queue_length"] == 0
    assert m["lvr_generated_tokens_total"] - before["lvr_generated_tokens_total"] < MAX_LEN - 60


BAD = [
    # (what, body or raw bytes, status, phrase the error names)
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("unknown model", {**_body(0), "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
    ("image that does not decode", {**_body(0), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}},
        {"type": "text", "text": "hi"}]}]}, 400, "does not decode"),
    ("too many images", _body(0, images=5), 400, "at most 4"),
    ("prompt too long for the pool", {**_body(0, latent={"num_latent_steps": 0}),
                                      "messages": [{"role": "user", "content": "word " * 2100}]}, 400,
     f"max_len={MAX_LEN}"),
    ("K x N larger than the image", _body(0, latent={"num_latent_steps": 3, "num_selected_patches": 6}), 400,
     "16 image tokens but 3 latent steps x 6 patches need 18"),
    ("unknown field", {**_body(0), "max_token": 5}, 400, "unknown field(s) ['max_token']"),
    ("field of the wrong type", {**_body(0), "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ("latent field of the wrong type", _body(0, latent={"num_latent_steps": "3"}), 400,
     "'latent.num_latent_steps' must be an integer"),
    ("remote image URL", {**_body(0), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, "not fetched"),
    ("local path outside the allowed directory", {**_body(0), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "not under an allowed"),
]


def test_bad_requests_get_4xx_while_a_good_request_completes(server, model_dir):
    good = _body(7, max_tokens=MAX_LEN - 100, latent={"num_latent_steps": 2, "num_selected_patches": 4},
                 ignore_eos=True)  # seconds of decoding
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", _create(server, good)))
    worker.start()
    deadline = time.time() + 20
    while server.metrics()["lvr_running_rows"] < 1:  # the good request is in the pool
        assert time.time() < deadline
        time.sleep(0.01)
    rejected = server.metrics()["lvr_requests_rejected_total"]
    for what, body, status, phrase in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server.base + "/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
        err = r.json()["error"]
        assert phrase in err["message"], f"{what}: {err['message']}"
    assert worker.is_alive(), "the good request should still be decoding while the bad ones are answered"
    worker.join(120)
    assert not worker.is_alive()
    assert result["r"].choices[0].token_ids == _solo(server.engine, good)[0]
    assert server.metrics()["lvr_requests_rejected_total"] - rejected == len(BAD)
    # a local image under --allowed-local-media is accepted and equals the same image sent inline
    from PIL import Image

    path = model_dir / "img.png"
    Image.open(io.BytesIO(base64.b64decode(_image_url(300).split(",", 1)[1]))).save(path)
    local = _body(8, latent={"num_latent_steps": 0})
    inline = json.loads(json.dumps(local))
    local["messages"][0]["content"][0]["image_url"]["url"] = str(path)
    inline["messages"][0]["content"][0]["image_url"]["url"] = _image_url(300)
    assert _create(server, local).choices[0].token_ids == _create(server, inline).choices[0].token_ids


def test_stop_strings_and_stop_tokens(server):
    body = _body(9, max_tokens=12, latent={"num_latent_steps": 0}, ignore_eos=True)
    tokens, _ = _solo(server.engine, body)
    # a stop token (besides the model's EOS): the answer ends with its first occurrence
    stop_id = tokens[4]
    r = _create(server, {**body, "stop_token_ids": [stop_id]})
    assert r.choices[0].token_ids == tokens[: tokens.index(stop_id) + 1] and r.choices[0].finish_reason == "stop"
    # a stop string: the text ends before it
    text = server.engine.decode(tokens)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"the answer has no usable stop string: {text!r}"
    r = _create(server, {**body, "stop": [stop]})
    assert r.choices[0].message.content == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(_create(server, {**body, "stop": stop}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[: text.find(stop)]


def test_lvr_serve_command(model_dir):
    """`lvr serve` end to end: starts, answers through the openai client, reports health and metrics, exits cleanly
    on SIGTERM; a port that is taken is a one-line error."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lvr_engine.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--max-batch", "2", "--max-len", "128", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "lvr serve did not come up"
            time.sleep(0.2)
        name = os.path.basename(str(model_dir))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        body = {**_body(4, max_tokens=5), "model": name}
        r = client.chat.completions.create(**{k: v for k, v in body.items() if k != "return_token_ids"})
        assert r.model == name and r.usage.completion_tokens >= 1 and r.latent["num_latent_steps"] == 2
        assert "lvr_running_rows 0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        proc.terminate()  # SIGTERM: the requests in flight finish, then a clean exit
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # a port that is taken: exit status 2 and one line saying so
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "lvr_engine.cli", "serve", "--model", str(model_dir), "--port",
                              str(busy), "--max-len", "128", "--log-level", "critical"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert f"lvr serve: error: the HTTP server did not start on 127.0.0.1:{busy}" in out.stderr
