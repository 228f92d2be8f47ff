"""Paper-style tables from a finished sweep: objective x initialisation, mean and std over seeds.

Reads what the trials reported (Tune's per-trial `result.json`), so the numbers in the table are
exactly the numbers the trials reported; MLflow receives the same tables as artifacts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.config import TrialTemplate


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    task: str
    objective_mix: str
    init: str
    seed: int
    final_score: float
    best_score: float
    steps: int
    config: dict[str, Any]


def read_trials(experiment_dir: Path, template: TrialTemplate) -> list[TrialRecord]:
    """One record per trial folder that reported at least one evaluation."""
    records = []
    for params_file in sorted(experiment_dir.glob("*/params.json")):
        results_file = params_file.with_name("result.json")
        if not results_file.exists():
            continue
        rows = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "score" in r]
        if not rows:
            continue
        drawn = json.loads(params_file.read_text())
        config = template.decode(drawn)
        cfg = template.resolve(drawn)
        last = max(rows, key=lambda r: r.get("step", 0))
        records.append(
            TrialRecord(
                trial_id=rows[-1].get("trial_id", params_file.parent.name),
                task=cfg.task if isinstance(cfg.task, str) else cfg.task.name,
                objective_mix=cfg.objective_mix,
                init=cfg.student.init_name,
                seed=cfg.training.seed,
                final_score=float(last["score"]),
                best_score=float(max(r["score"] for r in rows)),
                steps=int(last.get("step", 0)),
                config=config,
            )
        )
    return records


def study_tables(records: list[TrialRecord], value: str = "best_score") -> dict[str, pd.DataFrame]:
    """Per task: rows = objective mix, columns = initialisation, cells = 'mean ± std (n)'."""
    frame = pd.DataFrame([r.__dict__ for r in records])
    tables = {}
    for task, rows in frame.groupby("task"):
        stats = rows.groupby(["objective_mix", "init"])[value].agg(["mean", "std", "count"])
        cells = stats.apply(lambda s: format_cell(s["mean"], s["std"], int(s["count"])), axis=1)
        tables[str(task)] = cells.unstack("init").fillna("")
    return tables


def format_cell(mean: float, std: float, count: int) -> str:
    if count < 2 or math.isnan(std):
        return f"{100 * mean:.1f} (n={count})"
    return f"{100 * mean:.1f} ± {100 * std:.1f} (n={count})"


def summary_frame(records: list[TrialRecord], value: str = "best_score") -> pd.DataFrame:
    """Long form: one row per (task, objective mix, init) with mean, std, n, in metric units."""
    frame = pd.DataFrame([r.__dict__ for r in records])
    stats = frame.groupby(["task", "objective_mix", "init"])[value].agg(["mean", "std", "count"]).reset_index()
    return stats.rename(columns={"count": "n"})


def markdown_table(table: pd.DataFrame, corner: str) -> str:
    header = [corner, *map(str, table.columns)]
    rows = [[str(index), *map(str, values)] for index, values in zip(table.index, table.values)]
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def render_markdown(tables: dict[str, pd.DataFrame], best: TrialRecord, value: str) -> str:
    lines = [f"# Sweep report ({value.replace('_', ' ')} on the validation split, x100, mean ± std over seeds)", ""]
    for task, table in tables.items():
        lines += [f"## {task}", "", markdown_table(table, corner="objective \\ init"), ""]
    lines += [
        "## Best trial",
        "",
        f"- trial `{best.trial_id}`: {best.task}, {best.objective_mix}, init {best.init}, seed {best.seed}",
        f"- {value}: {getattr(best, value):.4f} after {best.steps} steps",
        "",
    ]
    return "\n".join(lines)


def write_report(records: list[TrialRecord], out_dir: Path, value: str = "best_score") -> tuple[Path, Path, str]:
    """Save report.md, report.csv and trials.csv; return the paths and the Markdown."""
    if not records:
        raise ValueError("no trial of this sweep has reported an evaluation yet")
    best = max(records, key=lambda r: getattr(r, value))
    markdown = render_markdown(study_tables(records, value), best, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    md_path.write_text(markdown)
    summary_frame(records, value).to_csv(csv_path, index=False)
    pd.DataFrame([{k: v for k, v in r.__dict__.items() if k != "config"} for r in records]).to_csv(
        out_dir / "trials.csv", index=False
    )
    return md_path, csv_path, markdown
