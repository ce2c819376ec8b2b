"""SIGINT / SIGTERM to `lvr train`: exit status 130 / 143, no temporary checkpoint directory left, a report
naming the last complete checkpoint and the command that resumes from it -- and that command, run as printed,
finishes with weights equal (torch.equal, every tensor) to an uninterrupted run of the same configuration.

The runs are subprocesses of the real command (``lvr_engine.cli.main``) on a tiny Qwen2-VL, 3 stages of 2 steps.
A step takes milliseconds, so to interrupt *mid-stage* or *mid-checkpoint* deterministically the subprocess is
started through :data:`WRAPPER`, which wraps two trainer methods (nothing in the package reads a test hook): the
step logger holds the run right after logging stage 1's first step, and the processor writer holds it inside
stage 1's temporary checkpoint directory, each until the stop request arrives (or, for the abort case, until the
second signal raises). The test sends the signal once it sees the log row / the temp directory. The reference run
and the three held runs start together (a held run idles at its hold point); the resumes run one after another.
About 60 s on a busy 2-core machine."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvr_engine.models.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

WRAPPER = r'''
import os, sys, time
from lvr_engine.cli import main
from lvr_engine.training.trainer import Trainer

kind, stage, mode = (os.environ["LVR_TEST_HOLD"].split(":") + [""])[:3]   # step:S | checkpoint:S:graceful|abort

def hold(trainer, until_abort):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if trainer._stop.requested and not until_abort:
            return
        time.sleep(0.01)
    raise RuntimeError("test hold: no signal came")

log, write_processor = Trainer._log, Trainer._write_processor

def held_log(self, row):
    log(self, row)
    if kind == "step" and row["stage"] == int(stage):
        hold(self, False)

def held_write_processor(self, dest):
    write_processor(self, dest)
    if kind == "checkpoint" and dest.name == f".tmp-stage-{stage}":
        hold(self, mode == "abort")

Trainer._log, Trainer._write_processor = held_log, held_write_processor
sys.exit(main(sys.argv[1:]))
'''


def _lvr() -> list[str]:
    exe = Path(sys.executable).with_name("lvr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lvr_engine.cli"]


def _env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
            "HF_DATASETS_CACHE": str(tmp / "hf-cache")}


class Setup:
    def __init__(self, root: Path):
        self.root = root
        self.model = write_tiny_model(root / "tiny", hidden_size=64, num_layers=2, vision_depth=1,
                                      vision_embed_dim=32, image_size=112)
        self.wrapper = root / "wrapper.py"
        self.wrapper.write_text(WRAPPER)
        self.env = _env(root)
        self.ref_dir = root / "reference"
        # the uninterrupted run and the three to interrupt start together (the held ones wait at their hold point)
        self._ref = subprocess.Popen(_lvr() + self.args(self.ref_dir), env=self.env, cwd=root,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._ref_result = None
        self.held = {hold: _start_held(self, root / f"run-{i}", hold) for i, hold in enumerate(HOLDS)}

    def args(self, out: Path) -> list[str]:
        return ["train", "--model", str(self.model), "--dataset", "synthetic", "--limit", "4", "--batch-size", "2",
                "--max-stage", "2", "--num-latent-steps", "1", "--num-selected-patches", "4", "--lr", "1e-3",
                "--seed", "3", "--no-progress", "--output", str(out)]

    def reference(self) -> Path:
        if self._ref_result is None:
            out, err = self._ref.communicate(timeout=300)
            self._ref_result = (self._ref.returncode, out, err)
        rc, out, err = self._ref_result
        assert rc == 0, f"reference run failed:\n{out[-2000:]}\n{err[-3000:]}"
        return self.ref_dir


HOLDS = ("step:1", "checkpoint:1:graceful", "checkpoint:1:abort")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = Setup(tmp_path_factory.mktemp("interrupt"))
    yield s
    for p in [s._ref] + [p for p, _, _ in s.held.values()]:
        if p.poll() is None:
            p.kill()
            p.wait()


def _start_held(setup: Setup, out: Path, hold: str):
    """(process, its stderr file, its --output) of a run through WRAPPER holding at ``hold``."""
    err = open(out.parent / f"{out.name}.stderr", "w+")
    proc = subprocess.Popen([sys.executable, str(setup.wrapper), *setup.args(out)], cwd=setup.root,
                            env={**setup.env, "LVR_TEST_HOLD": hold}, stdout=subprocess.PIPE, stderr=err, text=True)
    return proc, err, out


def _wait_for(proc, err, what: str, cond, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err.seek(0)
            pytest.fail(f"the run ended (rc={proc.returncode}) or timed out before {what}:\n{err.read()[-3000:]}")
        time.sleep(0.02)


def _finish(proc, err) -> tuple[int, str, str]:
    out, _ = proc.communicate(timeout=120)
    err.seek(0)
    text = err.read()
    err.close()
    return proc.returncode, out, text


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


def _resume(setup: Setup, report: str, out: Path) -> None:
    """Run the resume command exactly as the report printed it (with this checkout's `lvr`)."""
    line = next(l for l in report.splitlines() if l.startswith("lvr train: resume with: "))
    argv = shlex.split(line[len("lvr train: resume with: "):])
    assert argv[0] == "lvr" and argv[-1] == "--resume" and argv[1:-1] == setup.args(out)
    p = subprocess.run(_lvr() + argv[1:], env=setup.env, cwd=setup.root, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "complete; model in" in p.stdout


def _assert_same_weights(a: Path, b: Path) -> None:
    for rel in ("model.safetensors", "checkpoints/stage-2/model.safetensors"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys(), rel
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, f"{rel}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    losses = [[json.loads(l)["loss"] for l in (d / "train_log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_sigint_mid_stage(setup):
    proc, err, out = setup.held["step:1"]
    log = out / "train_log.jsonl"
    _wait_for(proc, err, "stage 1's first step", lambda: log.exists() and '"stage": 1' in log.read_text())
    proc.send_signal(signal.SIGINT)
    rc, _, report = _finish(proc, err)
    assert rc == 130, report
    assert "Traceback" not in report, report
    ckpts = out / "checkpoints"
    assert _leftovers(out) == [] and sorted(p.name for p in ckpts.iterdir()) == ["stage-0"]
    lines = [l for l in report.splitlines() if l.startswith("lvr train: ")]
    assert lines[0] == "lvr train: interrupted by SIGINT after step 3", report
    assert lines[1] == (f"lvr train: last complete checkpoint: {ckpts / 'stage-0'} (stage 0, step 2); steps after "
                        "it are not saved"), report
    _resume(setup, report, out)
    _assert_same_weights(out, setup.reference())


def test_sigterm_mid_checkpoint_finishes_the_checkpoint(setup):
    """The first signal lets the checkpoint being written complete (it is renamed into place), then stops."""
    proc, err, out = setup.held["checkpoint:1:graceful"]
    tmp_ckpt = out / "checkpoints" / ".tmp-stage-1"
    _wait_for(proc, err, "stage 1's checkpoint", tmp_ckpt.is_dir)
    proc.send_signal(signal.SIGTERM)
    rc, _, report = _finish(proc, err)
    assert rc == 143, report
    assert "Traceback" not in report, report
    ckpts = out / "checkpoints"
    assert _leftovers(out) == [] and sorted(p.name for p in ckpts.iterdir()) == ["stage-0", "stage-1"]
    assert "lvr train: interrupted by SIGTERM after step 4" in report
    assert f"lvr train: last complete checkpoint: {ckpts / 'stage-1'} (stage 1, step 4)" in report
    _resume(setup, report, out)
    _assert_same_weights(out, setup.reference())


def test_second_sigint_mid_checkpoint_abandons_it(setup):
    """A second signal aborts at once: the half-written checkpoint directory is removed, the previous one is the
    last complete checkpoint."""
    proc, err, out = setup.held["checkpoint:1:abort"]
    tmp_ckpt = out / "checkpoints" / ".tmp-stage-1"
    _wait_for(proc, err, "stage 1's checkpoint", tmp_ckpt.is_dir)
    proc.send_signal(signal.SIGINT)

    def noticed():
        err.seek(0)
        return "SIGINT received; stopping after the current step or checkpoint" in err.read()

    _wait_for(proc, err, "the first SIGINT was noticed", noticed)
    assert tmp_ckpt.is_dir()  # still held inside the checkpoint
    proc.send_signal(signal.SIGINT)
    rc, _, report = _finish(proc, err)
    assert rc == 130, report
    assert "Traceback" not in report, report
    ckpts = out / "checkpoints"
    assert _leftovers(out) == [] and sorted(p.name for p in ckpts.iterdir()) == ["stage-0"]
    assert "lvr train: interrupted by SIGINT after step 4 (aborted at once by the second signal)" in report
    assert f"lvr train: last complete checkpoint: {ckpts / 'stage-0'} (stage 0, step 2)" in report
    _resume(setup, report, out)
    _assert_same_weights(out, setup.reference())


# -- the pieces a multi-process run relies on (its parent cleans up after the workers; the launcher's status) ----
def test_remove_partial_undoes_a_killed_save(tmp_path):
    """What a process killed mid-save leaves: a checkpoint moved aside for its replacement is moved back, temp
    directories and superseded copies go."""
    from lvr_engine.training.checkpoint import remove_partial

    ck = tmp_path / "checkpoints"
    for d in ("stage-0", ".old-stage-0", ".old-stage-1", ".tmp-stage-1", ".tmp-stage-2"):
        (ck / d).mkdir(parents=True)
        (ck / d / "trainer_state.json").write_text(d)
    (tmp_path / ".tmp-publish").mkdir()
    remove_partial(tmp_path)
    assert sorted(p.name for p in ck.iterdir()) == ["stage-0", "stage-1"]
    assert (ck / "stage-0" / "trainer_state.json").read_text() == "stage-0"      # the newer copy kept
    assert (ck / "stage-1" / "trainer_state.json").read_text() == ".old-stage-1"  # moved back
    assert not (tmp_path / ".tmp-publish").exists()


def test_launcher_exit_status_is_the_workers():
    from types import SimpleNamespace as F

    from lvr_engine.training.launch import exit_status

    assert exit_status({1: F(exitcode=130), 0: F(exitcode=2)}) == 2          # the lowest failed rank's
    assert exit_status({0: F(exitcode=-signal.SIGTERM)}) == 143              # killed by a signal: 128 + N
    assert exit_status({}) == 1
