"""``iris adapters``: list, inspect, merge and export the adapters ``iris train`` writes.

Manifests and directory names are data (an adapter may come from anyone): they are printed through
``cli.terminal``, never as markup or raw control characters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from assistant.config import Paths
from assistant.errors import BadAdapter, IrisError
from cli.terminal import make_console, styled, visible, visible_json

adapters_app = typer.Typer(help="List, inspect, merge and export trained adapters.", no_args_is_help=True)

BaseOption = Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the one in the "
                                                "adapter's manifest).")]
QuantOption = Annotated[str, typer.Option("--quant", help="Load the base as none | 4bit (the CPU's int4, fp16 and "
                                          "int8 pack it for decoding and cannot take a merge).")]
DequantizeOption = Annotated[bool, typer.Option("--dequantize", help="Merge into a 4-bit base by dequantizing it "
                                                "first (writes full precision).")]
TrustPickleOption = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickle (.bin) adapter weights.")]


def adapters_dir(paths: Paths | None = None) -> Path:
    """Where ``iris train`` puts adapters by default and where ``iris adapters list`` looks."""
    return (paths or Paths.default()).data / "adapters"


def resolve_adapter(name: str) -> Path:
    """An adapter by path, or by name in the user adapter dir."""
    path = Path(name).expanduser()
    if os.path.isdir(path):  # os.path: a name too long for the file system is "no such adapter", not a crash
        return path
    candidate = adapters_dir() / name
    if os.path.isdir(candidate):
        return candidate
    raise BadAdapter(f"{name}: no such adapter (not a directory, nor in {adapters_dir()}); see `iris adapters list`")


@adapters_app.command("list")
def list_adapters() -> None:
    """Adapters in the user adapter dir, with what their manifests say."""
    from assistant.adapter_files import read_manifest

    root = adapters_dir()
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found:
        typer.echo(visible(f"no adapters in {root} (train one with `iris train DATASET`)"))
        return
    table = Table("name", "kind", "base", "steps", "loss", "created")
    for path in found:
        try:
            manifest = read_manifest(path) or {}
        except BadAdapter:
            table.add_row(styled(path.name), "?", "corrupt iris_manifest.json", "", "", "")
            continue
        metrics = manifest.get("metrics")
        loss = metrics.get("loss") if isinstance(metrics, dict) else None
        table.add_row(*(styled(str(cell)) for cell in (
            path.name, manifest.get("kind", "peft"), manifest.get("base_model", "?"), manifest.get("steps", ""),
            f"{loss:.4f}" if isinstance(loss, float) else "", manifest.get("created", ""))))
    make_console().print(table)


@adapters_app.command()
def info(name: Annotated[str, typer.Argument(help="Adapter name or directory.")]) -> None:
    """Print an adapter's manifest (base identity, hashes, training settings, metrics) as JSON."""
    from assistant.adapter_files import read_manifest

    path = resolve_adapter(name)
    manifest = read_manifest(path)
    if manifest is None:
        raise BadAdapter(f"{path}: no iris_manifest.json (not trained by Iris)")
    typer.echo(visible_json(json.dumps({"path": str(path), **manifest}, indent=2, sort_keys=True, ensure_ascii=False)))


@adapters_app.command()
def merge(name: Annotated[str, typer.Argument(help="Adapter name or directory.")],
          out: Annotated[Path | None, typer.Option(help="Output directory (default: the user models dir / "
                                                   "NAME-merged).")] = None,
          model: BaseOption = None, quant: QuantOption = "none", dequantize: DequantizeOption = False,
          trust_pickle: TrustPickleOption = False) -> None:
    """Merge an adapter into its base, for `iris chat --model OUT`."""
    from adapters.merge import merge_adapter

    path = resolve_adapter(name)
    target = out or Paths.default().data / "models" / f"{path.name}-merged"
    merge_adapter(path, target, model=model, quant=quant, dequantize=dequantize, trust_pickle=trust_pickle)
    typer.echo(visible(f"wrote {target} (use it with: iris chat --model {target})"))


@adapters_app.command()
def export(name: Annotated[str, typer.Argument(help="Adapter name or directory.")],
           out: Annotated[Path, typer.Option(help="New directory for the standalone model.")],
           model: BaseOption = None, quant: QuantOption = "none", dequantize: DequantizeOption = False,
           trust_pickle: TrustPickleOption = False) -> None:
    """Write a standalone merged HF model (with processor/tokenizer), checked by reloading it."""
    from adapters.merge import export_adapter

    check = export_adapter(resolve_adapter(name), out, model=model, quant=quant, dequantize=dequantize,
                           trust_pickle=trust_pickle)
    if not check.same_greedy_tokens:
        raise IrisError(f"{out}: the reloaded export predicts other tokens than base + adapter "
                        f"(max logit difference {check.max_logit_difference:.3g})")
    typer.echo(visible(f"wrote {out} (plain transformers from_pretrained; reload check: max logit difference "
                       f"{check.max_logit_difference:.2e})"))
