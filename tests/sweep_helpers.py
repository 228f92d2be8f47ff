"""Helpers for end-to-end sweep tests: run the real CLI, read the real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from orchestrator.report import read_result_rows
from orchestrator.metric_names import is_measurement
from orchestrator.mlflow_callback import TUNE_BOOKKEEPING

ROOT = Path(__file__).resolve().parents[1]


def cli_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DISTILLSWEEP_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
        RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def distillsweep(args: list[str], cache: Path, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=cli_env(cache),
        capture_output=True, text=True, timeout=timeout,
    )


def tiny_space(teacher: str, tmp: Path, **fields: Any) -> dict[str, Any]:
    """A small real sweep on the demo task with the tiny teacher: a few seconds per trial."""
    spec = {
        "name": "tiny",
        "base": {
            "task": "demo",
            "teacher": teacher,
            "student": {"num_layers": 2, "init": "lower"},
            "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}],
            "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 32, "max_seq_length": 48,
                         "max_steps": 12, "eval_steps": 4},
        },
        "space": {"objectives.mix": {"grid": [["kd"], ["kd", "hidden_mse"]]}},
        "resources": {"cpu": 1},
        "max_concurrent_trials": 2,
        "storage": str(tmp / "sweeps"),
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests"},
    }
    spec.update(fields)
    return spec


def write_space(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_runs(tracking_uri: str, experiment: str) -> tuple[Any, list[Any]]:
    """(parent run, child runs) of the one sweep in `experiment`."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("distillsweep_role") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def metric_steps(tracking_uri: str, run_id: str, key: str = "score") -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def assert_mlflow_holds_what_tune_holds(uri: str, folder: Path) -> None:
    """Row for row: each trial one child run, each reported step once (results with a value Tune holds
    for that step), no run RUNNING."""
    parent, children = sweep_runs(uri, "tests")
    results = {}
    for path in folder.glob("*/result.json"):
        rows = read_result_rows(path)
        if rows:
            results[rows[0]["trial_id"]] = rows
    assert sorted(c.data.tags["ray_trial_id"] for c in children) == sorted(results), "each trial exactly once"
    client = MlflowClient(uri)
    for child in children:
        rows = results[child.data.tags["ray_trial_id"]]
        names = {k for k, v in rows[-1].items() if isinstance(v, (int, float)) and k not in TUNE_BOOKKEEPING}
        for name in names - {"step"}:
            # A restored trial reports the steps after its checkpoint again: the same results, but
            # measurements taken anew, and after a driver kill result.json may keep only the replay's.
            # MLflow holds each step once; a result with one of Tune's values for it.
            expected: dict[int, list[float]] = {}
            for row in rows:
                expected.setdefault(row["step"], []).append(row[name])
            history = client.get_metric_history(child.info.run_id, name)
            logged = sorted(m.step for m in history)
            assert logged == sorted(expected), f"{name}: every step exactly once; MLflow {logged}, Tune {sorted(expected)}"
            if is_measurement(name):
                continue
            for metric in history:
                assert any(metric.value == pytest.approx(v) for v in expected[metric.step]), (name, metric.step)
        assert child.info.status in ("FINISHED", "KILLED"), child.info.status
    assert parent.info.status == "FINISHED"
