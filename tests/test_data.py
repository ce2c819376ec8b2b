"""Dataset layer: M3CoT / ScienceQA parquet loading, rationale steps, prompts, answer scoring."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_datasets import (
    m3cot_features,
    write_m3cot_fixture,
    write_scienceqa_fixture,
)
from lvr_engine.data import (
    PROMPT_TEMPLATES,
    PromptTemplate,
    ReasoningExample,
    Target,
    accuracy,
    accuracy_by,
    chat_messages,
    decode_image,
    extract_ivtlr_scienceqa_index,
    extract_m3cot_answer,
    format_prompt,
    format_target,
    ivtlr_m3cot_candidates,
    load_dataset_by_name,
    load_m3cot,
    load_scienceqa,
    register_template,
    score_m3cot,
    score_scienceqa,
    split_rationale,
    split_sentences,
)


def _png(array: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ----------------------------------------------------------------------------------------------
# Loading from the published parquet layout


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="module")
def m3cot_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("m3cot")
    rows = write_m3cot_fixture(root, n_train=7, n_test=3, seed=0, n_validation=2, num_shards=2)
    return root, rows


@pytest.fixture(scope="module")
def sqa_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scienceqa")
    rows = write_scienceqa_fixture(root, n_train=6, n_test=7, seed=3)
    return root, rows


def test_m3cot_fields_match_the_written_rows(m3cot_dir, cache_dir):
    root, written = m3cot_dir
    for split in ("train", "test"):
        ds = load_m3cot(root, split, cache_dir=cache_dir)
        rows = written[split]
        assert len(ds) == len(rows)
        for ex, row in zip(ds, rows, strict=True):
            assert ex.id == row["id"]
            assert ex.question == row["question"]
            assert ex.choices == row["choices"]
            assert ex.answer == row["answer"]
            assert ex.answer_index == "ABCDEF".index(row["answer"])
            assert ex.answer_text == row["choices"][ex.answer_index]
            assert ex.context == row["context"]
            assert ex.rationale == row["rationale"]
            assert ex.steps == split_rationale(row["rationale"])
            assert 0 <= len(ex.steps) <= 3
            assert ex.metadata["domain"] == row["domain"]
            assert ex.metadata["topic"] == row["topic"]
            assert ex.metadata["image_id"] == row["image_id"]
            assert ex.metadata["dataset"] == "m3cot" and ex.metadata["split"] == split
            assert ex.image is not None and ex.image.mode == "RGB" and ex.image.size == (56, 56)
            np.testing.assert_array_equal(np.asarray(ex.image), _pixels(row["image"]["bytes"]))
    # Row 0 has no rationale, row 1 one sentence, row 6 six sentences merged into 3 steps.
    train = load_m3cot(root, "train", cache_dir=cache_dir)
    assert train[0].steps == []
    assert len(train[1].steps) == 1
    assert len(train[6].steps) == 3
    assert " ".join(train[6].steps) == train[6].rationale


def test_m3cot_validation_split_aliases(m3cot_dir, cache_dir):
    root, written = m3cot_dir
    expected = [r["id"] for r in written["validation"]]
    for name in ("validation", "dev", "val"):
        ds = load_m3cot(root, name, cache_dir=cache_dir)
        assert [ex.id for ex in ds] == expected
        assert ds[0].metadata["source_split"] == "dev"


def test_lazy_sequence_indexing(m3cot_dir, cache_dir):
    root, written = m3cot_dir
    ds = load_m3cot(root, "train", cache_dir=cache_dir)
    ids = [r["id"] for r in written["train"]]
    assert [ex.id for ex in ds] == ids  # both shards, in order
    assert ds[-1].id == ids[-1]
    assert [ex.id for ex in ds[2:5]] == ids[2:5]
    with pytest.raises(IndexError):
        ds[len(ids)]
    assert ds.shards[0].name == "train-00000-of-00002.parquet" and len(ds.shards) == 2


def test_scienceqa_fields_and_missing_images(sqa_dir, cache_dir):
    root, written = sqa_dir
    ds = load_scienceqa(root, "test", cache_dir=cache_dir)
    rows = written["test"]
    assert len(ds) == 7
    for i, (ex, row) in enumerate(zip(ds, rows, strict=True)):
        assert ex.id == f"scienceqa-test-{i}"
        assert ex.choices == row["choices"]
        assert ex.answer_index == row["answer"]
        assert ex.answer == "ABCDE"[row["answer"]]
        assert ex.context == row["hint"]
        lecture, solution = row["lecture"], row["solution"]
        assert ex.rationale == " ".join(p for p in (lecture, solution) if p)
        assert ex.steps == split_rationale(ex.rationale)
        assert ex.metadata["grade"] == row["grade"] and ex.metadata["skill"] == row["skill"]
        if row["image"] is None:
            assert ex.image is None
        else:
            np.testing.assert_array_equal(np.asarray(ex.image), _pixels(row["image"]["bytes"]))
    # Rows 2 and 5 have no image (every third row); row 0 has neither lecture nor solution.
    assert ds[2].image is None and ds[5].image is None
    assert ds[0].rationale == "" and ds[0].steps == []
    # Row 1: lecture then solution.
    assert ds[1].rationale.startswith(rows[1]["lecture"]) and ds[1].rationale.endswith(rows[1]["solution"])

    with_image = load_scienceqa(root, "test", require_image=True, cache_dir=cache_dir)
    assert [ex.id for ex in with_image] == [f"scienceqa-test-{i}" for i in (0, 1, 3, 4, 6)]
    assert with_image.rows == [0, 1, 3, 4, 6]
    assert all(ex.image is not None for ex in with_image)


def test_scienceqa_published_hash_suffixed_shards(sqa_dir, cache_dir):
    root, _ = sqa_dir
    ds = load_scienceqa(root, "train", cache_dir=cache_dir)
    assert len(ds) == 6
    assert ds.shards[0].name.startswith("train-00000-of-00001-") and ds.shards[0].suffix == ".parquet"


def test_registry(m3cot_dir, sqa_dir, cache_dir):
    assert len(load_dataset_by_name("M3CoT", m3cot_dir[0], "test", cache_dir=cache_dir)) == 3
    assert len(load_dataset_by_name("scienceqa", sqa_dir[0], "test", cache_dir=cache_dir)) == 7
    with pytest.raises(ValueError, match=r"unknown dataset 'vqa'.*'m3cot', 'scienceqa'"):
        load_dataset_by_name("vqa", m3cot_dir[0], "test")


def test_plain_pyarrow_struct_images_without_hf_metadata(tmp_path, cache_dir):
    """Shards written by pyarrow alone: image is a bare struct {bytes, path}, null, or a relative path."""
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    (tmp_path / "images").mkdir()
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255
    Image.fromarray(blue).save(tmp_path / "images" / "b.png")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    n = 4
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": _png(red), "path": None},
                    None,
                    {"bytes": None, "path": "images/b.png"},
                    {"bytes": None, "path": None},  # a struct with nothing in it: no image
                ],
                type=image_type,
            ),
            "question": ["q0", "q1", "q2", "q3"],
            "choices": [["x", "y"], ["x", "y", "z"], ["x", "y"], ["x", "y"]],
            "answer": pa.array([1, 2, 0, 0], pa.int8()),
            "hint": ["", "h", "", ""],
            **{c: ["v"] * n for c in ("task", "grade", "subject", "topic", "category", "skill")},
            "lecture": ["L0.", None, "", ""],
            "solution": ["S0.", "S1.", None, ""],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    ds = load_scienceqa(tmp_path, "test", cache_dir=cache_dir)
    assert [ex.answer for ex in ds] == ["B", "C", "A", "A"]
    assert ds[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert ds[1].image is None
    assert ds[2].image.getpixel((3, 3)) == (0, 0, 255)
    assert ds[3].image is None
    assert ds[0].steps == ["L0.", "S0."] and ds[1].steps == ["S1."] and ds[2].steps == []
    assert ds[1].context == "h"
    assert load_scienceqa(tmp_path, "test", require_image=True, cache_dir=cache_dir).rows == [0, 2]


def test_decode_image_composites_transparency_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[1, 1] = (10, 20, 30, 0)  # fully transparent
    im = decode_image({"bytes": _png(rgba, "RGBA"), "path": None})
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (10, 20, 30)
    assert im.getpixel((1, 1)) == (255, 255, 255)
    assert decode_image(None) is None
    with pytest.raises(FileNotFoundError, match="missing.png"):
        decode_image({"bytes": None, "path": "missing.png"}, "/nonexistent")


# ----------------------------------------------------------------------------------------------
# Malformed directories: clear errors naming the path and what was expected


def test_missing_directory(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_m3cot(path, "train")
    assert str(path) in str(err.value) and "data/train-*.parquet" in str(err.value)


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_scienceqa(tmp_path, "test")
    assert str(tmp_path) in str(err.value) and "no data/ folder" in str(err.value)
    assert "data/test-*.parquet" in str(err.value)


def test_missing_split_shards(m3cot_dir, tmp_path):
    root = tmp_path / "only_train"
    write_m3cot_fixture(root, n_train=2, n_test=0, seed=1)
    with pytest.raises(FileNotFoundError) as err:
        load_m3cot(root, "test")
    msg = str(err.value)
    assert "'test'" in msg and str(root / "data") in msg and "train-00000-of-00001.parquet" in msg


def test_missing_column(tmp_path):
    write_m3cot_fixture(tmp_path, n_train=2, n_test=0, seed=1)
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["rationale"]), shard)
    with pytest.raises(ValueError) as err:
        load_m3cot(tmp_path, "train")
    assert str(shard) in str(err.value) and "['rationale']" in str(err.value)

    sqa = tmp_path / "sqa"
    write_scienceqa_fixture(sqa, n_train=0, n_test=2, seed=1)
    (shard,) = (sqa / "data").glob("test-*.parquet")
    pq.write_table(pq.read_table(shard).drop_columns(["hint", "lecture"]), shard)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['hint', 'lecture'\]"):
        load_scienceqa(sqa, "test")


def test_unreadable_shard(tmp_path):
    (tmp_path / "data").mkdir()
    bad = tmp_path / "data" / "train-00000-of-00001.parquet"
    bad.write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match="cannot read the parquet schema"):
        load_m3cot(tmp_path, "train")


def test_image_column_of_wrong_type(tmp_path, cache_dir):
    write_m3cot_fixture(tmp_path, n_train=2, n_test=0, seed=1)
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(["a.png", "b.png"]))
    pq.write_table(table.replace_schema_metadata(None), shard)
    with pytest.raises(ValueError, match="column 'image'.*expected the datasets Image feature"):
        load_m3cot(tmp_path, "train", cache_dir=cache_dir)


def test_m3cot_answer_not_a_choice_letter(tmp_path, cache_dir):
    import datasets

    rows = write_m3cot_fixture(tmp_path, n_train=2, n_test=0, seed=1)["train"]
    rows[1]["answer"] = "F"  # row 1 has 3 choices
    shard = tmp_path / "data" / "train-00000-of-00001.parquet"
    features = m3cot_features()
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    pq.write_table(ds.data.table, shard)
    loaded = load_m3cot(tmp_path, "train", cache_dir=cache_dir)
    assert loaded[0].id == rows[0]["id"]
    with pytest.raises(ValueError, match=rf"{rows[1]['id']}.*'F' but only 3 choices"):
        loaded[1]


def test_import_is_light():
    code = (
        "import sys, lvr_engine; before = set(sys.modules); import lvr_engine.data; "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.split('.')[0] in ('torch', 'datasets', 'pyarrow', 'transformers')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# Rationale steps


def _ivtlr_steps(rationale: str) -> list[str]:
    """IVT-LR's rule as described in its process_example (qwen_vl/qwenvl_run.py), for comparison."""
    pieces = rationale.replace("\n", " ").strip().split(". ")
    if pieces[-1] == "":
        pieces.pop()
    if len(pieces) > 3:
        size, extra = divmod(len(pieces), 3)
        out, start = [], 0
        for i in range(3):
            end = start + size + (1 if i < extra else 0)
            out.append(". ".join(pieces[start:end]))
            start = end
        pieces = out
    return pieces


@pytest.mark.parametrize("text", [None, "", "   \n\t  "])
def test_steps_empty(text):
    assert split_rationale(text) == []


def test_steps_one_and_two_sentences():
    assert split_rationale("The cat sleeps.") == ["The cat sleeps."]
    assert split_rationale("no final period") == ["no final period"]
    assert split_rationale("A is red. B is blue.") == ["A is red.", "B is blue."]


def test_steps_merged_into_three_chunks():
    words = ["One.", "Two.", "Three.", "Four.", "Five.", "Six.", "Seven."]
    assert split_rationale(" ".join(words[:4])) == ["One. Two.", "Three.", "Four."]
    assert split_rationale(" ".join(words[:5])) == ["One. Two.", "Three. Four.", "Five."]
    assert split_rationale(" ".join(words)) == ["One. Two. Three.", "Four. Five.", "Six. Seven."]
    assert split_rationale(" ".join(words), max_steps=2) == ["One. Two. Three. Four.", "Five. Six. Seven."]
    assert split_rationale(" ".join(words), max_steps=1) == [" ".join(words)]
    with pytest.raises(ValueError, match="max_steps"):
        split_rationale("One.", max_steps=0)


@pytest.mark.parametrize("n", range(1, 10))
def test_steps_match_ivtlr_chunking(n):
    """Same chunks as IVT-LR; only IVT-LR's non-final chunks lose their final period."""
    text = " ".join(f"Sentence number {k} is here." for k in range(n))
    ours, theirs = split_rationale(text), _ivtlr_steps(text)
    assert len(ours) == len(theirs) == min(n, 3)
    assert ours[:-1] == [t + "." for t in theirs[:-1]]
    assert ours[-1] == theirs[-1]


def test_sentence_splitter_edge_cases():
    want = ["Birds, e.g. robins, fly.", "Mr. Lee agrees."]
    assert split_sentences("Birds, e.g. robins, fly. Mr. Lee agrees.") == want
    assert split_sentences("It weighs 2.5 kg. That is 0.75 of it.") == ["It weighs 2.5 kg.", "That is 0.75 of it."]
    assert split_sentences("Why? Because! Yes.") == ["Why?", "Because!", "Yes."]
    assert split_sentences('He said "stop." Then left.') == ['He said "stop."', "Then left."]
    assert split_sentences("Line one.\nLine two.\n\n  Line three.") == ["Line one.", "Line two.", "Line three."]
    assert split_sentences("Wait... then go.") == ["Wait...", "then go."]
    assert split_sentences("So the answer is B. Next we check.") == ["So the answer is B.", "Next we check."]
    assert split_sentences("The U.S. flag has stars. It is red.") == ["The U.S. flag has stars.", "It is red."]


# ----------------------------------------------------------------------------------------------
# Prompts and targets


def _example(**kw) -> ReasoningExample:
    base = dict(
        id="x", image=None, question="  What is shown? ", choices=["cat ", "dog"], answer="B",
        answer_index=1, steps=["Step one.", "Step two.", "Step three."], context="A pet photo.",
    )
    base.update(kw)
    return ReasoningExample(**base)


def test_example_validates_answer():
    with pytest.raises(ValueError, match="does not match"):
        _example(answer="A")
    with pytest.raises(ValueError, match="out of range"):
        _example(answer="C", answer_index=2)


def test_format_prompt_ivtlr():
    ex = _example()
    assert format_prompt(ex) == "[Question]:{What is shown?}\n[Options]:\n(A).{cat}\n(B).{dog}\nAnswer:\n"
    assert format_prompt(ex, "ivtlr_context") == (
        "[Context]:{A pet photo.}\n[Question]:{What is shown?}\n[Options]:\n(A).{cat}\n(B).{dog}\nAnswer:\n"
    )
    # An empty context renders nothing even in the context template.
    assert format_prompt(_example(context=""), "ivtlr_context") == format_prompt(ex)
    with pytest.raises(ValueError, match="unknown prompt template 'nope'.*'ivtlr'"):
        format_prompt(ex, "nope")


def test_format_target_curriculum():
    ex = _example()
    t0 = format_target(ex)
    assert t0 == Target(["Step one.\n", "Step two.\n", "Step three.\n"], "Therefore, the answer is B")
    assert t0.text == "Step one.\nStep two.\nStep three.\nTherefore, the answer is B"
    steps, answer = format_target(ex, num_latent_steps_replaced=1)
    assert steps == ["Step two.\n", "Step three.\n"] and answer == "Therefore, the answer is B"
    assert format_target(ex, 3).steps == [] and format_target(ex, 7).steps == []
    assert format_target(ex, 0, mode="direct") == Target([], "Therefore, the answer is B")
    assert format_target(ex, template="ivtlr_scienceqa").answer == "Therefore, the answer is 1"
    assert format_target(_example(steps=[])).text == "Therefore, the answer is B"
    with pytest.raises(ValueError, match="num_latent_steps_replaced"):
        format_target(ex, -1)
    with pytest.raises(ValueError, match="mode"):
        format_target(ex, mode="latent")


def test_custom_template():
    tpl = PromptTemplate(
        name="test_custom_q", prompt="{context}Q: {question}\n{options}\nA:", option="{letter}) {choice}",
        option_separator=" | ", context="Context: {context}\n", step_suffix=" ",
        answer="The answer is ({letter}): {choice}.",
    )
    try:
        register_template(tpl)
        with pytest.raises(ValueError, match="already exists"):
            register_template(tpl)
        ex = _example()
        assert format_prompt(ex, "test_custom_q") == "Context: A pet photo.\nQ: What is shown?\nA) cat | B) dog\nA:"
        assert format_target(ex, 2, template=tpl).text == "Step three. The answer is (B): dog."
    finally:
        PROMPT_TEMPLATES.pop("test_custom_q", None)


def test_chat_messages():
    img = Image.new("RGB", (56, 40), (1, 2, 3))
    ex = _example(image=img)
    msgs = chat_messages(ex, "hello")
    assert msgs == [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "hello"}]}]
    resized = chat_messages(ex, "hello", image_size=280, system="sys")
    assert resized[0] == {"role": "system", "content": [{"type": "text", "text": "sys"}]}
    entry = resized[1]["content"][0]
    assert entry["image"].size == (280, 280) and entry["resized_height"] == entry["resized_width"] == 280
    assert chat_messages(_example(), "t") == [{"role": "user", "content": [{"type": "text", "text": "t"}]}]


# ----------------------------------------------------------------------------------------------
# Scoring (M3CoT official judge precedence; ScienceQA index match)

CHOICES = ["red square", "green square", "blue square"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(A) looks wrong; the answer is (C).", "C"),  # last (X) wins
        ("I first thought (b), then (a).", "A"),  # lower-case parentheses
        ("It is the Green Square.", "B"),  # the choice text instead of a letter
        ("Both green square and red square appear", "B"),  # several choice texts: highest index
        ("The answer is B.", "B"),  # bare upper-case letter token
        ("answer: c", "C"),  # bare lower-case letter token
        ("this is a guess", "A"),  # the article "a" is choice A (official quirk)
        ("B", "B"),
        ("(B) then the text blue square", "B"),  # (X) beats choice text
        ("blue square, so A", "C"),  # choice text beats bare letters
        ("[Rationale] (A) is tempting. [Answer] (B) [Rationale] because (C)", "B"),
        ("The answer is (E).", "E"),  # any letter in parentheses
        ("no idea", None),
        ("", None),
    ],
)
def test_extract_m3cot_answer(text, expected):
    assert extract_m3cot_answer(text, CHOICES) == expected


def test_score_m3cot():
    ex = _example(choices=CHOICES, answer="B", answer_index=1)
    assert score_m3cot("Therefore, the answer is (B).", ex)
    assert score_m3cot("The green square.", ex)
    assert score_m3cot("Therefore, the answer is B", ex)
    assert not score_m3cot("(A)", ex)
    assert not score_m3cot("The answer is (E).", ex)
    assert not score_m3cot("nothing here", ex)
    # IVT-LR's rule: the gold letter among the letters after "the answer is" / "Answer:".
    assert ivtlr_m3cot_candidates("the answer is A. Answer: c") == {"A", "C"}
    assert score_m3cot("Therefore, the answer is B", ex, judge="ivtlr")
    assert not score_m3cot("Answer: (B)", ex, judge="ivtlr")
    with pytest.raises(ValueError, match="unknown judge"):
        score_m3cot("B", ex, judge="gpt")


def test_score_scienceqa():
    ex = _example(choices=CHOICES, answer="C", answer_index=2)
    assert score_scienceqa("Therefore, the answer is C", ex)
    assert score_scienceqa("It must be the blue square.", ex)
    assert score_scienceqa("(c)", ex)
    assert not score_scienceqa("(B)", ex)
    assert not score_scienceqa("unsure", ex)
    assert extract_ivtlr_scienceqa_index("Therefore, the answer is 2") == 2
    assert extract_ivtlr_scienceqa_index("the answer is C, not 1") == 2
    assert extract_ivtlr_scienceqa_index("answer is:1") == 1
    assert extract_ivtlr_scienceqa_index("no answer") is None
    assert score_scienceqa("Therefore, the answer is 2", ex, judge="ivtlr")
    assert not score_scienceqa("Therefore, the answer is 1", ex, judge="ivtlr")


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy(iter([False])) == 0.0
    with pytest.raises(ValueError, match="empty"):
        accuracy([])
    exs = [_example(metadata={"domain": d}) for d in ("science", "math", "science")]
    assert accuracy_by(exs, [True, False, False]) == {"science": 0.5, "math": 0.0}
    with pytest.raises(ValueError, match="2 results"):
        accuracy_by(exs, [True, False])
