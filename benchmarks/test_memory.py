"""Peak host memory of one batch-8 'small' bf16 lvr_engine generate, against a paper estimate.

The measurement runs in a fresh subprocess (``python -c "from benchmarks.test_memory import child; child()"``):
torch, transformers (incl. the Qwen2-VL modeling module), lvr_engine and the inputs are loaded first; then
``base`` = the process RSS right before the model is built; the model is built directly in bf16, one generate
call runs (N=3, K=32, 8 answer tokens, batch 8); ``peak`` = the process's own RSS high-water mark (VmHWM),
reset right at ``base`` (benchmarks/_rss.py says why not ``ru_maxrss``).
delta = peak - base must stay within 1.2 x (weights + KV cache + activations) computed on paper.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH = 8
TOLERANCE = 1.2
MiB = 2 ** 20


def child():
    """Runs in the subprocess; prints one JSON line with the measurement and the paper estimate."""
    import torch
    import transformers  # noqa: F401
    import transformers.models.qwen2_vl.modeling_qwen2_vl  # noqa: F401  (lazy module: import before `base`)

    import lvr_engine  # noqa: F401
    from benchmarks._rss import peak_rss, reset_peak
    from benchmarks._rss import rss as _rss
    from benchmarks.conftest import ANSWER_TOKENS, K_PATCHES, N_LATENT, build_model, make_inputs, model_config
    from lvr_engine import LatentConfig, LatentGenerator

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    batch, _ = make_inputs("small-bf16", BATCH)
    input_bytes = sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
    peak_before = peak_rss()
    if not reset_peak():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs): the peak would include setup")
    base = _rss()

    model = build_model("small", torch.bfloat16, init_dtype=torch.bfloat16)
    after_build = _rss()
    gen = LatentGenerator(model, LatentConfig(num_latent_steps=N_LATENT, num_selected_patches=K_PATCHES))
    maxrss = peak_rss
    phase = {}
    encode = gen.adapter.encode_images

    def encode_and_mark(*a, **k):  # instance-level wrapper: where in the call the peak happens
        phase["peak_before_vision"] = maxrss()
        r = encode(*a, **k)
        phase["peak_after_vision"], phase["rss_after_vision"] = maxrss(), _rss()
        return r
    gen.adapter.encode_images = encode_and_mark
    out = gen.generate(**batch, max_new_tokens=ANSWER_TOKENS, eos_token_id=[])
    assert out.sequences.shape == (BATCH, ANSWER_TOKENS)
    after_generate = _rss()
    peak = peak_rss()

    # ---- paper estimate --------------------------------------------------------------------------------
    cfg = model_config("small")
    tc, vc = cfg.text_config, cfg.vision_config
    el = torch.empty(0, dtype=gen.runner.compute_dtype).element_size()  # KV cache and activations
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    # On a CPU without native bf16 the lean runner computes in fp32 from its own copy of the decoder's matrices
    # (bf16 panels packed for ops.mixed_linear, or an fp32 copy; engine/weights.py) and runs the vision tower
    # from an fp32 copy (models/converted.py). Both are part of the budget, counted at their real size.
    compute_copy = _bytes_not_in(_compute_tensors(gen.runner), model)
    vision_copy = _bytes_not_in(_converted_tensors(model), model)
    L, H, Hkv, h, I = (tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads, tc.hidden_size,
                       tc.intermediate_size)
    D = h // H
    B, S = batch["input_ids"].shape
    S_total = S + N_LATENT * (K_PATCHES + 1) + ANSWER_TOKENS
    kv = L * 2 * B * Hkv * S_total * D * el
    # held through the prefill: the prompt embeddings (B,S,h) and the image embeddings kept for feedback (B,I,h)
    n_img = int(batch["pixel_values"].shape[0]) // (vc.spatial_merge_size ** 2)
    held = B * S * h * el + n_img * h * el
    # prefill: the runner runs groups of Bg whole rows of at most PREFILL_CHUNK_TOKENS tokens (runner.py); the
    # largest live tensors of one layer for one group: fused gate/up output (t,2I) + act*up (t,I) = 3 x t*I over
    # an MLP chunk of t <= MLP_CHUNK_TOKENS tokens; residual, normed input, qkv, attention output ~ 4 x Bg*S*h;
    # SDPA scores Bg*H*S*S fp32 if the kernel materialised them (the CPU flash kernel does not: it works in
    # per-thread blocks), an upper bound. Generation's prefill returns only each row's last hidden state.
    from lvr_engine.engine.runner import MLP_CHUNK_TOKENS, PREFILL_CHUNK_TOKENS
    Bg = min(B, max(1, PREFILL_CHUNK_TOKENS // S))
    mlp_act = 3 * min(Bg * S, MLP_CHUNK_TOKENS) * I * el
    hid_act = 4 * Bg * S * h * el
    sdpa_scores = Bg * H * S * S * 4
    prefill_act = held + mlp_act + hid_act + sdpa_scores
    # vision tower (HF code, SDPA): compute-dtype copy of pixel_values (P, 3*2*14*14) and the conv's reordered copy,
    # or later q/k rotated in fp32 (HF upcasts: ~4 x P*embed*4) + the block MLP (2 x P*embed*mlp_ratio*2)
    # the engine encodes images in groups of at most VISION_GROUP_PATCHES patches (models/qwen2_vl.py)
    from lvr_engine.models.qwen2_vl import VISION_GROUP_PATCHES
    P = min(int(batch["pixel_values"].shape[0]), VISION_GROUP_PATCHES)
    vision_act = max(2 * P * batch["pixel_values"].shape[1] * el,
                     4 * P * vc.embed_dim * 4 + 2 * P * vc.embed_dim * vc.mlp_ratio * el)
    activations = max(prefill_act, vision_act)
    paper = weights + compute_copy + vision_copy + kv + activations
    res = dict(batch=B, prompt=S, S_total=S_total, base_rss=base, peak_rss=peak, peak_before_build=peak_before,
               after_build_rss=after_build, **phase, after_generate_rss=after_generate, delta=peak - base,
               input_bytes=input_bytes, weights=weights, kv=kv, held=held, mlp_act=mlp_act, hid_act=hid_act,
               sdpa_scores=sdpa_scores, group_rows=Bg, prefill_act=prefill_act, vision_act=vision_act,
               activations=activations, paper=paper, compute_copy=compute_copy, vision_copy=vision_copy,
               compute_dtype=str(gen.runner.compute_dtype), el=el, layers=L, heads=H, kv_heads=Hkv, head_dim=D,
               hidden=h, intermediate=I,
               n_params=sum(p.numel() for p in model.parameters()))
    print("MEMORY_JSON " + json.dumps(res))


def _compute_tensors(runner):
    """Every tensor the runner's compute-weight cache holds (packed panels included)."""
    import dataclasses

    from lvr_engine.engine.weights import PackedWeight, compute_weights
    cw = compute_weights(runner.w, runner.compute_dtype)
    out = []

    def walk(v):
        if isinstance(v, PackedWeight):
            out.append(v.panels)
        elif isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                walk(getattr(v, f.name))
    if cw is not None:
        walk(cw)
    return out


def _converted_tensors(model):
    """Parameters and buffers of the converted (compute-dtype) copies cached for ``model``'s parts."""
    from lvr_engine.models.converted import _CACHE
    out = []
    for module in model.modules():
        for _, copy_ in _CACHE.get(module, {}).values():
            out += list(copy_.parameters()) + list(copy_.buffers())
    return out


def _bytes_not_in(tensors, model):
    """Bytes of the distinct storages among ``tensors`` that the model's own parameters/buffers do not hold."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _describe(r):
    m = lambda x: f"{x / MiB:.1f} MiB"  # noqa: E731
    lines = [
        f"batch {r['batch']}, prompt {r['prompt']} tokens, S_total = {r['prompt']} + 3*(32+1) + 8 = {r['S_total']}",
        f"RSS before building the model (torch/transformers/lvr_engine imported, inputs built: "
        f"{m(r['input_bytes'])}): {m(r['base_rss'])}",
        f"RSS after build {m(r['after_build_rss'])}, after generate {m(r['after_generate_rss'])}, "
        f"peak (VmHWM) {m(r['peak_rss'])}  ->  delta = {m(r['delta'])}",
        f"where: peak before the vision tower {m(r['peak_before_vision'] - r['base_rss'])} over base, at its end "
        f"{m(r['peak_after_vision'] - r['base_rss'])} (RSS then {m(r['rss_after_vision'] - r['base_rss'])}), "
        f"end of generate {m(r['delta'])}",
        f"weights: {r['n_params']:,} params x 2 bytes (bf16, vision tower included) = {m(r['weights'])}",
        f"compute dtype {r['compute_dtype']}: the runner's copy of the decoder matrices (bf16 panels for "
        f"mixed_linear + fp32 norms/biases) = {m(r['compute_copy'])}; fp32 copy of the vision tower = "
        f"{m(r['vision_copy'])}",
        f"KV cache: {r['layers']} layers x 2 x B {r['batch']} x Hkv {r['kv_heads']} x S_total {r['S_total']} x "
        f"D {r['head_dim']} x {r['el']} bytes = {m(r['kv'])}",
        f"prefill activations (groups of {r['group_rows']} rows): prompt embeddings B*S*h + image embeddings kept "
        f"for feedback (B*I)*h, x {r['el']} bytes = {m(r['held'])}; MLP 3 x min(group tokens, MLP chunk)*I*{r['el']} "
        f"= {m(r['mlp_act'])}; hidden 4 x {r['group_rows']}*S*h*{r['el']} = {m(r['hid_act'])}; SDPA scores "
        f"{r['group_rows']}*H*S^2*4 = {m(r['sdpa_scores'])} (upper bound: the CPU flash kernel does not materialise "
        f"them) -> {m(r['prefill_act'])}",
        "vision activations (one group of images): "
        f"max(2 x pixels in the compute dtype, fp32 rotary q/k + block MLP) = "
        f"{m(r['vision_act'])}",
        f"paper = weights + compute copy + vision copy + KV + max(prefill, vision) = {m(r['weights'])} + "
        f"{m(r['compute_copy'])} + {m(r['vision_copy'])} + "
        f"{m(r['kv'])} + {m(r['activations'])}"
        f" = {m(r['paper'])};  delta / paper = {r['delta'] / r['paper']:.2f} (limit {TOLERANCE})",
    ]
    return lines


def test_peak_rss_batch8_bf16(benchmark):
    from benchmarks.conftest import RESULTS

    def run():
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", "from benchmarks.test_memory import child; child()"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        line = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON ")][-1]
        return json.loads(line[len("MEMORY_JSON "):])

    benchmark.group = "memory small-bf16"
    r = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    lines = _describe(r)
    print("\n" + "\n".join(lines))
    benchmark.extra_info.update({k: v for k, v in r.items()})
    benchmark.extra_info["delta_over_paper"] = r["delta"] / r["paper"]
    RESULTS["memory"] = dict(r, delta_over_paper=r["delta"] / r["paper"], lines=lines,
                             summary=f"batch-8 bf16 peak RSS delta {r['delta'] / MiB:.1f} MiB vs paper "
                                     f"{r['paper'] / MiB:.1f} MiB = {r['delta'] / r['paper']:.2f}x "
                                     f"(limit {TOLERANCE}x); absolute peak {r['peak_rss'] / MiB:.1f} MiB")
    assert r["delta"] <= TOLERANCE * r["paper"], "\n".join(lines)
