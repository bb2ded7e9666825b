"""The dialogue manager every front end talks to, and the backend protocol it drives.

One turn: validate images → store the user message → fit the history into the
context window (oldest images first, then oldest turns; never the system prompt
or the newest message) → stream the backend's text → store the answer, marked
interrupted when it was cut short.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from assistant.config import GenerationOptions
from assistant.errors import BadAdapter, ContextTooLong, ImagesNotSupported
from assistant.messages import BASE_MODEL, ImageAttachment, Message, Role
from assistant.store import ConversationRecord, Store


class ChatBackend(Protocol):
    """What the manager needs from a model; the local engine and test fakes implement it."""

    accepts_images: bool
    context_length: int

    def count_tokens(self, messages: Sequence[Message]) -> int: ...

    def image_tokens(self, image: ImageAttachment) -> int: ...

    def adapter_names(self) -> list[str]: ...

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class FittedPrompt:
    messages: list[Message]
    tokens: int
    notices: list[str] = field(default_factory=list)


def fit_to_context(messages: Sequence[Message], backend: ChatBackend, budget: int) -> FittedPrompt:
    """Drop the oldest images, then the oldest turns, until the prompt fits ``budget`` tokens."""
    kept = list(messages)
    tokens = backend.count_tokens(kept)
    notices: list[str] = []
    first_droppable = 1 if kept and kept[0].role is Role.SYSTEM else 0
    dropped_images = 0
    for index in range(first_droppable, len(kept) - 1):
        if tokens <= budget:
            break
        if kept[index].images:
            dropped_images += len(kept[index].images)
            kept[index] = kept[index].without_images()
            tokens = backend.count_tokens(kept)
    if dropped_images:
        notices.append(f"dropped {dropped_images} older image(s) to fit the context window")
    dropped_messages = 0
    while tokens > budget and first_droppable < len(kept) - 1:
        # Drop a whole exchange (user + its answer) so roles keep alternating.
        del kept[first_droppable]
        dropped_messages += 1
        if first_droppable < len(kept) - 1 and kept[first_droppable].role is Role.ASSISTANT:
            del kept[first_droppable]
            dropped_messages += 1
        tokens = backend.count_tokens(kept)
    if dropped_messages:
        notices.append(f"dropped {dropped_messages} oldest message(s) to fit the context window")
    if tokens > budget:
        newest = kept[-1]
        if newest.images:
            raise ContextTooLong(
                f"this message needs {tokens} tokens with its {len(newest.images)} image(s); the model has room "
                f"for {budget} (context minus max_new_tokens): send fewer images or lower max_new_tokens")
        raise ContextTooLong(f"this message needs {tokens} tokens but the model has room for {budget}: "
                             "shorten it or lower max_new_tokens")
    return FittedPrompt(kept, tokens, notices)


def speaker_labelled(messages: Sequence[Message]) -> list[Message]:
    """Prefix user text with its author's name when several humans share a conversation."""
    authors = {m.author for m in messages if m.role is Role.USER and m.author}
    if not authors:
        return list(messages)
    return [Message(m.role, f"{m.author}: {m.text}", m.images, m.interrupted, m.author, m.id)
            if m.role is Role.USER and m.author else m for m in messages]


class Turn:
    """One answer being generated. Iterate for text chunks; ``cancel()`` from any thread stops it.

    The answer is committed when iteration ends for any reason: exhausted,
    cancelled, closed early, or interrupted by an exception (e.g. Ctrl+C).
    """

    def __init__(self, manager: DialogueManager, conversation_id: int, user_message_id: int,
                 prompt: FittedPrompt, options: GenerationOptions, adapter: str | None) -> None:
        self.conversation_id = conversation_id
        self.user_message_id = user_message_id
        self.notices = prompt.notices
        self.prompt_tokens = prompt.tokens
        self.text = ""
        self.interrupted = False
        self.assistant_message_id: int | None = None
        self._manager = manager
        self._prompt = prompt
        self._options = options
        self._adapter = adapter
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Turn can be iterated only once")
        self._started = True
        chunks = self._manager.backend.stream(self._prompt.messages, self._options, self._adapter)
        finished = False
        try:
            for chunk in chunks:
                if self._cancel.is_set():
                    break
                self.text += chunk
                yield chunk
                if self._cancel.is_set():
                    break
            else:
                finished = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            self.interrupted = not finished
            self.assistant_message_id = self._manager._store.add_message(
                self.conversation_id,
                Message(Role.ASSISTANT, self.text, interrupted=self.interrupted),
                parent_id=self.user_message_id)

    def run(self) -> str:
        """Generate to the end without streaming; returns the whole answer."""
        for _ in self:
            pass
        return self.text


class DialogueManager:
    """Conversations over one backend and one store; shared by the CLI and the Discord bot."""

    def __init__(self, backend: ChatBackend, store: Store, *, default_system_prompt: str | None = None,
                 default_options: GenerationOptions | None = None) -> None:
        self.backend = backend
        self._store = store
        self.default_system_prompt = default_system_prompt
        self.default_options = default_options or GenerationOptions()

    @property
    def store(self) -> Store:
        return self._store

    # conversations -------------------------------------------------------

    def new_conversation(self, *, title: str = "", system_prompt: str | None = None,
                         options: GenerationOptions | None = None, adapter: str | None = None,
                         source: str = "cli") -> int:
        if adapter is not None:
            self._check_adapter(adapter)
        return self._store.create_conversation(
            title=title, system_prompt=self.default_system_prompt if system_prompt is None else system_prompt,
            options=(options or self.default_options).as_dict(), adapter=adapter, source=source)

    def conversation(self, conversation_id: int) -> ConversationRecord:
        return self._store.conversation(conversation_id)

    def history(self, conversation_id: int, head_message_id: int | None = None) -> list[Message]:
        return self._store.thread(conversation_id, head_message_id)

    def options(self, conversation_id: int) -> GenerationOptions:
        return GenerationOptions.from_dict(self.conversation(conversation_id).options)

    def set_option(self, conversation_id: int, name: str, value: str) -> GenerationOptions:
        """Parse and store one sampling option; ``BadSetting`` leaves the conversation unchanged."""
        updated = self.options(conversation_id).with_setting(name, value)
        self._store.update_conversation(conversation_id, options=updated.as_dict())
        return updated

    def set_system_prompt(self, conversation_id: int, text: str | None) -> None:
        self._store.update_conversation(conversation_id, system_prompt=text or None)

    def set_adapter(self, conversation_id: int, adapter: str | None) -> None:
        """Use ``adapter`` in this conversation: a loaded adapter's name, ``BASE_MODEL`` for none, or None for
        the backend's active adapter."""
        if adapter is not None:
            self._check_adapter(adapter)
        self._store.update_conversation(conversation_id, adapter=adapter)

    def _check_adapter(self, adapter: str) -> None:
        names = self.backend.adapter_names()
        if adapter not in names and adapter != BASE_MODEL:
            known = ", ".join(names) if names else "none loaded (start with --adapter PATH)"
            raise BadAdapter(f"unknown adapter {adapter!r}; loaded: {known}")

    # turns ---------------------------------------------------------------

    def check_images(self, images: Sequence[ImageAttachment]) -> None:
        if images and not self.backend.accepts_images:
            raise ImagesNotSupported("this model reads text only; load a vision model to send images")

    def image_token_cost(self, image: ImageAttachment) -> int:
        self.check_images([image])
        return self.backend.image_tokens(image)

    def prompt_messages(self, conversation_id: int, head_message_id: int | None = None) -> list[Message]:
        """The messages as the model sees them: system prompt first, speakers labelled."""
        record = self.conversation(conversation_id)
        messages = self.history(conversation_id, head_message_id)
        if record.system_prompt:
            messages.insert(0, Message(Role.SYSTEM, record.system_prompt))
        return speaker_labelled(messages)

    def token_count(self, conversation_id: int) -> int:
        return self.backend.count_tokens(self.prompt_messages(conversation_id))

    def send(self, conversation_id: int, text: str, images: Sequence[ImageAttachment] = (), *,
             author: str | None = None, parent_id: int | None = None) -> Turn:
        """Store the user's message and return the ``Turn`` that will answer it.

        Errors (images to a text model, a message that cannot fit) are raised
        before anything is stored, so the conversation stays as it was.
        """
        self.check_images(images)
        record = self.conversation(conversation_id)
        options = GenerationOptions.from_dict(record.options)
        budget = self.backend.context_length - options.max_new_tokens
        user = Message(Role.USER, text, tuple(images), author=author)
        base_head = parent_id if parent_id is not None else record.head_message_id
        candidate = self.prompt_messages(conversation_id, base_head) if base_head is not None else (
            [Message(Role.SYSTEM, record.system_prompt)] if record.system_prompt else [])
        fitted = fit_to_context([*candidate, *speaker_labelled([user])], self.backend, budget)
        user_id = self._store.add_message(conversation_id, user, parent_id=base_head, use_head=False)
        return Turn(self, conversation_id, user_id, fitted, options, record.adapter)
