"""`lvr demo` / `make demo`: does latent visual reasoning beat explicit reasoning at an equal training budget, and do
its latents matter? Five methods, one engine, one synthetic task, measured on a CPU in minutes.

Nothing is downloaded. :func:`run_demo`

1. writes a tiny random-init Qwen2-VL (+ tokenizer and processor trained on the task's words)
   (:func:`~lvr_engine.models.tiny.write_tiny_model`): the one base every method starts from;
2. generates the synthetic grid task (:func:`~lvr_engine.data.synthetic.make_synthetic_dataset`): the image is a
   board of coloured shapes, the question names an *anchor* shape and asks about the cell right of / below it; the
   rationale has 3 steps (locate the anchor, read the neighbouring cell, conclude); each question also has a
   *helper image* (the board with only the anchor and the asked-about cell, framed) and its *caption* (the same in
   words);
3. trains five models from that base on the same training questions, in the same data order, with the **same number
   of optimizer steps, batch size and learning-rate schedule** (constant LR, AdamW; a method with several stages
   starts AdamW afresh at each, as IVT-LR's and Mirage's recipes do), in parallel processes of one thread each:

   - **direct**: the answer line alone (``mode="direct"``);
   - **explicit CoT**: rationale, then the answer;
   - **CapImagine** (text imagination): the helper image's caption, the rationale's conclusion, the answer, all as
     text (the Mirage sequence below with the latents written out as their caption);
   - **IVT-LR**: the curriculum; stage 0 (the full rationale) counts toward the budget, then stages 1..N each turn
     one more rationale step into a latent step (the K most-attended image patches + the last hidden state);
   - **Mirage**: stage 1 (one teacher-forced pass; the L latent slots hold the helper image's embeddings pooled to
     L, loss ``0.1 * CE + (1 - cos)``), then stage 2 (the slots feed back hidden states, CE only), within the same
     budget; the target is ``<|latent_start|>`` L latents ``<|latent_end|>``, the conclusion, the answer. The vision
     tower trains in both stages (Mirage freezes it because it starts from a pretrained VLM; this base is random),
     with stage 1's pooled targets detached (``mirage_detach_targets``: attached, the tower collapses to meet the
     cosine term and the model never learns to see);

4. evaluates all five on held-out questions on the same engine (:func:`~lvr_engine.evaluation.evaluate`), Mirage
   twice (its own token-triggered inference, and the fixed segment of L latents it was trained on): accuracy with its
   Wilson 95% interval, mean autoregressive steps (generated tokens up to the end of turn, plus latent steps),
   milliseconds per question, one after the other in this process;
5. runs the causal-mediation readout (:func:`~lvr_engine.analysis.mediation.mediation_readout`) on the two latent
   models over all held-out questions: answer flip rates when the latents are zeroed / swapped with another
   question's / (IVT-LR) fed random patches, how much the latents change when the image is swapped for another
   question's, and how alike the latents of different questions are; Mirage's readout runs the sequence it was
   trained on (start marker, L latents, end marker) with the prompt trigger, since the analysis hooks need a
   fixed segment;
6. draws the training losses (``loss.png``) and, for a few test questions, the patches every IVT-LR latent step fed
   back (``heatmaps/q<i>.png``; Mirage's latents select no patches, so it has no such map).

Scoring: the answer is the letter after "the answer is" (``judge="ivtlr"``), for accuracy and mediation alike.

Output directory (default ``runs/demo``)::

    base_model/                 the random-init checkpoint every method starts from
    direct_model/ cot_model/ capimagine_model/ ivtlr_model/ mirage_model/   the five trained models (loadable with
                                LatentGenerator.from_pretrained; each has checkpoints/stage-<s>/); mirage_stage1/ is
                                Mirage's stage-1 model
    logs/<method>.log           each training process's output
    loss.png                    training loss per step (needs matplotlib: the ``plot`` extra)
    heatmaps/q<i>.png           patches chosen at each IVT-LR latent step for test question i
    results.json                both tables, per method ``train_steps``, accuracy, interval, steps, ms, mediation

The task is the easy end of the synthetic generator (3 x 3 boards, two question types, sparse boards) so that a model
trained from scratch learns it in a few minutes of CPU; :data:`DEMO` holds every setting.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["DemoConfig", "DEMO", "QUICK", "METHODS", "eval_rows", "run_demo", "format_table", "format_mediation_table",
           "wilson_interval"]


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo (see :data:`DEMO` and :data:`QUICK`)."""

    # task (make_synthetic_dataset): canvas/28 = tokens per side; 84 px -> 3 x 3 = 9 image tokens, one per cell
    grid: int = 3
    canvas: int = 84
    fill: float = 0.2
    qtypes: tuple[str, ...] = ("right_color", "below_shape")
    num_train: int = 2400
    num_test: int = 256
    # model (write_tiny_model)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 64
    initializer_range: float = 0.1   # 0.02 (the Qwen default) leaves a model this small unable to learn to see
    # latent methods
    num_latent_steps: int = 3        # IVT-LR: N latent steps (its curriculum has N + 1 stages)
    num_selected_patches: int = 2    # IVT-LR: K patches per step
    mirage_latents: int = 3          # Mirage: L latent slots (the 9 helper-image tokens pool to one per board row)
    # the training budget, the same for every method
    batch_size: int = 16
    lr: float = 1e-3
    max_grad_norm: float | None = 1.0
    budget_epochs: int = 6           # every method trains budget_epochs x steps_per_epoch() optimizer steps
    latent_stage_epochs: int = 1     # IVT-LR: epochs of each latent stage 1..N; stage 0 gets the rest of the budget
    mirage_stage1_epochs: int = 3    # Mirage: epochs of stage 1; stage 2 gets the rest
    # evaluation
    eval_batch_size: int = 32
    max_new_tokens: int = 96
    mediation_max_new_tokens: int = 32
    num_heatmaps: int = 4
    # processes and CPU threads: every training runs in its own process with `threads` torch threads (1 is as fast
    # as 2 for a model this small); `workers` of them at a time (1: one after the other in this process)
    threads: int = 1
    workers: int = 2

    @property
    def image_tokens(self) -> int:
        return (self.canvas // 28) ** 2

    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    def train_steps(self) -> int:
        """Optimizer steps of every method."""
        return self.budget_epochs * self.steps_per_epoch()

    def ivtlr_stage0_epochs(self) -> int:
        return self.budget_epochs - self.num_latent_steps * self.latent_stage_epochs

    def validate(self) -> None:
        if self.num_latent_steps * self.num_selected_patches > self.image_tokens:
            raise ValueError(f"{self.num_latent_steps} latent steps x {self.num_selected_patches} patches exceed the "
                             f"{self.image_tokens} image tokens of a {self.canvas} px image")
        if self.ivtlr_stage0_epochs() < 1:
            raise ValueError(f"budget_epochs {self.budget_epochs} leaves IVT-LR no stage-0 epoch after "
                             f"{self.num_latent_steps} latent stages of {self.latent_stage_epochs}")
        if not 1 <= self.mirage_stage1_epochs < self.budget_epochs:
            raise ValueError(f"mirage_stage1_epochs must be in [1, budget_epochs), got {self.mirage_stage1_epochs}")
        if self.mirage_latents > self.image_tokens:
            raise ValueError(f"Mirage pools the helper image's {self.image_tokens} tokens into "
                             f"{self.mirage_latents} latents: too many")
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be >= 1")


DEMO = DemoConfig()
"""The full demo (a few minutes on a 2-core CPU)."""

QUICK = DemoConfig(num_train=16, num_test=8, hidden_size=64, num_layers=1, vision_depth=1, vision_embed_dim=32,
                   batch_size=8, budget_epochs=4, latent_stage_epochs=1, mirage_stage1_epochs=2, eval_batch_size=8,
                   max_new_tokens=48, mediation_max_new_tokens=16, num_heatmaps=2)
"""A few optimizer steps per method: checks the pipeline end to end in seconds (tests); learns nothing."""

METHODS: tuple[tuple[str, str], ...] = (
    ("direct", "direct answer"),
    ("cot", "explicit CoT"),
    ("capimagine", "CapImagine (text imagination)"),
    ("ivtlr", "IVT-LR (latent)"),
    ("mirage", "Mirage (latent)"),
)
"""(key, label) of the five methods, in table order."""


def eval_rows(cfg: DemoConfig) -> list[tuple[str, str]]:
    """(key, label) of the result table's rows: the five methods with their own inference, plus Mirage's model on
    the sequence it was trained on (``mirage_segment``: a fixed segment of L latents between its markers)."""
    labels = dict(METHODS)
    return [(k, labels[k]) for k in ("direct", "cot", "capimagine", "ivtlr")] + [
        ("mirage", f"{labels['mirage']}, own inference"),
        ("mirage_segment", f"{labels['mirage']}, {cfg.mirage_latents} latents")]

_MEDIATED = ("ivtlr", "mirage_segment")   # the rows the mediation readout runs on
_ORDER = ("mirage", "cot", "ivtlr", "capimagine", "direct")   # the shortest wall time with 2 workers (measured)
_OWNED = ("base_model", "direct_model", "cot_model", "capimagine_model", "ivtlr_model", "mirage_model",
          "mirage_stage1", "logs", "heatmaps", "loss.png", "results.json",
          "latent_model")   # (the latent_model/ of the demo before the five methods)
_CHANCE = 0.25


def _clean(out: Path) -> None:
    """Remove what an earlier demo run wrote into ``out`` (only the demo's own entries)."""
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _examples(cfg: DemoConfig, n: int, seed: int, split: str):
    from .data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(n, seed, split, grid=cfg.grid, canvas=cfg.canvas, fill=cfg.fill,
                                  qtypes=cfg.qtypes)


def method_examples(method: str, examples):
    """The training examples of ``method``: the questions as they are (direct, CoT, IVT-LR) or with the target
    rewritten (the prompt and image never change):

    - CapImagine: steps = [the caption, the rationale's conclusion] (text imagination, then the conclusion);
    - Mirage: steps = [``<output_image>`` (where the latents go), the rationale's conclusion]; the helper image is
      ``metadata["helper_image"]``.
    """
    from .data.mirage import OUTPUT_IMAGE

    if method in ("direct", "cot", "ivtlr"):
        return list(examples)
    if method == "capimagine":
        return [dataclasses.replace(ex, steps=[ex.metadata["caption"], ex.steps[-1]],
                                    rationale=f"{ex.metadata['caption']} {ex.steps[-1]}") for ex in examples]
    if method == "mirage":
        return [dataclasses.replace(ex, steps=[OUTPUT_IMAGE, ex.steps[-1]], rationale=ex.steps[-1])
                for ex in examples]
    raise ValueError(f"unknown demo method {method!r}; known: {[k for k, _ in METHODS]}")


def _train_logs(out: Path, method: str) -> list[Path]:
    """The train_log.jsonl files of ``method``'s trainings (for progress)."""
    if method == "mirage":
        return [out / "mirage_stage1" / "train_log.jsonl", out / "mirage_model" / "train_log.jsonl"]
    return [out / f"{method}_model" / "train_log.jsonl"]


def _train_method(job: dict) -> dict:
    """Train one method (in a worker process, or in this one with ``workers=1``); its output goes to
    ``logs/<method>.log``. Returns the per-step losses, the stage lengths and the wall time."""
    from transformers.utils import logging as hf_logging

    from .training.trainer import TrainConfig, Trainer

    cfg: DemoConfig = job["config"]
    method, out, seed = job["method"], Path(job["out"]), job["seed"]
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    log_path = out / "logs" / f"{method}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        torch.set_num_threads(cfg.threads)
        hf_logging.disable_progress_bar()
        try:
            train = method_examples(method, _examples(cfg, cfg.num_train, seed, "train"))
            spe = cfg.steps_per_epoch()
            common = dict(dataset=train, batch_size=cfg.batch_size, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
                          seed=seed, progress=False, image_size=cfg.canvas, log_every=1)
            base = str(out / "base_model")
            stages: list[tuple[str, int]] = []
            if method == "direct":
                runs = [(TrainConfig(model=base, output_dir=str(out / "direct_model"), mode="direct",
                                     epochs_per_stage=cfg.budget_epochs, **common), False)]
                stages = [("answer only", cfg.train_steps())]
            elif method in ("cot", "capimagine"):
                runs = [(TrainConfig(model=base, output_dir=str(out / f"{method}_model"), objective="ivtlr",
                                     max_stage=0, epochs_per_stage=cfg.budget_epochs, **common), False)]
                stages = [("text" if method == "cot" else "caption text", cfg.train_steps())]
            elif method == "ivtlr":
                N = cfg.num_latent_steps
                first = TrainConfig(model=base, output_dir=str(out / "ivtlr_model"), objective="ivtlr", max_stage=N,
                                    num_latent_steps=N, num_selected_patches=cfg.num_selected_patches,
                                    epochs_per_stage=cfg.ivtlr_stage0_epochs(), stop_after_stage=0, **common)
                later = dataclasses.replace(first, epochs_per_stage=cfg.latent_stage_epochs, stop_after_stage=None)
                runs = [(first, False), (later, True)]
                stages = [("stage 0", spe * cfg.ivtlr_stage0_epochs())] + \
                    [(f"stage {s}", spe * cfg.latent_stage_epochs) for s in range(1, N + 1)]
            elif method == "mirage":
                L = cfg.mirage_latents
                s1 = TrainConfig(model=base, output_dir=str(out / "mirage_stage1"), objective="mirage_stage1",
                                 num_latent_steps=L, train_vision=True, mirage_detach_targets=True,
                                 epochs_per_stage=cfg.mirage_stage1_epochs, **common)
                s2 = dataclasses.replace(s1, model=str(out / "mirage_stage1"), output_dir=str(out / "mirage_model"),
                                         objective="mirage_stage2",
                                         epochs_per_stage=cfg.budget_epochs - cfg.mirage_stage1_epochs)
                runs = [(s1, False), (s2, False)]
                stages = [("stage 1", spe * cfg.mirage_stage1_epochs),
                          ("stage 2", spe * (cfg.budget_epochs - cfg.mirage_stage1_epochs))]
            else:
                raise ValueError(f"unknown demo method {method!r}")
            losses: list[float] = []
            for tc, resume in runs:
                losses += list(Trainer(tc).train(resume=resume).losses)
        finally:
            torch.set_num_threads(threads)
    return {"method": method, "losses": losses, "stages": stages, "train_steps": len(losses),
            "seconds": time.perf_counter() - t0, "log": str(log_path)}


def _steps_logged(paths: Sequence[Path]) -> int:
    n = 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                n += f.read().count(b"\n")
        except FileNotFoundError:
            pass
    return n


def _train_all(cfg: DemoConfig, out: Path, seed: int, progress: bool) -> dict:
    """Train the five methods, ``cfg.workers`` processes at a time; one progress bar over all their steps."""
    from .progress import progress_bar

    jobs = [{"config": cfg, "method": m, "out": str(out), "seed": seed} for m in _ORDER]
    total = cfg.train_steps() * len(jobs)
    bar = progress_bar(total=total, desc="training 5 models", unit="step", disable=not progress)
    results: dict[str, dict] = {}
    logs = [p for m in _ORDER for p in _train_logs(out, m)]

    def tick():
        bar.update(max(0, min(total, _steps_logged(logs)) - bar.n))

    try:
        if cfg.workers == 1:
            for job in jobs:
                results[job["method"]] = _train_method(job)
                tick()
        else:
            import concurrent.futures as cf
            import multiprocessing

            with cf.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                futures = {ex.submit(_train_method, job): job["method"] for job in jobs}
                pending = set(futures)
                try:
                    while pending:
                        done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                        for f in done:
                            method = futures[f]
                            try:
                                results[method] = f.result()
                            except Exception as e:
                                raise RuntimeError(f"training {method} failed: {type(e).__name__}: {e} (its output: "
                                                   f"{out / 'logs' / (method + '.log')})") from e
                            bar.write(f"  {dict(METHODS)[method]}: {results[method]['train_steps']} steps in "
                                      f"{results[method]['seconds']:.0f} s")
                        tick()
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
        tick()
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------------------------------
# evaluation


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (95% for the default ``z``)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _letter_answers(processor):
    """``answer_fn`` for the mediation readout: the letters after "the answer is" (the demo's judge), or None."""
    from .data.scoring import ivtlr_m3cot_candidates

    tok = getattr(processor, "tokenizer", processor)

    def answers(sequences):
        return [",".join(sorted(ivtlr_m3cot_candidates(t))) or None
                for t in tok.batch_decode(sequences, skip_special_tokens=True)]

    return answers


def _mirage_latent_use(gen, test, cfg: DemoConfig) -> dict:
    """How Mirage's checkpoint uses its latent mode at inference (``trigger="token"``): the share of questions whose
    first token opens a latent segment, and the mean number of latent steps per question."""
    from .training.collate import encode_prompts

    c = gen.config
    opened, steps, n = 0, 0, 0
    for start in range(0, len(test), cfg.eval_batch_size):
        batch = test[start:start + cfg.eval_batch_size]
        prompt = encode_prompts(batch, gen.processor, image_size=cfg.canvas)
        seq = gen.generate(**prompt.model_inputs(), max_new_tokens=cfg.max_new_tokens).sequences
        opened += int((seq[:, 0] == c.latent_start_id).sum())
        steps += int((seq == c.latent_pad_id).sum())
        n += seq.shape[0]
    return {"opened_latent_segment": opened / n, "mean_latent_steps": steps / n, "max_latent_steps": c.max_latent_steps}


def _generator(path: Path, key: str, cfg: DemoConfig):
    """The generator of an evaluation row: the checkpoint's own inference (its lvr_config.json), or for
    ``mirage_segment`` the sequence Mirage trains on, with a fixed segment: ``<|latent_start|>``, L latents,
    ``<|latent_end|>`` (the prompt trigger; the analysis hooks need a fixed segment)."""
    from .engine import LatentConfig, LatentGenerator
    from .evaluation import read_lvr_config

    lc = read_lvr_config(path)["latent_config"]
    if key == "mirage_segment":
        return LatentGenerator.from_pretrained(path, LatentConfig(
            num_latent_steps=cfg.mirage_latents, num_selected_patches=0, trigger="prompt",
            start_marker_id=lc["latent_start_id"], end_marker_id=lc["latent_end_id"],
            position_mode=lc.get("position_mode", "mrope")))
    return LatentGenerator.from_pretrained(path, LatentConfig(**lc))


def _mediation(gen, test, cfg: DemoConfig) -> dict:
    """The mediation readout of a latent model over all test questions (one batch)."""
    from .analysis.mediation import mediation_readout
    from .training.collate import encode_prompts

    batch = encode_prompts(list(test), gen.processor, image_size=cfg.canvas).model_inputs()
    return mediation_readout(gen, batch, answer_fn=_letter_answers(gen.processor),
                             max_new_tokens=cfg.mediation_max_new_tokens)


def _selection_stats(gen, test, cfg: DemoConfig) -> dict:
    """Run the IVT-LR model on every test question and measure where its latent steps looked: per step, the share of
    questions whose chosen patches include the anchor cell / the cell the question is about (chance for one step:
    K / image tokens)."""
    from .training.collate import encode_prompts

    N, K = gen.config.num_latent_steps, gen.config.num_selected_patches
    hits = {"anchor": [0] * N, "target": [0] * N}
    n = 0
    for start in range(0, len(test), cfg.eval_batch_size):
        batch = test[start:start + cfg.eval_batch_size]
        prompt = encode_prompts(batch, gen.processor, image_size=cfg.canvas)
        out = gen.generate(**prompt.model_inputs(), max_new_tokens=1)
        for b, ex in enumerate(batch):
            grid_hw = tuple(int(x) // 2 for x in prompt.image_grid_thw[b, 1:].tolist())
            layout = ex.metadata["layout"]
            anchor = set(layout.cell_tokens(*ex.metadata["anchor_cell"], grid_hw=grid_hw))
            target = {t for rc in ex.metadata["inspected_cells"] for t in layout.cell_tokens(*rc, grid_hw=grid_hw)}
            for t in range(N):
                chosen = set(out.selected[b, t].tolist())
                hits["anchor"][t] += bool(chosen & anchor)
                hits["target"][t] += bool(chosen & target)
            n += 1
    return {"questions": n, "chance_per_step": K / cfg.image_tokens,
            "anchor_hit_rate": [h / n for h in hits["anchor"]], "target_hit_rate": [h / n for h in hits["target"]]}


def _heatmaps(gen, test, out_dir: Path, cfg: DemoConfig) -> list[dict]:
    from PIL import Image

    from .analysis.heatmap import draw_selection_heatmap
    from .training.collate import encode_prompts

    out_dir.mkdir(parents=True, exist_ok=True)
    batch = list(test[:cfg.num_heatmaps])
    if not batch:
        return []
    prompt = encode_prompts(batch, gen.processor, image_size=cfg.canvas)
    res = gen.generate(**prompt.model_inputs(), max_new_tokens=cfg.max_new_tokens)
    tok = gen.processor.tokenizer
    rows = []
    for i, ex in enumerate(batch):
        text = tok.decode(res.sequences[i], skip_special_tokens=True).strip()
        pred = text.rsplit("answer is", 1)[-1].strip()[:1] if "answer is" in text else "?"
        title = f"q{i}: {ex.question}  model: {pred}  gold: {ex.answer}"
        path = out_dir / f"q{i}.png"
        fig = draw_selection_heatmap(ex.image, res.selected[i], prompt.image_grid_thw[i], 2, None, title)
        scale = max(1, round(336 / ex.image.size[0]))  # the tiny images are 84 px: enlarge for viewing
        if scale > 1:
            fig = fig.resize((fig.width * scale, fig.height * scale), Image.Resampling.NEAREST)
        fig.save(path, format="PNG")
        rows.append({"path": str(path), "id": ex.id, "question": ex.question, "gold": ex.answer,
                     "output": text, "selected": res.selected[i].tolist(),
                     "anchor_cell": list(ex.metadata["anchor_cell"]),
                     "inspected_cells": [list(rc) for rc in ex.metadata["inspected_cells"]]})
    return rows


# --------------------------------------------------------------------------------------------------
# output


def _smooth(values: Sequence[float], segments: Sequence[int], window: int = 20) -> list[float]:
    """Trailing mean over ``window`` steps, restarted at every segment (stage) boundary."""
    out, start = [], 0
    for n in segments:
        seg = values[start:start + n]
        for i in range(len(seg)):
            w = seg[max(0, i - window + 1):i + 1]
            out.append(sum(w) / len(w))
        start += n
    return out + list(values[start:])


_COLORS = {"direct": "tab:gray", "cot": "tab:blue", "capimagine": "tab:green", "ivtlr": "tab:red",
           "mirage": "tab:purple"}


def _plot_losses(losses: dict, path: Path, cfg: DemoConfig) -> bool:
    """Draw ``loss.png`` from ``{method: {"losses": [...], "stages": [(name, steps), ...]}}``; False (and a line
    saying which extra to install) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"loss plot skipped: matplotlib is not installed (pip install 'lvr_engine[plot]'); the losses are "
              f"in {path.with_name('results.json')}", flush=True)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(METHODS)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for key, _ in METHODS:
        if key not in losses:
            continue
        vals, stages = losses[key]["losses"], [n for _, n in losses[key]["stages"]]
        if not vals:
            continue
        x = range(1, len(vals) + 1)
        ax.plot(x, vals, lw=0.5, color=_COLORS[key], alpha=0.2)
        ax.plot(x, _smooth(vals, stages), lw=1.4, color=_COLORS[key], label=labels[key])
        edge = 0
        for n in stages[:-1]:
            edge += n
            ax.axvline(edge + 0.5, color=_COLORS[key], lw=0.7, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (every method: the same steps, batch size and learning rate)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss (batch {cfg.batch_size}, mean over 20 steps in bold; dashed: a new stage). "
                 "IVT-LR stage s is scored after its s latent steps; Mirage stage 1 is 0.1 x CE + (1 - cos)",
                 fontsize=7)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def format_table(rows: Sequence[dict]) -> str:
    """The results table: one row per method with train steps, accuracy and its 95% interval, mean autoregressive
    steps and ms/question."""
    head = f"{'method':<36}{'train steps':>12}{'accuracy':>10}{'95% interval':>16}{'AR steps':>10}{'ms/question':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"{r['method']:<36}{r['train_steps']:>12}{r['accuracy']:>10.3f}{f'[{lo:.3f}, {hi:.3f}]':>16}"
                     f"{r['mean_steps']:>10.1f}{r['ms_per_question']:>13.1f}")
    return "\n".join(lines)


def format_mediation_table(rows: Sequence[dict]) -> str:
    """The mediation table: per latent method, answer flip rates under latent interventions (the swap's ceiling in
    brackets), the latents' change when the image is swapped (the ordinary prompt's last hidden state in brackets)
    and their mean pairwise cosine across questions (the same reference in brackets)."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    pair = lambda a, b: f"{f(a)} ({f(b)})"  # noqa: E731
    head1 = f"{'':<28}{'answer flips when the latents are':^40}{'latents, image swapped':^31}{'across questions':>20}"
    head2 = (f"{'method':<28}{'zeroed':>7}{'swapped (ceiling)':>18}{'random patches':>15}{'rel. L2 (ref)':>16}"
             f"{'cosine (ref)':>15}{'pairwise cos (ref)':>20}")
    lines = [head1, head2, "-" * len(head2)]
    for r in rows:
        m = r["mediation"]
        fl, im = m["flip_rate"], m["image_swap"]
        lines.append(f"{r['method']:<28}{f(fl['zero']):>7}{pair(fl['swap'], m['swap_ceiling']):>18}"
                     f"{f(fl.get('random_patches')):>15}{pair(im['latent_rel_l2'], im['ref_rel_l2']):>16}"
                     f"{pair(im['latent_cos'], im['ref_cos']):>15}"
                     f"{pair(m['latent_pairwise_cos'], m['ref_pairwise_cos']):>20}")
    return "\n".join(lines)


def run_demo(output_dir: str | Path = "runs/demo", *, seed: int = 0, quick: bool = False,
             config: DemoConfig | None = None, progress: bool = True, workers: int | None = None) -> dict:
    """Train the five methods at an equal budget, evaluate them, run the mediation readout on the latent ones and
    draw (module docstring); return the results (also written to ``<output_dir>/results.json``).

    ``quick=True`` runs :data:`QUICK` (seconds; for tests), else :data:`DEMO`; ``config`` overrides both;
    ``workers`` overrides the config's number of parallel training processes.
    Returns ``{"methods": [{key, method, train_steps, accuracy, ci95, mean_steps, ms_per_question, mediation, ...}],
    "selection": {...}, "heatmaps": [...], "losses": {...}, "paths": {...}, "timings_s": {...}, "config": {...}}``.
    """
    from transformers.utils import logging as hf_logging

    from .evaluation import evaluate
    from .models.tiny import write_tiny_model

    cfg = config if config is not None else (QUICK if quick else DEMO)
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=int(workers))
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars for every checkpoint
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _clean(out)
        print(f"lvr demo -> {out}  (synthetic {cfg.grid}x{cfg.grid} boards, question types {', '.join(cfg.qtypes)}; "
              f"{cfg.num_train} training / {cfg.num_test} held-out questions; seed {seed}; "
              f"{'quick' if quick and config is None else 'full'} configuration)", flush=True)

        t = time.perf_counter()
        write_tiny_model(out / "base_model", hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, vision_depth=cfg.vision_depth,
                         vision_embed_dim=cfg.vision_embed_dim, image_size=cfg.canvas, seed=seed,
                         initializer_range=cfg.initializer_range)
        test = _examples(cfg, cfg.num_test, seed, "test")
        timings["setup"] = time.perf_counter() - t

        steps = cfg.train_steps()
        print(f"\ntraining 5 methods from the same base: {steps} optimizer steps each (batch {cfg.batch_size}, "
              f"constant LR {cfg.lr:g}, AdamW), {cfg.workers} at a time, {cfg.threads} thread each; logs in "
              f"{out / 'logs'}\n"
              f"  IVT-LR: stage 0 {cfg.ivtlr_stage0_epochs() * cfg.steps_per_epoch()} steps + stages "
              f"1..{cfg.num_latent_steps} {cfg.latent_stage_epochs * cfg.steps_per_epoch()} each "
              f"({cfg.num_latent_steps} latent steps x {cfg.num_selected_patches} patches at the end); Mirage: stage 1 "
              f"{cfg.mirage_stage1_epochs * cfg.steps_per_epoch()} + stage 2 "
              f"{(cfg.budget_epochs - cfg.mirage_stage1_epochs) * cfg.steps_per_epoch()} "
              f"({cfg.mirage_latents} latents)", flush=True)
        t = time.perf_counter()
        trained = _train_all(cfg, out, seed, progress)
        timings["train"] = time.perf_counter() - t
        got = {m: r["train_steps"] for m, r in trained.items()}
        if set(got.values()) != {steps}:
            raise RuntimeError(f"the methods trained unequal numbers of steps: {got} (expected {steps} each)")

        t = time.perf_counter()
        print(f"\nevaluating on {len(test)} held-out questions (same engine, batch {cfg.eval_batch_size})", flush=True)
        modes = {"direct": "direct", "cot": "cot", "capimagine": "cot", "ivtlr": "latent", "mirage": "latent",
                 "mirage_segment": "latent"}
        rows = []
        for key, label in eval_rows(cfg):
            method = "mirage" if key == "mirage_segment" else key
            path = out / f"{method}_model"
            model = _generator(path, key, cfg) if modes[key] == "latent" else str(path)
            res = evaluate(model, test, modes[key], batch_size=cfg.eval_batch_size, image_size=cfg.canvas,
                           max_new_tokens=cfg.max_new_tokens, judge="ivtlr", progress=progress)
            s = res.summary
            rows.append({"key": key, "method": label, "trained": method, "mode": modes[key], "model": str(path),
                         "train_steps": trained[method]["train_steps"], "batch_size": cfg.batch_size, "lr": cfg.lr,
                         "stages": [{"name": n, "steps": k} for n, k in trained[method]["stages"]],
                         "train_seconds": trained[method]["seconds"],
                         "accuracy": s["accuracy"], "correct": s["correct"], "num_questions": s["num_questions"],
                         "ci95": list(wilson_interval(s["correct"], s["num_questions"])),
                         "mean_steps": s["mean_steps"], "ms_per_question": s["ms_per_question"],
                         "num_latent_steps": s["num_latent_steps"], "num_selected_patches": s["num_selected_patches"],
                         "trigger": s["trigger"], "example_output": res.rows[0]["prediction"] if res.rows else "",
                         "mediation": None})
            if key == "mirage":
                rows[-1].update(_mirage_latent_use(model, test, cfg))
            if key in _MEDIATED:
                rows[-1]["_generator"] = model
        by = {r["key"]: r for r in rows}
        timings["eval"] = time.perf_counter() - t

        t = time.perf_counter()
        print(f"\nmediation readout of the latent models on the {len(test)} held-out questions", flush=True)
        for key in _MEDIATED:
            by[key]["mediation"] = _mediation(by[key].pop("_generator"), test, cfg)
        timings["mediation"] = time.perf_counter() - t

        t = time.perf_counter()
        gen = _generator(out / "ivtlr_model", "ivtlr", cfg)
        selection = _selection_stats(gen, test, cfg)
        heatmaps = _heatmaps(gen, test, out / "heatmaps", cfg)
        losses = {m: {"losses": r["losses"], "stages": r["stages"]} for m, r in trained.items()}
        plotted = _plot_losses(losses, out / "loss.png", cfg)
        timings["draw"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start

        results = {
            "methods": rows, "chance": _CHANCE, "seed": seed, "train_steps": steps, "selection": selection,
            "heatmaps": heatmaps, "losses": losses,
            "paths": {"output_dir": str(out), **{f"{k}_model": str(out / f"{k}_model") for k, _ in METHODS},
                      "loss_plot": str(out / "loss.png") if plotted else None, "heatmaps": str(out / "heatmaps"),
                      "logs": str(out / "logs")},
            "timings_s": timings, "config": dataclasses.asdict(cfg), "torch_threads": cfg.threads,
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

        print("\n" + format_table(rows))
        print(f"chance: {_CHANCE:.2f}; intervals: Wilson 95%; AR steps: generated tokens up to the end of turn plus "
              f"latent steps; ms/question: batch {cfg.eval_batch_size}, {cfg.threads} thread")
        mg = by["mirage"]
        print(f"Mirage's own inference (token trigger, cap {mg['max_latent_steps']}): "
              f"{mg['opened_latent_segment']:.2f} of the questions open a latent segment, "
              f"{mg['mean_latent_steps']:.2f} latent steps per question; the {cfg.mirage_latents}-latent row runs the "
              "sequence it was trained on")
        print("\n" + format_mediation_table([by[k] for k in _MEDIATED]))
        print("answers: the letter after 'the answer is'; swapped = each question gets the next question's latents "
              "(ceiling: the share of questions whose answer differs from the next one's); ref = the ordinary prompt's "
              "last hidden state (no latent segment)")
        sel = selection
        print(f"IVT-LR's patch choices ({cfg.num_selected_patches} of {cfg.image_tokens} per step, chance "
              f"{sel['chance_per_step']:.2f}): anchor cell picked "
              + ", ".join(f"step {i + 1} {v:.2f}" for i, v in enumerate(sel["anchor_hit_rate"]))
              + "; asked-about cell picked "
              + ", ".join(f"step {i + 1} {v:.2f}" for i, v in enumerate(sel["target_hit_rate"])))
        print((f"loss plot: {out / 'loss.png'}   " if plotted else "")
              + f"heat maps: {out / 'heatmaps'}/q*.png   results: {out / 'results.json'}\n"
              f"total {timings['total']:.0f} s (train {timings['train']:.0f} s, eval {timings['eval']:.0f} s, "
              f"mediation {timings['mediation']:.0f} s)", flush=True)
        return results
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":  # python -m lvr_engine.demo [output_dir]
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
