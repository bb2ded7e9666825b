"""Training checkpoints that a resumed run continues from exactly.

``<out>/checkpoints/step-NNNNNN/`` holds the usable adapter files (written by the trainer), plus
``trainable.safetensors`` (every trainable tensor by name), ``optimizer.pt``, ``scheduler.pt``,
``state.json`` (step, world size, the settings that must not change, and what the trainer adds: the stage it was
in, the planned steps of every stage, the time spent) and one ``rng-<rank>.pt`` per
process (torch, CUDA and Python RNG states, so LoRA dropout replays identically).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from assistant.errors import BadSetting
from assistant.files import read_user_text

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
MAX_STATE_BYTES = 64 << 20  # settings, RNG states and step: far below this


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step (one interrupted while saving has no state.json)."""
    root = Path(out) / CHECKPOINTS
    done = [path for path in root.glob("step-*") if (path / STATE_FILE).is_file()] if root.is_dir() else []
    return max(done, key=lambda path: path.name) if done else None


def save_state(directory: Path, *, step: int, settings: dict[str, Any], trainable: dict[str, Any],
               optimizer: Any, scheduler: Any, accelerator: Any, extra: dict[str, Any] | None = None) -> None:
    """Write the training state; each process writes its own RNG file, the main process the rest. ``extra``
    (JSON values) is stored beside the step and settings and comes back from ``read_state``."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, directory / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in trainable.items()},
                  str(directory / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # last, so that only a complete checkpoint counts
        state = {**(extra or {}), "step": step, "world_size": accelerator.num_processes, "settings": settings}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()


def read_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's state record; a corrupt or foreign one is a one-line ``BadSetting``."""
    text = read_user_text(directory / STATE_FILE, max_bytes=MAX_STATE_BYTES, what="checkpoint state",
                          error=BadSetting)
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        raise BadSetting(f"{directory.name}: corrupt {STATE_FILE}; train again without --resume") from None
    fields = {"settings": dict, "world_size": int, "step": int}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), kind) for k, kind in fields.items()):
        raise BadSetting(f"{directory.name}: corrupt {STATE_FILE}; train again without --resume")
    return state


def load_state(directory: Path, *, settings: dict[str, Any], trainable: dict[str, Any], optimizer: Any,
               scheduler: Any, accelerator: Any) -> int:
    """Restore weights, optimizer, scheduler and RNG from ``directory``; returns the step it was saved at."""
    import torch
    from safetensors.torch import load_file

    state = read_state(directory)
    changed = sorted(key for key in set(settings) | set(state["settings"])
                     if settings.get(key) != state["settings"].get(key))
    if changed:
        details = ", ".join(f"{key} {state['settings'].get(key)!r} → {settings.get(key)!r}" for key in changed)
        raise BadSetting(f"cannot resume {directory.name} with different settings ({details})")
    if state["world_size"] != accelerator.num_processes:
        raise BadSetting(f"{directory.name} was saved by {state['world_size']} process(es); resume with the same "
                         f"number (now {accelerator.num_processes}) for an exact continuation")
    weights = load_file(str(directory / "trainable.safetensors"))
    if set(weights) != set(trainable):
        raise BadSetting(f"{directory.name}: its trainable tensors do not match this model")
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(weights[name].to(parameter.device, parameter.dtype))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = torch.load(directory / f"rng-{accelerator.process_index}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])
