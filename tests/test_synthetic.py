"""The synthetic grid task: answers checked by an independent solver that reads the rendered pixels."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from lvr_engine.data.example import ReasoningExample
from lvr_engine.data.synthetic import (
    GridLayout,
    image_token_boxes,
    make_synthetic_dataset,
    make_synthetic_example,
    render_grid,
    task_corpus,
    tokens_in_box,
)

GRID = 4

# ---------------------------------------------------------------------------------------------
# independent pixel solver: knows only "4x4 grid on a white canvas, flat colours", nothing of the
# generator's palette constants or layout.


def _color_name(rgb) -> str:
    r, g, b = (int(x) for x in rgb)
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > 100 and r < 100 and b < 120:
        return "green"
    if b > 150 and r < 100 and g < 150:
        return "blue"
    raise AssertionError(f"unclassifiable colour {rgb}")


def _shape_name(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = box.shape
    fill = box.sum() / (h * w)
    if fill > 0.93:
        return "square"
    if 0.72 < fill < 0.88:
        return "circle"
    top, bottom = box[0].sum() / w, box[-1].sum() / w
    if bottom > 0.8 and top < 0.3:
        return "triangle"
    if 0.2 < bottom < 0.6 and 0.2 < top < 0.6:
        return "cross"
    raise AssertionError(f"unclassifiable shape: fill {fill:.2f}, top {top:.2f}, bottom {bottom:.2f}")


def read_board(image, grid: int = GRID) -> dict:
    arr = np.asarray(image.convert("RGB")).astype(int)
    H, W, _ = arr.shape
    ch, cw = H // grid, W // grid
    board = {}
    for r in range(grid):
        for c in range(grid):
            cell = arr[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
            mask = np.abs(cell - 255).sum(-1) > 60
            if mask.sum() < 30:
                continue
            # the shape must not touch the cell border (cells are separable)
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            med = np.median(cell[mask], axis=0)
            board[(r, c)] = (_shape_name(mask), _color_name(med))
    return board


def _singular(plural: str) -> str:
    return plural[:-2] if plural.endswith("sses") else plural[:-1]


def solve(image, question: str, choices: list[str]) -> int:
    return solve_board(read_board(image), question, choices)


def asked_cells(board: dict, question: str, grid: int = GRID) -> tuple[tuple, set]:
    """(anchor cell, the cells the question is about) on a board read from pixels."""
    def find(color, shape):
        hits = [rc for rc, v in board.items() if v == (shape, color)]
        assert len(hits) == 1, f"anchor {color} {shape} appears {len(hits)} times"
        return hits[0]

    if m := re.fullmatch(r"Find the (\w+) (\w+)\. How many other shapes are in its (row|column)\?", question):
        ar, ac = find(m[1], m[2])
        line = [(ar, c) for c in range(grid)] if m[3] == "row" else [(r, ac) for r in range(grid)]
        return (ar, ac), {rc for rc in line if rc in board and rc != (ar, ac)}
    if m := re.fullmatch(r"What color is the shape directly right of the (\w+) (\w+)\?", question):
        ar, ac = find(m[1], m[2])
        return (ar, ac), {(ar, ac + 1)}
    if m := re.fullmatch(r"What shape is directly below the (\w+) (\w+)\?", question):
        ar, ac = find(m[1], m[2])
        return (ar, ac), {(ar + 1, ac)}
    if m := re.fullmatch(r"Are there more (\w+) left or right of the (\w+) (\w+)\?", question):
        shape = _singular(m[1])
        ar, ac = find(m[2], m[3])
        return (ar, ac), {(r, c) for (r, c), v in board.items() if c != ac and v[0] == shape}
    raise AssertionError(f"unparsed question {question!r}")


def solve_board(board: dict, question: str, choices: list[str], grid: int = GRID) -> int:
    def find(color, shape):
        hits = [rc for rc, v in board.items() if v == (shape, color)]
        assert len(hits) == 1, f"anchor {color} {shape} appears {len(hits)} times"
        return hits[0]

    if m := re.fullmatch(r"Find the (\w+) (\w+)\. How many other shapes are in its (row|column)\?", question):
        ar, ac = find(m[1], m[2])
        if m[3] == "row":
            n = sum((ar, c) in board for c in range(grid) if c != ac)
        else:
            n = sum((r, ac) in board for r in range(grid) if r != ar)
        return choices.index(str(n))
    if m := re.fullmatch(r"What color is the shape directly right of the (\w+) (\w+)\?", question):
        ar, ac = find(m[1], m[2])
        return choices.index(board[(ar, ac + 1)][1])
    if m := re.fullmatch(r"What shape is directly below the (\w+) (\w+)\?", question):
        ar, ac = find(m[1], m[2])
        return choices.index(board[(ar + 1, ac)][0])
    if m := re.fullmatch(r"Are there more (\w+) left or right of the (\w+) (\w+)\?", question):
        shape = _singular(m[1])
        ar, ac = find(m[2], m[3])
        nl = sum(1 for (r, c), v in board.items() if c < ac and v[0] == shape)
        nr = sum(1 for (r, c), v in board.items() if c > ac and v[0] == shape)
        word = "none" if nl == nr == 0 else "equal" if nl == nr else "left" if nl > nr else "right"
        return choices.index(word)
    raise AssertionError(f"unparsed question {question!r}")


def read_helper(image, grid: int) -> tuple[dict, dict]:
    """A helper image read from its pixels: (board of the chromatic shapes, {cell: "grey" | "black"} for the
    framed cells). A frame is the cell's outermost ring of pixels in one achromatic colour; achromatic pixels
    may appear nowhere but in a band along the cell's edge."""
    arr = np.asarray(image.convert("RGB")).astype(int)
    H, W, _ = arr.shape
    ch, cw = H // grid, W // grid
    board, frames = {}, {}
    for r in range(grid):
        for c in range(grid):
            cell = arr[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
            spread = cell.max(-1) - cell.min(-1)
            white = (cell > 235).all(-1)
            achromatic = ~white & (spread < 30)
            ring = np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]])
            if (np.abs(ring - 128) < 20).all():
                frames[(r, c)] = "grey"
            elif (ring < 40).all():
                frames[(r, c)] = "black"
            else:
                assert not achromatic.any(), f"stray frame pixels in unframed cell {(r, c)}"
            band = max(2, ch // 8)
            inner = achromatic[band:-band, band:-band]
            assert not inner.any(), f"frame pixels inside cell {(r, c)}"
            mask = ~white & (spread >= 30)
            if mask.sum() < 30:
                continue
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            board[(r, c)] = (_shape_name(mask), _color_name(np.median(cell[mask], axis=0)))
    return board, frames


_CAPTION = re.compile(r"Imagined board: the (\w+) (\w+) in row (\d), column (\d); marked: (.*)\.")
_MARKED = re.compile(r"an? (\w+) (\w+) in row (\d), column (\d)")


def read_caption(text: str) -> tuple[tuple, dict, dict]:
    """(anchor cell, anchor (shape, colour), {marked cell: (shape, colour)}) parsed from a caption."""
    m = _CAPTION.fullmatch(text)
    assert m, text
    marked = {}
    if m[5] != "nothing":
        items = _MARKED.findall(m[5])
        assert items, text
        rebuilt = [f"a {a} {b} in row {r}, column {c}" for a, b, r, c in items]
        assert m[5] == (rebuilt[0] if len(rebuilt) == 1 else ", ".join(rebuilt[:-1]) + " and " + rebuilt[-1]), text
        marked = {(int(r) - 1, int(c) - 1): (b, a) for a, b, r, c in items}
    return (int(m[3]) - 1, int(m[4]) - 1), (m[2], m[1]), marked


def check_helper_and_caption(ex, grid: int) -> None:
    """The helper image and the caption of ``ex`` say what the question needs, checked from the pixels of the
    image: the anchor alone framed grey where it is on the image, exactly the asked-about cells framed black,
    with the image's shapes, nothing else drawn; solving the question on the helper board gives the gold answer;
    the caption names the same cells and shapes."""
    board = read_board(ex.image, grid)
    anchor, asked = asked_cells(board, ex.question, grid)
    hboard, frames = read_helper(ex.metadata["helper_image"], grid)
    assert frames == {anchor: "grey", **{rc: "black" for rc in asked}}, (ex.id, frames, anchor, asked)
    assert hboard == {rc: board[rc] for rc in [anchor, *asked]}, ex.id
    assert solve_board(hboard, ex.question, ex.choices, grid) == ex.answer_index, ex.id
    c_anchor, c_item, c_marked = read_caption(ex.metadata["caption"])
    assert (c_anchor, c_item) == (anchor, board[anchor]), ex.metadata["caption"]
    assert c_marked == {rc: board[rc] for rc in asked}, ex.metadata["caption"]


def _key(ex) -> str:
    return hashlib.sha1(ex.image.tobytes() + ex.question.encode()).hexdigest()


@pytest.fixture(scope="module")
def train():
    return make_synthetic_dataset(400, seed=0, split="train")


@pytest.fixture(scope="module")
def test_split():
    return make_synthetic_dataset(200, seed=0, split="test")


# ---------------------------------------------------------------------------------------------


def test_fields(train):
    for ex in train[:50]:
        assert isinstance(ex, ReasoningExample)
        assert ex.image.size == (224, 224) and ex.image.mode == "RGB"
        assert len(ex.choices) == 4 and ex.answer in "ABCD"
        assert ex.answer == "ABCD"[ex.answer_index]
        assert ex.context == ""
        assert len(ex.steps) == 3 and all(s.endswith(".") for s in ex.steps)
        assert ex.metadata["dataset"] == "synthetic" and isinstance(ex.metadata["layout"], GridLayout)
    assert len({ex.id for ex in train}) == len(train)
    assert {ex.metadata["qtype"] for ex in train} == {
        "count_row", "count_col", "right_color", "below_shape", "compare_sides"}


def test_answers_correct_from_pixels(train, test_split):
    for ex in list(train) + list(test_split):
        assert solve(ex.image, ex.question, ex.choices) == ex.answer_index, (ex.id, ex.question, ex.steps)


def test_rationale_matches_pixels(train):
    # step 1 locates the anchor where the pixels put it; the last step states the answer
    for ex in train[:100]:
        board = read_board(ex.image)
        m = re.fullmatch(r"The (\w+) (\w+) is in row (\d), column (\d)\.", ex.steps[0])
        assert m, ex.steps[0]
        assert board[(int(m[3]) - 1, int(m[4]) - 1)] == (m[2], m[1])
        qtype = ex.metadata["qtype"]
        if qtype != "compare_sides":
            assert ex.answer_text in re.findall(r"\w+", ex.steps[2])


def test_layout_metadata_renders_the_image(train):
    for ex in train[:20]:
        layout = ex.metadata["layout"]
        img, again = render_grid(layout.cells, grid=layout.grid, canvas=layout.canvas)
        assert img.tobytes() == ex.image.tobytes() and again == layout
        assert layout.cells == read_board(ex.image)  # the metadata tells the truth
        r, c = ex.metadata["anchor_cell"]
        assert f"row {r + 1}, column {c + 1}" in ex.steps[0]


def test_deterministic_by_seed():
    a = make_synthetic_dataset(24, seed=7)
    b = make_synthetic_dataset(24, seed=7)
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.question, x.choices, x.answer, x.steps) == (y.id, y.question, y.choices, y.answer, y.steps)
        assert x.image.tobytes() == y.image.tobytes()
    # a prefix of a longer dataset is the shorter dataset
    longer = make_synthetic_dataset(40, seed=7)
    assert [_key(x) for x in a] == [_key(x) for x in longer[:24]]
    assert _key(make_synthetic_example(5, seed=7)) == _key(a[5])
    # another seed gives other examples
    other = make_synthetic_dataset(24, seed=8)
    assert sum(_key(x) == _key(y) for x, y in zip(a, other, strict=True)) == 0


def test_splits_disjoint(train, test_split):
    tr = {_key(x) for x in train}
    te = {_key(x) for x in test_split}
    assert not tr & te
    val = {_key(x) for x in make_synthetic_dataset(100, seed=0, split="val")}
    assert not val & tr and not val & te
    # disjoint even across seeds
    assert not {_key(x) for x in make_synthetic_dataset(100, seed=1, split="test")} & tr
    with pytest.raises(ValueError):
        make_synthetic_dataset(1, split="dev")


def test_answer_letters_balanced(train):
    counts = Counter(ex.answer for ex in train)
    assert counts == {"A": 100, "B": 100, "C": 100, "D": 100}  # exact in every block of four
    by_type = defaultdict(Counter)
    for ex in train:
        by_type[ex.metadata["qtype"]][ex.answer] += 1
    for qtype, c in by_type.items():
        n = sum(c.values())
        assert len(c) == 4 and max(c.values()) / n < 0.45, (qtype, c)


def test_question_text_does_not_determine_answer(train, test_split):
    # the same question text gets different answers on different images ...
    answers = defaultdict(set)
    for ex in train:
        answers[ex.question].add(ex.answer)
    repeated = [q for q in answers if sum(ex.question == q for ex in train) >= 4]
    assert repeated, "expected repeated questions"
    assert np.mean([len(answers[q]) > 1 for q in repeated]) > 0.9
    # ... and a text-only guesser (majority answer per question / per template) stays near chance
    big = make_synthetic_dataset(1200, seed=0, split="train")
    per_q, per_t = defaultdict(Counter), defaultdict(Counter)
    for ex in big:
        per_q[ex.question][ex.answer] += 1
        per_t[ex.metadata["qtype"]][ex.answer] += 1
    acc_q = np.mean([per_q[ex.question].most_common(1)[0][0] == ex.answer if ex.question in per_q else False
                     for ex in test_split])
    acc_t = np.mean([per_t[ex.metadata["qtype"]].most_common(1)[0][0] == ex.answer for ex in test_split])
    assert acc_q < 0.4 and acc_t < 0.4, (acc_q, acc_t)


def test_image_token_geometry():
    boxes = image_token_boxes((1, 16, 16))  # image_grid_thw of a 224 x 224 image
    assert len(boxes) == 64
    assert boxes[0] == (0, 0, 28, 28) and boxes[9] == (28, 28, 56, 56) and boxes[63] == (196, 196, 224, 224)
    assert image_token_boxes((8, 8)) == boxes
    # scaled back onto a 448 x 448 original
    assert image_token_boxes((8, 8), image_size=(448, 448))[9] == (56, 56, 112, 112)
    assert tokens_in_box((0, 0, 224, 224), (8, 8)) == list(range(64))
    ex = make_synthetic_example(0)
    layout = ex.metadata["layout"]
    assert layout.cell_tokens(0, 0) == [0, 1, 8, 9]
    assert layout.cell_tokens(3, 3) == [54, 55, 62, 63]
    cover = sorted(t for r in range(4) for c in range(4) for t in layout.cell_tokens(r, c))
    assert cover == list(range(64))  # each cell is exactly 4 tokens, no overlaps
    # a 112 x 112 canvas: 16 tokens, one per cell
    small = make_synthetic_example(0, canvas=112).metadata["layout"]
    assert small.cell_tokens(1, 2) == [6]


def test_small_canvas_and_qtype_filter():
    ds = make_synthetic_dataset(40, seed=3, canvas=112, qtypes=("right_color",))
    assert all(ex.image.size == (112, 112) and ex.metadata["qtype"] == "right_color" for ex in ds)
    for ex in ds:
        assert solve(ex.image, ex.question, ex.choices) == ex.answer_index


def test_corpus_covers_vocabulary(train):
    corpus = " ".join(task_corpus())
    words = set(re.findall(r"[A-Za-z]+", corpus))
    for ex in train[:100]:
        for text in [ex.question, *ex.steps, *ex.choices]:
            assert set(re.findall(r"[A-Za-z]+", text)) <= words


def test_helper_images_and_captions(train):
    for ex in train[:200]:
        check_helper_and_caption(ex, GRID)
    assert {ex.metadata["qtype"] for ex in train[:200]} == {
        "count_row", "count_col", "right_color", "below_shape", "compare_sides"}
    # a count of 0 is "marked: nothing." and a helper image with the anchor alone
    empty = [ex for ex in train if ex.metadata["qtype"].startswith("count") and ex.answer == "A"]
    assert empty and all(ex.metadata["caption"].endswith("marked: nothing.") for ex in empty)


def test_helper_images_and_captions_demo_size():
    # the demo's boards: 3 x 3 cells of 28 px (one image token per cell), two question types
    for split in ("train", "test"):
        for ex in make_synthetic_dataset(150, seed=1, split=split, grid=3, canvas=84, fill=0.2,
                                         qtypes=("right_color", "below_shape")):
            check_helper_and_caption(ex, 3)


def test_helper_checker_catches_mistakes():
    """The checks above fail on a wrong helper image or caption."""
    import dataclasses

    from lvr_engine.data.synthetic import render_helper

    ex = make_synthetic_example(3, seed=0, grid=3, canvas=84, fill=0.2, qtypes=("below_shape",))
    layout = ex.metadata["layout"]
    ar, ac = ex.metadata["anchor_cell"]
    wrong_cell = (ar, (ac + 1) % 3)   # a cell beside the anchor instead of below it
    bad = [dict(ex.metadata, helper_image=render_helper(layout, (ar, ac), [wrong_cell])),
           dict(ex.metadata, helper_image=render_helper(layout, (ar, ac), [])),
           dict(ex.metadata, caption=ex.metadata["caption"].replace(f"row {ar + 2}", f"row {ar + 1}")),
           dict(ex.metadata, caption=ex.metadata["caption"].replace("marked: a", "marked: the"))]
    check_helper_and_caption(ex, 3)
    for md in bad:
        with pytest.raises(AssertionError):
            check_helper_and_caption(dataclasses.replace(ex, metadata=md), 3)


def test_corpus_covers_captions(train):
    words = set(re.findall(r"[A-Za-z]+", " ".join(task_corpus())))
    for ex in train[:100]:
        assert set(re.findall(r"[A-Za-z]+", ex.metadata["caption"])) <= words
