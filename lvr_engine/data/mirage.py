"""Mirage's data format (UMass-Embodied-AGI/Mirage) and the VSP spatial-planning benchmark.

A Mirage file is JSON lines, one question per line::

    {"text_input": "... Here is the map: <image> ...",      # the user text; each <image> is where an input
                                                           # image goes (in order)
     "image_input": "./data/.../map.png",                  # a path, or a list of paths (several images)
     "image_output": "./data/.../map_step_1.png",          # the helper image: the imagined state (training)
     "text_output": "<think> ... </think><output_image>The answer is \\boxed{A}."}   # absent in test rows

Any other field (VSP: ``map_desc``, ``map_id``) is kept in the example's ``metadata``. ``<output_image>`` in
``text_output`` marks where the latent visual tokens go (Mirage's stage 1 puts the pooled helper image there);
without it they come right after the prompt.

Relative image paths resolve as Mirage's own scripts do, from the current directory, and then from the data
file's directory and each of its parents (Mirage's paths are relative to its repository root, e.g.
``./data/vsp_spatial_planning/imgs_test/level3/img/31.png``). Every path is resolved when the file is read, so a
missing image is a ``FileNotFoundError`` naming the file, the line, the row and every path tried, before any
work starts; images are decoded only when a row is accessed (:class:`MirageDataset` is lazy).

VSP spatial planning (the ``vsp`` dataset): ``<data_dir>/<split>_direct.jsonl`` (Mirage ships
``train_direct.jsonl`` and ``test_direct.jsonl``, 400 test maps of 3x3 to 6x6). Scoring: :func:`score_vsp` in
scoring.py walks the answer's moves on ``map_desc``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from PIL import Image

from .example import SKIPPED_NO_IMAGE, ReasoningExample, decode_image

__all__ = ["IMAGE_PLACEHOLDER", "OUTPUT_IMAGE", "MirageExample", "MirageDataset", "load_mirage_jsonl", "load_vsp",
           "resolve_image_path"]

IMAGE_PLACEHOLDER = "<image>"
"""Where an input image goes in ``text_input``."""

OUTPUT_IMAGE = "<output_image>"
"""Where the latent visual tokens go in ``text_output``."""

_KNOWN_FIELDS = ("text_input", "text_output", "image_input", "image_output")


@dataclass
class MirageExample(ReasoningExample):
    """One Mirage-format question: free-form text in and out, no letter choices.

    Besides the :class:`ReasoningExample` fields (``question`` is ``text_input`` verbatim, ``<image>``
    placeholders included; ``image`` is the first input image; ``choices``/``steps`` empty, ``answer`` "",
    ``answer_index`` -1):

    Attributes:
        images: every input image in ``<image>`` order (RGB), ``[]`` for a text-only row.
        helper_image: the ``image_output`` (RGB), the imagined state Mirage's stage 1 supervises the latents
            with; ``None`` when the row has none (test rows).
        target_text: ``text_output`` verbatim (``<output_image>`` included), ``None`` in test rows.
    """

    images: list[Image.Image] = field(default_factory=list)
    helper_image: Image.Image | None = None
    target_text: str | None = None

    def __post_init__(self) -> None:
        if self.choices or self.answer_index != -1:
            raise ValueError(f"example {self.id!r}: a MirageExample has free-form targets, not letter choices")
        if self.images and self.image is not self.images[0]:
            raise ValueError(f"example {self.id!r}: image must be the first of images")

    @property
    def answer_text(self) -> str:
        """The target text (``""`` in test rows)."""
        return self.target_text or ""


def resolve_image_path(path: str, base_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """``(found, tried)``: an absolute ``path`` as is; a relative one from the current directory, then from
    ``base_dir`` and each of its parents (first existing wins). ``found`` is None when none exists."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return (p if p.is_file() else None), [p]
    base = Path(base_dir).expanduser().resolve()
    tried: list[Path] = []
    for root in (Path.cwd(), base, *base.parents):
        cand = root / p
        if cand in tried:
            continue
        tried.append(cand)
        if cand.is_file():
            return cand, tried
    return None, tried


@dataclass
class _Row:
    """A parsed line: texts, resolved image paths, extra fields."""

    line: int
    text_input: str
    text_output: str | None
    inputs: list[Path]
    helper: Path | None
    extra: dict[str, Any]


class MirageDataset(Sequence[MirageExample]):
    """A lazy sequence of :class:`MirageExample` read from a Mirage jsonl file.

    The texts and resolved image paths are held in memory; ``ds[i]`` decodes row ``i``'s images on every access.
    ``rows[i]`` is item ``i``'s 0-based row index in the file (before ``require_image`` filtering);
    ``split_rows`` and ``skipped`` count the file's rows and those left out, by reason, as
    :class:`~lvr_engine.data.example.ReasoningDataset` does.
    """

    def __init__(self, path: Path, parsed: list[_Row], rows: list[int], *, name: str, split: str,
                 split_rows: int, skipped: Mapping[str, int] | None = None) -> None:
        self.path = path
        self._parsed = parsed
        self.rows = rows
        self.name = name
        self.split = split
        self.split_rows = split_rows
        self.skipped = {k: int(v) for k, v in (skipped or {}).items() if v}

    def __len__(self) -> int:
        return len(self._parsed)

    @overload
    def __getitem__(self, index: int) -> MirageExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[MirageExample]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name} {self.split} with {n} rows")
        return self._example(self._parsed[i], self.rows[i])

    def __iter__(self) -> Iterator[MirageExample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        skipped = f", skipped={self.skipped}" if self.skipped else ""
        return f"MirageDataset(name={self.name!r}, split={self.split!r}, rows={len(self)}{skipped}, path={self.path})"

    def _example(self, r: _Row, row: int) -> MirageExample:
        images = [decode_image({"path": str(p)}) for p in r.inputs]
        helper = decode_image({"path": str(r.helper)}) if r.helper is not None else None
        ex_id = str(r.extra["id"]) if "id" in r.extra else f"{self.name}-{self.split}-{row}"
        metadata = {**r.extra, "dataset": self.name, "split": self.split, "row": row, "line": r.line,
                    "image_input": [str(p) for p in r.inputs],
                    "image_output": None if r.helper is None else str(r.helper)}
        return MirageExample(id=ex_id, image=images[0] if images else None, question=r.text_input, choices=[],
                             answer="", answer_index=-1, steps=[], metadata=metadata, images=images,
                             helper_image=helper, target_text=r.text_output)


def _parse_line(raw: dict, path: Path, line: int, row: int, base_dir: Path) -> _Row:
    where = f"{path}:{line} (row {row})"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a Mirage row is a JSON object, got {type(raw).__name__}")
    text = raw.get("text_input")
    if not isinstance(text, str):
        raise ValueError(f"{where}: text_input must be a string, got {type(text).__name__}")
    out = raw.get("text_output")
    if out is not None and not isinstance(out, str):
        raise ValueError(f"{where}: text_output must be a string when present, got {type(out).__name__}")
    given = raw.get("image_input")
    given = [] if given is None else ([given] if isinstance(given, str) else given)
    if not isinstance(given, list) or not all(isinstance(g, str) for g in given):
        raise ValueError(f"{where}: image_input must be a path or a list of paths, got {raw.get('image_input')!r}")

    def find(value: str, key: str) -> Path:
        found, tried = resolve_image_path(value, base_dir)
        if found is None:
            raise FileNotFoundError(f"{where}: {key} {value!r} not found; tried: {', '.join(map(str, tried))}")
        return found

    inputs = [find(g, "image_input") for g in given]
    helper_raw = raw.get("image_output")
    if helper_raw is not None and not isinstance(helper_raw, str):
        raise ValueError(f"{where}: image_output must be a path, got {helper_raw!r}")
    helper = find(helper_raw, "image_output") if helper_raw else None
    n_holes = text.count(IMAGE_PLACEHOLDER)
    if n_holes and n_holes != len(inputs):
        raise ValueError(f"{where}: text_input has {n_holes} {IMAGE_PLACEHOLDER} placeholder(s) for {len(inputs)} "
                         "input image(s)")
    if out is not None and out.count(OUTPUT_IMAGE) > 1:
        raise ValueError(f"{where}: text_output has {out.count(OUTPUT_IMAGE)} {OUTPUT_IMAGE} placeholders; "
                         "Mirage has one latent segment per answer")
    extra = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
    return _Row(line, text, out, inputs, helper, extra)


def load_mirage_jsonl(path: str | os.PathLike, *, name: str = "mirage", split: str | None = None,
                      base_dir: str | os.PathLike | None = None, require_image: bool = False) -> MirageDataset:
    """Read a Mirage-format jsonl file into a lazy :class:`MirageDataset`.

    ``base_dir`` (default: the file's directory) and its parents are searched for relative image paths after the
    current directory. ``require_image`` leaves out rows without an input image (counted in ``skipped``).
    ``FileNotFoundError`` for a missing file or image (naming line, row and paths tried); ``ValueError`` for a
    malformed row (not JSON, no ``text_input``, ``<image>`` placeholders not matching the images, more than one
    ``<output_image>``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Mirage data file {path} does not exist")
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    split = split if split is not None else path.stem
    parsed: list[_Row] = []
    rows: list[int] = []
    total = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} (row {total}): not JSON: {e}") from None
            r = _parse_line(raw, path, line_no, total, base)
            if not (require_image and not r.inputs):
                parsed.append(r)
                rows.append(total)
            total += 1
    skipped = {SKIPPED_NO_IMAGE: total - len(parsed)} if require_image else {}
    return MirageDataset(path, parsed, rows, name=name, split=split, split_rows=total, skipped=skipped)


def load_vsp(data_dir: str | os.PathLike, split: str = "test", *, require_image: bool = False,
             **_ignored) -> MirageDataset:
    """VSP spatial planning in Mirage's layout: ``<data_dir>/<split>_direct.jsonl`` (``map_desc`` kept in
    metadata; relative image paths resolved from the current directory, ``data_dir`` and its parents).
    Extra keyword arguments of the other loaders (``max_steps``, ``cache_dir``) are accepted and ignored."""
    data_dir = Path(data_dir).expanduser()
    path = data_dir / f"{split}_direct.jsonl"
    if not path.is_file():
        have = sorted(p.name for p in data_dir.glob("*.jsonl")) if data_dir.is_dir() else []
        raise FileNotFoundError(f"VSP split {split!r}: {path} does not exist"
                                + (f" (found: {', '.join(have)})" if have else ""))
    return load_mirage_jsonl(path, name="vsp", split=split, base_dir=data_dir, require_image=require_image)
