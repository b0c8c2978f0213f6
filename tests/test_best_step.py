"""Best-step selection (issue 14): the self-check scores, the kept result, its record, and that selection
changes neither the trained weights nor resume exactness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_until_cancelled
from lib_sdcustom.errors import ConfigError
from lib_sdcustom.events import BestStepKept, StepScored
from lib_sdcustom.run import best_step, train as train_module
from lib_sdcustom.run.train import train
from lib_sdcustom.training.step_selection import DRIFT_WEIGHT, LEAK_WEIGHT, ProbeErrors, StepScore, best, combine
from test_train_network import make_config, trained_state


def selecting_config(tiny_checkpoint: Path, images: Path, out: Path, *, steps: int = 6, select: bool = True):
    config = make_config(tiny_checkpoint, images, out, steps=steps)
    config.training.save_every = 2
    config.training.select_best_step = select
    config.prior.class_prompt = "a photo"
    return config


def test_combine_compares_each_timestep_with_the_start_and_charges_what_the_class_lost():
    reference = ProbeErrors(instance=(0.8, 0.2), drift=(0.4, 0.2), leak=(1.0, 0.5))
    better = combine(3, ProbeErrors(instance=(0.4, 0.1), drift=(0.4, 0.2), leak=(1.0, 0.5)), reference)
    assert (better.fidelity, better.drift, better.leak, better.score) == pytest.approx((0.5, 0.0, 0.0, 0.5))
    low_noise_only = combine(3, ProbeErrors(instance=(0.4, 0.2), drift=(0.4, 0.2), leak=(1.0, 0.5)), reference)
    assert low_noise_only.fidelity == pytest.approx(0.75), "each timestep counts the same, whatever its error size"
    drifted = combine(4, ProbeErrors(instance=(0.4, 0.1), drift=(0.6, 0.3), leak=(1.0, 0.5)), reference)
    assert drifted.drift == pytest.approx(0.5) and drifted.score == pytest.approx(0.5 - DRIFT_WEIGHT * 0.5)
    leaked = combine(4, ProbeErrors(instance=(0.4, 0.1), drift=(0.4, 0.2), leak=(0.5, 0.25)), reference)
    assert leaked.leak == pytest.approx(0.5) and leaked.score == pytest.approx(0.5 - LEAK_WEIGHT * 0.5)
    less_class_error = combine(5, ProbeErrors(instance=(0.8, 0.2), drift=(0.2, 0.1), leak=(2.0, 1.0)), reference)
    assert less_class_error.score == pytest.approx(0.0), "a class error below the start earns nothing"


def test_best_takes_the_highest_score_and_the_earlier_step_on_a_tie():
    errors = ProbeErrors((1.0,), (1.0,), (1.0,))
    scores = [StepScore(2, 0.9, 0.0, 0.0, 0.1, errors), StepScore(4, 0.5, 0.1, 0.0, 0.4, errors),
              StepScore(6, 0.5, 0.1, 0.0, 0.4, errors)]
    assert best(scores).step == 4


def test_selection_is_refused_before_the_model_loads_without_intermediate_exports(tiny_checkpoint, image_folder,
                                                                                  tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "_load_base", no_load)
    config = selecting_config(tiny_checkpoint, image_folder, tmp_path / "out")
    config.training.save_every = 0
    with pytest.raises(ConfigError, match="no intermediate result to choose from") as error:
        train(config)
    assert "--save-every" in error.value.fix
    config.training.save_every, config.prior.class_prompt = 2, ""
    with pytest.raises(ConfigError, match="no class prompt"):
        train(config)


def test_scores_repeat_and_selection_leaves_the_trained_weights_as_they_are(tiny_checkpoint, image_folder, tmp_path):
    events: list[object] = []
    selected = selecting_config(tiny_checkpoint, image_folder, tmp_path / "selected")
    train(selected, callbacks=[events.append])
    plain = selecting_config(tiny_checkpoint, image_folder, tmp_path / "plain", select=False)
    train(plain)
    expected, trained = trained_state(Path(plain.output.run_dir)), trained_state(Path(selected.output.run_dir))
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], atol=0, rtol=0)

    scored = [event for event in events if isinstance(event, StepScored)]
    assert [event.step for event in scored] == [2, 4, 6]
    again = selecting_config(tiny_checkpoint, image_folder, tmp_path / "again")
    repeated: list[object] = []
    train(again, callbacks=[repeated.append])
    assert [event for event in repeated if isinstance(event, StepScored)] == scored


def test_resume_gives_the_same_weights_and_scores(tiny_checkpoint, image_folder, tmp_path):
    whole = selecting_config(tiny_checkpoint, image_folder, tmp_path / "whole", steps=8)
    train(whole)
    halves = selecting_config(tiny_checkpoint, image_folder, tmp_path / "halves", steps=8)
    train_until_cancelled(halves, 5)
    train(halves, resume=Path(halves.output.run_dir))
    expected, resumed = trained_state(Path(whole.output.run_dir)), trained_state(Path(halves.output.run_dir))
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)
    first, second = (json.loads((Path(config.output.run_dir) / best_step.SCORES_FILE).read_text())
                     for config in (whole, halves))
    assert [item["step"] for item in second["scores"]] == [2, 4, 6, 8]
    for a, b in zip(first["scores"], second["scores"]):
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)
        assert b["errors"]["instance"] == pytest.approx(a["errors"]["instance"], abs=1e-5)


def test_the_best_scoring_export_becomes_the_result_and_its_card_records_the_scores(tiny_checkpoint, image_folder,
                                                                                     tmp_path, monkeypatch):
    chosen = 4

    def scores_favouring_step_four(step: int, errors: ProbeErrors, reference: ProbeErrors) -> StepScore:
        return StepScore(step, 1.0, 0.0, 0.0, 1.0 if step == chosen else 0.0, errors)

    monkeypatch.setattr(best_step, "combine", scores_favouring_step_four)
    events: list[object] = []
    config = selecting_config(tiny_checkpoint, image_folder, tmp_path / "out")
    result = train(config, callbacks=[events.append])

    target = result.outputs[0]
    kept = load_file(str(target))
    intermediate = load_file(str(target.parent / f"{target.stem}-steps" / f"{target.stem}-step{chosen:08d}.safetensors"))
    assert kept.keys() == intermediate.keys()
    for key in kept:
        torch.testing.assert_close(kept[key], intermediate[key], atol=0, rtol=0)
    last = load_file(str(target.parent / f"{target.stem}-steps" / f"{target.stem}-step00000006.safetensors"))
    assert any(not torch.equal(kept[key], last[key]) for key in kept), "the last step, kept beside the others, differs"

    with open(target.with_suffix(".json"), encoding="utf-8") as handle:
        card = json.load(handle)[best_step.CARD_KEY]
    assert card["kept_step"] == chosen and card["final_step"] == 6
    assert [item["step"] for item in card["scores"]] == [2, 4, 6]
    assert [item["score"] for item in card["scores"]] == [0.0, 1.0, 0.0]
    assert BestStepKept(chosen, 6) in events


def test_the_tab_and_the_api_status_show_the_scores_per_step_and_the_kept_step():
    from lib_sdcustom.events import CancelToken
    from lib_sdcustom.run.manager import FINISHED, _Run
    from lib_sdcustom.ui.render import result_html

    record = _Run(selecting_config(Path("base.safetensors"), Path("images"), Path("out")), CancelToken(), "the tab")
    for step, score in ((2, 0.1), (4, 0.3), (6, 0.2)):
        record.on_event(StepScored(step, 1 - score, 0.0, 0.0, score))
    record.on_event(BestStepKept(4, 6))
    record.update(state=FINISHED, result="out/test_lora.safetensors")
    status = record.snapshot()
    assert status.to_dict()["kept_step"] == 4 and [item["step"] for item in status.to_dict()["step_scores"]] == [2, 4, 6]
    page = result_html(status)
    assert "<tr data-step='4' data-kept='true'><td>4 (kept)</td><td>0.300</td>" in page and "<th>leak</th>" in page
    assert page.count("data-kept") == 1 and "<tr data-step='6'><td>6</td><td>0.200</td>" in page


@pytest.mark.parametrize("method", ["dreambooth_lora", "dreambooth", "textual_inversion"])
def test_selection_scores_the_instance_pictures_of_every_kind_of_method(tiny_checkpoint, image_folder, tmp_path, method):
    """Prior preservation adds class pictures to each batch and Textual Inversion turns captions into its
    templates: the probe still finds the instance pictures and the prompts they train with."""
    from test_dreambooth import make_config as dreambooth_config

    config = dreambooth_config(tiny_checkpoint, image_folder, tmp_path, method=method, steps=4)
    if method == "textual_inversion":  # no class images (refused): the class prompt is the drift probe only
        config.output.name, config.prior.class_data = "zkword", ""
    config.training.save_every, config.training.select_best_step = 2, True
    result = train(config)
    summary = json.loads((Path(config.output.run_dir) / best_step.SCORES_FILE).read_text())
    assert [item["step"] for item in summary["scores"]] == [2, 4] and summary["kept_step"] in (2, 4)
    assert all(0 < item["fidelity"] < 10 for item in summary["scores"])
    assert result.outputs[0].exists()


def test_dreambooth_with_ema_is_scored_on_the_ema_it_exports_and_trains_on_unchanged(tiny_checkpoint, image_folder,
                                                                                      tmp_path, monkeypatch):
    """The export of a DreamBooth run with EMA holds the EMA, so that is what each step's score must judge; the
    swap in and out leaves the raw weights, and so the training, bit for bit as without selection."""
    from lib_sdcustom.training.step_selection import StepScorer
    from test_dreambooth import make_config as dreambooth_config

    def ema_config(name: str, select: bool):
        config = dreambooth_config(tiny_checkpoint, image_folder, tmp_path / name, steps=4, prior=False)
        config.dreambooth.ema, config.dreambooth.ema_decay = True, 0.5
        config.training.save_every, config.training.select_best_step = 2, select
        config.prior.class_prompt, config.training.keep_final_state = "a photo", True
        return config

    measured: list[dict[str, torch.Tensor]] = []
    measure = StepScorer.measure

    def remembering_the_unet(scorer: StepScorer) -> ProbeErrors:
        measured.append({key: value.clone() for key, value in scorer.bundle.unet.named_parameters()})
        return measure(scorer)

    monkeypatch.setattr(StepScorer, "measure", remembering_the_unet)
    selected = ema_config("selected", True)
    train(selected)
    state = trained_state(Path(selected.output.run_dir))
    assert len(measured) == 3  # the starting point, steps 2 and 4
    for key, value in measured[-1].items():
        assert torch.equal(value, state["ema." + key]), key
    assert any(not torch.equal(state["ema." + key], state["unet." + key]) for key in measured[-1])

    plain = ema_config("plain", False)
    train(plain)
    for key, value in trained_state(Path(plain.output.run_dir)).items():
        assert torch.equal(state[key], value), key
