"""An adapter given at start (``--adapter`` or ``config.toml``) answers from the first message in ``ask``, ``chat``
and Discord; ``/adapter none`` switches a conversation to the base model. The adapter's weights are large, so
it changes a tiny Llama's greedy answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from discord_harness import Harness
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from tiny_models import save_strong_lora, save_tiny_llama
from typer.testing import CliRunner

import cli.prompt_input
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.dialogue import DialogueManager
from assistant.engine import LocalBackend
from assistant.messages import BASE_MODEL, Role
from assistant.model import load
from assistant.store import Store
from cli.app import app


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("activation")
    llama = save_tiny_llama(root / "llama")
    return {"llama": llama, "adapter": save_strong_lora(llama, root / "pirate", seed=3)}


def _ask(parts: dict[str, Path], *extra: str) -> str:
    result = CliRunner().invoke(app, ["ask", "hello", "--model", str(parts["llama"]), "--quant", "none",
                                      "--temperature", "0", "--max-new-tokens", "8", *extra])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_ask_uses_the_adapter_from_the_flag_and_from_config(parts: dict[str, Path], iris_home: Path) -> None:
    base = _ask(parts)
    flagged = _ask(parts, "--adapter", str(parts["adapter"]))
    assert flagged != base
    config = iris_home / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'adapters = ["{parts["adapter"]}"]\n', encoding="utf-8")
    assert _ask(parts) == flagged


def _chat(monkeypatch: pytest.MonkeyPatch, parts: dict[str, Path], keys: str, *extra: str) -> list[str]:
    """Answers of one scripted ``iris chat`` session, read back from the store."""
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        make_reader = cli.prompt_input.make_reader
        monkeypatch.setattr(cli.prompt_input, "make_reader",
                            lambda history, **_: make_reader(history, input=pipe, output=DummyOutput()))
        result = CliRunner().invoke(app, ["chat", "--plain", "--model", str(parts["llama"]), "--quant", "none",
                                          *extra])
    assert result.exit_code == 0, result.output
    store = Store(Paths.default().database)
    try:
        latest = store.latest_conversation_id()
        assert latest is not None
        return [m.text for m in store.thread(latest) if m.role is Role.ASSISTANT]
    finally:
        store.close()


def test_chat_uses_the_adapter_from_the_first_answer_and_none_switches_it_off(
        parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    greedy = "/set temperature 0\r/set max_new_tokens 8\r"
    base = _chat(monkeypatch, parts, greedy + "hello\r/exit\r")
    adapted = _chat(monkeypatch, parts, greedy + "hello\r/exit\r", "--adapter", str(parts["adapter"]))
    switched_off = _chat(monkeypatch, parts, greedy + "/adapter none\rhello\r/exit\r",
                         "--adapter", str(parts["adapter"]))
    assert adapted != base and switched_off == base


@pytest.mark.asyncio
async def test_discord_answers_with_the_adapter_given_at_start(parts: dict[str, Path], store: Store) -> None:
    options = GenerationOptions(max_new_tokens=8, temperature=0)
    answers = []
    for adapters in ((), (str(parts["adapter"]),)):
        backend = LocalBackend(load(ModelOptions(model=str(parts["llama"]), quant="none", adapters=adapters),
                                    Paths.default()))
        manager = DialogueManager(backend, store, default_system_prompt="You are tiny.", default_options=options)
        harness = await Harness.start(manager)
        question = await harness.say("hello model")
        answers.append(harness.transcript.reply_to(question.id))
        await harness.close()
    assert answers[0] != answers[1]
    conversation = store.list_conversations(source="discord")[-1]
    manager.set_adapter(conversation.id, BASE_MODEL)
    assert manager.conversation(conversation.id).adapter == BASE_MODEL
