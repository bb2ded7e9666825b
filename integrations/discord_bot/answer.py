"""Answering one Discord message: images, queue, generation in a worker thread, streamed reply.

The device is held only while the model generates; showing the text is paced
per channel and may finish after the next user's generation has started. Every
way this can go wrong ends as a visible ⚠️ line in the reply, and is logged with
ids but never with message contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import discord

from assistant.dialogue import DialogueManager, Turn
from assistant.errors import IrisError
from assistant.messages import ImageAttachment
from assistant.vision import load_image_bytes
from integrations.discord_bot.conversations import Conversations, Target
from integrations.discord_bot.queue import FairQueue, QueueRefused, Ticket
from integrations.discord_bot.settings import DiscordSettings
from integrations.discord_bot.streaming import ChannelPacer, ReplyStream

log = logging.getLogger("iris.discord")

STOPPED = "⏹ stopped."
SHUTTING_DOWN = "⏹ interrupted: Iris is shutting down."
FAILED = "⚠️ something went wrong while answering (it has been logged); please try again."


@dataclass(eq=False)
class Job:
    """One request in flight, so ⏹ and /stop can find and stop it."""

    user_id: int
    trigger: discord.Message
    ticket: Ticket | None = None
    turn: Turn | None = None
    stream: ReplyStream | None = None
    stop_note: str | None = None

    @property
    def channel_id(self) -> int:
        return self.trigger.channel.id

    def shows(self, message_id: int) -> bool:
        """Whether ``message_id`` is the user's message or one of the bot's replies to it."""
        replies = self.stream.messages if self.stream is not None else []
        return message_id == self.trigger.id or any(m.id == message_id for m in replies)


class _Chunks:
    """Text arriving from the worker thread, read on the event loop."""

    def __init__(self) -> None:
        self.text = ""
        self.done = False
        self.error: BaseException | None = None
        self.changed = asyncio.Event()

    def add(self, chunk: str) -> None:
        self.text += chunk
        self.changed.set()

    def finish(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        self.changed.set()


def _generate(turn: Turn, chunks: _Chunks, loop: asyncio.AbstractEventLoop) -> None:
    """Worker thread: run the turn (the answer is committed when it ends) and forward its text."""
    error: BaseException | None = None
    try:
        for chunk in turn:
            loop.call_soon_threadsafe(chunks.add, chunk)
    except Exception as exc:  # reported on the loop; the Turn has already committed what it had
        error = exc
    loop.call_soon_threadsafe(chunks.finish, error)


def prompt_text(message: discord.Message, bot_user_id: int) -> str:
    """The message as the model should read it: without the bot's own mention."""
    return re.sub(rf"<@!?{bot_user_id}>", "", message.content).strip()


class Answerer:
    """Runs answers for the bot; one instance per bot, owning the queue and the generation thread."""

    def __init__(self, manager: DialogueManager, settings: DiscordSettings, *, max_image_bytes: int | None = None,
                 max_image_pixels: int | None = None) -> None:
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
        """Answer ``message`` in place; never raises (failures become a ⚠️ reply and a log line)."""
        job = Job(message.author.id, message)
        job.stream = ReplyStream(message, self.pacer)
        self.jobs.add(job)
        context = {"guild": getattr(message.guild, "id", None), "channel": message.channel.id,
                   "user": message.author.id, "message": message.id}
        try:
            await self._answer(job, message, bot_user_id)
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
            await stream.show(prefix + "⚠️ there is nothing to answer: send some text or an image.", final=True)
            return
        try:
            job.ticket = self.queue.enter(job.user_id)
        except QueueRefused as refused:
            await stream.show(f"{prefix}⚠️ {refused}", final=True)
            return
        async with contextlib.AsyncExitStack() as typing:
            with contextlib.suppress(discord.HTTPException):
                await typing.enter_async_context(message.channel.typing())

            async def show_position(position: int) -> None:
                if position > 0:
                    await stream.show(f"{prefix}⏳ waiting for the model: position {position} in the queue")

            if not await self.queue.wait(job.ticket, show_position):
                await stream.show(f"{prefix}{job.stop_note or STOPPED}", final=True)
                return
            started_turn = await self._start_turn(job, message, text, images)
            if started_turn is None:
                return
            target, turn = started_turn
        notices = "".join(f"ℹ️ {notice}\n" for notice in turn.notices)
        prefix += notices
        await self._stream(job, turn, prefix)
        self.conversations.link((m.id for m in stream.messages), target.conversation_id, turn.assistant_message_id)

    async def _start_turn(self, job: Job, message: discord.Message, text: str,
                          images: list[ImageAttachment]) -> tuple[Target, Turn] | None:
        """Store the user message and get its Turn; an IrisError becomes the reply instead."""
        assert job.stream is not None and job.ticket is not None
        reference = message.reference.message_id if message.reference is not None else None
        parent = getattr(message.channel, "parent_id", None)
        loop = asyncio.get_running_loop()
        target: Target | None = None
        try:
            target = self.conversations.target(message.channel.id, reference, title=text, parent_id=parent)
            send = functools.partial(self.manager.send, target.conversation_id, text, images,
                                     author=message.author.display_name, parent_id=target.parent_id)
            turn = await loop.run_in_executor(self._executor, send)
        except IrisError as error:
            self.queue.release(job.ticket)
            await job.stream.show(f"⚠️ {error}", final=True)
            if target is not None:  # a reply to the warning continues where the user was
                self.conversations.link((m.id for m in job.stream.messages), target.conversation_id,
                                        target.parent_id)
            return None
        self.conversations.link([message.id], target.conversation_id, turn.user_message_id)
        job.turn = turn
        if job.stop_note is not None:
            turn.cancel()
        return target, turn

    async def _stream(self, job: Job, turn: Turn, prefix: str) -> None:
        """Generate in the worker thread and mirror the text into Discord at the pacer's speed."""
        assert job.stream is not None and job.ticket is not None
        loop = asyncio.get_running_loop()
        chunks = _Chunks()
        ticket = job.ticket
        generation = loop.run_in_executor(self._executor, _generate, turn, chunks, loop)
        generation.add_done_callback(lambda _: self.queue.release(ticket))
        while True:
            await chunks.changed.wait()
            chunks.changed.clear()
            if chunks.done:
                break
            await job.stream.show(prefix + chunks.text)
        await generation
        ending = ""
        if chunks.error is not None:
            log.error("generation failed in channel %s: %s", job.channel_id, type(chunks.error).__name__,
                      exc_info=chunks.error)
            ending = f"⚠️ {chunks.error}" if isinstance(chunks.error, IrisError) else \
                "⚠️ the model failed while answering (it has been logged); the partial answer was kept."
        elif turn.interrupted:
            ending = job.stop_note or STOPPED
        body = chunks.text if chunks.text.strip() or ending else "…(empty answer)"
        await job.stream.show(prefix + body + (f"\n\n{ending}" if ending else ""), final=True)

    # inputs ----------------------------------------------------------------

    async def _gather_inputs(self, message: discord.Message) -> tuple[str, list[ImageAttachment], list[str]]:
        """Quote and images of an unknown replied-to message, the message's own images, and warnings."""
        attachments = list(message.attachments)
        quoted = ""
        referenced = await self._referenced(message)
        if referenced is not None and not self.conversations.is_known(referenced.id):
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

    async def _referenced(self, message: discord.Message) -> discord.Message | None:
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        try:
            return await message.channel.fetch_message(reference.message_id)
        except discord.HTTPException:
            return None

    async def _load(self, attachment: discord.Attachment) -> ImageAttachment | str:
        """A validated image, or the one-line reason it is not one."""
        name = attachment.filename
        if attachment.size > self._max_bytes:
            return f"{name}: {attachment.size / 1e6:.1f} MB is over the {self._max_bytes / 1e6:.0f} MB image limit"
        try:
            data = await attachment.read()
        except (discord.HTTPException, OSError):
            return f"{name}: could not be downloaded"
        try:
            return await asyncio.to_thread(load_image_bytes, data, name, max_bytes=self._max_bytes,
                                           max_pixels=self._max_pixels)
        except IrisError as error:
            return str(error)

