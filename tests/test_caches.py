"""Work reused across turns: prefix KV cache and image feature cache give identical greedy output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_models import save_tiny_llama, save_tiny_llava

from assistant.caches import ByteLRU
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.dialogue import DialogueManager
from assistant.engine import LocalBackend
from assistant.model import load
from assistant.store import Store
from assistant.vision import load_image_path

GREEDY = GenerationOptions(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache_models")
    return {"llama": save_tiny_llama(root / "llama", context=2048),
            "llava": save_tiny_llava(root / "llava", context=2048)}


def _backend(model_dir: Path, **cache_sizes: int) -> LocalBackend:
    return LocalBackend(load(ModelOptions(model=str(model_dir), quant="none"), Paths.default()), **cache_sizes)


def _prefill_lengths(backend: LocalBackend) -> list[int]:
    """Record how many tokens each generate() prefills (the first forward of each call)."""
    lengths: list[int] = []
    language_model = backend.loaded.model.get_decoder() if hasattr(backend.loaded.model, "get_decoder") else None
    target = language_model if language_model is not None else backend.loaded.model

    def hook(module: object, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        length = embeds.shape[1] if embeds is not None else ids.shape[1]
        if length > 1:
            lengths.append(length)

    target.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def _converse(backend: LocalBackend, store: Store, turns: list[tuple[str, list]]) -> list[str]:  # type: ignore[type-arg]
    manager = DialogueManager(backend, store, default_system_prompt="You are terse.", default_options=GREEDY)
    conversation = manager.new_conversation()
    return [manager.send(conversation, text, images).run() for text, images in turns]


def test_byte_lru_evicts_oldest_past_its_budget() -> None:
    lru = ByteLRU(100)
    for key in "abcd":
        lru.put(key, key.upper(), 30)
    assert lru.keys() == ["b", "c", "d"] and lru.used_bytes == 90 and lru.evictions == 1
    lru.get("b")
    lru.put("e", "E", 30)
    assert lru.keys() == ["d", "b", "e"]
    lru.put("huge", "H", 101)
    assert lru.get("huge") is None and lru.used_bytes == 90


def test_text_turns_reuse_the_prefix_and_match_a_cold_run(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    turns = [(f"turn {index}: tell me more about number {index}", []) for index in range(5)]
    warm = _backend(model_dirs["llama"])
    cold = _backend(model_dirs["llama"], kv_cache_bytes=0)
    warm_prefills, cold_prefills = _prefill_lengths(warm), _prefill_lengths(cold)
    warm_answers = _converse(warm, Store(tmp_path / "warm.db"), turns)
    cold_answers = _converse(cold, Store(tmp_path / "cold.db"), turns)
    assert warm_answers == cold_answers
    assert warm.prefix_cache.hits == 4 and cold.prefix_cache.hits == 0
    assert warm_prefills[0] == cold_prefills[0]
    # Later turns prefill only what is new: the previous answer's end and the new message.
    new_tokens = [now - before for before, now in zip(cold_prefills, cold_prefills[1:], strict=False)]
    assert all(0 < warm <= new for warm, new in zip(warm_prefills[1:], new_tokens, strict=True))
    assert warm_prefills[-1] * 3 < cold_prefills[-1]


def test_images_are_encoded_once_and_outputs_match_a_cold_run(model_dirs: dict[str, Path], tmp_path: Path,
                                                               sample_png: Path, sample_jpg: Path) -> None:
    png, jpg = load_image_path(sample_png), load_image_path(sample_jpg)
    turns = [("what is this?", [png]), ("and these two?", [jpg, png]), ("anything else?", []),
             ("the first again", [png])]
    counts = {}
    answers = {}
    for name, sizes in {"warm": {}, "cold": {"kv_cache_bytes": 0, "feature_cache_bytes": 0}}.items():
        backend = _backend(model_dirs["llava"], **sizes)
        calls = []
        backend.loaded.model.model.vision_tower.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        answers[name] = _converse(backend, Store(tmp_path / f"{name}.db"), turns)
        counts[name] = len(calls)
    assert answers["warm"] == answers["cold"]
    assert counts["warm"] == 2  # one call per distinct image
    assert counts["cold"] == 1 + 3 + 3 + 4  # every image in the prompt, every turn


def test_pixel_path_and_feature_splicing_agree(model_dirs: dict[str, Path], sample_png: Path) -> None:
    """The spliced-embeddings input equals transformers' own pixel_values path."""
    from assistant.messages import Message, Role

    backend = _backend(model_dirs["llava"])
    messages = [Message(Role.USER, "describe", (load_image_path(sample_png),))]
    ours = "".join(backend.stream(messages, GREEDY))
    encoded = backend.renderer.encode(messages)
    reference = backend.loaded.model.generate(**encoded, max_new_tokens=12, do_sample=False,
                                              pad_token_id=backend.loaded.tokenizer.pad_token_id)
    text = backend.loaded.tokenizer.decode(reference[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours == text


def test_cache_memory_stays_within_budget(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Room for two of the four conversations: each entry counts its KV cache's spare room too."""
    backend = _backend(model_dirs["llama"], kv_cache_bytes=200_000)
    stores = [Store(tmp_path / f"{index}.db") for index in range(4)]
    for index, store in enumerate(stores):  # four "channels" talking at once
        _converse(backend, store, [(f"channel {index} says hello " * 3, [])])
    assert backend.prefix_cache.used_bytes <= 200_000
    assert backend.prefix_cache.evictions > 0 and len(backend.prefix_cache) >= 2
    evicted_again = _converse(backend, stores[0], [("channel 0 says hello " * 3, [])])
    assert evicted_again == _converse(_backend(model_dirs["llama"], kv_cache_bytes=0), Store(tmp_path / "c.db"),
                                      [("channel 0 says hello " * 3, [])])


def test_interleaved_conversations_keep_their_own_caches(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(model_dirs["llama"])
    prefills = _prefill_lengths(backend)
    manager = DialogueManager(backend, Store(tmp_path / "x.db"), default_system_prompt="shared", default_options=GREEDY)
    first, second = manager.new_conversation(), manager.new_conversation()
    manager.send(first, "alpha " * 10).run()
    manager.send(second, "beta " * 10).run()  # shares only the system prompt: copies, does not steal
    manager.send(first, "gamma").run()
    assert prefills[2] < 30 and len(backend.prefix_cache) == 2


def test_same_text_with_another_image_does_not_reuse_the_first_images_cache(
        model_dirs: dict[str, Path], sample_png: Path, sample_jpg: Path) -> None:
    from assistant.messages import Message, Role

    warm = _backend(model_dirs["llava"])
    cold = _backend(model_dirs["llava"], kv_cache_bytes=0, feature_cache_bytes=0)
    png, jpg = load_image_path(sample_png), load_image_path(sample_jpg)
    answers = {}
    for name, image in (("png", png), ("jpg", jpg), ("png again", png)):
        messages = [Message(Role.USER, "describe", (image,))]
        answers[name] = "".join(warm.stream(messages, GREEDY))
        assert answers[name] == "".join(cold.stream(messages, GREEDY))
    assert answers["png"] == answers["png again"] and answers["png"] != answers["jpg"]


def test_an_image_in_the_history_is_decoded_once_not_on_every_turn(model_dirs: dict[str, Path], tmp_path: Path,
                                                                   sample_png: Path, sample_jpg: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import assistant.vision

    decodes: list[str] = []
    real_to_pil = assistant.vision.to_pil
    monkeypatch.setattr(assistant.vision, "to_pil", lambda image: decodes.append(image.sha256) or real_to_pil(image))
    backend = _backend(model_dirs["llava"])
    png, jpg = load_image_path(sample_png), load_image_path(sample_jpg)
    processor_calls: list[int] = []
    real_processor = backend.loaded.processor.image_processor.__class__.__call__
    monkeypatch.setattr(backend.loaded.processor.image_processor.__class__, "__call__",
                        lambda self, *a, **k: processor_calls.append(1) or real_processor(self, *a, **k))
    turns = [("what is this?", [png]), ("and this?", [jpg])] + [(f"more {index}", []) for index in range(4)]
    answers = _converse(backend, Store(tmp_path / "x.db"), turns)
    assert sorted(decodes) == sorted([png.sha256, jpg.sha256])
    calls_after_images = len(processor_calls)
    assert answers == _converse(_backend(model_dirs["llava"], kv_cache_bytes=0, feature_cache_bytes=0,
                                         decoded_image_bytes=0), Store(tmp_path / "cold.db"), turns)
    assert calls_after_images <= 4  # per image: its token count and its features, then never again


def test_a_conversations_next_turn_writes_into_its_stored_kv_buffers(model_dirs: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """The KV cache stored after a turn keeps its spare room (counted in the budget), and the next turn's prefill
    appends to those very buffers: the history is not copied again on every turn (only when the room is full)."""
    from assistant.caches import kv_cache_bytes

    backend = _backend(model_dirs["llama"])
    decoder = backend.loaded.model.get_decoder()
    events: list[tuple[str, int, int]] = []  # (before/after a forward, its new tokens, layer 0's key buffer)
    caches: list[Any] = []

    def record(phase: str, kwargs: dict[str, Any]) -> None:
        keys = kwargs["cache"].layers[0].keys
        events.append((phase, kwargs["input_ids"].shape[1], 0 if keys is None else keys.untyped_storage().data_ptr()))
        caches.append(kwargs["cache"])

    decoder.register_forward_pre_hook(lambda module, args, kwargs: record("before", kwargs), with_kwargs=True)
    decoder.register_forward_hook(lambda module, args, kwargs, output: record("after", kwargs), with_kwargs=True)
    _converse(backend, Store(tmp_path / "x.db"), [(f"turn {index}: and then?", []) for index in range(4)])
    prefills = [index for index, (phase, tokens, _) in enumerate(events) if phase == "before" and tokens > 1]
    assert len(prefills) == 4 and backend.prefix_cache.hits == 3
    assert all(events[index][2] == events[index - 1][2] for index in prefills[1:])
    stored = caches[-1]
    keys = stored.layers[0].keys
    assert keys.untyped_storage().nbytes() > keys.numel() * keys.element_size()  # spare room...
    assert backend.prefix_cache.used_bytes == kv_cache_bytes(stored) == sum(  # ...counted
        layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in stored.layers)
