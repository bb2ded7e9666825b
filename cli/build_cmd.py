"""``iris build``: compose a LLaVA model (LLM + vision tower + fresh projector) that loads with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from assistant.config import Paths
from cli.terminal import visible


def build(out: Annotated[Path, typer.Option("--out", help="New (or empty) directory for the composed model.")],
          llm: Annotated[Path | None, typer.Option("--llm", help="Causal LM directory (default: the embedded "
                                                   "SmolLM2-135M-Instruct).")] = None,
          vision: Annotated[Path | None, typer.Option("--vision", help="Vision tower directory: DINOv2, CLIP, "
                                                      "SigLIP, ... (default: the converted DINOv2 ViT-S/14).")] = None,
          image_size: Annotated[int, typer.Option("--image-size", help="Square input size in px, a multiple of the "
                                                  "patch size; with patch 14: 56 → 16 tokens per image, "
                                                  "112 → 64, 224 → 256.")] = 112,
          class_token: Annotated[bool, typer.Option("--class-token", help="Keep the tower's CLS token as one "
                                                    "more image token (a whole-image summary).")] = False,
          vision_layers: Annotated[int | None, typer.Option(
              "--vision-layers", help="Keep only the tower's first N layers: the projector reads a middle layer "
              "(DINOv2 keeps colour there; the default model uses 8 of 12). Default: all.")] = None,
          seed: Annotated[int, typer.Option("--seed", help="Seed of the fresh projector.")] = 0) -> None:
    """Compose a LLaVA model from an LLM and a vision tower; its projector is untrained until `iris train`."""
    from assistant.builders.compose import (
        BUILD_FILE,
        check_image_size,
        check_out_dir,
        check_vision_layers,
        compose_llava,
    )
    from assistant.builders.default_model import default_llm_path
    from assistant.builders.vision_tower import default_vision_tower_dir

    paths = Paths.default()

    def progress(message: str) -> None:
        typer.echo(visible(message), err=True)

    check_out_dir(out)  # the cheap checks come before any slow default conversion
    vision_dir = vision or default_vision_tower_dir(paths)
    check_image_size(vision_dir, image_size)
    if vision_layers is not None:
        check_vision_layers(vision_dir, vision_layers)
    llm_dir = llm or default_llm_path(paths, progress)
    progress(f"composing {llm_dir.name} + {vision_dir.name} at {image_size} px")
    result = compose_llava(llm_dir, vision_dir, out, image_size=image_size, seed=seed,
                           class_token=class_token, vision_layers=vision_layers)
    record = json.loads((result / BUILD_FILE).read_text(encoding="utf-8"))
    typer.echo(visible(f"wrote {result}: {record['tokens_per_image']} tokens per image ({image_size} px); "
                       "the projector is untrained"))
