"""Branching chats: /retry, /edit and /branches in ``iris chat``, branch marks in ``history show``, exports of the
current branch, and 🔁 on Discord; the store keeps every branch."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from discord_harness import Harness, fast_settings
from fakes import FakeBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prompt_toolkit import PromptSession
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from test_cli_chat import run_session
from typer.testing import CliRunner

from assistant.config import Paths
from assistant.dialogue import DialogueManager, NoBranch
from assistant.errors import ConversationNotFound
from assistant.messages import Message, Role
from assistant.store import Store
from assistant.vision import load_image_path
from cli.app import app
from cli.chat import ChatSession
from cli.prompt_input import read_lines


def texts(messages: list[Message]) -> list[str]:
    return [m.text for m in messages]


# the dialogue manager -------------------------------------------------------------------------------------------


def test_retry_answers_again_as_a_sibling_and_keeps_the_old_answer(store: Store) -> None:
    backend = FakeBackend(["four", "4, of course"])
    manager = DialogueManager(backend, store, default_system_prompt="be brief")
    cid = manager.new_conversation()
    first = manager.send(cid, "what is 2+2")
    first.run()
    manager.set_option(cid, "temperature", "1.5")  # the retry uses the conversation's options now
    again = manager.retry(cid)
    assert again.user_message_id == first.user_message_id and again.run() == "4, of course"
    assert texts(backend.calls[1]["messages"]) == ["be brief", "what is 2+2"]
    assert backend.calls[1]["options"].temperature == 1.5
    assert texts(manager.history(cid)) == ["what is 2+2", "4, of course"]
    [fork] = manager.branches(cid)
    assert (fork.position, texts(list(fork.alternatives)), fork.current) == (1, ["four", "4, of course"], 1)
    thread = manager.switch_branch(cid, first.assistant_message_id)
    assert texts(thread) == ["what is 2+2", "four"] and manager.conversation(cid).message_count == 3


def test_edit_sends_a_new_version_of_the_last_question_with_its_images(store: Store, sample_png: Path) -> None:
    backend = FakeBackend(["a cat", "a dog", "yes"])
    manager = DialogueManager(backend, store)
    cid = manager.new_conversation()
    image = load_image_path(sample_png)
    manager.send(cid, "what animal?", [image], author="ana").run()
    edited = manager.edit(cid, "which animal is it?")
    assert edited.run() == "a dog"
    sent = backend.calls[1]["messages"]
    assert [(m.text, len(m.images)) for m in sent] == [("ana: which animal is it?", 1)]
    manager.send(cid, "sure?").run()
    assert texts(manager.history(cid)) == ["which animal is it?", "a dog", "sure?", "yes"]
    [fork] = manager.branches(cid)  # both versions are the first message: roots of the same conversation
    assert (fork.position, texts(list(fork.alternatives)), fork.current) == (0, ["what animal?",
                                                                              "which animal is it?"], 1)
    assert texts(manager.switch_branch(cid, fork.alternatives[0].id or 0)) == ["what animal?", "a cat"]
    manager.switch_branch(cid, fork.alternatives[1].id or 0)  # back: the head is the newest message there
    assert texts(manager.history(cid)) == ["which animal is it?", "a dog", "sure?", "yes"]


def test_nothing_to_retry_or_edit_and_a_moved_on_answer_are_refused_before_storing(store: Store) -> None:
    manager = DialogueManager(FakeBackend(), store)
    cid = manager.new_conversation()
    with pytest.raises(NoBranch, match="nothing to answer again yet: send a message first"):
        manager.retry(cid)
    with pytest.raises(NoBranch, match="nothing to edit yet: send a message first"):
        manager.edit(cid, "x")
    first = manager.send(cid, "one")
    first.run()
    manager.send(cid, "two").run()
    with pytest.raises(NoBranch, match="that answer is no longer the last one in its conversation"):
        manager.retry(cid, answer_id=first.assistant_message_id)
    other = manager.new_conversation()
    with pytest.raises(ConversationNotFound, match=f"no message {first.user_message_id} in conversation {other}"):
        manager.switch_branch(other, first.user_message_id)
    assert manager.conversation(cid).message_count == 4 and manager.history(other) == []


def test_a_retry_while_another_front_end_writes_answers_its_newest_question(tmp_path: Path) -> None:
    database = tmp_path / "iris.db"
    other = DialogueManager(FakeBackend(["meanwhile answer"]), Store(database))

    class Interrupted(FakeBackend):
        """Another front end writes between this manager's reading of the history and its storing."""

        def count_tokens(self, messages):  # type: ignore[no-untyped-def]
            if len(other.history(cid)) == 2:
                other.send(cid, "meanwhile").run()
            return super().count_tokens(messages)

    manager = DialogueManager(Interrupted(["first", "again"]), Store(database))
    cid = manager.new_conversation(system_prompt="")
    manager.send(cid, "question").run()
    manager.retry(cid).run()
    assert texts(manager.history(cid)) == ["question", "first", "meanwhile", "again"]


OPERATIONS = st.lists(st.one_of(st.just(("send", 0)), st.just(("retry", 0)), st.just(("edit", 0)),
                                st.tuples(st.just("switch"), st.integers(0, 20))), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_any_mix_of_sends_retries_edits_and_switches_keeps_every_message_and_a_valid_thread(
        operations: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "iris.db")
        manager = DialogueManager(FakeBackend(), store)
        cid = manager.new_conversation()
        stored = 0
        for step, (operation, pick) in enumerate(operations):
            try:
                if operation == "send":
                    manager.send(cid, f"q{step}").run()
                    stored += 2
                elif operation == "retry":
                    manager.retry(cid).run()
                    stored += 1
                elif operation == "edit":
                    manager.edit(cid, f"e{step}").run()
                    stored += 2
                else:
                    choices = [m for fork in manager.branches(cid) for m in fork.alternatives]
                    if choices:
                        manager.switch_branch(cid, choices[pick % len(choices)].id or 0)
            except NoBranch:
                assert operation in ("retry", "edit") and manager.history(cid) == []
            thread = manager.history(cid)
            assert [m.role for m in thread] == [Role.USER, Role.ASSISTANT] * (len(thread) // 2)
            assert manager.conversation(cid).message_count == stored
            for fork in manager.branches(cid):
                assert thread[fork.position].id == fork.message_id
                assert len({m.role for m in fork.alternatives}) == 1
        store.close()


# the terminal chat --------------------------------------------------------------------------------------------


def test_retry_edit_and_branches_in_the_chat(store: Store, tmp_path: Path) -> None:
    backend = FakeBackend(["four", "4, of course", "six"])
    manager = DialogueManager(backend, store)
    keys = "what is 2+2\r/retry\r/branches\r/edit what is 3+3\r/branches\r/branches 1\r/branches\r/exit\r"
    output = run_session(manager, keys, tmp_path)
    assert output.count("(branch 2 of 2 · /branches lists them)") == 2
    assert ("message 2 (answer), 2 versions:\n  1. four\n* 2. 4, of course\n"
            "(* is the current branch; /branches N switches to branch N)") in output
    assert ("message 1 (you), 2 versions:\n  1. what is 2+2\n* 2. what is 3+3\n") in output
    assert ("switched to branch 1; the conversation now ends with:\nuser (branch 1 of 2): what is 2+2\n"
            "assistant (branch 2 of 2): 4, of course") in output
    assert "message 2 (answer), 2 versions:\n  1. four\n* 2. 4, of course\nmessage 1 (you), 2 versions:\n" \
           "* 3. what is 2+2\n  4. what is 3+3\n" in output  # the newest fork is numbered first
    assert texts(manager.history(1)) == ["what is 2+2", "4, of course"]
    assert store.conversation(1).message_count == 5


def test_edit_prefills_the_prompt_toolkit_input_with_the_last_question(store: Store, tmp_path: Path) -> None:
    backend = FakeBackend(["4", "5"])
    manager = DialogueManager(backend, store)
    console = Console(record=True, width=200, force_terminal=False)
    with create_pipe_input() as pipe:
        session: PromptSession[str] = PromptSession(input=pipe, output=DummyOutput())
        pipe.send_text("what is 2+2\r/edit\r\x7f3\r/edit\r\r/exit\r")  # backspace over the prefilled "2", type 3

        def read_line(prompt: str, default: str = "") -> str:
            return session.prompt(prompt, default=default)

        ChatSession(manager, manager.new_conversation(), console, read_line, max_image_bytes=1 << 20,
                    max_image_pixels=1 << 20, markdown=False, cwd=tmp_path).run()
    output = console.export_text()
    assert texts(manager.history(1)) == ["what is 2+3", "5"]
    assert "editing:" not in output  # the old text is in the input, not printed above it
    assert "edit cancelled; nothing changed" in output  # Enter on the unchanged text
    assert store.conversation(1).message_count == 4


def test_piped_edit_takes_the_next_line_and_errors_are_one_line(store: Store, tmp_path: Path) -> None:
    manager = DialogueManager(FakeBackend(["first", "second"]), store)
    console = Console(record=True, width=200, force_terminal=False)
    keys = b"/retry\n/edit\n/branches\n/branches 1\nhello\n/retry now\n/branches two\n/branches 7\n/edit\nhi\n/edit\n\n"
    stream = tempfile.TemporaryFile()
    stream.write(keys)
    stream.seek(0)
    ChatSession(manager, manager.new_conversation(), console, read_lines(stream), max_image_bytes=1 << 20,
                max_image_pixels=1 << 20, markdown=False, cwd=tmp_path).run()
    output = console.export_text()
    for expected in ("error: nothing to answer again yet: send a message first",
                     "error: nothing to edit yet: send a message first",
                     "no branches yet: /retry or /edit makes one",
                     "error: no branches yet: /retry or /edit makes one",
                     "error: usage: /retry (it answers your last message again)",
                     "error: usage: /branches [N]", "error: no branches yet: /retry or /edit makes one",
                     "editing: hello", "editing: hi", "edit cancelled; nothing changed"):
        assert expected in output, expected
    assert texts(manager.history(1)) == ["hi", "second"]


def test_history_show_marks_branches_and_exports_take_the_current_branch(iris_home: Path, tmp_path: Path) -> None:
    store = Store(Paths.default().database)
    manager = DialogueManager(FakeBackend(["four", "4, of course", "eight"]), store)
    cid = manager.new_conversation(system_prompt="be brief")
    first = manager.send(cid, "what is 2+2")
    first.run()
    manager.retry(cid).run()
    manager.send(cid, "double it").run()
    run_session(manager, f"/branches 1\r/save {tmp_path / 'saved'}\r/exit\r", tmp_path, conversation_id=cid)
    store.close()
    runner = CliRunner()
    shown = runner.invoke(app, ["history", "show", str(cid)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines() == ["system: be brief", "user: what is 2+2", "assistant (branch 1 of 2): four"]
    exported = runner.invoke(app, ["history", "export", str(cid), "--out", str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    for directory in ("exported", "saved"):
        record = json.loads((tmp_path / directory / "dataset.json").read_text())[0]
        assert [turn["value"] for turn in record["conversations"]] == ["be brief", "what is 2+2", "four"]


# Discord: 🔁 ----------------------------------------------------------------------------------------------------


def answers_to(harness: Harness, message_id: int) -> list[str]:
    """Every bot message replying to ``message_id`` (each regenerated answer is one more), oldest first."""
    return [harness.transcript.content[i] for i, ref in sorted(harness.transcript.reference.items())
            if ref == message_id]


@pytest.mark.asyncio
async def test_retry_reaction_on_the_last_answer_regenerates_it_for_the_asker_or_an_admin(store: Store) -> None:
    backend = FakeBackend(["first answer", "second answer", "third answer", "from the old branch"])
    harness = await Harness.start(DialogueManager(backend, store), fast_settings())
    harness.bot.permissions._s = fast_settings(admin_ids=frozenset({harness.member(2).id}))
    question = await harness.say("tell me something", member=0)
    [old] = [i for i, ref in harness.transcript.reference.items() if ref == question.id]
    await harness.react(1, old, "🔁")  # someone else: nothing happens
    await harness.settle()
    assert len(backend.calls) == 1
    await harness.react(0, old, "🔁")
    await harness.settle()
    assert answers_to(harness, question.id) == ["first answer", "second answer"]  # the old one stays
    assert texts(backend.calls[1]["messages"]) == [f"{harness.member(0).display_name}: tell me something"]
    await harness.react(0, old, "🔁")  # no longer the last answer
    await harness.settle()
    newest = max(i for i, ref in harness.transcript.reference.items() if ref == question.id)
    await harness.react(2, newest, "🔁")  # an admin may
    await harness.settle()
    assert answers_to(harness, question.id)[-1] == "third answer" and len(backend.calls) == 3
    conversation = store.list_conversations(source="discord")[0]
    [fork] = store.forks(conversation.id)
    assert texts(list(fork.alternatives)) == ["first answer", "second answer", "third answer"]
    await harness.say("go on", reply_to=old, mention=False)  # replying to the old answer continues that branch
    assert texts(backend.calls[3]["messages"])[1] == "first answer"
    await harness.close()


@pytest.mark.asyncio
async def test_retry_reaction_in_an_auto_thread_answers_in_the_thread(store: Store) -> None:
    backend = FakeBackend(["one", "two"])
    harness = await Harness.start(DialogueManager(backend, store), fast_settings(auto_thread=True))
    await harness.say("start a thread")
    thread = harness.thread()
    [answer] = [i for i, channel in harness.transcript.channel_of.items() if channel == thread.id]
    await harness.react(0, answer, "🔁")
    await harness.settle()
    assert harness.transcript.in_channel(thread.id) == ["one", "two"]
    assert harness.transcript.in_channel(harness.channel().id) == []
    await harness.close()
