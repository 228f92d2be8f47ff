"""The report's figures: the objective x initialisation heatmap and the learning curves, per task.

They show the same cells as the tables (`report.cells`): a heatmap cell is the mean over the
trials that trained their whole budget; a cell where none did is grey and says how its trials
ended, so an early-stopped cell never looks like a score. Learning curves draw every trial of a
cell (stopped ones dashed, ending in x) and the mean over its seeds with a band of one standard
deviation; one panel per configuration, one colour per initialisation. SVG, so that one file serves the HTML report, MLflow's
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
        cmap = plt.get_cmap("viridis").with_extremes(bad=MISSING_COLOUR)
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
    """One figure per task, one panel per configuration, one colour per initialisation: each cell's
    trials thin, their mean over seeds thick with a band of one standard deviation."""
    paths = []
    for task in sorted({r.task for r in records}):
        in_task = [r for r in records if r.task == task]
        by_cell: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for record in in_task:
            by_cell[(labels[record.trial_id], record.init)].append(record)
        configs = sorted({config for config, _ in by_cell})
        inits = sorted({init for _, init in by_cell})
        columns = min(3, len(configs))
        rows = math.ceil(len(configs) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 0.9 + 2.3 * rows),
                                 sharex=True, sharey=True, squeeze=False)
        colours = dict(zip(inits, plt.get_cmap("tab10").colors))
        for index, ax in enumerate(axes.flat):
            if index >= len(configs):
                ax.set_visible(False)
                continue
            for init in inits:
                draw_cell(ax, by_cell.get((configs[index], init), []), colours[init], init)
            ax.set_title(configs[index], fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("step", fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel("score", fontsize=8)
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper right", fontsize=7, title="init",
                   title_fontsize=7)
        fig.suptitle(f"{task}: validation score per evaluation\n"
                     "(thin: each seed, dashed ending in x if stopped; thick: mean over seeds, band ± std)",
                     fontsize=9)
        fig.subplots_adjust(left=0.08, right=0.88, bottom=0.5 / (0.9 + 2.3 * rows), top=1 - 0.8 / (0.9 + 2.3 * rows),
                            hspace=0.35, wspace=0.1)
        paths.append(save(fig, out_dir / f"curves-{safe_name(task)}.svg", tight=False))
    return paths


def draw_cell(ax: Any, records: list[Any], colour: Any, init: str) -> None:
    for record in records:
        if not record.curve:
            continue
        steps, scores = zip(*record.curve)
        stopped = record.outcome.kind != "completed"
        ax.plot(steps, scores, linewidth=0.6, color=colour, alpha=0.6, **({"linestyle": "--"} if stopped else {}))
        if stopped:
            ax.plot(steps[-1], scores[-1], "x", color=colour)
    by_step: dict[int, list[float]] = defaultdict(list)
    for record in records:
        for step, score in record.curve:
            by_step[step].append(score)
    steps = sorted(by_step)
    if steps:
        means = [mean(by_step[s]) for s in steps]
        spreads = [stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
        ax.plot(steps, means, color=colour, linewidth=1.6, label=init)
        ax.fill_between(steps, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                        color=colour, alpha=0.2, linewidth=0)


def save(fig: Any, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def optuna_figures(study: Any, out_dir: Path) -> list[Path]:
    """For a sweep Optuna searched: which settings mattered (fANOVA importances of the first
    objective) and, with two objectives, the Pareto front. Needs two or more completed trials."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = {name for trial in completed for name in trial.params}
    if len(completed) < 2 or not varied:
        return []
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        multi = len(study.directions) > 1
        target = {"target": lambda t: t.values[0], "target_name": study.metric_names[0] if study.metric_names
                  else "objective 0"} if multi else {}
        ax = optuna_plots.plot_param_importances(study, **target)
        paths.append(save(ax.figure, out_dir / "optuna-importances.svg"))
        if multi and len(study.directions) == 2:
            ax = optuna_plots.plot_pareto_front(study)
            paths.append(save(ax.figure, out_dir / "optuna-pareto.svg"))
    return paths
