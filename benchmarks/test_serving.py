"""Serving: one 64-request mixed workload three ways, same process, same model (``pytest benchmarks/test_serving.py
--benchmark-only``):

  ``sequential_b1``  ``LatentGenerator.generate`` on one request at a time, in arrival order;
  ``static_b8``      static batching: ``generate`` on batches of 8 (the requests of one latent setup, in arrival
                     order; a batch runs until its longest row is done, and each of its requests completes then);
  ``server``         the OpenAI-compatible server (``lvr_engine.serve``: continuous batching, --max-batch 16) on a
                     loopback port, 64 concurrent ``openai`` clients.

All 64 requests arrive at t=0 as chat bodies; every contender turns them into model inputs (image decoding, chat
template, processor: ``ServingEngine.build_request``) inside its timed run, as the server must. A request's latency
is the time until its answer is complete; requests/s is 64 over the time the last one took. The workload (seeded):
48 requests with one 224-px image (64 image tokens) and 16 text-only ones, questions of 4-60 words (prompts ~30-140
tokens), max_tokens 8/16/32/64, the image requests alternating between IVT-LR-style latent reasoning (N=3 steps of
K=8 patches) and plain decoding, greedy, EOS ignored (every request produces its max_tokens: the contenders do the
same work). The model is the engine benchmarks' 'small' Qwen2-VL (text hidden 512, 8 layers, 8 heads, 2 KV heads,
MLP 1376; vision depth 2, embed 128) in bf16 (``LVR_SERVING_DTYPE=float32`` for fp32), written as a checkpoint
directory with its processor (the server loads it as ``lvr serve`` does).

Each contender runs the whole workload once untimed first (allocator, per-shape kernel set-up), then once timed.
``test_static_vs_server_interleaved`` then runs static batches and the server in ``PAIRS`` alternating pairs: this
machine is shared and its load moves between benchmarks; the acceptance check (continuous batching >= the
static-batch throughput and a lower p95 latency) uses the medians of the per-pair ratios.

Every contender's answers are compared with ``sequential_b1``'s (token for token, selections too) and the number
that are equal is reported (with native bf16 matmuls a row's result can depend on the batch size in the last bit,
and a greedy answer can then take another token at a near-tie: RESULTS.md). The table is printed at the end and
written to ``benchmarks/.benchmarks/last_serving_results.json``.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_PATH = os.path.join(HERE, ".benchmarks", "last_serving_results.json")
N_REQUESTS = int(os.environ.get("LVR_SERVING_REQUESTS", "64"))  # fewer: a quick check of the harness
STATIC_BATCH, MAX_BATCH, MAX_LEN, PAIRS = 8, 16, 512, 3
DTYPE = os.environ.get("LVR_SERVING_DTYPE", "bfloat16")
LATENT = {"num_latent_steps": 3, "num_selected_patches": 8}
PLAIN = {"num_latent_steps": 0}
WORDS = ("which shape is directly below the red square and how many circles touch the left edge of the grid "
         "while the blue triangle stays in the upper right corner next to a small green star").split()
RESULTS: dict = {}
ANSWERS: dict = {}


def _image_url(seed: int) -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload() -> list[dict]:
    """The 64 chat requests (OpenAI bodies with the ``latent`` / ``ignore_eos`` / ``return_token_ids`` fields)."""
    out = []
    for i in range(N_REQUESTS):
        image = i % 4 != 3
        n_words = 4 + (i * 13) % 57
        text = " ".join((WORDS * 3)[i % 7: i % 7 + n_words]) + "?"
        content = ([{"type": "image_url", "image_url": {"url": _image_url(i)}}] if image else []) + [
            {"type": "text", "text": text}]
        out.append({"model": "small", "messages": [{"role": "user", "content": content}],
                    "max_tokens": (8, 16, 32, 64)[(i * 7) % 4], "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "latent": LATENT if image and i % 2 == 0 else PLAIN})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    """The 'small' checkpoint (``DTYPE``), a ServingEngine on it and the workload."""
    from lvr_engine.models.tiny import write_tiny_model
    from lvr_engine.serve import ServingEngine

    path = tmp_path_factory.mktemp("small")
    write_tiny_model(path, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1376,
                     vision_depth=2, vision_embed_dim=128, image_size=224, initializer_range=0.05, dtype=DTYPE)
    engine = ServingEngine.from_pretrained(path, model_name="small", max_batch=MAX_BATCH, max_len=MAX_LEN)
    yield engine, workload()
    _report(request.config, str(engine.generator.runner.compute_dtype).removeprefix("torch."))


def _percentile(xs, q):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def _record(name, makespan, latencies, **extra):
    RESULTS[name] = dict(requests_per_s=N_REQUESTS / makespan, makespan_s=makespan,
                         p50_s=statistics.median(latencies), p95_s=_percentile(latencies, 95),
                         mean_s=statistics.fmean(latencies), **extra)


def _generators(engine):
    from lvr_engine import LatentGenerator

    cfg = engine.latent_config
    model = engine.generator.model
    return {n: LatentGenerator(model, cfg.replace(num_latent_steps=LATENT["num_latent_steps"] if n else 0,
                                                  num_selected_patches=LATENT["num_selected_patches"] if n else 0))
            for n in (True, False)}


def _is_latent(body) -> bool:
    return body["latent"].get("num_latent_steps", 0) > 0


def test_sequential_b1(benchmark, setup):
    engine, bodies = setup
    gens = _generators(engine)

    def run():
        t0 = time.perf_counter()
        lat, answers = [], []
        for body in bodies:
            r = _prompt(engine, body)
            out = gens[_is_latent(body)].generate(
                input_ids=r.input_ids, attention_mask=r.attention_mask, pixel_values=r.pixel_values,
                image_grid_thw=r.image_grid_thw, mm_token_type_ids=r.mm_token_type_ids,
                max_new_tokens=body["max_tokens"], eos_token_id=[])
            lat.append(time.perf_counter() - t0)
            answers.append((out.sequences[0].tolist(), out.selected[0].tolist()))
        return time.perf_counter() - t0, lat, answers

    benchmark.group, benchmark.name = "serving 64 mixed requests", "sequential generate, batch 1"
    makespan, lat, answers = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)
    ANSWERS["sequential_b1"] = answers
    _record("sequential_b1", makespan, lat)
    benchmark.extra_info.update(RESULTS["sequential_b1"])


def _prompt(engine, body):
    """The request's model inputs from its chat body (images decoded, chat template, processor): the work the
    server does for each request, timed in every contender."""
    from lvr_engine.serve import parse_chat_request

    return engine.build_request(parse_chat_request(body, max_images=4))


def _static_batches(bodies):
    """Batches of up to 8 requests of one latent setup, in arrival order; run in the order of their first arrival."""
    groups: dict = {}
    for i, b in enumerate(bodies):
        groups.setdefault(_is_latent(b), []).append(i)
    batches = [idx[j:j + STATIC_BATCH] for idx in groups.values() for j in range(0, len(idx), STATIC_BATCH)]
    return sorted(batches, key=lambda b: b[0])


def _pad_batch(reqs, idx, pad_id, image_token_id):
    """The requests ``idx`` (``reqs[i]``: scheduler Requests) as one left-padded batch (processor layout)."""
    S = max(reqs[i].input_ids.shape[1] for i in idx)
    ids = torch.full((len(idx), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(idx), S, dtype=torch.long)
    mm = torch.zeros(len(idx), S, dtype=torch.long)
    for row, i in enumerate(idx):
        n = reqs[i].input_ids.shape[1]
        ids[row, S - n:] = reqs[i].input_ids[0]
        mask[row, S - n:] = reqs[i].attention_mask[0]
        own = reqs[i].mm_token_type_ids
        mm[row, S - n:] = own[0] if own is not None else (reqs[i].input_ids[0] == image_token_id).long()
    pvs = [reqs[i].pixel_values for i in idx if reqs[i].pixel_values is not None]
    grids = [reqs[i].image_grid_thw for i in idx if reqs[i].image_grid_thw is not None]
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                pixel_values=torch.cat(pvs) if pvs else None, image_grid_thw=torch.cat(grids) if grids else None)


def _static_runner(engine, bodies):
    """run() -> (makespan, latencies, answers) of the workload as static batches of 8."""
    gens = _generators(engine)
    batches = _static_batches(bodies)
    ad = engine.generator.adapter

    def run():
        t0 = time.perf_counter()
        lat, answers = [0.0] * N_REQUESTS, [None] * N_REQUESTS
        for idx in batches:
            prompts = {i: _prompt(engine, bodies[i]) for i in idx}
            batch = _pad_batch(prompts, idx, ad.pad_token_id, ad.image_token_id)
            T = max(bodies[i]["max_tokens"] for i in idx)  # the batch runs until its longest row is done
            out = gens[_is_latent(bodies[idx[0]])].generate(**batch, max_new_tokens=T, eos_token_id=[])
            done = time.perf_counter() - t0
            for row, i in enumerate(idx):
                lat[i] = done
                answers[i] = (out.sequences[row, :bodies[i]["max_tokens"]].tolist(), out.selected[row].tolist())
        return time.perf_counter() - t0, lat, answers

    return run, len(batches)


def test_static_b8(benchmark, setup):
    engine, bodies = setup
    run, n_batches = _static_runner(engine, bodies)
    benchmark.group, benchmark.name = "serving 64 mixed requests", "static batches of 8"
    makespan, lat, answers = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)
    ANSWERS["static_b8"] = answers
    _record("static_b8", makespan, lat, batches=n_batches)
    benchmark.extra_info.update(RESULTS["static_b8"])


@pytest.fixture(scope="module")
def http(setup):
    """The server (uvicorn on a loopback port, this module's engine): its base URL."""
    import uvicorn

    from lvr_engine.serve import create_app

    engine, _ = setup
    port = _free_port()
    # as `lvr serve` runs it (lvr_engine.serve.app.run): uvicorn on a thread, the scheduler loop on the main thread
    # (during each run, _server_runner)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, manage_engine=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(30)


def _server_runner(base_url, bodies, engine):
    """run() -> (makespan, latencies, answers): the 64 requests sent at once by 64 client threads (a new client per
    run: no keep-alive connection the server may be closing is reused) while this (the main) thread runs the
    scheduler loop, as in `lvr serve`."""
    import openai

    extra_keys = ("latent", "ignore_eos", "return_token_ids")

    def one(client, body, start, gate):
        gate.wait()  # every client is ready: they all send at t=0
        r = client.chat.completions.create(**{k: v for k, v in body.items() if k not in extra_keys},
                                           extra_body={k: body[k] for k in extra_keys})
        return time.perf_counter() - start[0], (r.choices[0].token_ids, r.latent["selected"])

    def run():
        gate = threading.Barrier(N_REQUESTS + 1)
        start = [0.0]
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client, \
                ThreadPoolExecutor(N_REQUESTS) as pool:
            futs = [pool.submit(one, client, b, start, gate) for b in bodies]
            for f in futs:
                f.add_done_callback(lambda _: engine.loop.wake())
            start[0] = time.perf_counter()
            gate.wait()
            engine.loop.run(until=lambda: all(f.done() for f in futs))
            res = [f.result() for f in futs]
        return max(r[0] for r in res), [r[0] for r in res], [r[1] for r in res]

    return run


def test_server(benchmark, setup, http):
    engine, bodies = setup
    run = _server_runner(http, bodies, engine)
    moves = []

    def timed():
        before = engine.scheduler.stats.moved_rows
        out = run()
        moves.append(engine.scheduler.stats.moved_rows - before)
        return out

    benchmark.group, benchmark.name = "serving 64 mixed requests", f"server, continuous batching ({MAX_BATCH} rows)"
    makespan, lat, answers = benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=1)
    ANSWERS["server"] = answers
    _record("server", makespan, lat, row_moves=moves[-1])
    benchmark.extra_info.update(RESULTS["server"])


def test_static_vs_server_interleaved(benchmark, setup, http):
    """Static batches of 8 and the server in alternating pairs (which goes first alternates): the machine's load
    moves between separate benchmarks, a pair sees the same load. The medians of the per-pair ratios decide the
    acceptance check."""
    engine, bodies = setup
    runs = {"static_b8": _static_runner(engine, bodies)[0], "server": _server_runner(http, bodies, engine)}
    got = {"static_b8": [], "server": []}
    order = [0]

    def pair():
        names = ["static_b8", "server"] if order[0] % 2 == 0 else ["server", "static_b8"]
        order[0] += 1
        for name in names:
            makespan, lat, _ = runs[name]()
            got[name].append((N_REQUESTS / makespan, _percentile(lat, 95), statistics.median(lat)))

    benchmark.group, benchmark.name = "serving 64 mixed requests, paired", "static batches of 8 + server"
    benchmark.pedantic(pair, rounds=PAIRS, iterations=1, warmup_rounds=0)
    thr = sorted(s[0] / b[0] for s, b in zip(got["server"], got["static_b8"], strict=True))
    p95 = sorted(s[1] / b[1] for s, b in zip(got["server"], got["static_b8"], strict=True))
    RESULTS["paired"] = dict(pairs=PAIRS, throughput_ratio=statistics.median(thr), p95_ratio=statistics.median(p95),
                             throughput_ratios=thr, p95_ratios=p95, static_b8=got["static_b8"], server=got["server"])
    benchmark.extra_info.update(RESULTS["paired"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NAMES = {"sequential_b1": "sequential generate, batch 1", "static_b8": "static batches of 8 (generate)",
         "server": f"server, continuous batching ({MAX_BATCH} rows)"}


def _report(config, compute_dtype):
    if not RESULTS:
        return
    ref = ANSWERS.get("sequential_b1")
    agree = {k: sum(a == b for a, b in zip(v, ref, strict=True))
             for k, v in ANSWERS.items() if k != "sequential_b1"} if ref else {}
    lines = [f"{'contender':<40s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'total s':>8s}  answers = batch 1"]
    for k, name in NAMES.items():
        if k in RESULTS:
            r = RESULTS[k]
            same = "-" if k == "sequential_b1" else f"{agree.get(k, 0)}/{N_REQUESTS}"
            lines.append(f"{name:<40s} {r['requests_per_s']:7.2f} {r['p50_s']:7.2f} {r['p95_s']:7.2f} "
                         f"{r['makespan_s']:8.2f}  {same}")
    verdict = None
    if "paired" in RESULTS:
        p = RESULTS["paired"]
        met = p["throughput_ratio"] >= 1 and p["p95_ratio"] < 1
        lines.append(f"server / static batches of 8 in {p['pairs']} alternating pairs (median): requests/s "
                     f"{p['throughput_ratio']:.2f}x (pairs {', '.join(f'{x:.2f}' for x in p['throughput_ratios'])}), "
                     f"p95 latency {p['p95_ratio']:.2f}x (pairs {', '.join(f'{x:.2f}' for x in p['p95_ratios'])})")
        verdict = f"target (>= the static-batch throughput and a lower p95): {'met' if met else 'NOT met'}"
        lines.append(verdict)
    load = os.getloadavg()
    lines.append(f"model {DTYPE} (compute {compute_dtype}); load average at the end: {load[0]:.2f} {load[1]:.2f} "
                 f"{load[2]:.2f}; torch threads {torch.get_num_threads()}")
    tr = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if tr is not None:
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            tr.write_sep("-", "lvr_engine serving benchmark")
            for line in lines:
                tr.write_line(line)
    os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
    with open(RESULTS_PATH, "w") as f:
        json.dump(dict(results=RESULTS, agreement=agree, verdict=verdict, load_average=load, dtype=DTYPE,
                       compute_dtype=compute_dtype,
                       torch=torch.__version__, threads=torch.get_num_threads()), f, indent=2)
