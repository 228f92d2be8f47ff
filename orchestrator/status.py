"""`distillsweep status`: each trial's state read back from disk, and the MLflow records still to send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.journal import undelivered
from orchestrator.report import read_trials, tune_trial_states
from orchestrator.state import SweepState


def trial_statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: Tune's state, how it ended (or how far it is), its configuration and score."""
    state = SweepState.load(sweep_dir)
    folder = state.experiment_dir
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


def undelivered_records(sweep_dir: Path) -> int:
    return undelivered(Path(SweepState.load(sweep_dir).sweep_dir))
