"""kill -9 in the middle of a streamed answer: what was shown is stored, marked interrupted, in a sound database.

A real ``python`` child runs a ``DialogueManager`` on a real ``Store`` with a slow scripted backend and prints
each chunk as the chat would; the test kills it with SIGKILL once it has shown some of the answer.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assistant.dialogue import Turn
from assistant.messages import Role
from assistant.store import Store

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"word{index}" for index in range(400)]

CHILD = """
import sys
from fakes import FakeBackend
from assistant.dialogue import DialogueManager
from assistant.store import Store

backend = FakeBackend(["once upon a time", " ".join(sys.argv[2:])])
manager = DialogueManager(backend, Store(sys.argv[1]))
conversation = manager.new_conversation(title="story")
manager.send(conversation, "tell me a short story").run()  # a finished turn: that one is not interrupted
backend.delay = 0.02
turn = manager.send(conversation, "and a long one")
for chunk in turn:
    print(chunk.strip(), flush=True)
print("finished", flush=True)
"""


@pytest.mark.parametrize("shown_before_kill", [1, 25])
def test_kill_9_mid_answer_keeps_what_was_shown_marked_interrupted(tmp_path: Path, shown_before_kill: int) -> None:
    database = tmp_path / "iris.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.Popen([sys.executable, str(script), str(database), *WORDS], stdout=subprocess.PIPE,
                             text=True, env=env, cwd=tmp_path)
    assert child.stdout is not None
    shown = [child.stdout.readline().strip() for _ in range(shown_before_kill)]
    time.sleep(Turn.SAVE_EVERY_S * 3)  # a save of what was shown is due within SAVE_EVERY_S (plus a chunk)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and "finished" not in shown

    raw = sqlite3.connect(database)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()
    store = Store(database)
    conversation = store.list_conversations()[0].id
    history = store.thread(conversation)
    assert [(m.role, m.interrupted) for m in history] == [
        (Role.USER, False), (Role.ASSISTANT, False), (Role.USER, False), (Role.ASSISTANT, True)]
    assert history[1].text == "once upon a time"
    partial = history[3].text.split(" ")
    assert partial[:shown_before_kill] == shown == WORDS[:shown_before_kill]
    assert partial == WORDS[:len(partial)] and len(partial) < len(WORDS)
    store.close()
