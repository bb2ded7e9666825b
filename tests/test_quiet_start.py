"""A start in a terminal shows Iris's own progress lines and nothing from the libraries under it, unless
``--verbose``: no tqdm bars (``Loading weights``, ``Converting and de-quantizing GGUF tensors``), no bitsandbytes
``kernels`` notice, no deprecation or user warnings. Each command runs as a user runs it: a fresh process on a fresh
``IRIS_HOME``, its stderr a pseudo-terminal (so rich and tqdm draw as they would), its stdout a pipe."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_llama, save_tiny_llava

from cli.quiet import QUIET_ENVIRONMENT, VERBOSE_ENV

IRIS = str(Path(sys.executable).with_name("iris"))
# Every line Iris itself may show while it starts (cli/runtime.py's status line, fed by the loading steps).
IRIS_STEPS = re.compile(r"^(loading model…|loading .+ on cpu \((none|int4|fp16|int8|4bit|8bit)\)|"
                        r"packing the language model's weights in (int4|fp16|int8)|"
                        r"attaching adapter .+|converting .+ \(once\)|composing the default vision model \(once\)|"
                        r"waiting for another Iris process .+)$")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]")
SPINNER = re.compile(r"^[\u2800-\u28ff]\s*")


def run_in_terminal(arguments: list[str], home: Path, timeout: float = 600) -> tuple[int, str, list[str]]:
    """(exit status, stdout, the distinct lines drawn on the terminal's stderr, escapes and spinners removed)."""
    environment = {name: value for name, value in os.environ.items()
                   if name not in QUIET_ENVIRONMENT and name != VERBOSE_ENV}  # what this test process may have set
    environment.update(IRIS_HOME=str(home), HF_HUB_OFFLINE="1", TERM="xterm-256color", COLUMNS="200")
    primary, secondary = os.openpty()
    process = subprocess.Popen([IRIS, *arguments], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=secondary, env=environment)
    os.close(secondary)
    drawn = bytearray()
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], timeout)
            if not ready:
                raise TimeoutError(f"iris {' '.join(arguments)} ran past {timeout:g} s")
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            drawn += data
    finally:
        os.close(primary)
    assert process.stdout is not None
    stdout = process.stdout.read().decode()
    process.stdout.close()
    status = process.wait(timeout=60)
    text = ESCAPES.sub("", drawn.decode(errors="replace"))
    lines = [SPINNER.sub("", line).strip() for line in re.split(r"[\r\n]", text)]
    return status, stdout, list(dict.fromkeys(line for line in lines if line))


def assert_only_iris(lines: list[str]) -> None:
    foreign = [line for line in lines if not IRIS_STEPS.match(line)]
    assert not foreign, f"lines not from Iris: {foreign[:5]}"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quiet_models")
    return {"llama": save_tiny_llama(root / "llama"), "llava": save_tiny_llava(root / "llava")}


def test_info_and_ask_on_a_cold_start_show_only_iris_lines(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                           sample_png: Path) -> None:
    status, stdout, lines = run_in_terminal(["info", "--model", str(tiny_dirs["llama"])], tmp_path / "home")
    assert status == 0 and "quantization: int4" in stdout  # the CPU default: packed int4 weights
    assert_only_iris(lines)
    status, stdout, lines = run_in_terminal(["ask", "what is this?", "--image", str(sample_png), "--model",
                                             str(tiny_dirs["llava"]), "--quant", "int8", "--temperature", "0",
                                             "--max-new-tokens", "4"], tmp_path / "home2")  # int8: PyTorch warns
    assert status == 0 and stdout.endswith("\n")
    assert_only_iris(lines)


def test_verbose_shows_what_the_libraries_print(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The control: the same start with ``--verbose`` lets the libraries' warnings through (here PyTorch's
    deprecation of the quantized tensors ``--quant int8`` builds)."""
    status, _, lines = run_in_terminal(["--verbose", "info", "--model", str(tiny_dirs["llama"]), "--quant", "int8"],
                                       tmp_path / "home")
    assert status == 0
    assert any("UserWarning" in line for line in lines), lines


@pytest.mark.slow
def test_the_default_models_first_start_shows_only_iris_steps(tmp_path: Path) -> None:
    """``iris ask`` on an empty IRIS_HOME: unpack the GGUF, convert the vision tower, compose, load, answer."""
    status, stdout, lines = run_in_terminal(["ask", "What is the capital of France?", "--temperature", "0",
                                             "--max-new-tokens", "12"], tmp_path / "home")
    assert status == 0 and "Paris" in stdout
    assert_only_iris(lines)
    for step in ("converting SmolLM2", "converting the DINOv2 vision tower", "composing", "loading Iris default"):
        assert any(line.startswith(step) for line in lines), (step, lines)
