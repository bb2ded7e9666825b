"""Messages → model inputs, through the model's own chat template.

Also counts a prompt's true token length, including what each image really
costs for the loaded processor (measured once per image and cached), and builds
the assistant-only loss mask used by training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from assistant.messages import ImageAttachment, Message, Role
from assistant.vision import to_pil


class PromptRenderer:
    """Renders conversations for one tokenizer (text models) or processor (vision models)."""

    def __init__(self, tokenizer: Any, processor: Any | None = None) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self._image_cost: dict[str, int] = {}
        self._template_takes_parts: bool | None = None

    @property
    def image_token(self) -> str | None:
        return getattr(self.processor, "image_token", None) if self.processor is not None else None

    # chat structure --------------------------------------------------------

    def chat(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """Messages in the structure the chat template expects (typed parts for vision models)."""
        if self.processor is None:
            return [{"role": m.role.value, "content": m.text} for m in messages]
        if self._takes_parts():
            return [{"role": m.role.value,
                     "content": [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.text}]}
                    for m in messages]
        marker = self.image_token or ""
        return [{"role": m.role.value, "content": (marker + "\n") * len(m.images) + m.text} for m in messages]

    def _takes_parts(self) -> bool:
        """Whether the template renders typed content parts; LLM templates kept by ``iris build`` do not."""
        if self._template_takes_parts is None and self.processor is not None:
            probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
            try:
                rendered = self.processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
                self._template_takes_parts = bool(self.image_token) and self.image_token in rendered
            except Exception:  # a template that concatenates strings raises TypeError/TemplateError
                self._template_takes_parts = False
        return bool(self._template_takes_parts)

    def text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        return str(owner.apply_chat_template(self.chat(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt))

    # encoding and counting -------------------------------------------------

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> dict[str, Any]:
        """Tensors for ``generate``: input_ids, attention_mask and (with images) pixel values."""
        text = self.text(messages, add_generation_prompt)
        images = [to_pil(image) for m in messages for image in m.images]
        if self.processor is not None and images:
            return dict(self.processor(text=text, images=images, return_tensors="pt"))
        return dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))

    def count(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> int:
        """True prompt length in tokens, images included."""
        if not messages:
            return 0
        ids = self.tokenizer(self.text(messages, add_generation_prompt), add_special_tokens=False)["input_ids"]
        return len(ids) + sum(self.image_tokens(image) - self._placeholder_tokens()
                              for m in messages for image in m.images)

    def _placeholder_tokens(self) -> int:
        marker = self.image_token
        return len(self.tokenizer(marker, add_special_tokens=False)["input_ids"]) if marker else 0

    def image_tokens(self, image: ImageAttachment) -> int:
        """Tokens this image occupies once the processor expands its placeholder."""
        if self.processor is None or not self.image_token:
            return 0
        if image.sha256 not in self._image_cost:
            expanded = self.processor(text=self.image_token, images=[to_pil(image)], return_tensors="pt")
            self._image_cost[image.sha256] = int(expanded["input_ids"].shape[-1])
        return self._image_cost[image.sha256]

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
