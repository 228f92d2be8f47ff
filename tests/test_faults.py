"""Faults during sweeps, done for real: killed trial processes, a lost worker node, a tracking
server that dies and comes back, and a diverging trial. Nothing finished may be lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.journal import JOURNAL_FILE, undelivered
from sweep_helpers import (
    assert_mlflow_holds_what_tune_holds, cli_env, distillsweep, metric_steps, sweep_runs, tiny_space, write_space,
)
from test_sweep_e2e import free_port, start_mlflow_server, trial_results

pytestmark = pytest.mark.slow


def start_sweep(space_file: Path, cache: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "sweep", str(space_file), *args], cwd=cwd, env=cli_env(cache),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(predicate, timeout: float = 600, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def finish(driver: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = driver.communicate(timeout=timeout)
    assert driver.returncode == 0, out[-4000:]
    return out


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


def trial_processes() -> list[int]:
    """The processes of the Ray actors running Tune trials (function trainables) on this machine."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(part.startswith("ray::ImplicitFunc") for part in p.info["cmdline"] or [])]


def long_space(teacher: str, tmp: Path, **fields) -> dict:
    spec = tiny_space(teacher, tmp, **fields)
    spec["base"]["training"].update(max_steps=40, eval_steps=4)
    return spec


def test_killed_trial_processes_resume_from_their_checkpoints(tiny_demo_teacher, demo_cache, tmp_path):
    spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2]}}, max_failures=2)
    spec["base"]["training"].update(max_steps=120)  # about 10 s here: the kill lands mid-training
    driver = start_sweep(write_space(spec, tmp_path / "s.yaml"), demo_cache, tmp_path)
    folder = tmp_path / "sweeps" / "tiny"

    # Both trials (one per CPU) past their second evaluation, so each holds a checkpoint.
    wait_for(lambda: trials_past(folder, 8) == 2, what="two trials with two evaluations")
    killed = trial_processes()
    assert len(killed) == 2, killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    finish(driver)

    results = trial_results(folder)
    uri = spec["tracking"]["uri"]
    _, children = sweep_runs(uri, "tests")
    assert len(results) == len(children) == 2
    for trial, rows in results.items():
        steps = [row["step"] for row in rows]
        assert rows[0]["pid"] in killed and rows[-1]["pid"] not in killed, "the trial ran on in a new process"
        assert steps[-1] == 120
        assert steps.count(4) == 1, f"the trial restarted from zero: {steps}"
        assert sorted(set(steps)) == list(range(4, 121, 4)), f"Tune's result.json lost rows on the retry: {steps}"
        child = next(c for c in children if c.data.tags["ray_trial_id"] == trial)
        assert metric_steps(uri, child.info.run_id) == list(range(4, 121, 4))
        assert child.info.status == "FINISHED"
    assert_mlflow_holds_what_tune_holds(uri, folder)


def test_mlflow_down_driver_killed_resumed_and_server_back_loses_nothing(tiny_demo_teacher, demo_cache, tmp_path):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2, 3]}},
                      tracking={"uri": uri, "experiment": "tests"})
    # Long enough that the driver is killed mid-training: trials of 40 steps can all end before it.
    spec["base"]["training"].update(max_steps=120)
    space_file = write_space(spec, tmp_path / "s.yaml")
    folder = tmp_path / "sweeps" / "tiny"

    driver = start_sweep(space_file, demo_cache, tmp_path)
    try:
        wait_for(lambda: journaled_metrics(folder) >= 2, what="first results")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        before_outage = journaled_metrics(folder)
        wait_for(lambda: journaled_metrics(folder) >= before_outage + 3, what="training to go on while MLflow is down")
        driver.kill()
        driver.wait()
        assert undelivered(folder) > 0, "the records made while MLflow was down are in the journal"

        resumed = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "resume", str(folder)], cwd=tmp_path, env=cli_env(demo_cache),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # Counted by report time: resume first journals, with their old times, rows the killed driver missed.
        resumed_at = time.time()
        wait_for(lambda: journaled_metrics(folder, since=resumed_at) >= 2,
                 what="the resumed sweep to train while MLflow is still down")
        server = start_mlflow_server(tmp_path, port)
        out = finish(resumed)
        assert "answers again" in out
        assert undelivered(folder) == 0
        assert_mlflow_holds_what_tune_holds(uri, folder)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        driver.kill()


def test_sync_delivers_what_a_sweep_ended_without_and_finishes_its_parent_run(tiny_demo_teacher, demo_cache, tmp_path):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2]}},
                      tracking={"uri": uri, "experiment": "tests"})
    folder = tmp_path / "sweeps" / "tiny"
    driver = start_sweep(write_space(spec, tmp_path / "s.yaml"), demo_cache, tmp_path)
    try:
        wait_for(lambda: journaled_metrics(folder), what="first results")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        out = finish(driver)
        assert f"distillsweep sync {folder}" in out, out[-2000:]

        status = distillsweep(["status", str(folder)], demo_cache, tmp_path)
        assert "has not confirmed" in status.stdout
        down = distillsweep(["sync", str(folder)], demo_cache, tmp_path)
        assert down.returncode == 2 and "did not answer" in down.stderr and "again" in down.stderr

        server = start_mlflow_server(tmp_path, port)
        done = distillsweep(["sync", str(folder)], demo_cache, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "still unsent" not in done.stderr
        assert_mlflow_holds_what_tune_holds(uri, folder)
        again = distillsweep(["sync", str(folder)], demo_cache, tmp_path)
        assert again.returncode == 0 and "sent 0" in again.stderr
        assert_mlflow_holds_what_tune_holds(uri, folder)
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_diverging_trial_fails_with_its_reason_and_the_others_finish(tiny_demo_teacher, demo_cache, tmp_path):
    spec = tiny_space(
        tiny_demo_teacher, tmp_path,
        space={"training.learning_rate": {"grid": [1e-3, 1e12]}},
        max_failures=1,
    )
    spec["base"]["objectives"] = [{"name": "hidden_mse", "weight": 1.0}]
    spec["base"]["training"].update(max_grad_norm=0.0, warmup_ratio=0.0)
    done = distillsweep(["sweep", str(write_space(spec, tmp_path / "s.yaml"))], demo_cache, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 of 2 trials finished (1 completed their budget, 0 stopped early by the scheduler), 1 failed" in done.stdout
    assert "non-finite" in done.stdout
    _, children = sweep_runs(spec["tracking"]["uri"], "tests")
    states = {c.data.params["training.learning_rate"]: c for c in children}
    assert states["0.001"].info.status == "FINISHED"
    failed = states["1000000000000.0"]
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["error"]
    assert failed.data.tags["trial_outcome"] == "diverged" and states["0.001"].data.tags["trial_outcome"] == "completed"
    status = distillsweep(["status", str(tmp_path / "sweeps" / "tiny")], demo_cache, tmp_path)
    assert "1 completed, 1 diverged" in status.stdout


def test_sweep_whose_every_trial_fails_marks_its_parent_run_failed(tiny_demo_teacher, demo_cache, tmp_path):
    spec = tiny_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1]}}, max_failures=0)
    spec["base"]["objectives"] = [{"name": "hidden_mse", "weight": 1.0}]
    spec["base"]["training"].update(learning_rate=1e12, max_grad_norm=0.0, warmup_ratio=0.0)
    done = distillsweep(["sweep", str(write_space(spec, tmp_path / "s.yaml"))], demo_cache, tmp_path)
    assert done.returncode == 2 and "every trial failed" in done.stderr + done.stdout
    parent, children = sweep_runs(spec["tracking"]["uri"], "tests")
    assert parent.info.status == "FAILED" and [c.info.status for c in children] == ["FAILED"]


def ray_start(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args], env=env, check=True,
                   capture_output=True, timeout=120)


def test_lost_worker_node_moves_its_trials_to_the_head(tiny_demo_teacher, demo_cache, tmp_path):
    env = cli_env(demo_cache) | {"RAY_AUTH_MODE": "token"}
    port, worker_port = free_port(), free_port()
    ray_start("--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--include-dashboard", "false", "--disable-usage-stats", env=env)
    try:
        ray_start("--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                  "--node-manager-port", str(worker_port), "--disable-usage-stats", env=env)
        spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2, 3]}}, max_failures=3)
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "sweep", str(write_space(spec, tmp_path / "s.yaml")),
             "--address", f"127.0.0.1:{port}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        folder = tmp_path / "sweeps" / "tiny"
        wait_for(lambda: trials_past(folder, 8) >= 2, what="two trials running, one of them on the worker node")
        # The whole port number: a prefix would also match another cluster's raylet on this machine.
        raylet = subprocess.run(["pgrep", "-f", f"node_manager_port={worker_port}([^0-9]|$)"],
                                capture_output=True, text=True)
        pids = [int(p) for p in raylet.stdout.split()]
        assert pids, "worker raylet not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        finish(driver)
        results = trial_results(folder)
        assert len(results) == 3 and all(rows[-1]["step"] == 40 for rows in results.values())
        _, children = sweep_runs(spec["tracking"]["uri"], "tests")
        assert sorted(c.data.tags["ray_trial_id"] for c in children) == sorted(results)
        assert all(c.info.status == "FINISHED" for c in children)
        assert_mlflow_holds_what_tune_holds(spec["tracking"]["uri"], folder)
    finally:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], env=env,
                       capture_output=True, timeout=120)
