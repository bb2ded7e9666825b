"""``iris data synth`` and ``iris data check`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

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
