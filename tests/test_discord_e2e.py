"""End to end on a real (tiny, random) in-process Llama: a Discord mention through the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from discord_harness import Harness

from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.dialogue import DialogueManager
from assistant.messages import Role
from assistant.store import Store

pytestmark = pytest.mark.asyncio


def tiny_backend(directory: Path):  # type: ignore[no-untyped-def]
    import tiny_models

    if hasattr(tiny_models, "tiny_llama_backend"):
        return tiny_models.tiny_llama_backend()
    from assistant.engine import LocalBackend
    from assistant.model import load

    model_dir = tiny_models.save_tiny_llama(directory / "llama")
    return LocalBackend(load(ModelOptions(model=str(model_dir), quant="none"), Paths.default()))


async def test_mention_answered_by_a_real_tiny_model(tmp_path: Path, store: Store) -> None:
    backend = tiny_backend(tmp_path)
    manager = DialogueManager(backend, store, default_system_prompt="You are tiny.",
                              default_options=GenerationOptions(max_new_tokens=12, temperature=0))
    harness = await Harness.start(manager)
    question = await harness.say("hello model")
    first = harness.transcript.reply_to(question.id)
    assert first and not first.startswith("⚠️") and "▌" not in first
    answer_id = next(i for i, ref in harness.transcript.reference.items() if ref == question.id)
    follow_up = await harness.say("and again", reply_to=answer_id, mention=False)
    assert not harness.transcript.reply_to(follow_up.id).startswith("⚠️")
    conversation = store.list_conversations(source="discord")[0]
    roles = [m.role for m in store.thread(conversation.id)]
    assert roles == [Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]
    await harness.close()
