"""Bake an adapter into its base: ``iris adapters merge`` (a model for ``iris --model``) and ``export``
(a standalone HF model for other tools, checked by reloading it with plain transformers).

Merging into a 4-bit base would round the sum back to NF4, so it is refused unless ``dequantize``
is asked for: the base is then dequantized first and the merged model is written in full precision
(the weights a QLoRA adapter was actually trained against, up to NF4 rounding).

A vision model composed by ``iris build`` keeps its LLM's text-only chat template, which fails on the typed
image parts (``{"type": "image"}``) that transformers' ``processor.apply_chat_template`` is given; what
``save_model`` writes wraps such a template so it renders typed parts the way Iris renders them for it (each
image as the processor's image token and a newline, before the text), and plain string messages as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.manifest import write_manifest
from assistant.adapter_files import CONFIG_FILE, PROJECTOR_FILE, read_adapter_config, read_manifest
from assistant.builders.default_model import drop_shipped_lora, with_default_model
from assistant.config import ModelOptions, Paths
from assistant.errors import BadAdapter, BadSetting, one_line
from assistant.messages import ImageAttachment, Message, Role
from assistant.model import CPU_QUANTS, LoadedModel, attach_adapter, load
from assistant.prompt import PromptRenderer

PROBE_TEXT = "Describe the image in one sentence."


@dataclass(frozen=True)
class ExportCheck:
    """How closely the reloaded export reproduces base + adapter on a probe prompt."""

    max_logit_difference: float
    same_greedy_tokens: bool


def adapter_base(adapter_dir: Path, model: str | None) -> str | None:
    """The base to merge into: ``model`` if given, else what the manifest (or PEFT config) names."""
    if model is not None:
        return model
    manifest = read_manifest(adapter_dir)
    if manifest is not None:
        base_path = manifest.get("base_model_path")  # None: trained on the embedded default model
        if base_path is not None and not isinstance(base_path, str):
            raise BadAdapter(f"{adapter_dir}: corrupt iris_manifest.json (base_model_path is not text)")
        return base_path
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path") \
        if (adapter_dir / CONFIG_FILE).is_file() else None
    if not base:
        raise BadSetting(f"{adapter_dir}: no manifest names its base model; pass --model")
    return str(base)


def merged(adapter_dir: Path, *, model: str | None = None, quant: str = "none", dequantize: bool = False,
           trust_pickle: bool = False, device: str = "auto", paths: Paths | None = None) -> LoadedModel:
    """The base with the adapter merged in (LoRA deltas added, trained projector in place)."""
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise BadAdapter(f"{adapter_dir}: no such adapter directory")
    paths = paths or Paths.default()
    options = ModelOptions(model=adapter_base(adapter_dir, model), quant=quant, device=device)
    loaded = load(with_default_model(options, paths), paths)
    loaded.architecture.require("merging adapters")
    if loaded.quant in CPU_QUANTS:  # packed for decoding: PEFT has no full weight to add the LoRA delta to
        raise BadSetting(f"--quant {loaded.quant} packs the base for decoding on a CPU and cannot take a merge; "
                         "merge into full precision with --quant none (the default)")
    if loaded.quant == "4bit" or getattr(loaded.model, "is_loaded_in_4bit", False):
        if not dequantize:
            raise BadSetting("the base is 4-bit: merging would round the result back to 4-bit (lossy); pass "
                             "--dequantize to merge into dequantized full-precision weights, or use --quant none")
        loaded.model = loaded.model.dequantize()
        loaded.quant = "none (dequantized from 4bit)"
    drop_shipped_lora(loaded)
    name = attach_adapter(loaded, str(adapter_dir), trust_pickle=trust_pickle)
    if name in loaded.adapters:
        loaded.model = loaded.model.merge_and_unload()
        loaded.adapters.clear()
    loaded.model.eval()
    return loaded


def parts_template(template: str, image_token: str) -> str:
    """``template`` (which only takes string contents) made to accept lists of typed parts too: each message's
    parts are joined into one string first (an image part becomes ``image_token`` and a newline, a text part its
    text), then the original template renders them."""
    image = json.dumps(image_token + "\n")
    return ("{%- set ns = namespace(messages=[], text='') -%}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set ns.messages = ns.messages + [message] -%}"
            "{%- else -%}{%- set ns.text = '' -%}"
            "{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + " + image + " -%}"
            "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': ns.text}] -%}"
            "{%- endif -%}{%- endfor -%}"
            "{%- set messages = ns.messages -%}" + template)


def with_parts_template(loaded: LoadedModel) -> None:
    """Give a vision model whose template cannot render typed image parts one that can (see the module doc)."""
    processor = loaded.processor
    image_token = getattr(processor, "image_token", None)
    template = getattr(processor, "chat_template", None)
    if processor is None or not isinstance(image_token, str) or not isinstance(template, str):
        return
    if PromptRenderer(loaded.tokenizer, processor).placeholder():
        return  # it renders typed parts already
    processor.chat_template = parts_template(template, image_token)
    loaded.tokenizer.chat_template = processor.chat_template


def save_model(loaded: LoadedModel, out: Path) -> Path:
    """``save_pretrained`` the model and its processor/tokenizer into a new directory (a chat template that
    takes typed image parts included)."""
    out = Path(out).expanduser()
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BadSetting(f"{out}: already exists; choose a new --out")
        out.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(out)
        with_parts_template(loaded)
        (loaded.processor or loaded.tokenizer).save_pretrained(out)
    except OSError as exc:  # a read-only place, /proc or /sys, a full disk
        raise BadSetting(f"{out}: cannot write the model there ({exc.strerror or one_line(exc)})") from None
    return out


def merge_adapter(adapter_dir: Path, out: Path, **options: Any) -> Path:
    """Merge and save for Iris (``iris chat --model OUT``), with a manifest saying what it was made of."""
    loaded = merged(adapter_dir, **options)
    save_model(loaded, out)
    write_manifest(out, {"kind": "merged", "adapter": str(Path(adapter_dir).expanduser().resolve()),
                         "base_fingerprint": loaded.fingerprint, "quant": loaded.quant,
                         "adapter_manifest": read_manifest(Path(adapter_dir).expanduser())})
    return out


def export_adapter(adapter_dir: Path, out: Path, **options: Any) -> ExportCheck:
    """Merge, save as a plain HF model with a model card, and verify it by reloading with transformers."""
    adapter_dir = Path(adapter_dir).expanduser()
    loaded = merged(adapter_dir, **options)
    inputs = probe_inputs(loaded)
    expected = _logits(loaded.model, inputs)
    save_model(loaded, out)
    _model_card(Path(out), adapter_dir, loaded)
    del loaded
    reloaded = load_plain(Path(out))
    actual = _logits(reloaded, inputs)
    return ExportCheck(float((actual - expected).abs().max()), bool((actual.argmax(-1) == expected.argmax(-1)).all()))


def load_plain(directory: Path) -> Any:
    """Load with plain transformers, as a user of the export would (no Iris code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from assistant.architecture import is_vision_config

    loader = AutoModelForImageTextToText if is_vision_config(AutoConfig.from_pretrained(directory)) \
        else AutoModelForCausalLM
    return loader.from_pretrained(directory).eval()


def probe_inputs(loaded: LoadedModel) -> dict[str, Any]:
    """A short prompt (with a drawn image for vision models) that exercises LoRA layers and projector."""
    images: tuple[ImageAttachment, ...] = ()
    if loaded.accepts_images:
        import io
        import random

        from adapters.synth import draw_scene, random_scene
        from assistant.vision import load_image_bytes

        rng = random.Random(0)
        buffer = io.BytesIO()
        draw_scene(random_scene(rng), rng).save(buffer, format="PNG")
        images = (load_image_bytes(buffer.getvalue(), "probe.png"),)
    messages = [Message(Role.USER, PROBE_TEXT, images)]
    return PromptRenderer(loaded.tokenizer, loaded.processor).encode(messages)


def _logits(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.float().cpu()


def _model_card(out: Path, adapter_dir: Path, loaded: LoadedModel) -> None:
    manifest = read_manifest(adapter_dir) or {}
    lines = [f"# {out.name}", "", f"Merged by Iris from the adapter `{adapter_dir.name}` "
             f"(kind: {manifest.get('kind', 'lora')}) on the base `{manifest.get('base_model', loaded.name)}`.", "",
             "Load it with plain transformers (`from_pretrained`); the processor/tokenizer is included.", ""]
    if (adapter_dir / PROJECTOR_FILE).is_file():
        lines += ["The vision projector holds the trained weights.", ""]
    if manifest.get("metrics"):
        lines += [f"Training: {manifest.get('steps')} steps, final metrics {json.dumps(manifest['metrics'])}.", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
