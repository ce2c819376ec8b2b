"""`lvr eval` says how many questions of the split it evaluated and, when it leaves some out, how many and why;
the loaders count the rows they leave out (ReasoningDataset.skipped)."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from fixtures_datasets import write_m3cot_fixture, write_scienceqa_fixture
from lvr_engine.cli import main
from lvr_engine.data import SKIPPED_NO_IMAGE, load_m3cot, load_scienceqa

REPORT = re.compile(r"^(\w+) (\w+): evaluated (\d+) of (\d+) questions(?:; skipped (\d+): (.*))?$", re.M)
ACCURACY = re.compile(r"accuracy: [\d.]+ \((\d+)/(\d+)\)")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny Qwen2-VL and a copy that says it was trained with 1 latent step of 2 patches."""
    root = tmp_path_factory.mktemp("eval-report")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["tiny-model", str(root / "plain"), "--hidden-size", "64", "--num-layers", "1",
                     "--vision-depth", "1", "--vision-embed-dim", "32", "--image-size", "56"]) == 0
        assert main(["tiny-model", str(root / "latent"), "--hidden-size", "64", "--num-layers", "1",
                     "--vision-depth", "1", "--vision-embed-dim", "32", "--image-size", "56"]) == 0
    meta = {"latent_config": {"num_latent_steps": 1, "num_selected_patches": 2, "trigger": "prompt",
                              "position_mode": "mrope"}, "template": "ivtlr", "image_size": None}
    (root / "latent" / "lvr_config.json").write_text(json.dumps(meta))
    return root


def _eval(capsys, *args) -> tuple[re.Match, re.Match]:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--max-new-tokens", "2", "--batch-size", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    report, acc = REPORT.search(out), ACCURACY.search(out)
    assert report and acc, out
    assert int(acc[2]) == int(report[3])  # the accuracy is over the questions the report says were evaluated
    return report, acc


def test_loaders_count_the_rows_they_leave_out(tmp_path):
    write_scienceqa_fixture(tmp_path / "sqa", n_train=2, n_test=6)  # test rows 2 and 5 have no image
    ds = load_scienceqa(tmp_path / "sqa", "test", require_image=True)
    assert (len(ds), ds.split_rows, ds.skipped) == (4, 6, {SKIPPED_NO_IMAGE: 2})
    assert ds.rows == [0, 1, 3, 4] and "skipped" in repr(ds)
    ds = load_scienceqa(tmp_path / "sqa", "test")
    assert (len(ds), ds.split_rows, ds.skipped) == (6, 6, {})
    write_m3cot_fixture(tmp_path / "m3", n_train=2, n_test=3)  # every M3CoT row has an image
    ds = load_m3cot(tmp_path / "m3", "test", require_image=True)
    assert (len(ds), ds.split_rows, ds.skipped) == (3, 3, {})


def test_eval_reports_every_question_when_none_is_skipped(tiny, tmp_path, capsys):
    data = tmp_path / "sqa"
    write_scienceqa_fixture(data, n_train=2, n_test=3)
    report, _ = _eval(capsys, "--model", tiny / "plain", "--dataset", "scienceqa", "--data-dir", data,
                      "--mode", "cot")
    assert report.groups() == ("scienceqa", "test", "3", "3", None, None)


def test_eval_reports_questions_without_an_image_for_a_patch_selecting_model(tiny, tmp_path, capsys):
    data = tmp_path / "sqa"
    write_scienceqa_fixture(data, n_train=2, n_test=6)  # rows 2 and 5 have no image
    report, _ = _eval(capsys, "--model", tiny / "latent", "--dataset", "scienceqa", "--data-dir", data,
                      "--mode", "latent")
    assert report.groups()[:5] == ("scienceqa", "test", "4", "6", "2")
    assert report[6].startswith("2 without an image (latent steps select 2 image patches each")
    assert "--image-only no" in report[6]

    report, _ = _eval(capsys, "--model", tiny / "plain", "--dataset", "scienceqa", "--data-dir", data,
                      "--mode", "cot", "--image-only", "yes", "--limit", "3")
    assert report.groups() == ("scienceqa", "test", "3", "6", "3",
                               "2 without an image (--image-only yes); 1 after the first 3 (--limit)")


def test_eval_with_nothing_left_names_the_skipped_rows(tiny, tmp_path, capsys):
    data = tmp_path / "sqa"
    write_scienceqa_fixture(data, n_train=2, n_test=1, image_every=1)  # image_every=1: no row has an image
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny / "latent"), "--dataset", "scienceqa", "--data-dir", str(data),
                 "--mode", "latent", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no questions to evaluate" in err and "evaluated 0 of 1 questions; skipped 1: 1 without an image" in err
