"""Hostile input to the CLI and the chat: one-line errors, the right exit code, stored data untouched, and
nothing from a model, a stored conversation, a server or a file name reaching the terminal as a control sequence."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
import stat
import time
import unicodedata
from pathlib import Path

import pytest
from fakes import FakeBackend
from hypothesis import given, settings
from hypothesis import strategies as st
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from typer.testing import CliRunner

from assistant.dialogue import DialogueManager
from assistant.errors import IrisError
from cli import runtime
from cli.app import app
from cli.chat import ChatSession
from cli.errors import report
from cli.inline_paths import extract_images
from cli.prompt_input import make_reader
from cli.terminal import VisibleStream, make_console, styled, visible, visible_json

runner = CliRunner()
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cHduZWQ=\x07\x9b31m\u202eevil[/x] :smile:"
BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def hidden(char: str) -> bool:
    """The test's own oracle of what must never reach a terminal raw."""
    category = unicodedata.category(char)
    return (category == "Cc" and char not in "\n\t") or category == "Cs" or char in BIDI


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend()
    monkeypatch.setattr(runtime, "open_backend", lambda settings, paths: backend)
    return backend


def stored(iris_home: Path) -> list[list[tuple[object, ...]]]:
    """Every stored row that holds user data."""
    with contextlib.closing(sqlite3.connect(iris_home / "data" / "iris.db")) as db:
        return [db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()  # noqa: S608 (fixed names)
                for table in ("conversations", "messages", "attachments", "message_attachments")]


def messages(iris_home: Path) -> list[tuple[object, ...]]:
    return stored(iris_home)[1]


@pytest.fixture
def seeded(fake: FakeBackend, iris_home: Path) -> Path:
    """One stored conversation (#1, two messages)."""
    assert runner.invoke(app, ["ask", "hello"]).exit_code == 0
    return iris_home


def no_escape(output: str) -> None:
    assert "\x1b" not in output and "\x9b" not in output and "\x07" not in output and "\u202e" not in output


def setup_export_dir(tmp_path: Path, kind: str) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    if kind == "existing":
        (out / "dataset.json").write_text("[\"keep me\"]")
    elif kind == "dataset-link":
        victim.write_text("outside")
        (out / "dataset.json").symlink_to(victim)
    elif kind == "images-link":
        victim.mkdir()
        (out / "images").symlink_to(victim)
    elif kind == "images-file":
        (out / "images").write_text("not a dir")
    elif kind == "file":
        out.rmdir()
        out.write_text("a file")
    return out


def tree(path: Path) -> dict[str, bytes | str]:
    """What is under ``path`` (links by target, not followed)."""
    if not os.path.lexists(path):
        return {}
    if not path.is_dir() or path.is_symlink():
        return {".": os.readlink(path) if path.is_symlink() else path.read_bytes()}
    return {str(p.relative_to(path)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


# The CLI: (argv, expected text of the one error line, exit code). "{out}" is a fresh directory set up by kind.
CLI_CASES = [
    pytest.param(["ask", "a\udcffb"], "error: argument 2 is not valid UTF-8: a\\xffb", 1, None, id="argv-not-utf8"),
    pytest.param(["history", "show", "9" * 23], f"error: no conversation with id {'9' * 23}", 1, None,
                 id="id-beyond-sqlite"),
    pytest.param(["history", "delete", "9" * 30], f"error: no conversation with id {'9' * 30}", 1, None,
                 id="delete-id-beyond-sqlite"),
    pytest.param(["history", "show", "²"], "error: a conversation id is a number, got '²'", 1, None,
                 id="id-not-ascii-digits"),
    pytest.param(["history", "export", "1", "--out", "/proc/iris-export"],
                 "error: /proc/iris-export: cannot export there", 1, None, id="export-into-proc"),
    pytest.param(["history", "export", "1", "--out", "/sys/iris-export", "--force"],
                 "error: /sys/iris-export: cannot export there", 1, None, id="export-into-sys"),
    pytest.param(["history", "export", "1", "--out", "/proc"], "error: /proc: already exists and is not empty", 1,
                 None, id="export-into-proc-root"),
    pytest.param(["history", "export", "1", "--out", "{out}"], "already exists and is not empty; choose a new "
                 "directory or pass --force to replace its dataset.json", 1, "existing", id="export-overwrite"),
    pytest.param(["history", "export", "1", "--out", "{out}", "--force"], "out/dataset.json: is a symlink; an "
                 "export never writes through one", 1, "dataset-link", id="export-symlinked-dataset"),
    pytest.param(["history", "export", "1", "--out", "{out}", "--force"], "out/images: is a symlink", 1,
                 "images-link", id="export-symlinked-images"),
    pytest.param(["history", "export", "1", "--out", "{out}", "--force"], "out/images: exists and is not a "
                 "directory", 1, "images-file", id="export-images-is-a-file"),
    pytest.param(["history", "export", "1", "--out", "{out}"], "out: exists and is not a directory", 1, "file",
                 id="export-onto-a-file"),
    pytest.param(["history", "export", "1", "2", "--out", "{out}"], "error: no conversation with id 2", 1, "fresh",
                 id="export-missing-second-id"),
    pytest.param(["adapters", "info", "x" * 5000], "no such adapter", 1, None, id="adapter-name-too-long"),
    pytest.param(["adapters", "info", "[/x]"], "error: [/x]: no such adapter", 1, None, id="markup-in-adapter-name"),
    pytest.param(["ask", "hi", "--image", "[/x].png"], "error: [/x].png: no such file", 1, None,
                 id="markup-in-image-path"),
    pytest.param(["ask", "hi", "--image", "\x1b]0;pwned\x07.png"], "error: '\\x1b]0;pwned\\x07.png': no such file", 1,
                 None, id="escape-in-image-path"),
    pytest.param(["chat", "--resume", "9" * 23], f"error: no conversation with id {'9' * 23}", 1, None,
                 id="resume-id-beyond-sqlite"),
]


@pytest.mark.parametrize("argv, expected, code, out_kind", CLI_CASES)
def test_hostile_cli_case(seeded: Path, tmp_path: Path, argv: list[str], expected: str, code: int,
                          out_kind: str | None) -> None:
    out = tmp_path / "out"
    if out_kind not in (None, "fresh"):
        setup_export_dir(tmp_path, out_kind)
    argv = [arg.replace("{out}", str(out)) for arg in argv]
    before, files_before, victim_before = stored(seeded), tree(tmp_path / "out"), tree(tmp_path / "victim")
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert expected in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    no_escape(result.output)
    assert stored(seeded) == before
    assert tree(tmp_path / "out") == files_before and tree(tmp_path / "victim") == victim_before


# The chat, fed through stdin as `iris chat < file` is: (input, the one error line). Nothing refused is stored.
CHAT_CASES = [
    pytest.param(b"hello\x00world\n", "error: the message contains a NUL character (^@ at character 6); it was "
                 "not sent", id="nul-in-line"),
    pytest.param(b"caf\xe9 au lait\n", "error: the message is not valid UTF-8 (\\xe9 at character 4); it was not "
                 "sent", id="latin1-bytes"),
    pytest.param(b'"""never closed\nsecond line\n', 'error: the input ended inside a """ block; it was not sent',
                 id="unterminated-block"),
    pytest.param(b"/load 99999999999999999999999\n", "error: no conversation with id 99999999999999999999999",
                 id="load-id-beyond-sqlite"),
    pytest.param("/load ²\n".encode(), "error: usage: /load ID (see /history)", id="load-superscript-digit"),
    pytest.param(b"/save /proc/iris-save\n", "error: /proc/iris-save: cannot export there", id="save-into-proc"),
    pytest.param(b"/save a b\n", "error: /save needs a directory: /save DIR [--force]", id="save-two-dirs"),
    pytest.param(b"/" + b"a" * 5000 + b"\n", "error: unknown command /aaaa", id="long-unknown-command"),
    pytest.param(b"/image /" + b"a" * 5000 + b".png\n", "error: /aaaa", id="image-name-too-long"),
    pytest.param(b"/image [/x].png\n", "/[/x].png: no such file", id="markup-in-image-command"),
    pytest.param(b"/adapter \x1b[2J\n", "error: unknown adapter '\\x1b[2J'", id="escape-in-adapter-name"),
]


@pytest.mark.parametrize("keys, expected", CHAT_CASES)
def test_hostile_chat_case(seeded: Path, keys: bytes, expected: str) -> None:
    before = messages(seeded)
    result = runner.invoke(app, ["chat", "--plain"], input=keys)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    no_escape(result.output)
    assert messages(seeded) == before


def test_words_no_file_system_can_name_stay_text(fake: FakeBackend, iris_home: Path) -> None:
    long_word = "/" + "a" * 300 + ".png"
    result = runner.invoke(app, ["chat", "--plain"], input=f"look at {long_word} and ~nobody\x7f/x.png\n")
    assert result.exit_code == 0 and "error" not in result.output
    assert fake.calls[0]["messages"][-1].text == f"look at {long_word} and ~nobody\x7f/x.png"


# --- nothing from data reaches the terminal as a control sequence ----------------------------------------------


def test_piped_chat_answers_and_shows_hostile_text_visibly(fake: FakeBackend, iris_home: Path) -> None:
    fake.replies = [HOSTILE, "fine"]
    result = runner.invoke(app, ["chat", "--plain"], input=f"first\n{HOSTILE}\n")
    assert result.exit_code == 0, result.output
    no_escape(result.output)
    assert "^[]0;pwned^G^[[2J^[]52;c;cHduZWQ=^G\\x9b31m\\u202eevil[/x] :smile:" in result.output
    assert [m.text for m in fake.calls[1]["messages"] if m.role.value == "user"] == ["first", HOSTILE]  # kept as is
    history = runner.invoke(app, ["history", "show", "1"])
    listed = runner.invoke(app, ["history", "list"])
    resumed = runner.invoke(app, ["chat", "--plain", "--resume", "1"], input=b"")
    for shown in (history, listed, resumed):
        assert shown.exit_code == 0, shown.output
        no_escape(shown.output)
    assert "assistant: ^[]0;pwned^G" in history.stdout and "user: ^[]0;pwned^G" in resumed.stdout


def test_history_list_title_and_ask_output_are_visible(fake: FakeBackend, iris_home: Path) -> None:
    fake.replies = [HOSTILE + "\r\nnext line\rover"]
    answer = runner.invoke(app, ["ask", "\x1b]0;title\x07\nwho?"])
    assert answer.stdout == visible(HOSTILE) + "\nnext line^Mover\n"
    fake.replies = [HOSTILE]
    as_json = runner.invoke(app, ["ask", "again", "--json"])
    no_escape(as_json.stdout)
    assert json.loads(as_json.stdout)["answer"] == HOSTILE.strip()  # the JSON value is unchanged
    listed = runner.invoke(app, ["history", "list"])
    no_escape(listed.stdout)
    assert "^[]0;title^G who?" in listed.stdout and listed.stdout.count("\n") == 2


def test_markdown_stream_on_a_real_terminal_emits_only_its_own_styling(store: object) -> None:
    reply = HOSTILE + " **bold** [site](http://example.com) and\n\n```[/x]\ncode \x1b[31m\n```"
    manager = DialogueManager(FakeBackend([reply]), store)  # type: ignore[arg-type]
    screen = io.StringIO()
    console = make_console(file=screen, force_terminal=True, width=120, color_system="truecolor")
    with create_pipe_input() as pipe:
        pipe.send_text("go\r/exit\r")
        ChatSession(manager, manager.new_conversation(), console, make_reader(None, input=pipe, output=DummyOutput()),
                    max_image_bytes=10**6, max_image_pixels=10**6, markdown=True).run()
    output = screen.getvalue()
    assert "pwned" in output and "^[]0;pwned^G" in output and "\\u202eevil[/x]" in output
    for raw in ("\x1b]", "\x07", "\x1b[2J", "\x1b[31m", "\x9b", "\u202e"):
        assert raw not in output
    leftover = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)  # rich's own SGR, cursor and erase-line codes
    assert "\x1b" not in leftover
    assert "http://example.com" in output  # a link shows where it goes, never as a hidden OSC 8 hyperlink


def test_the_error_boundary_shows_escapes_in_messages_and_tracebacks(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert report(IrisError("server said: \x1b]0;pwned\x07 [/x]\nsecond line")) == 1
    assert capsys.readouterr().err == "error: server said: ^[]0;pwned^G [/x] second line\n"
    monkeypatch.setenv("IRIS_DEBUG", "1")
    assert report(ValueError("\x1b[2J[bold]")) == 2
    err = capsys.readouterr().err
    no_escape(err)
    assert "ValueError: ^[[2J[bold]" in err and "internal error: ValueError: ^[[2J[bold]" in err


def test_markup_in_iris_home_and_manifests_prints_literally(fake: FakeBackend, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "[/x] [bold]home"
    monkeypatch.setenv("IRIS_HOME", str(home))
    shown = runner.invoke(app, ["info"])
    assert shown.exit_code == 0 and f"data: {home}/data/iris.db" in shown.stdout
    adapter = home / "data" / "adapters" / "evil[bold]"
    adapter.mkdir(parents=True)
    (adapter / "iris_manifest.json").write_text(json.dumps({"kind": "lora", "base_model": "[/b]\x1b[2J",
                                                            "steps": 3, "metrics": "nan"}))
    listed = runner.invoke(app, ["adapters", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "evil[bold]" in listed.stdout and "[/b]^[[2J" in listed.stdout
    info = runner.invoke(app, ["adapters", "info", str(adapter)])
    assert info.exit_code == 0 and json.loads(info.stdout)["base_model"] == "[/b]\x1b[2J"
    no_escape(listed.output + info.output)


def test_discord_log_lines_show_escapes(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from cli.terminal import VisibleLogRecords

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(VisibleLogRecords())
    logger = logging.getLogger("iris.test.hostile")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError("guild \x1b]0;pwned\x07")
        except RuntimeError:
            logger.exception("joined %s", "\x1b[2Jchannel")
    finally:
        logger.removeHandler(handler)
    no_escape(stream.getvalue())
    assert "joined ^[[2Jchannel" in stream.getvalue() and "RuntimeError: guild ^[]0;pwned^G" in stream.getvalue()


# --- overwrites ----------------------------------------------------------------------------------------------------


def test_export_several_conversations_into_one_folder_and_refuse_to_overwrite(
        fake: FakeBackend, iris_home: Path, tmp_path: Path) -> None:
    for question in ("one", "two", "three"):
        runner.invoke(app, ["ask", question])
    out = tmp_path / "data"
    both = runner.invoke(app, ["history", "export", "1", "2", "1", "--out", str(out)])
    assert both.exit_code == 0 and "(2 conversation(s))" in both.stdout
    assert [r["id"] for r in json.loads((out / "dataset.json").read_text())] == ["conversation-1", "conversation-2"]
    before = tree(out)
    again = runner.invoke(app, ["history", "export", "3", "--out", str(out)])
    assert again.exit_code == 1 and "pass --force" in again.output and tree(out) == before
    forced = runner.invoke(app, ["history", "export", "3", "--out", str(out), "--force"])
    assert forced.exit_code == 0
    assert [r["id"] for r in json.loads((out / "dataset.json").read_text())] == ["conversation-3"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images"]  # no partial files left


def test_export_never_writes_through_a_symlinked_image(fake: FakeBackend, sample_png: Path, tmp_path: Path) -> None:
    runner.invoke(app, ["ask", "what", "--image", str(sample_png)])
    out = tmp_path / "out"
    assert runner.invoke(app, ["history", "export", "1", "--out", str(out)]).exit_code == 0
    image = next((out / "images").iterdir())
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    image.unlink()
    image.symlink_to(victim)
    result = runner.invoke(app, ["history", "export", "1", "--out", str(out), "--force"])
    assert result.exit_code == 1 and "is a symlink" in result.output
    assert victim.read_bytes() == b"precious"


def test_chat_save_refuses_to_overwrite_unless_forced(fake: FakeBackend, iris_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "my saves"
    keys = f"hello\n/save '{out}'\nmore\n/save \"{out}\"\n/save {str(out).replace(' ', chr(92) + ' ')} --force\n"
    result = runner.invoke(app, ["chat", "--plain"], input=keys)
    assert result.exit_code == 0, result.output
    assert result.output.count(f"saved to {out}/dataset.json") == 2
    assert "already exists and is not empty; choose a new directory or pass --force" in result.output
    conversation = json.loads((out / "dataset.json").read_text())[0]["conversations"]
    assert [turn["value"] for turn in conversation if turn["from"] == "human"] == ["hello", "more"]


# --- input paths ---------------------------------------------------------------------------------------------------


def test_piped_chat_reads_fast(fake: FakeBackend, iris_home: Path) -> None:
    filler = ("   " + " " * 60 + "\n") * 16_000  # 1 MiB of blank lines: read, skipped
    questions = "".join(f"question {n}\n" for n in range(50))
    started = time.perf_counter()
    result = runner.invoke(app, ["chat", "--plain"], input=filler + questions)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0
    assert [m.text for m in fake.calls[-1]["messages"] if m.role.value == "user"][-1] == "question 49"
    assert len(fake.calls) == 50 and elapsed < 10  # prompt_toolkit on a pipe read 3–4 KB/s: minutes


def test_input_history_is_private(tmp_path: Path) -> None:
    fresh = tmp_path / "data" / "input_history"
    old = tmp_path / "old_history"
    old.write_text("\n# 2024-01-01\n+secret\n")
    old.chmod(0o644)
    with create_pipe_input() as pipe:
        for path in (fresh, old):
            make_reader(path, input=pipe, output=DummyOutput())
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "+secret" in old.read_text()


# --- properties ------------------------------------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=200)


@given(ANY_TEXT)
def test_visible_never_emits_a_control_character(text: str) -> None:
    shown = visible(text)
    assert not any(hidden(char) for char in shown)
    shown.encode("utf-8")  # always printable, even from undecodable bytes
    assert visible(shown) == shown


@given(st.text(st.characters(exclude_categories=("Cc", "Cs")).filter(lambda c: c not in BIDI) | st.sampled_from("\n\t"),
               max_size=200))
def test_visible_leaves_printable_text_alone(text: str) -> None:
    assert visible(text) == text
    assert styled(text).plain == text  # no markup, no emoji codes: "[/x]" and ":smile:" stay as written


@given(ANY_TEXT, st.lists(st.integers(0, 200), max_size=6))
def test_streamed_text_shows_like_the_whole(text: str, cuts: list[int]) -> None:
    stream, pieces, last = VisibleStream(), [], 0
    for cut in sorted(cuts):
        pieces.append(stream.feed(text[last:cut]))
        last = max(last, cut)
    pieces.append(stream.feed(text[last:]) + stream.end())
    assert "".join(pieces) == visible(text)


@given(st.recursive(st.none() | ANY_TEXT | st.integers(), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(ANY_TEXT, inner, max_size=3), max_leaves=8))
def test_visible_json_is_the_same_json_and_safe(value: object) -> None:
    shown = visible_json(json.dumps(value, ensure_ascii=False))
    assert not any(hidden(char) for char in shown)
    assert json.loads(shown) == value


@settings(max_examples=300, deadline=None)  # file system calls on a shared machine
@given(st.lists(ANY_TEXT | st.sampled_from(["~", "~root/", "/", "./", "'", '"', "\\ ", ".png", "\x00",
                                            "/" + "a" * 300, "~" + "b" * 300]), max_size=8).map("".join))
def test_inline_path_parsing_never_raises(line: str) -> None:
    text, paths = extract_images(line, Path("/nonexistent-cwd"))
    assert paths == [] and text == line  # nothing under / is an image named like these
