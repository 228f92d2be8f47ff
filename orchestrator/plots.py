"""The report's figures: the objective x initialisation heatmap and the learning curves, per task.

They show the same cells as the tables (`report.cells`): a heatmap cell is the mean over the
trials that trained their whole budget; a cell where none did is grey and says how its trials
ended, so an early-stopped cell never looks like a score. Learning curves draw every trial of a
cell (stopped ones dashed, ending in x) and, where two or more seeds reported a step, their mean
with a band of one standard deviation. SVG, so that one file serves the HTML report, MLflow's
artifact view and a paper draft.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, and a tenth of the size
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402

STOPPED_STYLE = {"linestyle": "--", "alpha": 0.7}
MISSING_COLOUR = "#d9d9d9"


def safe_name(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task)


def cell_text(row: dict[str, Any]) -> str:
    ended = [f"{row[kind]} {kind}" for kind in ("stopped", "failed", "diverged", "running", "pending") if row[kind]]
    if not row["n"]:
        return "no completed\ntrial" + ("\n" + ", ".join(ended) if ended else "")
    return "\n".join([f"{100 * row['mean']:.1f}", f"n={row['n']}", *ended])


def heatmaps(cells: pd.DataFrame, out_dir: Path, value: str) -> list[Path]:
    """One figure per task: rows are configurations, columns initialisations."""
    paths = []
    for task, rows in cells.groupby("task"):
        grid = rows.pivot(index="configuration", columns="init", values="mean")
        texts = {(r["configuration"], r["init"]): cell_text(r) for r in rows.to_dict("records")}
        scores = grid.to_numpy(dtype=float) * 100
        fig, ax = plt.subplots(figsize=(max(4.5, 2.2 + 1.8 * grid.shape[1]), 1.6 + 0.8 * grid.shape[0]))
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad(MISSING_COLOUR)
        image = ax.imshow(scores, cmap=cmap, aspect="auto")
        for i, config in enumerate(grid.index):
            for j, init in enumerate(grid.columns):
                done = not math.isnan(scores[i, j])
                bright = done and sum(cmap(image.norm(scores[i, j]))[:3]) > 1.5
                ax.text(j, i, texts.get((config, init), ""), ha="center", va="center", fontsize=8,
                        color="black" if bright or not done else "white", fontstyle="normal" if done else "italic")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(c) for c in grid.index])
        ax.set_xlabel("initialisation")
        ax.set_title(f"{task}: {value.replace('_', ' ')} x100\n(mean over trials that trained their whole budget)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
        paths.append(save(fig, out_dir / f"heatmap-{safe_name(str(task))}.svg"))
    return paths


def learning_curves(records: list[Any], labels: dict[str, str], out_dir: Path) -> list[Path]:
    """One figure per task, one panel per cell (configuration x initialisation)."""
    paths = []
    for task in sorted({r.task for r in records}):
        in_task = [r for r in records if r.task == task]
        by_cell: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for record in in_task:
            by_cell[(labels[record.trial_id], record.init)].append(record)
        configs = sorted({config for config, _ in by_cell})
        inits = sorted({init for _, init in by_cell})
        fig, axes = plt.subplots(len(configs), len(inits), figsize=(max(4.5, 3.2 * len(inits)), 0.6 + 2.4 * len(configs)),
                                 sharex=True, sharey=True, squeeze=False)
        for i, config in enumerate(configs):
            for j, init in enumerate(inits):
                draw_cell(axes[i][j], by_cell.get((config, init), []))
                axes[i][j].set_title(f"{config} | {init}", fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("step")
        for row in axes:
            row[0].set_ylabel("score")
        fig.suptitle(f"{task}: validation score per evaluation\n(stopped trials dashed; black: mean over seeds, band ± std)",
                     fontsize=9)
        paths.append(save(fig, out_dir / f"curves-{safe_name(task)}.svg"))
    return paths


def draw_cell(ax: Any, records: list[Any]) -> None:
    for record in records:
        if not record.curve:
            continue
        steps, scores = zip(*record.curve)
        stopped = record.outcome.kind != "completed"
        ax.plot(steps, scores, linewidth=0.8, label=f"seed {record.seed}", **(STOPPED_STYLE if stopped else {}))
        if stopped:
            ax.plot(steps[-1], scores[-1], "x", color="black")
    by_step: dict[int, list[float]] = defaultdict(list)
    for record in records:
        for step, score in record.curve:
            by_step[step].append(score)
    shared = sorted(step for step, scores in by_step.items() if len(scores) > 1)
    if shared:
        means = [mean(by_step[s]) for s in shared]
        spreads = [stdev(by_step[s]) for s in shared]
        ax.plot(shared, means, color="black", linewidth=1.5)
        ax.fill_between(shared, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                        color="grey", alpha=0.3)
    if not records:
        ax.text(0.5, 0.5, "no trial", ha="center", va="center", transform=ax.transAxes)


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
