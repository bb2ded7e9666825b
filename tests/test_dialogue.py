"""DialogueManager: turns, streaming, interruption and the context budget (FakeBackend)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import FakeBackend

from assistant.dialogue import DialogueManager, fit_to_context
from assistant.errors import BadAdapter, BadSetting, ContextTooLong, ImagesNotSupported
from assistant.messages import Message, Role
from assistant.store import Store
from assistant.vision import load_image_path


def test_a_turn_streams_chunks_and_commits_the_answer(manager: DialogueManager, backend: FakeBackend) -> None:
    backend.replies = ["Paris is the capital"]
    cid = manager.new_conversation()
    turn = manager.send(cid, "capital of France?")
    assert list(turn) == ["Paris", " is", " the", " capital"]
    history = manager.history(cid)
    assert [(m.role, m.text, m.interrupted) for m in history] == [
        (Role.USER, "capital of France?", False), (Role.ASSISTANT, "Paris is the capital", False)]
    assert backend.calls[0]["messages"][0] == Message(Role.SYSTEM, "You are a test assistant.")


def test_cancel_keeps_the_partial_answer_marked_interrupted(manager: DialogueManager, backend: FakeBackend) -> None:
    backend.replies = ["one two three four five"]
    cid = manager.new_conversation()
    turn = manager.send(cid, "count")
    seen = []
    for chunk in turn:
        seen.append(chunk)
        if len(seen) == 2:
            turn.cancel()
    assert seen == ["one", " two"]
    answer = manager.history(cid)[-1]
    assert answer.text == "one two" and answer.interrupted
    assert backend.closed_early == 1


def test_an_exception_mid_stream_still_commits_the_partial_answer(manager: DialogueManager,
                                                                  backend: FakeBackend) -> None:
    backend.replies = ["alpha beta gamma"]
    cid = manager.new_conversation()
    turn = manager.send(cid, "go")
    with pytest.raises(KeyboardInterrupt):
        for chunk in turn:
            if chunk == " beta":
                raise KeyboardInterrupt
    assert manager.history(cid)[-1] == Message(Role.ASSISTANT, "alpha beta", interrupted=True,
                                               id=manager.history(cid)[-1].id)


def test_images_to_a_text_only_model_are_refused_and_nothing_is_stored(store: Store, sample_png: Path) -> None:
    manager = DialogueManager(FakeBackend(accepts_images=False), store)
    cid = manager.new_conversation()
    with pytest.raises(ImagesNotSupported, match="text only"):
        manager.send(cid, "look", [load_image_path(sample_png)])
    assert manager.history(cid) == []


def test_images_in_any_turn_and_several_per_message_reach_the_backend(
        manager: DialogueManager, backend: FakeBackend, sample_png: Path, sample_jpg: Path) -> None:
    png, jpg = load_image_path(sample_png), load_image_path(sample_jpg)
    cid = manager.new_conversation()
    manager.send(cid, "first, no image").run()
    manager.send(cid, "two images", [png, jpg]).run()
    manager.send(cid, "one more", [jpg]).run()
    sent = backend.calls[-1]["messages"]
    assert [len(m.images) for m in sent] == [0, 0, 0, 2, 0, 1]


def _long_conversation(manager: DialogueManager, image: object, turns: int) -> int:
    cid = manager.new_conversation()
    for index in range(turns):
        manager.send(cid, f"question {index} " + "word " * 20, [image] if index < 2 else []).run()  # type: ignore[list-item]
    return cid


def test_budget_drops_oldest_images_first_then_oldest_turns(store: Store, sample_png: Path) -> None:
    backend = FakeBackend(context_length=400, image_cost=100)
    manager = DialogueManager(backend, store, default_system_prompt="system rules")
    manager.default_options = manager.default_options.with_setting("max_new_tokens", "50")
    image = load_image_path(sample_png)
    cid = _long_conversation(manager, image, 3)
    turn = manager.send(cid, "newest", [image])
    turn.run()
    sent = backend.calls[-1]["messages"]
    assert sent[0].text == "system rules" and sent[-1].text == "newest" and len(sent[-1].images) == 1
    assert sum(len(m.images) for m in sent[1:-1]) == 0
    assert any("image" in notice for notice in turn.notices)
    assert backend.count_tokens(sent) <= 350
    # Longer history: whole exchanges go, oldest first, the system prompt stays.
    for index in range(6):
        manager.send(cid, f"more {index} " + "word " * 30).run()
    turn = manager.send(cid, "latest")
    turn.run()
    sent = backend.calls[-1]["messages"]
    assert sent[0].role is Role.SYSTEM and sent[-1].text == "latest"
    assert sent[1].role is Role.USER and "question 0" not in " ".join(m.text for m in sent)
    assert any("oldest message" in notice for notice in turn.notices)
    assert backend.count_tokens(sent) <= 350
    # Stored history is untouched by what the prompt left out.
    assert manager.history(cid)[0].text.startswith("question 0") and len(manager.history(cid)[0].images) == 1


def test_a_message_that_cannot_fit_is_refused_before_storing(store: Store, sample_png: Path) -> None:
    manager = DialogueManager(FakeBackend(context_length=100, image_cost=200), store)
    cid = manager.new_conversation()
    with pytest.raises(ContextTooLong, match="image"):
        manager.send(cid, "big", [load_image_path(sample_png)])
    with pytest.raises(ContextTooLong, match="shorten it"):
        manager.send(cid, "word " * 200)
    assert manager.history(cid) == []


def test_fit_never_drops_system_or_newest() -> None:
    backend = FakeBackend()
    messages = [Message(Role.SYSTEM, "s " * 10), Message(Role.USER, "u " * 10),
                Message(Role.ASSISTANT, "a " * 10), Message(Role.USER, "n " * 10)]
    fitted = fit_to_context(messages, backend, budget=backend.count_tokens([messages[0], messages[3]]))
    assert fitted.messages == [messages[0], messages[3]]


def test_bad_setting_leaves_options_unchanged(manager: DialogueManager) -> None:
    cid = manager.new_conversation()
    manager.set_option(cid, "temperature", "0.2")
    for name, value in [("temperature", "hot"), ("top_p", "1.5"), ("nonsense", "1"), ("max_new_tokens", "0")]:
        with pytest.raises(BadSetting):
            manager.set_option(cid, name, value)
    assert manager.options(cid).temperature == 0.2
    manager.set_option(cid, "seed", "7")
    manager.send(cid, "hi").run()
    assert manager.backend.calls[-1]["options"].seed == 7  # type: ignore[attr-defined]


def test_adapter_is_per_conversation_and_unknown_names_are_refused(store: Store) -> None:
    backend = FakeBackend(adapters=["pirate", "poet"])
    manager = DialogueManager(backend, store)
    first, second = manager.new_conversation(adapter="pirate"), manager.new_conversation()
    manager.send(first, "a").run()
    manager.send(second, "b").run()
    manager.set_adapter(second, "poet")
    manager.send(second, "c").run()
    assert [call["adapter"] for call in backend.calls] == ["pirate", None, "poet"]
    with pytest.raises(BadAdapter, match="unknown adapter 'ghost'"):
        manager.set_adapter(first, "ghost")
    assert manager.conversation(first).adapter == "pirate"


def test_several_speakers_are_labelled_for_the_model(manager: DialogueManager, backend: FakeBackend) -> None:
    cid = manager.new_conversation(system_prompt="")
    manager.send(cid, "I like cats", author="ana").run()
    manager.send(cid, "I like dogs", author="bo").run()
    texts = [m.text for m in backend.calls[-1]["messages"] if m.role is Role.USER]
    assert texts == ["ana: I like cats", "bo: I like dogs"]
    assert manager.history(cid)[0].text == "I like cats"


def test_reply_to_an_older_message_branches(manager: DialogueManager, backend: FakeBackend) -> None:
    cid = manager.new_conversation(system_prompt="")
    first = manager.send(cid, "one")
    first.run()
    manager.send(cid, "two").run()
    branch = manager.send(cid, "branch", parent_id=first.assistant_message_id)
    branch.run()
    assert [m.text for m in backend.calls[-1]["messages"]] == ["one", "echo: one", "branch"]
