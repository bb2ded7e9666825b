"""``iris chat`` driven with scripted keyboard input through prompt_toolkit's pipe input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fakes import FakeBackend
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from typer.testing import CliRunner

import cli.prompt_input
from assistant.config import GenerationOptions
from assistant.dialogue import DialogueManager
from assistant.messages import Message, Role
from cli import runtime
from cli.app import app
from cli.chat import ChatSession
from cli.prompt_input import make_reader


class CtrlCBackend(FakeBackend):
    """Sends the process a real SIGINT mid-answer, as Ctrl+C does (a real signal also wakes a main thread that is
    blocked waiting, where ``_thread.interrupt_main`` only schedules the handler: flaky on a loaded machine)."""

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        for index, chunk in enumerate(super().stream(messages, options, adapter)):
            yield chunk
            if index == 1:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # interrupted here, like a long generation


def run_session(manager: DialogueManager, keys: str, cwd: Path, conversation_id: int | None = None) -> str:
    console = Console(record=True, width=200, force_terminal=False)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        session = ChatSession(manager, conversation_id or manager.new_conversation(), console,
                              make_reader(None, input=pipe, output=DummyOutput()),
                              max_image_bytes=10_000_000, max_image_pixels=10_000_000, markdown=False, cwd=cwd)
        session.run()
    return console.export_text()


def test_inline_and_slash_images_attach_with_size_and_token_cost(
        manager: DialogueManager, backend: FakeBackend, sample_png: Path, sample_jpg: Path, tmp_path: Path) -> None:
    spaced = tmp_path / "my shot.png"
    shutil.copy(sample_png, spaced)
    escaped = str(spaced).replace(" ", "\\ ")
    keys = (f"/image {sample_jpg}\r"
            f"compare {escaped} and './astronaut.png' with ~/nothing.png\r"
            "/exit\r")
    output = run_session(manager, keys, tmp_path)
    assert "attached coffee.jpg (48x32" in output and "16 tokens)" in output
    assert output.count("attached") == 3
    sent = backend.calls[-1]["messages"][-1]
    assert sent.text == "compare and with ~/nothing.png"
    assert [image.name for image in sent.images] == [str(sample_jpg), str(spaced), str(tmp_path / "astronaut.png")]


def test_multiline_block_and_slash_commands(manager: DialogueManager, backend: FakeBackend, tmp_path: Path) -> None:
    keys = ('"""first line\rsecond line\rend"""\r'
            "/set temperature 0.25\r/set temperature hot\r/set\r/system be brief\r/system\r"
            "/tokens\r/frobnicate\r/adapter\r/adapter ghost\r/history\r/help\r/exit\r")
    output = run_session(manager, keys, tmp_path)
    assert backend.calls[0]["messages"][-1].text == "first line\nsecond line\nend"
    assert "temperature = 0.25" in output
    assert "error: temperature needs a number, got 'hot'" in output
    assert "be brief" in output
    assert "error: unknown command /frobnicate; /help lists them" in output
    assert "error: unknown adapter 'ghost'" in output
    assert "tokens in this conversation; context 4096" in output
    assert "/image PATH" in output
    conversation = manager.store.list_conversations()[0]
    assert conversation.options["temperature"] == 0.25 and conversation.system_prompt == "be brief"


def test_bad_inputs_are_one_line_errors_and_the_conversation_goes_on(
        manager: DialogueManager, backend: FakeBackend, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    keys = (f"/image {tmp_path / 'missing.png'}\r/image {tmp_path}\r/image {broken}\r"
            f"look at {broken}\rstill here?\r/exit\r")
    output = run_session(manager, keys, tmp_path)
    assert "error: " + str(tmp_path / "missing.png") + ": no such file" in output
    assert "is a directory" in output and output.count("corrupt or truncated PNG") == 2
    assert [m.text for m in manager.history(manager.store.list_conversations()[0].id)] == [
        "still here?", "echo: still here?"]


def test_image_to_a_text_only_model_is_refused(store: object, sample_png: Path, tmp_path: Path) -> None:
    manager = DialogueManager(FakeBackend(accepts_images=False), store)  # type: ignore[arg-type]
    output = run_session(manager, f"what is {sample_png}\r/exit\r", tmp_path)
    assert "error: this model reads text only" in output
    assert manager.history(manager.store.list_conversations()[0].id) == []


def test_ctrl_c_keeps_the_partial_answer_and_a_second_ctrl_c_exits(store: object, tmp_path: Path) -> None:
    backend = CtrlCBackend(["one two three four five six"])
    manager = DialogueManager(backend, store)  # type: ignore[arg-type]
    # Python's own SIGINT handler, as in `iris chat`: a library used by an earlier test may have replaced it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        output = run_session(manager, "count please\rnext\r\x03\x03", tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted — partial answer kept" in output
    history = manager.history(manager.store.list_conversations()[0].id)
    assert history[1] == Message(Role.ASSISTANT, "one two", interrupted=True, id=history[1].id)
    assert history[2].text == "next"  # the session went on after the interrupt
    assert "Ctrl+C again" in output


def test_clear_starts_a_new_conversation_and_load_returns(manager: DialogueManager, tmp_path: Path) -> None:
    run_session(manager, "hello\r/clear\rfresh start\r/load 1\rback again\r/exit\r", tmp_path)
    assert [m.text for m in manager.history(1)] == ["hello", "echo: hello", "back again", "echo: back again"]
    assert [m.text for m in manager.history(2)] == ["fresh start", "echo: fresh start"]


def test_save_exports_llava_json_with_images(manager: DialogueManager, sample_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    run_session(manager, f"describe {sample_png}\r/save {out}\r/exit\r", tmp_path)
    record = json.loads((out / "dataset.json").read_text())[0]
    assert record["conversations"][0] == {"from": "system", "value": "You are a test assistant."}
    assert record["conversations"][1]["value"] == "<image>\ndescribe"
    assert (out / record["image"]).read_bytes() == sample_png.read_bytes()


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend()
    monkeypatch.setattr(runtime, "open_backend", lambda settings, paths: backend)
    return backend


def _scripted_reader(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    pipes = []  # keep the pipe context alive: collecting it closes the pipe

    def reader(history_file: Path | None, **_: object):  # type: ignore[no-untyped-def]
        pipes.append(create_pipe_input())
        pipe = pipes[-1].__enter__()
        pipe.send_text(keys)
        return make_reader(history_file, input=pipe, output=DummyOutput())

    monkeypatch.setattr(cli.prompt_input, "make_reader", reader)


def test_resume_after_restart_continues_the_stored_conversation(
        fake_runtime: FakeBackend, monkeypatch: pytest.MonkeyPatch, iris_home: Path) -> None:
    cli_runner = CliRunner()
    _scripted_reader(monkeypatch, "my name is Ada\r/exit\r")
    first = cli_runner.invoke(app, ["chat", "--plain"])
    assert first.exit_code == 0, first.output
    _scripted_reader(monkeypatch, "what is my name?\r/exit\r")
    second = cli_runner.invoke(app, ["chat", "--plain", "--resume", "last"])
    assert second.exit_code == 0, second.output
    assert "user: my name is Ada" in second.output  # the transcript is shown on resume
    assert [m.text for m in fake_runtime.calls[-1]["messages"] if m.role is Role.USER] == [
        "my name is Ada", "what is my name?"]
    assert (iris_home / "data" / "input_history").read_text().count("my name is Ada") == 1
    missing = cli_runner.invoke(app, ["chat", "--resume", "999"])
    assert missing.exit_code == 1 and "no conversation with id 999" in missing.output


def test_tab_completes_slash_commands_and_file_paths(sample_png: Path, tmp_path: Path) -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from cli.prompt_input import ChatCompleter

    completer = ChatCompleter()

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text, len(text)), CompleteEvent())]

    assert complete("/ima") == ["/image"]
    assert "/history" in complete("/h")
    assert complete(f"look at {tmp_path}/astro") == ["naut.png"]
    assert complete("plain words") == []


def test_bad_slash_arguments_are_one_line_errors(manager: DialogueManager, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    keys = (f"hello\r/load abc\r/load 999\r/save\r/save {a_file}\r/image\r/set temperature\r/system\r"
            "still fine\r/exit\r")
    output = run_session(manager, keys, tmp_path)
    for expected in ("error: usage: /load ID (see /history)", "error: no conversation with id 999",
                     "error: /save needs a directory: /save DIR", f"error: {a_file}: exists and is not a directory",
                     "error: /image needs a path: /image PATH",
                     "error: usage: /set NAME VALUE (e.g. /set temperature 0.2)"):
        assert expected in output
    assert [m.text for m in manager.history(1)] == ["hello", "echo: hello", "still fine", "echo: still fine"]


def test_adapters_load_and_unload_from_the_chat_with_one_line_errors(store: object, tmp_path: Path) -> None:
    for name in ("pirate", "my adapters/sea"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    backend = FakeBackend()
    manager = DialogueManager(backend, store)  # type: ignore[arg-type]
    keys = (f"/adapter load {tmp_path / 'pirate'}\rhello\r/adapter\r"
            f"/adapter load {tmp_path / 'pirate'}\r/adapter load {tmp_path / 'missing'} x\r/adapter load\r"
            "/adapter load a b c\r/adapter unload\r/adapter unload ghost\r"
            '/adapter load "my adapters/sea" deep\r/adapter unload deep\r/adapter unload pirate\r'
            "hello again\r/exit\r")
    output = run_session(manager, keys, tmp_path)
    for expected in (f"loading adapter from {tmp_path / 'pirate'}",
                     "loaded adapter pirate; this conversation uses it now (/adapter none for the base model)",
                     "active: pirate; loaded: pirate",
                     "error: an adapter named 'pirate' is already loaded",
                     f"error: {tmp_path / 'missing'}: not a PEFT adapter directory (no adapter_config.json)",
                     "error: usage: /adapter load PATH [NAME]", "error: usage: /adapter unload NAME",
                     "error: no adapter named 'ghost' is loaded", "loaded adapter deep;",
                     "unloaded adapter deep; 1 conversation(s) that used it now use the active adapter (none)",
                     "unloaded adapter pirate\n"):
        assert expected in output, expected
    assert output.count("error: usage: /adapter load PATH [NAME]") == 2
    assert [call["adapter"] for call in backend.calls] == ["pirate", None]
    assert backend.adapters == [] and manager.conversation(1).adapter is None
    assert [m.text for m in manager.history(1)] == ["hello", "echo: hello", "hello again", "echo: hello again"]


def test_an_adapter_hot_loaded_in_the_chat_answers_like_one_given_at_start(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real tiny Llama and a LoRA strong enough to change its greedy answer: ``/adapter load`` attaches it to
    the running model, ``/adapter unload`` gives the base model back, and a bad path changes nothing."""
    from tiny_models import save_strong_lora, save_tiny_llama

    from assistant.config import Paths
    from assistant.store import Store

    llama = save_tiny_llama(tmp_path / "llama")
    adapter = save_strong_lora(llama, tmp_path / "pirate", seed=3)
    greedy = "/set temperature 0\r/set max_new_tokens 8\r"
    model = ["chat", "--plain", "--model", str(llama), "--quant", "none"]
    _scripted_reader(monkeypatch, greedy + f"hello\r/adapter load {adapter} sea\r/clear\rhello\r"
                     f"/adapter unload sea\r/clear\rhello\r/adapter load {tmp_path / 'missing'}\r/exit\r")
    hot = CliRunner().invoke(app, model)
    assert hot.exit_code == 0, hot.output
    assert "loaded adapter sea; this conversation uses it now" in hot.output
    assert "unloaded adapter sea; 2 conversation(s) that used it now use the active adapter (none)" in hot.output
    [refused] = [line for line in hot.output.splitlines() if line.startswith("error:")]
    assert str(tmp_path / "missing") in refused and "Traceback" not in hot.output
    _scripted_reader(monkeypatch, greedy + "hello\r/exit\r")
    at_start = CliRunner().invoke(app, [*model, "--adapter", str(adapter)])
    assert at_start.exit_code == 0, at_start.output
    store = Store(Paths.default().database)
    try:
        base, adapted, unloaded, started = ([m.text for m in store.thread(cid) if m.role is Role.ASSISTANT]
                                            for cid in (1, 2, 3, 4))
        assert adapted == started != base == unloaded
        assert store.conversation(3).message_count == 2  # the refused load left the conversation as it was
    finally:
        store.close()


def test_typed_escape_sequences_that_look_like_mouse_reports_do_not_crash_the_prompt() -> None:
    """Iris asks the terminal for no mouse reports, so ``ESC [ 31 m`` typed at the prompt (prompt_toolkit reads it as
    a malformed mouse report and raised) is dropped and the line still arrives."""
    with create_pipe_input() as pipe:
        read = make_reader(None, input=pipe, output=DummyOutput())
        pipe.send_text("\x1b[31mhello \x1b[<1;2m\x1b[96;14;13Mthere\r")
        assert read(">>> ") == "hello there"
