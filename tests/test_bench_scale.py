"""The study-size rehearsal at its smallest size (bench/scale.py, issue 11 items 4 and 5): a real
2-node Ray cluster with fake GPUs, a real `mlflow server`, a lost worker node, an MLflow outage and
a SIGKILLed driver resumed through the CLI; every trial and evaluation must end in MLflow exactly once.

Figures are not asserted here (they live in the bench's JSON and BENCHMARKS.md); the verdict is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_smallest_rehearsal_keeps_every_trial_and_evaluation_exactly_once(tmp_path):
    out = tmp_path / "scale"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--size", "smallest", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert (out / "scale.json").is_file(), f"no scale.json (rc {done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads((out / "scale.json").read_text())
    failed = {name: check["detail"] for name, check in result["consistency"]["checks"].items() if not check["ok"]}
    assert done.returncode == 0 and not failed, f"{failed}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert result["consistency"]["ok"] is True
    from bench.scale import SIZES  # here, not at the top: it imports the orchestrator, which collection need not

    trials = SIZES["smallest"].trials
    assert result["trials"] == trials and result["size_name"] == "smallest"
    events = result["events"]
    assert events["worker_killed"]["at_done"] < trials and events["driver_killed_at_done"] < trials
    assert events["worker_killed"]["running_trials_on_it"], "the lost node was training a trial, which had to move"
    for trial, steps in events["moved_trials_steps"].items():
        assert steps.count(steps[0]) == 1, f"{trial} started again from zero after its node was lost: {steps}"
    assert events["resume_rc"] == 0 and "resume_to_first_result_s" in events
    assert events["status"]["rc"] == 0 and events["report"]["rc"] == 0

