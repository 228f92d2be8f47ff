"""Which checkpoints a sweep keeps: never one that a resumable experiment state still names.

Tune's own `CheckpointConfig(num_to_keep)` deletes a trial's old checkpoint as soon as the new one
is registered, and forces a full experiment-state snapshot after every checkpoint to keep the
two in step: at the study's size that snapshot is megabytes, written 756 x evaluations times
(quadratic), and a driver killed between the deletion and the snapshot's upload leaves a state
that names a deleted checkpoint, so that trial cannot resume. Tune here keeps every checkpoint
and snapshots on its own timer; `CheckpointRetention` deletes a checkpoint only once the
experiment state on storage (the file `Tuner.restore` reads) names a newer one or the trial's end.

What an ended trial keeps, once the storage's state shows it ended: a completed trial, its
student (weights, config, tokenizer) inside its final checkpoint folder, where `trial.checkpoint`
and `runs:/` readers find it (`keep: none`: nothing); a trial stopped early or diverged, nothing;
a failed trial, its last checkpoint, for `distillsweep resume --retry-errored`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.experiment_state import newest_state_file
from orchestrator.outcome import ENDED_STATES, trial_outcome

CHECKPOINT_PREFIX = "checkpoint_"
STUDENT = "student"
DIGEST_CHUNK = 1 << 20


@dataclass
class Snapshot:
    """What one experiment-state snapshot says about each trial, keyed by its file's digest."""

    digest: str
    checkpoint_of: dict[str, str] = field(default_factory=dict)  # trial id -> checkpoint path it names
    ended: set[str] = field(default_factory=set)  # trial ids it records as ended


@dataclass(frozen=True)
class EndedKeep:
    """What an ended trial keeps: a whole checkpoint, only the student inside one, or nothing."""

    checkpoint: str | None
    student_only: bool


def file_digest(open_stream: Any) -> str | None:
    """BLAKE2 of a file, read in chunks from `open_stream()`; None when it cannot be read."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open_stream() as stream:
            while chunk := stream.read(DIGEST_CHUNK):
                digest.update(chunk)
    except (OSError, FileNotFoundError):
        return None
    return digest.hexdigest()


def ended_keep(trial: Any, keep: str) -> EndedKeep:
    checkpoint = trial.checkpoint.path if trial.checkpoint is not None else None
    if trial.status == "ERROR":
        error_file = getattr(trial, "error_file", None)
        error = Path(error_file).read_text() if error_file and Path(error_file).exists() else ""
        failed = trial_outcome("ERROR", trial.last_result, error).kind == "failed"
        return EndedKeep(checkpoint if failed else None, student_only=False)
    completed = trial_outcome("TERMINATED", trial.last_result).kind == "completed"
    return EndedKeep(checkpoint if completed and keep != "none" else None, student_only=True)


class CheckpointRetention(Callback):
    """Deletes checkpoints at each experiment-state snapshot, keeping what any readable state names.

    Tune asks callbacks for their state right after it has written a snapshot in its staging
    folder and before it uploads it; the upload runs in the background and is skipped while an
    earlier one is still running. So at each snapshot the file on storage is the previous
    snapshot, an older one, or a partial copy: it is identified by its digest, and every
    checkpoint named by it or by a newer snapshot (which the storage may hold next, and which
    `StateKeeper` keeps a copy of) stays, with each trial's latest.
    """

    def __init__(self, keep: str) -> None:
        self.keep = keep
        self._reset()

    def _reset(self) -> None:
        self._trials: list[Any] = []
        self._pending: list[Snapshot] = []  # staged, not yet seen on storage; oldest first
        self._on_storage: Snapshot | None = None
        self._dirty: set[str] = set()
        self._started = False
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.keep = state["keep"]
        self._reset()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._trials = trials
        if not self._started:  # a resumed sweep may hold what its killed driver had not pruned yet
            self._started = True
            self._dirty.update(trial.trial_id for trial in trials)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self._dirty.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._dirty.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._dirty.add(trial.trial_id)

    def get_state(self) -> dict[str, Any] | None:
        if self._trials:
            try:
                self._after_snapshot()
            except Exception as err:  # disk bookkeeping must never fail the sweep; `status` shows what is left
                print(f"[distillsweep] could not prune checkpoints: {err}")
        return None

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune uploaded its final snapshot and waited for it: what it says ended can be pruned now."""
        self._trials = trials
        self.get_state()

    def _after_snapshot(self) -> None:
        storage = self._trials[0].storage
        staged = newest_state_file(Path(storage.experiment_driver_staging_path))
        if staged is None:
            return
        staged_digest = file_digest(lambda: open(staged, "rb"))
        if staged_digest is None:
            return
        if not self._pending or self._pending[-1].digest != staged_digest:
            self._pending.append(self.snapshot(staged_digest))
        stored_path = f"{storage.experiment_fs_path}/{staged.name}"
        stored = file_digest(lambda: storage.storage_filesystem.open_input_stream(stored_path))
        for index, snapshot in enumerate(self._pending):
            if snapshot.digest == stored:
                self._on_storage = snapshot
                del self._pending[: index + 1]
                break
        if self._on_storage is None and len(self._pending) > 100 and not self._warned:
            self._warned = True
            print(f"[distillsweep] Tune's experiment state has not reached {stored_path}: old checkpoints are "
                  "kept until it does")
        self._prune_dirty()

    def snapshot(self, digest: str) -> Snapshot:
        return Snapshot(
            digest,
            {trial.trial_id: trial.checkpoint.path for trial in self._trials if trial.checkpoint is not None},
            {trial.trial_id for trial in self._trials if trial.status in ENDED_STATES},
        )

    def _prune_dirty(self) -> None:
        readable = [self._on_storage, *self._pending] if self._on_storage is not None else self._pending
        by_id = {trial.trial_id: trial for trial in self._trials}
        for trial_id in list(self._dirty):
            trial = by_id.get(trial_id)
            if trial is None:
                self._dirty.discard(trial_id)
                continue
            if self._on_storage is not None and trial_id in self._on_storage.ended and trial.status in ENDED_STATES:
                prune(trial, ended_keep(trial, self.keep))
                self._dirty.discard(trial_id)
                continue
            named = {snapshot.checkpoint_of[trial_id] for snapshot in readable if trial_id in snapshot.checkpoint_of}
            if trial.checkpoint is not None:
                named.add(trial.checkpoint.path)
            if prune_unnamed(trial, named) and trial.status not in ENDED_STATES:
                self._dirty.discard(trial_id)


def checkpoint_folders(trial: Any) -> list[Any]:
    import pyarrow.fs

    fs = trial.storage.storage_filesystem
    return [
        entry for entry in fs.get_file_info(pyarrow.fs.FileSelector(trial.path, allow_not_found=True))
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX)
    ]


def same_path(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def checkpoint_index(path: str) -> int | None:
    """The number in a `checkpoint_000004` folder's name; None for any other name."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def prune_unnamed(trial: Any, named: set[str]) -> bool:
    """Delete the trial's checkpoints older than its latest and not in `named`; True if only its latest is left.

    A folder newer than the trial's registered checkpoint is one the trial has written to storage
    and reported, but whose result the driver has not processed yet: it is about to become the
    trial's checkpoint, and deleting it would lose it (a completed trial's final student with it).
    """
    registered = checkpoint_index(trial.checkpoint.path) if trial.checkpoint is not None else None
    fs = trial.storage.storage_filesystem
    left = 0
    for entry in checkpoint_folders(trial):
        index = checkpoint_index(entry.path)
        unregistered = registered is None or index is None or index > registered
        if unregistered or any(same_path(entry.path, path) for path in named):
            left += 1
        else:
            fs.delete_dir(entry.path)
    return left <= 1


def prune(trial: Any, keep: EndedKeep) -> None:
    """Leave an ended trial only `keep`: one checkpoint folder, or the student inside it, or nothing."""
    import pyarrow.fs

    fs = trial.storage.storage_filesystem
    for entry in checkpoint_folders(trial):
        if keep.checkpoint is None or not same_path(entry.path, keep.checkpoint):
            fs.delete_dir(entry.path)
            continue
        if not keep.student_only:
            continue
        for inner in fs.get_file_info(pyarrow.fs.FileSelector(entry.path)):
            if inner.base_name == STUDENT:
                continue
            if inner.type == pyarrow.fs.FileType.Directory:
                fs.delete_dir(inner.path)
            else:
                fs.delete_file(inner.path)
