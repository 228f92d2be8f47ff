"""Callbacks that keep Tune's own files whole through failures.

The experiment state through a driver kill: see experiment_state.py.

The result rows through a trial's retry: when Tune restarts a failed trial, its loggers copy the
trial's `result.json` and `progress.csv` back from storage over the driver's staging copies.
Storage holds them as of the last experiment snapshot, so rows reported since then vanish,
although the trial resumes after them from its newer checkpoint. Tune's `num_to_keep` forced a
snapshot after each checkpoint and so hid the gap; the sweep does without it (see retention.py).
Copying the staged files up as the trial fails, before Tune restarts it, closes the gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.experiment_state import LAST_COMPLETE, newest_state_file, replace_atomically

RESULT_FILES = ("result.json", "progress.csv")


class ResultRowsKeeper(Callback):
    """Uploads a failed trial's staged result files before Tune restarts it from storage's copies."""

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        import pyarrow.fs

        storage = trial.storage
        staging, stored = Path(trial.local_path), Path(storage.trial_fs_path)
        if staging.resolve() == stored.resolve():
            return
        try:
            storage.storage_filesystem.create_dir(stored.as_posix(), recursive=True)
            for name in RESULT_FILES:
                if (staging / name).is_file():
                    pyarrow.fs.copy_files((staging / name).as_posix(), (stored / name).as_posix(),
                                          destination_filesystem=storage.storage_filesystem)
        except OSError as err:  # bookkeeping must never stop the sweep; MLflow's journal has every row
            print(f"[distillsweep] could not upload the result rows of trial {trial.trial_id}: {err}")


class StateKeeper(Callback):
    """Copies each experiment-state snapshot, once complete, to `LAST_COMPLETE` in the experiment folder.

    Tune asks callbacks for their state right after it has written (and closed) the snapshot in
    its staging folder, and before it copies the snapshot to storage: the staged file is complete then.
    """

    def __init__(self, experiment_dir: Path) -> None:
        self.experiment_dir = experiment_dir
        self._staging: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_dir": self.experiment_dir, "_staging": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._staging = Path(trial.storage.experiment_driver_staging_path)

    def get_state(self) -> dict[str, Any] | None:
        staged = newest_state_file(self._staging) if self._staging is not None else None
        if staged is not None:
            try:
                replace_atomically(staged, self.experiment_dir / LAST_COMPLETE)
            except OSError as err:  # bookkeeping must never stop the sweep; Tune's own file is still there
                print(f"[distillsweep] could not keep a copy of Tune's experiment state: {err}")
        return None
