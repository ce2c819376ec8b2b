"""Stage checkpoints: atomic save, publishing the latest model at the top of ``output_dir``, and the state an
exact resume reads back.

A checkpoint directory holds the weights (safetensors; with LoRA the merged model plus ``adapter/``), the
processor files, ``lvr_config.json``, ``optimizer.pt``, ``scheduler.pt``, one ``rng_state_<rank>.pth`` per
process (torch, numpy, python and CUDA generators) and ``trainer_state.json``, written last: its presence marks
a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..models.loading import LVR_CONFIG
from .interrupt import deferred_abort
from .train_config import TrainConfig

__all__ = ["TRAINER_STATE", "PUBLISHED", "rng_state", "set_rng_state", "write_model", "write_processor",
           "save_atomic", "publish", "remove_partial", "latest_checkpoint", "load_resume_state"]

TRAINER_STATE = "trainer_state.json"
# Name prefixes of the files publish() copies to the top of output_dir (what from_pretrained loads).
PUBLISHED = ("model", "config.json", "generation_config.json", "tokenizer", "processor_config.json",
             "preprocessor_config.json", "video_preprocessor_config.json", "chat_template", "special_tokens_map.json",
             "vocab.json", "merges.txt", "added_tokens.json", LVR_CONFIG, TRAINER_STATE)


def rng_state() -> dict:
    """This process's generator states: python, numpy, torch (and every CUDA device's when there is one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_model(model, dest: Path, lora: bool) -> None:
    """``model`` (unwrapped) as safetensors into ``dest``; with ``lora`` the adapter under ``dest/adapter`` and the
    model with the adapter merged into a copy at the top (so the checkpoint loads as a plain model)."""
    if lora:
        import copy

        model.save_pretrained(dest / "adapter", safe_serialization=True)
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(dest, safe_serialization=True)
        del merged
    else:
        model.save_pretrained(dest, safe_serialization=True)


def write_processor(processor, dest: Path, source_model: str | os.PathLike) -> None:
    """``processor`` into ``dest``, keeping the source checkpoint's video processor entry where ours is a
    stand-in."""
    processor.save_pretrained(dest)
    # Without torchvision the processor carries a stand-in video processor; keep the source checkpoint's
    # entry so the saved processor loads with AutoProcessor wherever torchvision is installed.
    saved, source = dest / "processor_config.json", Path(source_model) / "processor_config.json"
    if saved.exists() and source.exists():
        s, o = json.loads(saved.read_text()), json.loads(source.read_text())
        vp = s.get("video_processor")
        if isinstance(vp, dict) and vp.get("video_processor_type") == "VideoProcessorMixin" and "video_processor" in o:
            s["video_processor"] = o["video_processor"]
            saved.write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")


def save_atomic(accelerator, dest: Path, write_main: Callable[[Path], None],
                trainer_state: Callable[[], dict]) -> None:
    """Write a checkpoint into ``.tmp-<dest.name>`` (same parent) and rename it to ``dest``, on every process.

    The main process runs ``write_main(tmp)`` (weights, processor, optimizer, ...), every process saves its RNG
    state (taken before anything else might draw), then the main process writes ``trainer_state()`` as
    ``trainer_state.json``. A failure anywhere (on any process) leaves the previous ``dest`` untouched and no
    partial directory behind; the error is re-raised on every process.
    """
    acc = accelerator
    is_main = acc.is_main_process
    rng = rng_state()  # before anything else might draw
    tmp = dest.parent / f".tmp-{dest.name}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    error = None
    try:
        if is_main:
            write_main(tmp)
        torch.save(rng, tmp / f"rng_state_{acc.process_index}.pth")
        if is_main:  # written last: its presence marks a complete checkpoint
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state(), indent=2) + "\n")
    except Exception as e:  # noqa: BLE001 - re-raised below, after every process agrees to abort
        error = e
    except BaseException:  # an abort (a second Ctrl-C / SIGTERM): no collective, the other processes are going too
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed = acc.reduce(torch.tensor([0 if error is None else 1], device=acc.device), "sum")
    if int(failed.item()):
        acc.wait_for_everyone()
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint {dest} failed on another process; previous checkpoint kept")
    if is_main:
        old = dest.parent / f".old-{dest.name}"
        if old.exists():
            shutil.rmtree(old)
        with deferred_abort():  # never stop between the two renames (dest missing, its old copy aside)
            if dest.exists():
                os.rename(dest, old)
            os.rename(tmp, dest)
        if old.exists():
            shutil.rmtree(old)
    acc.wait_for_everyone()


def publish(ckpt: Path, output_dir: Path) -> None:
    """Make ``ckpt``'s model the top level of ``output_dir`` (each file replaced atomically with os.replace,
    weights before ``trainer_state.json``), so ``LatentGenerator.from_pretrained(output_dir)`` loads it.
    Call on the main process only."""
    staging = output_dir / ".tmp-publish"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        files = [p for p in ckpt.iterdir() if p.is_file() and p.name.startswith(PUBLISHED)]
        for p in files:
            _link_or_copy(p, staging / p.name)
        names = {p.name for p in files}
        with deferred_abort():  # all of the top level is replaced, or none of it
            for p in sorted(files, key=lambda p: p.name == TRAINER_STATE):
                os.replace(staging / p.name, output_dir / p.name)
            for p in output_dir.glob("model*.safetensors*"):  # shards of an earlier, differently sharded save
                if p.name not in names:
                    p.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_partial(output_dir: Path) -> list[Path]:
    """Undo what a killed run can leave in ``output_dir`` (call when no run is writing there): a checkpoint
    moved aside for its replacement (``checkpoints/.old-<name>`` without ``<name>``) is moved back; temporary
    directories (``checkpoints/.tmp-*``, ``.tmp-publish``) and superseded ``.old-*`` copies are removed.
    Returns the paths removed or restored."""
    touched = []
    root = output_dir / "checkpoints"
    for old in sorted(root.glob(".old-*")) if root.is_dir() else []:
        dest = root / old.name[len(".old-"):]
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, dest)
        touched.append(old)
    temps = (sorted(root.glob(".tmp-*")) if root.is_dir() else []) + [output_dir / ".tmp-publish"]
    for tmp in temps:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            touched.append(tmp)
    return touched


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest ``stage-<s>`` directory under ``ckpt_root`` (None when there is none)."""
    if not ckpt_root.is_dir():
        return None
    found = []
    for d in ckpt_root.iterdir():
        if d.is_dir() and d.name.startswith("stage-") and d.name[6:].isdigit():
            found.append((int(d.name[6:]), d))
    for _, d in sorted(found, reverse=True):
        return d
    return None


def load_resume_state(ckpt: Path, cfg: TrainConfig, world: int, process_index: int) -> dict:
    """``ckpt``'s ``trainer_state.json``, after checking that this process can resume from it exactly: the
    checkpoint is complete (optimizer, scheduler, this rank's RNG state), and the global batch, objective, seed
    and LoRA setting equal this run's. ValueError naming the mismatch otherwise."""
    state_file = ckpt / TRAINER_STATE
    if not state_file.is_file():
        raise ValueError(f"cannot resume: checkpoint {ckpt} is incomplete (no {TRAINER_STATE})")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot resume: {state_file} is corrupt ({e})") from e
    need = ["optimizer.pt", "scheduler.pt", f"rng_state_{process_index}.pth"]
    missing = [n for n in need if not (ckpt / n).is_file()]
    if missing:
        raise ValueError(f"cannot resume: checkpoint {ckpt} lacks {missing}")
    if state.get("global_batch_size") != cfg.batch_size * world:
        raise ValueError(
            f"cannot resume {ckpt} exactly: it was trained with a global batch of {state.get('global_batch_size')}"
            f" ({state.get('num_processes')} processes), this run has {cfg.batch_size * world}")
    for key in ("objective", "seed"):
        if state.get(key) != getattr(cfg, key):
            raise ValueError(f"cannot resume {ckpt}: it was trained with {key}={state.get(key)!r}, "
                             f"this run has {getattr(cfg, key)!r}")
    if bool(state.get("lora")) != (cfg.lora is not None):
        raise ValueError(f"cannot resume {ckpt}: LoRA {'on' if state.get('lora') else 'off'} there, "
                         f"{'on' if cfg.lora is not None else 'off'} here")
    return state
