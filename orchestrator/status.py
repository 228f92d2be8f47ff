"""Reading a sweep back from disk: trial states, the study report, and unsent MLflow records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.messages import UserError
from orchestrator.report import read_trials, tune_trial_states, write_report
from orchestrator.sweep import PENDING_FILE, SweepState
from orchestrator.tracking import MlflowJournal


def experiment_dir(state: SweepState) -> Path:
    spec = state.sweep_spec
    root = spec.storage_root()
    if "://" in root:
        raise UserError(f"storage {root} is remote: run status/report where it is mounted, or copy it locally")
    return Path(root) / spec.name


def trial_statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: Tune's state, how it ended (or how far it is), its configuration and score."""
    state = SweepState.load(sweep_dir)
    folder = experiment_dir(state)
    states = tune_trial_states(folder)
    records = {r.trial_id: r for r in read_trials(folder, state.template)}
    rows = []
    for trial_id in sorted(set(states) | set(records)):
        record = records.get(trial_id)
        rows.append(
            {
                "trial": trial_id,
                "state": states.get(trial_id, "UNKNOWN"),
                "outcome": record.outcome.detail if record else "pending",
                "outcome_kind": record.outcome.kind if record else "pending",
                "objective_mix": record.objective_mix if record else "",
                "init": record.init if record else "",
                "task": record.task if record else "",
                "seed": record.seed if record else "",
                "step": record.steps if record else 0,
                "score": f"{record.final_score:.4f}" if record and record.final_score is not None else "",
            }
        )
    return rows


def build_report(sweep_dir: Path, value: str, include_stopped: bool = False) -> tuple[Path, Path, str, bool]:
    """Write the report next to the sweep and log it to the sweep's MLflow parent run."""
    state = SweepState.load(sweep_dir)
    records = read_trials(experiment_dir(state), state.template)
    md_path, csv_path, markdown = write_report(records, Path(state.sweep_dir) / "report", value, include_stopped)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(state.tracking_uri)
        for path in (md_path, csv_path, md_path.with_name("trials.csv")):
            client.log_artifact(state.parent_run_id, str(path), "report")
        logged = True
    except Exception as err:  # the report on disk is the result; MLflow is a copy
        print(f"[distillsweep] could not log the report to MLflow ({err})")
        logged = False
    return md_path, csv_path, markdown, logged


def sync_pending(sweep_dir: Path) -> tuple[int, int]:
    """Replay records that the tracker kept while MLflow did not answer."""
    state = SweepState.load(sweep_dir)
    pending = Path(state.sweep_dir) / PENDING_FILE
    if not pending.exists():
        return 0, 0
    records = [json.loads(line) for line in pending.read_text().splitlines() if line.strip()]
    journal = MlflowJournal(state.tracking_uri, state.experiment_id, pending)
    for record in records:
        if record["op"] != "create" and record["key"] not in journal.run_ids:
            found = journal.find_run(record["key"], state.parent_run_id)
            if found:
                journal.run_ids[record["key"]] = found
        journal.queue.append(record)
    journal.flush()
    left = journal.save_pending()
    return len(records) - left, left
