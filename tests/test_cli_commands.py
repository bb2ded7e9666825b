"""``iris ask``, ``iris info`` and ``iris history`` through typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeBackend
from tiny_models import save_tiny_llava
from typer.testing import CliRunner

from cli import runtime
from cli.app import app

runner = CliRunner()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend(["Paris, of course."])
    monkeypatch.setattr(runtime, "open_backend", lambda settings, paths: backend)
    return backend


def test_ask_prints_only_the_answer(fake: FakeBackend) -> None:
    result = runner.invoke(app, ["ask", "What is the capital of France?", "--temperature", "0"])
    assert result.exit_code == 0
    assert result.stdout == "Paris, of course.\n"
    assert fake.calls[0]["options"].temperature == 0


def test_ask_json_record_with_images(fake: FakeBackend, sample_png: Path, sample_jpg: Path) -> None:
    result = runner.invoke(app, ["ask", "compare", "--image", str(sample_png), "-i", str(sample_jpg), "--json"])
    record = json.loads(result.stdout)
    assert record["answer"] == "Paris, of course." and record["model"] == "fake"
    assert [(i["width"], i["height"]) for i in record["images"]] == [(64, 64), (48, 32)]
    assert len(fake.calls[0]["messages"][-1].images) == 2


@pytest.mark.parametrize("args, expected", [
    (["--image", "/no/such/file.png"], "/no/such/file.png: no such file"),
    (["--quant", "3bit"], "--quant must be one of"),
    (["--temperature", "-1"], "temperature must be >= 0"),
])
def test_ask_errors_are_one_line_without_traceback(fake: FakeBackend, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["ask", "hi", *args])
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert runner.invoke(app, ["history", "list"]).stdout == ""  # nothing was stored


def test_missing_model_path_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ask", "hi", "--model", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "no such file or directory" in result.output and "Traceback" not in result.output


def test_ask_with_images_on_a_real_tiny_llava(tmp_path: Path, sample_png: Path) -> None:
    model_dir = save_tiny_llava(tmp_path / "llava")
    result = runner.invoke(app, ["ask", "what is this?", "--image", str(sample_png), "--model", str(model_dir),
                                 "--json", "--max-new-tokens", "4", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] > 5 and record["images"][0]["width"] == 64


def test_info_reports_the_model(tmp_path: Path) -> None:
    model_dir = save_tiny_llava(tmp_path / "llava")
    result = runner.invoke(app, ["info", "--model", str(model_dir), "--quant", "4bit"])
    assert result.exit_code == 0, result.output
    for expected in ("model: llava", "device: cpu", "quantization: 4bit", "context length: 512",
                     "accepts images: True", "memory bytes:"):
        assert expected in result.stdout


def test_history_list_show_export_delete(fake: FakeBackend, sample_png: Path, tmp_path: Path) -> None:
    runner.invoke(app, ["ask", "describe this", "--image", str(sample_png)])
    listed = runner.invoke(app, ["history", "list"])
    assert "#1" in listed.stdout and "2 messages" in listed.stdout
    shown = runner.invoke(app, ["history", "show", "1"])
    assert "user [1 image(s)]: describe this" in shown.stdout and "assistant: Paris, of course." in shown.stdout
    out = tmp_path / "data"
    assert runner.invoke(app, ["history", "export", "1", "--out", str(out)]).exit_code == 0
    record = json.loads((out / "dataset.json").read_text())[0]
    assert [c["from"] for c in record["conversations"]] == ["system", "human", "gpt"]
    assert (out / record["image"]).is_file()
    assert runner.invoke(app, ["history", "delete", "1"]).exit_code == 0
    gone = runner.invoke(app, ["history", "show", "1"])
    assert gone.exit_code == 1 and "no conversation with id 1" in gone.output
