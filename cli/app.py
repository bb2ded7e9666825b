"""The ``iris`` typer app: chat, ask, info and history (training, data and Discord register here too).

What a command prints goes through ``cli.terminal``; its errors go to the boundary in ``cli.errors``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from assistant.config import Paths
from assistant.errors import IrisError
from assistant.export import export_llava
from assistant.messages import Message, Role
from assistant.vision import load_image_path
from cli import runtime
from cli.adapters_cmd import adapters_app
from cli.build_cmd import build
from cli.data_cmd import data_app
from cli.discord_cmd import discord
from cli.errors import DEBUG_ENV, IrisGroup
from cli.eval_cmd import evaluate
from cli.options import (
    AdapterOption,
    ApiKeyEnvOption,
    BackendOption,
    BaseUrlOption,
    ModelOption,
    QuantOption,
    TrustPickleOption,
)
from cli.quiet import VERBOSE_ENV, quiet_libraries, verbose_enabled
from cli.serve_cmd import serve
from cli.terminal import VisibleStream, make_console, styled, visible_json
from cli.train_cmd import train

app = typer.Typer(cls=IrisGroup, help="Iris: a local multimodal assistant.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
history_app = typer.Typer(help="List, show, export and delete stored conversations.", no_args_is_help=True)
app.add_typer(history_app, name="history")


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors "
                                             f"(also {DEBUG_ENV}=1).")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", help="Also show the progress bars, notices and warnings "
                                               f"of the libraries Iris uses (also {VERBOSE_ENV}=1).")] = False,
         ) -> None:
    """Iris: a local multimodal assistant."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # read by the error boundary, also in child processes
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # child processes (training under accelerate) stay verbose too
    if not verbose_enabled():
        quiet_libraries()  # before any command imports torch, transformers or bitsandbytes


@app.command()
def chat(model: ModelOption = None, quant: QuantOption = None, adapter: AdapterOption = None,
         trust_pickle: TrustPickleOption = False, backend: BackendOption = None, base_url: BaseUrlOption = None,
         api_key_env: ApiKeyEnvOption = None,
         resume: Annotated[str | None, typer.Option("--resume", help="Continue conversation ID "
                                                    "(or 'last').")] = None,
         system: Annotated[str | None, typer.Option("--system", help="System prompt for a new conversation.")] = None,
         plain: Annotated[bool, typer.Option("--plain", help="Print answers as plain text, not Markdown.")] = False,
         ) -> None:
    """Chat in the terminal; attach images with /image PATH or by typing their paths."""
    from cli.chat import ChatSession, branch_marks, parse_conversation_id, print_transcript
    from cli.prompt_input import make_reader

    paths = Paths.default()
    console = make_console()
    settings = runtime.resolve_settings(paths, model=model, quant=quant, adapters=adapter or (),
                                        trust_pickle=trust_pickle, system=system, backend=backend,
                                        base_url=base_url, api_key_env=api_key_env)
    manager, store = runtime.open_manager(settings, paths)
    try:
        if resume is not None:
            conversation_id = store.latest_conversation_id() if resume == "last" else parse_conversation_id(resume)
            if conversation_id is None:
                raise IrisError("no stored conversation to resume")
            manager.conversation(conversation_id)
            print_transcript(console, manager.history(conversation_id), branch_marks(manager.branches(conversation_id)))
        else:
            conversation_id = manager.new_conversation()
        info = manager.backend.describe()
        console.print(styled(("Iris", "bold"), f" · {info['model']} · {info['device']} · {info['quantization']} · "
                             f"conversation #{conversation_id} · /help for commands"))
        session = ChatSession(manager, conversation_id, console, make_reader(paths.input_history),
                              max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels,
                              markdown=not plain and console.is_terminal)
        session.run()
    finally:
        store.close()


@app.command()
def ask(question: Annotated[str, typer.Argument(help="The question.")],
        image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="Image file (repeatable).")] = None,
        model: ModelOption = None, quant: QuantOption = None, adapter: AdapterOption = None,
        trust_pickle: TrustPickleOption = False, backend: BackendOption = None, base_url: BaseUrlOption = None,
        api_key_env: ApiKeyEnvOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print a JSON record instead of the text.")] = False,
        temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy).")] = None,
        max_new_tokens: Annotated[int | None, typer.Option(help="Longest answer in tokens.")] = None,
        system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None) -> None:
    """Answer one question (with optional images) and print only the answer."""
    paths = Paths.default()
    settings = runtime.resolve_settings(paths, model=model, quant=quant, adapters=adapter or (),
                                        trust_pickle=trust_pickle, system=system, backend=backend,
                                        base_url=base_url, api_key_env=api_key_env)
    images = [load_image_path(p, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
              for p in image or []]
    manager, store = runtime.open_manager(settings, paths)
    try:
        options = settings.generation
        for name, value in (("temperature", temperature), ("max_new_tokens", max_new_tokens)):
            if value is not None:
                options = options.with_setting(name, str(value))  # checked before anything is stored
        conversation_id = manager.new_conversation(source="ask", title=question[:60], options=options)
        started = time.perf_counter()
        turn = manager.send(conversation_id, question, images)
        if as_json:
            answer = turn.run()
            record = {"answer": answer.strip(), "conversation_id": conversation_id,
                      "model": manager.backend.describe()["model"], "prompt_tokens": turn.prompt_tokens,
                      "images": [{"name": i.name, "sha256": i.sha256, "width": i.width, "height": i.height}
                                 for i in images], "notices": turn.notices,
                      "seconds": round(time.perf_counter() - started, 3)}
            sys.stdout.write(visible_json(json.dumps(record, ensure_ascii=False)) + "\n")
        else:
            stream = VisibleStream()
            for chunk in turn:
                sys.stdout.write(stream.feed(chunk))
                sys.stdout.flush()
            sys.stdout.write(stream.end() + "\n")
    finally:
        store.close()


@app.command()
def info(model: ModelOption = None, quant: QuantOption = None, adapter: AdapterOption = None,
         trust_pickle: TrustPickleOption = False, backend: BackendOption = None, base_url: BaseUrlOption = None,
         api_key_env: ApiKeyEnvOption = None) -> None:
    """Show the model, device, quantization, memory and context length."""
    paths = Paths.default()
    settings = runtime.resolve_settings(paths, model=model, quant=quant, adapters=adapter or (),
                                        trust_pickle=trust_pickle, backend=backend, base_url=base_url,
                                        api_key_env=api_key_env)
    details = runtime.open_backend(settings, paths).describe()
    console = make_console(soft_wrap=True)
    for key, value in details.items():
        if key == "memory_bytes":
            value = f"{value / 2**20:.1f} MiB"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        console.print(styled(f"{key.replace('_', ' ')}: {value}"))
    console.print(styled(f"data: {paths.database}"))


def _with_store(action):  # type: ignore[no-untyped-def]
    from assistant.store import Store

    store = Store(Paths.default().database)
    try:
        return action(store)
    finally:
        store.close()


@history_app.command("list")
def history_list() -> None:
    """Stored conversations, newest first."""
    from cli.chat import print_conversation_list

    _with_store(lambda store: print_conversation_list(make_console(), store))


IdArgument = Annotated[str, typer.Argument(help="Conversation id (see `iris history list`).", show_default=False)]


@history_app.command("show")
def history_show(conversation_id: IdArgument) -> None:
    """Print one conversation's current branch, marking where it branches ("branch 2 of 3")."""
    from cli.chat import branch_marks, parse_conversation_id, print_transcript

    number = parse_conversation_id(conversation_id)

    def show(store):  # type: ignore[no-untyped-def]
        record = store.conversation(number)
        console = make_console(soft_wrap=True)
        if record.system_prompt:
            console.print(styled(f"system: {record.system_prompt}"))
        print_transcript(console, store.thread(number), branch_marks(store.forks(number)))

    _with_store(show)


@history_app.command("export")
def history_export(conversation_ids: Annotated[list[str], typer.Argument(
                       help="Conversation id(s); several land in one dataset.json.", show_default=False)],
                   out: Annotated[Path, typer.Option("--out", "-o", help="New or empty directory to write into.")],
                   force: Annotated[bool, typer.Option("--force", help="Write into a directory that is not empty, "
                                                       "replacing its dataset.json.")] = False) -> None:
    """Write conversations (each its current branch) as LLaVA JSON (dataset.json + images/) for training."""
    from cli.chat import parse_conversation_id

    numbers = list(dict.fromkeys(parse_conversation_id(text) for text in conversation_ids))

    def export(store):  # type: ignore[no-untyped-def]
        records = []
        for number in numbers:
            record = store.conversation(number)
            messages = store.thread(number)
            if record.system_prompt:
                messages = [Message(Role.SYSTEM, record.system_prompt), *messages]
            records.append((f"conversation-{number}", messages))
        target = export_llava(records, out, force=force)
        make_console(soft_wrap=True).print(styled(f"wrote {target} ({len(records)} conversation(s))"))

    _with_store(export)


@history_app.command("delete")
def history_delete(conversation_id: IdArgument) -> None:
    """Delete a conversation (its images too, unless another conversation uses them)."""
    from cli.chat import parse_conversation_id

    number = parse_conversation_id(conversation_id)

    def delete(store):  # type: ignore[no-untyped-def]
        store.delete_conversation(number)
        make_console().print(styled(f"deleted conversation #{number}"))

    _with_store(delete)


# Front ends and tools defined in their own modules, listed after chat/ask/info/history in --help.
app.command("discord")(discord)
app.command("serve")(serve)
app.command("build")(build)
app.command("train")(train)
app.command("eval")(evaluate)
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")


def main() -> None:
    app()


if __name__ == "__main__":  # ``python -m cli.app`` (e.g. under ``accelerate launch``)
    main()
