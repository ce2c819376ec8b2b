"""Mirage's data format (data/mirage.py), the ``mirage`` prompt template and the VSP scorer, on fixtures in Mirage's
format that the tests write (maps drawn with PIL)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lvr_engine.data import DATASET_LOADERS, SCORERS, load_dataset_by_name
from lvr_engine.data.mirage import MirageExample, load_mirage_jsonl, load_vsp
from lvr_engine.data.prompts import chat_messages, format_prompt, format_target
from lvr_engine.data.scoring import extract_boxed, score_vsp, simulate_vsp, vsp_moves, vsp_outcome
from mirage_fixtures import MAPS, VSP_PROMPT, draw_map, write_vsp


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pixels(im: Image.Image):
    return im.convert("RGB").tobytes()


# -- loader --------------------------------------------------------------------------------------------------------
def test_vsp_split_relative_paths_and_metadata(tmp_path, monkeypatch):
    """Paths relative to the repository root (Mirage's ./data/...) resolve from the data directory's parents, from
    any working directory; test rows have no target and no helper; map_desc and map_id are kept."""
    data = write_vsp(tmp_path / "repo", rows=3)
    monkeypatch.chdir(tmp_path)  # not the repository root: found through the data dir's parents
    test = load_dataset_by_name("vsp", data, "test")
    assert DATASET_LOADERS["vsp"] is load_vsp and len(test) == 3 and test.split_rows == 3 and test.skipped == {}
    ex = test[1]
    assert isinstance(ex, MirageExample) and ex.id == "vsp-test-1"
    assert ex.question == VSP_PROMPT and ex.target_text is None and ex.helper_image is None
    assert ex.metadata["map_desc"] == MAPS[1][0] and ex.metadata["map_id"] == "1"
    assert ex.metadata["dataset"] == "vsp" and ex.metadata["split"] == "test" and ex.metadata["row"] == 1
    on_disk = Image.open(data / "imgs" / "level3" / "1" / "map_step_0.png")
    assert ex.image is ex.images[0] and ex.image.mode == "RGB" and _pixels(ex.image) == _pixels(on_disk)
    train = load_vsp(data, "train")
    tr = train[2]
    assert tr.target_text.startswith("<think> first moves </think><output_image>The answer is \\boxed{")
    assert _pixels(tr.helper_image) == _pixels(Image.open(data / "imgs" / "level3" / "2" / "map_step_1.png"))
    assert tr.metadata["image_output"].endswith("level3/2/map_step_1.png")
    assert tr.choices == [] and tr.answer == "" and tr.steps == []


def test_relative_paths_prefer_the_working_directory(tmp_path, monkeypatch):
    """Mirage opens paths from the current directory: an image there wins over one under the data directory."""
    data = tmp_path / "d"
    draw_map(MAPS[0][0], data / "map.png")
    draw_map(MAPS[1][0], tmp_path / "cwd" / "map.png")
    f = _write(data / "x.jsonl", [{"text_input": "<image>", "image_input": "map.png"}])
    assert _pixels(load_mirage_jsonl(f)[0].image) == _pixels(Image.open(data / "map.png"))
    monkeypatch.chdir(tmp_path / "cwd")
    assert _pixels(load_mirage_jsonl(f)[0].image) == _pixels(Image.open(tmp_path / "cwd" / "map.png"))


def test_list_of_input_images_and_extra_fields(tmp_path):
    a = draw_map(MAPS[0][0], tmp_path / "imgs" / "a.png")
    b = draw_map(MAPS[1][0], tmp_path / "imgs" / "b.png")
    row = {"text_input": "First <image> then <image>, which?", "image_input": ["imgs/a.png", str(b)],
           "image_output": "imgs/a.png", "text_output": "<output_image>B", "source": "jigsaw", "id": "q7"}
    ex = load_mirage_jsonl(_write(tmp_path / "m.jsonl", [row]))[0]
    assert ex.id == "q7" and len(ex.images) == 2 and ex.metadata["source"] == "jigsaw"
    assert [_pixels(i) for i in ex.images] == [_pixels(Image.open(a)), _pixels(Image.open(b))]
    # the template puts each image where its <image> stands, in order
    content = chat_messages(ex, format_prompt(ex, "mirage"), image_placeholder="<image>")[0]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert [c.get("text") for c in content if c["type"] == "text"] == ["First ", " then ", ", which?"]
    assert content[1]["image"] is ex.images[0] and content[3]["image"] is ex.images[1]


def test_free_form_target_verbatim(tmp_path):
    data = write_vsp(tmp_path, rows=1)
    ex = load_vsp(data, "train")[0]
    target = format_target(ex, 0, template="mirage")
    assert target.steps == [] and target.answer == ex.target_text and "Therefore" not in target.text
    with pytest.raises(ValueError, match="vsp-test-0.*no target text"):
        format_target(load_vsp(data, "test")[0])


def test_missing_image_names_row_and_paths(tmp_path, monkeypatch):
    data = write_vsp(tmp_path / "repo", rows=2)
    rows = [json.loads(l) for l in (data / "test_direct.jsonl").read_text().splitlines()]
    rows[1]["image_input"] = "./data/vsp/imgs/nowhere.png"
    _write(data / "test_direct.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_vsp(data, "test")
    msg = str(e.value)
    assert "test_direct.jsonl:2 (row 1)" in msg and "'./data/vsp/imgs/nowhere.png' not found" in msg
    for root in (tmp_path, data, data.parent, tmp_path / "repo"):  # the working directory, the data dir, parents
        assert str(root / "data/vsp/imgs/nowhere.png") in msg
    with pytest.raises(FileNotFoundError, match=r"split 'dev'.*dev_direct.jsonl does not exist.*test_direct.jsonl"):
        load_vsp(data, "dev")


def test_malformed_rows(tmp_path):
    draw_map(MAPS[0][0], tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"x.jsonl:1 \(row 0\): text_input has 2 <image> placeholder\(s\) for 1"):
        load_mirage_jsonl(_write(tmp_path / "x.jsonl", [{"text_input": "<image><image>", "image_input": "m.png"}]))
    with pytest.raises(ValueError, match=r"y.jsonl:2 \(row 1\): not JSON"):
        (tmp_path / "y.jsonl").write_text(json.dumps({"text_input": "a"}) + "\n{oops\n")
        load_mirage_jsonl(tmp_path / "y.jsonl")
    with pytest.raises(ValueError, match="text_input must be a string"):
        load_mirage_jsonl(_write(tmp_path / "z.jsonl", [{"image_input": "m.png"}]))


def test_lazy_and_require_image(tmp_path, monkeypatch):
    """Reading the file opens no image; an access decodes that row's images only; rows without an input image are
    counted as skipped with require_image."""
    draw_map(MAPS[0][0], tmp_path / "m.png")
    f = _write(tmp_path / "t.jsonl", [{"text_input": "<image>", "image_input": "m.png"}, {"text_input": "no image"},
                                      {"text_input": "<image>", "image_input": "m.png"}])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    ds = load_mirage_jsonl(f)
    assert opened == [] and len(ds) == 3 and ds[1].image is None
    ds[2]
    assert len(opened) == 1
    kept = load_mirage_jsonl(f, require_image=True)
    assert len(kept) == 2 and kept.rows == [0, 2] and kept.split_rows == 3 and kept.skipped == {"without an image": 1}
    assert kept[1].metadata["row"] == 2


# -- template ------------------------------------------------------------------------------------------------------
def test_mirage_prompt_text(tmp_path):
    """``mirage``: the image at <image> in the chat template, no generation prompt, then ``<|im_start|>assistant``
    without a newline (what Mirage's test script feeds its checkpoints)."""
    from lvr_engine.models.loading import load_processor_or_tokenizer
    from lvr_engine.models.tiny import write_tiny_model
    from lvr_engine.training.collate import encode_prompts

    path = write_tiny_model(tmp_path / "m", family="qwen2_5_vl", hidden_size=32, num_layers=1, vision_depth=1,
                            vision_embed_dim=32, image_size=56)
    proc = load_processor_or_tokenizer(path)
    data = write_vsp(tmp_path, rows=2)
    enc = encode_prompts(list(load_vsp(data, "test")), proc, template="mirage")
    text = proc.tokenizer.decode(enc.input_ids[0][enc.attention_mask[0].bool()])
    head, tail = VSP_PROMPT.split("<image>")
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + head
            + "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>" + tail + "<|im_end|>\n<|im_start|>assistant")
    assert text == want and "<image>" not in text


# -- VSP scorer ----------------------------------------------------------------------------------------------------
MAP = [[1, 0, -1],
       [0, 0, 0],
       [-1, 0, 2]]


@pytest.mark.parametrize("answer,success,invalid,status", [
    ("The answer is \\boxed{R,D,R,D}.", True, False, "reached the goal"),          # gold path
    ("\\boxed{RIGHT, DOWN, DOWN, RIGHT}", True, False, "reached the goal"),        # words: R D D R
    ("\\boxed{d, r, r, d}", True, False, "reached the goal"),                      # lower case
    ("R,D,R,D", False, True, "no boxed answer"),                                   # unboxed path
    ("\\boxed{R,D,R,D} and then \\boxed{}", False, True, "empty boxed answer"),    # the last box is empty
    ("\\boxed{U,U,L, R,D,R,D}", True, False, "reached the goal"),                  # off-map moves ignored
    ("\\boxed{D,D,U,R,R,D}", False, False, "fell in a hole"),                      # into a hole and "back out"
    ("\\boxed{R,D}", False, False, "did not reach the goal"),                      # stops short
    ("\\boxed{R,D,R,D,L}", False, False, "did not reach the goal"),                # passes the goal, leaves it
    ("\\boxed{R,D,R,D", False, True, "no boxed answer"),                           # never closed
    ("\\boxed{\\text{R, D}, R, D}", True, False, "reached the goal"),              # braces inside
])
def test_vsp_outcome_hand_worked(answer, success, invalid, status):
    out = vsp_outcome(answer, MAP)
    assert (out.success, out.invalid, out.status) == (success, invalid, status)


def test_vsp_helpers_and_scorer():
    assert vsp_moves("RIGHT, DOWN") == vsp_moves("R,D") == "RD"
    assert extract_boxed("a \\boxed{L} b \\boxed{ U ,R }") == "U ,R" and extract_boxed("none") is None
    assert simulate_vsp(MAP, "RRRR") == (False, "fell in a hole")   # R, then the hole at (0, 2)
    with pytest.raises(ValueError, match="no start cell"):
        simulate_vsp([[0, 2]], "R")
    ex = MirageExample(id="v", image=None, question="q", choices=[], answer="", answer_index=-1, steps=[],
                       metadata={"map_desc": MAP})
    assert SCORERS["vsp"] is score_vsp and score_vsp("\\boxed{R,D,R,D}", ex) and not score_vsp("\\boxed{D}", ex)
    ex.metadata = {}
    with pytest.raises(ValueError, match="'v' has no map_desc"):
        score_vsp("\\boxed{R}", ex)
