"""Tune's experiment state, kept readable through a driver kill.

Tune rewrites `experiment_state-<session>.json` in place, first in its staging folder and then in
storage, at every snapshot (at least 10 s apart); at the study's size
the file is megabytes, and a driver SIGKILLed while it is written leaves it cut short, which
`Tuner.restore` cannot read. `StateKeeper` copies each complete snapshot beside it, atomically,
and `repair` puts that copy back before Tune reads the state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.messages import UserError

STATE_GLOB = "experiment_state-*.json"  # Tune's own pattern; the copy below does not match it
LAST_COMPLETE = "experiment_state.last-complete.json"


def newest_state_file(folder: Path) -> Path | None:
    """The file Tune resumes from: the newest by the time in its name, as Tune picks it (after a
    resume Tune writes the old file once more, so the older file can have the newer mtime)."""
    files = sorted(folder.glob(STATE_GLOB), key=lambda p: p.name)
    return files[-1] if files else None


def load_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_experiment_state(folder: Path) -> dict[str, Any]:
    """The newest complete experiment state ({} before Tune wrote one)."""
    newest = newest_state_file(folder)
    if newest is None:
        return {}
    return load_state(newest) or load_state(folder / LAST_COMPLETE) or {}


def repair(folder: Path) -> bool:
    """Put the last complete snapshot back where a killed driver left a cut one; True if it did."""
    newest = newest_state_file(folder)
    if newest is None or load_state(newest) is not None:
        return False
    complete = folder / LAST_COMPLETE
    if load_state(complete) is None:
        raise UserError(
            f"{newest} was cut short when the driver was killed, and no complete copy was kept: Tune cannot "
            "resume this sweep; finished trials keep their results in their folders"
        )
    replace_atomically(complete, newest)
    return True


def replace_atomically(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


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
