"""`python -m lib_sdcustom.bench best-step`: the agreement count against the judge, and a toy-size run end to end
(the real table lives in docs/bench/best_step/, produced by the same command at full size)."""

from __future__ import annotations

import contextlib
import io
import json
import sys

from lib_sdcustom.bench import best_step
from lib_sdcustom.bench.__main__ import main


def _step(step: int, judge: float, instance: float, leak: float) -> dict:
    return {"step": step, "judge": judge, "subject": judge, "class_subject": 0.0,
            "errors": {"instance": [instance], "drift": [1.0], "leak": [leak]}}


def _run(steps: list[dict]) -> dict:
    return {"method": "lora", "concept": "red_circle", "seed": 0, "reference": {"instance": [1.0], "drift": [1.0],
                                                                                "leak": [1.0]}, "steps": steps,
            "base_class_subject": 0.0}


def test_the_default_recipes_are_the_quality_tables_network_rows():
    """The agreement figure is the README's claim about the shipped defaults, so it must be measured on them."""
    from lib_sdcustom.bench.quality import TABLE_METHODS
    from lib_sdcustom.bench.recipes import recipes_named

    assert set(best_step.METHODS) <= set(TABLE_METHODS)
    assert {recipe.method for recipe in recipes_named(best_step.METHODS)} == {"lora", "locon"}


def test_a_run_agrees_when_the_chosen_steps_judge_score_is_within_the_tolerance_of_the_best():
    # The instance error falls every step; the class prompt learns the subject from step 3 on.
    steps = [_step(1, 0.30, 0.8, 1.0), _step(2, 0.70, 0.6, 1.0), _step(3, 0.40, 0.5, 0.5)]
    assert best_step.agrees(_run(steps), (0.0, 1.0)) == (True, 2)
    assert best_step.agrees(_run(steps), (0.0, 0.0)) == (False, 3), "without the leak term the last step wins"
    close = [_step(1, 0.30, 0.8, 1.0), _step(2, 0.70, 0.6, 1.0), _step(3, 0.66, 0.5, 1.0)]
    assert best_step.agrees(_run(close), (0.0, 0.0)) == (True, 3)


def test_the_table_counts_agreeing_runs_for_the_shipped_and_the_other_weights(monkeypatch):
    monkeypatch.setattr(best_step, "DRIFT_WEIGHT", 0.0)
    monkeypatch.setattr(best_step, "LEAK_WEIGHT", 1.0)
    steps = [_step(1, 0.30, 0.8, 1.0), _step(2, 0.70, 0.6, 1.0), _step(3, 0.40, 0.5, 0.5)]
    other_seed = [_step(1, 0.30, 0.8, 1.0), _step(2, 0.40, 0.6, 1.0), _step(3, 0.70, 0.5, 0.5)]
    report = {"settings": {"methods": ["lora"], "concepts": ["red_circle"], "seeds": [0, 1], "samples": 4, "steps": 3,
                           "save_every": 1, "weights": [1.0, 1.0], "threads": 1},
              "runs": [_run(steps), {**_run(other_seed), "seed": 1}]}
    text = best_step.markdown(report)
    assert "| lora | red_circle | 0 | 1: 0.30, 2: 0.70, 3: 0.40 | 2 (0.70) | 2 (0.70) | yes |" in text
    assert "| lora | red_circle | 1 | 1: 0.30, 2: 0.40, 3: 0.70 | 3 (0.70) | 2 (0.40) | no |" in text
    assert "shipped weights (drift 0, leak 1): 1 of 2 runs (50%" in text
    # Seed 0 kept its best step; seed 1 kept 0.40 of 0.70. The last steps scored 0.40 (of 0.70) and 0.70.
    assert "lost to the pick (the run's best less the kept step's): 0.150 on average, at most 0.30, where keeping " \
           "the last step loses 0.150 on average, at most 0.30." in text
    assert "Weights chosen on the seed-0 runs alone (drift 0, leak 0.25; 1 of 1 there) agree on 0 of 1 runs" in text
    assert "| 0 | 0 | 1 of 2 | 1 |" in text and "| (keep the last step) | | 1 of 2 | 1 |" in text


def test_a_perfect_selector_agrees_less_often_the_noisier_the_judge():
    """Clear gaps between steps survive any judge; a gap of one sampling error often does not."""
    clear = _run([_step(1, 0.0, 1.0, 1.0), _step(2, 1.0, 1.0, 1.0)])
    assert best_step.perfect_selector_agreement([clear], 8, simulations=50) == (1.0, 1.0)
    close = _run([_step(1, 0.5, 1.0, 1.0), _step(2, 0.6, 1.0, 1.0)])
    few, many = (best_step.perfect_selector_agreement([close], samples, simulations=400)[0] for samples in (16, 1024))
    assert few < 0.9 < many, (few, many)
    # Step 1 draws the subject more often but turns the class prompt into it beyond the base's share.
    leaking = {**_run([{**_step(1, 0.3, 1.0, 1.0), "subject": 0.5, "class_subject": 0.4}, _step(2, 0.4, 1.0, 1.0)]),
               "base_class_subject": 0.2}
    assert best_step.perfect_selector_agreement([leaking], 4096, simulations=20) == (1.0, 1.0)


def test_toy_run_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bench", "best-step", "--out", str(out), "--workdir", str(tmp_path / "work"),
                                      "--methods", "lora", "--concepts", "red_circle", "--seeds", "0", "--samples",
                                      "2", "--steps", "2", "--save-every", "1"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main() == 0
    report = json.loads((out / "best_step.json").read_text())
    (run,) = report["runs"]
    assert [item["step"] for item in run["steps"]] == [1, 2] and run["kept_step"] in (1, 2)
    assert all(0.0 <= item["subject"] <= 1.0 and -1.0 <= item["judge"] <= 1.0 for item in run["steps"])
    assert 0.0 <= run["base_class_subject"] <= 1.0
    assert (out / "best_step.md").read_text() == printed.getvalue()
