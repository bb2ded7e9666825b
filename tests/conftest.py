"""Shared fixtures: an isolated IRIS_HOME, a store, a fake backend and a manager."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fakes import FakeBackend  # noqa: E402

from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.store import Store  # noqa: E402


@pytest.fixture(autouse=True)
def iris_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "iris_home"
    monkeypatch.setenv("IRIS_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("IRIS_") and name != "IRIS_HOME":
            monkeypatch.delenv(name)
    return home


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "test.db")
    yield opened
    opened.close()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def manager(backend: FakeBackend, store: Store) -> DialogueManager:
    return DialogueManager(backend, store, default_system_prompt="You are a test assistant.")


@pytest.fixture
def sample_png(tmp_path: Path) -> Path:
    """A real photograph from scikit-image, re-encoded small as PNG."""
    from PIL import Image
    from skimage import data

    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((64, 64)).save(path)
    return path


@pytest.fixture
def sample_jpg(tmp_path: Path) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).resize((48, 32)).save(path, format="JPEG")
    return path
