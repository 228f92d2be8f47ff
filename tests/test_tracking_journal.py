"""The MLflow journal against a real SQLite store: a restarted driver neither duplicates runs nor steps."""

from __future__ import annotations

from mlflow import MlflowClient

from orchestrator.tracking import MlflowJournal, ensure_experiment


def metrics(step: int, time_ms: int) -> dict:
    return {"op": "metrics", "key": "sweep/trial_1", "step": step, "time": time_ms, "metrics": {"score": step / 100}}


def test_a_restarted_journal_skips_steps_mlflow_already_holds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = ensure_experiment(MlflowClient(uri), "journal", uri)
    create = {"op": "create", "key": "sweep/trial_1", "parent": None, "tags": {"distillsweep_key": "sweep/trial_1"}}

    before_crash = MlflowJournal(uri, experiment, tmp_path / "pending.jsonl")
    for record in (create, metrics(4, 1), metrics(8, 2), metrics(12, 3)):
        before_crash.submit(record)

    # The restored trial replays from an older checkpoint: steps 8 and 12 come again, then 16.
    after_restart = MlflowJournal(uri, experiment, tmp_path / "pending.jsonl")
    for record in (create, metrics(8, 4), metrics(12, 5), metrics(16, 6)):
        after_restart.submit(record)

    assert after_restart.run_ids == before_crash.run_ids, "the restarted driver found the same run"
    history = MlflowClient(uri).get_metric_history(after_restart.run_ids["sweep/trial_1"], "score")
    assert sorted(m.step for m in history) == [4, 8, 12, 16]
