"""Training you can watch: ``metrics.jsonl`` (one JSON object per step or evaluation), ``loss.png`` (redrawn at
every save) and progress on stderr (a live bar on a terminal, one plain line every so often otherwise, so a
redirected or ``nohup``'d run shows progress while it runs).

The plot is drawn with PIL (a dependency already), not matplotlib (not one), so it works everywhere. Loss is
drawn on a log axis: the first steps' spike would otherwise flatten everything after it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 420, 56
TRAIN_COLOUR, EVAL_COLOUR, AXIS_COLOUR, GRID_COLOUR = (40, 90, 200), (220, 80, 30), (60, 60, 60), (225, 225, 225)
LINE_EVERY_SECONDS = 30.0  # a progress line at least this often when stderr is not a terminal...
LINE_EVERY_FRACTION = 0.05  # ...and every 5% of the steps


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
    """Draw train loss (line) and eval loss (ringed dots) against the step on a log axis, with a dashed line
    where a new stage starts; written to a temporary name and renamed, so a viewer never sees half a file."""
    train = [(r["step"], r["loss"]) for r in records if _positive(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in records if _positive(r.get("eval_loss"))]
    stages = _stage_starts(records)
    points = train + evals
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline=AXIS_COLOUR)
    draw.text((left, 6), "loss, log scale (blue: train, orange: eval)", fill=AXIS_COLOUR)
    if points:
        x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
        y_low, y_high = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
        if y_high - y_low < 0.1:  # a nearly flat curve: show a band around it rather than magnified noise
            y_low, y_high = y_low - 0.05, y_high + 0.05
        x_span, y_span = max(x_high - x_low, 1), y_high - y_low

        def place(step: float, loss: float) -> tuple[float, float]:
            return (left + (step - x_low) / x_span * (right - left),
                    bottom - (math.log10(loss) - y_low) / y_span * (bottom - top))

        for tick in _log_ticks(y_low, y_high):
            y = place(x_low, tick)[1]
            draw.line((left + 1, y, right - 1, y), fill=GRID_COLOUR)
            draw.text((4, y - 6), f"{tick:g}", fill=AXIS_COLOUR)
        for step, name in stages:
            x = place(step, 10 ** y_low)[0]
            for y in range(int(top) + 2, int(bottom), 8):
                draw.line((x, y, x, y + 4), fill=AXIS_COLOUR)
            draw.text((x + 4, top + 4), name, fill=AXIS_COLOUR)
        if len(train) > 1:
            draw.line([place(*p) for p in train], fill=TRAIN_COLOUR, width=2)
        elif train:
            x, y = place(*train[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=TRAIN_COLOUR)
        for step, loss in evals:
            x, y = place(step, loss)
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=EVAL_COLOUR, width=2)
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=EVAL_COLOUR)
        if evals:
            step, loss = evals[-1]
            x, y = place(step, loss)
            draw.text((min(x + 8, right - 70), y - 14), f"eval {loss:.3g}", fill=EVAL_COLOUR)
        draw.text((left, bottom + 6), f"step {x_low}", fill=AXIS_COLOUR)
        draw.text((right - 70, bottom + 6), f"step {x_high}", fill=AXIS_COLOUR)
    partial = target.with_name(f".{target.name}.partial")
    image.save(partial, format="PNG")
    partial.replace(target)
    return target


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _stage_starts(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(first step, stage name) of every stage after the first, for runs that chain stages."""
    starts, current = [], None
    for record in records:
        stage = record.get("stage")
        if stage is not None and "loss" in record and stage != current:
            if current is not None:
                starts.append((record["step"], str(stage)))
            current = stage
    return starts


def _log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks between 10**low and 10**high (at most about eight of them)."""
    ticks = [mantissa * 10 ** exponent for exponent in range(math.floor(low), math.ceil(high) + 1)
             for mantissa in (1, 2, 5)]
    inside = [t for t in ticks if low <= math.log10(t) <= high]
    return inside[:: max(1, math.ceil(len(inside) / 8))]


# progress on stderr -------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LineProgress:
    """One plain line per ``LINE_EVERY_FRACTION`` of the steps or ``LINE_EVERY_SECONDS`` (whichever comes first),
    and one at the last step: step, loss, learning rate, samples/s and time left."""

    def __init__(self, stream: TextIO | None = None, every_seconds: float = LINE_EVERY_SECONDS,
                 clock: Any = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.every_seconds = every_seconds
        self.clock = clock
        self._last_time = clock()
        self._last_step = 0

    def update(self, step: int, total: int, **fields: Any) -> None:
        now = self.clock()
        every_steps = max(1, round(total * LINE_EVERY_FRACTION))
        due = step >= total or step - self._last_step >= every_steps or now - self._last_time >= self.every_seconds
        if not due or step == self._last_step:
            return
        self._last_time, self._last_step = now, step
        self.stream.write(progress_line(step, total, **fields) + "\n")
        self.stream.flush()


def progress_line(step: int, total: int, *, loss: float | None = None, lr: float | None = None,
                  rate: float | None = None, eta: float | None = None, stage: str | None = None) -> str:
    parts = [f"{stage} " if stage else "", f"step {step}/{total} ({step / max(total, 1):.0%})"]
    if loss is not None:
        parts.append(f" loss {loss:.4f}")
    if lr is not None:
        parts.append(f" lr {lr:.2e}")
    if rate is not None:
        parts.append(f" {rate:.2f} samples/s")
    if eta is not None:
        parts.append(f" ETA {format_duration(eta)}")
    return "".join(parts)


class TrainingProgress:
    """Progress of a run: a rich bar when stderr is a terminal, ``LineProgress`` lines when it is not, nothing when
    disabled (other processes of a multi-process launch)."""

    def __init__(self, enabled: bool, total: int, start: int = 0, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.total = total
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._lines: LineProgress | None = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
                                 TextColumn("{task.fields[rate]:.2f} samples/s"), TimeRemainingColumn(),
                                 console=Console(file=self.stream))
            self._task = self._bar.add_task("training", total=total, completed=start, loss=float("nan"), lr=0.0,
                                            rate=0.0)
        elif enabled:
            self._lines = LineProgress(self.stream)

    def __enter__(self) -> TrainingProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, *, total: int, loss: float, lr: float, rate: float, eta: float,
               stage: str | None = None) -> None:
        """Record ``step`` of ``total`` (the total may change when a time budget replans the run)."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, completed=step, total=total, loss=loss, lr=lr, rate=rate,
                             description=stage or "training")
        elif self._lines is not None:
            self._lines.update(step, total, loss=loss, lr=lr, rate=rate, eta=eta, stage=stage)

    def note(self, text: str) -> None:
        """A one-off line (a stage starting, a plan made for a time budget)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        elif self._lines is not None:
            self.stream.write(text + "\n")
            self.stream.flush()
