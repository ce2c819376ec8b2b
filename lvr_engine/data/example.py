"""The example type every benchmark loader returns, the lazy dataset of them, and the shared loader body.

M3CoT and ScienceQA are read from a local copy of their published Hugging Face repositories:
``<data_dir>/data/<split>-*.parquet`` (e.g. ``data/train-00000-of-00001-1028f23e353fbe3e.parquet``),
images embedded as the ``datasets`` ``Image`` feature, i.e. a struct ``{bytes: binary, path: string}``.
The loaders validate the layout and the columns up front (the parquet reader: parquet.py, whose names stay
importable from here), then return a :class:`ReasoningDataset`: a lazy ``Sequence[ReasoningExample]`` that
decodes a row (and its image) only when it is accessed.
"""

from __future__ import annotations

import io
import os
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from PIL import Image

from .parquet import check_columns, find_split_shards, read_parquet_split, rows_with_image

LETTERS = string.ascii_uppercase
"""Choice letters: choice ``i`` is ``LETTERS[i]`` ("A", "B", ...)."""

SKIPPED_NO_IMAGE = "without an image"
"""The :attr:`ReasoningDataset.skipped` reason of the rows ``require_image=True`` leaves out."""


@dataclass
class ReasoningExample:
    """One multiple-choice visual reasoning question, benchmark-independent.

    Attributes:
        id: unique id within the dataset (M3CoT's ``id``; ScienceQA has none, so
            ``"scienceqa-<split>-<row>"`` with the row index in the split's shards).
        image: the decoded image in RGB mode (transparent pixels composited onto white), or ``None``
            when the row has no image.
        question: the question text, as published.
        choices: the option texts; choice ``i`` has letter ``LETTERS[i]``.
        answer: the gold letter, ``"A"``, ``"B"``, ...
        answer_index: the gold choice index, ``answer == LETTERS[answer_index]``.
        steps: the rationale split into at most 3 steps (:func:`lvr_engine.data.steps.split_rationale`);
            ``[]`` when the row has no rationale.
        context: extra context shown with the question (M3CoT ``context``, ScienceQA ``hint``); ``""``
            when absent.
        metadata: the remaining columns (domain, topic, grade, ...) plus ``"dataset"`` ("m3cot", ...),
            ``"split"`` (the split loaded) and ``"row"`` (the row index in the split, before filtering).
        rationale: the full rationale text the steps were split from.
    """

    id: str
    image: Image.Image | None
    question: str
    choices: list[str]
    answer: str
    answer_index: int
    steps: list[str]
    context: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    rationale: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.answer_index < len(self.choices):
            raise ValueError(
                f"example {self.id!r}: answer_index {self.answer_index} is out of range for "
                f"{len(self.choices)} choices"
            )
        if self.answer != LETTERS[self.answer_index]:
            raise ValueError(
                f"example {self.id!r}: answer {self.answer!r} does not match answer_index "
                f"{self.answer_index} (letter {LETTERS[self.answer_index]!r})"
            )

    @property
    def letters(self) -> list[str]:
        """The letters of the choices, ``["A", "B", ...]`` (one per choice)."""
        return list(LETTERS[: len(self.choices)])

    @property
    def answer_text(self) -> str:
        """The text of the gold choice."""
        return self.choices[self.answer_index]


def letter_for(index: int) -> str:
    """Return the letter of choice ``index`` (0 → ``"A"``); ``ValueError`` outside 0–25."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"choice index {index} has no letter (supported: 0..{len(LETTERS) - 1})")
    return LETTERS[index]


def index_for(letter: str) -> int:
    """Return the choice index of ``letter`` (``"A"``/``"a"`` → 0); ``ValueError`` if not a letter."""
    s = letter.strip().upper()
    if len(s) != 1 or s not in LETTERS:
        raise ValueError(f"{letter!r} is not a choice letter A-Z")
    return LETTERS.index(s)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` in RGB mode; transparent pixels are composited onto white (as qwen_vl_utils)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(value: Any, base_dir: str | os.PathLike | None = None) -> Image.Image | None:
    """Decode one undecoded ``datasets`` ``Image`` cell into an RGB PIL image.

    ``value`` is ``None`` (no image), a dict ``{"bytes": ..., "path": ...}`` (the embedded form:
    bytes win; otherwise ``path``, resolved against ``base_dir`` when relative), raw ``bytes``, or
    a PIL image. Returns ``None`` for a missing image; ``FileNotFoundError`` if only a path is
    given and it does not exist.
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    elif isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
    else:
        raise TypeError(f"cannot decode an image from a {type(value).__name__}")
    if data is not None:
        return _open_rgb(io.BytesIO(data))
    if path:
        p = Path(path)
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if not p.exists():
            raise FileNotFoundError(f"image file {p} (referenced by the dataset) does not exist")
        return _open_rgb(p)
    return None


def _open_rgb(source) -> Image.Image:
    # Decode fully and detach from the file object: the returned image owns its pixels.
    with Image.open(source) as im:
        im.load()
        rgb = to_rgb(im)
        return rgb.copy() if rgb is im else rgb


class ReasoningDataset(Sequence[ReasoningExample]):
    """A lazy, read-only sequence of :class:`ReasoningExample` over a ``datasets.Dataset``.

    ``ds[i]`` converts row ``i`` (decoding its image) on every access; ``ds[a:b]`` returns a list;
    iteration streams the rows. ``hf`` is the underlying ``datasets.Dataset`` (image undecoded), and
    ``rows[i]`` the index of item ``i`` among the split's rows before any filtering. ``split_rows`` is the
    number of rows in the split before filtering and ``skipped`` counts the rows left out, by reason
    (``{"without an image": 12}``), so that ``len(ds) + sum(ds.skipped.values()) == ds.split_rows``.
    """

    def __init__(
        self,
        hf_dataset,
        convert: Callable[[Mapping[str, Any], int], ReasoningExample],
        *,
        name: str,
        split: str,
        shards: Sequence[Path],
        rows: Sequence[int] | None = None,
        split_rows: int | None = None,
        skipped: Mapping[str, int] | None = None,
    ) -> None:
        self.hf = hf_dataset
        self._convert = convert
        self.name = name
        self.split = split
        self.shards = list(shards)
        self.rows = list(range(len(hf_dataset))) if rows is None else list(rows)
        if len(self.rows) != len(hf_dataset):
            raise ValueError("rows must give one original row index per dataset row")
        self.skipped = {reason: int(n) for reason, n in (skipped or {}).items() if n}
        self.split_rows = len(self.rows) + sum(self.skipped.values()) if split_rows is None else int(split_rows)
        if self.split_rows != len(self.rows) + sum(self.skipped.values()):
            raise ValueError(f"{self.split_rows} split rows != {len(self.rows)} kept + skipped {self.skipped}")

    def __len__(self) -> int:
        return len(self.hf)

    @overload
    def __getitem__(self, index: int) -> ReasoningExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[ReasoningExample]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name} {self.split} with {n} rows")
        return self._convert(self.hf[i], self.rows[i])

    def __iter__(self) -> Iterator[ReasoningExample]:
        for row, original in zip(self.hf, self.rows, strict=True):
            yield self._convert(row, original)

    def __repr__(self) -> str:
        skipped = f", skipped={self.skipped}" if self.skipped else ""
        return f"ReasoningDataset(name={self.name!r}, split={self.split!r}, rows={len(self)}{skipped})"


def load_split(data_dir, split: str, *, dataset_name: str, name: str, columns: Sequence[str], row_to_example,
               require_image: bool = False, max_steps: int = 3, cache_dir=None) -> "ReasoningDataset":
    """Shared loader body: find ``<data_dir>/data/<split>-*.parquet``, check ``columns``, read with ``datasets``,
    optionally keep only rows with an image (the others counted in ``skipped["without an image"]``), and
    convert rows lazily with ``row_to_example(row, row_index, split=, base_dir=, max_steps=)``."""
    import functools

    shards = find_split_shards(data_dir, split, dataset_name)
    check_columns(shards, columns, dataset_name)
    ds = read_parquet_split(shards, split, cache_dir)
    split_rows = len(ds)
    rows = None
    skipped = {}
    if require_image:
        rows = rows_with_image(ds)
        ds = ds.select(rows)
        skipped[SKIPPED_NO_IMAGE] = split_rows - len(rows)
    convert = functools.partial(row_to_example, split=split, base_dir=Path(data_dir).expanduser(),
                                max_steps=max_steps)
    return ReasoningDataset(ds, convert, name=name, split=split, shards=shards, rows=rows, split_rows=split_rows,
                            skipped=skipped)
