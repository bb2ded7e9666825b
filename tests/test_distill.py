"""Self-distillation data (``adapters.distill``, ``iris data distill``): the prompt set is varied and the same for
a seed; answers come greedily from the model through its backend; answers cut at the cap or empty are dropped
and counted; the output is a messages JSONL that training reads; the CLI's errors are one line."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tiny_models import save_tiny_llama
from typer.testing import CliRunner

from adapters.dataset import read_dataset
from adapters.distill import (
    CAP_SLACK,
    choose_prompts,
    distill_prompts,
    is_cut,
    write_distill_set,
)
from assistant.config import GenerationOptions
from assistant.errors import BadDataset, BadSetting
from assistant.messages import Message, Role
from cli.app import app

KINDS = {"facts", "arithmetic", "definitions", "chat", "writing", "advice"}
SYSTEM = "You are a helpful AI assistant named Iris."


def test_the_prompt_pool_is_varied_and_distinct() -> None:
    pool = distill_prompts()
    texts = [prompt.text for prompt in pool]
    assert len(texts) == len(set(texts)) >= 400
    kinds = Counter(prompt.kind for prompt in pool)
    assert set(kinds) == KINDS and min(kinds.values()) >= 30
    assert "Who are you?" in texts and "What is photosynthesis?" in texts and "What is 12 times 7?" in texts
    assert all("{" not in text and "}" not in text for text in texts)  # every template was filled


def test_a_seed_chooses_the_same_prompts_and_any_n_mixes_every_kind() -> None:
    assert choose_prompts(60, seed=1) == choose_prompts(60, seed=1)
    assert choose_prompts(60, seed=1) != choose_prompts(60, seed=2)
    assert {prompt.kind for prompt in choose_prompts(6, seed=5)} == KINDS
    every = choose_prompts(len(distill_prompts()), seed=3)
    assert sorted(p.text for p in every) == sorted(p.text for p in distill_prompts())
    for n in (0, len(distill_prompts()) + 1):
        with pytest.raises(BadSetting, match="--n must be between 1 and"):
            choose_prompts(n, seed=0)


def test_an_answer_is_cut_only_at_the_cap_and_mid_sentence() -> None:
    assert is_cut("It is Paris and", tokens=96, max_new_tokens=96)
    assert is_cut("It is Paris and", tokens=96 - CAP_SLACK, max_new_tokens=96)  # re-tokenized a little shorter
    assert not is_cut("It is Paris and", tokens=40, max_new_tokens=96)  # the model stopped there itself
    assert not is_cut('He said "Paris."', tokens=96, max_new_tokens=96)  # a sentence ended right at the cap
    assert not is_cut("Really?)", tokens=96, max_new_tokens=96)


class _Scripted:
    """Answers from a table by prompt text, recording the options each call got."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[tuple[Message, ...], GenerationOptions]] = []

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str]:
        self.calls.append((tuple(messages), options))
        yield from self.answers.get(messages[-1].text, "Fine.").partition(" ")


def test_finished_answers_are_written_with_the_system_turn_and_the_rest_counted(tmp_path: Path) -> None:
    prompts = choose_prompts(8, seed=0)
    scripted = _Scripted({prompts[0].text: "", prompts[1].text: "word " * 20 + "and so",
                          prompts[2].text: "An <image> here.", prompts[3].text: "word " * 20 + "done."})
    seen: list[tuple[int, int, int]] = []
    result = write_distill_set(tmp_path / "out", 8, 0, scripted.stream, count_tokens=lambda text: len(text.split()),
                               system_prompt=SYSTEM, max_new_tokens=20, model="scripted",
                               progress=lambda *step: seen.append(step))
    assert (result.requested, result.kept, result.cut, result.empty) == (8, 5, 1, 2)
    assert seen[-1] == (8, 8, 5) and len(seen) == 8
    assert all(options.temperature == 0 and options.max_new_tokens == 20 for _, options in scripted.calls)
    assert all(messages[0] == Message(Role.SYSTEM, SYSTEM) and len(messages) == 2 for messages, _ in scripted.calls)
    assert [messages[-1].text for messages, _ in scripted.calls] == [p.text for p in prompts]
    samples = read_dataset(result.data_file)
    assert [s.messages[1].text for s in samples] == [p.text for p in prompts[3:]]
    assert all([m.role for m in s.messages] == [Role.SYSTEM, Role.USER, Role.ASSISTANT] for s in samples)
    assert samples[0].messages[2].text == "word " * 20 + "done."  # at the cap, but the sentence was over
    records = [json.loads(line) for line in result.data_file.read_text().splitlines()]
    assert [r["category"] for r in records] == [p.kind for p in prompts[3:]]
    info = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert info["model"] == "scripted" and info["kept"] == 5 and info["cut"] == 1 and info["seed"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.jsonl", "distill.json"]


def test_nothing_finished_is_an_error_and_no_dataset(tmp_path: Path) -> None:
    rambling = _Scripted({prompt.text: "and so on and" for prompt in distill_prompts()})
    with pytest.raises(BadDataset, match="all 3 answers were cut at --max-new-tokens 4 or empty"):
        write_distill_set(tmp_path / "out", 3, 0, rambling.stream, count_tokens=lambda text: len(text.split()),
                          system_prompt=None, max_new_tokens=4)
    assert not (tmp_path / "out" / "data.jsonl").exists() and not (tmp_path / "out" / "data.jsonl.partial").exists()
    assert all(len(messages) == 1 for messages, _ in rambling.calls)  # no system prompt: no system turn


runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("distill") / "llama")


def test_iris_data_distill_answers_with_the_model_and_drops_cut_answers(tiny_llama: Path, tmp_path: Path) -> None:
    """A tiny random Llama mostly rambles to the cap; some answers end (its end token) before it."""
    out = tmp_path / "distilled"
    done = runner.invoke(app, ["data", "distill", "--out", str(out), "--n", "24", "--seed", "0", "-m",
                               str(tiny_llama), "--max-new-tokens", "24", "--system", "Be brief."])
    assert done.exit_code == 0, done.output
    info = json.loads((out / "distill.json").read_text())
    assert info["kept"] + info["cut"] + info["empty"] == 24 and info["kept"] >= 1 and info["cut"] >= 1
    assert done.stdout.startswith(f"wrote {info['kept']} samples to {out / 'data.jsonl'} ({info['cut']} cut at "
                                  "--max-new-tokens 24")
    assert done.stderr.splitlines()[-1].startswith("distill: 24/24 answered, ")
    samples = read_dataset(out)
    assert len(samples) == info["kept"]
    assert all(s.messages[0] == Message(Role.SYSTEM, "Be brief.") for s in samples)
    assert all(len(s.messages[2].text) < 24 - CAP_SLACK for s in samples)  # one character per token: none cut
    again = tmp_path / "again"
    runner.invoke(app, ["data", "distill", "--out", str(again), "--n", "24", "-m", str(tiny_llama),
                        "--max-new-tokens", "24", "--system", "Be brief."])
    assert (again / "data.jsonl").read_text() == (out / "data.jsonl").read_text()  # greedy: the same answers


def test_cli_errors_are_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    no_model = tmp_path / "not-a-model"
    no_model.mkdir()
    model = ("-m", str(tiny_llama))
    cases = {("--out", str(used), *model): "not empty",
             ("--out", str(tmp_path / "a"), "--n", "0", *model): "--n must be between 1 and",
             ("--out", str(tmp_path / "b"), "--n", "100000", *model): "--n must be between 1 and",
             ("--out", str(tmp_path / "c"), "--max-new-tokens", "0", *model): "--max-new-tokens must be at least 1",
             ("--out", str(tmp_path / "d"), "-m", str(tmp_path / "missing")): "no such file or directory",
             ("--out", str(tmp_path / "e"), "-m", str(no_model)): "not a model directory",
             ("--out", str(tmp_path / "f"), "--quant", "bogus", *model): "--quant"}
    for args, message in cases.items():
        done = runner.invoke(app, ["data", "distill", "--n", "2", *args] if "--n" not in args else
                             ["data", "distill", *args])
        assert done.exit_code == 1, (args, done.output)
        assert done.stderr.startswith("error: ") and message in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model", "used"]  # nothing made on a refusal
