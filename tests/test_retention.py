"""Checkpoint retention's deletions, on real folders: what it may delete and what it must keep."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs

from orchestrator.retention import EndedKeep, checkpoint_index, prune, prune_unnamed


def trial_with_checkpoints(root: Path, indices: list[int], registered: int | None) -> SimpleNamespace:
    for index in indices:
        folder = root / f"checkpoint_{index:06d}"
        (folder / "student").mkdir(parents=True)
        (folder / "trainer_state.pt").write_bytes(b"state")
    checkpoint = SimpleNamespace(path=str(root / f"checkpoint_{registered:06d}")) if registered is not None else None
    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
    return SimpleNamespace(path=str(root), checkpoint=checkpoint, storage=storage)


def left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint_"))


def test_checkpoint_index_reads_tunes_folder_names_only():
    assert checkpoint_index("/x/checkpoint_000012") == 12
    assert checkpoint_index("/x/checkpoint_000012/") == 12
    assert checkpoint_index("/x/checkpoint_tmp123") is None
    assert checkpoint_index("/x/student") is None


def test_older_unnamed_checkpoints_go_and_the_registered_one_stays(tmp_path):
    trial = trial_with_checkpoints(tmp_path, [0, 1, 2], registered=2)
    assert prune_unnamed(trial, {trial.checkpoint.path}) is True
    assert left(tmp_path) == ["checkpoint_000002"]


def test_a_checkpoint_written_before_the_driver_registered_it_is_never_deleted(tmp_path):
    """The worker uploads a checkpoint before the driver processes its result: it is the next latest."""
    trial = trial_with_checkpoints(tmp_path, [0, 1, 2], registered=1)
    assert prune_unnamed(trial, {trial.checkpoint.path}) is False, "the trial stays to be pruned again"
    assert left(tmp_path) == ["checkpoint_000001", "checkpoint_000002"]

    unregistered = trial_with_checkpoints(tmp_path / "first", [0], registered=None)
    prune_unnamed(unregistered, set())
    assert left(tmp_path / "first") == ["checkpoint_000000"]


def test_a_checkpoint_an_older_snapshot_names_stays(tmp_path):
    trial = trial_with_checkpoints(tmp_path, [0, 1, 2], registered=2)
    prune_unnamed(trial, {str(tmp_path / "checkpoint_000000"), trial.checkpoint.path})
    assert left(tmp_path) == ["checkpoint_000000", "checkpoint_000002"]


def test_a_completed_trial_keeps_only_the_student_of_its_final_checkpoint(tmp_path):
    trial = trial_with_checkpoints(tmp_path, [0, 1], registered=1)
    prune(trial, EndedKeep(trial.checkpoint.path, student_only=True))
    assert left(tmp_path) == ["checkpoint_000001"]
    assert [p.name for p in (tmp_path / "checkpoint_000001").iterdir()] == ["student"]

    prune(trial, EndedKeep(None, student_only=True))
    assert left(tmp_path) == []
