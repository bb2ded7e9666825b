"""Adapters attached to and detached from a running model (``LocalBackend.load_adapter``/``unload_adapter``):
answers change at once, the active adapter falls back in order, caches never serve what an unloaded adapter
computed, and an adapter that fails part way through PEFT leaves the model exactly as it was."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file
from tiny_models import save_strong_lora, save_tiny_llama, save_tiny_llava

from assistant.adapter_files import PROJECTOR_FILE
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.engine import LocalBackend
from assistant.errors import AdapterMismatch, BadAdapter
from assistant.messages import BASE_MODEL, Message, Role
from assistant.model import attach_adapter, detach_adapter, load
from assistant.vision import load_image_path

GREEDY = GenerationOptions(temperature=0, max_new_tokens=8)
HELLO = [Message(Role.SYSTEM, "sys"), Message(Role.USER, "hello there")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hot")
    llama = save_tiny_llama(root / "llama")
    llava = save_tiny_llava(root / "llava")
    return {"llama": llama, "pirate": save_strong_lora(llama, root / "pirate", seed=3),
            "poet": save_strong_lora(llama, root / "poet", seed=4), "llava": llava,
            "seeing": save_strong_lora(llava, root / "seeing", seed=5, vision=True),
            "other_seeing": save_strong_lora(llava, root / "other_seeing", seed=6, vision=True)}


def _backend(model_dir: Path, quant: str = "none") -> LocalBackend:
    return LocalBackend(load(ModelOptions(model=str(model_dir), quant=quant), Paths.default()))


def _answer(backend: LocalBackend, messages: list[Message] = HELLO, adapter: str | None = None) -> str:
    return "".join(backend.stream(messages, GREEDY, adapter))


def _state(model: Any) -> tuple[str, list[tuple[str, str]]]:
    """Every tensor's bytes and every module's name and class: what "untouched" means."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest(), [(name, type(module).__name__) for name, module in model.named_modules()]


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_a_loaded_adapter_answers_at_once_and_unloading_falls_back_in_order(tiny: dict[str, Path],
                                                                            quant: str) -> None:
    backend = _backend(tiny["llama"], quant)
    plain_state = _state(backend.loaded.model)
    plain = _answer(backend)
    assert backend.load_adapter(str(tiny["pirate"])) == "pirate"
    pirate = _answer(backend)
    assert backend.load_adapter(str(tiny["poet"]), "verse") == "verse"
    assert backend.adapter_names() == ["pirate", "verse"] and backend.loaded.active_adapter == "verse"
    verse = _answer(backend)
    assert len({plain, pirate, verse}) == 3
    assert _answer(backend, adapter="pirate") == pirate and _answer(backend, adapter=BASE_MODEL) == plain

    backend.unload_adapter("verse")  # the active one: the adapter loaded before it answers again
    assert backend.adapter_names() == ["pirate"] and backend.loaded.active_adapter == "pirate"
    assert _answer(backend) == pirate
    backend.unload_adapter("pirate")  # the last one: the plain base model, as before the first load
    assert backend.adapter_names() == [] and backend.loaded.active_adapter is None
    digest, layers = _state(backend.loaded.model)
    assert _answer(backend) == plain and layers == plain_state[1]
    assert quant == "4bit" or digest == plain_state[0]  # bitsandbytes re-encodes 4-bit state as it runs on a CPU
    assert backend.load_adapter(str(tiny["pirate"])) == "pirate" and _answer(backend) == pirate  # loads again


def test_unloading_an_adapter_that_is_not_the_active_one_keeps_the_active_one(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["llama"])
    backend.load_adapter(str(tiny["pirate"]))
    backend.load_adapter(str(tiny["poet"]))
    poet = _answer(backend)
    backend.unload_adapter("pirate")
    assert backend.loaded.active_adapter == "poet" and _answer(backend) == poet


@pytest.mark.parametrize("name", ["ghost", BASE_MODEL, ""])
def test_unloading_an_unknown_adapter_is_one_line(tiny: dict[str, Path], name: str) -> None:
    backend = _backend(tiny["llama"])
    backend.load_adapter(str(tiny["pirate"]))
    with pytest.raises(BadAdapter, match=f"no adapter named {name!r} is loaded \\(loaded: pirate\\)") as error:
        backend.unload_adapter(name)
    assert "\n" not in str(error.value) and backend.adapter_names() == ["pirate"]


def test_loading_a_name_twice_or_a_missing_directory_changes_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(tiny["llama"])
    backend.load_adapter(str(tiny["pirate"]))
    pirate = _answer(backend)
    with pytest.raises(BadAdapter, match="an adapter named 'pirate' is already loaded"):
        backend.load_adapter(str(tiny["poet"]), "pirate")
    with pytest.raises(BadAdapter, match="no such adapter directory"):
        backend.load_adapter(str(tmp_path / "nowhere"))
    assert backend.adapter_names() == ["pirate"] and _answer(backend) == pirate


def _with_config(source: Path, out: Path, **changes: Any) -> Path:
    """A copy of an adapter whose adapter_config.json passes every check before PEFT but fails inside it."""
    out.mkdir()
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


# Each fails after PEFT started changing the model: a wrong rank only when the weights load into injected layers.
FAILING_INSIDE_PEFT = [({"r": 8}, "size mismatch"), ({"target_modules": ["no_such_module"]}, "not found in the base")]


@pytest.mark.parametrize("already_loaded", [False, True], ids=["first adapter", "second adapter"])
@pytest.mark.parametrize("change, expected", FAILING_INSIDE_PEFT, ids=["rank", "no module"])
def test_an_adapter_that_fails_inside_peft_leaves_the_model_untouched(tiny: dict[str, Path], tmp_path: Path,
                                                                     already_loaded: bool, change: dict[str, Any],
                                                                     expected: str) -> None:
    broken = _with_config(tiny["poet"], tmp_path / "broken", **change)
    backend = _backend(tiny["llama"])
    if already_loaded:
        backend.load_adapter(str(tiny["pirate"]))
    before, answer = _state(backend.loaded.model), _answer(backend)
    with pytest.raises(AdapterMismatch, match=expected) as error:
        backend.load_adapter(str(broken))
    assert "\n" not in str(error.value)
    assert _state(backend.loaded.model) == before and _answer(backend) == answer
    assert backend.adapter_names() == (["pirate"] if already_loaded else [])
    assert already_loaded or not hasattr(backend.loaded.model, "peft_config")  # PEFT's mark is gone too
    assert backend.load_adapter(str(tiny["poet"])) == "poet"  # nothing left behind blocks the next load
    fresh = _backend(tiny["llama"])
    fresh.load_adapter(str(tiny["poet"]))
    assert _answer(backend, adapter="poet") == _answer(fresh)


def test_a_failed_load_on_a_4bit_base_leaves_it_untouched(tiny: dict[str, Path], tmp_path: Path) -> None:
    broken = _with_config(tiny["poet"], tmp_path / "broken", r=8)
    backend = _backend(tiny["llama"], "4bit")
    for loaded_before in ([], ["pirate"]):
        if loaded_before:
            backend.load_adapter(str(tiny["pirate"]))
        answer = _answer(backend)  # first: bitsandbytes repacks 4-bit weights for the CPU on their first use
        before = _state(backend.loaded.model)
        with pytest.raises(AdapterMismatch, match="size mismatch"):
            backend.load_adapter(str(broken))
        assert _state(backend.loaded.model) == before and _answer(backend) == answer
        assert backend.adapter_names() == loaded_before


def test_loading_waits_for_the_generation_in_progress(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["llama"])
    stream = backend.stream(HELLO, GenerationOptions(temperature=0, max_new_tokens=64))
    next(stream)  # a generation holds the device
    loaded = threading.Event()
    worker = threading.Thread(target=lambda: (backend.load_adapter(str(tiny["pirate"])), loaded.set()))
    worker.start()
    assert not loaded.wait(0.5) and backend.adapter_names() == []
    stream.close()
    worker.join(30)
    assert loaded.is_set() and backend.adapter_names() == ["pirate"]


def test_a_request_for_an_adapter_unloaded_while_it_waited_is_one_line(tiny: dict[str, Path]) -> None:
    backend = _backend(tiny["llama"])
    backend.load_adapter(str(tiny["pirate"]))
    backend.load_adapter(str(tiny["poet"]))
    failures: list[BaseException] = []

    def ask() -> None:
        try:
            _answer(backend, adapter="pirate")
        except BadAdapter as error:
            failures.append(error)

    with backend._lock:  # the request resolves "pirate", then waits for the device
        worker = threading.Thread(target=ask)
        worker.start()
        worker.join(0.5)
        detach_adapter(backend.loaded, "pirate")
    worker.join(30)
    assert [str(error) for error in failures] == ["adapter 'pirate' was unloaded"]


def test_a_new_adapter_under_an_unloaded_name_never_gets_its_caches(tiny: dict[str, Path],
                                                                    sample_png: Path) -> None:
    image = load_image_path(sample_png)
    first = [Message(Role.SYSTEM, "sys"), Message(Role.USER, "look", (image,))]
    backend = _backend(tiny["llava"])
    backend.load_adapter(str(tiny["seeing"]), "eyes")
    answer = _answer(backend, first)
    follow_up = [*first, Message(Role.ASSISTANT, answer), Message(Role.USER, "and now?")]
    assert backend.feature_cache.get(image.sha256, "eyes") is not None and len(backend.prefix_cache) == 1
    _answer(backend, first, BASE_MODEL)  # the base model's entries stay valid
    backend.unload_adapter("eyes")
    assert backend.feature_cache.get(image.sha256, "eyes") is None
    assert backend.feature_cache.get(image.sha256, None) is not None and len(backend.prefix_cache) == 1

    backend.load_adapter(str(tiny["other_seeing"]), "eyes")
    fresh = _backend(tiny["llava"])
    fresh.load_adapter(str(tiny["other_seeing"]), "eyes")
    assert _answer(backend, follow_up) == _answer(fresh, follow_up)


def test_a_hot_loaded_projector_replaces_cached_image_features(tiny: dict[str, Path], sample_png: Path,
                                                              tmp_path: Path) -> None:
    image = load_image_path(sample_png)
    messages = [Message(Role.SYSTEM, "sys"), Message(Role.USER, "look", (image,))]
    backend = _backend(tiny["llava"])
    before = _answer(backend, messages)
    projector = backend.loaded.model.get_submodule(backend.loaded.architecture.projector)
    (tmp_path / "proj").mkdir()
    save_file({name: tensor * 3 for name, tensor in projector.state_dict().items()},
              str(tmp_path / "proj" / PROJECTOR_FILE))
    backend.load_adapter(str(tmp_path / "proj"))
    assert backend.feature_cache.used_bytes == 0 and len(backend.prefix_cache) == 0
    fresh = _backend(tiny["llava"])
    fresh.load_adapter(str(tmp_path / "proj"))
    after = _answer(backend, messages)
    assert after == _answer(fresh, messages) and after != before


def test_int8_refuses_hot_loading_and_unloading_in_one_line(tiny: dict[str, Path]) -> None:
    loaded = load(ModelOptions(model=str(tiny["llama"]), quant="int8", device="cpu",
                               adapters=(str(tiny["pirate"]),)), Paths.default())
    backend = LocalBackend(loaded, kv_cache_bytes=0)  # int8 activations scale per input: a cold run each time
    answer = _answer(backend)
    for action in (lambda: backend.load_adapter(str(tiny["poet"])), lambda: backend.unload_adapter("pirate"),
                   lambda: attach_adapter(loaded, str(tiny["poet"]))):
        with pytest.raises(BadAdapter, match="with --quant int8, adapters attach at load time only") as error:
            action()
        assert "\n" not in str(error.value)
    assert backend.adapter_names() == ["pirate"] and _answer(backend) == answer
