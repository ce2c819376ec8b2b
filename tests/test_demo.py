"""`run_demo(quick=True)`: the five-method demo end to end in seconds (the accuracy claims are the full demo's), its
equal training budgets, the mediation readout it prints, and the Wilson interval."""
import dataclasses
import json
import math

import pytest
from PIL import Image

pytest.importorskip("matplotlib")
pytest.importorskip("accelerate")

KEYS = ["direct", "cot", "capimagine", "ivtlr", "mirage"]
ROWS = KEYS + ["mirage_segment"]   # Mirage's model also on the fixed segment it was trained on


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from lvr_engine.demo import QUICK, run_demo

    assert QUICK.workers == 2   # the parallel path the full demo takes
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True, progress=False)


def test_equal_budget_table(demo_run):
    from lvr_engine.demo import QUICK, format_table

    out, res = demo_run
    rows = res["methods"]
    assert [r["key"] for r in rows] == ROWS
    steps = QUICK.budget_epochs * math.ceil(QUICK.num_train / QUICK.batch_size)
    assert res["train_steps"] == steps == 8
    for r in rows:
        assert r["train_steps"] == steps and r["batch_size"] == QUICK.batch_size and r["lr"] == QUICK.lr
        assert sum(s["steps"] for s in r["stages"]) == steps
        assert len(res["losses"][r["trained"]]["losses"]) == steps
        assert 0.0 <= r["accuracy"] <= 1.0 and r["num_questions"] == 8
        assert r["correct"] == round(r["accuracy"] * 8)
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
        assert r["mean_steps"] >= 1 and r["ms_per_question"] > 0
    by = {r["key"]: r for r in rows}
    assert [s["steps"] for s in by["ivtlr"]["stages"]] == [2, 2, 2, 2]     # stage 0 counts toward the budget
    assert [s["steps"] for s in by["mirage"]["stages"]] == [4, 4]          # stage 1 + stage 2 share it
    assert by["ivtlr"]["num_latent_steps"] == 3 and by["ivtlr"]["num_selected_patches"] == 2
    assert by["mirage"]["trigger"] == "token" and by["mirage"]["num_latent_steps"] == 0   # (its own inference)
    assert by["mirage_segment"]["trigger"] == "prompt" and by["mirage_segment"]["num_latent_steps"] == 3
    assert by["mirage_segment"]["stages"] == by["mirage"]["stages"] and by["mirage_segment"]["trained"] == "mirage"
    assert all(by[k]["num_latent_steps"] == 0 for k in ("direct", "cot", "capimagine"))
    assert 0.0 <= by["mirage"]["opened_latent_segment"] <= 1.0
    assert 0.0 <= by["mirage"]["mean_latent_steps"] <= 8
    saved = json.loads((out / "results.json").read_text())
    assert [(r["key"], r["train_steps"], r["accuracy"], r["ci95"]) for r in saved["methods"]] == \
        [(r["key"], r["train_steps"], r["accuracy"], r["ci95"]) for r in rows]
    assert saved["seed"] == 0
    text = format_table(rows)
    assert "train steps" in text and "95% interval" in text and "ms/question" in text
    assert len(text.splitlines()) == 2 + 6


def test_mediation_readout(demo_run):
    from lvr_engine.demo import format_mediation_table

    out, res = demo_run
    by = {r["key"]: r for r in res["methods"]}
    assert all(by[k]["mediation"] is None for k in ("direct", "cot", "capimagine", "mirage"))
    for key in ("ivtlr", "mirage_segment"):
        m = by[key]["mediation"]
        assert m["questions"] == 8 and m["num_latent_steps"] == 3
        rates = [m["flip_rate"]["zero"], m["flip_rate"]["swap"], m["swap_ceiling"],
                 m["image_swap"]["answer_change_rate"]]
        assert all(0.0 <= v <= 1.0 for v in rates)
        assert m["image_swap"]["latent_rel_l2"] >= 0 and -1 <= m["image_swap"]["latent_cos"] <= 1
        assert -1 <= m["latent_pairwise_cos"] <= 1 and len(m["latent_pairwise_cos_per_step"]) == 3
    assert "random_patches" in by["ivtlr"]["mediation"]["flip_rate"]
    assert "random_patches" not in by["mirage_segment"]["mediation"]["flip_rate"]   # Mirage feeds back no patches
    assert by["mirage_segment"]["mediation"]["num_selected_patches"] == 0
    text = format_mediation_table([by["ivtlr"], by["mirage_segment"]])
    assert "zeroed" in text and "pairwise cos" in text and len(text.splitlines()) == 3 + 2


def test_losses_plot_and_logs(demo_run):
    out, res = demo_run
    with Image.open(out / "loss.png") as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    for key in KEYS:
        assert all(math.isfinite(x) for x in res["losses"][key]["losses"])
        assert (out / "logs" / f"{key}.log").is_file()


def test_heatmaps_and_selection(demo_run):
    out, res = demo_run
    maps = sorted((out / "heatmaps").glob("q*.png"))
    assert [p.name for p in maps] == ["q0.png", "q1.png"]
    for p, row in zip(maps, res["heatmaps"], strict=True):
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.width > 84 and im.height > 84
        sel = row["selected"]
        assert len(sel) == 3 and all(len(step) == 2 for step in sel)
        flat = [i for step in sel for i in step]
        assert len(set(flat)) == len(flat) and all(0 <= i < 9 for i in flat)  # never a patch twice
    s = res["selection"]
    assert s["questions"] == 8 and len(s["anchor_hit_rate"]) == 3 and len(s["target_hit_rate"]) == 3


def test_checkpoints(demo_run):
    from lvr_engine import LatentConfig, LatentGenerator
    from lvr_engine.demo import QUICK, _examples
    from lvr_engine.evaluation import read_lvr_config
    from lvr_engine.training.collate import encode_prompts

    out, res = demo_run
    meta = read_lvr_config(out / "ivtlr_model")
    assert meta["stage"] == 3 and meta["latent_config"]["num_latent_steps"] == 3
    gen = LatentGenerator.from_pretrained(out / "ivtlr_model", LatentConfig(**meta["latent_config"]))
    prompt = encode_prompts(_examples(QUICK, 1, 0, "test"), gen.processor, image_size=QUICK.canvas)
    assert gen.generate(**prompt.model_inputs(), max_new_tokens=4).selected.shape == (1, 3, 2)
    mirage = read_lvr_config(out / "mirage_model")
    assert mirage["objective"] == "mirage_stage2" and mirage["latent_config"]["trigger"] == "token"
    assert read_lvr_config(out / "mirage_stage1")["objective"] == "mirage_stage1"
    for key in ("cot", "capimagine"):
        assert read_lvr_config(out / f"{key}_model")["eval_mode"] == "cot"
    assert read_lvr_config(out / "direct_model")["eval_mode"] == "direct"
    # every model started from the same base (Mirage stage 2 from its stage 1)
    for key in ("direct", "cot", "capimagine", "ivtlr"):
        state = json.loads((out / f"{key}_model" / "trainer_state.json").read_text())
        assert state["config"]["model"] == str(out / "base_model") and state["config"]["seed"] == 0
    assert json.loads((out / "mirage_model" / "trainer_state.json").read_text())["config"]["model"] == \
        str(out / "mirage_stage1")


def test_method_targets():
    """What each method is trained to write, from the same question."""
    from lvr_engine.data.prompts import format_target
    from lvr_engine.demo import QUICK, _examples, method_examples
    from lvr_engine.models.tiny import TINY_TOKEN_IDS, build_tiny_processor, build_tiny_tokenizer
    from lvr_engine.training.mirage import collate_mirage

    ex = _examples(QUICK, 4, 0, "train")
    cot = format_target(method_examples("cot", ex)[0]).text
    assert cot == "\n".join(ex[0].steps) + "\nTherefore, the answer is " + ex[0].answer
    cap = format_target(method_examples("capimagine", ex)[0]).text
    assert cap == f"{ex[0].metadata['caption']}\n{ex[0].steps[-1]}\nTherefore, the answer is {ex[0].answer}"
    mir = method_examples("mirage", ex)
    assert format_target(mir[0]).text == f"<output_image>\n{ex[0].steps[-1]}\nTherefore, the answer is {ex[0].answer}"
    assert mir[0].metadata["helper_image"] is ex[0].metadata["helper_image"] and mir[0].image is ex[0].image
    # the latents come right after the prompt: the only labelled token before them is the start marker
    proc = build_tiny_processor(build_tiny_tokenizer(), image_size=QUICK.canvas)
    b = collate_mirage(mir, proc, 3, start_id=TINY_TOKEN_IDS["<|latent_start|>"],
                       end_id=TINY_TOKEN_IDS["<|latent_end|>"], template="ivtlr", image_size=QUICK.canvas,
                       helper_images=True)
    assert b.num_pre.tolist() == [1] * 4 and b.helper_image_grid_thw.shape == (4, 3)
    with pytest.raises(ValueError, match="unknown demo method"):
        method_examples("coconut", ex)


def test_config_checks():
    from lvr_engine.demo import QUICK

    for bad in (dict(budget_epochs=3), dict(mirage_stage1_epochs=4), dict(mirage_stage1_epochs=0),
                dict(num_selected_patches=4), dict(workers=0)):
        with pytest.raises(ValueError):
            dataclasses.replace(QUICK, **bad).validate()


def test_rerun_same_directory_in_process(tmp_path):
    """A second run into the same directory replaces the first (the trainer itself refuses to overwrite); one worker
    trains in this process."""
    from lvr_engine.demo import QUICK, run_demo

    tiny = dataclasses.replace(QUICK, num_train=8, num_test=2, num_heatmaps=2, workers=1)
    run_demo(tmp_path, config=tiny, progress=False)
    res = run_demo(tmp_path, config=dataclasses.replace(tiny, num_heatmaps=1), progress=False)
    assert [r["train_steps"] for r in res["methods"]] == [4] * 6 and res["methods"][3]["num_questions"] == 2
    assert sorted(p.name for p in (tmp_path / "heatmaps").glob("q*.png")) == ["q0.png"]


def _wilson_by_bisection(k, n, z=1.959963984540054):
    """The two roots of (p_hat - p)^2 = z^2 p (1 - p) / n, found numerically (the Wilson interval's definition)."""
    p_hat = k / n
    f = lambda p: (p_hat - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731

    def root(a, b):
        for _ in range(200):
            m = (a + b) / 2
            if (f(a) > 0) == (f(m) > 0):
                a = m
            else:
                b = m
        return (a + b) / 2

    lo = 0.0 if k == 0 else root(0.0, p_hat)
    hi = 1.0 if k == n else root(p_hat, 1.0)
    return lo, hi


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (1, 256), (204, 256), (80, 256), (3, 7)])
def test_wilson_interval(k, n):
    from lvr_engine.demo import wilson_interval

    lo, hi = wilson_interval(k, n)
    want = _wilson_by_bisection(k, n)
    assert lo == pytest.approx(want[0], abs=1e-9) and hi == pytest.approx(want[1], abs=1e-9)


def test_wilson_interval_published_values():
    from lvr_engine.demo import wilson_interval

    # Newcombe (1998), Table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605; 0/20 -> 0-0.1611
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                             (0, 20): (0.0, 0.1611)}.items():
        got = wilson_interval(k, n)
        assert got[0] == pytest.approx(lo, abs=6e-5) and got[1] == pytest.approx(hi, abs=6e-5)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_cli_workers_flag(tmp_path, monkeypatch, capsys):
    import lvr_engine.demo as demo
    from lvr_engine.cli import main

    assert main(["demo", "--workers", "0", "--output", str(tmp_path / "d")]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(kw, out=out))
    assert main(["demo", "--workers", "1", "--seed", "3", "--output", str(tmp_path / "d")]) == 0
    assert seen == {"out": str(tmp_path / "d"), "seed": 3, "quick": False, "workers": 1}
