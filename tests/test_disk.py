"""A sweep's disk is bounded: an ended trial keeps at most its student's files, never optimiser
state, and no copy of a checkpoint survives outside Tune's storage."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import pytest

from sweep_helpers import distillsweep, tiny_space, write_space
from test_sweep_e2e import trial_results

pytestmark = pytest.mark.slow

SMALL_FILES = 2_500_000  # config, tokenizer (tokenizer.json is 0.7 MB), result.json, outcome


def files_under(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in path.rglob("*") if p.is_file()}


def working_dirs(sweep_name: str) -> list[Path]:
    """The trials' working folders in Ray's session folder (trial outputs that Tune does not sync)."""
    root = os.environ.get("RAY_TMPDIR", "/tmp") + "/ray"
    return [Path(p) for p in glob.glob(f"{root}/session_*/artifacts/*/{sweep_name}/working_dirs/*")]


def test_ended_trials_keep_only_their_student_and_stopped_trials_nothing(tiny_demo_teacher, demo_cache, tmp_path):
    name = f"disk-{tmp_path.name}"
    # In order, in one worker: a trial that trains its 12 steps, then a hopeless one that ASHA
    # stops at step 8. max_t is the budget, as in the quickstart: the completed trial is stopped
    # by the scheduler at its last report too.
    spec = tiny_space(tiny_demo_teacher, tmp_path, name=name, max_concurrent_trials=1,
                      space={"training.learning_rate": {"grid": [1e-3, 1e-12]}},
                      scheduler={"type": "asha", "max_t": 12, "grace_period": 8, "reduction_factor": 2})
    done = distillsweep(["sweep", str(write_space(spec, tmp_path / "space.yaml"))], demo_cache, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "sweeps" / name
    results = trial_results(folder)
    steps = sorted(rows[-1]["step"] for rows in results.values())
    assert steps == [8, 12], f"ASHA should stop the trial with learning rate 1e-12 at step 8: {steps}"

    files = files_under(folder)
    assert not [p for p in files if p.suffix == ".pt"], "optimiser state (state.pt) or best weights left in storage"
    for trial_dir in (p for p in folder.iterdir() if p.is_dir()):
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        held = files_under(trial_dir)
        if (trial_dir / "result.json").read_text().count("\n") == 2:  # stopped at step 8: 2 evaluations
            assert checkpoints == [], f"a stopped trial keeps its checkpoints: {checkpoints}"
            assert sum(held.values()) < SMALL_FILES
            continue
        assert len(checkpoints) == 1 and [p.name for p in checkpoints[0].iterdir()] == ["student"]
        weights = checkpoints[0] / "student" / "model.safetensors"
        assert sum(held.values()) <= weights.stat().st_size + SMALL_FILES, sorted(held.items(), key=lambda x: -x[1])[:5]

    leftovers = [p for d in working_dirs(name) for p in d.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert working_dirs(name) and not leftovers, f"copies outside Tune's storage: {leftovers}"
    scratch = Path(tempfile.gettempdir()) / "distillsweep-trials"
    assert not [d for d in folder.iterdir() if (scratch / d.name).exists()], "the runs' scratch folders are left"

    status = distillsweep(["status", str(folder)], demo_cache, tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "disk:" in status.stdout and "2 ended trials" in status.stdout, status.stdout


def test_keep_none_leaves_no_weights(tiny_demo_teacher, demo_cache, tmp_path):
    spec = tiny_space(tiny_demo_teacher, tmp_path, keep="none", space={})
    done = distillsweep(["sweep", str(write_space(spec, tmp_path / "space.yaml"))], demo_cache, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "sweeps" / "tiny"
    assert [rows[-1]["step"] for rows in trial_results(folder).values()] == [12]
    assert not list(folder.glob("*/checkpoint_*"))
    assert sum(files_under(folder).values()) < SMALL_FILES
