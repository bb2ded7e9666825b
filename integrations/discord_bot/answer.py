"""Answering one Discord message: images, queue, generation in a worker thread, streamed reply.

The device is held only while the model generates; showing the text is paced
per channel and may finish after the next user's generation has started. Every
way this can go wrong ends as a visible ⚠️ line in the reply, and is logged with
ids but never with message contents.

Where a channel has ``auto_thread`` on, a mention that starts something new opens a
thread on the message and the answer and its conversation live there. A 🔁 on an
answer regenerates it (``regenerate``): a new reply through the same queue, the old
answer kept on its own branch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import discord

from assistant.dialogue import DialogueManager, Turn
from assistant.errors import IrisError
from assistant.messages import ImageAttachment
from assistant.vision import load_image_bytes
from integrations.discord_bot.conversations import Asked, Conversations, Target
from integrations.discord_bot.queue import FairQueue, QueueRefused, Ticket
from integrations.discord_bot.settings import DiscordSettings
from integrations.discord_bot.streaming import ChannelPacer, ReplyStream
from integrations.discord_bot.threads import thread_name

log = logging.getLogger("iris.discord")

STOPPED = "⏹ stopped."
SHUTTING_DOWN = "⏹ interrupted: Iris is shutting down."
FAILED = "⚠️ something went wrong while answering (it has been logged); please try again."
NO_THREAD = "⚠️ could not open a thread here (Iris needs the Create Public Threads permission); answering here."


@dataclass(eq=False)
class Job:
    """One request in flight, so ⏹ and /stop can find and stop it. ``channel`` is where the answer shows and the
    conversation lives: the trigger's channel, or a thread opened for it."""

    user_id: int
    trigger: discord.Message
    channel: Any = None
    ticket: Ticket | None = None
    turn: Turn | None = None
    stream: ReplyStream | None = None
    stop_note: str | None = None
    target: Target | None = None

    def __post_init__(self) -> None:
        if self.channel is None:
            self.channel = self.trigger.channel

    @property
    def channel_id(self) -> int:
        return int(self.channel.id)

    def shows(self, message_id: int) -> bool:
        """Whether ``message_id`` is the user's message or one of the bot's replies to it."""
        replies = self.stream.messages if self.stream is not None else []
        return message_id == self.trigger.id or any(m.id == message_id for m in replies)


class _Display:
    """The latest text a reply should show; one task renders it at the channel pacer's speed.

    Queue positions and streamed text only *set* the text, so nothing that holds
    the device ever waits for Discord; intermediate states are coalesced.
    """

    def __init__(self, stream: ReplyStream) -> None:
        self.stream = stream
        self.text = ""
        self.final = False
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    def set(self, text: str, *, final: bool = False) -> None:
        self.text, self.final = text, final
        self._changed.set()

    async def finished(self) -> None:
        """Until the final text is on Discord (re-raises a failure to show it)."""
        await self._task

    def abandon(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            text, final = self.text, self.final
            await self.stream.show(text, final=final)
            if final:
                return


def _generate(turn: Turn, on_chunk: Callable[[str], None], loop: asyncio.AbstractEventLoop) -> Exception | None:
    """Worker thread: run the turn (committed when it ends), forwarding text; returns its failure if any."""
    try:
        for chunk in turn:
            loop.call_soon_threadsafe(on_chunk, chunk)
    except Exception as exc:  # the Turn has already committed what it had, marked interrupted
        return exc
    return None


def reply_reference(message: discord.Message) -> int | None:
    """The id of the message this one replies to in its own channel; a forward, or a reference into another
    channel, is not a reply whose conversation may be continued (or quoted) here."""
    reference = message.reference
    if reference is None or reference.message_id is None or reference.type is not discord.MessageReferenceType.default:
        return None
    return reference.message_id if reference.channel_id == message.channel.id else None


def prompt_text(message: discord.Message, bot_user_id: int) -> str:
    """The message as the model should read it: without the bot's own mention."""
    return re.sub(rf"<@!?{bot_user_id}>", "", message.content).strip()


class Answerer:
    """Runs answers for the bot; one instance per bot, owning the queue and the generation thread."""

    def __init__(self, manager: DialogueManager, settings: DiscordSettings, *,
                 max_image_bytes: int | None = None, max_image_pixels: int | None = None) -> None:
        self.manager = manager
        self.settings = settings
        self.conversations = Conversations(manager)
        self.queue = FairQueue(max_waiting=settings.max_queue, per_user_pending=settings.per_user_queue,
                               rate_limit=settings.rate_limit, rate_window_s=settings.rate_window_s)
        self.pacer = ChannelPacer(settings.edits_per_window, settings.edit_window_s)
        self.jobs: set[Job] = set()
        self.closing = False
        self._max_bytes = min(settings.max_image_bytes, max_image_bytes or settings.max_image_bytes)
        self._max_pixels = min(settings.max_image_pixels, max_image_pixels or settings.max_image_pixels)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iris-generate")

    # stopping --------------------------------------------------------------

    def stop(self, job: Job, note: str = STOPPED) -> None:
        """Stop a job: out of the queue if waiting, else its turn is cancelled (kept, marked interrupted)."""
        job.stop_note = job.stop_note or note
        if job.turn is not None:
            job.turn.cancel()
        elif job.ticket is not None:
            self.queue.cancel(job.ticket)

    async def shutdown(self, tasks: set[asyncio.Task[None]], grace_s: float) -> None:
        """Refuse new work, drop the queue, give the running answer ``grace_s`` to finish, then cut it."""
        self.closing = True
        for job in list(self.jobs):
            if job.turn is None:
                self.stop(job, SHUTTING_DOWN)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for job in list(self.jobs):
                self.stop(job, SHUTTING_DOWN)
            if pending:
                await asyncio.wait(pending)
        self._executor.shutdown(wait=True)

    # answering -------------------------------------------------------------

    async def answer(self, message: discord.Message, bot_user_id: int) -> None:
        """Answer ``message`` in place (or in a thread opened on it); never raises (failures become a ⚠️ reply and
        a log line)."""
        job = Job(message.author.id, message)
        job.stream = ReplyStream(message, self.pacer)
        await self._guarded(job, self._answer(job, message, bot_user_id))

    async def regenerate(self, anchor: discord.Message, channel: Any, asked: Asked, conversation_id: int,
                         answer_id: int) -> None:
        """Answer the question behind stored answer ``answer_id`` again (🔁), as a new reply to ``anchor`` in
        ``channel``, while that answer is still the conversation's last; never raises."""
        job = Job(asked.user_id, anchor, channel)
        job.stream = ReplyStream(anchor, self.pacer, channel=channel)

        async def begin() -> Turn:
            retry = functools.partial(self.manager.retry, conversation_id, answer_id=answer_id)
            turn = await asyncio.get_running_loop().run_in_executor(self._executor, retry)
            self.conversations.remember_asker(turn.assistant_message_id, asked)
            return turn

        await self._guarded(job, self._queued(job, "", begin))

    async def run_on_device(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the generation thread, between answers (loading an adapter changes the model)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _guarded(self, job: Job, work: Awaitable[None]) -> None:
        assert job.stream is not None
        message = job.trigger
        self.jobs.add(job)
        context = {"guild": getattr(message.guild, "id", None), "channel": job.channel_id,
                   "user": job.user_id, "message": message.id}
        try:
            await work
        except Exception:
            log.exception("answer failed %s", context)
            with contextlib.suppress(discord.HTTPException):
                await job.stream.show(FAILED, final=True)
        finally:
            self.jobs.discard(job)
            if job.turn is not None:
                job.turn.cancel()  # no-op once finished; stops a generation nobody is showing
            if job.ticket is not None:
                self.queue.cancel(job.ticket)
                self.queue.release(job.ticket)

    async def _answer(self, job: Job, message: discord.Message, bot_user_id: int) -> None:
        assert job.stream is not None
        stream = job.stream
        if self.closing:
            await stream.show(f"⚠️ {SHUTTING_DOWN.removeprefix('⏹ interrupted: ')}", final=True)
            return
        text = prompt_text(message, bot_user_id)
        quoted, images, warnings = await self._gather_inputs(message)
        if quoted:
            text = f"{quoted}\n{text}".strip()
        prefix = "".join(f"⚠️ {warning}\n" for warning in warnings)
        if not text and not images:
            await stream.show(prefix + "⚠️ nothing to answer: send some text or an image.", final=True)
            return
        if self._opens_thread(message):
            try:
                job.channel = await message.create_thread(name=thread_name(text))
            except discord.HTTPException as error:
                log.warning("could not open a thread in channel %s: HTTP %s", job.channel_id, error.status)
                prefix += NO_THREAD + "\n"
            else:
                job.stream = ReplyStream(message, self.pacer, channel=job.channel)

        async def begin() -> Turn:
            job.target = target = self.conversations.target(
                job.channel_id, self.replied_to(message), title=text, parent_id=getattr(job.channel, "parent_id", None))
            send = functools.partial(self.manager.send, target.conversation_id, text, images,
                                     author=message.author.display_name, parent_id=target.parent_id)
            turn = await asyncio.get_running_loop().run_in_executor(self._executor, send)
            self.conversations.link(job.channel_id, [message.id], turn.conversation_id, turn.user_message_id)
            self.conversations.remember_asker(turn.assistant_message_id,
                                              Asked(job.user_id, message.id, message.channel.id))
            return turn

        await self._queued(job, prefix, begin)

    def _opens_thread(self, message: discord.Message) -> bool:
        """A mention in a server text channel with ``auto_thread`` on, unless it replies to a known message (that
        continues a conversation where it is)."""
        if not isinstance(message.channel, discord.TextChannel) or self.replied_to(message) is not None:
            return False
        chosen = self.conversations.persona(message.channel.id).auto_thread
        return self.settings.auto_thread if chosen is None else chosen

    async def _queued(self, job: Job, prefix: str, begin: Callable[[], Awaitable[Turn]]) -> None:
        """Join the queue, then run the turn ``begin`` makes and show it (``prefix`` first)."""
        assert job.stream is not None
        try:
            job.ticket = self.queue.enter(job.user_id)
        except QueueRefused as refused:
            await job.stream.show(f"{prefix}⚠️ {refused}", final=True)
            return
        display = _Display(job.stream)
        try:
            await self._run(job, prefix, display, begin)
            await display.finished()
        finally:
            display.abandon()  # no-op once finished

    async def _run(self, job: Job, prefix: str, display: _Display, begin: Callable[[], Awaitable[Turn]]) -> None:
        """Wait for the device, generate, and leave the final text in ``display``."""
        assert job.ticket is not None and job.stream is not None
        ticket = job.ticket
        async with contextlib.AsyncExitStack() as typing:
            with contextlib.suppress(discord.HTTPException):
                await typing.enter_async_context(job.channel.typing())

            async def show_position(position: int) -> None:
                if position > 0:
                    display.set(f"{prefix}⏳ waiting for the model: position {position} in the queue")

            if not await self.queue.wait(ticket, show_position):
                display.set(f"{prefix}{job.stop_note or STOPPED}", final=True)
                return
            try:
                turn = await begin()
            except IrisError as refused:
                self.queue.release(ticket)
                display.set(f"{prefix}⚠️ {refused}", final=True)
                await display.finished()
                if job.target is not None:  # a reply to the warning continues where the user was
                    self.conversations.link(job.channel_id, (m.id for m in job.stream.messages),
                                            job.target.conversation_id, job.target.parent_id)
                return
        job.turn = turn
        if job.stop_note is not None:
            turn.cancel()
        prefix += "".join(f"ℹ️ {notice}\n" for notice in turn.notices)
        answer = ""

        def on_chunk(chunk: str) -> None:
            nonlocal answer
            answer += chunk
            display.set(prefix + answer)

        loop = asyncio.get_running_loop()
        failure = await loop.run_in_executor(self._executor, _generate, turn, on_chunk, loop)
        self.queue.release(ticket)  # the device is free; showing the rest is Discord's pace
        ending = ""
        if failure is not None:
            log.error("generation failed in channel %s: %s", job.channel_id, type(failure).__name__,
                      exc_info=failure)
            ending = f"⚠️ {failure}" if isinstance(failure, IrisError) else \
                "⚠️ the model failed while answering (it has been logged); the partial answer was kept."
        elif turn.interrupted:
            ending = job.stop_note or STOPPED
        body = answer if answer.strip() or ending else "…(empty answer)"
        display.set(prefix + body + (f"\n\n{ending}" if ending else ""), final=True)
        await display.finished()
        self.conversations.link(job.channel_id, (m.id for m in job.stream.messages), turn.conversation_id,
                                turn.assistant_message_id)

    # inputs ----------------------------------------------------------------

    async def _gather_inputs(self, message: discord.Message) -> tuple[str, list[ImageAttachment], list[str]]:
        """Quote and images of an unknown replied-to message, the message's own images, and warnings."""
        attachments = list(message.attachments)
        quoted = ""
        referenced = await self._referenced(message)
        if referenced is not None and not self.conversations.is_known(message.channel.id, referenced.id):
            if referenced.content:
                quoted = f"> {referenced.author.display_name}: {referenced.content}"
            attachments = list(referenced.attachments) + attachments
        warnings: list[str] = []
        if len(attachments) > self.settings.max_images:
            warnings.append(f"only the first {self.settings.max_images} images are read; "
                            f"{len(attachments) - self.settings.max_images} attachment(s) ignored")
            attachments = attachments[: self.settings.max_images]
        loaded = await asyncio.gather(*(self._load(attachment) for attachment in attachments))
        images = [item for item in loaded if isinstance(item, ImageAttachment)]
        warnings += [item for item in loaded if isinstance(item, str)]
        if images:
            try:
                self.manager.check_images(images)
            except IrisError as error:
                warnings.append(f"{error} (image(s) ignored)")
                images = []
        return quoted, images, warnings

    def replied_to(self, message: discord.Message) -> int | None:
        """The id of the message this one replies to in its channel (``reply_reference``), unless the bot saw
        that message in another channel."""
        reference_id = reply_reference(message)
        if reference_id is None or self.conversations.known_elsewhere(message.channel.id, reference_id):
            return None
        return reference_id

    async def _referenced(self, message: discord.Message) -> discord.Message | None:
        """The message replied to, when it is in the same channel."""
        reference_id = self.replied_to(message)
        if reference_id is None:
            return None
        resolved = message.reference.resolved if message.reference is not None else None
        if isinstance(resolved, discord.Message):
            return resolved if resolved.id == reference_id and resolved.channel.id == message.channel.id else None
        try:
            return await message.channel.fetch_message(reference_id)
        except discord.HTTPException:
            return None

    async def _load(self, attachment: discord.Attachment) -> ImageAttachment | str:
        """A validated image, or the one-line reason it is not one."""
        name = attachment.filename
        if attachment.size > self._max_bytes:
            return (f"{name}: {attachment.size / 1e6:.1f} MB is over the {self._max_bytes / 1e6:.0f} MB "
                    "image limit")
        try:
            data = await attachment.read()
        except (discord.HTTPException, OSError):
            return f"{name}: could not be downloaded"
        try:
            return await asyncio.to_thread(load_image_bytes, data, name, max_bytes=self._max_bytes,
                                           max_pixels=self._max_pixels)
        except IrisError as error:
            return str(error)

