"""The ``lvr`` command: train, eval, generate, tiny-model.

Each subcommand is one ``add_<name>(subparsers)`` function that defines its arguments and sets
``func``; :data:`COMMANDS` registers them, so adding a subcommand is one function + one entry.
Heavy imports (torch, transformers, accelerate) happen inside the commands, so ``lvr --help`` is fast.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .cli_checks import (
    CLIError,
    check_image,
    check_input_file,
    check_model_dir,
    check_output_dir,
    check_output_file,
    check_rows,
    nonnegative_int,
    positive_int,
)
from .data.example import SKIPPED_NO_IMAGE
from .progress import is_terminal

DATASETS = ("m3cot", "scienceqa", "synthetic", "vsp")
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR = 2, 1   # and 128 + signal when interrupted (130 SIGINT, 143 SIGTERM)


# -- shared helpers ---------------------------------------------------------------------------------
@dataclass
class Loaded:
    """The questions a command runs on, and what it left out of the split: ``len(examples) +
    sum(skipped.values()) == split_rows``."""

    examples: Sequence
    split_rows: int                                           # questions in the split (synthetic: generated)
    skipped: dict[str, int] = field(default_factory=dict)     # reason -> questions left out for it

    def report(self, what: str) -> str:
        """One line: how many of the split's questions ``what`` covers and, when some are left out, how many
        and why."""
        line = f"{what} {len(self.examples)} of {self.split_rows} questions"
        if self.skipped:
            reasons = "; ".join(f"{n} {reason}" for reason, n in self.skipped.items())
            line += f"; skipped {sum(self.skipped.values())}: {reasons}"
        return line


def _load_examples(dataset: str, data_dir, split: str, limit: int | None, *, require_image: bool = False,
                   image_reason: str = "", seed: int = 0, synthetic_size: int = 64) -> Loaded:
    """Examples of ``dataset``: read from ``data_dir`` (m3cot, scienceqa) or generated (synthetic; data_dir
    ignored, ``limit`` or ``synthetic_size`` examples). ``require_image`` leaves out the questions without an
    image (counted, with ``image_reason`` appended to the reason); ``limit`` keeps the first ``limit`` of the
    rest."""
    if limit is not None and limit < 1:
        raise CLIError(f"--limit must be >= 1, got {limit}")
    name = dataset.lower()
    no_image = SKIPPED_NO_IMAGE + (f" ({image_reason})" if image_reason else "")
    if name == "synthetic":
        from .data.synthetic import make_synthetic_dataset

        split = {"validation": "val", "dev": "val"}.get(split, split)
        examples = make_synthetic_dataset(limit if limit is not None else synthetic_size, seed, split=split)
        kept = [e for e in examples if e.image is not None] if require_image else examples
        return Loaded(kept, len(examples), {no_image: len(examples) - len(kept)} if len(kept) < len(examples) else {})
    if name not in DATASETS:
        raise CLIError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if not data_dir:
        raise CLIError(f"--data-dir is required for dataset {dataset!r} (the local copy of its parquet files)")
    from .data import load_dataset_by_name

    try:
        ds = load_dataset_by_name(name, data_dir, split, require_image=require_image)
    except (FileNotFoundError, ValueError) as e:  # no such split, missing columns, unreadable or empty shards
        raise CLIError(str(e)) from None
    check_rows(ds, f"{name} {split}", n=limit)  # each row used decodes (image, answer letter), or say which not
    skipped = {no_image if reason == SKIPPED_NO_IMAGE else reason: n for reason, n in ds.skipped.items()}
    if limit is not None and limit < len(ds):
        skipped[f"after the first {limit} (--limit)"] = len(ds) - limit
        return Loaded([ds[i] for i in range(limit)], ds.split_rows, skipped)
    return Loaded(ds, ds.split_rows, skipped)


def _require(module: str, extra: str, feature: str) -> None:
    """CLIError naming the extra to install when ``feature`` needs ``module`` and it is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise CLIError(f"{feature} needs {module}, which is not installed: pip install 'lvr_engine[{extra}]'")


def _in_distributed_child() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


# -- lvr train ----------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="curriculum training (IVT-LR / Coconut / Mirage) with accelerate",
                       description="Train a VLM to reason in latent space; checkpoints land in --output.")
    p.add_argument("--model", required=True, help="local checkpoint directory to start from")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-dir", help="dataset directory (Hugging Face parquet layout; vsp: Mirage's "
                                      "<split>_direct.jsonl); ignored for synthetic")
    p.add_argument("--split", default="train")
    p.add_argument("--output", required=True, help="output directory (final model at top level)")
    p.add_argument("--objective", default="ivtlr", choices=("ivtlr", "coconut", "mirage_stage1", "mirage_stage2"))
    p.add_argument("--mode", default="cot", choices=("cot", "direct"),
                   help="direct: fine-tune the no-CoT baseline (answer only)")
    p.add_argument("--max-stage", type=int, default=3)
    p.add_argument("--epochs-per-stage", type=int, default=1)
    p.add_argument("--num-latent-steps", type=int, default=3,
                   help="cap on latent steps per stage (stage s runs min(s, N)); Mirage: the latent count")
    p.add_argument("--num-selected-patches", type=int, default=32, help="K image patches per latent step")
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--num-processes", type=int, default=1, help="DDP processes (accelerate launch)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--keep-optimizer", action="store_true", help="do not reset the optimizer at each stage")
    p.add_argument("--detach-latents", action="store_true", help="no gradient through fed-back hidden states")
    p.add_argument("--position-mode", default="mrope", choices=("mrope", "arange"))
    p.add_argument("--no-markers", action="store_true", help="no start/end latent marker tokens")
    p.add_argument("--template", default=None, help="prompt template (default: mirage for vsp, else ivtlr)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side first (IVT-LR: 280)")
    p.add_argument("--train-vision", action="store_true", default=None,
                   help="train the vision tower too (Mirage freezes it; the other objectives train it anyway)")
    p.add_argument("--max-latent-steps", type=int, default=8,
                   help="Mirage: cap on latent steps per segment at inference, written to lvr_config.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--patch-order", default="ascending", choices=("ascending", "official"),
                   help="order a latent step feeds its patches (official: CUDA topk(sorted=False), IVT-LR's code)")
    p.add_argument("--score-precision", default="fp32", choices=("fp32", "model"),
                   help="model: round attention probabilities and their mean to the model dtype (official code)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    p.add_argument("--lora-r", type=int, default=0, help="> 0: train a peft LoRA of this rank instead of all weights")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-target", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--stop-after-stage", type=int, default=None, help="stop after this stage's checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def _relaunch(args, argv: list[str]) -> int:
    """Re-run this ``lvr train`` under ``accelerate launch`` with ``args.num_processes`` processes.

    accelerate's ``--multi_gpu`` launcher is its torch.distributed.run path; on a machine without CUDA each
    process builds ``Accelerator(cpu=True)`` and joins a gloo group (``--cpu`` would start only one process).
    It runs through training/launch.py (a worker's failure is the launcher's exit status, without a traceback).

    Signals: the launcher runs in its own session, so a terminal's Ctrl-C reaches this process alone, which
    passes each SIGINT / SIGTERM once to every worker (the first stops them all at the same step boundary, a
    second aborts; training/interrupt.py). Once they are gone, whatever a killed worker left is removed, the
    last checkpoint and the command that resumes from it are printed, and the status is 128 + the signal."""
    from .training.interrupt import STOP_SIGNALS, interrupt_report

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.num_processes))
    cmd = [sys.executable, "-m", "lvr_engine.training.launch", "--multi_gpu",
           "--num_processes", str(args.num_processes), "--num_machines", "1",
           "--mixed_precision", "bf16" if args.bf16 else "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "--num_cpu_threads_per_process", threads,
           "-m", "lvr_engine.cli"] + _strip_option(argv, "--num-processes")
    got: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        got.append(signum)
        if procs:
            _signal_workers(procs[0], signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        procs.append(subprocess.Popen(cmd, start_new_session=True))
        if got:  # arrived while it was starting
            _signal_workers(procs[0], got[0])
        rc = procs[0].wait()  # (a handled signal does not interrupt the wait: PEP 475)
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
    if not got:
        return rc
    from .training.checkpoint import remove_partial

    remove_partial(Path(args.output))  # a worker killed before its own clean-up ran
    for line in interrupt_report(args.output, got[0], argv):
        print(f"lvr train: {line}", file=sys.stderr, flush=True)
    return 128 + got[0]


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, from /proc (Linux); [] where there is no /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _signal_workers(launcher: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the worker processes of ``launcher`` (its children; the launcher itself while it has
    none yet, or where they cannot be listed)."""
    for pid in _children(launcher.pid) or [launcher.pid]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _train_config(args):
    """The TrainConfig of ``lvr train``'s arguments (CLIError when they do not make one)."""
    from .training.train_config import LoraSettings, TrainConfig

    if args.dataset == "synthetic":
        dataset, data_dir = "synthetic", None
    else:
        if not args.data_dir:
            raise CLIError(f"--data-dir is required for dataset {args.dataset!r}")
        if not Path(args.data_dir).is_dir():
            raise CLIError(f"dataset directory {args.data_dir} does not exist")
        dataset, data_dir = args.dataset, args.data_dir
    try:
        return TrainConfig(
            model=args.model, output_dir=args.output, dataset=dataset, data_dir=data_dir, split=args.split,
            limit=args.limit, objective=args.objective, mode=args.mode, max_stage=args.max_stage,
            epochs_per_stage=args.epochs_per_stage, num_latent_steps=args.num_latent_steps,
            num_selected_patches=args.num_selected_patches, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
            reset_optimizer_per_stage=not args.keep_optimizer, detach_latents=args.detach_latents,
            position_mode=args.position_mode, patch_order=args.patch_order,
            score_precision=args.score_precision, use_markers=not args.no_markers, template=args.template,
            image_size=args.image_size, seed=args.seed, log_every=args.log_every,
            gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
            lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=tuple(args.lora_target))
            if args.lora_r > 0 else None,
            stop_after_stage=args.stop_after_stage, progress=not args.no_progress,
            train_vision=args.train_vision, max_latent_steps=args.max_latent_steps)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _check_train(args) -> None:
    """Everything ``lvr train`` can check before starting processes and loading the model: the checkpoint
    directory, the output directory, the numbers (TrainConfig), --resume against what --output holds, and every
    training row it will read (images decode, answers are letters of the choices)."""
    from .training.checkpoint import latest_checkpoint
    from .training.stages import stage_plan

    check_model_dir(args.model)
    check_output_dir(args.output)
    if args.lora_r > 0:
        _require("peft", "lora", "--lora-r")
    cfg = _train_config(args)
    root = Path(args.output) / "checkpoints"
    if args.resume and latest_checkpoint(root) is None:
        raise CLIError(f"--resume: no checkpoint to resume from in {root}")
    if not args.resume and latest_checkpoint(root) is not None:
        raise CLIError(f"--output {args.output} already holds checkpoints of a run; add --resume to continue it "
                       "or choose another directory")
    if cfg.dataset != "synthetic":
        require = cfg.patches > 0 and any(p.num_latent_steps for p in stage_plan(cfg))
        loaded = _load_examples(cfg.dataset, cfg.data_dir, cfg.split, cfg.limit, require_image=require)
        if not loaded.examples:
            raise CLIError(f"no training examples: {loaded.report(f'{cfg.dataset} {cfg.split}: would train on')}")


def cmd_train(args, argv) -> int:
    if args.num_processes < 1:
        raise CLIError(f"--num-processes must be >= 1, got {args.num_processes}")
    child = _in_distributed_child()
    if not child:  # once, before any process starts (a relaunched process trusts its parent's checks)
        _check_train(args)
    if args.num_processes > 1 and not child:
        return _relaunch(args, argv)
    from .training.interrupt import TrainingInterrupted, interrupt_report
    from .training.trainer import Trainer

    try:
        trainer = Trainer(_train_config(args))
        try:
            result = trainer.train(resume=args.resume)
        finally:
            trainer.accelerator.end_training()  # destroys the process group under DDP
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise CLIError(str(e)) from None
    except TrainingInterrupted as e:  # no temp checkpoint left (the trainer saw to it); say how to go on
        if not child:  # a relaunched run's parent reports once, with the command the user typed
            for line in interrupt_report(args.output, e.signum, argv, e.step, e.abort):
                print(f"lvr train: {line}", file=sys.stderr, flush=True)
        return e.exit_code
    if trainer.is_main:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        print(f"trained {result.global_step} steps; last loss {last}; "
              f"{'complete' if result.completed else 'stopped'}; model in {result.output_dir}")
    return 0


# -- lvr eval -----------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, autoregressive steps and latency on a benchmark split")
    p.add_argument("--model", required=True, help="checkpoint directory (an `lvr train` output)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-dir", help="dataset directory; ignored for synthetic")
    p.add_argument("--split", default="test")
    p.add_argument("--mode", default="latent", choices=("latent", "cot", "direct"))
    p.add_argument("--output", help="results JSONL (one line per question)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--judge", default="m3cot", choices=("m3cot", "ivtlr", "ivtlr_infer"),
                   help="m3cot: M3CoT's official judge; ivtlr: IVT-LR's letter rule on the output; ivtlr_infer: "
                        "the official IVT-LR inference rule on the decoded prompt + output")
    p.add_argument("--template", default=None,
                   help="prompt template (default: the model's, from lvr_config.json, else ivtlr); ivtlr_infer: the "
                        "official IVT-LR inference prompt (280x280 image, three <|latent|> placeholders)")
    p.add_argument("--image-only", choices=("auto", "yes", "no"), default="auto",
                   help="evaluate only questions with an image (auto: when latent steps select patches)")
    p.add_argument("--seed", type=int, default=0, help="synthetic test set seed; the sampling seed with --do-sample")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (Mirage's test script "
                                                             "samples: --temperature 0.7 --top-p 0.9)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args, argv) -> int:
    if args.template is not None:
        from .data.prompts import PROMPT_TEMPLATES

        if args.template not in PROMPT_TEMPLATES:
            raise CLIError(f"unknown --template {args.template!r}; choose one of {sorted(PROMPT_TEMPLATES)}")
    check_model_dir(args.model)
    if args.output:
        check_output_file(args.output)
    from .evaluation import evaluate, read_lvr_config

    try:
        meta = read_lvr_config(args.model)
    except ValueError as e:
        raise CLIError(str(e)) from None
    lc = (meta or {}).get("latent_config", {})
    selects = args.mode == "latent" and lc.get("num_latent_steps", 0) > 0 and lc.get("num_selected_patches", 0) > 0
    image_only = {"yes": True, "no": False, "auto": selects}[args.image_only]
    why = ("--image-only yes" if args.image_only == "yes" else
           f"latent steps select {lc.get('num_selected_patches')} image patches each; --image-only no keeps them")
    loaded = _load_examples(args.dataset, args.data_dir, args.split, args.limit, require_image=image_only,
                            image_reason=why, seed=args.seed)
    report = loaded.report(f"{args.dataset} {args.split}: evaluated")
    if not loaded.examples:
        raise CLIError(f"no questions to evaluate: {report}")
    out_f = None
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out_f = open(args.output, "w")

    def write(row):
        if out_f is not None:
            out_f.write(json.dumps({k: row[k] for k in ("id", "prediction", "extracted", "answer", "correct",
                                                       "invalid", "steps", "ms") if k in row}) + "\n")
            out_f.flush()

    try:
        res = evaluate(args.model, loaded.examples, args.mode, dataset=args.dataset, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, judge=args.judge, template=args.template,
                       progress=not args.no_progress, on_row=write, do_sample=args.do_sample,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed if args.do_sample else None)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    finally:
        if out_f is not None:
            out_f.close()
    s = res.summary
    print(report)
    print(f"accuracy: {s['accuracy']:.4f} ({s['correct']}/{s['num_questions']})  mean steps: {s['mean_steps']:.2f}"
          f"  ms/question: {s['ms_per_question']:.1f}  [mode={s['mode']}, latent steps={s['num_latent_steps']}, "
          f"K={s['num_selected_patches']}]")
    if "invalid" in s:  # VSP: success = reached the goal; invalid = no (or an empty) boxed answer
        n = s["num_questions"]
        print(f"success rate: {s['accuracy']:.4f} ({s['correct']}/{n})  invalid rate: {s['invalid_rate']:.4f} "
              f"({s['invalid']}/{n})")
    return 0


# -- lvr tiny-model -----------------------------------------------------------------------------------
def add_tiny_model(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny random-init Qwen2-VL (or Chameleon) checkpoint (tests, demo)")
    p.add_argument("path")
    p.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl", "chameleon"),
                   help="chameleon: its VQ-VAE, tokenizer and processor included (--vision-* do not apply)")
    p.add_argument("--hidden-size", type=positive_int, default=128)
    p.add_argument("--num-layers", type=positive_int, default=4)
    p.add_argument("--num-heads", type=positive_int, default=4)
    p.add_argument("--num-kv-heads", type=positive_int, default=2)
    p.add_argument("--vision-depth", type=positive_int, default=2)
    p.add_argument("--vision-embed-dim", type=positive_int, default=64)
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="every image becomes (size/28)^2 tokens (default 224); chameleon: (size/4)^2 (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)


def cmd_tiny_model(args, argv) -> int:
    check_output_dir(args.path, "path")
    from .models.tiny import write_tiny_model

    try:  # the sizes are checked (ValueError) before anything is written
        if args.family == "chameleon":
            from .models.tiny_chameleon import write_tiny_chameleon

            path = write_tiny_chameleon(args.path, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                        image_size=args.image_size or 32, seed=args.seed)
        else:
            path = write_tiny_model(args.path, family=args.family, hidden_size=args.hidden_size,
                                    num_layers=args.num_layers, num_heads=args.num_heads,
                                    num_kv_heads=args.num_kv_heads, vision_depth=args.vision_depth,
                                    vision_embed_dim=args.vision_embed_dim, image_size=args.image_size or 224,
                                    seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"wrote tiny {args.family} checkpoint to {path}")
    return 0


# -- lvr generate -------------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer one image question")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--choices", nargs="+", default=None, help="option texts (lettered A, B, ...)")
    p.add_argument("--num-latent-steps", type=nonnegative_int, default=None,
                   help="default: as trained (lvr_config.json)")
    p.add_argument("--num-selected-patches", type=nonnegative_int, default=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--heatmap", default=None, help="write the selected patches over the image to this PNG")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args, argv) -> int:
    from .data.example import LETTERS, ReasoningExample
    from .data.prompts import format_prompt
    from .engine.config import LatentConfig
    from .engine.generator import LatentGenerator
    from .evaluation import read_lvr_config
    from .training.collate import encode_prompts

    check_model_dir(args.model)
    image = check_image(args.image)
    if args.choices and len(args.choices) > len(LETTERS):
        raise CLIError(f"--choices: at most {len(LETTERS)} options (letters A-Z), got {len(args.choices)}")
    if args.heatmap:
        check_output_file(args.heatmap, "--heatmap")
        try:
            from .analysis.heatmap import draw_selection_heatmap
        except ImportError as e:
            raise CLIError(f"--heatmap needs lvr_engine.analysis.heatmap, which cannot be imported: {e}") from None
    try:
        meta = read_lvr_config(args.model)
        lc = dict((meta or {}).get("latent_config", {}))
        if args.num_latent_steps is not None:
            lc["num_latent_steps"] = args.num_latent_steps
            lc.setdefault("trigger", "prompt")
            if lc["trigger"] == "token":
                raise CLIError("this model switches into latent mode by itself (Mirage); "
                               "--num-latent-steps does not apply")
        if args.num_selected_patches is not None:
            lc["num_selected_patches"] = args.num_selected_patches
        cfg = LatentConfig(**lc) if lc else LatentConfig(num_latent_steps=0, num_selected_patches=0)
        if args.heatmap and not (cfg.num_latent_steps > 0 and cfg.num_selected_patches > 0):
            raise CLIError("--heatmap needs latent steps that select patches (num_latent_steps > 0, K > 0)")
        gen = LatentGenerator.from_pretrained(args.model, cfg)
        ex = ReasoningExample(id="cli", image=image, question=args.question, choices=args.choices or ["-"],
                              answer="A", answer_index=0, steps=[])
        template = (meta or {}).get("template", "ivtlr")
        text = format_prompt(ex, template) if args.choices else args.question  # no options: the question as asked
        prompt = encode_prompts([ex], gen.processor, template=template, image_size=(meta or {}).get("image_size"),
                                prompt_texts=[text],
                                latent_steps=gen.config.num_latent_steps
                                if gen.config.placeholder_id is not None and gen.config.trigger == "prompt" else 0)
        if args.heatmap and gen.adapter.family == "chameleon":
            raise CLIError("--heatmap draws Qwen2-VL patch grids; a Chameleon model's image tokens cover its "
                           "processor's center crop, which the heat map does not draw")
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    try:
        out = gen.generate(**prompt.model_inputs(), max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from None
    tok = getattr(gen.processor, "tokenizer", gen.processor)
    print(tok.decode(out.sequences[0].tolist(), skip_special_tokens=True).strip())
    if args.heatmap:
        if out.selected.shape[1] == 0 or out.selected.shape[2] == 0:
            raise CLIError("--heatmap needs latent steps that select patches (num_latent_steps > 0, K > 0)")
        thw = prompt.image_grid_thw[0]
        merge = int(gen.model.config.vision_config.spatial_merge_size)
        draw_selection_heatmap(image, out.selected[0].cpu(), thw, merge, args.heatmap)
        print(f"heatmap written to {args.heatmap}")
    return 0


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="causal mediation (do the latents matter?) and selection heat maps")
    p.add_argument("--model", required=True, help="a checkpoint trained with latent steps (lvr_config.json)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=8, help="questions analysed (one batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--output", default=None, help="write the report as JSON here")
    p.add_argument("--heatmaps", default=None, help="directory for per-question selection heat maps")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args, argv) -> int:
    from .analysis.heatmap import draw_selection_heatmap
    from .analysis.mediation import letter_answer, run_mediation
    from .engine.generator import LatentGenerator
    from .evaluation import read_lvr_config
    from .training.collate import encode_prompts

    check_model_dir(args.model)
    try:
        meta = read_lvr_config(args.model)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if meta is None:
        raise CLIError(f"--model {args.model} has no lvr_config.json: analyze needs a model trained with latent steps")
    if args.output:
        check_output_file(args.output)
    if args.heatmaps:
        check_output_dir(args.heatmaps, "--heatmaps")
    examples = list(_load_examples(args.dataset, args.data_dir, args.split, args.limit, require_image=True).examples)
    if not examples:
        raise CLIError(f"no questions with images in {args.dataset} split {args.split!r}")
    try:
        gen = LatentGenerator.from_pretrained(args.model)
        prompt = encode_prompts(examples, gen.processor, template=meta.get("template", "ivtlr"),
                                image_size=meta.get("image_size"))
        batch = prompt.model_inputs()
        report = run_mediation(gen, batch, answer_fn=letter_answer(gen.processor),
                               max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(report.format_table())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {args.output}")
    if args.heatmaps and gen.config.num_selected_patches > 0:
        out = gen.generate(**batch, max_new_tokens=1)
        merge = int(gen.model.config.vision_config.spatial_merge_size)
        Path(args.heatmaps).mkdir(parents=True, exist_ok=True)
        for i, ex in enumerate(examples):
            path = Path(args.heatmaps) / f"q{i}_{ex.id}.png"
            draw_selection_heatmap(ex.image, out.selected[i].cpu(), prompt.image_grid_thw[i], merge, path,
                                   title=ex.question[:80])
        print(f"heat maps written to {args.heatmaps}/")
    return 0


# -- lvr convert --------------------------------------------------------------------------------------
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a released checkpoint into a model directory lvr loads",
                       description="ivtlr: the official IVT-LR model.pth (a peft LoRA of Qwen2-VL in transformers "
                                   "4.51's layout) + its base -> merged safetensors, processor, lvr_config.json.")
    p.add_argument("format", choices=("ivtlr",), help="ivtlr: FYYDCC/IVT-LR's released model.pth")
    p.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "chameleon"),
                   help="the release's backbone: qwen2_vl (Qwen2-VL-7B-Instruct) or chameleon (Chameleon-7B)")
    p.add_argument("--checkpoint", required=True, help="the model.pth (read with torch.load(weights_only=True))")
    p.add_argument("--base", required=True,
                   help="local copy of the base checkpoint (Qwen2-VL-7B-Instruct, or Chameleon-7B with --family "
                        "chameleon)")
    p.add_argument("--output", required=True, help="new directory for the converted model")
    p.add_argument("--lora-r", type=int, default=64, help="the LoRA rank it was trained with (official: 64)")
    p.add_argument("--lora-alpha", type=float, default=16, help="the LoRA alpha (official: 16)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.set_defaults(func=cmd_convert)


def cmd_convert(args, argv) -> int:
    from .models.convert_ivtlr import convert_ivtlr

    check_input_file(args.checkpoint, "--checkpoint")
    check_model_dir(args.base, "--base")
    check_output_dir(args.output, must_not_exist=True)
    alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
    try:
        out = convert_ivtlr(args.checkpoint, args.base, args.output, lora_r=args.lora_r, lora_alpha=alpha,
                            dtype=args.dtype, family=args.family, log=lambda msg: print(msg, flush=True))
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    how = "--dataset scienceqa --judge ivtlr" if args.family == "chameleon" else \
        "--template ivtlr_infer --judge ivtlr_infer"
    print(f"converted {args.checkpoint} to {out}; run it with: lvr generate --model {out} ... "
          f"or lvr eval --model {out} {how} ...")
    return 0


# -- lvr serve ----------------------------------------------------------------------------------------
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="POST /v1/chat/completions (streaming or not; latent options in 'latent'), "
                                   "GET /v1/models, /health, /metrics. Replicas behind any load balancer scale it "
                                   "out: the server keeps no state across requests.")
    p.add_argument("--model", required=True, help="local checkpoint directory (with its processor)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows in the pool (requests decoding at once)")
    p.add_argument("--max-len", type=int, default=2048,
                   help="positions per row: prompt + latent positions + max_tokens of one request must fit")
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens of a request that gives none")
    p.add_argument("--max-prefill-tokens", type=int, default=8192, help="prompt tokens admitted per iteration")
    p.add_argument("--allowed-local-media", action="append", default=[], metavar="DIR",
                   help="let image_url name local files under DIR (repeatable); default: data: URLs only")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the checkpoint loads (CPU)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args, argv) -> int:
    for name in ("max_batch", "max_len", "max_images", "default_max_tokens", "max_prefill_tokens"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if not Path(args.model).is_dir():
        raise CLIError(f"model directory {args.model} does not exist")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"lvr serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from None
    from .serve import ServingEngine, run

    try:
        engine = ServingEngine.from_pretrained(
            args.model, device=args.device, model_name=args.served_model_name, max_batch=args.max_batch,
            max_len=args.max_len, max_images=args.max_images, allowed_local_media=args.allowed_local_media,
            default_max_tokens=args.default_max_tokens, max_prefill_tokens=args.max_prefill_tokens)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(f"lvr serve: {engine.model_name} on http://{args.host}:{args.port}/v1 ({args.max_batch} rows x "
          f"{args.max_len} positions)", flush=True)
    try:
        run(engine, host=args.host, port=args.port, log_level=args.log_level)
    except OSError as e:
        raise CLIError(str(e)) from None
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suites (pytest benchmarks/ --benchmark-only)")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest, e.g. -k engine")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args, argv) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir():
        raise CLIError(f"no benchmarks/ next to the package ({root}); run from a source checkout")
    cmd = [sys.executable, "-m", "pytest", str(root / "benchmarks"), "--benchmark-only", *args.pytest_args]
    return subprocess.call(cmd, cwd=root)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="five methods (direct, CoT, CapImagine, IVT-LR, Mirage) at an equal training "
                                    "budget on a synthetic task, and the mediation readout of the latent ones")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny sizes)")
    p.add_argument("--workers", type=int, default=None,
                   help="trainings run at once, one process and one thread each (default 2; 1: one after the other)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args, argv) -> int:
    check_output_dir(args.output)
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    from .demo import run_demo

    run_demo(args.output, seed=args.seed, quick=args.quick, workers=args.workers)
    return 0


# -- registration -------------------------------------------------------------------------------------
COMMANDS = [add_demo, add_train, add_eval, add_generate, add_tiny_model, add_analyze, add_convert, add_serve,
            add_bench]
"""Subcommand registrations, in help order: each adds its parser and sets ``func(args, argv) -> int``."""


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line like every other user error (``lvr eval: error: ...``, exit 2); the usage
    is one ``--help`` away. Subcommand parsers are of this class too (add_subparsers' default)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lvr", description="Latent visual reasoning engine. Exit status: 0 done, 2 bad "
                     "arguments or input (one line on stderr), 1 internal error, 130/143 interrupted.")
    debug = "print the traceback of an internal error (normally one line)"
    parser.add_argument("--debug", action="store_true", help=debug)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # `lvr eval --debug ...` as well as `lvr --debug eval ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


def report_internal_error(command: str, exc: BaseException, debug: bool, file=None) -> int:
    """Print an unexpected exception of ``lvr <command>``: its traceback with ``debug``, else one line saying it
    is an internal error and how to see the traceback. Returns the exit status (1)."""
    import traceback

    file = sys.stderr if file is None else file
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=file)
    what = " ".join(str(exc).split())  # one line, however many the message had
    line = f"lvr {command}: internal error: {type(exc).__name__}" + (f": {what}" if what else "")
    hint = "" if debug else f" (rerun with lvr --debug {command} ... for the traceback)"
    print(line + hint, file=file, flush=True)
    return EXIT_INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not is_terminal(sys.stderr):
        # transformers' / datasets' own bars ("Loading weights", "Generating test split") redraw with carriage
        # returns; in a log they are noise (our progress_bar writes plain lines there). Read at their import.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(args.func(args, argv) or 0)
    except CLIError as e:
        print(f"lvr {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # (lvr train handles its own: clean stop, resume command)
        print(f"\nlvr {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:  # noqa: BLE001 - a bug or an unchecked input: one line, the traceback with --debug
        return report_internal_error(args.command, e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
