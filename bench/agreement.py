"""Do the CPU's smaller weights keep the default model's answers? Greedy agreement with full precision, for
``--quant fp16`` (packed half-precision weights), ``int4`` (4-bit weights in Q4_1's groups, bf16 activations) and
``int8`` (PyTorch's dynamic int8), and for llama.cpp's own server on the same GGUF as a yardstick (text only: it has
no vision tower).

On a fixed set of prompts (text questions, held-out synthetic shapes and real photographs with a question), the
full-precision model (``--quant none``) answers greedily; each model then reads that answer token by token
(teacher forcing) and the bench counts the positions where its greedy pick is full precision's. It also counts the
answers each reproduces word for word when it answers on its own, and scores all on the vision eval (the held-out
suite of ``iris data synth --eval-suite``, keyword accuracy as ``iris eval`` scores it). Run:
``python bench/agreement.py``.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import llama_server  # noqa: E402

from adapters.evaluate import RowSpec, answer_all, load_items, score  # noqa: E402
from adapters.synth import synthesize, write_eval_suite  # noqa: E402
from assistant.builders.default_model import with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import ImageAttachment, Message, Role  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.vision import load_image_bytes, load_image_path  # noqa: E402

SYSTEM = "You are a helpful AI assistant named Iris."
QUESTIONS = ("What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "How many legs does a spider have?", "Explain what a CPU does in one sentence.",
             "Give me a tip for sleeping better.", "What is 12 times 7?", "Translate 'good morning' into Spanish.",
             "Who wrote Romeo and Juliet?", "Why is the sky blue?", "List the planets of the solar system.",
             "Write a short story about a lighthouse keeper.")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SHAPES_SEED = 777
SHAPE_IMAGES = 12
VISION_EVAL_PER_SKILL = 4  # questions per skill (colour, shape, count, side, describe, yes/no)
ANSWER_TOKENS = 48
CANDIDATES = {"int8": "int8", "fp16": "fp16", "int4": "int4"}  # quant -> the --quant that loads it


def photo(name: str) -> ImageAttachment:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buffer, format="PNG")
    return load_image_bytes(buffer.getvalue(), f"{name}.png")


def prompts(work: Path) -> list[tuple[str, list[Message]]]:
    """(kind, messages): text questions, held-out synthetic shapes, photographs."""
    system = Message(Role.SYSTEM, SYSTEM)
    chosen = [("text", [system, Message(Role.USER, question)]) for question in QUESTIONS]
    shapes = synthesize(work / "shapes", SHAPE_IMAGES, SHAPES_SEED).parent
    chosen += [("shapes", [system, Message(Role.USER, "Describe the image.", (load_image_path(path),))])
               for path in sorted((shapes / "images").iterdir())]
    chosen += [("photo", [system, Message(Role.USER, "What is in this picture?", (photo(name),))])
               for name in PHOTOS]
    return chosen


def teacher_forced(backend: LocalBackend, messages: list[Message], answer: Any) -> Any:
    """The model's greedy pick at each position of ``answer`` (token ids) following the prompt."""
    import torch

    encoded = backend.renderer.encode(messages)
    prompt = encoded["input_ids"].shape[1]
    ids = torch.cat([encoded["input_ids"], answer[None]], dim=1)
    inputs = {**encoded, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        logits = backend.loaded.model(**inputs).logits[0, prompt - 1:-1]
    return logits.argmax(-1)


def llama_cpp(url: str, prompt: list[int], answer: list[int]) -> tuple[list[int], str]:
    """llama.cpp's greedy pick after the prompt and each prefix of ``answer`` (teacher forcing, one request each,
    the prompt's cache kept between them), and its own greedy answer's text."""

    def complete(tokens: list[int], count: int) -> dict[str, Any]:
        body = json.dumps({"prompt": tokens, "n_predict": count, "temperature": 0, "return_tokens": True,
                           "cache_prompt": True})
        request = urllib.request.Request(url.removesuffix("/v1") + "/completion", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return dict(json.loads(response.read()))

    picks = [complete(prompt + answer[:position], 1)["tokens"][0] for position in range(len(answer))]
    return picks, str(complete(prompt, ANSWER_TOKENS)["content"])


def main() -> None:
    import torch

    torch.set_num_threads(1)  # a quality measurement: one thread keeps it steady on a shared machine
    paths = Paths.default()
    options = GenerationOptions(temperature=0, max_new_tokens=ANSWER_TOKENS)
    backends = {quant: LocalBackend(load(with_default_model(ModelOptions(quant=flag), paths), paths),
                                    kv_cache_bytes=0) for quant, flag in (("none", "none"), *CANDIDATES.items())}
    assert [backend.loaded.quant for backend in backends.values()] == ["none", *CANDIDATES], "fp16 and int4 need x86"
    full = backends["none"]
    tokenizer = full.loaded.tokenizer
    rows: dict[str, dict[str, list[tuple[int, int, bool]]]] = {quant: {} for quant in CANDIDATES}
    peer: list[tuple[int, int, bool]] = []
    with tempfile.TemporaryDirectory() as work_dir, llama_server(threads=1) as url:
        work = Path(work_dir)
        for kind, messages in prompts(work):
            reference = "".join(full.stream(messages, options))
            answer = torch.tensor(tokenizer(reference, add_special_tokens=False)["input_ids"] or [0])
            expected = teacher_forced(full, messages, answer)
            for quant in CANDIDATES:
                picks = teacher_forced(backends[quant], messages, answer)
                same = "".join(backends[quant].stream(messages, options)) == reference
                rows[quant].setdefault(kind, []).append((int((picks == expected).sum()), len(answer), same))
            if kind == "text":
                prompt = full.renderer.encode(messages)["input_ids"][0].tolist()
                picks, text = llama_cpp(url, prompt, answer.tolist())
                peer.append((int((torch.tensor(picks) == expected).sum()), len(answer), text == reference))
        items = load_items(write_eval_suite(work / "eval", VISION_EVAL_PER_SKILL, 424242), SYSTEM)
        eval_options = GenerationOptions(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
        vision = {quant: score(items, answer_all(backend, items, RowSpec(quant, None), eval_options)).keyword
                  for quant, backend in backends.items()}
    print(f"default model, greedy, {ANSWER_TOKENS}-token answers, against full precision (--quant none)")
    print(f"{'quant':<6} {'prompts':<8} {'n':>3} {'token agreement':>16} {'identical answers':>18}")
    for quant in CANDIDATES:
        kinds = rows[quant]
        for kind, results in [*kinds.items(), ("all", [row for rows_ in kinds.values() for row in rows_])]:
            agreed, total = sum(r[0] for r in results), sum(r[1] for r in results)
            identical = sum(r[2] for r in results)
            print(f"{quant:<6} {kind:<8} {len(results):>3} {agreed / total:>15.1%} "
                  f"{identical:>11}/{len(results):<6}")
    agreed, total, identical = (sum(row[index] for row in peer) for index in range(3))
    print(f"{'llama.cpp server, same GGUF':<15} text {len(peer):>3} {agreed / total:>15.1%} "
          f"{identical:>11}/{len(peer):<6}")
    print(f"vision eval ({VISION_EVAL_PER_SKILL * 6} held-out questions, keyword accuracy): "
          + ", ".join(f"{quant} {accuracy:.2f}" for quant, accuracy in vision.items()))


if __name__ == "__main__":
    main()
