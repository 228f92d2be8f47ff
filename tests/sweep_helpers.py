"""Helpers for end-to-end sweep tests: run the real CLI, read the real MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from orchestrator.journal import JOURNAL_FILE
from orchestrator.report import read_result_rows
from orchestrator.metric_names import is_measurement
from orchestrator.mlflow_callback import TUNE_BOOKKEEPING
from services import kill_group

ROOT = Path(__file__).resolve().parents[1]


def cli_env(cache: Path, ray_address: str | None = None) -> dict[str, str]:
    """The CLI's environment: offline, one thread; on the Ray cluster at `ray_address`, else a private one."""
    env = dict(os.environ)
    env.update(
        DISTILLSWEEP_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
        RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env.update(RAY_ADDRESS=ray_address, RAY_AUTH_MODE="token")
    return env


# Commands that start no Ray and train nothing run in the test's process, through the CLI's own Typer
# app: a CLI process spends 4 to 6 s of CPU importing before such a command starts, most of its run.
IN_PROCESS_COMMANDS = {"status", "report", "sync"}


def distillsweep(args: list[str], cache: Path, cwd: Path, timeout: float = 900,
                 ray_address: str | None = None) -> subprocess.CompletedProcess:
    if args[0] in IN_PROCESS_COMMANDS and ray_address is None:
        return distillsweep_in_process(args, cache, cwd)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=cli_env(cache, ray_address),
        capture_output=True, text=True, timeout=timeout,
    )


def distillsweep_in_process(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`distillsweep ARGS` in `cwd` with the CLI's environment, as a subprocess would run it; the
    environment and the working folder are this process's again afterwards."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    env, before = cli_env(cache), dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.chdir(cwd):
            result = CliRunner().invoke(app, args)
    finally:  # the CLI sets library defaults in its environment, which must not outlive the command
        os.environ.clear()
        os.environ.update(before)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["distillsweep", *args], result.exit_code, result.stdout, result.stderr)


def distillsweep_together(calls: list[tuple[list[str], Path]], cache: Path, ray_address: str | None = None,
                          timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Several CLI commands at once, each in its folder: on a shared cluster their sweeps overlap
    their start-up (imports, worker processes), which is most of a tiny sweep's time."""
    processes = []
    try:
        for args, cwd in calls:
            out, err = (open(cwd / f"cli.{stream}", "w+") for stream in ("out", "err"))
            processes.append((subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=cli_env(cache, ray_address),
                stdout=out, stderr=err, text=True, start_new_session=True), out, err))
        for process, _, _ in processes:
            process.wait(timeout=timeout)
    finally:
        for process, _, _ in processes:
            kill_group(process)
    done = []
    for process, out, err in processes:
        out.seek(0), err.seek(0)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read()))
        out.close(), err.close()
    return done


STORE_TEMPLATE: list[Path] = []  # set once per session by conftest's `mlflow_store_template`


def sqlite_store(folder: Path) -> str:
    """The URI of a SQLite MLflow store in `folder`, copied from the session's empty, migrated one:
    MLflow takes about 2 s to create and migrate each new store's tables."""
    path = folder / "mlflow.db"
    if STORE_TEMPLATE and not path.exists():
        shutil.copyfile(STORE_TEMPLATE[0], path)
    return f"sqlite:///{path}"


def tiny_space(teacher: str, tmp: Path, **fields: Any) -> dict[str, Any]:
    """A small real sweep on the demo task with the tiny teacher: a few seconds per trial.

    One trial at a time unless a test asks for more: each concurrent trial is one more worker
    process, which imports torch and transformers (about 6 s of CPU) before it trains at all."""
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
        "max_concurrent_trials": 1,
        "storage": str(tmp / "sweeps"),
        "tracking": {"uri": sqlite_store(tmp), "experiment": "tests"},
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


def trial_results(experiment_dir: Path) -> dict[str, list[dict]]:
    """trial id -> its reported rows, from Tune's result.json files."""
    out = {}
    for path in experiment_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def journal_tail(folder: Path) -> str:
    """What a timed-out wait saw: the journal's last lines."""
    journal = folder / JOURNAL_FILE
    return "\n".join(journal.read_text().splitlines()[-3:]) if journal.is_file() else "no journal yet"


def journaled(folder: Path, since: float = 0.0) -> list[dict]:
    """The evaluations the driver has journaled that were reported after `since` (epoch seconds).

    Unlike result.json in the sweep folder, which Tune updates only at its snapshots (by when
    these short trials may have ended), the journal is written as each result arrives."""
    journal = folder / JOURNAL_FILE
    text = journal.read_text() if journal.is_file() else ""
    complete = text[: text.rfind("\n") + 1].splitlines()  # the driver may be writing the last line
    records = [json.loads(line) for line in complete]
    return [r for r in records if r["op"] == "metrics" and r["time"] >= since * 1000]


def journaled_metrics(folder: Path, since: float = 0.0) -> int:
    return len(journaled(folder, since))


def trials_past(folder: Path, step: int) -> int:
    """How many trials have journaled an evaluation at `step` or later."""
    return len({r["key"] for r in journaled(folder) if r["step"] >= step})
