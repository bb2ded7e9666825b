"""SQLite persistence: conversations, branching messages, attachments stored once by SHA-256.

The schema is an ordered list of migration functions; ``PRAGMA user_version``
records how many have run. WAL mode lets the CLI and the bot read while the
other writes. One connection per ``Store`` guarded by a lock, so the Discord
bot's worker threads can share it. The database holds conversations: it and its
``-wal``/``-shm`` files are readable by their owner only (0600).

Several front ends may write one conversation at once. A turn stores the user's
message and an empty answer after it in one transaction, and that answer becomes
the head, so a message sent meanwhile from elsewhere follows it: every answer stays
on the head's thread. The answer's text is then updated while it streams (marked
interrupted until it finishes), so a killed process keeps what had been shown.

Messages form a tree: a retried answer or an edited question is a sibling of the
one it replaces, which stays on its own branch. The conversation's head says which
branch is current; switching branches moves the head to the newest message under
the chosen sibling, so ``thread`` (and so the prompt and every export) follows it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.errors import ConversationNotFound, IrisError, one_line
from assistant.messages import ImageAttachment, Message, Role, valid_text


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _m001_initial(db: sqlite3.Connection) -> None:
    _run_script(db,
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            head_message_id INTEGER,
            system_prompt TEXT,
            options TEXT NOT NULL DEFAULT '{}',
            adapter TEXT,
            source TEXT NOT NULL DEFAULT 'cli'
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            text TEXT NOT NULL,
            author TEXT,
            interrupted INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE INDEX messages_by_conversation ON messages(conversation_id);
        CREATE TABLE attachments (
            sha256 TEXT PRIMARY KEY,
            mime TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            data BLOB NOT NULL
        );
        CREATE TABLE message_attachments (
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            sha256 TEXT NOT NULL REFERENCES attachments(sha256),
            name TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (message_id, position)
        );
        """
    )


def _m002_external_ids(db: sqlite3.Connection) -> None:
    """Front ends (Discord) map their own message ids onto stored messages."""
    _run_script(db,
        """
        CREATE TABLE external_ids (
            source TEXT NOT NULL,
            external_id TEXT NOT NULL,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            PRIMARY KEY (source, external_id)
        );
        CREATE TABLE kv (
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (namespace, key)
        );
        """
    )


def _m003_external_scope(db: sqlite3.Connection) -> None:
    """Where a front end's id was seen (a Discord channel), so a reference from elsewhere is not followed."""
    db.execute("ALTER TABLE external_ids ADD COLUMN scope TEXT")


def _m004_parent_index(db: sqlite3.Connection) -> None:
    """Branches: a message's children (its retried answers, edited questions) are found by parent."""
    db.execute("CREATE INDEX messages_by_parent ON messages(parent_id)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_initial, _m002_external_ids, _m003_external_scope,
                                                          _m004_parent_index]

PRIVATE_MODE = 0o600
_ROLES = {role.value: role for role in Role}


class HeadMoved(IrisError):
    """The conversation grew (another front end wrote) between reading its history and storing a message."""


def _row_id(conversation_id: int) -> int:
    """A conversation id SQLite can hold (a 23-digit one is not in the store, not an OverflowError)."""
    if not -(2 ** 63) <= conversation_id < 2 ** 63:
        raise ConversationNotFound(f"no conversation with id {conversation_id}")
    return conversation_id


def _text(value: Any) -> Any:
    return valid_text(value) if isinstance(value, str) else value


def _make_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (its -wal and -shm files copy that mode), and
    tighten one an older version left readable by others."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    os.close(descriptor)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if name.is_file() and name.stat().st_mode & 0o077:
                os.chmod(name, PRIVATE_MODE)
        except OSError:  # someone else's file: SQLite will say whether it can be used
            pass


@dataclass(frozen=True)
class Fork:
    """A place on a conversation's current thread where it branches.

    ``alternatives`` are the messages sharing one parent, oldest first (each with its images); the one on the
    current thread is ``alternatives[current]``, at ``position`` in the thread (0: its first message).
    """

    position: int
    alternatives: tuple[Message, ...]
    current: int

    @property
    def message_id(self) -> int:
        """The stored id of the alternative on the current thread."""
        return int(self.alternatives[self.current].id or 0)


@dataclass(frozen=True)
class ConversationRecord:
    id: int
    title: str
    created_at: float
    updated_at: float
    head_message_id: int | None
    system_prompt: str | None
    options: dict[str, Any]
    adapter: str | None
    source: str
    message_count: int = 0


class Store:
    """The one place Iris writes conversations; every public method commits before returning."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _make_private(path)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as error:  # a directory, a read-only place, a file that is no database
            if hasattr(self, "_db"):
                self._db.close()
            raise IrisError(f"{path}: cannot open the conversation database ({one_line(error)})") from None

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for index in range(version, len(MIGRATIONS)):
                MIGRATIONS[index](db)
                db.execute(f"PRAGMA user_version = {index + 1}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also when COMMIT itself failed: never leave one open
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # conversations -------------------------------------------------------

    def create_conversation(self, *, title: str = "", system_prompt: str | None = None,
                            options: dict[str, Any] | None = None, adapter: str | None = None,
                            source: str = "cli") -> int:
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, created_at, updated_at, system_prompt, options, adapter, source)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (valid_text(title), now, now, _text(system_prompt), json.dumps(options or {}), adapter, source),
            )
            return int(cursor.lastrowid or 0)

    def conversation(self, conversation_id: int) -> ConversationRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
                " FROM conversations c WHERE c.id = ?", (_row_id(conversation_id),)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no conversation with id {conversation_id}")
        return _record(row)

    def list_conversations(self, limit: int = 50, source: str | None = None) -> list[ConversationRecord]:
        query = ("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
                 " FROM conversations c")
        args: tuple[Any, ...] = ()
        if source:
            query += " WHERE c.source = ?"
            args = (source,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY c.updated_at DESC, c.id DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def latest_conversation_id(self, source: str = "cli") -> int | None:
        found = self.list_conversations(limit=1, source=source)
        return found[0].id if found else None

    def update_conversation(self, conversation_id: int, **fields: Any) -> None:
        """Set any of title, system_prompt, options (dict), adapter, head_message_id."""
        allowed = {"title", "system_prompt", "options", "adapter", "head_message_id"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"update_conversation takes {sorted(allowed)}")
        self.conversation(conversation_id)
        values = {k: json.dumps(v) if k == "options" else _text(v) for k, v in fields.items()}
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._transaction() as db:
            db.execute(f"UPDATE conversations SET {assignments}, updated_at = ? WHERE id = ?",
                       (*values.values(), time.time(), conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        self.conversation(conversation_id)
        with self._transaction() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            db.execute("DELETE FROM attachments WHERE sha256 NOT IN (SELECT sha256 FROM message_attachments)")

    # messages ------------------------------------------------------------

    def add_message(self, conversation_id: int, message: Message, parent_id: int | None = None,
                    *, use_head: bool = True) -> int:
        """Append ``message`` after ``parent_id`` (default: the head at commit time) and make it the head."""
        now = time.time()
        with self._transaction() as db:
            head = self._head(db, conversation_id)
            if parent_id is None and use_head:
                parent_id = head
            message_id = self._insert(db, conversation_id, parent_id, message, now)
            db.execute("UPDATE conversations SET head_message_id = ?, updated_at = ? WHERE id = ?",
                       (message_id, now, conversation_id))
        return message_id

    def add_exchange(self, conversation_id: int, user: Message, parent_id: int | None, *,
                     expected_head: int | None) -> tuple[int, int]:
        """Store ``user`` after ``parent_id`` and an empty answer after it, marked interrupted until
        ``finish_answer``; the answer becomes the head. Returns ``(user id, answer id)``.

        Raises ``HeadMoved``, storing nothing, when the head is no longer ``expected_head``: the caller
        read a history that another front end has extended since.
        """
        now = time.time()
        with self._transaction() as db:
            if self._head(db, conversation_id) != expected_head:
                raise HeadMoved(f"conversation {conversation_id} changed while this message was being prepared; "
                                "send it again")
            user_id = self._insert(db, conversation_id, parent_id, user, now)
            answer_id = self._insert(db, conversation_id, user_id, Message(Role.ASSISTANT, "", interrupted=True),
                                     now)
            db.execute("UPDATE conversations SET head_message_id = ?, updated_at = ? WHERE id = ?",
                       (answer_id, now, conversation_id))
        return user_id, answer_id

    def add_answer(self, conversation_id: int, user_message_id: int, *, expected_head: int | None) -> int:
        """Store another empty answer to ``user_message_id`` (a sibling of its earlier answers, which stay),
        marked interrupted until ``finish_answer``; it becomes the head. ``HeadMoved`` as in ``add_exchange``."""
        now = time.time()
        with self._transaction() as db:
            if self._head(db, conversation_id) != expected_head:
                raise HeadMoved(f"conversation {conversation_id} changed while this answer was being prepared; "
                                "try again")
            self._owned(db, conversation_id, user_message_id)
            answer_id = self._insert(db, conversation_id, user_message_id,
                                     Message(Role.ASSISTANT, "", interrupted=True), now)
            db.execute("UPDATE conversations SET head_message_id = ?, updated_at = ? WHERE id = ?",
                       (answer_id, now, conversation_id))
        return answer_id

    def save_progress(self, message_id: int, text: str) -> bool:
        """Store a streaming answer's text so far (still marked interrupted); False if the database was busy,
        which only delays this copy until the next one."""
        try:
            with self._transaction() as db:
                db.execute("UPDATE messages SET text = ? WHERE id = ?", (valid_text(text), message_id))
        except sqlite3.OperationalError:
            return False
        return True

    def finish_answer(self, message_id: int, text: str, *, interrupted: bool) -> None:
        """Store an answer's final text; ``interrupted`` False unmarks one that ran to its end."""
        with self._transaction() as db:
            db.execute("UPDATE messages SET text = ?, interrupted = ? WHERE id = ?",
                       (valid_text(text), int(interrupted), message_id))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id ="
                       " (SELECT conversation_id FROM messages WHERE id = ?)", (time.time(), message_id))

    @staticmethod
    def _head(db: sqlite3.Connection, conversation_id: int) -> int | None:
        row = db.execute("SELECT head_message_id FROM conversations WHERE id = ?",
                         (_row_id(conversation_id),)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no conversation with id {conversation_id}")
        return None if row[0] is None else int(row[0])

    @staticmethod
    def _owned(db: sqlite3.Connection, conversation_id: int, message_id: int) -> None:
        if not -(2 ** 63) <= message_id < 2 ** 63 or db.execute(
                "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
                (message_id, conversation_id)).fetchone() is None:
            raise ConversationNotFound(f"no message {message_id} in conversation {conversation_id}")

    @staticmethod
    def _insert(db: sqlite3.Connection, conversation_id: int, parent_id: int | None, message: Message,
                now: float) -> int:
        cursor = db.execute(
            "INSERT INTO messages (conversation_id, parent_id, role, text, author, interrupted, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, parent_id, message.role.value, valid_text(message.text), _text(message.author),
             int(message.interrupted), now))
        message_id = int(cursor.lastrowid or 0)
        for position, image in enumerate(message.images):
            db.execute("INSERT OR IGNORE INTO attachments (sha256, mime, width, height, data)"
                       " VALUES (?, ?, ?, ?, ?)",
                       (image.sha256, image.mime, image.width, image.height, image.data))
            db.execute("INSERT INTO message_attachments (message_id, position, sha256, name) VALUES (?, ?, ?, ?)",
                       (message_id, position, image.sha256, image.name))
        return message_id

    def thread(self, conversation_id: int, head_message_id: int | None = None) -> list[Message]:
        """The messages from the root to ``head_message_id`` (default: the head), oldest first."""
        head = head_message_id if head_message_id is not None else self.conversation(conversation_id).head_message_id
        if head is None or not -(2 ** 63) <= head < 2 ** 63:
            return []
        with self._lock:
            cursor = self._db.cursor()
            cursor.row_factory = None  # plain tuples: a long thread is read on every turn
            rows = cursor.execute(
                """WITH RECURSIVE chain(id, depth) AS (
                       SELECT id, 0 FROM messages WHERE id = ? AND conversation_id = ?
                       UNION ALL
                       SELECT m.parent_id, chain.depth + 1 FROM messages m JOIN chain ON m.id = chain.id
                       WHERE m.parent_id IS NOT NULL)
                   SELECT m.id, m.role, m.text, m.author, m.interrupted
                   FROM chain JOIN messages m ON m.id = chain.id ORDER BY chain.depth DESC""",
                (head, _row_id(conversation_id))).fetchall()
            images = self._images([row[0] for row in rows])
        return [Message(_ROLES[role], text, tuple(images.get(message_id, ())), bool(interrupted), author, message_id)
                for message_id, role, text, author, interrupted in rows]

    def _images(self, message_ids: list[int]) -> dict[int, list[ImageAttachment]]:
        """The images of several messages in one query, not one per message (caller holds the lock)."""
        images: dict[int, list[ImageAttachment]] = {}
        for a in self._db.execute(
                "SELECT ma.message_id, ma.name, a.* FROM message_attachments ma JOIN attachments a USING (sha256)"
                " WHERE ma.message_id IN (SELECT value FROM json_each(?)) ORDER BY ma.message_id, ma.position",
                (json.dumps(message_ids),)):
            images.setdefault(a["message_id"], []).append(
                ImageAttachment(data=bytes(a["data"]), mime=a["mime"], width=a["width"], height=a["height"],
                                name=a["name"], sha256=a["sha256"]))
        return images

    # branches ------------------------------------------------------------

    def forks(self, conversation_id: int, head_message_id: int | None = None) -> list[Fork]:
        """Where the thread to ``head_message_id`` (default: the head) branches, oldest first: every message on it
        that has siblings, with them."""
        thread = self.thread(conversation_id, head_message_id)
        if not thread:
            return []
        parents = [None, *(m.id for m in thread[:-1])]
        with self._lock:
            cursor = self._db.cursor()
            cursor.row_factory = None
            rows = cursor.execute(
                "SELECT id, parent_id, role, text, author, interrupted FROM messages WHERE conversation_id = ?"
                " AND (parent_id IS NULL OR parent_id IN (SELECT value FROM json_each(?))) ORDER BY id",
                (conversation_id, json.dumps(parents[1:]))).fetchall()
            siblings: dict[int | None, list[tuple[Any, ...]]] = {}
            for row in rows:
                siblings.setdefault(row[1], []).append(row)
            branching = [row[0] for group in siblings.values() if len(group) > 1 for row in group]
            images = self._images(branching)
        forks = []
        for position, (message, parent) in enumerate(zip(thread, parents, strict=True)):
            group = siblings.get(parent, [])
            if len(group) > 1:
                alternatives = tuple(Message(_ROLES[role], text, tuple(images.get(i, ())), bool(interrupted), author, i)
                                     for i, _, role, text, author, interrupted in group)
                forks.append(Fork(position, alternatives, [m.id for m in alternatives].index(message.id)))
        return forks

    def switch_branch(self, conversation_id: int, message_id: int) -> int:
        """Make the branch through ``message_id`` current: the head moves to the newest message under it (a
        message's descendants all have larger ids, so the largest is a leaf). Returns the new head."""
        with self._transaction() as db:
            self._owned(db, conversation_id, message_id)
            head = db.execute(
                """WITH RECURSIVE below(id) AS (
                       SELECT ? UNION ALL SELECT m.id FROM messages m JOIN below ON m.parent_id = below.id)
                   SELECT MAX(id) FROM below""", (message_id,)).fetchone()[0]
            db.execute("UPDATE conversations SET head_message_id = ?, updated_at = ? WHERE id = ?",
                       (head, time.time(), conversation_id))
        return int(head)

    def clear_adapter(self, name: str) -> int:
        """Conversations that chose adapter ``name`` go back to the backend's active one (adapter NULL); returns
        how many. Their ``updated_at`` stays: this is no activity of theirs."""
        with self._transaction() as db:
            return db.execute("UPDATE conversations SET adapter = NULL WHERE adapter = ?", (name,)).rowcount

    def attachment_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM attachments").fetchone()[0])

    # front-end ids and small settings --------------------------------------

    def link_external(self, source: str, external_id: str, conversation_id: int,
                      message_id: int | None = None, *, scope: str | None = None) -> None:
        """Map a front end's id onto a stored message; ``scope`` says where it was seen (a Discord channel)."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO external_ids (source, external_id, conversation_id, message_id, scope)"
                       " VALUES (?, ?, ?, ?, ?)", (source, external_id, conversation_id, message_id, scope))

    def unlink_external(self, source: str, external_id: str) -> None:
        """Forget a front end's id (a Discord channel whose conversation moved into a thread)."""
        with self._transaction() as db:
            db.execute("DELETE FROM external_ids WHERE source = ? AND external_id = ?", (source, external_id))

    def find_external(self, source: str, external_id: str, *,
                      scope: str | None = None) -> tuple[int, int | None] | None:
        """``(conversation_id, message_id)`` linked to a front end's id, if any; with ``scope``, only a link made
        there (or one stored before scopes were recorded)."""
        query = "SELECT conversation_id, message_id FROM external_ids WHERE source = ? AND external_id = ?"
        args: tuple[Any, ...] = (source, external_id)
        if scope is not None:
            query += " AND (scope IS NULL OR scope = ?)"
            args = (*args, scope)
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        return None if row is None else (int(row[0]), None if row[1] is None else int(row[1]))

    def put_value(self, namespace: str, key: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO kv (namespace, key, value) VALUES (?, ?, ?)",
                       (namespace, key, json.dumps(value)))

    def get_value(self, namespace: str, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE namespace = ? AND key = ?",
                                   (namespace, key)).fetchone()
        return default if row is None else json.loads(row[0])


def _record(row: sqlite3.Row) -> ConversationRecord:
    return ConversationRecord(
        id=row["id"], title=row["title"], created_at=row["created_at"], updated_at=row["updated_at"],
        head_message_id=row["head_message_id"], system_prompt=row["system_prompt"],
        options=json.loads(row["options"]), adapter=row["adapter"], source=row["source"],
        message_count=row["message_count"])
