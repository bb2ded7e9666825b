"""SQLite store: migrations, WAL, branching threads, attachments by hash, front-end ids."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from assistant.errors import ConversationNotFound
from assistant.messages import Message, Role
from assistant.store import MIGRATIONS, HeadMoved, Store
from assistant.vision import load_image_path


def test_fresh_store_runs_every_migration_in_wal_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "iris.db")
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    raw = sqlite3.connect(tmp_path / "iris.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages", "attachments", "message_attachments", "external_ids"} <= tables


def test_reopening_migrates_an_older_database_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN")
    MIGRATIONS[0](raw)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('kept', 1, 1)")
    raw.execute("COMMIT")
    raw.close()
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS)
    assert store.conversation(1).title == "kept"
    store.link_external("discord", "42", 1)
    assert store.find_external("discord", "42") == (1, None)


def test_thread_follows_parent_links_so_conversations_can_branch(store: Store) -> None:
    cid = store.create_conversation()
    first = store.add_message(cid, Message(Role.USER, "hi"))
    answer = store.add_message(cid, Message(Role.ASSISTANT, "hello"))
    store.add_message(cid, Message(Role.USER, "branch A"))
    branch_b = store.add_message(cid, Message(Role.USER, "branch B"), parent_id=answer)
    assert [m.text for m in store.thread(cid)] == ["hi", "hello", "branch B"]
    assert [m.id for m in store.thread(cid, first)] == [first]
    assert store.conversation(cid).head_message_id == branch_b
    assert store.conversation(cid).message_count == 4


def test_attachments_are_stored_once_by_hash_with_their_bytes(store: Store, sample_png: Path) -> None:
    image = load_image_path(sample_png)
    cid = store.create_conversation()
    store.add_message(cid, Message(Role.USER, "one", (image,)))
    store.add_message(cid, Message(Role.USER, "two", (image, image)))
    assert store.attachment_count() == 1
    sample_png.unlink()  # the store keeps the bytes, not the path
    restored = store.thread(cid)[-1].images
    assert [i.sha256 for i in restored] == [image.sha256, image.sha256]
    assert restored[0].data == image.data and restored[0].width == 64


def test_delete_removes_messages_and_orphaned_images_only(store: Store, sample_png: Path, sample_jpg: Path) -> None:
    png, jpg = load_image_path(sample_png), load_image_path(sample_jpg)
    keep, drop = store.create_conversation(), store.create_conversation()
    store.add_message(keep, Message(Role.USER, "keep", (png,)))
    store.add_message(drop, Message(Role.USER, "drop", (png, jpg)))
    store.delete_conversation(drop)
    assert store.attachment_count() == 1
    with pytest.raises(ConversationNotFound):
        store.thread(drop)
    assert store.thread(keep)[0].images[0].sha256 == png.sha256


def test_unknown_conversation_is_a_clear_error(store: Store) -> None:
    with pytest.raises(ConversationNotFound, match="no conversation with id 99"):
        store.conversation(99)


def test_data_survives_a_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "iris.db")
    cid = store.create_conversation(title="t", options={"temperature": 0.2})
    store.add_message(cid, Message(Role.USER, "persist me", author="ana"))
    store.put_value("discord.channel", "7", {"system": "pirate"})
    store.close()
    reopened = Store(tmp_path / "iris.db")
    assert reopened.thread(cid)[0].author == "ana"
    assert reopened.conversation(cid).options == {"temperature": 0.2}
    assert reopened.get_value("discord.channel", "7") == {"system": "pirate"}
    assert reopened.latest_conversation_id() == cid


def test_database_and_its_wal_and_shm_are_private_even_when_an_older_one_was_not(tmp_path: Path) -> None:
    import os
    import stat

    store = Store(tmp_path / "iris.db")
    store.add_message(store.create_conversation(), Message(Role.USER, "secret"))
    files = [tmp_path / name for name in ("iris.db", "iris.db-wal", "iris.db-shm")]
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
    store.close()
    os.chmod(files[0], 0o644)  # as versions before this one left it
    Store(files[0]).close()
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def test_an_exchange_is_stored_only_on_the_head_it_was_prepared_for(store: Store) -> None:
    from assistant.store import HeadMoved

    cid = store.create_conversation()
    user, answer = store.add_exchange(cid, Message(Role.USER, "q1"), None, expected_head=None)
    assert store.conversation(cid).head_message_id == answer
    assert store.thread(cid)[-1] == Message(Role.ASSISTANT, "", interrupted=True, id=answer)
    with pytest.raises(HeadMoved, match="changed while this message was being prepared"):
        store.add_exchange(cid, Message(Role.USER, "stale"), user, expected_head=user)
    assert [m.text for m in store.thread(cid)] == ["q1", ""]
    assert store.save_progress(answer, "partial")
    assert store.thread(cid)[-1].interrupted and store.thread(cid)[-1].text == "partial"
    store.finish_answer(answer, "partial and done", interrupted=False)
    assert store.thread(cid)[-1] == Message(Role.ASSISTANT, "partial and done", id=answer)


def test_links_are_found_only_where_they_were_made_and_old_links_still_work(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN")
    for migration in MIGRATIONS[:2]:
        migration(raw)
    raw.execute("PRAGMA user_version = 2")
    raw.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('old', 1, 1)")
    raw.execute("INSERT INTO external_ids (source, external_id, conversation_id) VALUES ('discord', '7', 1)")
    raw.execute("COMMIT")
    raw.close()
    store = Store(path)
    assert store.find_external("discord", "7", scope="100") == (1, None)  # made before scopes were recorded
    store.link_external("discord", "8", 1, scope="100")
    assert store.find_external("discord", "8", scope="100") == (1, None)
    assert store.find_external("discord", "8", scope="200") is None
    store.close()


@pytest.mark.parametrize("conversation_id", [10 ** 22, -(10 ** 22), 2 ** 63])
def test_an_id_too_large_for_sqlite_is_simply_not_found(store: Store, conversation_id: int) -> None:
    for call in (store.conversation, store.thread, store.delete_conversation,
                 lambda cid: store.add_message(cid, Message(Role.USER, "x"))):
        with pytest.raises(ConversationNotFound, match=f"no conversation with id {conversation_id}"):
            call(conversation_id)


def test_forks_and_switching_branches_follow_the_newest_message_under_a_sibling(store: Store) -> None:
    cid = store.create_conversation()
    question = store.add_message(cid, Message(Role.USER, "q"))
    old = store.add_message(cid, Message(Role.ASSISTANT, "old"))
    store.add_message(cid, Message(Role.USER, "more"))
    deepest = store.add_message(cid, Message(Role.ASSISTANT, "deeper"))
    new = store.add_answer(cid, question, expected_head=deepest)
    assert store.conversation(cid).head_message_id == new and [m.text for m in store.thread(cid)] == ["q", ""]
    [fork] = store.forks(cid)
    assert (fork.position, [m.text for m in fork.alternatives], fork.current, fork.message_id) == (
        1, ["old", ""], 1, new)
    assert fork.alternatives[1].interrupted  # not finished yet
    assert store.switch_branch(cid, old) == deepest  # the newest message under it, not the sibling itself
    assert [m.text for m in store.thread(cid)] == ["q", "old", "more", "deeper"]
    assert [f.current for f in store.forks(cid)] == [0]
    with pytest.raises(HeadMoved):
        store.add_answer(cid, question, expected_head=new)  # another front end moved the head: nothing stored
    other = store.create_conversation()
    with pytest.raises(ConversationNotFound, match=f"no message {old} in conversation {other}"):
        store.switch_branch(other, old)
    with pytest.raises(ConversationNotFound):
        store.add_answer(other, question, expected_head=None)
    assert store.conversation(cid).message_count == 5 and store.forks(other) == []


def test_clearing_an_unloaded_adapter_and_unlinking_ids(store: Store) -> None:
    using = store.create_conversation(adapter="pirate")
    other = store.create_conversation(adapter="ninja")
    before = store.conversation(using).updated_at
    assert store.clear_adapter("pirate") == 1 and store.clear_adapter("pirate") == 0
    assert store.conversation(using).adapter is None and store.conversation(other).adapter == "ninja"
    assert store.conversation(using).updated_at == before  # no activity of its own: `--resume last` is unchanged
    store.link_external("discord", "channel:1", using)
    store.unlink_external("discord", "channel:1")
    assert store.find_external("discord", "channel:1") is None
