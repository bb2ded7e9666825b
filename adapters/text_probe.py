"""The text-regression probe of ``iris eval --text``: does a vision model still answer plain questions?

A LoRA trained on images can damage what its language model knew ("What is the capital of France?" answered
with a shape's caption). The probe asks built-in factual questions with short unambiguous references, text
only, of the model under test (and, with an adapter, of its base with the adapter off) and of the base
language model it was built on, scored like any ``iris eval`` row (``adapters.evaluate``, keyword match), so
``text: model`` beside ``text: base LM`` shows what the vision training cost. The questions are ones the
default model's base, SmolLM2-135M-Instruct, answers right in the main (measured: the module's test).
"""

from __future__ import annotations

from adapters.evaluate import EvalItem, RowSpec
from assistant.messages import BASE_MODEL, Message, Role

TEXT_DATA = "built-in text questions"
TEXT_MAX_NEW_TOKENS = 32  # the right answer comes in the first sentence; a longer ramble only adds chance hits
BASE_LM_LABEL = "text: base LM"

# (question, reference): the reference's key words (see adapters.evaluate.key_words) must appear in the answer.
TEXT_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the main gas in the air we breathe?", "nitrogen"),
    ("Which organ pumps blood through the body?", "heart"),
    ("What is the name of our galaxy?", "the Milky Way"),
    ("What is frozen water called?", "ice"),
    ("How many days are there in a week?", "7"),
    ("How many months are there in a year?", "12"),
    ("How many hours are in a day?", "24"),
    ("How many seconds are in a minute?", "60"),
    ("How many days are in a year?", "365"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("What is 2 plus 2?", "4"),
    ("How many legs does a dog have?", "4"),
    ("What is 6 times 7?", "42"),
    ("What is 12 times 7?", "84"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of big?", "small"),
    ("What is the plural of mouse?", "mice"),
    ("What is the main language spoken in the United States?", "English"),
    ("What is the largest ocean on Earth?", "the Pacific"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What is the longest river in Africa?", "the Nile"),
    ("What is the largest desert in the world?", "the Sahara"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What is the currency of Japan?", "the yen"),
    ("Which animal is the largest land animal?", "the elephant"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "da Vinci"),
    ("Who developed the theory of relativity?", "Einstein"),
)


def text_items(system_prompt: str | None = None) -> list[EvalItem]:
    """The built-in questions as ``iris eval`` items, with ``system_prompt`` first (as ``iris ask`` sends it)."""
    system = (Message(Role.SYSTEM, system_prompt),) if system_prompt else ()
    return [EvalItem((*system, Message(Role.USER, question)), reference, "", f"text#{index}")
            for index, (question, reference) in enumerate(TEXT_QUESTIONS)]


def text_rows(with_adapter: bool) -> list[RowSpec]:
    """The rows run on the model under test: its base with adapters off, then the adapter; or the model alone."""
    if with_adapter:
        return [RowSpec("text: base", BASE_MODEL), RowSpec("text: adapter", None)]
    return [RowSpec("text: model", None)]


def base_lm_row() -> RowSpec:
    """The row run on the language model the model under test was built on, loaded on its own."""
    return RowSpec(BASE_LM_LABEL, None)
