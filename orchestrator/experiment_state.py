"""Tune's experiment state, kept readable through a driver kill.

Tune rewrites `experiment_state-<session>.json` in place, first in its staging folder and then in
storage, at every snapshot (at least 10 s apart); at the study's size
the file is megabytes, and a driver SIGKILLed while it is written leaves it cut short, which
`Tuner.restore` cannot read. `tune_files.StateKeeper` copies each complete snapshot beside it, atomically,
and `repair` puts that copy back before Tune reads the state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

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
