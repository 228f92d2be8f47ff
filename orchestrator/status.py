"""Reading a sweep back from disk: trial states, the study report, and MLflow records still to send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.journal import Delivery, Journal, undelivered
from orchestrator.messages import UserError
from orchestrator.report import read_trials, tune_trial_states, write_report
from orchestrator.sweep import SweepState
from orchestrator.tracker import reconcile_with_tune


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
        client.log_artifacts(state.parent_run_id, str(md_path.parent), "report")
        logged = True
    except Exception as err:  # the report on disk is the result; MLflow is a copy
        print(f"[distillsweep] could not log the report to MLflow ({err})")
        logged = False
    return md_path, csv_path, markdown, logged


def undelivered_records(sweep_dir: Path) -> int:
    return undelivered(Path(SweepState.load(sweep_dir).sweep_dir))


def sync_journal(sweep_dir: Path) -> Delivery:
    """Send MLflow what the sweep's journal (and Tune's files) hold and MLflow lacks, checking each
    run first so nothing is logged twice; the parent run ends here if its sweep had ended."""
    state = SweepState.load(sweep_dir)
    journal = Journal(Path(state.sweep_dir), state.tracking_uri, state.experiment_id, {"sweep": state.parent_run_id})
    try:
        if "://" not in state.sweep_spec.storage_root():
            reconcile_with_tune(journal, experiment_dir(state), state.sweep_spec.name)
        return journal.deliver_all()
    finally:
        journal.close()
