"""`run_demo(quick=True)`: the whole demo pipeline end to end in seconds (the accuracy claim is the full demo's)."""
import json
import math

import pytest
from PIL import Image

pytest.importorskip("matplotlib")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from lvr_engine.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True, progress=False)


def test_table(demo_run, capsys):
    out, res = demo_run
    table = res["table"]
    assert [r["mode"] for r in table] == ["direct", "cot", "latent"]
    for r in table:
        for key in ("method", "accuracy", "mean_steps", "ms_per_question", "num_questions"):
            assert key in r
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["mean_steps"] >= 1 and r["ms_per_question"] > 0
        assert r["num_questions"] == 8
    latent = table[2]
    assert latent["num_latent_steps"] == 3 and latent["num_selected_patches"] == 2
    assert table[0]["num_latent_steps"] == table[1]["num_latent_steps"] == 0
    # results.json holds the same table
    saved = json.loads((out / "results.json").read_text())
    assert [r["accuracy"] for r in saved["table"]] == [r["accuracy"] for r in table]
    # the printed table
    from lvr_engine.demo import format_table

    text = format_table(table)
    assert "accuracy" in text and "AR steps" in text and "ms/question" in text
    assert len(text.splitlines()) == 2 + 3


def test_losses_and_plot(demo_run):
    out, res = demo_run
    losses = res["losses"]
    assert len(losses["stage_steps"]) == 4
    assert len(losses["curriculum"]) == sum(losses["stage_steps"])
    assert losses["direct"] and all(math.isfinite(x) for x in losses["curriculum"] + losses["direct"])
    with Image.open(out / "loss.png") as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 100


def test_heatmaps_and_selection(demo_run):
    out, res = demo_run
    maps = sorted((out / "heatmaps").glob("q*.png"))
    assert [p.name for p in maps] == ["q0.png", "q1.png"]
    for p, row in zip(maps, res["heatmaps"]):
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.width > 84 and im.height > 84
        sel = row["selected"]
        assert len(sel) == 3 and all(len(step) == 2 for step in sel)
        flat = [i for step in sel for i in step]
        assert len(set(flat)) == len(flat) and all(0 <= i < 9 for i in flat)  # never a patch twice
    s = res["selection"]
    assert s["questions"] == 8 and len(s["anchor_hit_rate"]) == 3 and len(s["target_hit_rate"]) == 3
    assert all(0.0 <= v <= 1.0 for v in s["anchor_hit_rate"] + s["target_hit_rate"])


def test_checkpoints_load(demo_run):
    from lvr_engine import LatentConfig, LatentGenerator
    from lvr_engine.evaluation import read_lvr_config
    from lvr_engine.training.collate import encode_prompts
    from lvr_engine.demo import QUICK, _examples

    out, res = demo_run
    final = out / "latent_model"
    meta = read_lvr_config(final)
    assert meta["stage"] == 3 and meta["latent_config"]["num_latent_steps"] == 3
    gen = LatentGenerator.from_pretrained(final, LatentConfig(**meta["latent_config"]))
    ex = _examples(QUICK, 1, 0, "test")
    prompt = encode_prompts(ex, gen.processor, image_size=QUICK.canvas)
    got = gen.generate(**prompt.model_inputs(), max_new_tokens=4)
    assert got.selected.shape == (1, 3, 2)
    cot = out / "latent_model" / "checkpoints" / "stage-0"
    assert read_lvr_config(cot)["eval_mode"] == "cot"
    assert read_lvr_config(out / "direct_model")["eval_mode"] == "direct"
    assert res["paths"]["final_model"] == str(final)


def test_rerun_same_directory(tmp_path):
    """A second run into the same directory replaces the first (the trainer itself refuses to overwrite)."""
    import dataclasses

    from lvr_engine.demo import QUICK, run_demo

    tiny = dataclasses.replace(QUICK, num_train=8, num_test=2, num_heatmaps=2)
    run_demo(tmp_path, config=tiny, progress=False)
    res = run_demo(tmp_path, config=dataclasses.replace(tiny, num_heatmaps=1), progress=False)
    assert res["table"][2]["num_questions"] == 2
    assert sorted(p.name for p in (tmp_path / "heatmaps").glob("q*.png")) == ["q0.png"]
