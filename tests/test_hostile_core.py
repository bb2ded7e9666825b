"""Hostile inputs to the core: config, user files, images, datasets, adapters and the model cache.

Every case ends at once (a FIFO never hangs the test) in one ``IrisError`` line of the expected type
and text, and changes nothing. Property tests throw arbitrary values at the config loader and
arbitrary text at the dataset reader: the only outcomes are valid settings/samples or a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import string
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import save_strong_lora, save_tiny_llama, save_tiny_llava
from typer.testing import CliRunner

from adapters.dataset import check_dataset, read_dataset, scan_dataset
from adapters.merge import merge_adapter
from adapters.synth import synthesize
from assistant.adapter_files import PROJECTOR_FILE, check_adapter_dir
from assistant.builders.default_model import with_default_model
from assistant.config import GENERATION_RULES, GenerationOptions, ModelOptions, Paths, Settings, load_settings
from assistant.errors import BadAdapter, BadDataset, BadImage, BadSetting, IrisError, ModelNotFound
from assistant.files import build_once, partials_of, read_user_file
from assistant.messages import Message, Role
from assistant.model import attach_adapter, cached_hf_copy, load, resolve_device, resolve_source
from assistant.vision import load_image_path, to_pil
from cli import runtime
from cli.app import app
from integrations.discord_bot.settings import DISCORD_RULES, DiscordSettings, load_discord_settings, read_token

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def one_line(error: pytest.ExceptionInfo[IrisError]) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail (instead of hanging forever) if the test blocks, e.g. opening a FIFO nobody writes to."""
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("blocked: a special file was waited on")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def paths(iris_home: Path) -> Paths:
    found = Paths.default()
    found.config.mkdir(parents=True)
    return found


# --- config: one validated loader for file, environment, flags and /set -----------------------------------

BAD_CONFIG_FILES = [
    ('generation = "abc"\n', "config.toml: generation must be a table, got 'abc'"),
    ("adapters = 5\n", "config.toml: adapters must be a list of text, got 5"),
    ("adapters = [1, 2]\n", "config.toml: adapters must be text, got [1, 2]"),
    ("quant = 3\n", "config.toml: quant must be one of 4bit, 8bit, int4, fp16, int8, none, auto, got 3"),
    ('device = "meta"\n', "config.toml: device must be auto, cpu, cuda, cuda:N or mps, got 'meta'"),
    ('device = "bogus"\n', "device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
    ("[generation]\ntemperature = inf\n", "config.toml: [generation] temperature must be a finite number, got inf"),
    ("[generation]\ntemperature = nan\n", "[generation] temperature must be a finite number, got nan"),
    ("[generation]\ntemperature = -0.5\n", "[generation] temperature must be >= 0, got -0.5"),
    ("[generation]\ntemperature = 1e308\n", "temperature must be <= 100"),
    ("[generation]\ntop_p = 0\n", "[generation] top_p must be > 0, got 0"),
    ("[generation]\nmax_new_tokens = 100000000000000000000000\n", "max_new_tokens must be <= 1000000"),
    ("[generation]\ntop_k = true\n", "[generation] top_k needs an integer, got True"),
    ("[generation]\nseed = 1e3\n", "[generation] seed needs an integer, got 1000.0"),
    ("[generation]\nseed = 99999999999999999999999\n", "[generation] seed must be <= 4294967295"),
    ("[generation]\nwarmth = 1\n", "unknown [generation] keys warmth (known: temperature"),
    ("max_image_bytes = -5\n", "config.toml: max_image_bytes must be >= 1, got -5"),
    ("kv_cache_mb = 99999999999\n", "kv_cache_mb must be <= 1048576"),
    ("feature_cache_mb = [1]\n", "feature_cache_mb needs an integer, got [1]"),
    ('system_prompt = "a\\u0000b"\n', "system_prompt must not contain a NUL character"),
    ("system_prompt = 5\n", "system_prompt must be text, got 5"),
    ("model = 5\n", "config.toml: model must be text, got 5"),
    ('adapters = ["ok", ""]\n', "config.toml: adapters must not be empty"),
    ('[backend]\ntimeout = "soon"\n', "config.toml: [backend] timeout needs a number, got 'soon'"),
    ("[backend]\ncontext_length = 0\n", "[backend] context_length must be >= 1, got 0"),
    ('[backend]\nkind = "grpc"\n', "[backend] kind must be one of local, openai, got 'grpc'"),
    ('[backend]\nkind = "openai"\n', "--backend openai needs --base-url"),
    ("backend = []\n", "backend must be a table"),
    ("colour = 1\n", "unknown keys colour"),
    ("discord = 5\n", "config.toml: discord must be a table, got 5"),
    ("x = " + "[" * 100_000 + "\n", "config.toml: values nested too deeply"),
    ("x = " + "1" * 5000 + "\n", "integer string conversion"),
    ("this is not toml", "config.toml: Expected '=' after a key"),
]


@pytest.mark.parametrize("content, expected", BAD_CONFIG_FILES, ids=[c[1][:40] for c in BAD_CONFIG_FILES])
def test_every_wrong_config_value_is_one_line_naming_file_and_key(paths: Paths, content: str, expected: str) -> None:
    paths.config_file.write_text(content, encoding="utf-8")
    with pytest.raises(BadSetting) as error:
        load_settings(paths, {})
    assert expected in one_line(error)
    assert paths.config_file.read_text(encoding="utf-8") == content


def test_a_config_file_that_is_not_utf8_or_too_big(paths: Paths) -> None:
    paths.config_file.write_bytes(b"model = '\xff\xfe'\n")
    with pytest.raises(BadSetting, match="config.toml: not UTF-8 text"):
        load_settings(paths, {})
    paths.config_file.write_bytes(b"# " + b"x" * 2_000_000 + b"\n")
    with pytest.raises(BadSetting, match="config.toml: 2 MB is over the 1 MB config file limit"):
        load_settings(paths, {})


BAD_ENVIRONMENTS = [
    ({"IRIS_SEED": "1" * 23}, "IRIS_SEED: seed must be <= 4294967295, got '11111111111111111111111'"),
    ({"IRIS_SEED": "-1"}, "IRIS_SEED: seed must be >= 0"),
    ({"IRIS_SEED": "9" * 5000}, "IRIS_SEED: seed needs an integer, got '99999"),
    ({"IRIS_TEMPERATURE": "inf"}, "IRIS_TEMPERATURE: temperature must be a finite number, got 'inf'"),
    ({"IRIS_TEMPERATURE": "nan"}, "IRIS_TEMPERATURE: temperature must be a finite number, got 'nan'"),
    ({"IRIS_TEMPERATURE": "1e400"}, "IRIS_TEMPERATURE: temperature must be a finite number"),
    ({"IRIS_TOP_K": "1e3"}, "IRIS_TOP_K: top_k needs an integer, got '1e3'"),
    ({"IRIS_TOP_P": "0"}, "IRIS_TOP_P: top_p must be > 0"),
    ({"IRIS_MAX_NEW_TOKENS": "0"}, "IRIS_MAX_NEW_TOKENS: max_new_tokens must be >= 1"),
    ({"IRIS_DEVICE": "bogus"}, "IRIS_DEVICE: device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
    ({"IRIS_DEVICE": "meta"}, "IRIS_DEVICE: device must be auto, cpu, cuda, cuda:N or mps, got 'meta'"),
    ({"IRIS_QUANT": "3bit"}, "IRIS_QUANT: quant must be one of"),
    ({"IRIS_BACKEND": "grpc"}, "IRIS_BACKEND: kind must be one of local, openai"),
]


@pytest.mark.parametrize("environ, expected", BAD_ENVIRONMENTS, ids=[c[1][:40] for c in BAD_ENVIRONMENTS])
def test_every_wrong_variable_is_one_line_naming_it(paths: Paths, environ: dict[str, str], expected: str) -> None:
    with pytest.raises(BadSetting) as error:
        load_settings(paths, environ)
    assert expected in one_line(error)


BAD_DISCORD = [
    ('[discord]\nadmin_ids = ["x"]\n', {}, "config.toml: [discord] admin_ids must be a list of ids (whole numbers)"),
    ("[discord]\nadmin_ids = 5\n", {}, "[discord] admin_ids must be a list of ids, got 5"),
    ("[discord]\nblocked_user_ids = [-1]\n", {}, "[discord] blocked_user_ids must be a list of ids"),
    ("[discord]\nmax_queue = 0\n", {}, "[discord] max_queue must be >= 1, got 0"),
    ("[discord]\nrate_window_s = inf\n", {}, "[discord] rate_window_s must be a finite number, got inf"),
    ("[discord]\nmax_image_bytes = 1e30\n", {}, "[discord] max_image_bytes needs an integer"),
    ('[discord]\nallow_dms = "maybe"\n', {}, "[discord] allow_dms needs true or false, got 'maybe'"),
    ("[discord]\ntoken_file = 7\n", {}, "[discord] token_file must be text, got 7"),
    ('discord = "on"\n', {}, "config.toml: discord must be a table ([discord]), got 'on'"),
    ("", {"IRIS_DISCORD_MAX_QUEUE": "lots"}, "IRIS_DISCORD_MAX_QUEUE: max_queue needs an integer, got 'lots'"),
    ("", {"IRIS_DISCORD_ADMIN_IDS": "1,x"}, "IRIS_DISCORD_ADMIN_IDS: admin_ids must be a list of ids"),
    ("", {"IRIS_DISCORD_ADMIN_IDS": "1" * 30}, "IRIS_DISCORD_ADMIN_IDS: admin_ids must be a list of ids"),
    ("", {"IRIS_DISCORD_EDIT_WINDOW_S": "nan"}, "IRIS_DISCORD_EDIT_WINDOW_S: edit_window_s must be a finite"),
]


@pytest.mark.parametrize("content, environ, expected", BAD_DISCORD, ids=[c[2][:40] for c in BAD_DISCORD])
def test_discord_settings_go_through_the_same_rules(paths: Paths, content: str, environ: dict[str, str],
                                                    expected: str) -> None:
    paths.config_file.write_text(content, encoding="utf-8")
    with pytest.raises(BadSetting) as error:
        load_discord_settings(paths, environ)
    assert expected in one_line(error)
    with pytest.raises(BadSetting, match="must be >= 1"):
        DiscordSettings(max_queue=0)  # code constructing settings is held to the same rules


@pytest.mark.parametrize("name, value, expected", [
    ("seed", "1" * 23, "seed must be <= 4294967295"),
    ("temperature", "inf", "temperature must be a finite number, got 'inf'"),
    ("temperature", "-nan", "temperature must be a finite number"),
    ("max_new_tokens", "1e9", "max_new_tokens needs an integer, got '1e9'"),
    ("top_p", "1.5", "top_p must be <= 1, got '1.5'"),
    ("repetition_penalty", "0", "repetition_penalty must be > 0"),
    ("nonsense", "1", "unknown setting 'nonsense'; known: temperature"),
])
def test_set_and_code_use_the_same_rules(name: str, value: str, expected: str) -> None:
    with pytest.raises(BadSetting) as error:
        GenerationOptions().with_setting(name, value)
    assert expected in one_line(error)
    with pytest.raises(BadSetting, match="temperature must be a finite number"):
        GenerationOptions(temperature=math.inf)


def test_cli_reports_bad_settings_in_one_line_before_loading_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBackend(["never"])
    monkeypatch.setattr(runtime, "open_backend", lambda settings, paths: fake)
    result = runner.invoke(app, ["ask", "hi"], env={"IRIS_SEED": "1" * 23})
    assert result.exit_code == 1 and "IRIS_SEED: seed must be <= 4294967295" in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    result = runner.invoke(app, ["ask", "hi", "--temperature", "inf"])
    assert result.exit_code == 1 and "temperature must be a finite number" in result.output
    assert not fake.calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_fails_before_any_work(paths: Paths, tmp_path: Path) -> None:
    for device in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(BadSetting, match=f"device {device}: CUDA is not available on this machine"):
            resolve_device(device)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(BadSetting, match="device mps: MPS .* is not available"):
            resolve_device("mps")
    with pytest.raises(BadSetting, match="CUDA is not available"):
        with_default_model(ModelOptions(device="cuda"), paths)  # the first-start build never begins
    assert not paths.cache.exists()
    gguf = tmp_path / "never-converted.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(BadSetting, match="CUDA is not available"):
        load(ModelOptions(model=str(gguf), device="cuda"), paths)
    assert not paths.cache.exists()
    with pytest.raises(BadSetting, match="--device must be auto, cpu, cuda, cuda:N or mps, got 'meta'"):
        ModelOptions(device="meta")


# --- one way to read a user's file: regular files only, a hard byte cap ---------------------------------------

SPECIAL_KINDS = {"fifo": "is a FIFO (named pipe), not a regular file", "dev-zero": "is a character device",
                 "socket": "is a socket", "link-to-fifo": "is a FIFO"}


def make_special(kind: str, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a non-regular file of ``kind`` at ``where``."""
    where.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "dev-zero":
        where.symlink_to("/dev/zero")
    elif kind == "link-to-fifo":
        os.mkfifo(where.with_name("real-fifo"))
        where.symlink_to(where.with_name("real-fifo"))
    else:
        monkeypatch.chdir(where.parent)  # socket paths are limited to 108 bytes
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(where.name)  # the socket file stays after it closes


def _image_door(target: Path, paths: Paths) -> Callable[[], object]:
    return lambda: load_image_path(target)


def _token_door(target: Path, paths: Paths) -> Callable[[], object]:
    return lambda: read_token(DiscordSettings(token_file=str(target)), paths, {})


def _dataset_door(target: Path, paths: Paths) -> Callable[[], object]:
    return lambda: read_dataset(target)


def _dataset_image_door(target: Path, paths: Paths) -> Callable[[], object]:
    data = target.parent / "data.jsonl"
    record = {"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "ok"}],
              "images": [target.name]}
    data.write_text(json.dumps(record) + "\n")
    return lambda: read_dataset(data)


def _adapter_door(target: Path, paths: Paths) -> Callable[[], object]:
    return lambda: check_adapter_dir(target.parent, "fingerprint")


DOORS = {  # front door -> (where the file goes, the call, the error type)
    "--image": ("photo.png", _image_door, BadImage),
    "token_file": ("discord_token", _token_door, BadSetting),
    "config.toml": ("config.toml", lambda target, paths: lambda: load_settings(paths, {}), BadSetting),
    "dataset file": ("train.jsonl", _dataset_door, BadDataset),
    "dataset image": ("images/a.png", _dataset_image_door, BadDataset),
    "adapter_config.json": ("adapter/adapter_config.json", _adapter_door, BadAdapter),
}


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("door", DOORS)
def test_special_files_are_refused_at_once_at_every_door(door: str, kind: str, paths: Paths, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, deadline: None) -> None:
    name, make_call, error_type = DOORS[door]
    target = paths.config_file if door == "config.toml" else tmp_path / "user" / name
    make_special(kind, target, monkeypatch)
    call = make_call(target, paths)
    before = sorted(p.name for p in target.parent.iterdir())
    started = time.perf_counter()
    with pytest.raises(error_type) as error:
        call()
    assert time.perf_counter() - started < 5
    message = one_line(error)
    assert SPECIAL_KINDS[kind] in message and str(target) in message
    assert sorted(p.name for p in target.parent.iterdir()) == before


def test_the_byte_cap_is_counted_while_reading_not_taken_from_st_size(tmp_path: Path) -> None:
    maps = Path("/proc/self/maps")  # a regular file whose st_size is 0 but which holds kilobytes
    assert maps.stat().st_size == 0
    with pytest.raises(BadImage, match="/proc/self/maps: over the 64 bytes image limit"):
        load_image_path(maps, max_bytes=64)
    assert len(read_user_file(maps, max_bytes=10_000_000)) > 64
    for bad_name in (tmp_path / "nul\x00byte.png", tmp_path / ("x" * 300 + ".png")):
        with pytest.raises(BadImage) as error:
            load_image_path(bad_name)
        assert "not a usable file name" in one_line(error) or "cannot read (File name too long)" in str(error.value)


def test_a_fifo_image_from_the_cli_is_one_line_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       deadline: None) -> None:
    fake = FakeBackend(["never"])
    monkeypatch.setattr(runtime, "open_backend", lambda settings, paths: fake)
    os.mkfifo(tmp_path / "pipe.png")
    result = runner.invoke(app, ["ask", "what is this?", "--image", str(tmp_path / "pipe.png")])
    assert result.exit_code == 1 and "pipe.png: is a FIFO (named pipe), not a regular file" in result.output
    assert result.output.strip().count("\n") == 0 and not fake.calls


# --- images: EXIF orientation ------------------------------------------------------------------------------------


def test_an_exif_rotated_photo_reaches_the_model_upright(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from assistant.prompt import PromptRenderer

    stored = Image.new("RGB", (40, 20), (220, 20, 20))
    stored.paste((20, 20, 220), (20, 0, 40, 20))  # left half red, right half blue, as the sensor stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": red ends up on top
    jpeg = tmp_path / "phone.jpg"
    stored.save(jpeg, format="JPEG", quality=95, exif=exif.tobytes())
    attachment = load_image_path(jpeg)
    assert (attachment.width, attachment.height) == (20, 40)  # the upright size
    assert attachment.sha256 == hashlib.sha256(jpeg.read_bytes()).hexdigest()  # identity: the original bytes
    upright = to_pil(attachment)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 34))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]
    reference = tmp_path / "upright.png"  # the same decoded pixels turned by hand, lossless, without EXIF
    with Image.open(jpeg) as decoded:
        decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(reference)
    processor = AutoProcessor.from_pretrained(save_tiny_llava(tmp_path / "llava", image_size=28))
    renderer = PromptRenderer(processor.tokenizer, processor)
    seen = renderer.encode([Message(Role.USER, "look", (attachment,))])["pixel_values"]
    expected = renderer.encode([Message(Role.USER, "look", (load_image_path(reference),))])["pixel_values"]
    assert torch.equal(seen, expected)


# --- datasets ----------------------------------------------------------------------------------------------------

BAD_DATASETS = [
    ("dataset.json", "[" * 100_000, "dataset.json: invalid JSON (nested too deeply)"),
    ("dataset.json", "[" + "1" * 5000 + "]", "dataset.json: invalid JSON (Exceeds the limit (4300 digits)"),
    ("dataset.json", b"\xff\xfe[]", "dataset.json: not UTF-8 text"),
    ("dataset.json", '{"a": 1}', "expected a JSON list of samples"),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     + "[" * 100_000 + "\n", "data.jsonl:2: invalid JSON (nested too deeply)"),
    ("data.jsonl", "{" * 50_000 + "\n", "data.jsonl:1: invalid JSON"),
    ("data.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n', "data.jsonl:1: turn 1: 'content' must be"),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], '
                   '"images": ["a\\u0000.png"]}\n',
     "not a usable file name"),
]


@pytest.mark.parametrize("name, content, expected", BAD_DATASETS, ids=[c[2][:40] for c in BAD_DATASETS])
def test_hostile_datasets_are_one_line_naming_file_and_line(tmp_path: Path, name: str, content: str | bytes,
                                                            expected: str) -> None:
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BadDataset) as error:
        read_dataset(tmp_path)
    assert expected in one_line(error)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_checking_a_dataset_holds_one_image_at_a_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    records = []
    for index in range(24):
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(tmp_path / f"images/{index}.png")
        records.append({"image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]})
    (tmp_path / "dataset.json").write_text(json.dumps(records))
    total = sum(p.stat().st_size for p in (tmp_path / "images").iterdir())
    tracemalloc.start()
    try:
        assert check_dataset(tmp_path) == []
        checking = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        samples = read_dataset(tmp_path)
        reading = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert checking < total / 4 < total < reading  # measured: about one image while checking, all of them to train
    assert all(image.data for sample in samples for message in sample.messages for image in message.images)
    summaries, problems = scan_dataset(tmp_path)
    assert not problems and {image.sha256 for s in summaries for m in s.messages for image in m.images} == \
        {image.sha256 for s in samples for m in s.messages for image in m.images}
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 0 and "24 samples, 48 turns, 24 distinct images" in result.output


@pytest.mark.parametrize("out", ["/proc/iris-dataset", "/sys/iris-dataset", "/proc/self/iris", "/sys/kernel/iris"])
def test_synth_into_proc_or_sys_is_one_line(out: str) -> None:
    with pytest.raises(BadDataset) as error:
        synthesize(Path(out), 2, seed=0)
    assert one_line(error).startswith(f"{out}: cannot write the dataset there (")
    assert not Path(out).exists()
    result = runner.invoke(app, ["data", "synth", "--out", out, "--n", "2"])
    assert result.exit_code == 1 and "cannot write the dataset there" in result.output
    assert "Traceback" not in result.output


# --- adapters ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    llama = save_tiny_llama(root / "llama")
    return {"llama": llama, "llava": save_tiny_llava(root / "llava"),
            "lora": save_strong_lora(llama, root / "lora", seed=3)}


def _fingerprint(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def _copy_adapter(source: Path, out: Path, change: Callable[[Path], None]) -> Path:
    out.mkdir()
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    change(out)
    return out


def _config_with(**values: Any) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, **values}))
    return change


def _config_text(content: str) -> Callable[[Path], None]:
    return lambda directory: (directory / "adapter_config.json").write_text(content)


def _poisoned(value: float) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        weights = load_file(str(directory / "adapter_model.safetensors"))
        first = sorted(weights)[0]
        weights[first] = weights[first].clone()
        weights[first].view(-1)[0] = value
        save_file(weights, str(directory / "adapter_model.safetensors"))
    return change


BAD_ADAPTERS = [
    (_config_with(r="eight"), "adapter_config.json: r must be an integer, got 'eight'"),
    (_config_with(r=0), "adapter_config.json: r must be >= 1 and <= 65536, got 0"),
    (_config_with(target_modules=5), "adapter_config.json: target_modules must be a list of module names"),
    (_config_with(lora_alpha="x"), "adapter_config.json: lora_alpha must be a number, got 'x'"),
    (_config_with(lora_alpha=math.nan), "adapter_config.json: lora_alpha must be > 0"),
    (_config_with(bias=5), "adapter_config.json: bias must be none, all or lora_only, got 5"),
    (_config_with(use_dora="false"), "adapter_config.json: use_dora must be true/false, got 'false'"),
    (_config_with(peft_type="IA3"), "adapter_config.json: peft_type must be LORA (only LoRA adapters are supported)"),
    (_config_with(modules_to_save={"a": 1}), "adapter_config.json: modules_to_save must be a list of module names"),
    (_config_text("{oops"), "corrupt adapter_config.json (Expecting property name"),
    (_config_text("[" * 100_000), "corrupt adapter_config.json (nested too deeply)"),
    (_config_text('{"r": ' + "1" * 5000 + "}"), "corrupt adapter_config.json (Exceeds the limit"),
    (_config_text('{"r": 4}'), "corrupt adapter_config.json (no peft_type)"),
    (_poisoned(math.nan), "adapter weights hold NaN or infinite values"),
    (_poisoned(math.inf), "adapter weights hold NaN or infinite values"),
]


@pytest.mark.parametrize("change, expected", BAD_ADAPTERS, ids=[c[1][:50] for c in BAD_ADAPTERS])
def test_hostile_adapters_are_refused_before_peft_touches_the_model(tiny: dict[str, Path], tmp_path: Path,
                                                                    change: Callable[[Path], None],
                                                                    expected: str) -> None:
    adapter = _copy_adapter(tiny["lora"], tmp_path / "hostile", change)
    loaded = load(ModelOptions(model=str(tiny["llama"]), quant="none"), Paths.default())
    before = _fingerprint(loaded.model)
    with pytest.raises(BadAdapter) as error:
        attach_adapter(loaded, str(adapter))
    assert expected in one_line(error) and str(adapter) in str(error.value)
    assert _fingerprint(loaded.model) == before and not loaded.adapters and loaded.active_adapter is None
    assert attach_adapter(loaded, str(tiny["lora"])) == "lora"  # the model is still usable


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_projector_weights_that_are_not_finite_are_refused(tiny: dict[str, Path], tmp_path: Path,
                                                           value: float) -> None:
    loaded = load(ModelOptions(model=str(tiny["llava"]), quant="none"), Paths.default())
    projector = loaded.model.get_submodule(loaded.architecture.projector)
    weights = {name: tensor.clone() for name, tensor in projector.state_dict().items()}
    next(iter(weights.values())).view(-1)[3] = value
    (tmp_path / "proj").mkdir()
    save_file(weights, str(tmp_path / "proj" / PROJECTOR_FILE))
    before = _fingerprint(loaded.model)
    with pytest.raises(BadAdapter, match="projector.safetensors holds NaN or infinite values") as error:
        attach_adapter(loaded, str(tmp_path / "proj"))
    one_line(error)
    assert _fingerprint(loaded.model) == before


def test_merge_with_a_corrupt_adapter_config_is_one_line_and_writes_nothing(tiny: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    for content in ("{oops", '{"peft_type": "LORA", "base_model_name_or_path": 5}', "[" * 100_000):
        adapter = _copy_adapter(tiny["lora"], tmp_path / f"corrupt-{len(content)}", _config_text(content))
        with pytest.raises(BadAdapter, match="adapter_config.json") as error:
            merge_adapter(adapter, tmp_path / "merged")
        one_line(error)
        assert not (tmp_path / "merged").exists()
        result = runner.invoke(app, ["adapters", "merge", str(adapter), "--out", str(tmp_path / "merged")])
        assert result.exit_code == 1 and "adapter_config.json" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "merged").exists()


# --- the model cache: GGUF files, locks, stale partials -----------------------------------------------------------


def write_tiny_gguf(path: Path) -> Path:
    """A tiny random Llama with a byte-level tokenizer as a GGUF file (what transformers' GGUF loader reads)."""
    import gguf

    tokens = list(dict.fromkeys(["<unk>", *string.printable.replace(" ", "Ġ").replace("\n", "Ċ"), "ab",
                                 "<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    vocab, hidden, ff, heads, kv, layers = len(tokens), 32, 64, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output.weight", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for layer in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{layer}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{layer}.attn_k.weight", kv * hidden // heads, hidden)
        tensor(f"blk.{layer}.attn_v.weight", kv * hidden // heads, hidden)
        tensor(f"blk.{layer}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{layer}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{layer}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{layer}.ffn_down.weight", hidden, ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.mark.parametrize("cut", [0, 3, 10, 24, 100, 1000, 20_000])
def test_a_gguf_cut_short_is_model_not_found_and_leaves_no_cache_entry(tiny_gguf: Path, tmp_path: Path,
                                                                        paths: Paths, cut: int) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:cut])
    with pytest.raises(ModelNotFound) as error:
        resolve_source(ModelOptions(model=str(broken)), paths)
    assert one_line(error).startswith(f"{broken}: cannot read this GGUF file (")
    left = sorted(p.name for p in (paths.cache / "models").iterdir())
    assert all(name.endswith(".lock") for name in left)  # no entry, no partial


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    {setup}
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    {work}
""")


def _children(count: int, tmp_path: Path, setup: str, work: str) -> list[subprocess.CompletedProcess[str]]:
    """Start ``count`` processes that run ``work`` at the same moment (after ``setup``); their results."""
    script = CHILD.format(repo=str(REPO), setup=setup, work=work)
    go = tmp_path / "go"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready-{index}"), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for index in range(count)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{index}").exists() for index in range(count)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
            [p.communicate() for p in processes if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=240), *p.communicate()) for p in processes]


def test_two_processes_building_one_cache_entry_build_it_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "models" / "entry"
    log = tmp_path / "builds.log"
    work = f"""
from assistant.files import build_once
def build(out):
    with open({str(log)!r}, "a") as handle:
        handle.write("built\\n")
    out.mkdir()
    (out / "weights.bin").write_bytes(b"w" * 1_000_000)
    time.sleep(1.0)
    (out / "config.json").write_text("{{}}")
print(build_once(Path({str(target)!r}), build, wait=lambda: print("waited")))
"""
    results = _children(3, tmp_path, "", work)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert [r.stdout.splitlines()[-1] for r in results] == [str(target)] * 3
    assert log.read_text() == "built\n"  # one build; the others waited for it and found it complete
    assert sum("waited" in r.stdout for r in results) >= 1
    assert (target / "weights.bin").stat().st_size == 1_000_000 and (target / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry", "entry.lock"]


def test_two_processes_converting_one_gguf_on_a_cold_cache(tiny_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    cache = tmp_path / "cache"
    setup = f"""
import transformers
from assistant.config import Paths
from assistant.model import cached_hf_copy
paths = Paths(data=Path({str(tmp_path / "data")!r}), cache=Path({str(cache)!r}), config=Path("c"))
"""
    work = f"print('dir', cached_hf_copy(Path({str(tiny_gguf)!r}), paths, progress=print))"
    results = _children(2, tmp_path, setup, work)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    outputs = "".join(r.stdout for r in results)
    assert outputs.count("converting tiny-llama.gguf") == 1
    made = {line.split(" ", 1)[1] for line in outputs.splitlines() if line.startswith("dir ")}
    assert len(made) == 1
    entry = Path(made.pop())
    assert AutoConfig.from_pretrained(entry).model_type == "llama"
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, f"{entry.name}.lock"]
    paths = Paths(data=tmp_path / "data", cache=cache, config=tmp_path / "c")
    assert cached_hf_copy(tiny_gguf, paths, progress=lambda text: pytest.fail(text)) == entry  # no new work


def test_a_builder_killed_mid_build_leaks_nothing_for_long(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "models" / "entry"
    work = f"""
from assistant.files import build_once
def build(out):
    out.mkdir()
    (out / "weights.bin").write_bytes(b"w" * 3_000_000)
    print("written", flush=True)
    time.sleep(120)
build_once(Path({str(target)!r}), build)
"""
    script = CHILD.format(repo=str(REPO), setup="", work=work)
    (tmp_path / "go").touch()
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "ready"), str(tmp_path / "go")],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None and child.stdout.readline() == "written\n"
    child.kill()  # SIGKILL: no cleanup code runs
    child.wait()
    leaked = partials_of(target)
    assert len(leaked) == 1 and (leaked[0] / "entry" / "weights.bin").stat().st_size == 3_000_000
    (target.parent / "entry.partial").mkdir()  # what older versions of Iris left behind
    (target.parent / ".entry.k3j5x9q1").mkdir()
    built = build_once(target, lambda out: (out.mkdir(), (out / "config.json").write_text("{}")))
    assert built == target and partials_of(target) == []  # the next builder cleans up, holding the lock
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry", "entry.lock"]
    (target.parent / ".entry.partial.abc").mkdir()  # a leftover beside a complete entry goes on the next start
    assert build_once(target, lambda out: pytest.fail("rebuilt")) == target and partials_of(target) == []


# --- property tests ---------------------------------------------------------------------------------------------

SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]  # the machine is shared: no timing checks


def toml_value(value: Any) -> str:
    """A TOML literal for a hypothesis value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_value(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


TOML_VALUES = st.recursive(
    st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=30)
    | st.sampled_from(["4bit", "cuda", "cpu", "openai", "none", "0.5", "7", "1,2", "auto", "inf"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
TOP_KEYS = ["model", "quant", "device", "adapters", "system_prompt", "max_image_bytes", "max_image_pixels",
            "kv_cache_mb", "feature_cache_mb", "generation", "backend", "discord", "unknown"]
BACKEND_KEYS = ["kind", "base_url", "api_key_env", "context_length", "timeout"]


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), TOML_VALUES, max_size=5)


CONFIGS = st.fixed_dictionaries({}, optional={
    "top": _table(TOP_KEYS), "generation": _table([*GENERATION_RULES, "warmth"]), "backend": _table(BACKEND_KEYS),
    "discord": _table([*DISCORD_RULES, "admins"])})
ENVIRONS = st.dictionaries(st.sampled_from(["IRIS_MODEL", "IRIS_QUANT", "IRIS_DEVICE", "IRIS_SEED", "IRIS_TOP_K",
                                            "IRIS_TEMPERATURE", "IRIS_BACKEND", "IRIS_DISCORD_ADMIN_IDS",
                                            "IRIS_DISCORD_MAX_QUEUE", "IRIS_DISCORD_ALLOW_DMS"]),
                           st.text(max_size=12) | st.sampled_from(["1e400", "nan", "-1", "1" * 30, "cuda:0"]),
                           max_size=3)


def _check_settings(found: Settings) -> None:
    generation = found.generation
    assert math.isfinite(generation.temperature) and 0 <= generation.temperature <= 100
    assert 0 < generation.top_p <= 1 and generation.max_new_tokens >= 1
    assert generation.seed is None or 0 <= generation.seed < 2**32
    assert found.model.quant in ("4bit", "8bit", "int8", "none", "auto")
    assert all(isinstance(adapter, str) for adapter in found.model.adapters)


@settings(max_examples=250, deadline=None, suppress_health_check=SLOW_OK)
@given(config=CONFIGS, environ=ENVIRONS)
def test_any_config_is_valid_settings_or_one_bad_setting(paths: Paths, config: dict[str, dict[str, Any]],
                                                         environ: dict[str, str]) -> None:
    document = {**config.get("top", {}), **{table: config[table] for table in ("generation", "backend", "discord")
                                            if table in config}}
    lines = [f"{toml_value(key)} = {toml_value(value)}\n" for key, value in document.items()]
    paths.config_file.write_text("".join(lines), encoding="utf-8")
    for loader, check in ((load_settings, _check_settings), (load_discord_settings, lambda found: None)):
        try:
            check(loader(paths, environ))  # type: ignore[operator]
        except BadSetting as error:
            assert "\n" not in str(error) and str(error)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["<image>", "<image> hi", "user", "assistant", "human", "gpt", "system", "image", "text",
                       "a.png", "images/../a.png", "/dev/zero", "", "dataset.json"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["conversations", "messages", "image", "images", "from", "value", "role", "content",
                         "type", "text", "id"]) | st.text(max_size=5), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW_OK)
@given(records=st.lists(JSON_VALUES, max_size=4), raw=st.text(max_size=200), use_raw=st.booleans(),
       jsonl=st.booleans())
def test_any_dataset_text_is_samples_or_one_bad_dataset(tmp_path: Path, records: list[Any], raw: str, use_raw: bool,
                                                        jsonl: bool) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for stale in ("dataset.json", "data.jsonl"):
        (tmp_path / stale).unlink(missing_ok=True)
    name = "data.jsonl" if jsonl else "dataset.json"
    if use_raw:
        content = raw
    elif jsonl:
        content = "\n".join(json.dumps(record) for record in records)
    else:
        content = json.dumps(records)
    (tmp_path / name).write_text(content, encoding="utf-8")
    try:
        samples = read_dataset(tmp_path)
    except BadDataset as error:
        assert "\n" not in str(error) and name in str(error)
    else:
        assert all(sample.messages for sample in samples)
