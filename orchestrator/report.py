"""Paper-style tables from a sweep: objective x initialisation, mean and std over seeds; `build_report`
writes them beside the sweep and logs them to its MLflow parent run.

Reads what the trials reported (Tune's per-trial `result.json`), so the numbers in the table are
exactly the numbers the trials reported; MLflow receives the same tables as artifacts.

A cell compares like with like: one configuration (every varied key but the seed), and by
default only trials that trained their whole budget. Early-stopped, failed and unfinished trials
are counted beside the cell and listed below the table, never averaged into it.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import claims as paper_claims
from orchestrator.claims import Claims, Observation, check_claims
from orchestrator.experiment_state import read_experiment_state
from orchestrator.outcome import OUTCOME_FILE, TrialOutcome, trial_outcome
from orchestrator.state import OPTUNA_DB, SweepState
from orchestrator.tracking import flatten
from orchestrator.trials import TrialTemplate

# Keys that never make two trials different configurations: the seed is what a cell averages over,
# paths are where a trial ran. Mix and init are the table's own rows and columns.
NOT_A_SETTING = ("training.seed", "output_dir", "cache_dir")
TABLE_AXES = ("objectives", "student.init")
COUNTED = ("stopped", "failed", "diverged", "running", "pending")


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    task: str
    objective_mix: str
    init: str
    seed: int
    outcome: TrialOutcome
    final_score: float | None
    best_score: float | None
    steps: int
    setting: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    curve: tuple[tuple[int, float], ...] = ()  # (step, score) of each prediction-stage evaluation
    # Keys the sweep's grouped early stopping pruned within each cell: a cell shows its best setting.
    tuned: tuple[str, ...] = ()


def tune_trial_states(folder: Path) -> dict[str, str]:
    """trial id -> Tune status from the experiment state Tune would resume from."""
    states = {}
    for trial_json, _runtime in read_experiment_state(folder).get("trial_data", []):
        trial = json.loads(trial_json)
        states[trial["trial_id"]] = trial["status"]
    return states


def read_result_rows(path: Path) -> list[dict[str, Any]]:
    """A trial's reported rows; a last line cut short by a killed driver is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_outcome(trial_dir: Path, tune_status: str, last_result: dict[str, Any] | None) -> TrialOutcome:
    """The outcome the tracker wrote when the trial ended, else derived from what is on disk (also
    where a kill cut the written one short)."""
    written = trial_dir / OUTCOME_FILE
    if written.exists() and tune_status in ("TERMINATED", "ERROR", "UNKNOWN"):
        try:
            data = json.loads(written.read_text())
            return TrialOutcome(data["outcome"], data["step"], data["total_steps"], data.get("error", ""))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # cut short by a kill: derived below, as if it were absent
    error_file = trial_dir / "error.txt"
    error = ""
    if error_file.exists():
        lines = [ln.strip() for ln in error_file.read_text().splitlines() if ln.strip()]
        error = lines[-1] if lines else "unknown error"
    return trial_outcome(tune_status, last_result, error)


def read_trials(experiment_dir: Path, template: TrialTemplate) -> list[TrialRecord]:
    """One record per trial folder, whatever its outcome; scores from prediction-stage rows only."""
    states = tune_trial_states(experiment_dir)
    records = []
    for params_file in sorted(experiment_dir.glob("*/params.json")):
        rows = read_result_rows(params_file.with_name("result.json"))
        trial_id = rows[-1]["trial_id"] if rows else trial_id_of(params_file.parent.name, states)
        if trial_id is None:
            continue
        scored = [r for r in rows if "score" in r]
        drawn = json.loads(params_file.read_text())
        try:
            cfg = template.run_config_of(drawn)
        except ValueError:
            continue  # a draw that is no valid config never trained; its trial failed with the reason
        last = max(rows, key=lambda r: r.get("step", 0)) if rows else None
        last_scored = max(scored, key=lambda r: r.get("step", 0)) if scored else None
        records.append(
            TrialRecord(
                trial_id=trial_id,
                task=cfg.task_name,
                objective_mix=cfg.objective_mix,
                init=cfg.student.init_name,
                seed=cfg.training.seed,
                outcome=read_outcome(params_file.parent, states.get(trial_id, "UNKNOWN"), last),
                final_score=float(last_scored["score"]) if last_scored else None,
                best_score=float(max(r["score"] for r in scored)) if scored else None,
                steps=int(last.get("step", 0)) if last else 0,
                setting=configuration(cfg.model_dump(mode="json")),
                config=template.decode(drawn),
                curve=tuple(sorted({int(r["step"]): float(r["score"]) for r in scored}.items())),
            )
        )
    return records


def trial_id_of(folder_name: str, states: dict[str, str]) -> str | None:
    """A trial that never reported: its id is part of Tune's folder name."""
    return next((trial_id for trial_id in states if trial_id in folder_name), None)


def configuration(resolved: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in flatten(resolved).items() if k not in NOT_A_SETTING}


def split_keys(records: list[TrialRecord]) -> list[str]:
    """Keys whose values differ between trials of one (task, objective mix, init) besides the seed:
    each value of them is a configuration of its own, so a row of its own."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for record in records:
        groups[(record.task, record.objective_mix, record.init)].append(record.setting)
    keys: set[str] = set()
    for settings in groups.values():
        for key in set().union(*settings):
            if len({s.get(key) for s in settings}) > 1:
                keys.add(key)
    tuned = {key for record in records for key in record.tuned}
    return sorted(k for k in keys if k not in TABLE_AXES and k not in tuned)


def tuned_keys(spec: Any, records: list[TrialRecord]) -> tuple[str, ...]:
    """The space keys a stopping scheduler compared within each study cell (not grouped by, not the
    seed): the sweep tuned them, so a cell shows their best setting, not a row per value."""
    from orchestrator.search import STOPPING, factor_of

    group_by = spec.scheduler.group_by
    if spec.scheduler.type not in STOPPING or group_by is None:
        return ()
    settings = {key for record in records for key in record.setting}
    return tuple(sorted(key for key in spec.space if key in settings and key not in group_by
                        and key != "training.seed" and factor_of(key) is None))


def tuned_setting(record: TrialRecord) -> str:
    return ", ".join(f"{key}={short(record.setting.get(key, '-'))}" for key in record.tuned)


def winners(records: list[TrialRecord], value: str, include_stopped: bool) -> tuple[set[str], dict[str, str]]:
    """The trials behind each cell: where the sweep tuned keys within cells, those of the cell's best
    setting (highest mean over its counted trials); with a note per trial id of the choice."""
    labels = row_labels(records)
    by_cell: dict[tuple[str, str, str], dict[str, list[TrialRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_cell[(record.task, labels[record.trial_id], record.init)][tuned_setting(record)].append(record)
    kept: set[str] = set()
    notes: dict[str, str] = {}
    for settings in by_cell.values():
        scores = {s: [getattr(r, value) for r in members if in_cell(r, value, include_stopped)]
                  for s, members in settings.items()}
        best = max((s for s in scores if scores[s]), key=lambda s: sum(scores[s]) / len(scores[s]), default=None)
        for setting, members in settings.items():
            if len(settings) == 1 or setting == best:
                kept.update(r.trial_id for r in members)
            if len(settings) > 1 and setting == best:
                notes.update({r.trial_id: f"best of {len(settings)}: {setting}" for r in members})
    return kept, notes


def row_label(record: TrialRecord, keys: list[str]) -> str:
    """`kd (student.num_attention_heads=6, training.learning_rate=0.000386)`: the mix and what else
    makes this configuration one of its own."""
    if not keys:
        return record.objective_mix
    values = ", ".join(f"{key}={short(record.setting.get(key, '-'))}" for key in keys)
    return f"{record.objective_mix} ({values})"


def short(value: str) -> str:
    """Drawn floats at 3 significant digits: enough to tell configurations apart in a row label."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.3g}"


def in_cell(record: TrialRecord, value: str, include_stopped: bool) -> bool:
    kinds = ("completed", "stopped") if include_stopped else ("completed",)
    return record.outcome.kind in kinds and getattr(record, value) is not None


def cell_stats(records: list[TrialRecord], value: str, include_stopped: bool,
               chosen: tuple[set[str], dict[str, str]] | None = None) -> dict[str, Any]:
    """A cell's statistics over its counted trials (only those of its best tuned setting, `chosen`)."""
    kept, notes = chosen if chosen is not None else ({r.trial_id for r in records}, {})
    scores = [getattr(r, value) for r in records if in_cell(r, value, include_stopped) and r.trial_id in kept]
    counts = {kind: sum(r.outcome.kind == kind for r in records) for kind in COUNTED}
    mean = sum(scores) / len(scores) if scores else math.nan
    std = pd.Series(scores).std() if len(scores) > 1 else math.nan
    choice = next((notes[r.trial_id] for r in records if r.trial_id in notes), "")
    return {"mean": mean, "std": std, "n": len(scores), **counts, "chosen": choice}


def format_cell(stats: dict[str, Any], include_stopped: bool) -> str:
    """'84.8 ± 1.2 (n=2, 1 stopped)'; 'no completed trial (2 stopped)' where nothing finished."""
    extras = [f"{stats[kind]} {kind}" for kind in COUNTED if stats[kind]]
    if stats.get("chosen"):
        extras.insert(0, stats["chosen"])
    if include_stopped and stats["stopped"]:
        extras = [f"incl. {stats['stopped']} stopped"] + [e for e in extras if not e.endswith(" stopped")]
    if not stats["n"]:
        return "no completed trial" + (f" ({', '.join(extras)})" if extras else "")
    count = ", ".join([f"n={stats['n']}", *extras])
    if stats["n"] < 2:
        return f"{100 * stats['mean']:.1f} ({count})"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f} ({count})"


def row_labels(records: list[TrialRecord]) -> dict[str, str]:
    """trial id -> the label of its table row, from the keys that vary within its task."""
    labels = {}
    for task in {r.task for r in records}:
        in_task = [r for r in records if r.task == task]
        keys = split_keys(in_task)
        labels.update({r.trial_id: row_label(r, keys) for r in in_task})
    return labels


def cells(records: list[TrialRecord], value: str, include_stopped: bool) -> pd.DataFrame:
    """Long form: one row per (task, configuration, init) with its statistics."""
    rows = []
    labels = row_labels(records)
    chosen = winners(records, value, include_stopped)
    for task in sorted({r.task for r in records}):
        groups: dict[tuple[str, str], list[TrialRecord]] = defaultdict(list)
        for record in (r for r in records if r.task == task):
            groups[(labels[record.trial_id], record.init)].append(record)
        for (label, init), members in sorted(groups.items()):
            rows.append({"task": task, "configuration": label, "init": init,
                         **cell_stats(members, value, include_stopped, chosen)})
    return pd.DataFrame(rows)


def study_tables(records: list[TrialRecord], value: str = "best_score",
                 include_stopped: bool = False) -> dict[str, pd.DataFrame]:
    """Per task: rows = configuration (objective mix, plus any other varied key), columns = init."""
    frame = cells(records, value, include_stopped)
    tables = {}
    for task, rows in frame.groupby("task"):
        shown = rows.assign(cell=[format_cell(s, include_stopped) for s in rows.to_dict("records")])
        tables[str(task)] = shown.pivot(index="configuration", columns="init", values="cell").fillna("")
    return tables


def markdown_table(table: pd.DataFrame, corner: str) -> str:
    header = [corner, *map(str, table.columns)]
    rows = [[str(index), *map(str, values)] for index, values in zip(table.index, table.values)]
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def left_out(records: list[TrialRecord], value: str) -> list[str]:
    """One line per trial that did not complete its budget: how it ended and what it had reached."""
    lines = []
    for record in sorted(records, key=lambda r: (r.task, r.objective_mix, r.init, r.seed)):
        if record.outcome.kind == "completed":
            continue
        score = getattr(record, value)
        reached = f"; {value.replace('_', ' ')} {100 * score:.1f} by then" if score is not None else ""
        lines.append(f"- `{record.trial_id}` {record.task}, {record.objective_mix}, init {record.init}, "
                     f"seed {record.seed}: {record.outcome.detail}{reached}")
    return lines


def counted_trials(include_stopped: bool) -> str:
    return ("completed and early-stopped trials (stopped ones at the step they reached)" if include_stopped
            else "trials that trained their whole budget")


def claims_of(records: list[TrialRecord], value: str, include_stopped: bool) -> Claims:
    """The paper's claims checked on the same trials, labels and counting rule as the tables."""
    labels = row_labels(records)
    kept, _ = winners(records, value, include_stopped)
    return check_claims([
        Observation(task=r.task, configuration=labels[r.trial_id], mix=r.objective_mix, init=r.init, seed=r.seed,
                    score=getattr(r, value) if in_cell(r, value, include_stopped) else None)
        for r in records if r.trial_id in kept
    ])


def claims_scope(value: str, include_stopped: bool) -> str:
    return f"the {value.replace('_', ' ')} (x100) of {counted_trials(include_stopped)}"


def render_markdown(records: list[TrialRecord], value: str, include_stopped: bool) -> str:
    which = counted_trials(include_stopped)
    lines = [
        f"# Sweep report: {value.replace('_', ' ')} on the validation split (x100), mean ± std over seeds",
        "",
        f"Cells hold {which}; n counts them. Each row is one configuration: trials in a cell differ "
        "only in their seed. Trials stopped early, failed or unfinished are counted beside the cell "
        "and listed below the table" + ("." if include_stopped else "; `--include-stopped` adds the stopped ones."),
        "",
    ]
    tuned = sorted({key for r in records for key in r.tuned})
    if tuned:
        lines += [f"The sweep tuned {', '.join(tuned)} within each cell (early stopping compared only those): "
                  "a cell shows its best setting, chosen on this same validation split, so its score is an "
                  "optimistic estimate, as a tuned dev-set score is.", ""]
    for task, table in study_tables(records, value, include_stopped).items():
        lines += [f"## {task}", "", markdown_table(table, corner="objective \\ init"), ""]
    claims = claims_of(records, value, include_stopped)
    lines += paper_claims.render_markdown(claims, claims_scope(value, include_stopped))
    others = left_out(records, value)
    if others:
        title = "Trials that did not complete" if include_stopped else "Not in the cells"
        lines += [f"## {title}", "", *others, ""]
    candidates = [r for r in records if in_cell(r, value, include_stopped)]
    lines += ["## Best trial", ""]
    if candidates:
        best = max(candidates, key=lambda r: getattr(r, value))
        lines += [
            f"- trial `{best.trial_id}`: {best.task}, {best.objective_mix}, init {best.init}, seed {best.seed}",
            f"- {value}: {getattr(best, value):.4f}; {best.outcome.detail}",
            "",
        ]
    else:
        lines += ["- no trial has completed its budget yet", ""]
    return "\n".join(lines)


def write_report(records: list[TrialRecord], out_dir: Path, value: str = "best_score",
                 include_stopped: bool = False, search_figures: tuple[Path, ...] = ()) -> tuple[Path, Path, str]:
    """Save report.md, report.csv (one row per cell), trials.csv, claims.json (the numbers behind the
    claims section), the figures and report.html (all on one page); return the Markdown's and the
    CSV's paths and the Markdown."""
    if not records:
        raise ValueError("no trial of this sweep has started yet")
    markdown = render_markdown(records, value, include_stopped)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    md_path.write_text(markdown)
    table = cells(records, value, include_stopped)
    table.to_csv(csv_path, index=False)
    pd.DataFrame([
        {"trial_id": r.trial_id, "task": r.task, "objective_mix": r.objective_mix, "init": r.init, "seed": r.seed,
         "outcome": r.outcome.kind, "outcome_detail": r.outcome.detail, "steps": r.steps,
         "final_score": r.final_score, "best_score": r.best_score}
        for r in records
    ]).to_csv(out_dir / "trials.csv", index=False)
    counted = ["completed", "stopped"] if include_stopped else ["completed"]
    checked = paper_claims.as_json(claims_of(records, value, include_stopped), value, counted)
    (out_dir / "claims.json").write_text(json.dumps(checked, indent=1) + "\n")
    from orchestrator.plots import heatmaps, learning_curves  # matplotlib: only where a report is drawn

    figures = heatmaps(cells(records, value, include_stopped=False), out_dir, value)
    figures += learning_curves(records, row_labels(records), out_dir)
    (out_dir / "report.html").write_text(render_html(records, value, include_stopped, figures, search_figures))
    return md_path, csv_path, markdown


def render_html(records: list[TrialRecord], value: str, include_stopped: bool, figures: list[Path],
                search_figures: tuple[Path, ...] = ()) -> str:
    """Tables and figures on one page, per task; the Markdown report's text around them."""
    from orchestrator.plots import safe_name

    intro, *_ = render_markdown(records, value, include_stopped).split("\n## ", 1)
    title, _, explanation = intro.partition("\n")
    parts = [f"<h1>{html.escape(title.lstrip('# '))}</h1>", f"<p>{html.escape(explanation.strip())}</p>"]
    for task, shown in study_tables(records, value, include_stopped).items():
        parts += [f"<h2>{html.escape(task)}</h2>", shown.to_html(border=0)]
        parts += [f'<img src="{path.name}" alt="{path.stem}">' for path in figures
                  if path.stem.endswith(f"-{safe_name(task)}")]
    parts += paper_claims.render_html(claims_of(records, value, include_stopped), claims_scope(value, include_stopped))
    if search_figures:
        parts += ["<h2>Optuna's study</h2>", *(f'<img src="{path.name}" alt="{path.stem}">' for path in search_figures)]
    others = left_out(records, value)
    if others:
        parts += ["<h2>Trials that did not complete</h2>", "<ul>"]
        parts += [f"<li>{html.escape(line.removeprefix('- ').replace('`', ''))}</li>" for line in others]
        parts += ["</ul>"]
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:4px 10px}img{max-width:100%}"
    return f"<!doctype html><meta charset='utf-8'><title>{html.escape(title.lstrip('# '))}</title>" \
           f"<style>{style}</style>\n" + "\n".join(parts) + "\n"


def build_report(sweep_dir: Path, value: str, include_stopped: bool = False) -> tuple[Path, Path, str, bool]:
    """Write the report next to the sweep and log it to the sweep's MLflow parent run."""
    state = SweepState.load(sweep_dir)
    records = read_trials(state.experiment_dir, state.template)
    tuned = tuned_keys(state.sweep_spec, records)
    records = [replace(record, tuned=tuned) for record in records]
    out_dir = Path(state.sweep_dir) / "report"
    md_path, csv_path, markdown = write_report(records, out_dir, value, include_stopped, study_figures(state, out_dir))
    try:
        from mlflow import MlflowClient

        client = MlflowClient(state.tracking_uri)
        client.log_artifacts(state.parent_run_id, str(md_path.parent), "report")
        for key, text in paper_claims.summary(claims_of(records, value, include_stopped)).items():
            client.set_tag(state.parent_run_id, key, text)
        logged = True
    except Exception as err:  # the report on disk is the result; MLflow is a copy
        print(f"[distillsweep] could not log the report to MLflow ({err})")
        logged = False
    return md_path, csv_path, markdown, logged


def study_figures(state: SweepState, out_dir: Path) -> tuple[Path, ...]:
    """Importances (and a Pareto front) from the sweep's Optuna study, where Optuna searched."""
    if not (Path(state.sweep_dir) / OPTUNA_DB).exists():
        return ()
    import optuna

    from orchestrator.plots import optuna_figures

    out_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.load_study(study_name=state.sweep_spec.name, storage=state.optuna_url)
    return tuple(optuna_figures(study, out_dir))
