"""Training metrics on disk: ``metrics.jsonl`` (one JSON object per step or evaluation) and ``loss.png``.

The plot is drawn with PIL (a dependency already), not matplotlib (not one), so it works everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 420, 56
TRAIN_COLOUR, EVAL_COLOUR, AXIS_COLOUR = (40, 90, 200), (220, 80, 30), (60, 60, 60)


class MetricsLog:
    """Appends metric records to ``metrics.jsonl``; a resumed run first drops records past its step."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        if resume_step and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif not resume_step:
            self.path.write_text("", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], target: Path) -> Path:
    """Draw train loss (line) and eval loss (dots) against the step, with min/max labels on the axes."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    points = train + evals
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline=AXIS_COLOUR)
    draw.text((left, 6), "loss (blue: train, orange: eval)", fill=AXIS_COLOUR)
    if points:
        x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
        y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
        x_span, y_span = max(x_high - x_low, 1), max(y_high - y_low, 1e-9)

        def place(step: float, loss: float) -> tuple[float, float]:
            return (left + (step - x_low) / x_span * (right - left),
                    bottom - (loss - y_low) / y_span * (bottom - top))

        if len(train) > 1:
            draw.line([place(*p) for p in train], fill=TRAIN_COLOUR, width=2)
        elif train:
            x, y = place(*train[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=TRAIN_COLOUR)
        for step, loss in evals:
            x, y = place(step, loss)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=EVAL_COLOUR)
        draw.text((4, top), f"{y_high:.3f}", fill=AXIS_COLOUR)
        draw.text((4, bottom - 10), f"{y_low:.3f}", fill=AXIS_COLOUR)
        draw.text((left, bottom + 6), f"step {x_low}", fill=AXIS_COLOUR)
        draw.text((right - 60, bottom + 6), f"step {x_high}", fill=AXIS_COLOUR)
    image.save(target, format="PNG")
    return target
