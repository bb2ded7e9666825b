"""Settings layering: defaults < config.toml < IRIS_* env < flags; bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant.config import GenerationOptions, ModelOptions, Paths, load_settings
from assistant.errors import BadSetting
from cli.runtime import resolve_settings


def test_iris_home_moves_every_directory(iris_home: Path) -> None:
    paths = Paths.default()
    assert paths.database == iris_home / "data" / "iris.db"
    assert paths.config_file == iris_home / "config" / "config.toml"


def test_file_then_env_then_flags(iris_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths.default()
    paths.config.mkdir(parents=True)
    paths.config_file.write_text('model = "from-file"\nquant = "8bit"\nsystem_prompt = "file prompt"\n'
                                 '[generation]\ntemperature = 0.3\ntop_k = 5\n')
    monkeypatch.setenv("IRIS_TOP_K", "9")
    monkeypatch.setenv("IRIS_QUANT", "none")
    settings = load_settings(paths)
    assert settings.model == ModelOptions(model="from-file", quant="none")
    assert (settings.generation.temperature, settings.generation.top_k) == (0.3, 9)
    assert settings.system_prompt == "file prompt"
    flagged = resolve_settings(paths, model="flag-model", adapters=["a"], system="flag prompt")
    assert flagged.model.model == "flag-model" and flagged.model.adapters == ("a",)
    assert flagged.model.quant == "none" and flagged.system_prompt == "flag prompt"


@pytest.mark.parametrize("content, expected", [
    ("quant = \"3bit\"\n", "config.toml: quant must be one of"),
    ("[generation]\ntemperature = \"warm\"\n", "temperature needs a number"),
    ("colour = 1\n", "unknown keys colour"),
    ("this is not toml", "config.toml"),
])
def test_bad_config_files(iris_home: Path, content: str, expected: str) -> None:
    paths = Paths.default()
    paths.config.mkdir(parents=True)
    paths.config_file.write_text(content)
    with pytest.raises(BadSetting, match=expected) as error:
        load_settings(paths)
    assert "\n" not in str(error.value)


def test_generation_option_parsing() -> None:
    options = GenerationOptions().with_setting("seed", "42").with_setting("temperature", "0")
    assert (options.seed, options.temperature) == (42, 0.0)
    assert options.with_setting("seed", "none").seed is None
    assert GenerationOptions.from_dict(options.as_dict()) == options
