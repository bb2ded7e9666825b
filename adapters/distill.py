"""Self-distillation data: plain-text questions answered by a model itself, to train beside new skills.

A LoRA trained only on new tasks (captions of synthetic shapes) drifts the language model it sits on: plain
questions start getting answers from the new task. Mixing in text-only samples whose answers are the base
model's own greedy answers holds the LoRA to what the base already did there. Those prompts are built here
offline, from templates times fillers in six kinds (facts, arithmetic, definitions, chat, writing, advice),
deterministically from a seed, and each is answered through the caller's ``generate`` (the backend's own
``stream``, so the answers are the model as its users get it).

An answer the model did not finish (it ran into ``max_new_tokens`` mid-sentence) or an empty one would teach
the LoRA to stop where the base would not: it is dropped, and counted. The output is a messages JSONL
(``data.jsonl``, read by ``adapters.dataset``) with the system prompt as the first turn of every sample, plus
``distill.json`` saying how it was made.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

from adapters.dataset import IMAGE_MARKER
from assistant.config import GenerationOptions
from assistant.errors import BadDataset, BadSetting, one_line
from assistant.messages import Message, Role

DATA_FILE = "data.jsonl"
INFO_FILE = "distill.json"
DEFAULT_MAX_NEW_TOKENS = 96
CAP_SLACK = 3  # re-tokenizing a decoded answer can merge a few tokens: this near the cap counts as at the cap
SENTENCE_ENDS = (".", "!", "?", "…")
CLOSERS = "\"'”’)]*_` "

Generate = Callable[[Sequence[Message], GenerationOptions], Iterable[str]]


@dataclass(frozen=True)
class DistillPrompt:
    text: str
    kind: str


@dataclass(frozen=True)
class DistillResult:
    """What ``write_distill_set`` wrote: ``kept`` samples; answers dropped as ``cut`` (at the cap mid-sentence)
    or ``empty`` (nothing, or an ``<image>`` marker a dataset cannot hold)."""

    data_file: Path
    requested: int
    kept: int
    cut: int
    empty: int
    seconds: float


# the prompts --------------------------------------------------------------------------------------------------

_COUNTRIES = ("France", "Japan", "Italy", "Germany", "Spain", "Canada", "Brazil", "Egypt", "India", "China",
              "Australia", "Mexico", "Kenya", "Norway", "Sweden", "Greece", "Portugal", "Argentina", "Peru",
              "Turkey", "Poland", "Ireland", "Thailand", "Vietnam", "South Korea", "Nigeria", "Chile", "Austria",
              "the Netherlands", "the United Kingdom")
_PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune", "the Moon", "the Sun")
_ANIMALS = ("an elephant", "a penguin", "a dolphin", "a tiger", "an owl", "a honeybee", "a frog", "a giraffe",
            "a kangaroo", "a horse", "a shark", "a cat", "a dog", "a rabbit", "a camel", "a polar bear",
            "a butterfly", "a snake", "a whale", "an ant")
_COLOURED = ("the sky on a clear day", "fresh grass", "a ripe banana", "snow", "a lemon", "a ripe tomato", "coal",
             "a carrot", "milk", "an emerald", "a fire truck", "the sea", "a pumpkin", "chocolate", "a flamingo")
_UNITS = (("seconds", "a minute"), ("minutes", "an hour"), ("hours", "a day"), ("days", "a week"),
          ("months", "a year"), ("weeks", "a year"), ("centimetres", "a metre"), ("metres", "a kilometre"),
          ("grams", "a kilogram"), ("millilitres", "a litre"), ("days", "a leap year"), ("years", "a century"),
          ("years", "a decade"), ("minutes", "a day"), ("inches", "a foot"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_NUMBER_PAIRS = ((3, 2), (5, 4), (8, 7), (12, 7), (9, 6), (15, 5), (20, 4), (36, 6), (100, 25), (48, 8),
                 (11, 3), (9, 3), (64, 16), (81, 9), (50, 10), (13, 4))
_OPERATIONS = ("What is {a} plus {b}?", "What is {a} minus {b}?", "What is {a} times {b}?",
               "What is {a} divided by {b}?", "Calculate {a} + {b}.", "If I have {a} apples and eat {b}, how "
               "many are left?")
_CONCEPTS = ("photosynthesis", "gravity", "a volcano", "democracy", "an atom", "electricity", "the internet",
             "a rainbow", "inflation", "DNA", "a computer", "evaporation", "friction", "a galaxy", "an ecosystem",
             "a vaccine", "a battery", "recycling", "a museum", "a noun", "a verb", "an election", "a library",
             "the water cycle", "a black hole", "a calendar", "a map", "a thermometer", "a magnet", "a cloud")
_DEFINITIONS = ("What is {c}?", "Explain {c} in simple terms.", "Explain {c} to a child.")
_WORDS = ("happy", "ancient", "curious", "brave", "enormous", "fragile", "generous", "humble", "rapid",
          "patient", "vivid", "quiet")
_CHAT = ("Who are you?", "What is your name?", "Hello!", "Hi there!", "Good morning!", "Good evening!",
         "How are you today?", "What can you do?", "Can you help me?", "Thank you!", "Thanks for your help.",
         "Are you a robot?", "Who made you?", "Tell me about yourself.", "What do you like to talk about?",
         "Goodbye!", "Nice to meet you.", "Tell me a joke.", "What should we talk about?", "Are you there?",
         "I'm bored.", "I had a great day today.", "I feel a bit tired.", "Can you keep a secret?",
         "What is your favourite colour?", "Do you have feelings?", "Are you smart?", "Hey, what's up?",
         "Can we be friends?", "What are you good at?", "How old are you?", "Where do you live?")
_TOPICS = ("the ocean", "autumn", "a cat", "the moon", "coffee", "rain", "the mountains", "friendship",
           "a city at night", "spring flowers", "winter", "the stars", "a quiet morning", "the forest", "books")
_WRITING = ("Write a haiku about {t}.", "Write one sentence about {t}.", "Write a short poem about {t}.",
            "Describe {t} in two sentences.")
_LISTS = ("fruits", "colours", "animals that live in the sea", "countries in Europe", "musical instruments",
          "vegetables", "sports", "things you find in a kitchen", "birds", "flowers", "hobbies", "jobs",
          "planets", "breakfast foods", "things to do on a rainy day")
_TASKS = ("boil an egg", "make a cup of tea", "plant a tree", "learn a new language", "save money",
          "sleep better", "start running", "write a good email", "make new friends", "study for an exam",
          "keep a plant alive", "clean a window", "tie a shoelace", "make a paper airplane", "remember names",
          "stay focused while working", "cook rice", "wash my hands properly", "prepare for a job interview",
          "drink more water")
_GOALS = ("staying healthy", "being more productive", "reducing stress", "learning to cook", "reading more books",
          "saving energy at home", "being on time", "taking better photos", "public speaking",
          "keeping a tidy room", "starting a garden", "eating more vegetables")


def distill_prompts() -> list[DistillPrompt]:
    """Every prompt the generator can ask, in a fixed order, each once."""
    facts = [*(f"What is the capital of {c}?" for c in _COUNTRIES),
             *(f"Tell me one interesting fact about {p}." for p in _PLANETS),
             *(template.format(a=a) for template, a in product(
                 ("What does {a} eat?", "Where does {a} live?", "Describe {a} in one sentence."), _ANIMALS)),
             *(f"What colour is {thing}?" for thing in _COLOURED),
             *(f"How many {small} are there in {big}?" for small, big in _UNITS),
             *(f"What day comes after {d}?" for d in _DAYS),
             *(f"What month comes after {m}?" for m in _MONTHS),
             *(f"How many days are there in {m}?" for m in _MONTHS)]
    arithmetic = [template.format(a=a, b=b) for template, (a, b) in product(_OPERATIONS, _NUMBER_PAIRS)]
    definitions = [*(template.format(c=c) for template, c in product(_DEFINITIONS, _CONCEPTS)),
                   *(f"What does the word '{w}' mean?" for w in _WORDS)]
    writing = [*(template.format(t=t) for template, t in product(_WRITING, _TOPICS)),
               *(f"Give me a list of three {things}." for things in _LISTS)]
    advice = [*(f"How do I {task}?" for task in _TASKS),
              *(f"Give me one tip for {goal}." for goal in _GOALS),
              *(f"What are some tips for {goal}?" for goal in _GOALS)]
    kinds = {"facts": facts, "arithmetic": arithmetic, "definitions": definitions, "chat": list(_CHAT),
             "writing": writing, "advice": advice}
    unique = {text: kind for kind, texts in kinds.items() for text in texts}
    return [DistillPrompt(text, kind) for text, kind in unique.items()]


def _pool_for(n: int) -> list[DistillPrompt]:
    pool = distill_prompts()
    if not 1 <= n <= len(pool):
        raise BadSetting(f"--n must be between 1 and {len(pool)} (the distinct prompts there are), got {n}")
    return pool


def choose_prompts(n: int, seed: int) -> list[DistillPrompt]:
    """``n`` distinct prompts for ``seed``: each kind shuffled, then taken in turn, so any ``n`` mixes all kinds."""
    rng = random.Random(seed)
    by_kind: dict[str, list[DistillPrompt]] = {}
    for prompt in _pool_for(n):
        by_kind.setdefault(prompt.kind, []).append(prompt)
    queues = [rng.sample(prompts, len(prompts)) for prompts in by_kind.values()]
    rng.shuffle(queues)
    chosen: list[DistillPrompt] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return chosen


# answering and writing ----------------------------------------------------------------------------------------


def is_cut(answer: str, tokens: int, max_new_tokens: int) -> bool:
    """True when the answer ran into the token cap and stops mid-sentence (the model was not done)."""
    return tokens >= max_new_tokens - CAP_SLACK and not answer.rstrip(CLOSERS).endswith(SENTENCE_ENDS)


def check_request(out_dir: Path, n: int, max_new_tokens: int) -> None:
    """Refuse what would fail or overwrite, before any model is loaded: a used ``out_dir``, ``n`` outside the
    prompt pool, a cap below one token."""
    if max_new_tokens < 1:
        raise BadSetting(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    _pool_for(n)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadDataset(f"{out_dir}: already exists and is not empty; choose a new --out")


def write_distill_set(out_dir: Path, n: int, seed: int, generate: Generate, *, count_tokens: Callable[[str], int],
                      system_prompt: str | None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, model: str = "",
                      progress: Callable[[int, int, int], None] = lambda done, total, kept: None) -> DistillResult:
    """Answer ``n`` prompts (chosen by ``seed``) greedily with ``generate`` and write the finished answers to
    ``out_dir/data.jsonl``; ``count_tokens`` measures an answer in the model's tokens, to tell one cut at the cap.

    Refuses a non-empty ``out_dir``; ``progress(done, total, kept)`` runs after every prompt.
    """
    out_dir = Path(out_dir)
    check_request(out_dir, n, max_new_tokens)
    prompts = choose_prompts(n, seed)
    options = GenerationOptions(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    system = (Message(Role.SYSTEM, system_prompt),) if system_prompt else ()
    partial = out_dir / f"{DATA_FILE}.partial"
    started = time.perf_counter()
    kept = cut = empty = 0
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with partial.open("w", encoding="utf-8") as records:  # written as it goes: a failure shows how far it got
            for done, prompt in enumerate(prompts, 1):
                answer = "".join(generate((*system, Message(Role.USER, prompt.text)), options)).strip()
                if not answer or IMAGE_MARKER in answer:
                    empty += 1
                elif is_cut(answer, count_tokens(answer), max_new_tokens):
                    cut += 1
                else:
                    turns = [{"role": m.role.value, "content": m.text} for m in system]
                    turns += [{"role": "user", "content": prompt.text}, {"role": "assistant", "content": answer}]
                    records.write(json.dumps({"messages": turns, "category": prompt.kind}, ensure_ascii=False) + "\n")
                    records.flush()
                    kept += 1
                progress(done, len(prompts), kept)
        if not kept:
            partial.unlink()
            raise BadDataset(f"all {n} answers were cut at --max-new-tokens {max_new_tokens} or empty; "
                             "nothing written (raise --max-new-tokens)")
        result = DistillResult(out_dir / DATA_FILE, n, kept, cut, empty, round(time.perf_counter() - started, 1))
        info = {**asdict(result), "data_file": DATA_FILE, "model": model, "seed": seed,
                "max_new_tokens": max_new_tokens, "system_prompt": system_prompt or None}
        partial.replace(result.data_file)
        (out_dir / INFO_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:  # a read-only place, /proc or /sys, a full disk
        raise BadDataset(f"{out_dir}: cannot write the dataset there ({exc.strerror or one_line(exc)})") from None
    return result
