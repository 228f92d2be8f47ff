"""The study table compares like with like: one configuration per cell, full budgets by default."""

from __future__ import annotations

import math
from dataclasses import replace

from orchestrator.outcome import TrialOutcome, trial_outcome
from orchestrator.report import TrialRecord, render_markdown, study_tables


def record(trial_id: str, mix: str, init: str, seed: int, score: float | None, outcome: TrialOutcome,
           **setting: str) -> TrialRecord:
    return TrialRecord(
        trial_id=trial_id, task="demo", objective_mix=mix, init=init, seed=seed, outcome=outcome,
        final_score=score, best_score=score, steps=outcome.step,
        setting={"objectives": mix, "student.init": init, "training.learning_rate": "0.0001", **setting},
    )


COMPLETED = TrialOutcome("completed", 60, 60)
STOPPED = TrialOutcome("stopped", 15, 60)


def test_outcome_tells_completed_from_scheduler_stopped_and_diverged() -> None:
    assert trial_outcome("TERMINATED", {"step": 60, "total_steps": 60}).kind == "completed"
    stopped = trial_outcome("TERMINATED", {"step": 15, "total_steps": 60})
    assert stopped.kind == "stopped" and stopped.detail == "stopped by the scheduler at step 15 of 60"
    assert stopped.mlflow_status == "KILLED"
    diverged = trial_outcome("ERROR", {"step": 5, "total_steps": 20}, "NonFiniteLossError: loss became non-finite by step 5")
    assert diverged.kind == "diverged" and diverged.mlflow_status == "FAILED"
    assert trial_outcome("ERROR", None, "OSError: disk full").kind == "failed"


def test_early_stopped_trials_stay_out_of_the_cells_by_default_and_are_listed() -> None:
    records = [
        record("a", "kd", "upper", 1, 0.848, COMPLETED),
        record("b", "kd", "lower", 1, 0.50, STOPPED),
        record("c", "kd", "upper", 2, 0.50, STOPPED),
        record("d", "kd", "upper", 3, 0.50, STOPPED),
    ]
    table = study_tables(records)["demo"]
    assert table.loc["kd", "upper"] == "84.8 (n=1, 2 stopped)"
    assert table.loc["kd", "lower"] == "no completed trial (1 stopped)"
    markdown = render_markdown(records, "best_score", include_stopped=False)
    assert "trials that trained their whole budget" in markdown
    assert "`b` demo, kd, init lower, seed 1: stopped by the scheduler at step 15 of 60" in markdown

    included = study_tables(records, include_stopped=True)["demo"]
    assert included.loc["kd", "upper"].startswith(f"{100 * (0.848 + 0.5 + 0.5) / 3:.1f} ± ")
    assert "n=3, incl. 2 stopped" in included.loc["kd", "upper"]


def test_trials_differing_in_another_key_are_never_merged_into_one_cell() -> None:
    records = [
        record("a", "kd", "upper", 1, 0.80, COMPLETED, **{"student.num_attention_heads": "12"}),
        record("b", "kd", "upper", 1, 0.70, COMPLETED, **{"student.num_attention_heads": "6"}),
        record("c", "kd", "upper", 2, 0.90, COMPLETED, **{"student.num_attention_heads": "12"}),
    ]
    table = study_tables(records)["demo"]
    assert list(table.index) == ["kd (student.num_attention_heads=12)", "kd (student.num_attention_heads=6)"]
    assert table.loc["kd (student.num_attention_heads=12)", "upper"] == f"85.0 ± {100 * math.sqrt(0.005):.1f} (n=2)"
    assert table.loc["kd (student.num_attention_heads=6)", "upper"] == "70.0 (n=1)"


def test_failed_trials_are_counted_beside_the_cell_not_averaged() -> None:
    failed = TrialOutcome("failed", 0, 60, "OSError: disk full")
    records = [record("a", "kd", "upper", 1, 0.8, COMPLETED), record("b", "kd", "upper", 2, None, failed)]
    assert study_tables(records)["demo"].loc["kd", "upper"] == "80.0 (n=1, 1 failed)"
    assert "`b` demo, kd, init upper, seed 2: failed at step 0 of 60: OSError: disk full" in render_markdown(
        records, "best_score", include_stopped=False
    )


def test_a_key_tuned_within_cells_shows_each_cells_best_setting_with_its_seeds() -> None:
    """Grouped early stopping tuned the learning rate inside each cell: the cell is the best rate's
    mean over its seeds (never a mix of rates), and says which rate won out of how many."""
    lr = "training.learning_rate"
    tuned = {"tuned": (lr,)}
    records = [
        replace(record("a", "kd", "lower", 1, 0.76, COMPLETED, **{lr: "0.0003"}), **tuned),
        replace(record("b", "kd", "lower", 2, 0.74, COMPLETED, **{lr: "0.0003"}), **tuned),
        replace(record("c", "kd", "lower", 1, 0.80, COMPLETED, **{lr: "0.0001"}), **tuned),
        replace(record("d", "kd", "lower", 2, 0.50, STOPPED, **{lr: "0.0001"}), **tuned),
        replace(record("e", "kd", "upper", 1, 0.84, COMPLETED, **{lr: "0.0001"}), **tuned),
        replace(record("f", "kd", "upper", 1, 0.50, STOPPED, **{lr: "0.0003"}), **tuned),
    ]
    table = study_tables(records)["demo"]
    assert list(table.index) == ["kd"], "a tuned key makes no rows of its own"
    # lower: 0.0001 has one completed seed at 0.80 and beats 0.0003's mean 0.75 over two seeds.
    assert table.loc["kd", "lower"] == "80.0 (n=1, best of 2: training.learning_rate=0.0001, 1 stopped)"
    assert table.loc["kd", "upper"] == "84.0 (n=1, best of 2: training.learning_rate=0.0001, 1 stopped)"
    assert "tuned training.learning_rate within each cell" in render_markdown(records, "best_score", False)

    untuned = [replace(r, tuned=()) for r in records]
    assert len(study_tables(untuned)["demo"]) == 2, "without tuning each rate is a configuration of its own"
