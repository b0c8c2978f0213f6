"""`python -m lib_sdcustom.bench quality --quick` end to end: every stage runs and the report holds the
figures it claims, with intervals (the real table lives in docs/bench/, produced by the same command at
full size)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from lib_sdcustom.bench.__main__ import main
from lib_sdcustom.bench.quality import QUICK, UNRELATED

VERDICTS = {"subject", "prompt", "prompt_and_subject", "class_subject", "unrelated_subject", "unrelated_fidelity"}
FIGURES = {"class_distance", "diversity", "train_seconds"}
METHODS = QUICK.methods
KINDS = ("Unseen combination", "Known subject", "Style")


def run_bench(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["bench", "quality", *args])
    return main()


@dataclass
class BenchRun:
    root: Path
    out: Path
    exit_code: int
    printed: str

    @property
    def report(self) -> dict:
        return json.loads((self.out / "quality.json").read_text())


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> BenchRun:
    """The --quick run (Textual Inversion and DreamBooth, one concept of each kind, two seeds, two steps),
    shared: it is the slow part."""
    root = tmp_path_factory.mktemp("quality")
    out, printed = root / "report", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        code = run_bench(patch, "--quick", "--out", str(out), "--workdir", str(root / "runs"))
    return BenchRun(root, out, code, printed.getvalue())


def write_shards(run: BenchRun, folder: Path) -> list[Path]:
    """The report split by method, as two processes of one run would have written it."""
    report, shards = run.report, []
    for key in METHODS:
        shard = folder / f"shard_{key}"
        shard.mkdir(parents=True)
        part = dict(report, runs={key: report["runs"][key]}, figures=["quality_reference.png", f"quality_{key}.png"],
                    settings=dict(report["settings"], recipes=[r for r in report["settings"]["recipes"] if r["key"] == key]))
        (shard / "quality.json").write_text(json.dumps(part))
        for name in part["figures"]:
            shutil.copyfile(run.out / name, shard / name)
        shards.append(shard)
    return shards


def test_quality_command_writes_json_table_and_grids(bench_run):
    assert bench_run.exit_code == 0
    report = bench_run.report
    assert set(report["runs"]) == set(METHODS) and list(report["baselines"]) == list(QUICK.concepts)
    for runs in report["runs"].values():
        assert set(runs) == set(QUICK.concepts)
        for seeds in runs.values():
            assert set(seeds) == {"0", "1"}
            for scores in seeds.values():
                assert set(scores) == VERDICTS | FIGURES
                assert all(len(scores[key]) == 2 and set(scores[key]) <= {0, 1} for key in VERDICTS - {
                    "unrelated_subject", "unrelated_fidelity"}), scores
                # at least one sample of every prompt without the trigger
                assert len(scores["unrelated_subject"]) == len(scores["unrelated_fidelity"]) == len(UNRELATED)
                assert 0.0 <= scores["class_distance"] <= 1.0 and scores["train_seconds"] > 0
    assert report["base_quality"] == {}  # --quick skips the base model's check over every caption
    assert set(report["ceilings"]) == set(QUICK.concepts) and all(0.5 < c <= 1.0 for c in report["ceilings"].values())

    table = (bench_run.out / "quality.md").read_text()
    assert table in bench_run.printed
    for kind in KINDS:
        assert f"### {kind}:" in table
    rows = [line for line in table.splitlines() if line.startswith(("| textual_inversion |", "| dreambooth |"))]
    verdicts = [line for line in rows if " met" in line or " by " in line]
    assert len(verdicts) == 2 * 3, "a row per method and kind against the targets"
    figures = [line for line in rows if line not in verdicts]
    assert len(figures) == 2 * 4  # a row per method in each kind's table and in the per-concept one
    assert all(line.count(" [") >= 3 for line in figures), "every figure carries its interval"
    assert ("textual_inversion 2 / 0.05 / 4; dreambooth 2 / 0.0002 / 4, 25% of the class images of the class "
            "prompt, style mode on styles.") in table
    assert report["figures"] == ["quality_reference.png", "quality_textual_inversion.png", "quality_dreambooth.png"]
    for name in report["figures"]:  # three concepts, four rows of two samples each
        assert Image.open(bench_run.out / name).size == (2 * 64, 3 * 4 * 64), name
    # A checkpoint exported by DreamBooth finds the base's text-encoder folder beside it, as the YAML says.
    concept = QUICK.concepts[0]
    assert (bench_run.root / "runs" / "dreambooth" / concept / "seed0" / "out" / "microworld_text_encoder" /
            "config.json").is_file()


def test_shards_of_one_run_merge_into_the_same_report(bench_run, tmp_path, monkeypatch):
    report = bench_run.report
    merged = tmp_path / "merged"
    assert run_bench(monkeypatch, "--out", str(merged), "--merge", *map(str, write_shards(bench_run, tmp_path))) == 0
    joined = json.loads((merged / "quality.json").read_text())
    assert joined["runs"] == report["runs"] and joined["figures"] == report["figures"]
    assert joined["settings"]["processes"] == 2 and joined["settings"]["recipes"] == report["settings"]["recipes"]
    assert all((merged / name).is_file() for name in joined["figures"])
    assert "2 processes side by side" in (merged / "quality.md").read_text()
    # A merged report joins a later shard (a new recipe's rows beside the table's) and counts its processes.
    again = tmp_path / "again"
    later = write_shards(bench_run, tmp_path / "later")[0]
    assert run_bench(monkeypatch, "--out", str(again), "--merge", str(merged), str(later)) == 0
    assert json.loads((again / "quality.json").read_text())["settings"]["processes"] == 3


def test_shards_split_by_concept_merge_and_the_merge_keeps_the_concepts_asked_for(bench_run, tmp_path, monkeypatch):
    """Two shards each holding every recipe on some concepts; an older shard without ceilings has them measured."""
    report = bench_run.report
    shards = []
    for index, concepts in enumerate((QUICK.concepts[:1], QUICK.concepts[1:])):
        shard = tmp_path / f"shard{index}"
        shard.mkdir()
        part = dict(report, baselines={name: report["baselines"][name] for name in concepts},
                    runs={key: {name: runs[name] for name in concepts} for key, runs in report["runs"].items()})
        if index:
            del part["ceilings"]
        (shard / "quality.json").write_text(json.dumps(part))
        for name in part["figures"]:
            shutil.copyfile(bench_run.out / name, shard / name)
        shards.append(shard)
    merged = tmp_path / "merged"
    assert run_bench(monkeypatch, "--out", str(merged), "--merge", *map(str, shards)) == 0
    joined = json.loads((merged / "quality.json").read_text())
    assert joined["runs"] == report["runs"] and joined["baselines"] == report["baselines"]
    assert joined["ceilings"] == pytest.approx(report["ceilings"])
    kept = tmp_path / "kept"
    assert run_bench(monkeypatch, "--out", str(kept), "--merge", *map(str, shards), "--concepts", QUICK.concepts[0]) == 0
    assert list(json.loads((kept / "quality.json").read_text())["baselines"]) == [QUICK.concepts[0]]
    # A rerun in front replaces a recipe's figures on its concepts; the others keep theirs.
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    first = QUICK.concepts[0]
    seconds = {seed: {**runs, "train_seconds": 1234.0} for seed, runs in report["runs"]["dreambooth"][first].items()}
    (rerun / "quality.json").write_text(json.dumps(dict(report, baselines={first: report["baselines"][first]},
                                                        runs={"dreambooth": {first: seconds}},
                                                        figures=report["figures"][:1])))
    shutil.copyfile(bench_run.out / report["figures"][0], rerun / report["figures"][0])
    replaced = tmp_path / "replaced"
    assert run_bench(monkeypatch, "--out", str(replaced), "--merge", str(rerun), *map(str, shards)) == 0
    runs = json.loads((replaced / "quality.json").read_text())["runs"]
    assert runs["dreambooth"][first] == seconds
    assert runs["dreambooth"][QUICK.concepts[1]] == report["runs"]["dreambooth"][QUICK.concepts[1]]
    assert runs["textual_inversion"] == report["runs"]["textual_inversion"]


def test_a_merge_missing_a_recipe_on_a_concept_says_which(bench_run, tmp_path, monkeypatch, capsys):
    report = bench_run.report
    shard = tmp_path / "shard"
    shard.mkdir()
    runs = {key: dict(by_concept) for key, by_concept in report["runs"].items()}
    del runs["dreambooth"][QUICK.concepts[0]]
    (shard / "quality.json").write_text(json.dumps(dict(report, runs=runs)))
    for name in report["figures"]:
        shutil.copyfile(bench_run.out / name, shard / name)
    assert run_bench(monkeypatch, "--out", str(tmp_path / "merged"), "--merge", str(shard)) == 2
    assert f"dreambooth on {QUICK.concepts[0]}" in capsys.readouterr().err
    # Keeping only the complete recipes merges: a variant stopped part way stays out, grid and all.
    kept = tmp_path / "kept"
    assert run_bench(monkeypatch, "--out", str(kept), "--merge", str(shard), "--methods", "textual_inversion") == 0
    joined = json.loads((kept / "quality.json").read_text())
    assert list(joined["runs"]) == ["textual_inversion"] and joined["runs"]["textual_inversion"] == runs["textual_inversion"]
    assert [recipe["key"] for recipe in joined["settings"]["recipes"]] == ["textual_inversion"]
    assert joined["figures"] == ["quality_reference.png", "quality_textual_inversion.png"]
    assert not (kept / "quality_dreambooth.png").exists()


def test_shards_whose_base_measures_differ_by_float_rounding_merge_but_other_verdicts_do_not(bench_run, tmp_path,
                                                                                            monkeypatch):
    """Processes that split the work otherwise round the base model's diversity differently in the last bits."""
    shards = write_shards(bench_run, tmp_path)
    part = json.loads((shards[1] / "quality.json").read_text())
    baseline = next(iter(part["baselines"].values()))
    baseline["instance_diversity"] += 1e-7
    (shards[1] / "quality.json").write_text(json.dumps(part))
    assert run_bench(monkeypatch, "--out", str(tmp_path / "merged"), "--merge", *map(str, shards)) == 0
    verdicts = baseline["scores"]["subject"]
    verdicts[0] = 1 - verdicts[0]
    (shards[1] / "quality.json").write_text(json.dumps(part))
    assert run_bench(monkeypatch, "--out", str(tmp_path / "refused"), "--merge", *map(str, shards)) == 2


def test_a_shard_made_with_other_settings_is_refused_naming_its_folder(bench_run, tmp_path, monkeypatch, capsys):
    shards = write_shards(bench_run, tmp_path)
    other = json.loads((shards[1] / "quality.json").read_text())
    other["settings"]["samples"] = 3
    (shards[1] / "quality.json").write_text(json.dumps(other))
    assert run_bench(monkeypatch, "--out", str(tmp_path / "merged"), "--merge", *map(str, shards)) == 2
    assert str(shards[1]) in capsys.readouterr().err


def test_the_style_recipe_regularizes_on_its_captions_without_the_identifier(tmp_path):
    """lora_style: captions name everything but the style, the identifier alone is the trigger, and the class
    images show the same captions without it (what prompts without the trigger must keep drawing)."""
    from lib_sdcustom.bench.quality import run_config
    from lib_sdcustom.bench.recipes import recipes_named
    from lib_sdcustom.data.scan import read_caption
    from lib_sdcustom.methods.prior import class_prompts
    from lib_sdcustom.methods.registry import method_class
    from lib_sdcustom.microworld.world import CONCEPTS

    config = run_config(recipes_named(["lora_style"])[0], CONCEPTS["outline_style"], tmp_path, tmp_path / "base",
                        tmp_path / "class")
    captions = [read_caption(path) for path in sorted(Path(config.data.data).glob("*.txt"))]
    assert captions[0] == "a sks blue square on a white background"
    trigger = method_class(config.method).trigger_phrase(config, captions)
    assert trigger == "sks" and config.prior_enabled and not config.plain_prompts
    assert class_prompts(config.prior, captions, trigger, plain=False)[:2] == ["a shape", "a blue square on a white background"]


@pytest.mark.parametrize("key", ["dreambooth", "dreambooth_lora_class_quarter"])
def test_dreambooth_recipes_train_a_style_in_style_mode_behind_the_identifier(tmp_path, key):
    """On a style DreamBooth captions with [filewords] as the networks do, the identifier put in front."""
    from lib_sdcustom.bench.quality import run_config
    from lib_sdcustom.bench.recipes import recipes_named
    from lib_sdcustom.methods.registry import method_class
    from lib_sdcustom.microworld.world import CONCEPTS

    config = run_config(recipes_named([key])[0], CONCEPTS["outline_style"], tmp_path, tmp_path / "base",
                        tmp_path / "class")
    config.validate()
    assert config.prior.style and config.dreambooth.instance_prompt == "[filewords]"
    assert method_class(config.method).trigger_phrase(config, ["a sks blue square on a white background"]) == "sks"


def test_each_table_row_trains_with_its_methods_shipped_regularization_and_schedule(tmp_path):
    """The table rates the defaults a user gets (rates, steps and batch aside: the micro model's own)."""
    from lib_sdcustom.bench.quality import TABLE_METHODS, run_config
    from lib_sdcustom.bench.recipes import recipes_named
    from lib_sdcustom.config import RunConfig
    from lib_sdcustom.microworld.world import CONCEPTS

    for recipe in recipes_named(TABLE_METHODS):
        for concept in "red_circle", "outline_style":
            config = run_config(recipe, CONCEPTS[concept], tmp_path / recipe.key / concept, tmp_path / "base",
                                tmp_path / "class")
            shipped = RunConfig(method=recipe.method)
            shipped.prior.style = config.prior.style
            assert (config.scheduler, config.prior_enabled) == (shipped.scheduler, "prior" in shipped.spec.sections)
            if config.prior_enabled:
                assert ((config.prior_weight, config.class_prompt_share)
                        == (shipped.prior_weight, shipped.class_prompt_share)), (recipe.key, concept)


def test_a_regularized_recipe_runs_style_mode_on_a_style_and_prior_preservation_on_a_subject(tmp_path):
    """lora_regularized: class images of the class prompt and of varied plain prompts for every concept, and on a
    style, style mode (captions naming everything but the style)."""
    from lib_sdcustom.bench.quality import run_config
    from lib_sdcustom.bench.recipes import recipes_named
    from lib_sdcustom.microworld.world import CONCEPTS

    recipe = recipes_named(["lora_regularized"])[0]
    subject = run_config(recipe, CONCEPTS["red_circle"], tmp_path / "subject", tmp_path / "base", tmp_path / "class")
    style = run_config(recipe, CONCEPTS["outline_style"], tmp_path / "style", tmp_path / "base", tmp_path / "class")
    for config in subject, style:
        assert config.prior.prior_preservation and Path(config.prior.class_prompt_file).is_file()
        assert config.prior.num_class_images == 80
    assert style.prior.style and not subject.prior.style
    assert subject.prior.class_prompt_share == 0.0, "an even split unless a recipe says otherwise"
    half = run_config(recipes_named(["lora_class_half"])[0], CONCEPTS["red_circle"], tmp_path / "half",
                      tmp_path / "base", tmp_path / "class")
    assert half.prior.class_prompt_share == 0.5 and half.scheduler == "cosine"


def test_the_targets_table_says_by_how_much_each_figure_misses(tmp_path):
    """A run that learns the concept on every sample but turns the class prompt into it half the time: met,
    met, over by 0.40 (base 0, margin 0.1), met; two seeds of 64 identical verdicts give exact intervals."""
    from lib_sdcustom.bench.quality import BenchResult, targets_table

    def scores(subject: int, class_subject: int) -> dict:
        return {"subject": [subject] * 64, "prompt": [1] * 64, "prompt_and_subject": [subject] * 64,
                "class_subject": [1, 0] * 32 if class_subject else [0] * 64, "unrelated_subject": [0] * 64,
                "unrelated_fidelity": [1] * 64, "class_distance": 0.0, "diversity": 0.1, "train_seconds": 1.0}

    result = BenchResult({}, {"red_circle": {"scores": scores(0, 0), "instance_diversity": 0.1}},
                         {"lora": {"red_circle": {"0": scores(1, 1), "1": scores(1, 1)}}}, {}, [])
    rows = [line for line in targets_table(result) if line.startswith("| lora |")]
    assert rows == ["| lora | known subject | 1.00 met | 1.00 met | 0.50 over by 0.40 | 0.00 met |"]
    noisy = BenchResult({}, result.baselines, {"lora": {"red_circle": {"0": scores(1, 0), "1": scores(0, 0)}}}, {}, [])
    assert "0.50 short by 0.30, +-0.50" in targets_table(noisy)[-2]


def test_a_miss_that_rounds_to_the_target_is_named_with_three_decimals():
    """0.798 against 0.8 is a miss; two decimals would print it as '0.80 short by 0.00'."""
    from lib_sdcustom.bench.intervals import Estimate
    from lib_sdcustom.bench.quality import _target_cell

    assert _target_cell(Estimate(0.798, 0.76, 0.84), 0.8, at_least=True) == "0.798 short by 0.002"
    assert _target_cell(Estimate(0.34, 0.3, 0.4), 0.24, at_least=False) == "0.34 over by 0.10"
    assert _target_cell(Estimate(0.8, 0.76, 0.84), 0.8, at_least=True) == "0.80 met"


def test_the_recipe_line_names_a_text_encoder_rate_set_apart_from_the_unets():
    """Two DreamBooth rows that differ only in the text encoder's rate must not read the same in the report."""
    from dataclasses import asdict

    from lib_sdcustom.bench.recipes import recipe_line, recipes_named

    line = recipe_line([asdict(recipe) for recipe in recipes_named(["dreambooth_te_fast", "dreambooth_prior_half"])])
    assert "dreambooth_te_fast 300 / 0.0002 (text encoder 0.0004) / 4," in line
    assert "dreambooth_prior_half 300 / 0.0002 / 4," in line


def test_the_recipe_line_names_a_min_snr_gamma_other_than_the_default():
    """The min-SNR sweep's rows differ from LoRA's only in gamma; the report must tell them apart."""
    from dataclasses import asdict

    from lib_sdcustom.bench.recipes import recipe_line, recipes_named

    line = recipe_line([asdict(recipe) for recipe in
                         recipes_named(["lora_quarter_snr_off", "lora_quarter_snr1", "lora_class_quarter"])])
    rows = dict(part.split(" ", 1) for part in line.split(": ", 1)[1].rstrip(".").split("; "))
    assert "min-SNR off" in rows["lora_quarter_snr_off"]
    assert "min-SNR gamma 1," in rows["lora_quarter_snr1"]
    assert "min-SNR" not in rows["lora_class_quarter"]


def test_the_recipe_line_names_an_exported_moving_average_and_a_weight_kept_for_styles(tmp_path):
    """dreambooth_prior_half_ema differs from DreamBooth's row only in exporting the UNet's EMA, and
    dreambooth_prior_by_mode from dreambooth_prior_quarter only on styles."""
    from dataclasses import asdict

    from lib_sdcustom.bench.quality import run_config
    from lib_sdcustom.bench.recipes import recipe_line, recipes_named
    from lib_sdcustom.microworld.world import CONCEPTS

    recipes = recipes_named(["dreambooth_prior_half_ema", "dreambooth_prior_half"])
    line = recipe_line([asdict(recipe) for recipe in recipes])
    rows = dict(part.split(" ", 1) for part in line.split(": ", 1)[1].rstrip(".").split("; "))
    assert "moving average" in rows["dreambooth_prior_half_ema"]
    assert "moving average" not in rows["dreambooth_prior_half"]
    by_mode = recipe_line([asdict(recipe) for recipe in recipes_named(["dreambooth_prior_by_mode"])])
    assert "class images' loss at weight 0.25 (1 on styles)" in by_mode
    configs = [run_config(recipe, CONCEPTS["red_circle"], tmp_path / recipe.key, tmp_path / "base", tmp_path / "class")
               for recipe in recipes]
    assert [config.dreambooth.ema for config in configs] == [True, False]


def test_the_network_levers_reach_the_run_and_the_recipe_line(tmp_path):
    """locon_conv_half differs from LoCon's row only in its convolutions' alpha, lora_quarter_stratified from
    LoRA's only in how its timesteps are drawn, lora_quarter_dropout only in its dropout, lora_quarter_plus16
    in its up matrices' ratio and a quarter of the rates, lora_quarter_flip in its mirrored pictures,
    lora_quarter_dora in DoRA and lora_quarter_noise_offset in its noise offset."""
    from dataclasses import asdict

    from lib_sdcustom.bench.quality import run_config
    from lib_sdcustom.bench.recipes import recipe_line, recipes_named
    from lib_sdcustom.microworld.world import CONCEPTS

    recipes = recipes_named(["locon_conv_half", "locon_regularized_cosine", "lora_quarter_stratified",
                             "lora_quarter_dropout", "lora_quarter_plus16", "lora_quarter_flip",
                             "lora_quarter_dora", "lora_quarter_noise_offset"])
    line = recipe_line([asdict(recipe) for recipe in recipes])
    rows = dict(part.split(" ", 1) for part in line.split(": ", 1)[1].rstrip(".").split("; "))
    assert "convolutions' alpha 0.5 x rank" in rows["locon_conv_half"]
    assert "convolutions" not in rows["locon_regularized_cosine"]
    assert "stratified timesteps" in rows["lora_quarter_stratified"]
    assert "stratified" not in rows["locon_conv_half"] + rows["locon_regularized_cosine"]
    assert ", dropout 0.1," in rows["lora_quarter_dropout"]
    assert "dropout" not in rows["lora_quarter_stratified"]
    assert rows["lora_quarter_plus16"].startswith("600 / 0.00075 (text encoder 0.0015) /")
    assert ", LoRA+ up matrices at 16 x the rate" in rows["lora_quarter_plus16"]
    assert "LoRA+" not in rows["lora_quarter_dropout"]
    assert ", pictures mirrored half the time," in rows["lora_quarter_flip"]
    assert "mirrored" not in rows["lora_quarter_plus16"]
    assert rows["lora_quarter_dora"].endswith("/ 4 / 8, DoRA, cosine decay, 25% of the class images of the class prompt, "
                                              "style mode on styles")
    assert "DoRA" not in rows["lora_quarter_flip"]
    assert rows["lora_quarter_noise_offset"].endswith(", noise offset 0.1, style mode on styles")
    assert "noise offset" not in rows["lora_quarter_dora"]
    configs = [run_config(recipe, CONCEPTS["red_circle"], tmp_path / recipe.key, tmp_path / "base", tmp_path / "class")
               for recipe in recipes]
    alphas = [(config.network.alpha, config.network.conv_alpha) for config in configs]
    assert alphas == [(8.0, 4.0)] + [(8.0, 8.0)] * 7
    assert [config.training.timestep_sampling for config in configs] == ["uniform", "uniform", "stratified"] + ["uniform"] * 5
    assert [config.network.dropout for config in configs] == [0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0]
    assert [config.network.loraplus_lr_ratio for config in configs] == [1.0, 1.0, 1.0, 1.0, 16.0, 1.0, 1.0, 1.0]
    assert [config.data.flip for config in configs] == [False] * 5 + [True, False, False]
    assert [config.network.dora for config in configs] == [False] * 6 + [True, False]
    assert [config.training.noise_offset for config in configs] == [0.0] * 7 + [0.1]


def _shard(report: dict, folder: Path, out: Path, *, seeds: dict[str, str], recipes: list[dict] | None = None) -> Path:
    """A copy of `report` whose runs are those of the seeds named in `seeds` (new name: stored seed)."""
    folder.mkdir(parents=True)
    runs = {key: {name: {new: by_seed[old] for new, old in seeds.items()} for name, by_seed in by_concept.items()}
            for key, by_concept in report["runs"].items()}
    settings = dict(report["settings"], seeds=[int(seed) for seed in seeds])
    if recipes is not None:
        settings["recipes"] = recipes
        runs = {key: by_concept for key, by_concept in runs.items() if key in {recipe["key"] for recipe in recipes}}
    (folder / "quality.json").write_text(json.dumps(dict(report, runs=runs, settings=settings)))
    for name in report["figures"]:
        shutil.copyfile(out / name, folder / name)
    return folder


def test_shards_split_by_seed_merge_and_a_recipe_lacking_a_seed_is_named(bench_run, tmp_path, monkeypatch, capsys):
    report = bench_run.report
    shards = [_shard(report, tmp_path / f"seed{seed}", bench_run.out, seeds={seed: seed}) for seed in ("0", "1")]
    merged = tmp_path / "merged"
    assert run_bench(monkeypatch, "--out", str(merged), "--merge", *map(str, shards)) == 0
    joined = json.loads((merged / "quality.json").read_text())
    assert joined["runs"] == report["runs"] and joined["settings"]["seeds"] == [0, 1]
    # A third seed run for one recipe: the merge keeps that recipe with all three seeds when asked to...
    ti = [recipe for recipe in report["settings"]["recipes"] if recipe["key"] == "textual_inversion"]
    third = _shard(report, tmp_path / "seed2", bench_run.out, seeds={"2": "0"}, recipes=ti)
    three = tmp_path / "three"
    assert run_bench(monkeypatch, "--out", str(three), "--merge", str(merged), str(third),
                     "--methods", "textual_inversion") == 0
    joined = json.loads((three / "quality.json").read_text())
    assert joined["settings"]["seeds"] == [0, 1, 2] and list(joined["runs"]) == ["textual_inversion"]
    assert all(sorted(by_seed) == ["0", "1", "2"] for by_seed in joined["runs"]["textual_inversion"].values())
    assert "training seeds 0, 1, 2" in (three / "quality.md").read_text()
    # ...and names what the others lack rather than mixing two seed counts in one table.
    assert run_bench(monkeypatch, "--out", str(tmp_path / "mixed"), "--merge", str(merged), str(third)) == 2
    assert f"dreambooth on {QUICK.concepts[0]} with seed(s) 2" in capsys.readouterr().err


def test_a_seed_shard_of_a_recipe_run_with_other_settings_is_refused(bench_run, tmp_path, monkeypatch, capsys):
    report = bench_run.report
    changed = [dict(recipe, steps=recipe["steps"] + 1) for recipe in report["settings"]["recipes"]
               if recipe["key"] == "textual_inversion"]
    third = _shard(report, tmp_path / "seed2", bench_run.out, seeds={"2": "0"}, recipes=changed)
    assert run_bench(monkeypatch, "--out", str(tmp_path / "merged"), "--merge", str(bench_run.out), str(third),
                     "--methods", "textual_inversion") == 2
    assert "ran textual_inversion with other settings" in capsys.readouterr().err
