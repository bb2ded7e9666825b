"""The bot driven through discord.py's own dispatch on dpytest: answers, conversations, images, splits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytest_asyncio
from discord_harness import Harness, fast_settings
from fakes import FakeBackend

from assistant.config import GenerationOptions
from assistant.dialogue import DialogueManager
from assistant.messages import Role
from assistant.store import Store
from integrations.discord_bot.streaming import CURSOR

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def harness(manager: DialogueManager) -> Harness:
    started = await Harness.start(manager)
    yield started
    await started.close()


def every_request_mentions_nobody(harness: Harness) -> None:
    assert harness.transcript.payloads
    for payload in harness.transcript.payloads:
        allowed = payload["allowed_mentions"]
        assert allowed["parse"] == [] and not allowed.get("users") and not allowed.get("roles")
        assert not allowed.get("replied_user", False)


async def test_mention_gets_a_streamed_answer_stored_with_its_author(harness: Harness, backend: FakeBackend,
                                                                     store: Store) -> None:
    backend.replies = ["one two three four five six seven eight"]
    backend.delay = 0.01
    question = await harness.say("count for me")
    assert harness.transcript.reply_to(question.id) == "one two three four five six seven eight"
    streamed = [p["content"] for p in harness.transcript.payloads if p["content"].endswith(CURSOR)]
    assert len(streamed) >= 2, "the answer should appear in several edits while it is generated"
    conversation = store.list_conversations(source="discord")[0]
    history = store.thread(conversation.id)
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
    assert history[0].text == "count for me" and history[0].author == harness.member(0).display_name
    assert backend.calls[0]["messages"][-1].text == f"{harness.member(0).display_name}: count for me"
    every_request_mentions_nobody(harness)


async def test_messages_without_mention_are_ignored(harness: Harness, backend: FakeBackend) -> None:
    await harness.say("just chatting", mention=False)
    assert backend.calls == [] and harness.transcript.payloads == []


async def test_model_output_cannot_ping_anyone(harness: Harness, backend: FakeBackend) -> None:
    someone = harness.member(1)
    backend.replies = [f"@everyone @here <@{someone.id}> hello"]
    question = await harness.say("ping them")
    assert "@everyone" in harness.transcript.reply_to(question.id)
    every_request_mentions_nobody(harness)


async def test_reply_chain_continues_and_old_reply_branches(harness: Harness, backend: FakeBackend,
                                                            store: Store) -> None:
    backend.replies = ["A1", "A2", "A3"]
    first = await harness.say("first question", mention=True)
    answer_one = harness.transcript.replies_to(first.id)
    assert answer_one == ["A1"]
    second = await harness.say("second question")  # plain mention: continues the channel's conversation
    bot_first = next(i for i, ref in harness.transcript.reference.items() if ref == first.id)
    await harness.say("back to the first", reply_to=bot_first, mention=False)  # reply to the bot, no mention
    texts = [m.text.split(": ", 1)[-1] for m in backend.calls[2]["messages"]]
    assert texts == ["You are a test assistant.", "first question", "A1", "back to the first"]
    assert "second question" not in str(texts) and second.id
    assert len(store.list_conversations(source="discord")) == 1


async def test_restarted_bot_continues_a_conversation(tmp_path: Path) -> None:
    database = tmp_path / "iris.db"
    first_store = Store(database)
    first = await Harness.start(DialogueManager(FakeBackend(["the capital is Paris"]), first_store))
    question = await first.say("capital of France?")
    bot_message = next(i for i, ref in first.transcript.reference.items() if ref == question.id)
    channel = first.channel()
    await first.close()
    first_store.close()

    second_store = Store(database)
    backend = FakeBackend(["about two million"])
    second = await Harness.start(DialogueManager(backend, second_store))
    # the channel and the old bot message still exist on Discord: put them in the new fake server
    from discord.ext.test import backend as back
    same_channel = back.make_text_channel(channel.name, second.channel().guild, id_num=channel.id)
    back._cur_config.messages.setdefault(same_channel.id, []).append(
        {"id": bot_message, "channel_id": same_channel.id, "content": "the capital is Paris",
         "author": {"id": second.bot.user.id, "username": "FakeApp", "discriminator": "0001", "avatar": None},
         "attachments": [], "embeds": [], "mentions": [], "mention_roles": [], "pinned": False, "tts": False,
         "type": 0, "timestamp": "2024-01-01T00:00:00+00:00", "edited_timestamp": None,
         "mention_everyone": False})
    await second.say("and its population?", reply_to=bot_message, channel=same_channel)
    texts = [m.text for m in backend.calls[0]["messages"]]
    assert texts[:2] == [f"{first.member(0).display_name}: capital of France?", "the capital is Paris"]
    assert len(second_store.list_conversations(source="discord")) == 1
    assert channel.id
    await second.close()
    second_store.close()


async def test_users_in_one_channel_are_told_apart(harness: Harness, backend: FakeBackend) -> None:
    await harness.say("I like cats", member=0)
    await harness.say("I like dogs", member=1)
    seen = [m.text for m in backend.calls[1]["messages"] if m.role is Role.USER]
    assert seen == [f"{harness.member(0).display_name}: I like cats",
                    f"{harness.member(1).display_name}: I like dogs"]


async def test_image_attachment_reaches_the_model(harness: Harness, backend: FakeBackend,
                                                  sample_png: Path, store: Store) -> None:
    renamed = sample_png.with_name("photo.dat")  # the type comes from the bytes, not the name
    renamed.write_bytes(sample_png.read_bytes())
    question = await harness.say("what is this?", files=[renamed])
    images = backend.calls[0]["messages"][-1].images
    assert len(images) == 1 and images[0].mime == "image/png"
    assert "⚠️" not in harness.transcript.reply_to(question.id)
    assert store.attachment_count() == 1


async def test_images_in_a_replied_to_message_are_included(harness: Harness, backend: FakeBackend,
                                                           sample_png: Path) -> None:
    photo = await harness.say("look at my cat", member=1, mention=False, files=[sample_png])
    await harness.say("what animal is this?", member=0, reply_to=photo)
    last = backend.calls[0]["messages"][-1]
    assert len(last.images) == 1
    assert "look at my cat" in last.text and "what animal is this?" in last.text


@pytest.mark.parametrize("case", ["not_image", "corrupt", "too_big", "too_many"])
async def test_bad_attachments_warn_and_still_answer(case: str, tmp_path: Path, sample_png: Path,
                                                     store: Store) -> None:
    backend = FakeBackend(["still here"])
    settings = fast_settings(max_images=2, max_image_bytes=4000 if case == "too_big" else 10_000_000)
    harness = await Harness.start(DialogueManager(backend, store), settings)
    files = {
        "not_image": [tmp_path / "notes.txt"],
        "corrupt": [tmp_path / "broken.png"],
        "too_big": [sample_png],
        "too_many": [sample_png] * 3,
    }[case]
    (tmp_path / "notes.txt").write_text("just some text, not a picture")
    (tmp_path / "broken.png").write_bytes(sample_png.read_bytes()[:200])
    question = await harness.say("see attached", files=files)
    reply = harness.transcript.reply_to(question.id)
    expected = {"not_image": "notes.txt: not an image", "corrupt": "broken.png: corrupt or truncated",
                "too_big": "over the", "too_many": "only the first 2 images"}[case]
    warning_lines = [line for line in reply.splitlines() if line.startswith("⚠️")]
    assert len(warning_lines) == 1 and expected in warning_lines[0]
    assert reply.endswith("still here")
    assert len(backend.calls[0]["messages"][-1].images) == (2 if case == "too_many" else 0)
    await harness.close()


async def test_images_to_a_text_only_model_warn(store: Store, sample_png: Path) -> None:
    backend = FakeBackend(["text only answer"], accepts_images=False)
    harness = await Harness.start(DialogueManager(backend, store))
    question = await harness.say("describe", files=[sample_png])
    reply = harness.transcript.reply_to(question.id)
    assert reply.startswith("⚠️ this model reads text only") and reply.endswith("text only answer")
    await harness.close()


def _fences_balanced(part: str) -> bool:
    return len(re.findall(r"^```", part, flags=re.M)) % 2 == 0


async def test_long_answer_with_code_block_is_split_cleanly(store: Store) -> None:
    code = "\n".join(f"    total += {i}  # step {i}" for i in range(150))
    answer = "Here is the loop:\n\n```python\ntotal = 0\n" + code + "\n```\n\nThat is all. " + "Done! " * 200
    backend = FakeBackend([answer], context_length=8192)
    manager = DialogueManager(backend, store, default_options=GenerationOptions(max_new_tokens=4000))
    harness = await Harness.start(manager)
    question = await harness.say("write a long loop")
    parts = harness.transcript.replies_to(question.id)
    assert len(parts) >= 3
    assert all(len(part) <= 2000 for part in parts)
    assert all(_fences_balanced(part) for part in parts)
    assert any(part.startswith("```python\n") for part in parts[1:]), "the block continues with its language"
    joined = "\n".join(parts)
    for i in (0, 75, 149):
        assert f"total += {i}  # step {i}" in joined
    assert parts[-1].rstrip().endswith("Done!")
    every_request_mentions_nobody(harness)
    await harness.close()


async def test_answer_failure_ends_in_a_warning(harness: Harness, backend: FakeBackend, store: Store) -> None:
    def broken(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        yield "partial"
        raise RuntimeError("CUDA out of memory")

    backend.stream = broken  # type: ignore[method-assign]
    question = await harness.say("try")
    reply = harness.transcript.reply_to(question.id)
    assert reply.startswith("partial") and "⚠️ the model failed" in reply and CURSOR not in reply
    conversation = store.list_conversations(source="discord")[0]
    assert store.thread(conversation.id)[-1].interrupted


async def test_message_that_cannot_fit_is_refused_with_a_warning(store: Store) -> None:
    backend = FakeBackend(context_length=600)
    harness = await Harness.start(DialogueManager(backend, store))
    question = await harness.say("word " * 200)
    assert harness.transcript.reply_to(question.id).startswith("⚠️ this message needs")
    assert backend.calls == []
    await harness.close()
