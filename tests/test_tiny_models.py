"""Real model code paths on tiny in-process models: loading, 4-bit, images, LoRA, streaming."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import save_strong_lora, save_tiny_llama, save_tiny_llava, tiny_tokenizer

from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.engine import LocalBackend
from assistant.errors import AdapterMismatch, BadAdapter, ModelNotFound
from assistant.messages import BASE_MODEL, Message, Role
from assistant.model import attach_adapter, load
from assistant.vision import load_image_path

GREEDY = GenerationOptions(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": save_tiny_llama(root / "llama"), "llava": save_tiny_llava(root / "llava"),
            "other_llama": save_tiny_llama(root / "other", seed=1)}


def _user(text: str, *images: object) -> list[Message]:
    return [Message(Role.SYSTEM, "sys"), Message(Role.USER, text, tuple(images))]  # type: ignore[arg-type]


def test_text_model_loads_streams_and_counts(model_dirs: dict[str, Path]) -> None:
    loaded = load(ModelOptions(model=str(model_dirs["llama"]), quant="none"), Paths.default())
    assert not loaded.accepts_images and loaded.context_length == 512
    backend = LocalBackend(loaded)
    messages = _user("hello")
    answer = "".join(backend.stream(messages, GREEDY))
    assert answer and answer == "".join(backend.stream(messages, GREEDY))  # greedy is deterministic
    assert backend.count_tokens(messages) == backend.renderer.encode(messages)["input_ids"].shape[-1]


def test_vision_model_is_detected_and_counts_true_image_cost(model_dirs: dict[str, Path], sample_png: Path) -> None:
    loaded = load(ModelOptions(model=str(model_dirs["llava"]), quant="none"), Paths.default())
    assert loaded.accepts_images
    backend = LocalBackend(loaded)
    image = load_image_path(sample_png)
    assert backend.image_tokens(image) == 5  # (28 / 14)^2 patches + CLS with the "full" strategy
    messages = [*_user("two pictures", image, image), Message(Role.ASSISTANT, "ok"),
                Message(Role.USER, "more", (image,))]
    encoded = backend.renderer.encode(messages)
    assert backend.count_tokens(messages) == encoded["input_ids"].shape[-1]
    assert int((encoded["input_ids"] == loaded.model.config.image_token_id).sum()) == 15
    assert "".join(backend.stream(messages, GREEDY))


def test_image_preprocessing_runs_on_one_thread_and_restores_the_setting(model_dirs: dict[str, Path],
                                                                        sample_png: Path) -> None:
    """The processor's small tensor ops (resize, normalise) run without an OpenMP team: on a busy machine a team
    waits for cores at each op (assistant/threads.py). Counting and encoding both take that path."""
    from assistant.prompt import PromptRenderer

    loaded = load(ModelOptions(model=str(model_dirs["llava"]), quant="none"), Paths.default())
    seen: list[int] = []
    processor = loaded.processor

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(processor, name)

        def __call__(self, *args: object, **kwargs: object) -> object:
            seen.append(torch.get_num_threads())
            return processor(*args, **kwargs)

    renderer = PromptRenderer(loaded.tokenizer, Spy())
    image = load_image_path(sample_png)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert renderer.count(_user("what is this?", image)) == renderer.encode(_user("what is this?", image))[
            "input_ids"].shape[-1]
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_images_only_adapter_sits_out_text_only_conversations(model_dirs: dict[str, Path], sample_png: Path,
                                                                  tmp_path: Path) -> None:
    """An adapter whose manifest says ``images_only`` (the default model's shipped LoRA) answers conversations with
    a picture; a text-only one gets the base model's own answer, and unloading forgets the flag."""
    adapter = save_strong_lora(model_dirs["llava"], tmp_path / "seeing", seed=3, vision=True)
    loaded = load(ModelOptions(model=str(model_dirs["llava"]), quant="none"), Paths.default())
    (adapter / "iris_manifest.json").write_text(json.dumps({"images_only": True, "base_fingerprint":
                                                            loaded.fingerprint}))
    backend = LocalBackend(loaded)
    image = load_image_path(sample_png)
    base_text, base_image = ("".join(backend.stream(messages, GREEDY)) for messages in
                             (_user("hello"), _user("what is this?", image)))
    name = backend.load_adapter(str(adapter))
    assert loaded.images_only == {name} and loaded.active_adapter == name
    assert "".join(backend.stream(_user("hello"), GREEDY)) == base_text
    assert "".join(backend.stream(_user("what is this?", image), GREEDY)) != base_image
    backend.unload_adapter(name)
    assert loaded.images_only == set()


def test_4bit_load_has_linear4bit_layers_and_keeps_the_vision_tower_full_precision(
        model_dirs: dict[str, Path], sample_png: Path) -> None:
    import bitsandbytes as bnb

    loaded = load(ModelOptions(model=str(model_dirs["llava"]), quant="4bit"), Paths.default())
    modules = dict(loaded.model.named_modules())
    quantized = [name for name, module in modules.items() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in name for name in quantized)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in modules.items()
                   if "vision_tower" in n or "multi_modal_projector" in n)
    assert modules["model.language_model.layers.0.self_attn.q_proj"].weight.quant_state.quant_type == "nf4"
    answer = "".join(LocalBackend(loaded).stream(_user("see", load_image_path(sample_png)), GREEDY))
    assert answer


def test_lora_on_a_4bit_base_attaches_without_merging_and_switches_per_call(
        model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel

    adapter_a = save_strong_lora(model_dirs["llama"], tmp_path / "pirate", seed=1)
    adapter_b = save_strong_lora(model_dirs["llama"], tmp_path / "poet", seed=2)
    options = ModelOptions(model=str(model_dirs["llama"]), quant="4bit", adapters=(str(adapter_a), str(adapter_b)))
    loaded = load(options, Paths.default())
    assert isinstance(loaded.model, PeftModel) and set(loaded.adapters) == {"pirate", "poet"}
    q_proj = loaded.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)  # not merged: LoRA wraps the 4-bit layer
    backend = LocalBackend(loaded)
    messages = _user("hi")
    plain = "".join(backend.stream(messages, GREEDY, adapter=BASE_MODEL))
    pirate = "".join(backend.stream(messages, GREEDY, adapter="pirate"))
    poet = "".join(backend.stream(messages, GREEDY, adapter="poet"))
    assert len({plain, pirate, poet}) == 3
    assert "".join(backend.stream(messages, GREEDY)) == poet  # no choice: the last adapter given is active
    assert "".join(backend.stream(messages, GREEDY, adapter=BASE_MODEL)) == plain  # adapters off again


def test_adapter_errors_are_one_line_and_leave_the_model_usable(model_dirs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    loaded = load(ModelOptions(model=str(model_dirs["llama"]), quant="none"), Paths.default())
    good = save_strong_lora(model_dirs["llama"], tmp_path / "good", seed=3)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{not json")
    garbage_weights = save_strong_lora(model_dirs["llama"], tmp_path / "garbage", seed=4)
    (garbage_weights / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    cases = [(tmp_path / "nope", BadAdapter, "no such adapter"), (corrupt, BadAdapter, "corrupt adapter_config"),
             (garbage_weights, BadAdapter, "garbage"), (pickled, BadAdapter, "pickle")]
    for path, error_type, expected in cases:
        with pytest.raises(error_type, match=expected) as error:
            attach_adapter(loaded, str(path))
        assert "\n" not in str(error.value)
    assert attach_adapter(loaded, str(good)) == "good"


def test_adapter_for_a_different_base_is_refused(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    llava_adapter = save_strong_lora(model_dirs["llava"], tmp_path / "for-llava", seed=5, vision=True)
    loaded = load(ModelOptions(model=str(model_dirs["llama"]), quant="none"), Paths.default())
    with pytest.raises(AdapterMismatch, match="does not fit this base model"):
        attach_adapter(loaded, str(llava_adapter))
    manifest_adapter = save_strong_lora(model_dirs["llama"], tmp_path / "with-manifest", seed=6)
    (manifest_adapter / "iris_manifest.json").write_text(json.dumps({"base_fingerprint": "0123456789abcdef",
                                                                     "base_model": "SomeOtherLM"}))
    with pytest.raises(AdapterMismatch, match="trained for base SomeOtherLM"):
        attach_adapter(loaded, str(manifest_adapter))


def test_bad_model_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(str(tmp_path / "missing"), "no such file or directory"), (str(empty), "no config.json"),
             (str(tmp_path / "x.gguf"), "no such GGUF file")]
    for model, expected in cases:
        with pytest.raises(ModelNotFound, match=expected):
            load(ModelOptions(model=model), Paths.default())


def test_closing_the_stream_stops_generation(model_dirs: dict[str, Path]) -> None:
    backend = LocalBackend(load(ModelOptions(model=str(model_dirs["llama"]), quant="none"), Paths.default()))
    stream = backend.stream(_user("go on"), GenerationOptions(temperature=0, max_new_tokens=400))
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "iris-generate"]
    assert "".join(backend.stream(_user("again"), GREEDY))  # the device lock was released


def test_seed_makes_sampling_reproducible(model_dirs: dict[str, Path]) -> None:
    backend = LocalBackend(load(ModelOptions(model=str(model_dirs["llama"]), quant="none"), Paths.default()))
    sampled = GenerationOptions(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, seed=11)
    runs = ["".join(backend.stream(_user("x"), sampled)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_training_labels_cover_only_assistant_tokens() -> None:
    from assistant.prompt import PromptRenderer

    tokenizer = tiny_tokenizer()
    renderer = PromptRenderer(tokenizer)
    messages = [Message(Role.SYSTEM, "rules"), Message(Role.USER, "question"), Message(Role.ASSISTANT, "answer one"),
                Message(Role.USER, "again"), Message(Role.ASSISTANT, "answer two")]
    example = renderer.training_example(messages)
    kept = example["input_ids"][0][example["labels"][0] != -100]
    assert tokenizer.decode(kept) == "answer one<|im_end|>\nanswer two<|im_end|>\n"


def test_int8_cpu_path_keeps_adapters_switchable(model_dirs: dict[str, Path], tmp_path: Path,
                                                 sample_png: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    adapter = save_strong_lora(model_dirs["llama"], tmp_path / "pirate", seed=7)
    full = LocalBackend(load(ModelOptions(model=str(model_dirs["llama"]), quant="none", adapters=(str(adapter),)),
                             Paths.default()))
    loaded = load(ModelOptions(model=str(model_dirs["llama"]), quant="int8", adapters=(str(adapter),)),
                  Paths.default())
    assert loaded.quant == "int8"
    q_proj = loaded.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, DynamicInt8Linear) and type(q_proj.lora_A["pirate"]) is torch.nn.Linear
    backend = LocalBackend(loaded)
    messages = _user("hi")
    assert "".join(backend.stream(messages, GREEDY, adapter="pirate")) != "".join(
        backend.stream(messages, GREEDY, adapter=BASE_MODEL))
    with torch.inference_mode():  # int8 stays close to full precision
        ids = backend.renderer.encode(messages)["input_ids"]
        assert (loaded.model(ids).logits - full.loaded.model(ids).logits).abs().max() < 0.5
    with pytest.raises(BadAdapter, match="adapters attach at load time"):
        attach_adapter(loaded, str(adapter), name="again")
    llava = load(ModelOptions(model=str(model_dirs["llava"]), quant="int8"), Paths.default())
    modules = dict(llava.model.named_modules())
    tower_linears = [m for n, m in modules.items() if "vision_tower" in n and isinstance(m, torch.nn.Linear)]
    assert tower_linears and all(type(m) is torch.nn.Linear for m in tower_linears)
    assert isinstance(modules["model.language_model.layers.0.self_attn.q_proj"], DynamicInt8Linear)
    assert "".join(LocalBackend(llava).stream(_user("see", load_image_path(sample_png)), GREEDY))


def test_fp16_packs_the_language_model_weights(model_dirs: dict[str, Path], sample_png: Path) -> None:
    """``--quant fp16`` on a CPU: the language model's Linear layers hold fp16 weights (fp32 products), the vision
    tower and projector stay fp32, and the logits stay within fp16 rounding of full precision."""
    from assistant.cpu_quant import half_weights_supported

    if not half_weights_supported():
        pytest.skip("fp16 weights need fbgemm (an x86 CPU)")
    full = load(ModelOptions(model=str(model_dirs["llava"]), quant="none"), Paths.default())
    loaded = load(ModelOptions(model=str(model_dirs["llava"]), quant="fp16"), Paths.default())
    assert loaded.quant == "fp16"
    modules = dict(loaded.model.named_modules())
    packed = [name for name, module in modules.items() if getattr(module, "product", None) is not None]
    assert packed and all(name.startswith("model.language_model.") or name == "lm_head" for name in packed)
    attention, mlp = modules["model.language_model.layers.0.self_attn"], modules["model.language_model.layers.0.mlp"]
    assert attention.q_proj.product is attention.k_proj.product is attention.v_proj.product  # stacked siblings
    assert mlp.gate_proj.product is mlp.up_proj.product is not mlp.down_proj.product
    assert all(type(m) is torch.nn.Linear for n, m in modules.items() if "vision_tower" in n or "projector" in n
               if isinstance(m, torch.nn.Linear))
    backend = LocalBackend(loaded)
    info = backend.describe()
    assert info["quantization"] == "fp16" and info["parameters"] == sum(p.numel() for p in full.model.parameters())
    messages = _user("see", load_image_path(sample_png))
    inputs = backend.renderer.encode(messages)
    with torch.inference_mode():
        assert (loaded.model(**inputs).logits - full.model(**inputs).logits).abs().max() < 1e-2
    assert "".join(backend.stream(messages, GREEDY)) == "".join(LocalBackend(full).stream(messages, GREEDY))


def test_adapters_attach_switch_and_detach_on_fp16_weights(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """PEFT wraps the fp16 layers like full-precision ones: an adapter attached after load answers as it does on
    full precision, and detaching it gives the base model back."""
    from assistant.cpu_quant import half_weights_supported
    from assistant.model import detach_adapter

    if not half_weights_supported():
        pytest.skip("fp16 weights need fbgemm (an x86 CPU)")
    adapter = save_strong_lora(model_dirs["llama"], tmp_path / "pirate", seed=8)
    loaded = load(ModelOptions(model=str(model_dirs["llama"]), quant="fp16"), Paths.default())
    backend = LocalBackend(loaded)
    messages = _user("hi")
    plain = "".join(backend.stream(messages, GREEDY))
    assert attach_adapter(loaded, str(adapter)) == "pirate"
    q_proj = loaded.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.product is not None and type(q_proj.lora_A["pirate"]) is torch.nn.Linear
    pirate = "".join(backend.stream(messages, GREEDY))
    full = load(ModelOptions(model=str(model_dirs["llama"]), quant="none", adapters=(str(adapter),)), Paths.default())
    assert pirate != plain and pirate == "".join(LocalBackend(full).stream(messages, GREEDY))
    assert "".join(backend.stream(messages, GREEDY, adapter=BASE_MODEL)) == plain
    detach_adapter(loaded, "pirate")
    assert "".join(backend.stream(messages, GREEDY)) == plain
