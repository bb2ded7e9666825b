"""``iris data synth`` and ``iris data check`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def test_synth_then_check_ok(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--n", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote 5 samples to {out / 'dataset.json'}"
    assert len(json.loads((out / "dataset.json").read_text())) == 5

    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"OK: {out}: 5 samples, ")
    assert lines[0].endswith(", 5 distinct images")


def test_check_prints_each_problem_and_exits_1(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hey"}],
              "images": ["gone.png"]}
    data_file = tmp_path / "data.jsonl"
    data_file.write_text(json.dumps(record) + "\nnot json\n")

    result = runner.invoke(app, ["data", "check", str(tmp_path)])

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "OK" not in result.stdout
    assert lines[0].startswith(f"{data_file}:1: ") and "gone.png: no such file" in lines[0]
    assert lines[1].startswith(f"{data_file}:2: invalid JSON")


def test_synth_into_a_used_directory_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--n", "2"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "not empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert result.stdout == ""


def test_synth_a_first_stage_set_and_the_eval_suite(tmp_path: Path) -> None:
    single = tmp_path / "single"
    result = runner.invoke(app, ["data", "synth", "--out", str(single), "--n", "6", "--max-objects", "1"])
    assert result.exit_code == 0, result.output
    assert {record["scene"]["count"] for record in json.loads((single / "dataset.json").read_text())} == {1}

    suite = tmp_path / "suite"
    result = runner.invoke(app, ["data", "synth", "--eval-suite", "--out", str(suite), "--per-skill", "2",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ("wrote 12 questions (2 per skill: colour, shape, count, side, describe, pope) "
                                     f"to {suite / 'dataset.json'}")
    records = json.loads((suite / "dataset.json").read_text())
    assert [record["category"] for record in records] == [skill for skill in
                                                          ("colour", "shape", "count", "side", "describe", "pope")
                                                          for _ in range(2)]
    result = runner.invoke(app, ["data", "check", str(suite)])
    assert result.exit_code == 0 and result.stdout.startswith(f"OK: {suite}: 12 samples, 24 turns"), result.output

    compare = tmp_path / "compare"
    result = runner.invoke(app, ["data", "synth", "--compare", "--out", str(compare), "--n", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote 4 text-only yes/no samples to {compare / 'data.jsonl'}"
    result = runner.invoke(app, ["data", "check", str(compare)])
    assert result.exit_code == 0 and result.stdout.startswith(f"OK: {compare}: 4 samples, 8 turns"), result.output


@pytest.mark.parametrize(("flags", "message"), [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--max-objects", "5"], "--max-objects must be between 1 and 4, got 5"),
    (["--max-objects", "0"], "--max-objects must be between 1 and 4, got 0"),
    (["--eval-suite", "--per-skill", "0"], "--per-skill must be at least 1, got 0"),
    (["--per-skill", "3"], "--per-skill sizes the eval suite; add --eval-suite (or use --n for a training set)"),
    (["--eval-suite", "--n", "5"], "--n and --max-objects shape a training set; the eval suite takes --per-skill"),
    (["--eval-suite", "--max-objects", "1"],
     "--n and --max-objects shape a training set; the eval suite takes --per-skill"),
    (["--compare", "--n", "0"], "--n must be at least 1, got 0"),
    (["--compare", "--eval-suite"], "--compare writes text-only samples: it takes --n and --seed only"),
    (["--compare", "--max-objects", "2"], "--compare writes text-only samples: it takes --n and --seed only"),
])
def test_synth_bad_values_are_one_line_errors(flags: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: {message}" and result.stdout == ""
    assert not (tmp_path / "out").exists()
