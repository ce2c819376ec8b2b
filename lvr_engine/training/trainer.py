"""Curriculum trainer for latent visual reasoning (IVT-LR, Coconut, Mirage) on the engine's runner and ops.

Built on ``accelerate.Accelerator``: one process on CPU, N processes with DDP (gloo on CPU, nccl on GPU),
launched by ``accelerate launch`` (``lvr train --num-processes N``). The model runs through
:class:`~lvr_engine.engine.runner.DecoderRunner` + :func:`~lvr_engine.training.latent_forward.latent_forward`,
the same ops as inference.

Curriculum (``objective="ivtlr"`` / ``"coconut"``): stages 0..max_stage; stage ``s`` replaces the first ``s``
reasoning steps by ``min(s, num_latent_steps)`` latent steps (IVT-LR: K highest-attention image embeddings +
the last hidden state per step; Coconut: the hidden state alone) between the start/end latent markers; stage 0
is the full chain of thought. Mirage (``"mirage_stage1"`` / ``"mirage_stage2"``, training/mirage.py): one phase of
``num_latent_steps`` latent slots between ``<|latent_start|>``/``<|latent_end|>`` where the target has
``<output_image>`` (else after the prompt); stage 1 is one teacher-forced pass with the pooled helper-image
embeddings in the slots (loss = ``mirage_text_weight`` * CE + cosine distance), stage 2 feeds back hidden states
(CE only). The vision tower is frozen for Mirage unless ``train_vision``.

Distributed equality: every process takes its slice of the same globally shuffled order (global batch =
``batch_size`` x processes); the CE sum is divided by the *global* number of labelled tokens (an all-reduce
of the token counts before the forward) and multiplied by the world size, so DDP's gradient average equals the
one-process gradient of the same global batch.

Exact resume: checkpoints at the end of every stage hold the weights (safetensors), optimizer, scheduler,
``trainer_state.json`` and every process's RNG states (torch, numpy, python), and the data order depends only
on ``(seed, epoch)``; ``resume=True`` restarts after the latest complete stage and reproduces the
uninterrupted run's weights.

The run's knobs are :class:`~lvr_engine.training.train_config.TrainConfig` (train_config.py), the phases
:func:`~lvr_engine.training.stages.stage_plan` (stages.py), the checkpoint format and atomic save
checkpoint.py; this module is the loop.

Layout of ``output_dir``::

    config.json, model.safetensors, processor files, lvr_config.json, trainer_state.json   # latest model
    checkpoints/stage-<s>/   the same + optimizer.pt, scheduler.pt, rng_state_<rank>.pth [, adapter/]
    train_log.jsonl          one JSON line per logged step
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.example import ReasoningExample
from ..data.prompts import get_template
from ..engine.config import COCONUT_TOKENS, MIRAGE_TOKENS
from ..engine.hf_runner import HFModuleRunner
from ..engine.runner import DecoderRunner
from ..models import adapter_for
from ..models.loading import LVR_CONFIG, load_checkpoint, load_processor_or_tokenizer
from ..progress import progress_bar
from .checkpoint import (
    TRAINER_STATE,
    latest_checkpoint,
    load_resume_state,
    publish,
    remove_partial,
    save_atomic,
    set_rng_state,
    write_model,
    write_processor,
)
from .collate import collate
from .interrupt import StopRequest, TrainingInterrupted
from .latent_forward import latent_forward
from .mirage import collate_mirage, freeze_vision, mirage_forward
from .stages import StagePlan, stage_lvr_config, stage_plan
from .train_config import OBJECTIVES, LoraSettings, TrainConfig

# The config, the curriculum and the checkpoint format live in train_config.py, stages.py and checkpoint.py;
# their names stay importable from here.
__all__ = ["TrainConfig", "LoraSettings", "StagePlan", "Trainer", "TrainResult", "stage_plan", "load_examples",
           "OBJECTIVES", "LVR_CONFIG", "TRAINER_STATE"]


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None          # the last stage checkpoint written
    global_step: int
    losses: list[float] = field(default_factory=list)   # global loss of every step this call ran
    completed: bool = False          # all stages done


def load_examples(cfg: TrainConfig, require_image: bool) -> Sequence[ReasoningExample]:
    """The training examples of ``cfg``: a dataset by name (lazy), synthetic, or the in-memory list."""
    if not isinstance(cfg.dataset, str):
        examples = list(cfg.dataset)
        if require_image:
            examples = [e for e in examples if e.image is not None]
    else:
        name = cfg.dataset.strip().lower()
        if name == "synthetic":
            from ..data.synthetic import make_synthetic_dataset

            n = cfg.synthetic_size if cfg.limit is None else min(cfg.limit, cfg.synthetic_size)
            examples = make_synthetic_dataset(n, cfg.seed, split=cfg.split)
        else:
            from ..data import load_dataset_by_name

            examples = load_dataset_by_name(name, cfg.data_dir, cfg.split, require_image=require_image)
    if cfg.limit is not None:
        examples = examples[: cfg.limit] if isinstance(examples, list) else [examples[i] for i in
                                                                           range(min(cfg.limit, len(examples)))]
    if len(examples) == 0:
        raise ValueError(f"no training examples in {cfg.dataset if isinstance(cfg.dataset, str) else 'the list'}"
                         + (" with an image (this objective needs images)" if require_image else ""))
    return examples


class LatentLossModule(nn.Module):
    """The VLM wrapped so that DDP sees one forward per step: the latent forward on the engine's runner
    (+ the Mirage latent loss). Returns sums, not means, so the trainer can normalise globally."""

    def __init__(self, model: nn.Module, backend: str | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.adapter = adapter_for(model)
        runner_cls = DecoderRunner if self.adapter.lean_runner else HFModuleRunner
        self.runner = runner_cls(self.adapter.decoder_weights(), backend=backend)
        self.runner.gradient_checkpointing = gradient_checkpointing
        for p in self.adapter.untrainable_parameters():  # e.g. Chameleon's VQ-VAE: no gradient reaches it
            p.requires_grad_(False)

    def forward(self, input_ids=None, attention_mask=None, target_ids=None, target_mask=None, pixel_values=None,
                image_grid_thw=None, mm_token_type_ids=None, *, num_latent_steps: int = 0,
                num_selected_patches: int = 0, start_marker_id=None, end_marker_id=None, position_mode="mrope",
                detach_latents=False, supervise_markers=False, patch_order="ascending", score_precision="fp32",
                mirage=None, mirage_stage: int = 0, placeholder_id=None, mirage_detach_targets=False) -> dict:
        """Shapes: input_ids/attention_mask (B, S), target_ids/target_mask (B, T), pixel values as the processor
        returns them; or ``mirage`` (a :class:`~lvr_engine.training.mirage.MirageBatch`) with ``mirage_stage`` 1 or
        2. Returns ``{"ce_sum": scalar, "num_tokens": int, "cos_sum": scalar (Mirage stage 1; else 0)}``."""
        if mirage is not None:
            m = mirage_forward(self.runner, self.adapter, mirage, stage=mirage_stage, position_mode=position_mode,
                               detach_latents=detach_latents, detach_targets=mirage_detach_targets)
            return {"ce_sum": m.ce_sum, "num_tokens": m.num_tokens, "cos_sum": m.cos_sum}
        out = latent_forward(
            self.runner, self.adapter, input_ids=input_ids, attention_mask=attention_mask,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
            target_ids=target_ids, target_mask=target_mask, num_latent_steps=num_latent_steps,
            num_selected_patches=num_selected_patches, start_marker_id=start_marker_id, end_marker_id=end_marker_id,
            position_mode=position_mode, detach_latents=detach_latents, supervise_markers=supervise_markers,
            patch_order=patch_order, score_precision=score_precision, placeholder_id=placeholder_id)
        return {"ce_sum": out.ce_sum, "num_tokens": out.num_tokens, "cos_sum": out.ce_sum.new_zeros(())}


def _all_have_images(examples) -> bool:
    """Whether every example has an image (without decoding a lazy dataset's images)."""
    if isinstance(examples, list):
        return all(e.image is not None for e in examples)
    hf = getattr(examples, "hf", None)
    if hf is not None and "image" in hf.column_names:
        from ..data.example import rows_with_image

        return len(rows_with_image(hf)) == len(examples)
    return False


class Trainer:
    """Runs the curriculum of a :class:`TrainConfig`. ``Trainer(cfg).train(resume=False) -> TrainResult``.

    Start it once per process (``accelerate launch`` starts N); every process builds the same model and
    data order and trains its slice of each global batch.
    """

    def __init__(self, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = config
        # find_unused_parameters is decided once the data is known (rows without images leave the vision tower
        # unused); the handler is read when the model is prepared
        self._ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=True)
        if accelerator is None:
            accelerator = Accelerator(
                cpu=not torch.cuda.is_available(), mixed_precision="bf16" if config.bf16 else "no",
                kwargs_handlers=[self._ddp_kwargs])
        elif getattr(accelerator, "ddp_handler", None) is not None:
            self._ddp_kwargs = accelerator.ddp_handler
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.log_path = self.output_dir / "train_log.jsonl"
        self.plan = stage_plan(config)
        self.model = None          # the (possibly peft-wrapped) transformers model
        self.processor = None
        self.module = None         # LatentLossModule, DDP-wrapped after prepare
        self.optimizer = None
        self.scheduler = None
        self.markers: dict[str, int | None] = {}
        self.global_step = 0
        self.epochs_done = 0       # epochs over all stages (seeds the data order)
        self.stages_done: list[int] = []
        self._stop = StopRequest()  # replaced by the one train() installs

    # -- setup ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _marker_names(self) -> dict[str, str]:
        if self.cfg.mode == "direct":
            return {}
        if self.cfg.is_mirage:
            return {"start": MIRAGE_TOKENS["start"], "end": MIRAGE_TOKENS["end"], "pad": MIRAGE_TOKENS["pad"]}
        t = get_template(self.cfg.template)
        if t.latent_placeholder is not None:  # the official layout (Chameleon): its placeholder and end marker
            return {k: v for k, v in (("placeholder", t.latent_placeholder), ("end", t.end_marker)) if v}
        if self.cfg.use_markers:
            return {"start": COCONUT_TOKENS["start"], "end": COCONUT_TOKENS["end"]}
        return {}

    def _ensure_markers(self, model, processor) -> bool:
        """Resolve the latent marker tokens, adding them to the tokenizer (and the embeddings, if the vocabulary
        is full) where missing. Returns True when tokens were added."""
        from transformers import AddedToken

        tok = getattr(processor, "tokenizer", processor)
        names = self._marker_names()
        if names and tok is None:
            raise ValueError(f"checkpoint {self.cfg.model!r} ships no tokenizer; latent markers need one")
        missing = [t for t in names.values() if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
        if missing:
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
            emb = model.get_input_embeddings().weight.shape[0]
            if len(tok) > emb:
                model.resize_token_embeddings(len(tok))
        self.markers = {k: int(tok.convert_tokens_to_ids(t)) for k, t in names.items()}
        return bool(missing)

    def _build_model(self, resume_dir: Path | None):
        """Model + processor on this process; from ``resume_dir`` when resuming (full weights, or base +
        adapter with LoRA)."""
        cfg = self.cfg
        src = cfg.model if (resume_dir is None or cfg.lora is not None) else resume_dir
        model, processor = load_checkpoint(src, dtype=torch.float32)
        if processor is None:
            raise ValueError(f"checkpoint {src} has no processor/tokenizer files")
        if resume_dir is not None and cfg.lora is not None:  # the tokenizer (markers added) of the run
            processor = load_processor_or_tokenizer(resume_dir) or processor
        added = self._ensure_markers(model, processor)
        if not cfg.trains_vision:  # Mirage trains the language model only (--train-vision to train the tower too)
            freeze_vision(model)
        if cfg.gradient_checkpointing:  # the vision tower's HF blocks; the decoder is checkpointed by the runner
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            from peft import LoraConfig, PeftModel, get_peft_model

            if resume_dir is not None:
                adapter_dir = resume_dir / "adapter"
                if not adapter_dir.is_dir():
                    raise FileNotFoundError(f"LoRA checkpoint {resume_dir} has no adapter/ directory to resume from")
                model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
            else:
                lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                target_modules=list(cfg.lora.target_modules),
                                modules_to_save=["embed_tokens", "lm_head"] if added else None)
                model = get_peft_model(model, lc)
        model.train()
        self.model, self.processor = model, processor
        self.module = LatentLossModule(model, cfg.backend, cfg.gradient_checkpointing)
        self.module = self.accelerator.prepare(self.module)

    def _new_optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warm = self.cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warm + 1)) if warm else 1.0)

    # -- data -------------------------------------------------------------------------------------
    def _epoch_batches(self, n: int, epoch: int) -> list[list[int]]:
        """This process's example indices for every global step of global epoch ``epoch``.

        The order is a permutation seeded by (seed, epoch) only, padded (wrapping around) to a multiple of the
        number of processes; global step i takes positions [i*G, (i+1)*G), G = batch_size x processes, and
        process r the r-th contiguous share of them."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        P = self.world
        while len(order) % P:
            order.append(order[len(order) % n])
        G = self.cfg.batch_size * P
        out = []
        for i in range(0, len(order), G):
            chunk = order[i:i + G]
            share = len(chunk) // P
            r = self.accelerator.process_index
            out.append(chunk[r * share:(r + 1) * share])
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def _lvr_config(self, stage: StagePlan) -> dict:
        return stage_lvr_config(self.cfg, stage, self.markers)

    def _write_model(self, dest: Path) -> None:
        """The unwrapped model as safetensors (LoRA merged into a copy; the adapter itself under adapter/)."""
        write_model(self.accelerator.unwrap_model(self.module).model, dest, lora=self.cfg.lora is not None)

    def _write_processor(self, dest: Path) -> None:
        write_processor(self.processor, dest, self.cfg.model)

    def _trainer_state(self, stage: StagePlan, completed: bool) -> dict:
        return {"stage": stage.index, "stages_done": list(self.stages_done), "completed": completed,
                "global_step": self.global_step, "epochs_done": self.epochs_done, "num_processes": self.world,
                "global_batch_size": self.cfg.batch_size * self.world, "seed": self.cfg.seed,
                "objective": self.cfg.objective, "lora": self.cfg.lora is not None,
                "plan": [dataclasses.asdict(p) for p in self.plan], "config": self.cfg.to_json()}

    def save_checkpoint(self, dest: Path, stage: StagePlan, completed: bool) -> None:
        """Write a checkpoint into ``<dest>.tmp`` (same parent) and rename it to ``dest``: a failure anywhere
        (on any process) leaves the previous ``dest`` untouched and no partial directory behind."""
        def write_main(tmp: Path) -> None:
            self._write_model(tmp)
            self._write_processor(tmp)
            (tmp / LVR_CONFIG).write_text(json.dumps(self._lvr_config(stage), indent=2) + "\n")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")

        save_atomic(self.accelerator, dest, write_main, lambda: self._trainer_state(stage, completed))

    def publish(self, ckpt: Path) -> None:
        """Make ``ckpt``'s model the top level of ``output_dir`` (each file replaced atomically with os.replace,
        weights before ``trainer_state.json``), so ``LatentGenerator.from_pretrained(output_dir)`` loads it."""
        if self.is_main:
            publish(ckpt, self.output_dir)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete stage checkpoint under ``output_dir/checkpoints`` (None when there is none)."""
        return latest_checkpoint(self.ckpt_root)

    def _load_resume_state(self, ckpt: Path) -> dict:
        return load_resume_state(ckpt, self.cfg, self.world, self.accelerator.process_index)

    # -- training ---------------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def train(self, resume: bool = False) -> TrainResult:
        """Run (or with ``resume=True`` continue) the curriculum; returns a :class:`TrainResult`.

        SIGINT / SIGTERM (in the main thread): the first finishes the step or checkpoint in progress, then every
        process stops at the next step boundary and :class:`~lvr_engine.training.interrupt.TrainingInterrupted`
        is raised; a second aborts at once. Either way no temporary checkpoint directory is left behind and the
        last complete checkpoint resumes exactly (interrupt.py)."""
        with StopRequest(on_first=self._stop_notice) as self._stop:
            try:
                return self._train(resume)
            except TrainingInterrupted as e:
                if e.step is None:  # an abort, raised wherever the second signal found the run
                    e.step = self.global_step
                raise

    def _stop_notice(self, signum: int) -> None:
        if self.is_main:  # os.write: the signal may arrive in the middle of a print to stderr
            name = signal.Signals(signum).name
            lead = "\n" if self.cfg.progress else ""  # off the progress bar's line
            os.write(2, f"{lead}training: {name} received; stopping after the current step or checkpoint "
                        f"(send it again to abort at once)\n".encode())

    def _stop_agreed(self, local: torch.Tensor | None = None) -> int:
        """The signal number when some process was asked to stop, else 0. ``local``: :meth:`_stop_flags`
        already summed over processes by the caller's own reduce; None: summed here (every process must call)."""
        if local is None:
            local = self.accelerator.reduce(self._stop_flags(), "sum")
        count, signums = float(local[0]), float(local[1])
        return int(round(signums / count)) if count > 0 else 0

    def _stop_flags(self) -> torch.Tensor:
        sig = self._stop.signum
        return torch.tensor([1.0 if sig else 0.0, float(sig or 0)], dtype=torch.float64,
                            device=self.accelerator.device)

    def _train(self, resume: bool) -> TrainResult:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        if self.is_main:  # what an earlier run killed mid-checkpoint left: temp dirs, a checkpoint moved aside
            remove_partial(self.output_dir)
        acc.wait_for_everyone()
        ckpt = None
        if resume:
            ckpt = self.latest_checkpoint()
            if ckpt is None:
                raise FileNotFoundError(f"cannot resume: no checkpoint under {self.ckpt_root}")
        elif self.latest_checkpoint() is not None:
            raise FileExistsError(f"{self.output_dir} already holds checkpoints of a run ({self.ckpt_root}); "
                                  "pass resume=True (--resume) to continue it or choose another output directory")
        state = self._load_resume_state(ckpt) if ckpt is not None else None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(exist_ok=True)
            if state is None and self.log_path.exists():
                self.log_path.unlink()
            elif state is not None and self.log_path.exists():  # drop steps logged after the checkpoint
                kept = [l for l in self.log_path.read_text().splitlines()
                        if l.strip() and json.loads(l).get("step", 0) <= state["global_step"]]
                self.log_path.write_text("".join(l + "\n" for l in kept))
        acc.wait_for_everyone()
        # IVT-LR's latent steps select image patches: train on the questions that have an image (as the paper)
        examples = load_examples(cfg, require_image=cfg.patches > 0 and any(p.num_latent_steps for p in self.plan))
        self._ddp_kwargs.find_unused_parameters = not _all_have_images(examples)
        set_seed(cfg.seed)
        self._build_model(ckpt)
        result = TrainResult(self.output_dir, ckpt, 0)

        start = 0
        if state is not None:
            if state.get("completed"):
                self._print(f"training in {self.output_dir} is already complete ({ckpt}); nothing to do")
                return TrainResult(self.output_dir, ckpt, state["global_step"], completed=True)
            done = state["stage"]
            start = next((i + 1 for i, p in enumerate(self.plan) if p.index == done), None)
            if start is None:
                raise ValueError(f"cannot resume: checkpoint {ckpt} is stage {done}, not in this run's plan "
                                 f"{[p.index for p in self.plan]}")
            self.global_step, self.epochs_done = state["global_step"], state["epochs_done"]
            self.stages_done = list(state.get("stages_done", []))
            self._new_optimizer()
            if not cfg.reset_optimizer_per_stage:
                self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
                self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
            set_rng_state(torch.load(ckpt / f"rng_state_{acc.process_index}.pth", weights_only=False))
            self._print(f"resuming from {ckpt} (stage {done} done, step {self.global_step})")
        else:
            self._new_optimizer()

        for i in range(start, len(self.plan)):
            stage = self.plan[i]
            if i > start and cfg.reset_optimizer_per_stage:  # (at i == start it was just built or restored)
                self._new_optimizer()
            self._run_stage(stage, examples, result)
            self.stages_done.append(stage.index)
            completed = i == len(self.plan) - 1
            dest = self.ckpt_root / f"stage-{stage.index}"
            self.save_checkpoint(dest, stage, completed)
            self.publish(dest)
            result.checkpoint = dest
            self._print(f"stage {stage.index} done: checkpoint {dest}")
            signum = self._stop_agreed()
            if signum and not completed:
                raise TrainingInterrupted(signum, step=self.global_step)
            if cfg.stop_after_stage is not None and stage.index >= cfg.stop_after_stage and not completed:
                break
        result.global_step = self.global_step
        result.completed = bool(self.plan) and self.stages_done[-1:] == [self.plan[-1].index]
        return result

    def _run_stage(self, stage: StagePlan, examples, result: TrainResult) -> None:
        cfg, acc = self.cfg, self.accelerator
        n = len(examples)
        steps_per_epoch = math.ceil((n + (-n) % self.world) / (cfg.batch_size * self.world))
        total = steps_per_epoch * cfg.epochs_per_stage
        # a bar on a terminal; in a log, one line per tenth of the stage with the same numbers
        bar = progress_bar(total=total, desc=f"stage {stage.index}", unit="step", file=sys.stderr,
                           disable=not (self.is_main and cfg.progress))
        mirage1 = cfg.objective == "mirage_stage1"
        supervise = cfg.is_mirage and stage.num_latent_steps > 0
        use_markers = stage.num_latent_steps > 0
        kwargs = dict(num_latent_steps=stage.num_latent_steps, num_selected_patches=cfg.patches,
                      start_marker_id=self.markers.get("start") if use_markers else None,
                      end_marker_id=self.markers.get("end") if use_markers else None,
                      position_mode=cfg.position_mode, detach_latents=cfg.detach_latents, supervise_markers=supervise,
                      patch_order=cfg.patch_order, score_precision=cfg.score_precision,
                      placeholder_id=self.markers.get("placeholder"))
        n_markers = sum(kwargs[k] is not None for k in ("start_marker_id", "end_marker_id")) if supervise else 0
        text_w = cfg.mirage_text_weight if mirage1 else 1.0
        mirage = cfg.is_mirage and stage.num_latent_steps > 0  # Mirage's sequence, training/mirage.py
        for _ in range(cfg.epochs_per_stage):
            for idx in self._epoch_batches(n, self.epochs_done):
                t0 = time.perf_counter()
                rows = [examples[j] for j in idx]
                B = len(rows)
                if mirage:
                    batch = collate_mirage(rows, self.processor, stage.num_latent_steps, start_id=self.markers["start"],
                                           end_id=self.markers["end"], template=cfg.template,
                                           image_size=cfg.image_size, helper_images=mirage1).to(acc.device)
                    local_tokens, processed = batch.num_labels, batch.num_positions
                else:
                    batch = collate(rows, self.processor, stage.replaced_steps, mode=cfg.mode,
                                    latent_steps=stage.num_latent_steps, template=cfg.template,
                                    image_size=cfg.image_size).to(acc.device)
                    local_tokens = batch.num_target_tokens + n_markers * B
                    processed = (int(batch.attention_mask.sum()) + local_tokens
                                 + B * stage.num_latent_steps * (cfg.patches + 1))
                counts = acc.reduce(torch.cat([torch.tensor([local_tokens, B * stage.num_latent_steps, processed],
                                                            dtype=torch.float64, device=acc.device),
                                               self._stop_flags()]), "sum")
                signum = self._stop_agreed(counts[3:])
                if signum:  # a stop was requested on some process: all stop here, before this step's forward
                    raise TrainingInterrupted(signum, step=self.global_step)
                n_tok, n_lat, n_proc = (float(c) for c in counts[:3].tolist())
                if mirage:
                    out = self.module(mirage=batch, mirage_stage=1 if mirage1 else 2, position_mode=cfg.position_mode,
                                      detach_latents=cfg.detach_latents,
                                      mirage_detach_targets=cfg.mirage_detach_targets)
                else:
                    out = self.module(
                        batch.input_ids, batch.attention_mask, batch.target_ids, batch.target_mask,
                        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                        mm_token_type_ids=batch.mm_token_type_ids, **kwargs)
                if out["num_tokens"] != local_tokens:
                    raise RuntimeError(f"latent_forward labelled {out['num_tokens']} tokens, expected {local_tokens}")
                # sums over this process / global counts, x world size: DDP's mean of gradients is then the
                # gradient of the global-batch loss
                loss = out["ce_sum"] * (text_w / max(n_tok, 1.0))
                if mirage1:
                    loss = loss + out["cos_sum"] / max(n_lat, 1.0)
                acc.backward(loss * self.world)
                if cfg.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                sums = acc.reduce(torch.stack([out["ce_sum"].detach().double(), out["cos_sum"].detach().double()]),
                                  "sum").tolist()
                ce = sums[0] / max(n_tok, 1.0)
                global_loss = text_w * ce + (sums[1] / max(n_lat, 1.0) if mirage1 else 0.0)
                result.losses.append(global_loss)
                dt = time.perf_counter() - t0
                # postfix first: the line written at a tenth shows that step's loss and throughput
                bar.set_postfix({"loss": f"{global_loss:.4f}", "tok/s": f"{n_proc / dt:.0f}" if dt > 0 else "?"},
                                refresh=False)
                bar.update(1)
                if self.global_step % cfg.log_every == 0:
                    row = {"step": self.global_step, "stage": stage.index, "epoch": self.epochs_done,
                           "loss": global_loss, "ce": ce, "lr": lr, "tokens": int(n_proc),
                           "target_tokens": int(n_tok), "tokens_per_s": n_proc / dt if dt > 0 else None,
                           "latent_steps": stage.num_latent_steps}
                    if mirage1:
                        row["latent_cos"] = sums[1] / max(n_lat, 1.0)
                    self._log(row)
                    if self.is_main:
                        bar.write(json.dumps(row), file=sys.stdout)
            self.epochs_done += 1
        bar.close()
