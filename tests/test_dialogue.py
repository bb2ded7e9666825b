"""DialogueManager: turns, streaming, interruption and the context budget (FakeBackend)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import FakeBackend

from assistant.config import GenerationOptions
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


# progressive answers, several front ends, cost ---------------------------------------------------------------


def test_the_answer_is_stored_while_it_streams_and_unmarked_when_it_ends(
        manager: DialogueManager, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from assistant.dialogue import Turn

    monkeypatch.setattr(Turn, "SAVE_EVERY_S", 0.0)
    backend.replies = ["one two three four"]
    elsewhere = Store(manager.store.path)  # another process's view of the database
    cid = manager.new_conversation()
    turn = manager.send(cid, "count")
    assert elsewhere.thread(cid)[-1] == Message(Role.ASSISTANT, "", interrupted=True, id=turn.assistant_message_id)
    chunks = iter(turn)
    next(chunks), next(chunks)
    assert (elsewhere.thread(cid)[-1].text, elsewhere.thread(cid)[-1].interrupted) == ("one two", True)
    list(chunks)
    assert elsewhere.thread(cid)[-1] == Message(Role.ASSISTANT, "one two three four", id=turn.assistant_message_id)
    elsewhere.close()


def test_two_front_ends_writing_one_conversation_keep_every_answer_reachable(tmp_path: Path) -> None:
    from assistant.export import llava_record

    database = tmp_path / "iris.db"
    terminal = DialogueManager(FakeBackend(["terminal answer"]), Store(database))
    discord = DialogueManager(FakeBackend(["discord answer"]), Store(database))
    cid = terminal.new_conversation(system_prompt="")
    first = terminal.send(cid, "from the terminal")
    chunks = iter(first)
    next(chunks)  # the terminal's answer is streaming when a Discord message arrives
    second = discord.send(cid, "from discord", author="ana")
    second.run()
    list(chunks)
    expected = [(Role.USER, "from the terminal"), (Role.ASSISTANT, "terminal answer"),
                (Role.USER, "from discord"), (Role.ASSISTANT, "discord answer")]
    for manager in (terminal, discord):
        assert [(m.role, m.text) for m in manager.history(cid)] == expected
        assert len(llava_record("x", manager.history(cid))["conversations"]) == 4
    assert [m.text for m in discord.backend.calls[0]["messages"]] == [  # type: ignore[attr-defined]
        "from the terminal", "terminal", "ana: from discord"]
    terminal.send(cid, "resumed").run()
    assert [m.text for m in terminal.backend.calls[-1]["messages"]][:4] == [  # type: ignore[attr-defined]
        "from the terminal", "terminal answer", "ana: from discord", "discord answer"]


def test_a_message_stored_elsewhere_while_preparing_is_included_not_branched_around(tmp_path: Path) -> None:
    database = tmp_path / "iris.db"
    other = DialogueManager(FakeBackend(["meanwhile answer"]), Store(database))

    class Interrupted(FakeBackend):
        """Another front end writes between this manager's reading of the history and its storing."""

        def count_tokens(self, messages):  # type: ignore[no-untyped-def]
            if not other.history(cid):
                other.send(cid, "meanwhile").run()
            return super().count_tokens(messages)

    manager = DialogueManager(Interrupted(["mine"]), Store(database))
    cid = manager.new_conversation(system_prompt="")
    manager.send(cid, "my question").run()
    assert [m.text for m in manager.history(cid)] == ["meanwhile", "meanwhile answer", "my question", "mine"]
    assert [m.text for m in manager.backend.calls[0]["messages"]] == [  # type: ignore[attr-defined]
        "meanwhile", "meanwhile answer", "my question"]


def test_text_that_is_not_valid_unicode_is_stored_with_replacement_characters(manager: DialogueManager,
                                                                              backend: FakeBackend) -> None:
    cid = manager.new_conversation()
    manager.send(cid, "bad \udcff bytes", author="\ud800x").run()
    assert manager.history(cid)[0].text == "bad \ufffd bytes" and manager.history(cid)[0].author == "\ufffdx"
    assert backend.calls[0]["messages"][-1].text == "\ufffdx: bad \ufffd bytes"


class CountingBackend(FakeBackend):
    """Counts how many messages it was asked to count: the work a turn's preparation does."""

    counted = 0

    def count_tokens(self, messages):  # type: ignore[no-untyped-def]
        self.counted += len(messages)
        return super().count_tokens(messages)


def test_a_turn_on_a_long_history_counts_only_what_it_keeps(store: Store) -> None:
    backend = CountingBackend(context_length=600)
    manager = DialogueManager(backend, store, default_options=GenerationOptions(max_new_tokens=50))
    cid = manager.new_conversation(system_prompt="be brief")
    for index in range(1000):
        store.add_message(cid, Message(Role.USER if index % 2 == 0 else Role.ASSISTANT, f"message {index} " * 3))
    for _ in range(3):
        backend.counted = 0
        turn = manager.send(cid, "and now?")
        turn.run()
        kept = len(backend.calls[-1]["messages"])
        assert kept < 100 and backend.counted <= 4 * kept + 10
        assert turn.prompt_tokens == backend.count_tokens(backend.calls[-1]["messages"]) <= 550
        assert any("oldest message" in notice for notice in turn.notices)


def _reference_fit(messages: list[Message], backend: FakeBackend, budget: int) -> tuple[list[Message], int, list[str]]:
    """The fitting rule as first written: count everything again after each dropped image or exchange."""
    kept = list(messages)
    tokens = backend.count_tokens(kept)
    notices = []
    first = 1 if kept and kept[0].role is Role.SYSTEM else 0
    dropped_images = 0
    for index in range(first, len(kept) - 1):
        if tokens <= budget:
            break
        if kept[index].images:
            dropped_images += len(kept[index].images)
            kept[index] = kept[index].without_images()
            tokens = backend.count_tokens(kept)
    if dropped_images:
        notices.append(f"dropped {dropped_images} older image(s) to fit the context window")
    dropped = 0
    while tokens > budget and first < len(kept) - 1:
        del kept[first]
        dropped += 1
        if first < len(kept) - 1 and kept[first].role is Role.ASSISTANT:
            del kept[first]
            dropped += 1
        tokens = backend.count_tokens(kept)
    if dropped:
        notices.append(f"dropped {dropped} oldest message(s) to fit the context window")
    return kept, tokens, notices


def _conversations():  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    from assistant.messages import ImageAttachment

    image = ImageAttachment(b"png", "image/png", 1, 1)
    turn = st.tuples(st.integers(0, 30), st.integers(0, 2), st.integers(0, 30))
    return st.tuples(st.booleans(), st.lists(turn, max_size=12), st.integers(0, 30), st.integers(0, 2)).map(
        lambda spec: ([Message(Role.SYSTEM, "s " * 5)] if spec[0] else [])
        + [m for words, images, answer in spec[1]
           for m in (Message(Role.USER, "u " * words, (image,) * images), Message(Role.ASSISTANT, "a " * answer))]
        + [Message(Role.USER, "n " * spec[2], (image,) * spec[3])])


def test_fitting_by_per_message_costs_drops_exactly_what_recounting_dropped() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(_conversations(), st.integers(0, 400))
    def check(messages: list[Message], budget: int) -> None:
        backend = FakeBackend(image_cost=20)
        kept, tokens, notices = _reference_fit(messages, backend, budget)
        if tokens > budget:
            with pytest.raises(ContextTooLong):
                fit_to_context(messages, backend, budget)
            return
        fitted = fit_to_context(messages, backend, budget)
        assert (fitted.messages, fitted.tokens, fitted.notices) == (kept, tokens, notices)

    check()


def test_fitting_a_chat_template_counts_the_result_exactly() -> None:
    """With a real tokenizer and template the estimate is checked by one exact count of the fitted prompt."""
    from tiny_models import tiny_tokenizer

    from assistant.prompt import PromptRenderer

    renderer = PromptRenderer(tiny_tokenizer())

    class TemplateBackend(FakeBackend):
        def count_tokens(self, messages):  # type: ignore[no-untyped-def]
            return renderer.count(messages)

    backend = TemplateBackend()
    history = [Message(Role.SYSTEM, "You are terse.")] + [
        Message(Role.USER if index % 2 == 0 else Role.ASSISTANT, f"message number {index} " * (1 + index % 4))
        for index in range(301)]
    for budget in (120, 300, 1000, 5000):
        fitted = fit_to_context(history, backend, budget)
        assert fitted.tokens == renderer.count(fitted.messages) <= budget
        kept, tokens, _ = _reference_fit(history, backend, budget)  # type: ignore[arg-type]
        assert (fitted.messages, fitted.tokens) == (kept, tokens)


def test_unloading_an_adapter_sends_its_conversations_back_to_the_active_one(store: Store, tmp_path: Path) -> None:
    (tmp_path / "pirate").mkdir()
    (tmp_path / "pirate" / "adapter_config.json").write_text("{}")
    backend = FakeBackend()
    manager = DialogueManager(backend, store)
    assert manager.load_adapter(str(tmp_path / "pirate")) == "pirate"
    using = manager.new_conversation(adapter="pirate")
    base = manager.new_conversation(adapter="none")
    with pytest.raises(BadAdapter, match="no adapter named 'ghost' is loaded"):
        manager.unload_adapter("ghost")
    assert manager.unload_adapter("pirate") == 1
    assert manager.conversation(using).adapter is None and manager.conversation(base).adapter == "none"
    manager.send(using, "still works").run()
    assert backend.calls[-1]["adapter"] is None
