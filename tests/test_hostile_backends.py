"""Hostile servers, payloads and stored text: each ends as one clear line, and stored data stays whole.

An OpenAI-compatible server (tests/fake_openai_server.py) that sends malformed and hostile replies, redirects
that would carry the API key elsewhere, Discord references into other channels, and text the store cannot
take as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from discord_harness import Harness
from fake_openai_server import (
    MODELS,
    FakeOpenAIServer,
    Reply,
    body_reply,
    delta,
    json_reply,
    redirect,
    running,
    sse,
)
from fakes import FakeBackend

from assistant.config import GenerationOptions
from assistant.dialogue import DialogueManager
from assistant.errors import BackendError, ConversationNotFound
from assistant.messages import Message, Role
from assistant.openai_backend import OpenAIBackend
from assistant.store import Store

GREEDY = GenerationOptions(temperature=0, max_new_tokens=16)
HI = [Message(Role.USER, "hi")]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    yield from running()


@pytest.fixture
def elsewhere() -> Iterator[FakeOpenAIServer]:
    """Another origin (another port), which must never see the API key."""
    yield from running()


def assert_one_clean_line(error: BaseException) -> None:
    text = str(error)
    assert text and not any(char in text for char in "\n\r\x1b\x07\x00"), repr(text)


# the OpenAI backend: malformed and hostile streams ------------------------------------------------------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J line one\nline two\r\x1b]52;c;cGF5bG9hZA==\x07"
STREAM_CASES: list[tuple[str, list[Reply], str]] = [
    ("a list for a chunk", [sse([1, 2])], "malformed stream data"),
    ("a number for a chunk", [sse(42)], "malformed stream data"),
    ("a string for a chunk", [sse('"hello"')], "malformed stream data"),
    ("null for a chunk", [sse("null")], "malformed stream data"),
    ("choices is an object", [sse({"choices": {"0": {"delta": {"content": "x"}}}})], "malformed stream data"),
    ("choices is a number", [sse({"choices": 3})], "malformed stream data"),
    ("a choice that is not an object", [sse({"choices": [1]})], "malformed stream data"),
    ("a delta that is a list", [sse({"choices": [{"delta": ["x"]}]})], "malformed stream data"),
    ("content that is a number", [sse({"choices": [{"delta": {"content": 5}}]})], "malformed stream data"),
    ("missing fields and no end", [sse({}, {"choices": [{}]}, done=False)], "stream ended before the answer"),
    ("invalid JSON", [sse(b"{not json")], "malformed stream data"),
    ("JSON nested 100000 deep", [sse(b"[" * 100_000)], "malformed stream data"),
    ("a 2 MB line", [Reply([b"data: " + b"x" * (2 << 20) + b"\n\n"])], "a line of the reply is over 1 MB"),
    ("bytes that are not UTF-8", [sse(b'{"choices": [{"delta": {"content": "\xff\xfe"}}]}')], "not UTF-8"),
    ("an HTML page with 200", [body_reply(b"<html><body><h1>Sign in</h1></body></html>")],
     "the reply is not an event stream"),
    ("an empty 200", [Reply([])], "the reply is not an event stream"),
    ("an HTML 502 page", [body_reply(b"<html><body>502 Bad Gateway</body></html>", 502)] * 2,
     "HTTP 502 (Bad Gateway) after 2 attempts"),
    ("an error object with escapes", [sse({"error": {"message": ESCAPES}})], "server error while streaming"),
    ("an error body with escapes", [json_reply({"error": {"message": ESCAPES}}, 400)], "HTTP 400 ("),
    ("an error body that is a list", [json_reply([1, 2, 3], 400)], "HTTP 400 ("),
    ("an error object in a plain reply", [json_reply({"error": {"message": ESCAPES}})], "server error ("),
    ("a reply that is not HTTP", [Reply([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], raw=True)] * 2, "not an HTTP reply"),
    ("the connection cut mid-answer", [sse(delta("partial"), done=False)], "stream ended before the answer"),
    ("a redirect loop", [redirect("/v1/chat/completions", 307)], "HTTP 307"),
]


@pytest.mark.parametrize("replies, expected", [case[1:] for case in STREAM_CASES],
                         ids=[case[0] for case in STREAM_CASES])
def test_a_malformed_or_hostile_stream_is_one_backend_error_line(server: FakeOpenAIServer, replies: list[Reply],
                                                                 expected: str) -> None:
    server.chat = list(replies)
    backend = OpenAIBackend(server.url, "base", retries=1, timeout=5.0)
    with pytest.raises(BackendError) as error:
        list(backend.stream(HI, GREEDY))
    assert expected in str(error.value)
    assert_one_clean_line(error.value)


def test_a_server_that_does_not_stream_still_answers(server: FakeOpenAIServer) -> None:
    server.chat = [json_reply({"choices": [{"message": {"role": "assistant", "content": "whole answer"}}]})]
    assert list(OpenAIBackend(server.url, "base").stream(HI, GREEDY)) == ["whole answer"]


def test_an_answer_may_end_with_a_finish_reason_instead_of_done(server: FakeOpenAIServer) -> None:
    server.chat = [sse(delta("all"), delta(" there", "stop"), done=False)]
    assert "".join(OpenAIBackend(server.url, "base").stream(HI, GREEDY)) == "all there"


MODEL_LIST_CASES: list[tuple[str, Reply, str]] = [
    ("a list", json_reply([1, 2]), "not a JSON model list"),
    ("a number", json_reply(5), "not a JSON model list"),
    ("data that is an object", json_reply({"data": {"id": "base"}}), "not a JSON model list"),
    ("invalid JSON", body_reply(b"{", content_type="application/json"), "not a JSON model list"),
    ("bytes that are not UTF-8", body_reply(b'{"data": ["\xff"]}', content_type="application/json"),
     "not a JSON model list"),
    ("an HTML page", body_reply(b"<html>welcome</html>"), "not a JSON model list"),
    ("a 9 MB body", body_reply(b" " * (9 << 20), content_type="application/json"), "the model list is over 8 MB"),
    ("an HTML 500 page", body_reply(b"<html>oops</html>", 500), "HTTP 500 (Internal Server Error) after 2"),
]


@pytest.mark.parametrize("reply, expected", [case[1:] for case in MODEL_LIST_CASES],
                         ids=[case[0] for case in MODEL_LIST_CASES])
def test_a_malformed_model_list_is_one_backend_error_line(server: FakeOpenAIServer, reply: Reply,
                                                          expected: str) -> None:
    server.models = reply
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "base", retries=1)
    assert expected in str(error.value)
    assert_one_clean_line(error.value)


def test_odd_entries_in_the_model_list_are_skipped(server: FakeOpenAIServer) -> None:
    server.models = json_reply({"data": [1, "x", None, {"id": 5}, {"object": "model"}, {"id": ["a"]},
                                         {"id": "base", "max_model_len": True}, {"id": "pirate"}]})
    backend = OpenAIBackend(server.url, "base")
    assert backend.adapter_names() == ["pirate"] and backend.context_length == 4096
    assert backend.describe()["served_models"] == ["base", "pirate"]


@pytest.mark.parametrize("base_url", ["localhost:8000/v1", "file:///etc/passwd", "ftp://host/v1", "http://", ""])
def test_a_base_url_that_is_not_http_is_refused_in_one_line(base_url: str) -> None:
    with pytest.raises(BackendError, match="--base-url must be an http:// or https:// URL") as error:
        OpenAIBackend(base_url, "base")
    assert_one_clean_line(error.value)


# the OpenAI backend: the API key stays with its origin --------------------------------------------------------


def test_a_redirect_to_another_origin_never_receives_the_api_key(server: FakeOpenAIServer,
                                                                 elsewhere: FakeOpenAIServer) -> None:
    server.models = redirect(f"{elsewhere.url}/models")
    with pytest.raises(BackendError, match="redirects to another origin") as error:
        OpenAIBackend(server.url, "base", api_key="sekret")
    assert_one_clean_line(error.value)
    assert "sekret" not in str(error.value)
    server.models = json_reply(MODELS)
    backend = OpenAIBackend(server.url, "base", api_key="sekret")
    server.chat = [redirect(f"{elsewhere.url}/chat/completions", 302)]
    with pytest.raises(BackendError, match="redirects to another origin"):
        list(backend.stream(HI, GREEDY))
    assert elsewhere.requests == []


def test_a_redirect_within_the_origin_keeps_the_key(server: FakeOpenAIServer) -> None:
    server.models = redirect("/v2/models", 301)
    server.paths["/v2/models"] = json_reply(MODELS)
    backend = OpenAIBackend(server.url, "base", api_key="sekret")
    assert backend.context_length == 2048
    assert [(r.path, r.authorization) for r in server.requests] == [("/v1/models", "Bearer sekret"),
                                                                     ("/v2/models", "Bearer sekret")]


def test_a_redirect_elsewhere_is_followed_when_there_is_no_key(server: FakeOpenAIServer,
                                                               elsewhere: FakeOpenAIServer) -> None:
    server.models = redirect(f"{elsewhere.url}/models")
    backend = OpenAIBackend(server.url, "base")
    assert backend.context_length == 2048
    assert [(r.path, r.authorization) for r in elsewhere.requests] == [("/v1/models", None)]


# the OpenAI backend through the dialogue manager: the conversation stays whole -------------------------------

TURN_CASES: list[tuple[str, Reply, str]] = [
    ("broken after some text", sse(delta("Hello"), delta(" wor"), [1], done=False), "Hello wor"),
    ("an error after some text", sse(delta("Half"), {"error": {"message": ESCAPES}}), "Half"),
    ("an HTML page", body_reply(b"<html>proxy login</html>"), ""),
    ("cut mid-answer", sse(delta("cut"), done=False), "cut"),
    ("HTTP 400", json_reply({"error": "nope"}, 400), ""),
]


@pytest.mark.parametrize("reply, partial", [case[1:] for case in TURN_CASES], ids=[case[0] for case in TURN_CASES])
def test_a_failed_turn_keeps_the_question_and_only_an_interrupted_answer(server: FakeOpenAIServer, tmp_path: Path,
                                                                         reply: Reply, partial: str) -> None:
    store = Store(tmp_path / "iris.db")
    manager = DialogueManager(OpenAIBackend(server.url, "base", retries=0), store)
    conversation = manager.new_conversation()
    manager.send(conversation, "first").run()
    server.chat = [reply]
    with pytest.raises(BackendError) as error:
        manager.send(conversation, "second").run()
    assert_one_clean_line(error.value)
    history = [(m.role, m.text, m.interrupted) for m in manager.history(conversation)]
    assert history == [(Role.USER, "first", False), (Role.ASSISTANT, "Hello there", False),
                       (Role.USER, "second", False), (Role.ASSISTANT, partial, True)]
    assert manager.send(conversation, "third").run() == "Hello there"  # the conversation goes on
    assert len(manager.history(conversation)) == 6
    store.close()


# Discord: a reference into another channel does not continue (or quote) that channel's conversation -----------


async def _say_referencing(harness: Harness, text: str, *, channel: int, reference: dict[str, Any],
                           referenced: dict[str, Any] | None, mention: bool) -> None:
    """A MESSAGE_CREATE carrying any message_reference, as a hostile or unusual client could send it."""
    import discord.ext.test as dpytest
    from discord.ext.test import backend as back
    from discord.ext.test import factories as facts

    place = harness.channel(channel)
    assert harness.bot.user is not None
    content = f"{harness.bot.user.mention} {text}" if mention else text
    data = facts.make_message_dict(place, harness.member(1), content=content, guild_id=place.guild.id,
                                   mentions=back.find_user_mentions(content, place.guild))
    data["message_reference"] = reference
    if referenced is not None:
        data["referenced_message"] = referenced
    back.get_state().parse_message_create(data)
    back._cur_config.messages.setdefault(place.id, []).append(data)
    await dpytest.run_all_events()
    await harness.settle()


DISCORD_CASES = {
    "a reply into another channel": lambda a, b, bot_msg: ({"message_id": bot_msg["id"], "channel_id": a}, bot_msg),
    "a reference whose channel is forged": lambda a, b, bot_msg: ({"message_id": bot_msg["id"], "channel_id": b},
                                                                  bot_msg),
    "a forward from another channel": lambda a, b, bot_msg: ({"type": 1, "message_id": bot_msg["id"],
                                                              "channel_id": a}, None),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("mention", [True, False], ids=["mentioned", "not mentioned"])
@pytest.mark.parametrize("case", list(DISCORD_CASES))
async def test_a_reference_into_another_channel_never_continues_its_conversation(tmp_path: Path, case: str,
                                                                                 mention: bool) -> None:
    from discord.ext.test import backend as back

    store = Store(tmp_path / "iris.db")
    backend = FakeBackend(["the secret plan is ready", "a fresh answer"])
    harness = await Harness.start(DialogueManager(backend, store), text_channels=2)
    try:
        private, public = harness.channel(0), harness.channel(1)
        question = await harness.say("what is the secret plan?", channel=0)
        bot_id = next(i for i, ref in harness.transcript.reference.items() if ref == question.id)
        bot_message = {**next(m for m in back._cur_config.messages[private.id] if m["id"] == bot_id),
                       "channel_id": private.id}
        private_conversation = store.list_conversations(source="discord")[0].id
        before = store.thread(private_conversation)
        reference, referenced = DISCORD_CASES[case](private.id, public.id, bot_message)
        await _say_referencing(harness, "and what else?", channel=1, reference=reference, referenced=referenced,
                               mention=mention)
        assert store.thread(private_conversation) == before
        if not mention:
            assert len(backend.calls) == 1  # not a reply to the bot in this channel: not answered
            return
        sent = [m.text for m in backend.calls[-1]["messages"]]
        assert len(backend.calls) == 2 and not any("secret" in text for text in sent), sent
        public_conversation = store.find_external("discord", f"channel:{public.id}")
        assert public_conversation is not None and public_conversation[0] != private_conversation
    finally:
        await harness.close()
        store.close()


# the store and the dialogue: text and ids it cannot take as they are -------------------------------------------

STORED_TEXT_CASES = [
    ("lone surrogates from undecodable bytes", "caf\udce9 \ud800", "caf\ufffd \ufffd"),
    ("a NUL byte", "before\x00after", "before\x00after"),
    ("escape sequences", "\x1b]0;title\x07\x1b[2J", "\x1b]0;title\x07\x1b[2J"),  # stored as is; shown escaped
    ("a megabyte of text", "word " * 200_000, "word " * 200_000),
]


@pytest.mark.parametrize("text, stored", [case[1:] for case in STORED_TEXT_CASES],
                         ids=[case[0] for case in STORED_TEXT_CASES])
def test_any_text_is_stored_and_read_back(tmp_path: Path, text: str, stored: str) -> None:
    store = Store(tmp_path / "iris.db")
    manager = DialogueManager(FakeBackend(context_length=10 ** 7), store)
    conversation = manager.new_conversation(title=text[:80], system_prompt=text)
    manager.send(conversation, text, author=text[:20]).run()
    reopened = Store(tmp_path / "iris.db")
    history = reopened.thread(conversation)
    assert history[0].text == stored and history[0].author == stored[:20]
    assert reopened.conversation(conversation).system_prompt == stored
    assert json.dumps(history[1].text)  # the echoed answer is storable text too
    store.close()
    reopened.close()


@pytest.mark.parametrize("make, reason", [
    (lambda path: path.write_bytes(b"this is not a database " * 200), "file is not a database"),
    (lambda path: path.mkdir(), "Is a directory"),
    (lambda path: path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000), "not a database"),
])
def test_a_database_that_cannot_be_opened_is_one_line_and_left_alone(tmp_path: Path, make: Any, reason: str) -> None:
    from assistant.errors import IrisError

    path = tmp_path / "iris.db"
    make(path)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(IrisError, match=f"cannot open the conversation database .*{reason}") as error:
        Store(path)
    assert_one_clean_line(error.value)
    assert (path.read_bytes() if path.is_file() else None) == before


@pytest.mark.parametrize("conversation_id", [10 ** 22, -(10 ** 22), 2 ** 63, -1])
def test_an_impossible_conversation_id_is_not_found_in_one_line(manager: DialogueManager,
                                                                conversation_id: int) -> None:
    for call in (manager.conversation, manager.history, lambda cid: manager.send(cid, "hi")):
        with pytest.raises(ConversationNotFound) as error:
            call(conversation_id)
        assert str(error.value) == f"no conversation with id {conversation_id}"
