"""The cost estimate as the dry run shows it: a Rich table, a row per task, the teachers' fine-tuning
and the total, and the lines that say what it assumed (orchestrator.cost computes it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

COST_COLUMNS = ("task", "trials", "examples", "tokens", "teacher", "student", "eval")


def cost_table(estimate: Any, title: str | None = None) -> Table:
    """A row per task, the teachers' fine-tuning and the total; two lines in a cell under early stopping."""
    profile = estimate.profile
    title = title or f"cost of sweep {estimate.name} on {profile.name}"
    table = Table(title=Text(f"{title}\n(FLOP: teacher forward, student forward + backward, evaluation)"),
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in (*COST_COLUMNS, f"{profile.unit}-h", "wall"):
        table.add_column(column, justify="left" if column == "task" else "right", overflow="fold")
    rows = [*estimate.tasks, *([estimate.teachers] if estimate.teachers else []), estimate.total]
    for row in rows:
        table.add_row(*cost_cells(row))
    return table


def cost_notes(estimate: Any) -> list[str]:
    """What the table assumed: the device, the stops, the row lengths, what it could not count."""
    profile = estimate.profile
    lines = [f"{profile.name}: {profile.device}; wall-clock on {estimate.devices:g} x {profile.unit} (--devices N), "
             "compute only; another device: --device-profile NAME|FILE"]
    if estimate.stopping:
        lines.append(f"two figures in a cell: with the expected stops, then with none; {estimate.stopping.describe()}")
    lines.append(length_line(estimate.tasks))
    if estimate.teachers:
        lines.append("teachers: fine-tuning one teacher per task first (teacher_finetune), skipped where one is cached")
    return [*lines, *(f"{u} (its FLOPs and hours are not counted)" for u in estimate.total.unknown), *estimate.notes]


def study_total_line(estimate: Any) -> str:
    total, unit = estimate.total, estimate.distill.profile.unit
    if total.full.device_hours is None:
        return f"study {estimate.name}: total not counted, a shape is unknown"
    hours = span(total.expected.device_hours, total.full.device_hours, si, " to ")
    wall = span(total.expected.wall_hours, total.full.wall_hours, duration, " to ")
    return f"study {estimate.name} in all: {hours} {unit}-hours, wall-clock {wall} (stage 1, then stage 2)"


def length_line(tasks: list[Any]) -> str:
    """Each task's tokens a row and padded batch, grouped by where its lengths come from."""
    by_source: dict[str, dict[tuple[str, str], list[str]]] = {}
    for task in tasks:
        for source, mean, padded in task.lengths:
            by_source.setdefault(source, {}).setdefault((task.task, f"{mean:.0f}"), []).append(f"{padded:.0f}")
    shown = ["; ".join(f"{task} {mean} -> {'/'.join(padded)}" for (task, mean), padded in by_task.items())
             + f" ({source})" for source, by_task in by_source.items()]
    return "tokens a row -> padded batch: " + "; ".join(shown)


def cost_cells(row: Any) -> list[Text]:
    """A row's cells; two lines where early stopping makes the figures differ."""
    low, high = row.expected, row.full
    known = high.device_hours is not None
    flops = [span(getattr(low.work, f), getattr(high.work, f), si) if known else "unknown shape"
             for f in ("teacher_flops", "student_flops", "eval_flops")]
    hours = [span(low.device_hours, high.device_hours, si), span(low.wall_hours, high.wall_hours, duration)] \
        if known else ["unknown shape"] * 2
    cells = [row.task, f"{high.trials:,.0f}", span(low.work.examples, high.work.examples, si),
             span(low.work.tokens, high.work.tokens, si), *flops, *hours]
    return [Text(cell) for cell in cells]


def span(low: float, high: float, shown: Callable[[float], str], between: str = "\n") -> str:
    """One figure, or two where early stopping makes them differ: with the expected stops, with none."""
    return shown(high) if shown(low) == shown(high) else f"{shown(low)}{between}{shown(high)}"


def si(value: float) -> str:
    """3 significant digits with an SI prefix: 1.23G."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}"


def duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f}min"
    return f"{hours:,.1f}h" if hours < 48 else f"{hours / 24:,.1f}d"
