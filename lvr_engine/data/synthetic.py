"""Synthetic multi-step visual reasoning task for the CPU demo.

Each image is a ``grid x grid`` board (default 4 x 4 cells on a 224 x 224 white canvas) of flat
coloured shapes, some cells empty. Each question names an *anchor* shape (unique in the image by
colour and shape) and asks about something relative to it, so answering takes 2-3 visual steps:
locate the anchor, inspect / count relative to it, conclude.

Question types (``metadata["qtype"]``):

- ``count_row`` / ``count_col``: "Find the red circle. How many other shapes are in its row?"
  choices ``0 1 2 3``;
- ``right_color``: "What color is the shape directly right of the blue square?" choices: the colours;
- ``below_shape``: "What shape is directly below the green triangle?" choices: the shapes;
- ``compare_sides``: "Are there more crosses left or right of the yellow circle?" choices
  ``left right equal none`` (columns strictly left / right of the anchor's column; ``equal`` needs at
  least one on each side, ``none`` means none on either side).

The target answer index is drawn first (exactly balanced over A-D in every block of four examples)
and the board is built to satisfy it, so the question text never determines the answer: the same
template gets every answer across images.

Geometry: with the Qwen2-VL processor (patch 14, spatial merge 2) a 224 x 224 image is an 8 x 8 grid
of merged 28 x 28 patches = 64 image tokens, raster order; each 56 x 56 cell is exactly 2 x 2 = 4
tokens. :func:`image_token_boxes` maps image-token index -> pixel box, :meth:`GridLayout.cell_tokens`
maps a cell -> its token indices (for selection heat maps). Each example's ``metadata`` holds
``layout`` (:class:`GridLayout`), ``anchor_cell`` and ``inspected_cells`` (the cells step 2 looks at),
``qtype``, ``helper_image`` and ``caption`` (below), plus ``dataset="synthetic"``, ``split``, ``row``, ``seed``.

Helper image and imagination caption (Mirage's and CapImagine's inputs), in ``metadata["helper_image"]`` and
``metadata["caption"]``: the *imagined intermediate state* of the question. :func:`render_helper` draws the same
board with every shape erased but the anchor and the cells the question is about (``inspected_cells``); the
anchor's cell gets a grey frame, each asked-about cell a black frame (neither colour is in the palette, and
frames stay clear of the shapes). :func:`imagination_caption` says the same in words, e.g. "Imagined board: the
red square in row 1, column 2; marked: a blue circle in row 2, column 2." ("marked: nothing." when the question
is about no shape, e.g. a count of 0). Both are built from the board the image was drawn from, so they are
correct by construction; tests/test_synthetic.py checks them against an independent pixel solver.

Determinism: example ``i`` of ``(seed, split)`` depends only on ``(seed, split, i)`` (a prefix of a
larger dataset equals the smaller one). Splits are disjoint by construction: every example's content
key (board + question) hashes into one bucket per split, and the generator redraws until it lands in
its split's bucket, so train and test can never share an example, whatever the seeds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from lvr_engine.data.example import ReasoningExample

__all__ = [
    "COLORS",
    "SHAPES",
    "LETTERS",
    "QTYPES",
    "SPLITS",
    "GridLayout",
    "ReasoningExample",
    "render_grid",
    "render_helper",
    "imagination_caption",
    "make_synthetic_example",
    "make_synthetic_dataset",
    "image_token_boxes",
    "image_token_grid",
    "tokens_in_box",
    "task_corpus",
]

# --------------------------------------------------------------------------------------------------
# vocabulary (small and regular: the tiny model's tokenizer is trained on it)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COUNT_CHOICES = ("0", "1", "2", "3")
SIDE_CHOICES = ("left", "right", "equal", "none")
LETTERS = ("A", "B", "C", "D")
QTYPES = ("count_row", "count_col", "right_color", "below_shape", "compare_sides")
SPLITS = ("train", "val", "test")
BACKGROUND = (255, 255, 255)

_COLOR_NAMES = tuple(COLORS)


# --------------------------------------------------------------------------------------------------
# board + rendering


@dataclass(frozen=True)
class GridLayout:
    """Where everything is: ``cells[(row, col)] = (shape, color)`` for the non-empty cells (0-based)."""

    grid: int
    canvas: int
    cells: dict

    @property
    def cell_size(self) -> int:
        return self.canvas // self.grid

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a cell."""
        s = self.cell_size
        return (col * s, row * s, (col + 1) * s, (row + 1) * s)

    def cell_tokens(self, row: int, col: int, grid_hw: tuple[int, int] | None = None,
                    patch_size: int = 14, merge_size: int = 2) -> list[int]:
        """Image-token indices (raster order) whose 28 x 28 box overlaps the cell."""
        if grid_hw is None:
            side = self.canvas // (patch_size * merge_size)
            grid_hw = (side, side)
        return tokens_in_box(self.cell_box(row, col), grid_hw, patch_size=patch_size,
                             merge_size=merge_size, image_size=(self.canvas, self.canvas))

    def at(self, row: int, col: int):
        return self.cells.get((row, col))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box  # inclusive drawing box
    w = x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    elif shape == "cross":
        t = w // 3
        draw.rectangle((x0 + t, y0, x1 - t, y1), fill=rgb)
        draw.rectangle((x0, y0 + t, x1, y1 - t), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_grid(cells: dict, *, grid: int = 4, canvas: int = 224) -> tuple[Image.Image, GridLayout]:
    """Draw a board. ``cells`` maps ``(row, col)`` -> ``(shape, color)``; returns (RGB image, layout).

    Shapes are flat-filled (no anti-aliasing) and centred in their cell with a margin of ~18 % of the
    cell on each side, so every pixel is either the background or exactly one palette colour.
    """
    s = canvas // grid
    if s * grid != canvas:
        raise ValueError(f"canvas {canvas} is not a multiple of grid {grid}")
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    m = max(2, round(s * 0.18))
    for (r, c), (shape, color) in sorted(cells.items()):
        if not (0 <= r < grid and 0 <= c < grid):
            raise ValueError(f"cell {(r, c)} outside a {grid}x{grid} grid")
        box = (c * s + m, r * s + m, (c + 1) * s - 1 - m, (r + 1) * s - 1 - m)
        _draw_shape(draw, shape, box, COLORS[color])
    return img, GridLayout(grid=grid, canvas=canvas, cells=dict(cells))


ANCHOR_FRAME = (128, 128, 128)
"""Frame colour of the anchor's cell in a helper image."""
MARK_FRAME = (0, 0, 0)
"""Frame colour of each asked-about cell in a helper image."""


def render_helper(layout: GridLayout, anchor_cell: tuple[int, int],
                  inspected_cells: Sequence[tuple[int, int]]) -> Image.Image:
    """The helper image of a question (module docstring): ``layout``'s board with only the anchor and the
    ``inspected_cells`` kept, the anchor's cell framed grey and every inspected cell framed black. Frames are
    ``max(1, cell // 14)`` px wide along the inside of the cell's edge (the shapes keep a ~18 % margin)."""
    anchor_cell = tuple(anchor_cell)
    inspected = [tuple(rc) for rc in inspected_cells]
    if anchor_cell not in layout.cells:
        raise ValueError(f"anchor cell {anchor_cell} is empty")
    keep = {rc: layout.cells[rc] for rc in [anchor_cell, *inspected] if rc in layout.cells}
    image, _ = render_grid(keep, grid=layout.grid, canvas=layout.canvas)
    draw = ImageDraw.Draw(image)
    s = layout.cell_size
    w = max(1, s // 14)
    for rc, rgb in [(anchor_cell, ANCHOR_FRAME)] + [(rc, MARK_FRAME) for rc in inspected]:
        x0, y0, x1, y1 = layout.cell_box(*rc)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=w)
    return image


def imagination_caption(cells: dict, anchor_cell: tuple[int, int],
                        inspected_cells: Sequence[tuple[int, int]]) -> str:
    """The helper image in words (CapImagine's text-space imagination): the anchor and where it is, then every
    marked (asked-about) cell with its content, in raster order."""
    anchor_cell = tuple(anchor_cell)
    marked = sorted(tuple(rc) for rc in inspected_cells)
    head = f"Imagined board: the {_name(cells[anchor_cell])} in {_pos(*anchor_cell)}; marked: "
    if not marked:
        return head + "nothing."
    parts = [f"{_a(cells[rc])} in {_pos(*rc)}" for rc in marked]
    return head + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


# --------------------------------------------------------------------------------------------------
# image token <-> pixel geometry (Qwen2-VL: raster order of merged patch_size*merge_size patches)


def image_token_grid(image_grid_thw: Sequence[int], merge_size: int = 2) -> tuple[int, int]:
    """``(rows, cols)`` of image tokens for one image's ``image_grid_thw = (t, h, w)`` (in patches)."""
    t, h, w = (int(x) for x in image_grid_thw)
    if t != 1:
        raise ValueError("only still images (t == 1) are supported")
    return h // merge_size, w // merge_size


def image_token_boxes(grid_hw: Sequence[int], *, patch_size: int = 14, merge_size: int = 2,
                      image_size: tuple[int, int] | None = None) -> list[tuple[float, float, float, float]]:
    """Pixel box ``(x0, y0, x1, y1)`` of every image token, index = raster order of merged patches.

    ``grid_hw``: ``(rows, cols)`` of image tokens, or a 3-element ``image_grid_thw`` (in patches).
    Boxes are in the processor's resized image; pass the original ``image_size=(width, height)`` to
    scale them back onto the original image.
    """
    if len(grid_hw) == 3:
        rows, cols = image_token_grid(grid_hw, merge_size)
    else:
        rows, cols = (int(x) for x in grid_hw)
    side = patch_size * merge_size
    sx = sy = 1.0
    if image_size is not None:
        sx = image_size[0] / (cols * side)
        sy = image_size[1] / (rows * side)
    boxes = []
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        boxes.append((c * side * sx, r * side * sy, (c + 1) * side * sx, (r + 1) * side * sy))
    return boxes


def tokens_in_box(box: Sequence[float], grid_hw: Sequence[int], *, patch_size: int = 14,
                  merge_size: int = 2, image_size: tuple[int, int] | None = None) -> list[int]:
    """Indices of the image tokens whose pixel box overlaps ``box`` (x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    out = []
    for i, (a0, b0, a1, b1) in enumerate(image_token_boxes(grid_hw, patch_size=patch_size,
                                                           merge_size=merge_size, image_size=image_size)):
        if a0 < x1 and x0 < a1 and b0 < y1 and y0 < b1:
            out.append(i)
    return out


# --------------------------------------------------------------------------------------------------
# generation


def _pos(r: int, c: int) -> str:
    return f"row {r + 1}, column {c + 1}"


def _name(cell) -> str:
    shape, color = cell
    return f"{color} {shape}"


def _a(cell) -> str:
    return f"a {_name(cell)}"


def _listing(cells: list) -> str:
    names = [_a(x) for x in cells]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _count_phrase(n: int, shape: str) -> str:
    return f"{n} {shape if n == 1 else PLURAL[shape]}"


class _Gen:
    """One example's board construction, given its rng and the target answer index."""

    def __init__(self, rng: np.random.Generator, grid: int, fill: float):
        self.rng = rng
        self.grid = grid
        self.fill = fill

    def rand_item(self, *, shape=None, color=None, avoid=(), shapes=SHAPES):
        while True:
            item = (shape or shapes[self.rng.integers(len(shapes))],
                    color or _COLOR_NAMES[self.rng.integers(len(_COLOR_NAMES))])
            if item not in avoid:
                return item

    def fill_rest(self, cells: dict, free: Iterable[tuple[int, int]], anchor, shapes=SHAPES) -> None:
        for rc in free:
            if rc not in cells and self.rng.random() < self.fill:
                cells[rc] = self.rand_item(avoid=(anchor,), shapes=shapes)

    def all_cells(self):
        return [(r, c) for r in range(self.grid) for c in range(self.grid)]

    def pick(self, seq, k):
        idx = self.rng.choice(len(seq), size=k, replace=False)
        return [seq[i] for i in sorted(idx)]

    # ---------------------------------------------------------------------------- question types
    def count(self, ans: int, axis: str):
        g = self.grid
        anchor = self.rand_item()
        ar, ac = int(self.rng.integers(g)), int(self.rng.integers(g))
        cells = {(ar, ac): anchor}
        line = [(ar, c) for c in range(g) if c != ac] if axis == "row" else [(r, ac) for r in range(g) if r != ar]
        for rc in self.pick(line, ans):
            cells[rc] = self.rand_item(avoid=(anchor,))
        self.fill_rest(cells, [rc for rc in self.all_cells() if rc not in line], anchor)
        others = [cells[rc] for rc in line if rc in cells]
        word = "row" if axis == "row" else "column"
        q = f"Find the {_name(anchor)}. How many other shapes are in its {word}?"
        s1 = f"The {_name(anchor)} is in {_pos(ar, ac)}."
        s2 = (f"Its {word} also has {_listing(others)}." if others else f"Its {word} has no other shapes.")
        s3 = f"So there are {len(others)} other shapes in its {word}."
        return cells, (ar, ac), q, list(COUNT_CHOICES), [s1, s2, s3], [rc for rc in line if rc in cells]

    def right_color(self, ans: int):
        g = self.grid
        anchor = self.rand_item()
        ar, ac = int(self.rng.integers(g)), int(self.rng.integers(g - 1))
        target = self.rand_item(color=_COLOR_NAMES[ans], avoid=(anchor,))
        cells = {(ar, ac): anchor, (ar, ac + 1): target}
        self.fill_rest(cells, self.all_cells(), anchor)
        q = f"What color is the shape directly right of the {_name(anchor)}?"
        s1 = f"The {_name(anchor)} is in {_pos(ar, ac)}."
        s2 = f"Directly right of it, in {_pos(ar, ac + 1)}, is {_a(target)}."
        s3 = f"So the color is {target[1]}."
        return cells, (ar, ac), q, list(_COLOR_NAMES), [s1, s2, s3], [(ar, ac + 1)]

    def below_shape(self, ans: int):
        g = self.grid
        anchor = self.rand_item()
        ar, ac = int(self.rng.integers(g - 1)), int(self.rng.integers(g))
        target = self.rand_item(shape=SHAPES[ans], avoid=(anchor,))
        cells = {(ar, ac): anchor, (ar + 1, ac): target}
        self.fill_rest(cells, self.all_cells(), anchor)
        q = f"What shape is directly below the {_name(anchor)}?"
        s1 = f"The {_name(anchor)} is in {_pos(ar, ac)}."
        s2 = f"Directly below it, in {_pos(ar + 1, ac)}, is {_a(target)}."
        s3 = f"So the shape is a {target[0]}."
        return cells, (ar, ac), q, list(SHAPES), [s1, s2, s3], [(ar + 1, ac)]

    def compare_sides(self, ans: int):
        g = self.grid
        rng = self.rng
        anchor = self.rand_item()
        counted = SHAPES[rng.integers(len(SHAPES))]
        ar, ac = int(rng.integers(g)), int(rng.integers(1, g - 1))
        left = [(r, c) for r in range(g) for c in range(ac)]
        right = [(r, c) for r in range(g) for c in range(ac + 1, g)]
        cap = min(3, len(left), len(right))
        side = SIDE_CHOICES[ans]
        if side == "left":
            nl = int(rng.integers(1, cap + 1))
            nr = int(rng.integers(0, nl))
        elif side == "right":
            nr = int(rng.integers(1, cap + 1))
            nl = int(rng.integers(0, nr))
        elif side == "equal":
            nl = nr = int(rng.integers(1, cap + 1))
        else:
            nl = nr = 0
        cells = {(ar, ac): anchor}
        for region, n in ((left, nl), (right, nr)):
            for rc in self.pick(region, n):
                cells[rc] = self.rand_item(shape=counted, avoid=(anchor,))
        others = [s for s in SHAPES if s != counted]
        self.fill_rest(cells, left + right, anchor, shapes=others)
        self.fill_rest(cells, [(r, ac) for r in range(g)], anchor)  # anchor column: anything
        q = f"Are there more {PLURAL[counted]} left or right of the {_name(anchor)}?"
        s1 = f"The {_name(anchor)} is in {_pos(ar, ac)}."
        s2 = (f"Left of its column there are {_count_phrase(nl, counted)} "
              f"and right of it there are {_count_phrase(nr, counted)}.")
        s3 = {"left": "So there are more on the left.", "right": "So there are more on the right.",
              "equal": "So both sides have the same number.",
              "none": f"So there are no {PLURAL[counted]} on either side."}[side]
        inspected = [rc for rc in left + right if rc in cells and cells[rc][0] == counted]
        return cells, (ar, ac), q, list(SIDE_CHOICES), [s1, s2, s3], inspected


def _stream(seed: int, split: str, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split) + 1, *key]))


def _content_bucket(cells: dict, question: str) -> int:
    key = repr((sorted(cells.items()), question)).encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "little") % len(SPLITS)


def _spec(i: int, seed: int, split: str, grid: int, fill: float, qtypes: Sequence[str]) -> dict:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # answer index: a fresh permutation of A-D for every block of four examples (exact balance)
    ans = int(_stream(seed, split, 0, i // 4).permutation(4)[i % 4])
    rng = _stream(seed, split, 1, i)
    qtype = qtypes[int(rng.integers(len(qtypes)))]
    bucket = SPLITS.index(split)
    for _attempt in range(1000):
        gen = _Gen(rng, grid, fill)
        if qtype == "count_row":
            out = gen.count(ans, "row")
        elif qtype == "count_col":
            out = gen.count(ans, "col")
        elif qtype == "right_color":
            out = gen.right_color(ans)
        elif qtype == "below_shape":
            out = gen.below_shape(ans)
        elif qtype == "compare_sides":
            out = gen.compare_sides(ans)
        else:
            raise ValueError(f"unknown question type {qtype!r}; known: {QTYPES}")
        cells, anchor, q, choices, steps, inspected = out
        if _content_bucket(cells, q) == bucket:
            break
    else:  # pragma: no cover - probability 3^-1000
        raise RuntimeError("could not draw an example for this split")
    return dict(id=f"synth-{split}-{seed}-{i}", cells=cells, anchor=anchor, question=q, choices=choices,
                answer_index=ans, steps=steps, qtype=qtype, inspected=inspected)


def make_synthetic_example(i: int, seed: int = 0, split: str = "train", *, grid: int = 4, canvas: int = 224,
                           fill: float = 0.5, qtypes: Sequence[str] = QTYPES) -> ReasoningExample:
    """Example ``i`` of the ``(seed, split)`` stream (see module docstring)."""
    sp = _spec(i, seed, split, grid, fill, qtypes)
    image, layout = render_grid(sp["cells"], grid=grid, canvas=canvas)
    helper = render_helper(layout, sp["anchor"], sp["inspected"])
    ai = sp["answer_index"]
    return ReasoningExample(
        id=sp["id"], image=image, question=sp["question"], choices=sp["choices"], answer=LETTERS[ai],
        answer_index=ai, steps=sp["steps"], context="",
        metadata={"dataset": "synthetic", "split": split, "row": int(i), "seed": int(seed),
                  "qtype": sp["qtype"], "layout": layout, "anchor_cell": sp["anchor"],
                  "inspected_cells": sp["inspected"], "helper_image": helper,
                  "caption": imagination_caption(sp["cells"], sp["anchor"], sp["inspected"])},
        rationale=" ".join(sp["steps"]),
    )


def make_synthetic_dataset(n: int, seed: int = 0, split: str = "train", *, grid: int = 4, canvas: int = 224,
                           fill: float = 0.5, qtypes: Sequence[str] = QTYPES) -> list[ReasoningExample]:
    """``n`` examples of the synthetic grid task; deterministic in ``(seed, split)``, splits disjoint.

    ``canvas=224`` gives 64 image tokens per image with the Qwen2-VL processor (4 per cell on a 4 x 4
    grid); ``canvas=112`` gives 16. ``fill`` is the probability that a free cell holds a shape.
    ``qtypes`` restricts the question types (default: all of :data:`QTYPES`).
    """
    return [make_synthetic_example(i, seed, split, grid=grid, canvas=canvas, fill=fill, qtypes=qtypes)
            for i in range(int(n))]


# --------------------------------------------------------------------------------------------------
# tokenizer corpus


def _formatted(sp: dict) -> str:
    """The example as the trainer will see it (the project's default prompt + target format)."""
    try:
        from lvr_engine.data.prompts import format_prompt, format_target
    except ImportError:  # pragma: no cover
        return ""
    ai = sp["answer_index"]
    ex = ReasoningExample(id=sp["id"], image=None, question=sp["question"], choices=sp["choices"],
                          answer=LETTERS[ai], answer_index=ai, steps=sp["steps"])
    try:
        target = format_target(ex)
        target = getattr(target, "text", target)
        return format_prompt(ex) + (target if isinstance(target, str) else "")
    except Exception:  # pragma: no cover - the corpus only needs the words
        return format_prompt(ex)


def task_corpus(n_examples: int = 300, seed: int = 0) -> list[str]:
    """Text covering the task's whole vocabulary (questions, choices, rationales, prompt scaffolding),
    for training the tiny model's tokenizer. Builds no images."""
    lines: list[str] = []
    for i in range(n_examples):
        sp = _spec(i, seed, "train", 4, 0.5, QTYPES)
        lines.append(sp["question"])
        lines.extend(sp["steps"])
        lines.append(imagination_caption(sp["cells"], sp["anchor"], sp["inspected"]))
        lines.append("\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(sp["choices"])))
        lines.append(_formatted(sp))
    for shape in SHAPES:
        for color in _COLOR_NAMES:
            lines.append(f"Find the {color} {shape}. The {color} {shape} is a {shape}. Two {PLURAL[shape]}.")
    for k in range(1, 10):
        lines.append(f"row {k}, column {k}. Step {k}: {k} {k}0 {k}{k}")
    lines += [f"The answer is {x}." for x in LETTERS]
    lines += [f"Answer: {x}" for x in LETTERS] + [f"({x})" for x in LETTERS]
    lines += [
        "Question: Options: Answer with the option's letter from the given choices directly.",
        "Context: Let's think step by step. Therefore, the answer is",
        "You are a helpful assistant.",
        "user assistant system",
        "Choices: Answer: Rationale: Solution: Because yes no true false",
        "0 1 2 3 4 5 6 7 8 9 10 , . ; : ? ! ' \" ( ) [ ] - + = / * < > |",
    ]
    return lines
