"""A sweep's disk is bounded: an ended trial keeps at most its student's files, never optimiser
state, and no copy of a checkpoint survives outside Tune's storage."""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path

import pytest

from orchestrator.report import read_result_rows
from sweep_helpers import distillsweep, distillsweep_together, tiny_space, trial_results, write_space
from trainables.tune_trainable import scratch_prefix

pytestmark = pytest.mark.slow

SMALL_FILES = 2_500_000  # config, tokenizer (tokenizer.json is 0.7 MB), result.json, outcome


def files_under(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in path.rglob("*") if p.is_file()}


def working_dirs(ray_dir: Path, sweep_name: str) -> list[Path]:
    """The trials' working folders in Ray's session folder (trial outputs that Tune does not sync)."""
    return [Path(p) for p in glob.glob(f"{ray_dir}/session_*/artifacts/*/{sweep_name}/working_dirs/*")]


@pytest.fixture(scope="module")
def kept_sweeps(tiny_demo_teacher, demo_cache, tmp_path_factory, ray_address) -> dict[str, tuple]:
    """Two sweeps run at once, keeping `final` and `none`; keep -> (the CLI's result, its folder)."""
    final = tmp_path_factory.mktemp("keep-final")
    # In order, in one worker: a trial that trains its 12 steps, then a hopeless one that ASHA
    # stops at step 8. max_t is the budget, as in the quickstart: the completed trial is stopped
    # by the scheduler at its last report too.
    spec = tiny_space(tiny_demo_teacher, final, name=f"disk-{final.name}", max_concurrent_trials=1,
                      space={"training.learning_rate": {"grid": [1e-3, 1e-12]}},
                      scheduler={"type": "asha", "max_t": 12, "grace_period": 8, "reduction_factor": 2})
    none = tmp_path_factory.mktemp("keep-none")
    nothing_kept = tiny_space(tiny_demo_teacher, none, keep="none", space={})
    sweeps = {"final": (spec, final), "none": (nothing_kept, none)}
    done = distillsweep_together([(["sweep", str(write_space(s, folder / "space.yaml"))], folder)
                                  for s, folder in sweeps.values()], demo_cache, ray_address)
    return {keep: (result, folder / "sweeps" / s["name"]) for (keep, (s, folder)), result in zip(sweeps.items(), done)}


def test_ended_trials_keep_only_their_student_and_stopped_trials_nothing(kept_sweeps, demo_cache, tmp_path,
                                                                         ray_cluster):
    done, folder = kept_sweeps["final"]
    name = folder.name
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = trial_results(folder)
    steps = sorted(rows[-1]["step"] for rows in results.values())
    assert steps == [8, 12], f"ASHA should stop the trial with learning rate 1e-12 at step 8: {steps}"

    files = files_under(folder)
    assert not [p for p in files if p.suffix == ".pt"], "optimiser state (state.pt) or best weights left in storage"
    for trial_dir in (p for p in folder.iterdir() if p.is_dir()):
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        held = files_under(trial_dir)
        if read_result_rows(trial_dir / "result.json")[-1]["step"] == 8:  # stopped by ASHA
            assert checkpoints == [], f"a stopped trial keeps its checkpoints: {checkpoints}"
            assert sum(held.values()) < SMALL_FILES
            continue
        assert len(checkpoints) == 1, f"the completed trial keeps one checkpoint: {sorted(held)}"
        assert [p.name for p in checkpoints[0].iterdir()] == ["student"]
        weights = checkpoints[0] / "student" / "model.safetensors"
        assert sum(held.values()) <= weights.stat().st_size + SMALL_FILES, sorted(held.items(), key=lambda x: -x[1])[:5]

    working = working_dirs(ray_cluster.ray_dir, name)
    leftovers = [p for d in working for p in d.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert working and not leftovers, f"copies outside Tune's storage: {leftovers}"
    scratch = [p for d in folder.iterdir() for p in Path(tempfile.gettempdir()).glob(f"{scratch_prefix(d)}*")]
    assert not scratch, f"the runs' scratch folders are left: {scratch}"

    status = distillsweep(["status", str(folder)], demo_cache, tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "disk:" in status.stdout and "2 ended trials" in status.stdout, status.stdout


def test_keep_none_leaves_no_weights(kept_sweeps):
    done, folder = kept_sweeps["none"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [rows[-1]["step"] for rows in trial_results(folder).values()] == [12]
    assert not list(folder.glob("*/checkpoint_*"))
    assert sum(files_under(folder).values()) < SMALL_FILES
