"""A retried trial keeps every result row Tune recorded for it.

When Tune restarts a failed trial, its loggers copy the trial's `result.json` and `progress.csv`
back from storage over the driver's staging copies. Storage holds them as of the last experiment
snapshot, so rows reported since then vanish, although the trial resumes after them from its newer
checkpoint. Tune's `num_to_keep` forced a snapshot after each checkpoint and so hid the gap;
the sweep does without it (see retention.py). Copying the staged files up as the trial fails,
before Tune restarts it, closes the gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

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
