"""Stopping a training run on SIGINT / SIGTERM without leaving half-written files behind.

While :meth:`Trainer.train <lvr_engine.training.trainer.Trainer.train>` runs (in the main thread), the first
SIGINT or SIGTERM only *requests* a stop: the step in progress (or the checkpoint being written) finishes, and
at the next step boundary every process agrees to stop (the request is summed over processes with the step's
own all-reduce), so DDP processes stop together at the same step. The trainer then raises
:class:`TrainingInterrupted`. A second signal aborts at once: :class:`TrainingInterrupted` is raised from the
signal handler, and the checkpoint writer removes its temporary directory on the way out (short renames run
with the abort deferred, see :func:`deferred_abort`).

``lvr train`` turns :class:`TrainingInterrupted` into exit status 130 (SIGINT) or 143 (SIGTERM) after printing
:func:`interrupt_report`: where the last complete checkpoint is and the command that resumes from it.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import signal
import threading
from pathlib import Path

__all__ = ["TrainingInterrupted", "StopRequest", "deferred_abort", "interrupt_report", "resume_command",
           "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(BaseException):
    """Training stopped because of signal ``signum`` (a BaseException, like KeyboardInterrupt, so that
    ``except Exception`` blocks do not swallow it). ``step``: the last completed global step (None when
    unknown); ``abort``: raised by a second signal, in the middle of whatever was running."""

    def __init__(self, signum: int, step: int | None = None, abort: bool = False):
        self.signum, self.step, self.abort = int(signum), step, abort
        how = "aborted" if abort else "stopped"
        at = f" after step {step}" if step is not None else ""
        super().__init__(f"training {how} by {signal.Signals(self.signum).name}{at}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by this signal: 128 + signal number (SIGINT 130, SIGTERM 143)."""
        return 128 + self.signum


class StopRequest:
    """Context manager: SIGINT/SIGTERM handlers for the duration of a training run (main thread only; elsewhere
    it installs nothing and :attr:`signum` stays None).

    The first signal sets :attr:`signum` and calls ``on_first(signum)`` (a notice for the user); a second one
    raises :class:`TrainingInterrupted` with ``abort=True`` -- unless :func:`deferred_abort` is active, in which
    case it is raised when that block ends. The previous handlers are restored on exit."""

    active: "StopRequest | None" = None   # the one installed in this process (read by deferred_abort)

    def __init__(self, on_first=None):
        self.signum: int | None = None
        self.on_first = on_first
        self._previous: dict[int, object] = {}
        self._defer_depth = 0
        self._deferred: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.on_first is not None:
                self.on_first(signum)
            return
        if self._defer_depth:
            self._deferred = signum
            return
        raise TrainingInterrupted(signum, abort=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() and StopRequest.active is None:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            StopRequest.active = self
        return self

    def __exit__(self, *exc) -> None:
        if StopRequest.active is self:
            for s, h in self._previous.items():
                signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler not set from Python
            StopRequest.active = None


@contextlib.contextmanager
def deferred_abort():
    """Run a short block (renames that move a checkpoint into place) without being cut in half by an abort: a
    second signal arriving inside raises :class:`TrainingInterrupted` when the block ends instead."""
    req = StopRequest.active
    if req is None:
        yield
        return
    req._defer_depth += 1
    try:
        yield
    finally:
        req._defer_depth -= 1
        if not req._defer_depth and req._deferred is not None:
            signum, req._deferred = req._deferred, None
            raise TrainingInterrupted(signum, abort=True)


def resume_command(argv: list[str], *, resume: bool = True) -> str:
    """The ``lvr`` command line of ``argv`` (the arguments after ``lvr``), with ``--resume`` added when
    ``resume`` and absent (and removed when not ``resume``), quoted for a POSIX shell."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join(["lvr", *args, *(["--resume"] if resume else [])])


def interrupt_report(output_dir: str | Path, signum: int, argv: list[str], step: int | None = None,
                     abort: bool = False) -> list[str]:
    """The lines ``lvr train`` prints when ``signum`` stopped a run writing to ``output_dir``: the signal (and the
    step, when known; ``abort``: a second signal cut it short), the last complete checkpoint and its stage and
    step, and the command that resumes from it (or, without a checkpoint, the command that starts over)."""
    from .checkpoint import TRAINER_STATE, latest_checkpoint

    name = signal.Signals(signum).name
    at = f" after step {step}" if step is not None else ""
    lines = [f"interrupted by {name}{at}" + (" (aborted at once by the second signal)" if abort else "")]
    ckpt = latest_checkpoint(Path(output_dir) / "checkpoints")
    state = None
    if ckpt is not None:
        try:
            state = json.loads((ckpt / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            state = None
    if state is None:
        lines.append(f"no complete checkpoint in {output_dir} yet; start again with: "
                     f"{resume_command(argv, resume=False)}")
    elif state.get("completed"):
        lines.append(f"training is complete: {ckpt} (stage {state.get('stage')}, step {state.get('global_step')})")
    else:
        lines.append(f"last complete checkpoint: {ckpt} (stage {state.get('stage')}, step "
                     f"{state.get('global_step')}); steps after it are not saved")
        lines.append(f"resume with: {resume_command(argv)}")
    return lines
