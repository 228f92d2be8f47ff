"""The Tune callback that records a sweep in MLflow (one parent run, one child run per trial), and
the catch-up with Tune's files that `resume` and `distillsweep sync` run.

It runs in the driver, so trials need no MLflow access. Every write goes to the sweep's journal
on disk first and reaches MLflow from a background thread, so a tracking server that is slow or
down never stops training. Child runs are keyed by sweep and Tune trial id: after `distillsweep
resume` or a trial retry, a trial finds its run again instead of opening a duplicate, and a step
already journaled is not journaled twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.journal import STUDENTS_DIR, Delivery, Journal, open_journal
from orchestrator.outcome import ENDED_STATES, OUTCOME_FILE, TrialOutcome, trial_outcome
from orchestrator.report import read_outcome, read_result_rows, tune_trial_states
from orchestrator.state import SweepState, write_private
from orchestrator.student_models import STUDENT_ARTIFACT
from orchestrator.tracking import numeric_metrics, redact, run_params, run_tags, with_credentials
from orchestrator.trials import TrialTemplate
from trainables.config import RUN_CONFIG

class SweepTracker(Callback):
    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_name: str,
        template: TrialTemplate,
        journal_dir: Path,
        students_dir: Path | None = None,
        source_runs: dict[str, str] | None = None,
        task_inputs: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.template = template
        self.journal_dir = journal_dir
        self.students_dir = students_dir
        self.source_runs = source_runs or {}
        self.task_inputs = task_inputs or {}

    def __getstate__(self) -> dict[str, Any]:
        """Tune saves its callbacks with the experiment, in storage: the tracking URI without credentials."""
        return self.__dict__ | {"tracking_uri": redact(self.tracking_uri)}

    @property
    def journal(self) -> Journal:
        """Opened on first use, also in the copy Tune unpickles on `resume`; delivers in the background."""
        journal = open_journal(self.journal_dir, with_credentials(self.tracking_uri), self.experiment_id,
                               {"sweep": self.parent_run_id})
        journal.start()
        return journal

    def key(self, trial: Any) -> str:
        return trial_key(self.sweep_name, trial.trial_id)

    # --- Tune events -------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        # A step already journaled comes again when a restored trial replays from an earlier checkpoint.
        self.journal.append(metrics_record(self.key(trial), result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.students_dir is not None:
            try:
                self._log_student(trial)
            except Exception as err:  # bookkeeping must never fail a finished trial
                print(f"[distillsweep] could not copy the student of trial {trial.trial_id}: {err}")
        self._close(trial, trial_outcome("TERMINATED", trial.last_result), "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, trial_outcome("ERROR", trial.last_result, error_summary(trial)), "ERROR")

    # --- helpers -----------------------------------------------------------------------------

    def _open(self, trial: Any) -> None:
        key = self.key(trial)
        try:
            cfg = self.template.run_config_of(trial.config)
            params, tags = run_params(cfg), run_tags(cfg, self.source_runs)
            name = run_name(cfg, trial.trial_id)
            resolved = cfg.model_dump(mode="json")
        except ValueError:  # the trial itself fails with the reason; its draw is recorded as drawn
            drawn = self.template.decode(trial.config)
            params, tags, name = {k: str(v) for k, v in drawn.items()}, {}, trial.trial_id
            resolved = {"base": self.template.base, "assignments": drawn, "invalid": trial.config.get(RUN_CONFIG)}
        tags |= {
            "mlflow.parentRunId": self.parent_run_id,
            "distillsweep_key": key,
            "distillsweep_sweep": self.sweep_name,
            "ray_trial_id": trial.trial_id,
            "trial_state": "RUNNING",
        }
        self.journal.append({"op": "create", "key": key, "parent": self.parent_run_id, "tags": tags, "name": name})
        self.journal.append({"op": "params", "key": key, "params": params})
        if tags.get("task") in self.task_inputs:
            self.journal.append({"op": "inputs", "key": key, "datasets": self.task_inputs[tags["task"]]})
        self.journal.append({"op": "tags", "key": key, "tags": {"trial_state": "RUNNING"}})
        self.journal.append({"op": "text", "key": key, "file": "run_config.json",
                             "text": json.dumps(resolved, indent=2, default=str)})

    def _log_student(self, trial: Any) -> None:
        """Copy the student out of the trial's final checkpoint (wherever storage is) and log it as an
        MLflow model, so later sweeps can start from `runs:/<run id>/student` and users can load it."""
        import pyarrow.fs

        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        local = self.students_dir / trial.trial_id
        local.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(
            f"{checkpoint.path}/student", str(local), source_filesystem=checkpoint.filesystem,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        self.journal.append({"op": "model", "key": self.key(trial), "path": f"{STUDENTS_DIR}/{trial.trial_id}",
                             "artifact_path": STUDENT_ARTIFACT, "kind": self.template.kind})
        self.journal.append({"op": "tags", "key": self.key(trial), "tags": {"student_logged": "true"}})

    def _close(self, trial: Any, outcome: TrialOutcome, state: str) -> None:
        """Tag how the trial ended and end its run with the matching status (stopped: KILLED).

        A trial whose actor died as it started (its node lost) fails without Tune's start event:
        its run is created here, so that it too has a FAILED run with its reason."""
        key = self.key(trial)
        if key not in self.journal.created:
            self._open(trial)
        self.journal.append({"op": "tags", "key": key, "tags": outcome_tags(state, outcome)})
        self.journal.append({"op": "end", "key": key, "status": outcome.mlflow_status})
        write_outcome(trial, outcome)

    def finish(self, wait_s: float) -> int:
        """Give the journal `wait_s` to reach MLflow; what is left stays on disk for `distillsweep sync`."""
        journal = self.journal
        left = journal.drain(wait_s)
        error = journal.last_error
        journal.close()
        if left:
            print(
                f"[distillsweep] MLflow at {redact(self.tracking_uri)} did not take {left} records ({error}); they are kept "
                f"in the sweep's journal. When the server answers, run: distillsweep sync {self.journal_dir}"
            )
        return left


def run_name(cfg: Any, trial_id: str) -> str:
    """A trial's MLflow run name: what it distils and from where, then Tune's id."""
    return f"{cfg.objective_mix}|{cfg.student.init_name}|{cfg.task_name}|{trial_id}"


def trial_key(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}/{trial_id}"


def metrics_record(key: str, result: dict[str, Any]) -> dict[str, Any]:
    """One evaluation as one journal record: one MLflow request, whatever the number of metrics."""
    step = int(result.get("step", result.get("training_iteration", 0)))
    reported = {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING}
    when = result.get("timestamp")
    return {"op": "metrics", "key": key, "step": step, "time": int((when or time.time()) * 1000),
            "metrics": numeric_metrics(reported)}


def reconcile_with_tune(journal: Journal, experiment_dir: Path, sweep_name: str) -> int:
    """Journal what Tune's files hold but the journal does not: a driver killed between Tune writing
    a result (or ending a trial) and the tracker journaling it. Returns how many records it added."""
    states = tune_trial_states(experiment_dir)
    added = 0
    for results_file in experiment_dir.glob("*/result.json"):
        rows = read_result_rows(results_file)
        if not rows:
            continue
        key = trial_key(sweep_name, rows[-1]["trial_id"])
        if key not in journal.created:
            continue  # its run is opened when Tune starts the trial again
        added += sum(journal.append(metrics_record(key, row)) for row in rows)
        status = states.get(rows[-1]["trial_id"], "UNKNOWN")
        if status in ENDED_STATES and key not in journal.ended:
            outcome = read_outcome(results_file.parent, status, max(rows, key=lambda r: r.get("step", 0)))
            journal.append({"op": "tags", "key": key, "tags": outcome_tags(status, outcome)})
            journal.append({"op": "end", "key": key, "status": outcome.mlflow_status})
            added += 2
    return added


def sync_journal(sweep_dir: Path, attempts: int = 4) -> Delivery:
    """Send MLflow what the sweep's journal (and Tune's files) hold and MLflow lacks, checking each
    run first so nothing is logged twice; the parent run ends here if its sweep had ended."""
    state = SweepState.load(sweep_dir)
    journal = Journal(Path(state.sweep_dir), state.tracking_uri, state.experiment_id, {"sweep": state.parent_run_id})
    try:
        if not state.storage.is_remote:
            reconcile_with_tune(journal, state.experiment_dir, state.sweep_spec.name)
        return journal.deliver_all(attempts)
    finally:
        journal.close()


def outcome_tags(state: str, outcome: TrialOutcome) -> dict[str, str]:
    tags = {"trial_state": state, "trial_outcome": outcome.kind, "trial_outcome_detail": outcome.detail[:5000]}
    if outcome.error:
        tags["error"] = outcome.error[:5000]
    return tags


TUNE_BOOKKEEPING = {
    "time_this_iter_s", "time_total_s", "timestamp", "pid", "date", "hostname", "node_ip", "done",
    "trial_id", "experiment_tag", "iterations_since_restore", "time_since_restore", "checkpoint_dir_name",
    "should_checkpoint", "config",
}


def write_outcome(trial: Any, outcome: TrialOutcome) -> None:
    """Put the outcome beside the trial's result.json, wherever storage is: whole (an object store
    writes objects whole; a folder gets a file replaced at once), and private where it is a folder."""
    import pyarrow.fs

    text = json.dumps(outcome.as_dict())
    filesystem = trial.storage.storage_filesystem
    try:
        if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
            write_private(Path(trial.path) / OUTCOME_FILE, text)
            return
        with filesystem.open_output_stream(f"{trial.path}/{OUTCOME_FILE}") as stream:
            stream.write(text.encode())
    except Exception as err:  # bookkeeping must never fail the sweep; status and report derive it again
        print(f"[distillsweep] could not write the outcome of trial {trial.trial_id}: {err}")


def error_summary(trial: Any) -> str:
    """The last line of the trial's error (the exception message), for the run's tags."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "unknown error"
    return "unknown error"
