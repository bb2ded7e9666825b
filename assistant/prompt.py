"""Messages → model inputs, through the model's own chat template.

Also counts a prompt's true token length, including what each image really
costs for the loaded processor (measured once per image and cached), and builds
the assistant-only loss mask used by training. Images are decoded through an
optional ``DecodedImageCache`` so a long-lived renderer decodes each one once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from assistant.caches import DecodedImageCache
from assistant.messages import ImageAttachment, Message, Role
from assistant.threads import one_thread
from assistant.vision import to_pil


class PromptRenderer:
    """Renders conversations for one tokenizer (text models) or processor (vision models).

    What stands for an image in the rendered text is learned once from the template itself (the
    difference between a message with and without an image part), so every family's placeholder
    (``<image>``, ``<|vision_start|><|image_pad|><|vision_end|>``, ``<start_of_image>``, ``[IMG]``, ...)
    is counted and expanded the way its processor does it.
    """

    def __init__(self, tokenizer: Any, processor: Any | None = None,
                 decoded: DecodedImageCache | None = None) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self._decode: Callable[[ImageAttachment], Any] = decoded.get if decoded is not None else to_pil
        self._image_extra: dict[str, int] = {}
        self._placeholder: str | None = None
        self._template_takes_parts: bool | None = None

    # chat structure --------------------------------------------------------

    def chat(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """Messages in the structure the chat template expects (typed parts for vision models)."""
        if self.processor is None:
            return [{"role": m.role.value, "content": m.text} for m in messages]
        if self._takes_parts():
            return [{"role": m.role.value,
                     "content": [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.text}]}
                    for m in messages]
        marker = getattr(self.processor, "image_token", None) or ""
        return [{"role": m.role.value, "content": (marker + "\n") * len(m.images) + m.text} for m in messages]

    def _takes_parts(self) -> bool:
        """Whether the template renders typed image parts; LLM templates kept by ``iris build`` do not."""
        if self._template_takes_parts is None:
            self._template_takes_parts = bool(self.placeholder())
        return self._template_takes_parts

    def placeholder(self) -> str:
        """The text the template emits for one image part ("" if it cannot render typed parts)."""
        if self._placeholder is None:
            self._placeholder = ""
            if self.processor is not None:
                with_image, without = (self._render_probe([{"type": "image"}]), self._render_probe([]))
                if with_image is not None and without is not None:
                    self._placeholder = _inserted_text(without, with_image).strip()
        return self._placeholder

    def _render_probe(self, parts: list[dict[str, Any]]) -> str | None:
        probe = [{"role": "user", "content": [*parts, {"type": "text", "text": "probe"}]}]
        try:
            assert self.processor is not None
            return str(self.processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True))
        except Exception:  # a template that concatenates strings raises TypeError/TemplateError
            return None

    def text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        return str(owner.apply_chat_template(self.chat(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt))

    # encoding and counting -------------------------------------------------

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> dict[str, Any]:
        """Tensors for ``generate``: input_ids, attention_mask and, with images, what the processor adds."""
        text = self.text(messages, add_generation_prompt)
        images = [self._decode(image) for m in messages for image in m.images]
        if self.processor is not None and images:
            with one_thread():
                return dict(self.processor(text=text, images=images, return_tensors="pt", add_special_tokens=False))
        return dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))

    def encode_expanded(self, messages: Sequence[Message], image_token_id: int) -> dict[str, Any] | None:
        """``encode``'s input_ids and attention_mask without running the processor on the images: each image's
        placeholder token repeated as often as the processor expands it (measured once per image), so an image
        already in the history is not decoded again. None where an image's placeholder is not that one token
        repeated (the processor's own ``encode`` is needed there)."""
        import torch

        if self.tokenizer(self._marker(), add_special_tokens=False)["input_ids"] != [image_token_id]:
            return None
        images = iter([image for m in messages for image in m.images])
        ids: list[int] = []
        for token in self.tokenizer(self.text(messages), add_special_tokens=False)["input_ids"]:
            image = next(images, None) if token == image_token_id else None
            if token == image_token_id and image is None:
                return None  # more placeholders than images: let the processor report it
            ids.extend([token] * (1 + self._expansion(image)) if image is not None else [token])
        if next(images, None) is not None:
            return None
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def count(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> int:
        """True prompt length in tokens, images included: equal to ``encode``'s length."""
        if not messages:
            return 0
        ids = self.tokenizer(self.text(messages, add_generation_prompt), add_special_tokens=False)["input_ids"]
        return len(ids) + sum(self._expansion(image) for m in messages for image in m.images)

    def image_tokens(self, image: ImageAttachment) -> int:
        """Tokens this image occupies once the processor expands its placeholder."""
        marker = self._marker()
        if not marker:
            return 0
        return self._expansion(image) + len(self.tokenizer(marker, add_special_tokens=False)["input_ids"])

    def _marker(self) -> str:
        """What stands for one image in rendered text: the template's placeholder or the processor's token."""
        if self.processor is None:
            return ""
        return (self.placeholder() if self._takes_parts() else "") or getattr(self.processor, "image_token", "") or ""

    def _expansion(self, image: ImageAttachment) -> int:
        """Tokens the processor adds when it expands this image's placeholder (measured once per image)."""
        marker = self._marker()
        if not marker:
            return 0
        if image.sha256 not in self._image_extra:
            assert self.processor is not None
            with one_thread():
                expanded = self.processor(text=marker, images=[self._decode(image)], return_tensors="pt",
                                          add_special_tokens=False)
            plain = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
            self._image_extra[image.sha256] = int(expanded["input_ids"].shape[-1]) - len(plain)
        return self._image_extra[image.sha256]

    # training --------------------------------------------------------------

    def training_example(self, messages: Sequence[Message]) -> dict[str, Any]:
        """Encoded conversation with ``labels`` = -100 everywhere except assistant tokens.

        Each assistant turn's span is found by rendering the conversation up to
        and including that turn, so the mask follows whatever the template emits.
        """
        import torch

        full = self.encode(messages, add_generation_prompt=False)
        ids = full["input_ids"][0]
        labels = torch.full_like(ids, -100)
        for index, message in enumerate(messages):
            if message.role is not Role.ASSISTANT:
                continue
            start = self.count(messages[:index], add_generation_prompt=True)
            end = self.count(messages[: index + 1], add_generation_prompt=False)
            labels[start:end] = ids[start:end]
        full["labels"] = labels.unsqueeze(0)
        return full


def _inserted_text(shorter: str, longer: str) -> str:
    """What was inserted into ``shorter`` to give ``longer`` (common prefix and suffix removed)."""
    start = 0
    while start < len(shorter) and shorter[start] == longer[start]:
        start += 1
    end = 0
    while end < len(shorter) - start and shorter[-1 - end] == longer[-1 - end]:
        end += 1
    return longer[start:len(longer) - end]
