"""Fixtures in Mirage's data format, written by the tests: VSP maps drawn with PIL, jsonl rows as Mirage ships
them (image paths relative to the repository root that holds ``data/``)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

# cell value -> colour: start (1), goal (2), hole (-1), ice (0)
COLOURS = {1: (40, 90, 220), 2: (30, 170, 60), -1: (20, 20, 20), 0: (200, 230, 250)}

VSP_PROMPT = ("As a professional maze solver, find a safe path from the start to the goal.\n\nHere is the map: "
              "<image>\n\nPlease provide your action plan.\n The final answer MUST BE put in \\boxed{}.")


def draw_map(map_desc, path: Path, size: int = 84, mark: tuple[int, int] | None = None) -> Path:
    """A size x size PNG of ``map_desc``; ``mark`` (row, col) draws the player (a red disc) there."""
    n = len(map_desc)
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    cell = size / n
    for r, row in enumerate(map_desc):
        for c, v in enumerate(row):
            d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=COLOURS[v])
    if mark is not None:
        r, c = mark
        d.ellipse([c * cell + 3, r * cell + 3, (c + 1) * cell - 4, (r + 1) * cell - 4], fill=(230, 30, 30))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


MAPS = [
    ([[1, 0, 0], [-1, -1, 0], [2, 0, 0]], "R,R,D,D,L,L", (0, 2)),
    ([[0, 1, 0], [0, -1, 0], [0, 2, 0]], "L,D,D,R", (1, 0)),
    ([[2, 0, -1], [0, 0, 0], [-1, 0, 1]], "U,U,L,L", (1, 2)),
]


def write_vsp(root: Path, rows: int = 3, size: int = 84, placeholder: str = "mid") -> Path:
    """``root/data/vsp/{train,test}_direct.jsonl`` + maps under ``root/data/vsp/imgs``, paths written relative to
    ``root`` as Mirage's files are (``./data/vsp/imgs/...``). Train rows carry ``text_output`` (with
    ``<output_image>`` mid-target, at its start or absent: ``placeholder`` = "mid" / "start" / "none") and the
    helper image (the map with the player after the first moves); test rows have neither. Returns the data dir."""
    data = root / "data" / "vsp"
    train, test = [], []
    for i in range(rows):
        m, path, mid = MAPS[i % len(MAPS)]
        inp = draw_map(m, data / "imgs" / f"level3/{i}/map_step_0.png", size)
        helper = draw_map(m, data / "imgs" / f"level3/{i}/map_step_1.png", size, mark=mid)
        rel = lambda p: "./" + str(p.relative_to(root))  # noqa: E731
        answer = f"The answer is \\boxed{{{path}}}."
        out = {"mid": f"<think> first moves </think><output_image>{answer}", "start": f"<output_image>{answer}",
               "none": answer}[placeholder]
        train.append({"text_input": VSP_PROMPT, "image_input": rel(inp), "image_output": rel(helper),
                      "text_output": out, "map_desc": m, "map_id": str(i)})
        test.append({"text_input": VSP_PROMPT, "image_input": rel(inp), "map_id": str(i), "map_desc": m})
    for name, rs in (("train", train), ("test", test)):
        (data / f"{name}_direct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return data
