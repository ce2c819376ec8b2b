"""The checks every ``lvr`` subcommand runs on its arguments before any work: input paths (a checkpoint
directory, an image, a dataset's rows) and output paths (a file or directory that must be creatable and
writable), so that a bad invocation ends in one line -- ``lvr <cmd>: error: <what is wrong>``, exit status 2 --
and never in a traceback, nor after minutes of compute.

Each check raises :class:`CLIError` naming the flag and the offending value. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

__all__ = ["CLIError", "positive_int", "nonnegative_int", "check_model_dir", "check_input_file", "check_image",
           "check_output_file", "check_output_dir", "check_rows", "describe_row_error"]


class CLIError(Exception):
    """A user-facing error: printed as ``lvr <cmd>: error: <message>`` with exit status 2."""


# -- argparse types -----------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


# -- input paths ----------------------------------------------------------------------------------------------
def check_model_dir(path, flag: str = "--model", *, need: tuple[str, ...] = ()) -> Path:
    """``path`` is a readable checkpoint directory (config.json, and each file in ``need``)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{flag}: model directory {path} does not exist")
    if not p.is_dir():
        raise CLIError(f"{flag} {path} is a file, not a checkpoint directory (a directory with config.json and "
                       "*.safetensors)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise CLIError(f"{flag} {path} cannot be read (permission denied)")
    if not (p / "config.json").is_file():
        raise CLIError(f"{flag} {path} is not a checkpoint directory: it has no config.json (expected config.json "
                       "and *.safetensors)")
    for name in need:
        if not (p / name).is_file():
            raise CLIError(f"{flag} {path} has no {name}")
    return p


def check_input_file(path, flag: str) -> Path:
    """``path`` is an existing, readable file (not a directory)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{flag} {path} does not exist")
    if p.is_dir():
        raise CLIError(f"{flag} {path} is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise CLIError(f"{flag} {path} cannot be read (permission denied)")
    return p


def check_image(path, flag: str = "--image"):
    """The image file at ``path`` decoded into RGB (a PIL image); CLIError when it is not an image PIL reads."""
    from PIL import Image, UnidentifiedImageError

    from .data.example import to_rgb

    p = check_input_file(path, flag)
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im).copy()
    except UnidentifiedImageError:
        raise CLIError(f"{flag} {path} is not an image (PIL cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data (PIL raises all three)
        raise CLIError(f"{flag} {path} is a damaged image: {e}") from None


# -- output paths --------------------------------------------------------------------------------------------
def _check_can_create_dir(d: Path, flag: str, target) -> None:
    """Directory ``d`` exists and is writable, or can be created (its nearest existing ancestor is a writable
    directory)."""
    a = d
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise CLIError(f"{flag} {target} cannot be created: {a} is a file, not a directory")
    try:  # the real test (permissions, read-only file systems, root): make an unnamed file there
        with tempfile.TemporaryFile(dir=a):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {target} cannot be written: no write access to {a} ({e.strerror})") from None


def check_output_file(path, flag: str = "--output") -> Path:
    """``path`` can be written as a file: not a directory, and an existing file is writable or the directory
    it goes in can be created and written. Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {path} is a directory; give a file path")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise CLIError(f"{flag} {path} cannot be written (permission denied)")
        return p
    _check_can_create_dir(p.parent if str(p.parent) else Path("."), flag, path)
    return p


def check_output_dir(path, flag: str = "--output", *, must_not_exist: bool = False) -> Path:
    """``path`` can hold the command's output directory: an existing writable directory, or one that can be
    created (``must_not_exist``: it must not exist yet). Creates nothing."""
    p = Path(path)
    if p.exists():
        if must_not_exist:
            raise CLIError(f"{flag} {path} already exists; give a new directory")
        if not p.is_dir():
            raise CLIError(f"{flag} {path} is a file, not a directory")
    _check_can_create_dir(p, flag, path)
    return p


# -- dataset rows ----------------------------------------------------------------------------------------------
def describe_row_error(e: Exception) -> str:
    """What went wrong converting one dataset row, in words."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "its image is not an image (PIL cannot identify its format)"
    if isinstance(e, FileNotFoundError):
        return str(e)
    if isinstance(e, (OSError, SyntaxError)):
        return f"its image is damaged: {e}"
    if isinstance(e, ValueError):
        return str(e)
    return f"cannot be read ({type(e).__name__}: {e})"


def check_rows(examples, label: str, n: int | None = None) -> None:
    """Convert the first ``n`` (default: all) items of ``examples`` (a lazy dataset: each access decodes the
    row and its image) once, so that a bad row is an error naming it before any compute, not a crash midway.
    ``label`` names the split ("m3cot test"); rows are numbered as in the split (0-based, before filtering)."""
    rows = getattr(examples, "rows", None)
    for i in range(len(examples) if n is None else min(n, len(examples))):
        try:
            examples[i]
        except Exception as e:  # noqa: BLE001 - any failure to read a row is the data's problem: say which
            r = rows[i] if rows is not None else i
            raise CLIError(f"{label} row {r} (0-based): {describe_row_error(e)}") from None
