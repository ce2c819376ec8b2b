"""Benchmark evaluation of latent, chain-of-thought and direct-answer decoding on the same engine.

``evaluate(model, examples, mode)`` decodes every question with :class:`~lvr_engine.LatentGenerator` and scores
it with the dataset's scorer (:data:`lvr_engine.data.SCORERS`):

- ``mode="latent"``: the latent segment the model was trained with — ``num_latent_steps``, K, markers and
  positions read from the checkpoint's ``lvr_config.json`` (written by the trainer), or ``latent_config=``;
- ``mode="cot"``: ``num_latent_steps=0``, the model writes its whole rationale (a stage-0 model);
- ``mode="direct"``: ``num_latent_steps=0`` on the prompt the direct-answer baseline was trained with (the
  same prompt; the answer line is expected at once, so at most ``DIRECT_MAX_NEW_TOKENS`` tokens).

Per question: id, prediction text, extracted answer, gold answer, correct, autoregressive steps (decode
forward passes: the row's new tokens up to and including its EOS, plus the latent steps) and milliseconds
(the batch's generate time divided by its size).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import SCORERS
from .data.example import LETTERS, ReasoningExample
from .data.prompts import get_template
from .data.scoring import (
    JUDGES,
    extract_boxed,
    extract_ivtlr_scienceqa_index,
    extract_m3cot_answer,
    ivtlr_infer_candidates,
    ivtlr_m3cot_candidates,
    score_m3cot,
    vsp_outcome,
)
from .engine.config import LatentConfig
from .engine.generator import LatentGenerator
from .models.loading import LVR_CONFIG, read_lvr_meta
from .progress import progress_bar
from .training.collate import encode_prompts

__all__ = ["evaluate", "EvalResult", "read_lvr_config", "MODES", "DIRECT_MAX_NEW_TOKENS"]

MODES = ("latent", "cot", "direct")
DIRECT_MAX_NEW_TOKENS = 32


@dataclass
class EvalResult:
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def read_lvr_config(path) -> dict | None:
    """The trainer's ``lvr_config.json`` of checkpoint ``path`` (None when it has none); ValueError naming the
    file when it is corrupt."""
    meta = read_lvr_meta(path)
    if meta is not None:
        try:
            LatentConfig(**meta["latent_config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt {Path(path) / LVR_CONFIG}: {e}") from e
    return meta


def _scorer_for(dataset: str | None, examples) -> tuple[str, Callable]:
    name = dataset
    if name is None and len(examples):
        md = examples[0].metadata
        name = md.get("dataset") if isinstance(md, dict) else None
    name = (name or "m3cot").lower()
    return name, SCORERS.get(name, score_m3cot)  # synthetic (and unknown) tasks: letter answers, M3CoT's judge


def _extract(pred: str, ex: ReasoningExample, dataset: str, judge: str) -> str | None:
    if dataset == "vsp":  # the last boxed answer (its U/D/L/R moves are walked on the map)
        return extract_boxed(pred)
    if judge == "ivtlr_infer":
        return ",".join(sorted(ivtlr_infer_candidates(pred))) or None
    if judge == "ivtlr":
        if dataset == "scienceqa":
            i = extract_ivtlr_scienceqa_index(pred)
            return LETTERS[i] if i is not None and i < len(LETTERS) else None
        cands = ivtlr_m3cot_candidates(pred)
        return ",".join(sorted(cands)) or None
    return extract_m3cot_answer(pred, ex.choices)


def _row_lengths(seqs: torch.Tensor, eos: list[int]) -> list[int]:
    """Per row, generated tokens up to and including its first EOS (all of them when it has none)."""
    out = []
    eos_t = torch.tensor(eos, dtype=seqs.dtype)
    for row in seqs.cpu():
        hit = torch.nonzero(torch.isin(row, eos_t)).flatten() if len(eos) else torch.empty(0)
        out.append(int(hit[0]) + 1 if hit.numel() else row.numel())
    return out


def _generator(model, mode: str, latent_config: LatentConfig | None, device, dtype):
    """(generator, meta) for ``mode``; meta is the checkpoint's lvr_config.json (or {})."""
    if isinstance(model, LatentGenerator):
        meta = getattr(model, "lvr_meta", None) or {}
        base = latent_config or model.config
        if mode == "latent":
            gen = model if base is model.config else LatentGenerator(model.model, base, processor=model.processor)
            return gen, meta
        cfg = LatentConfig(num_latent_steps=0, num_selected_patches=0, position_mode=base.position_mode,
                           backend=base.backend)
        return LatentGenerator(model.model, cfg, processor=model.processor), meta
    path = Path(os.fspath(model))
    meta = read_lvr_config(path) if path.is_dir() else None
    if mode == "latent":
        if latent_config is None:
            if meta is None:
                raise ValueError(f"mode='latent' needs the latent setup the model was trained with: {path} has no "
                                 f"{LVR_CONFIG} (written by `lvr train`); pass latent_config=")
            latent_config = LatentConfig(**meta["latent_config"])
        cfg = latent_config
    else:
        pm = (meta or {}).get("latent_config", {}).get("position_mode", "mrope")
        cfg = LatentConfig(num_latent_steps=0, num_selected_patches=0, position_mode=pm)
    gen = LatentGenerator.from_pretrained(path, cfg, dtype=dtype, device=device)
    if gen.processor is None or not hasattr(gen.processor, "apply_chat_template"):
        raise ValueError(f"checkpoint {path} has no processor with a chat template")
    return gen, meta or {}


def evaluate(model, examples: Sequence[ReasoningExample], mode: str = "latent", *, dataset: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 256, judge: str = "m3cot",
             latent_config: LatentConfig | None = None, template: str | None = None, image_size=None,
             device=None, dtype=None, progress: bool = False,
             on_row: Callable[[dict], None] | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None) -> EvalResult:
    """Decode and score ``examples``.

    ``model``: a checkpoint directory (``lvr train`` output, or any supported checkpoint with
    ``latent_config=``) or a :class:`LatentGenerator`. ``dataset`` picks the scorer ("m3cot", "scienceqa";
    default: the examples' ``metadata["dataset"]``; other names use the M3CoT letter judge). ``judge``: one of
    :data:`~lvr_engine.data.scoring.JUDGES`; ``"ivtlr_infer"`` judges each row's prompt and output decoded
    together, as the official IVT-LR inference does. ``template`` defaults to the one the model was trained
    with; ``image_size`` to the template's own, else the model's. ``on_row(row)`` is called per question as
    soon as its batch is done. ``do_sample``/``temperature``/``top_p``/``seed``: sampling (Mirage's test script
    samples at 0.7 / 0.9); batch i samples with seed ``seed + i``, so a run is reproducible per seed.
    ``dataset="vsp"`` (Mirage's spatial planning): a row is correct when its last boxed answer walks to the goal
    and *invalid* when it has no boxed answer or an empty one (``summary["invalid"]``, ``"invalid_rate"``).

    Returns :class:`EvalResult`: ``summary`` {accuracy, correct, num_questions, mean_steps, ms_per_question,
    mode, num_latent_steps, num_selected_patches, ...} and one row per question {id, prediction,
    extracted, answer, correct, steps, ms}.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; known judges: {list(JUDGES)}")
    n = len(examples)
    if n == 0:
        raise ValueError("no examples to evaluate")
    gen, meta = _generator(model, mode, latent_config, device, dtype)
    ds_name, scorer = _scorer_for(dataset, examples)
    template = template or meta.get("template") or ("mirage" if ds_name == "vsp" else "ivtlr")
    if image_size is None:
        image_size = get_template(template).image_size or meta.get("image_size")
    cfg = gen.config
    N = cfg.num_latent_steps if cfg.trigger == "prompt" else 0
    K = cfg.num_selected_patches if N else 0
    if mode == "direct":
        max_new_tokens = min(max_new_tokens, DIRECT_MAX_NEW_TOKENS)
    eos = gen.adapter.eos_token_ids
    tok = getattr(gen.processor, "tokenizer", gen.processor)

    bar = progress_bar(total=n, desc=f"eval {mode}", unit="q", disable=not progress)
    rows: list[dict] = []
    correct = 0
    passes = 0
    for start in range(0, n, batch_size):
        batch = [examples[i] for i in range(start, min(start + batch_size, n))]
        if N and K:
            blind = [ex.id for ex in batch if ex.image is None]
            if blind:
                raise ValueError(f"mode='latent' selects {K} image patches per step, but examples {blind} have no "
                                 "image; evaluate image questions only (require_image=True when loading)")
        # a template in the official IVT-LR layout carries one placeholder per latent step the generator consumes
        prompt = encode_prompts(batch, gen.processor, template=template, image_size=image_size,
                                latent_steps=N if cfg.placeholder_id is not None else 0)
        t0 = time.perf_counter()
        out = gen.generate(**prompt.model_inputs(), max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_p=top_p,
                           seed=None if seed is None else seed + start // batch_size)
        ms = (time.perf_counter() - t0) * 1000 / len(batch)
        passes += out.stats.forward_passes
        lengths = _row_lengths(out.sequences, eos)
        for b, ex in enumerate(batch):
            ids = out.sequences[b, :lengths[b]].tolist()
            pred = tok.decode(ids, skip_special_tokens=True).strip()
            judged = pred
            if judge == "ivtlr_infer":  # the official loop decodes the prompt and the output together
                prompt_ids = prompt.input_ids[b][prompt.attention_mask[b].bool()].tolist()
                judged = tok.decode(prompt_ids + ids, skip_special_tokens=True)
            row = {"id": ex.id, "prediction": pred, "extracted": _extract(judged, ex, ds_name, judge),
                   "answer": ex.answer, "correct": bool(scorer(judged, ex, judge=judge)),
                   "steps": lengths[b] + N, "ms": ms}
            if ds_name == "vsp":
                row["invalid"] = vsp_outcome(judged, ex.metadata["map_desc"]).invalid
            rows.append(row)
            correct += row["correct"]
            if on_row is not None:
                on_row(row)
        bar.set_postfix(acc=f"{correct / len(rows):.3f}", refresh=False)
        bar.update(len(batch))
    bar.close()
    summary = {
        "accuracy": correct / len(rows), "correct": correct, "num_questions": len(rows),
        "mean_steps": sum(r["steps"] for r in rows) / len(rows),
        "ms_per_question": sum(r["ms"] for r in rows) / len(rows),
        "mode": mode, "dataset": ds_name, "judge": judge, "num_latent_steps": N, "num_selected_patches": K,
        "trigger": cfg.trigger, "forward_passes": passes, "do_sample": do_sample,
        "model": os.fspath(model) if not isinstance(model, LatentGenerator) else None,
    }
    if ds_name == "vsp":
        summary["invalid"] = sum(r["invalid"] for r in rows)
        summary["invalid_rate"] = summary["invalid"] / len(rows)
    return EvalResult(summary, rows)
