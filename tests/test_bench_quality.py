"""`python -m lib_sdcustom.bench quality` end to end at a toy size: every stage runs and the report holds
the figures it claims (the real table lives in docs/bench/, produced by the same command at full size)."""

from __future__ import annotations

import json
import shutil
import sys

from PIL import Image

from lib_sdcustom.bench.__main__ import main

SCORES = {"subject_fidelity", "prompt_fidelity", "prompt_and_subject", "class_subject_share", "class_distance",
          "diversity", "train_seconds"}


def run_bench(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["bench", "quality", *args])
    return main()


def test_quality_command_writes_json_table_and_grids_and_merges_shards(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    assert run_bench(monkeypatch, "--out", str(out), "--workdir", str(tmp_path / "runs"), "--methods",
                     "textual_inversion", "dreambooth", "--concepts", "heart", "--steps", "2", "--samples", "2") == 0

    report = json.loads((out / "quality.json").read_text())
    assert set(report["runs"]) == {"textual_inversion", "dreambooth"}
    for runs in report["runs"].values():
        scores = runs["heart"]
        assert set(scores) == SCORES
        assert all(0.0 <= scores[key] <= 1.0 for key in SCORES - {"train_seconds", "diversity"}), scores
        assert scores["train_seconds"] > 0
    base = report["base_quality"]
    assert set(base["reconstruction"]) >= {"shape", "color", "background", "outline"}
    assert base["samples"]["combinations"] == 211

    table = (out / "quality.md").read_text()
    assert "| textual_inversion |" in table and "| dreambooth |" in table
    assert table in capsys.readouterr().out
    assert report["figures"] == ["quality_reference.png", "quality_textual_inversion.png", "quality_dreambooth.png"]
    for name in report["figures"]:  # one concept: three rows of two samples each
        assert Image.open(out / name).size == (2 * 64, 3 * 64), name
    # A checkpoint exported by DreamBooth finds the base's text-encoder folder beside it, as the YAML says.
    assert (tmp_path / "runs" / "dreambooth" / "heart" / "out" / "microworld_text_encoder" / "config.json").is_file()

    # Shards of one run (split by method) merge back into the same report, figures included.
    shards = [tmp_path / "shard_ti", tmp_path / "shard_db"]
    for shard, key in zip(shards, ("textual_inversion", "dreambooth")):
        shard.mkdir()
        part = dict(report, runs={key: report["runs"][key]}, figures=["quality_reference.png", f"quality_{key}.png"],
                    settings=dict(report["settings"], recipes=[r for r in report["settings"]["recipes"] if r["key"] == key]))
        (shard / "quality.json").write_text(json.dumps(part))
        for name in part["figures"]:
            shutil.copyfile(out / name, shard / name)
    merged = tmp_path / "merged"
    assert run_bench(monkeypatch, "--out", str(merged), "--merge", *map(str, shards)) == 0
    joined = json.loads((merged / "quality.json").read_text())
    assert joined["runs"] == report["runs"] and joined["figures"] == report["figures"]
    assert joined["settings"]["processes"] == 2 and joined["settings"]["recipes"] == report["settings"]["recipes"]
    assert all((merged / name).is_file() for name in joined["figures"])
    assert "2 processes side by side" in (merged / "quality.md").read_text()

    # A shard made with other settings is refused, naming the folder.
    other = json.loads((shards[1] / "quality.json").read_text())
    other["settings"]["samples"] = 3
    (shards[1] / "quality.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert run_bench(monkeypatch, "--out", str(merged), "--merge", *map(str, shards)) == 2
    assert str(shards[1]) in capsys.readouterr().err
