"""What a sweep's storage folder holds, split by the state of the trials that wrote it (`status`).

What each trial may keep is `orchestrator/retention.py`'s rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.outcome import ENDED_STATES
from orchestrator.report import tune_trial_states
from orchestrator.state import SweepState


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
    folder = SweepState.load(sweep_dir).experiment_dir
    return disk_use(folder, tune_trial_states(folder))
