"""The dialogue manager every front end talks to, and the backend protocol it drives.

One turn: validate images → fit the history into the context window (oldest
images first, then oldest turns; never the system prompt or the newest message)
→ store the user message with an empty answer after it → stream the backend's
text, saving the answer as it grows (at most every ``Turn.SAVE_EVERY_S``) → store
the whole answer, marked interrupted when it was cut short.

Branches: ``retry`` answers the last user message again and ``edit`` sends a new
version of it; either leaves the old messages on their own branch of the stored
tree and makes the new one current (``branches``, ``switch_branch`` move between
them).

Adapters can be attached to the running model and detached again
(``load_adapter``, ``unload_adapter``); a conversation that had chosen one that is
detached falls back to the backend's active adapter.

Fitting costs O(history) once per turn: each message's token cost is measured
once (``PromptCosts``), exchanges are dropped arithmetically, and only the fitted
prompt is counted exactly.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from assistant.config import GenerationOptions
from assistant.errors import BadAdapter, ContextTooLong, ImagesNotSupported, IrisError
from assistant.messages import BASE_MODEL, ImageAttachment, Message, Role, valid_text
from assistant.store import ConversationRecord, Fork, HeadMoved, Store


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

    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Attach the PEFT adapter at ``path`` as ``name`` (default: from the directory); returns the name.
        Checked like one given at start; ``BadAdapter`` leaves the model as it was."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Detach a loaded adapter; ``BadAdapter`` if there is none by that name."""
        ...


class NoBranch(IrisError):
    """A retry, edit or branch switch that the conversation has nothing for (no message yet, no such branch)."""


@dataclass
class FittedPrompt:
    messages: list[Message]
    tokens: int
    notices: list[str] = field(default_factory=list)


_PROBE_USER = Message(Role.USER, "hi")
_PROBE_ANSWER = Message(Role.ASSISTANT, "hello")


class PromptCosts:
    """What each message adds to a prompt, in the backend's tokens, measured once per message content.

    A message's cost is what it adds to a short valid conversation (a system prompt before a user message, a user
    message after an exchange, an answer after a user message), so the template's fixed parts (BOS, a default
    system prompt, the generation prompt) are counted once, in ``base``. Their sum is exact for backends that
    count additively and close for chat templates; ``fit_to_context`` checks its result with one exact count.
    """

    def __init__(self, backend: ChatBackend, max_entries: int = 100_000) -> None:
        self.backend = backend
        self.max_entries = max_entries
        self._costs: OrderedDict[tuple[object, ...], int] = OrderedDict()
        self._contexts: dict[Role, tuple[list[Message], list[Message], int]] = {}
        self._base: int | None = None
        self._lock = threading.Lock()

    def of(self, message: Message) -> int:
        key = (message.role, hash(message.text), len(message.text), tuple(i.sha256 for i in message.images))
        with self._lock:
            cost = self._costs.get(key)
            if cost is not None:
                self._costs.move_to_end(key)
                return cost
        before, after, count = self._context(message.role)
        cost = self.backend.count_tokens([*before, message, *after]) - count
        with self._lock:
            self._costs[key] = cost
            while len(self._costs) > self.max_entries:
                self._costs.popitem(last=False)
        return cost

    def base(self) -> int:
        """Tokens of the template's fixed parts (a prompt's count minus its messages' costs)."""
        if self._base is None:
            self._base = self.backend.count_tokens([_PROBE_USER]) - self.of(_PROBE_USER)
        return self._base

    def _context(self, role: Role) -> tuple[list[Message], list[Message], int]:
        """Messages around a message of ``role`` that make a conversation every template accepts, and their count."""
        if role not in self._contexts:
            before, after = {Role.SYSTEM: ([], [_PROBE_USER]), Role.USER: ([_PROBE_USER, _PROBE_ANSWER], []),
                             Role.ASSISTANT: ([_PROBE_USER], [])}[role]
            self._contexts[role] = (before, after, self.backend.count_tokens([*before, *after]))
        return self._contexts[role]


def fit_to_context(messages: Sequence[Message], backend: ChatBackend, budget: int,
                   costs: PromptCosts | None = None) -> FittedPrompt:
    """Drop the oldest images, then the oldest turns, until the prompt fits ``budget`` tokens.

    What to drop is worked out from per-message costs (``costs`` keeps them across turns), walking back from the
    newest message so that only messages that may be kept are measured; the fitted prompt is then counted exactly
    once, and only if the estimate fell short is more dropped, counting exactly each time.
    """
    costs = costs or PromptCosts(backend)
    kept = list(messages)
    first = 1 if kept and kept[0].role is Role.SYSTEM else 0
    newest = len(kept) - 1
    dropped_images = 0
    if newest >= first:
        pinned = [*kept[:first], kept[newest]] if newest > 0 else kept[:1]
        total = costs.base() + sum(costs.of(m) for m in pinned)
        start = newest  # how far back the history's text fits
        while start > first and total + costs.of(_plain(kept[start - 1])) <= budget:
            start -= 1
            total += costs.of(_plain(kept[start]))
        with_images = [index for index in range(first, newest) if kept[index].images]
        if start > first:  # even without images the history is too long: every older image goes, then exchanges
            dropped_images = sum(len(kept[index].images) for index in with_images)
            start = _exchange_boundary(kept, first, newest, start)
            image_cursor = newest
        else:  # the text fits: drop the oldest images while the images make it too long
            total += sum(costs.of(kept[index]) - costs.of(_plain(kept[index])) for index in with_images)
            image_cursor = first
            for index in with_images:
                if total <= budget:
                    break
                total -= costs.of(kept[index]) - costs.of(_plain(kept[index]))
                dropped_images += len(kept[index].images)
                image_cursor = index + 1
        for index in range(start, image_cursor):
            kept[index] = _plain(kept[index])
    else:
        start = image_cursor = first
    dropped_messages = start - first

    def shed() -> bool:
        """Drop the oldest image left, else the oldest exchange (the estimate fell short); False: nothing left."""
        nonlocal start, image_cursor, dropped_images, dropped_messages
        while image_cursor < newest and not kept[image_cursor].images:
            image_cursor += 1
        if image_cursor < newest:
            dropped_images += len(kept[image_cursor].images)
            kept[image_cursor] = _plain(kept[image_cursor])
            return True
        if start >= newest:
            return False
        after = _exchange_boundary(kept, start, newest, start + 1)
        dropped_messages += after - start
        start = after
        return True

    tokens = backend.count_tokens(kept[:first] + kept[start:])
    while tokens > budget and shed():
        tokens = backend.count_tokens(kept[:first] + kept[start:])
    kept = kept[:first] + kept[start:]
    notices: list[str] = []
    if dropped_images:
        notices.append(f"dropped {dropped_images} older image(s) to fit the context window")
    if dropped_messages:
        notices.append(f"dropped {dropped_messages} oldest message(s) to fit the context window")
    if tokens > budget:
        last = kept[-1]
        if last.images:
            raise ContextTooLong(
                f"this message needs {tokens} tokens with its {len(last.images)} image(s); the model has room "
                f"for {budget} (context minus max_new_tokens): send fewer images or lower max_new_tokens")
        raise ContextTooLong(f"this message needs {tokens} tokens but the model has room for {budget}: "
                             "shorten it or lower max_new_tokens")
    return FittedPrompt(kept, tokens, notices)


def _plain(message: Message) -> Message:
    return message.without_images() if message.images else message


def _exchange_boundary(messages: Sequence[Message], first: int, newest: int, at_least: int) -> int:
    """Where the kept history starts when whole exchanges are dropped from ``first`` until it starts at or after
    ``at_least``: a user message and its answer go together, so roles keep alternating."""
    position = first
    while position < at_least:
        position += 1
        if position < newest and messages[position].role is Role.ASSISTANT:
            position += 1
    return position


def speaker_labelled(messages: Sequence[Message]) -> list[Message]:
    """Prefix user text with its author's name when several humans share a conversation."""
    authors = {m.author for m in messages if m.role is Role.USER and m.author}
    if not authors:
        return list(messages)
    return [Message(m.role, f"{m.author}: {m.text}", m.images, m.interrupted, m.author, m.id)
            if m.role is Role.USER and m.author else m for m in messages]


class Turn:
    """One answer being generated. Iterate for text chunks; ``cancel()`` from any thread stops it.

    The answer's row exists from the start (empty, marked interrupted); its text is saved as it streams, at
    most every ``SAVE_EVERY_S`` seconds, and finally when iteration ends for any reason: exhausted (then it is
    unmarked), cancelled, closed early, or interrupted by an exception (e.g. Ctrl+C).
    """

    SAVE_EVERY_S = 0.5

    def __init__(self, manager: DialogueManager, conversation_id: int, user_message_id: int,
                 assistant_message_id: int, prompt: FittedPrompt, options: GenerationOptions,
                 adapter: str | None) -> None:
        self.conversation_id = conversation_id
        self.user_message_id = user_message_id
        self.assistant_message_id = assistant_message_id
        self.notices = prompt.notices
        self.prompt_tokens = prompt.tokens
        self.text = ""
        self.interrupted = False
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
        store = self._manager.store
        chunks = self._manager.backend.stream(self._prompt.messages, self._options, self._adapter)
        finished = False
        saved_at: float | None = None
        try:
            for chunk in chunks:
                if self._cancel.is_set():
                    break
                self.text += chunk
                now = time.monotonic()
                if saved_at is None or now - saved_at >= self.SAVE_EVERY_S:
                    store.save_progress(self.assistant_message_id, self.text)
                    saved_at = now
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
            store.finish_answer(self.assistant_message_id, self.text, interrupted=self.interrupted)

    def run(self) -> str:
        """Generate to the end without streaming; returns the whole answer."""
        for _ in self:
            pass
        return self.text


class DialogueManager:
    """Conversations over one backend and one store; shared by the CLI and the Discord bot."""

    SEND_ATTEMPTS = 10  # preparations of one message while other front ends keep extending its conversation

    def __init__(self, backend: ChatBackend, store: Store, *, default_system_prompt: str | None = None,
                 default_options: GenerationOptions | None = None) -> None:
        self.backend = backend
        self._store = store
        self.default_system_prompt = default_system_prompt
        self.default_options = default_options or GenerationOptions()
        self._costs = PromptCosts(backend)

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
        return self._prompt_history(self.conversation(conversation_id), head_message_id)

    def _prompt_history(self, record: ConversationRecord, head_message_id: int | None, *,
                        root: bool = False) -> list[Message]:
        """System prompt and the thread to ``head_message_id`` (default: the head; with ``root``, no message)."""
        head = None if root else head_message_id if head_message_id is not None else record.head_message_id
        messages = self.history(record.id, head) if head is not None else []
        if record.system_prompt:
            messages.insert(0, Message(Role.SYSTEM, record.system_prompt))
        return speaker_labelled(messages)

    def token_count(self, conversation_id: int) -> int:
        return self.backend.count_tokens(self.prompt_messages(conversation_id))

    def send(self, conversation_id: int, text: str, images: Sequence[ImageAttachment] = (), *,
             author: str | None = None, parent_id: int | None = None) -> Turn:
        """Store the user's message (after ``parent_id``, default the head) and return the ``Turn`` that will
        answer it.

        Errors (images to a text model, a message that cannot fit) are raised
        before anything is stored, so the conversation stays as it was. If another
        front end extends the conversation meanwhile, the prompt is built again from
        the longer history.
        """
        self.check_images(images)
        author = None if author is None else valid_text(author)
        user = Message(Role.USER, valid_text(text), tuple(images), author=author)
        return self._start(conversation_id, lambda record: (
            user, parent_id if parent_id is not None else record.head_message_id))

    def retry(self, conversation_id: int, *, answer_id: int | None = None) -> Turn:
        """Answer the current thread's last user message again. The new answer is a sibling of the earlier
        one(s), which stay on their branch, and becomes the head; the conversation's current options and
        adapter apply, so ``/set temperature`` before a retry changes it. With ``answer_id``, only while that
        answer is still the head (a retry asked for on one answer never regenerates a later one)."""

        def question(record: ConversationRecord) -> tuple[None, int]:
            if answer_id is not None and record.head_message_id != answer_id:
                raise NoBranch("that answer is no longer the last one in its conversation")
            thread = self.history(record.id, record.head_message_id) if record.head_message_id is not None else []
            asked = [m for m in thread if m.role is Role.USER]
            if not asked:
                raise NoBranch("nothing to answer again yet: send a message first")
            return None, int(asked[-1].id or 0)

        return self._start(conversation_id, question)

    def edit(self, conversation_id: int, text: str) -> Turn:
        """Send ``text`` in place of the current thread's last user message (keeping its images and author) and
        answer it. The new message is a sibling of the old one, which stays on its branch with its answers."""
        text = valid_text(text)

        def replacement(record: ConversationRecord) -> tuple[Message, int | None]:
            thread = self.history(record.id, record.head_message_id) if record.head_message_id is not None else []
            last = max((index for index, m in enumerate(thread) if m.role is Role.USER), default=None)
            if last is None:
                raise NoBranch("nothing to edit yet: send a message first")
            old = thread[last]
            return Message(Role.USER, text, old.images, author=old.author), thread[last - 1].id if last else None

        return self._start(conversation_id, replacement)

    def branches(self, conversation_id: int) -> list[Fork]:
        """Where the current thread branches, oldest first (``Store.forks``)."""
        self.conversation(conversation_id)
        return self._store.forks(conversation_id)

    def switch_branch(self, conversation_id: int, message_id: int) -> list[Message]:
        """Make the branch through stored message ``message_id`` current (the head moves to its newest message);
        returns the new thread."""
        head = self._store.switch_branch(conversation_id, message_id)
        return self.history(conversation_id, head)

    # adapters --------------------------------------------------------------

    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Attach a PEFT adapter to the running model for every conversation to choose; returns its name. The
        backend checks it like one given at start and leaves the model untouched when it refuses."""
        return self.backend.load_adapter(path, name)

    def unload_adapter(self, name: str) -> int:
        """Detach adapter ``name``. Conversations that had chosen it fall back to the backend's active adapter
        (as if they had never chosen one), so none is left naming an adapter that is gone; returns how many."""
        self.backend.unload_adapter(name)
        return self._store.clear_adapter(name)

    def _start(self, conversation_id: int,
               prepare: Callable[[ConversationRecord], tuple[Message | None, int | None]]) -> Turn:
        """Store a new user message (or, when ``prepare`` gives None, only a new answer) after the parent that
        ``prepare`` picks from the conversation as it is now, and return the Turn answering it. When another
        front end moves the head meanwhile, ``prepare`` runs again on the longer history."""
        attempts = 0
        while True:
            record = self.conversation(conversation_id)
            user, parent = prepare(record)
            options = GenerationOptions.from_dict(record.options)
            budget = self.backend.context_length - options.max_new_tokens
            history = self._prompt_history(record, parent, root=parent is None)
            prompt = [*history, *speaker_labelled([user])] if user is not None else history
            fitted = fit_to_context(prompt, self.backend, budget, self._costs)
            try:
                if user is None:
                    assert parent is not None
                    user_id = parent
                    answer_id = self._store.add_answer(conversation_id, parent, expected_head=record.head_message_id)
                else:
                    user_id, answer_id = self._store.add_exchange(conversation_id, user, parent,
                                                                  expected_head=record.head_message_id)
            except HeadMoved:
                attempts += 1
                if attempts == self.SEND_ATTEMPTS:
                    raise
                continue
            return Turn(self, conversation_id, user_id, answer_id, fitted, options, record.adapter)
