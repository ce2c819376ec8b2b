"""``python -m lvr_engine.training.launch <accelerate launch arguments>``: what ``lvr train --num-processes N``
runs. It is ``accelerate launch``, except for how it ends when a worker fails: it exits with that worker's exit
status (2 for a user error, 130 / 143 when interrupted, ...) instead of printing torch.distributed's
``ChildFailedError`` traceback -- the worker has already said what went wrong, in one line.
"""
from __future__ import annotations

import sys


def exit_status(failures: dict) -> int:
    """The launcher's exit status for torch.distributed's ``{rank: ProcessFailure}``: the lowest failed rank's
    exit code, or 128 + N for a worker killed by signal N."""
    if not failures:
        return 1
    code = failures[min(failures)].exitcode
    return code if code > 0 else 128 - code if code < 0 else 1


def main() -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args()
    try:
        launch_command(args)
    except ChildFailedError as e:
        return exit_status(e.failures)
    except SignalException as e:  # the launcher itself was signalled; it has stopped its workers
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
