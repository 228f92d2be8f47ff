"""The Tune callback that records a sweep in MLflow: one parent run, one child run per trial.

It runs in the driver, so trials need no MLflow access and a tracking server that is down never
stops training (writes wait in an `MlflowJournal`). Child runs are keyed by sweep and Tune trial
id: after `distillsweep resume` (Tune restores this callback from its experiment state) or a trial
retry, a trial finds its run again instead of opening a duplicate, and steps already logged are
not logged twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.outcome import OUTCOME_FILE, TrialOutcome, trial_outcome
from orchestrator.tracking import MlflowJournal, numeric_metrics, run_params, run_tags
from trainables.config import TrialTemplate


class SweepTracker(Callback):
    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_name: str,
        template: TrialTemplate,
        pending_file: Path,
        students_dir: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.template = template
        self.pending_file = pending_file
        self.students_dir = students_dir
        self.last_step: dict[str, int] = {}
        self._journal: MlflowJournal | None = None

    # Tune pickles callbacks with the experiment; the MLflow client is rebuilt after restore.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_journal"} | {"_journal": None}

    @property
    def journal(self) -> MlflowJournal:
        if self._journal is None:
            self._journal = MlflowJournal(self.tracking_uri, self.experiment_id, self.pending_file)
            self._journal.run_ids["sweep"] = self.parent_run_id
        return self._journal

    def get_state(self) -> dict[str, Any]:
        return {"last_step": dict(self.last_step)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.last_step = dict(state.get("last_step", {}))

    def key(self, trial: Any) -> str:
        return f"{self.sweep_name}/{trial.trial_id}"

    # --- Tune events -------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        key = self.key(trial)
        step = int(result.get("step", result.get("training_iteration", 0)))
        if step <= self.last_step.get(key, -1):
            return  # replayed after a restore from an earlier checkpoint
        self.last_step[key] = step
        reported = {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING}
        self.journal.submit(
            {"op": "metrics", "key": key, "step": step, "time": int(time.time() * 1000),
             "metrics": numeric_metrics(reported)}
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.students_dir is not None:
            try:
                self._log_student(trial)
            except Exception as err:  # bookkeeping must never fail a finished trial
                print(f"[distillsweep] could not copy the student of trial {trial.trial_id}: {err}")
        self._close(trial, trial_outcome("TERMINATED", trial.last_result), "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, trial_outcome("ERROR", trial.last_result, error_summary(trial)), "ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.finish()

    # --- helpers -----------------------------------------------------------------------------

    def _open(self, trial: Any) -> None:
        key = self.key(trial)
        config = self.template.decode(trial.config)
        try:
            cfg = self.template.resolve(trial.config)
            params, tags = run_params(cfg), run_tags(cfg)
            name = f"{cfg.objective_mix}|{cfg.student.init_name}|{tags['task']}|{trial.trial_id}"
        except Exception:  # the trial itself will fail with the validation message
            params, tags, name = {k: str(v) for k, v in config.items()}, {}, trial.trial_id
        tags |= {
            "mlflow.parentRunId": self.parent_run_id,
            "distillsweep_key": key,
            "distillsweep_sweep": self.sweep_name,
            "ray_trial_id": trial.trial_id,
            "trial_state": "RUNNING",
        }
        self.journal.submit({"op": "create", "key": key, "parent": self.parent_run_id, "tags": tags, "name": name})
        self.journal.submit({"op": "params", "key": key, "params": params})
        self.journal.submit({"op": "tags", "key": key, "tags": {"trial_state": "RUNNING"}})
        self.journal.submit({"op": "text", "key": key, "file": "run_config.json", "text": self._resolved_json(trial.config)})

    def _log_student(self, trial: Any) -> None:
        """Copy the student out of the trial's final checkpoint (wherever storage is) and log it,
        so later sweeps can start from `runs:/<run id>/student`."""
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
        self.journal.submit({"op": "artifacts", "key": self.key(trial), "path": str(local), "artifact_path": "student"})
        self.journal.submit({"op": "tags", "key": self.key(trial), "tags": {"student_logged": "true"}})

    def _close(self, trial: Any, outcome: TrialOutcome, state: str) -> None:
        """Tag how the trial ended and end its run with the matching status (stopped: KILLED)."""
        key = self.key(trial)
        tags = {"trial_state": state, "trial_outcome": outcome.kind, "trial_outcome_detail": outcome.detail[:5000]}
        if outcome.error:
            tags["error"] = outcome.error[:5000]
        self.journal.submit({"op": "tags", "key": key, "tags": tags})
        self.journal.submit({"op": "end", "key": key, "status": outcome.mlflow_status})
        write_outcome(trial, outcome)

    def _resolved_json(self, trial_config: dict[str, Any]) -> str:
        try:
            resolved = self.template.resolve(trial_config).model_dump(mode="json")
        except Exception:  # invalid draws are recorded as drawn; the trial fails with the reason
            resolved = {"base": self.template.base, "assignments": self.template.decode(trial_config)}
        return json.dumps(resolved, indent=2, default=str)

    def finish(self) -> None:
        """Send what is left; keep the rest on disk for `distillsweep sync`, and say so."""
        for _ in range(3):
            if self.journal.flush():
                break
            time.sleep(2)
        left = self.journal.save_pending()
        if left:
            print(
                f"[distillsweep] MLflow at {self.tracking_uri} did not take {left} records; they are kept in "
                f"{self.pending_file}. When the server answers, run: distillsweep sync {self.pending_file.parent}"
            )


TUNE_BOOKKEEPING = {
    "time_this_iter_s", "time_total_s", "timestamp", "pid", "date", "hostname", "node_ip", "done",
    "trial_id", "experiment_tag", "iterations_since_restore", "time_since_restore", "checkpoint_dir_name",
    "should_checkpoint", "config",
}


def write_outcome(trial: Any, outcome: TrialOutcome) -> None:
    """Put the outcome beside the trial's result.json, wherever storage is."""
    try:
        with trial.storage.storage_filesystem.open_output_stream(f"{trial.path}/{OUTCOME_FILE}") as stream:
            stream.write(json.dumps(outcome.as_dict()).encode())
    except Exception as err:  # bookkeeping must never fail the sweep; status and report derive it again
        print(f"[distillsweep] could not write the outcome of trial {trial.trial_id}: {err}")


def error_summary(trial: Any) -> str:
    """The last line of the trial's error (the exception message), for the run's tags."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "unknown error"
    return "unknown error"
