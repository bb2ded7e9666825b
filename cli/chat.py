"""The interactive ``iris chat`` loop: input, slash commands, image attachment and streaming output.

Input comes from a prompt_toolkit session (history, multi-line, path
completion) or, when stdin is a pipe or a file, from its lines; tests pass a
session reading from a pipe. Every ``IrisError`` is printed as one line and the
conversation carries on unchanged. ``/retry``, ``/edit`` and ``/branches`` work on the
stored message tree: the old answer or question stays on its own branch. Everything shown goes through
``cli.terminal``: answers and stored text are data, never terminal controls or markup.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from assistant.dialogue import DialogueManager, NoBranch, Turn
from assistant.errors import BadCommand, ConversationNotFound, IrisError, one_line
from assistant.export import export_llava
from assistant.messages import BASE_MODEL, ImageAttachment, Message, Role
from assistant.store import Fork, Store
from assistant.vision import load_image_path
from cli.inline_paths import extract_images, split_words
from cli.terminal import VisibleStream, styled, visible

HELP = """\
/help                 this list
/image PATH [PATH…]   attach image(s) to your next message (or just type paths in the message)
/clear                start a new conversation with the same settings
/system [TEXT]        show or set the system prompt (/system none clears it)
/set [NAME VALUE]     show or change sampling: temperature top_p top_k max_new_tokens repetition_penalty seed
/retry                answer your last message again (the old answer is kept as another branch)
/edit [TEXT]          change your last message and answer it again (no TEXT: edit it at the prompt)
/branches [N]         list the branches of this conversation, or switch to branch N
/adapter [NAME|none]  show or switch the LoRA adapter for this conversation
  /adapter load PATH [NAME]  attach a PEFT adapter to the running model; this conversation uses it
  /adapter unload NAME       detach it (conversations using it go back to the active adapter)
/save DIR [--force]   export this conversation as LLaVA JSON (with its images) into a new or empty DIR
/load ID              continue a stored conversation
/history              list stored conversations
/tokens               tokens used by this conversation, and the context size
/exit                 leave (Ctrl+D works too; Ctrl+C stops an answer)
Multi-line: paste it, or start with \"\"\" and end with \"\"\"."""


class ChatSession:
    """One terminal chat bound to a conversation in the store."""

    def __init__(self, manager: DialogueManager, conversation_id: int, console: Console,
                 read_line: Callable[[str], str], *, max_image_bytes: int, max_image_pixels: int,
                 markdown: bool = True, cwd: Path | None = None) -> None:
        self.manager = manager
        self.conversation_id = conversation_id
        self.console = console
        self.read_line = read_line
        self._prefills = _takes_default(read_line)
        self.markdown = markdown
        self.cwd = cwd or Path.cwd()
        self.pending: list[ImageAttachment] = []
        self._caps = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self._commands: dict[str, Callable[[str], bool]] = {
            "help": self._help, "image": self._image, "clear": self._clear, "system": self._system,
            "set": self._set, "adapter": self._adapter, "retry": self._retry, "edit": self._edit,
            "branches": self._branches, "save": self._save, "load": self._load,
            "history": self._history, "tokens": self._tokens, "exit": self._exit, "quit": self._exit,
        }

    # the loop ------------------------------------------------------------

    def run(self) -> None:
        """Read, answer, repeat; Ctrl+C at an empty prompt twice in a row, Ctrl+D or /exit leaves."""
        interrupts = 0
        while True:
            try:
                line = self._read_message()
            except EOFError:
                break
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= 2:
                    break
                self._say(("(Ctrl+C again or /exit to quit)", "dim"))
                continue
            except IrisError as error:
                self._error(error)
                continue
            interrupts = 0
            if not line.strip():
                continue
            if not self.handle(line):
                break

    def _read_message(self, prompt: str = ">>> ", default: str = "") -> str:
        """One message: a line, or a \"\"\" block; ``default`` prefills the input where the reader can."""
        reader: Callable[..., str] = self.read_line
        line = reader(prompt, default=default) if default and self._prefills else reader(prompt)
        if not line.lstrip().startswith('"""'):
            return line
        body = line.lstrip()[3:]
        lines = [body]
        while not lines[-1].rstrip().endswith('"""'):
            try:
                lines.append(self.read_line("... "))
            except EOFError:
                raise IrisError('the input ended inside a """ block; it was not sent') from None
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip("\n")

    def handle(self, line: str) -> bool:
        """Process one input; returns False when the user asked to leave."""
        try:
            _check_input(line)
            if line.startswith("/") and not line.startswith("//"):
                name, _, argument = line[1:].partition(" ")
                command = self._commands.get(name.strip())
                if command is None and not os.path.exists(line.split()[0]):  # a pasted absolute path is a message
                    raise BadCommand(f"unknown command /{name}; /help lists them")
                if command is not None:
                    return command(argument.strip())
            self._send(line)
        except IrisError as error:
            self._error(error)
        return True

    def _say(self, *parts: str | tuple[str, str]) -> None:
        """One line (or a block) of data for the user; the terminal wraps it, so a path copies whole."""
        self.console.print(styled(*parts), soft_wrap=True)

    def _error(self, error: IrisError) -> None:
        self._say(("error:", "bold red"), " " + one_line(error))

    # sending -------------------------------------------------------------

    def _attach(self, path: Path) -> ImageAttachment:
        image = load_image_path(path, **self._caps)
        cost = self.manager.image_token_cost(image)
        self._say(("attached", "green"), f" {path.name} ({image.width}x{image.height}, "
                  f"{len(image.data) / 1024:.0f} KB, {cost} tokens)")
        return image

    def _send(self, line: str) -> None:
        text, paths = extract_images(line, self.cwd)
        images = [*self.pending, *(self._attach(path) for path in paths)]
        turn = self.manager.send(self.conversation_id, text, images)
        self.pending = []
        self._answer(turn)

    def _answer(self, turn: Turn) -> None:
        for notice in turn.notices:
            self._say(("note:", "yellow"), f" {notice}")
        try:
            self._show_stream(turn)
        except KeyboardInterrupt:
            self._say("\n", ("⏹ interrupted — partial answer kept", "yellow"))

    def _show_stream(self, turn: Any) -> None:
        if not self.markdown:
            stream = VisibleStream()
            for chunk in turn:
                self.console.print(styled(stream.feed(chunk)), end="", soft_wrap=True)
            self._say(stream.end())
            return
        # Links print as "text (url)", never as hidden terminal hyperlinks.
        with Live(Markdown(""), console=self.console, refresh_per_second=10, vertical_overflow="visible") as live:
            for _ in turn:
                live.update(Markdown(visible(turn.text), hyperlinks=False))

    # slash commands --------------------------------------------------------

    def _help(self, _: str) -> bool:
        self._say(HELP)
        return True

    def _image(self, argument: str) -> bool:
        if not argument:
            raise BadCommand("/image needs a path: /image PATH")
        text, paths = extract_images(argument, self.cwd)
        if text.strip():  # whatever is left names no existing image: report the first such word
            load_image_path(self.cwd / Path(text.split()[0]).expanduser(), **self._caps)
        for path in paths:
            self.pending.append(self._attach(path))
        return True

    def _clear(self, _: str) -> bool:
        record = self.manager.conversation(self.conversation_id)
        self.conversation_id = self.manager.new_conversation(
            system_prompt=record.system_prompt or "", options=self.manager.options(self.conversation_id),
            adapter=record.adapter)
        self.pending = []
        self._say(f"new conversation #{self.conversation_id}")
        return True

    def _system(self, argument: str) -> bool:
        if not argument:
            current = self.manager.conversation(self.conversation_id).system_prompt
            self._say(current or "(no system prompt)")
            return True
        self.manager.set_system_prompt(self.conversation_id, None if argument == "none" else argument)
        self._say("system prompt set" if argument != "none" else "system prompt cleared")
        return True

    def _set(self, argument: str) -> bool:
        if not argument:
            for name, value in self.manager.options(self.conversation_id).as_dict().items():
                self._say(f"{name} = {value}")
            return True
        parts = argument.split()
        if len(parts) != 2:
            raise BadCommand("usage: /set NAME VALUE (e.g. /set temperature 0.2)")
        updated = self.manager.set_option(self.conversation_id, parts[0], parts[1])
        self._say(f"{parts[0]} = {getattr(updated, parts[0])}")
        return True

    def _retry(self, argument: str) -> bool:
        if argument:
            raise BadCommand("usage: /retry (it answers your last message again)")
        turn = self.manager.retry(self.conversation_id)
        self._answer(turn)
        self._say_branch(turn.assistant_message_id)
        return True

    def _edit(self, argument: str) -> bool:
        text = argument
        if not text:
            asked = [m for m in self.manager.history(self.conversation_id) if m.role is Role.USER]
            if not asked:
                raise NoBranch("nothing to edit yet: send a message first")
            if not self._prefills:  # piped input, or a reader that cannot prefill: the next line replaces it
                self._say(("editing:", "dim"), f" {asked[-1].text}")
            try:
                text = self._read_message("edit> ", default=asked[-1].text)
            except (EOFError, KeyboardInterrupt):
                text = ""
            if not text.strip() or text == asked[-1].text:
                self._say(("edit cancelled; nothing changed", "dim"))
                return True
            _check_input(text)
        turn = self.manager.edit(self.conversation_id, text)
        self._answer(turn)
        self._say_branch(turn.user_message_id)
        return True

    def _say_branch(self, message_id: int) -> None:
        """Which branch a retried answer or edited message is, so the user knows the old one is still there."""
        for fork in self.manager.branches(self.conversation_id):
            if fork.message_id == message_id:
                self._say((f"(branch {fork.current + 1} of {len(fork.alternatives)} · /branches lists them)",
                           "dim"))

    def _branches(self, argument: str) -> bool:
        forks = list(reversed(self.manager.branches(self.conversation_id)))  # the newest fork is numbered first
        choices = [(fork, index) for fork in forks for index in range(len(fork.alternatives))]
        if not argument:
            if not forks:
                self._say("no branches yet: /retry or /edit makes one")
                return True
            number = 0
            for fork in forks:
                who = "answer" if fork.alternatives[0].role is Role.ASSISTANT else "you"
                self._say(f"message {fork.position + 1} ({who}), {len(fork.alternatives)} versions:")
                for index, message in enumerate(fork.alternatives):
                    number += 1
                    self._say(f"{'*' if index == fork.current else ' '} {number}. {_preview(message)}")
            self._say(("(* is the current branch; /branches N switches to branch N)", "dim"))
            return True
        if not _ID.fullmatch(argument):
            raise BadCommand("usage: /branches [N]")
        number = int(argument)
        if not 1 <= number <= len(choices):
            raise NoBranch(f"no branch {argument}; /branches lists 1-{len(choices)}" if choices else
                           "no branches yet: /retry or /edit makes one")
        fork, index = choices[number - 1]
        thread = self.manager.switch_branch(self.conversation_id, int(fork.alternatives[index].id or 0))
        self._say(f"switched to branch {number}; the conversation now ends with:")
        print_transcript(self.console, thread[-2:], branch_marks(self.manager.branches(self.conversation_id)))
        return True

    def _adapter(self, argument: str) -> bool:
        verb, _, rest = argument.partition(" ")
        if verb == "load":
            return self._adapter_load(rest.strip())
        if verb == "unload":
            return self._adapter_unload(rest.strip())
        if not argument:
            current = self.manager.conversation(self.conversation_id).adapter
            loaded = self.manager.backend.adapter_names()
            active = current or self.manager.backend.describe().get("active_adapter", BASE_MODEL)
            self._say(f"active: {active}; loaded: {', '.join(loaded) or 'none'}")
            return True
        self.manager.set_adapter(self.conversation_id, argument)
        self._say(f"adapter: {argument}")
        return True

    def _adapter_load(self, argument: str) -> bool:
        words = [word.text for word in split_words(argument)]  # quoted or backslash-escaped like inline paths
        if not 1 <= len(words) <= 2:
            raise BadCommand("usage: /adapter load PATH [NAME]")
        path = self.cwd / Path(words[0]).expanduser()
        self._say(("loading adapter from", "dim"), f" {path}")
        name = self.manager.load_adapter(str(path), words[1] if len(words) == 2 else None)
        if name not in self.manager.backend.adapter_names():  # a projector-only directory: no LoRA to choose
            self._say(f"loaded {name}: its projector now serves every conversation")
            return True
        self.manager.set_adapter(self.conversation_id, name)
        self._say(f"loaded adapter {name}; this conversation uses it now (/adapter none for the base model)")
        return True

    def _adapter_unload(self, argument: str) -> bool:
        if not argument or len(argument.split()) != 1:
            raise BadCommand("usage: /adapter unload NAME")
        moved = self.manager.unload_adapter(argument)
        active = self.manager.backend.describe().get("active_adapter", BASE_MODEL)
        self._say(f"unloaded adapter {argument}" + (f"; {moved} conversation(s) that used it now use the active "
                                                    f"adapter ({active})" if moved else ""))
        return True

    def _save(self, argument: str) -> bool:
        words = [word.text for word in split_words(argument)]  # quoted or backslash-escaped like inline paths
        force = "--force" in words
        places = [word for word in words if word != "--force"]
        if len(places) != 1:
            raise BadCommand("/save needs a directory: /save DIR [--force]")
        out = self.cwd / Path(places[0]).expanduser()
        target = export_llava([(f"conversation-{self.conversation_id}",
                                self._with_system(self.manager.history(self.conversation_id)))], out, force=force)
        self._say(f"saved to {target}")
        return True

    def _with_system(self, messages: list[Message]) -> list[Message]:
        system = self.manager.conversation(self.conversation_id).system_prompt
        return [Message(Role.SYSTEM, system), *messages] if system else messages

    def _load(self, argument: str) -> bool:
        if not _ID.fullmatch(argument):
            raise BadCommand("usage: /load ID (see /history)")
        conversation_id = parse_conversation_id(argument)
        self.manager.conversation(conversation_id)
        self.conversation_id = conversation_id
        self.pending = []
        self._say(f"continuing conversation #{self.conversation_id}")
        print_transcript(self.console, self.manager.history(self.conversation_id),
                         branch_marks(self.manager.branches(self.conversation_id)))
        return True

    def _history(self, _: str) -> bool:
        print_conversation_list(self.console, self.manager.store)
        return True

    def _tokens(self, _: str) -> bool:
        used = self.manager.token_count(self.conversation_id)
        backend = self.manager.backend
        self._say(f"{used} tokens in this conversation; context {backend.context_length}, "
                  f"answers up to {self.manager.options(self.conversation_id).max_new_tokens}")
        return True

    def _exit(self, _: str) -> bool:
        return False


_ID = re.compile("[0-9]+")
_LARGEST_ID = 2**63 - 1  # SQLite's INTEGER


def parse_conversation_id(text: str) -> int:
    """A conversation id as typed (``--resume``, ``/load``, ``history``): digits, never beyond SQLite's range."""
    if not _ID.fullmatch(text):
        raise BadCommand(f"a conversation id is a number, got {text!r}")
    if int(text) > _LARGEST_ID:
        raise ConversationNotFound(f"no conversation with id {text}")
    return int(text)


def _check_input(line: str) -> None:
    """Refuse what no model or store should get silently mangled: undecodable bytes and NUL characters."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as error:
        raise IrisError(f"the message is not valid UTF-8 ({visible(line[error.start])} at character "
                        f"{error.start + 1}); it was not sent") from None
    nul = line.find("\0")
    if nul != -1:
        raise IrisError(f"the message contains a NUL character (^@ at character {nul + 1}); it was not sent")


def _takes_default(read_line: Callable[[str], str]) -> bool:
    """Whether the reader can prefill its input (``default=``, as prompt_toolkit's ``prompt`` does)."""
    try:
        return "default" in inspect.signature(read_line).parameters
    except (TypeError, ValueError):
        return False


def _preview(message: Message, width: int = 70) -> str:
    """One line for a message in a list of branches."""
    text = " ".join(message.text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    images = f"[{len(message.images)} image(s)] " if message.images else ""
    return f"{images}{text}{' [interrupted]' if message.interrupted else ''}"


def branch_marks(forks: Sequence[Fork]) -> dict[int, tuple[int, int]]:
    """Stored message id → (its branch number, how many) for the messages where the thread branches."""
    return {fork.message_id: (fork.current + 1, len(fork.alternatives)) for fork in forks}


def print_transcript(console: Console, messages: list[Any],
                     branches: Mapping[int, tuple[int, int]] | None = None) -> None:
    """Stored messages as ``role [n image(s)] [interrupted] (branch i of n): text`` (``--resume``, ``/load``,
    ``history show``); ``branches`` (``branch_marks``) marks where the conversation branches."""
    for message in messages:
        images = f" [{len(message.images)} image(s)]" if message.images else ""
        mark = " [interrupted]" if message.interrupted else ""
        branch = (branches or {}).get(message.id)
        where = f" (branch {branch[0]} of {branch[1]})" if branch else ""
        console.print(styled(f"{message.role.value}{images}{mark}{where}: {message.text}"), soft_wrap=True)


def print_conversation_list(console: Console, store: Store) -> None:
    """The newest conversations, one line each: a title is shown on one line whatever it holds."""
    import datetime

    for record in store.list_conversations(limit=20):
        when = datetime.datetime.fromtimestamp(record.updated_at).strftime("%Y-%m-%d %H:%M")
        title = " ".join(record.title.split())
        console.print(styled(f"#{record.id}  {when}  {record.message_count} messages  {record.source}  {title}"),
                      soft_wrap=True)
