"""A sweep's disk, bounded by design: what an ended trial leaves in storage, and what a sweep uses.

A running trial holds one Tune checkpoint (weights, optimiser, schedule, RNG states: what exact
resume needs) plus, briefly, the next one being written. When a trial ends, `TrialPruner` leaves
only what `keep` asks for: a completed trial's student (weights, config, tokenizer) in its final
checkpoint folder, where `trial.checkpoint`, `log_students` and `runs:/` readers find it; a stopped
trial keeps nothing. It works through the trial's storage filesystem, so remote storage too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.outcome import trial_outcome
from trainables.training import DIVERGED_MESSAGE

CHECKPOINT_PREFIX = "checkpoint_"
STUDENT = "student"
ENDED_STATES = ("TERMINATED", "ERROR")


class TrialPruner(Callback):
    """Delete what no one will read from a trial's storage folder once the trial has ended for good.

    Tune calls `on_trial_error` only for a trial it will not retry (max_failures spent); a trial
    it retries keeps its checkpoint. A failed trial keeps its last checkpoint too, for
    `distillsweep resume --retry-errored`; a diverged one would only diverge again and keeps nothing.
    """

    def __init__(self, keep: str) -> None:
        self.keep = keep

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        completed = trial_outcome("TERMINATED", trial.last_result).kind == "completed"
        checkpoint = trial.checkpoint if completed and self.keep != "none" else None
        self._prune(trial, keep_student_of=checkpoint.path if checkpoint is not None else None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error_file = getattr(trial, "error_file", None)
        if error_file and Path(error_file).exists() and DIVERGED_MESSAGE in Path(error_file).read_text():
            self._prune(trial, keep_student_of=None)

    def _prune(self, trial: Any, keep_student_of: str | None) -> None:
        """Delete every checkpoint folder of the trial but the student inside `keep_student_of`."""
        import pyarrow.fs

        fs = trial.storage.storage_filesystem
        try:
            for entry in fs.get_file_info(pyarrow.fs.FileSelector(trial.path)):
                if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith(CHECKPOINT_PREFIX):
                    continue
                if keep_student_of is None or entry.path.rstrip("/") != keep_student_of.rstrip("/"):
                    fs.delete_dir(entry.path)
                    continue
                for inner in fs.get_file_info(pyarrow.fs.FileSelector(entry.path)):
                    if inner.base_name == STUDENT:
                        continue
                    if inner.type == pyarrow.fs.FileType.Directory:
                        fs.delete_dir(inner.path)
                    else:
                        fs.delete_file(inner.path)
        except Exception as err:  # disk bookkeeping must never fail the sweep; `status` shows what is left
            print(f"[distillsweep] could not prune the checkpoints of trial {trial.trial_id}: {err}")


@dataclass
class DiskUse:
    """Bytes a sweep's storage folder holds, split by the state of the trial that wrote them."""

    total: int = 0
    ended: int = 0
    running: int = 0
    ended_trials: int = 0
    running_trials: int = 0

    @property
    def per_ended_trial(self) -> float:
        return self.ended / self.ended_trials if self.ended_trials else 0.0


def folder_bytes(path: str) -> int:
    """Bytes of the files under `path`, by `os.scandir` (one stat per entry, no Python Path objects)."""
    total = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def trial_status(folder_name: str, states: dict[str, str]) -> str | None:
    """The Tune status of the trial a folder belongs to: its name holds the trial id (`<hex>_<index>`)
    after the trainable's name, e.g. `distillation_trial_15545_00001_1_...`."""
    parts = folder_name.split("_")
    return next((states[key] for key in map("_".join, zip(parts, parts[1:])) if key in states), None)


def disk_use(experiment_dir: Path, states: dict[str, str]) -> DiskUse:
    """Walk the experiment folder once; `states` is trial id -> Tune status."""
    use = DiskUse()
    with os.scandir(experiment_dir) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                use.total += entry.stat(follow_symlinks=False).st_size if entry.is_file() else 0
                continue
            size = folder_bytes(entry.path)
            use.total += size
            status = trial_status(entry.name, states)
            if status in ENDED_STATES:
                use.ended += size
                use.ended_trials += 1
            elif status is not None:
                use.running += size
                use.running_trials += 1
    return use


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def describe(use: DiskUse) -> str:
    """One line for `distillsweep status`."""
    return (f"disk: {human(use.total)} in all; {use.ended_trials} ended trials {human(use.ended)} "
            f"({human(use.per_ended_trial)} each), {use.running_trials} running or pending {human(use.running)}")


def sweep_disk_use(sweep_dir: Path) -> DiskUse:
    """The disk use of the sweep at `sweep_dir` (its storage must be a local or mounted folder)."""
    from orchestrator.report import tune_trial_states
    from orchestrator.status import experiment_dir
    from orchestrator.sweep import SweepState

    folder = experiment_dir(SweepState.load(sweep_dir))
    return disk_use(folder, tune_trial_states(folder))
