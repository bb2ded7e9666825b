"""The interactive ``iris chat`` loop: input, slash commands, image attachment and streaming output.

Input comes from a prompt_toolkit session (history, multi-line, path
completion); tests pass a session reading from a pipe. Every ``IrisError`` is
printed as one line and the conversation carries on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape

from assistant.dialogue import DialogueManager
from assistant.errors import BadCommand, IrisError
from assistant.export import export_llava
from assistant.messages import BASE_MODEL, ImageAttachment, Message, Role
from assistant.store import Store
from assistant.vision import load_image_path
from cli.inline_paths import extract_images

HELP = """\
/help                 this list
/image PATH [PATH…]   attach image(s) to your next message (or just type paths in the message)
/clear                start a new conversation with the same settings
/system [TEXT]        show or set the system prompt (/system none clears it)
/set [NAME VALUE]     show or change sampling: temperature top_p top_k max_new_tokens repetition_penalty seed
/adapter [NAME|none]  show or switch the LoRA adapter for this conversation
/save DIR             export this conversation as LLaVA JSON (with its images) into DIR
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
        self.markdown = markdown
        self.cwd = cwd or Path.cwd()
        self.pending: list[ImageAttachment] = []
        self._caps = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self._commands: dict[str, Callable[[str], bool]] = {
            "help": self._help, "image": self._image, "clear": self._clear, "system": self._system,
            "set": self._set, "adapter": self._adapter, "save": self._save, "load": self._load,
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
                self.console.print("[dim](Ctrl+C again or /exit to quit)[/dim]")
                continue
            interrupts = 0
            if not line.strip():
                continue
            if not self.handle(line):
                break

    def _read_message(self) -> str:
        line = self.read_line(">>> ")
        if not line.lstrip().startswith('"""'):
            return line
        body = line.lstrip()[3:]
        lines = [body]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(self.read_line("... "))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip("\n")

    def handle(self, line: str) -> bool:
        """Process one input; returns False when the user asked to leave."""
        try:
            if line.startswith("/") and not line.startswith("//"):
                name, _, argument = line[1:].partition(" ")
                command = self._commands.get(name.strip())
                if command is None and not Path(line.split()[0]).exists():
                    raise BadCommand(f"unknown command /{name}; /help lists them")
                if command is not None:
                    return command(argument.strip())
            self._send(line)
        except IrisError as error:
            self.console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return True

    # sending -------------------------------------------------------------

    def _attach(self, path: Path) -> ImageAttachment:
        image = load_image_path(path, **self._caps)
        cost = self.manager.image_token_cost(image)
        self.console.print(f"[green]attached[/green] {escape(path.name)} ({image.width}x{image.height}, "
                           f"{len(image.data) / 1024:.0f} KB, {cost} tokens)", highlight=False)
        return image

    def _send(self, line: str) -> None:
        text, paths = extract_images(line, self.cwd)
        images = [*self.pending, *(self._attach(path) for path in paths)]
        turn = self.manager.send(self.conversation_id, text, images)
        self.pending = []
        for notice in turn.notices:
            self.console.print(f"[yellow]note:[/yellow] {notice}", highlight=False)
        try:
            self._show_stream(turn)
        except KeyboardInterrupt:
            self.console.print("\n[yellow]⏹ interrupted — partial answer kept[/yellow]")

    def _show_stream(self, turn: Any) -> None:
        if not self.markdown:
            for chunk in turn:
                self.console.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)
            self.console.print()
            return
        with Live(Markdown(""), console=self.console, refresh_per_second=10, vertical_overflow="visible") as live:
            for _ in turn:
                live.update(Markdown(turn.text))

    # slash commands --------------------------------------------------------

    def _help(self, _: str) -> bool:
        self.console.print(HELP, markup=False, highlight=False)
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
        self.console.print(f"new conversation #{self.conversation_id}")
        return True

    def _system(self, argument: str) -> bool:
        if not argument:
            current = self.manager.conversation(self.conversation_id).system_prompt
            self.console.print(current or "(no system prompt)", markup=False, highlight=False)
            return True
        self.manager.set_system_prompt(self.conversation_id, None if argument == "none" else argument)
        self.console.print("system prompt set" if argument != "none" else "system prompt cleared")
        return True

    def _set(self, argument: str) -> bool:
        if not argument:
            for name, value in self.manager.options(self.conversation_id).as_dict().items():
                self.console.print(f"{name} = {value}", highlight=False)
            return True
        parts = argument.split()
        if len(parts) != 2:
            raise BadCommand("usage: /set NAME VALUE (e.g. /set temperature 0.2)")
        updated = self.manager.set_option(self.conversation_id, parts[0], parts[1])
        self.console.print(f"{parts[0]} = {getattr(updated, parts[0])}", highlight=False)
        return True

    def _adapter(self, argument: str) -> bool:
        if not argument:
            current = self.manager.conversation(self.conversation_id).adapter
            loaded = self.manager.backend.adapter_names()
            active = current or self.manager.backend.describe().get("active_adapter", BASE_MODEL)
            self.console.print(f"active: {active}; "
                               f"loaded: {', '.join(loaded) or 'none'}", markup=False, highlight=False)
            return True
        self.manager.set_adapter(self.conversation_id, argument)
        self.console.print(f"adapter: {argument}", markup=False, highlight=False)
        return True

    def _save(self, argument: str) -> bool:
        if not argument:
            raise BadCommand("/save needs a directory: /save DIR")
        out = Path(argument).expanduser()
        if out.exists() and not out.is_dir():
            raise BadCommand(f"{out}: exists and is not a directory")
        target = export_llava([(f"conversation-{self.conversation_id}",
                                self._with_system(self.manager.history(self.conversation_id)))], out)
        self.console.print(f"saved to {target}", highlight=False)
        return True

    def _with_system(self, messages: list[Message]) -> list[Message]:
        system = self.manager.conversation(self.conversation_id).system_prompt
        return [Message(Role.SYSTEM, system), *messages] if system else messages

    def _load(self, argument: str) -> bool:
        if not argument.isdigit():
            raise BadCommand("usage: /load ID (see /history)")
        self.manager.conversation(int(argument))
        self.conversation_id = int(argument)
        self.pending = []
        self.console.print(f"continuing conversation #{self.conversation_id}")
        print_transcript(self.console, self.manager.history(self.conversation_id))
        return True

    def _history(self, _: str) -> bool:
        print_conversation_list(self.console, self.manager.store)
        return True

    def _tokens(self, _: str) -> bool:
        used = self.manager.token_count(self.conversation_id)
        backend = self.manager.backend
        self.console.print(f"{used} tokens in this conversation; context {backend.context_length}, "
                           f"answers up to {self.manager.options(self.conversation_id).max_new_tokens}")
        return True

    def _exit(self, _: str) -> bool:
        return False


def print_transcript(console: Console, messages: list[Any]) -> None:
    for message in messages:
        images = f" [{len(message.images)} image(s)]" if message.images else ""
        mark = " [interrupted]" if message.interrupted else ""
        console.print(f"{message.role.value}{images}{mark}: {message.text}", markup=False, highlight=False)


def print_conversation_list(console: Console, store: Store) -> None:
    import datetime

    for record in store.list_conversations(limit=20):
        when = datetime.datetime.fromtimestamp(record.updated_at).strftime("%Y-%m-%d %H:%M")
        console.print(f"#{record.id}  {when}  {record.message_count} messages  {record.source}  {record.title}",
                      highlight=False, markup=False)
