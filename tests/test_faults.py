"""Faults during sweeps, done for real: killed trial processes, a lost worker node, a tracking
server that dies and comes back, and a diverging trial. Nothing finished may be lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.journal import undelivered
from services import LocalCluster, free_port, kill_group, start_mlflow_server, wait_for
from sweep_helpers import (
    assert_mlflow_holds_what_tune_holds, cli_env, distillsweep, distillsweep_together, journal_tail,
    journaled_metrics, metric_steps, sweep_runs, tiny_space, trial_results, trials_past, write_space,
)

pytestmark = pytest.mark.slow


def start_cli(args: list[str], cache: Path, cwd: Path, ray_address: str | None) -> subprocess.Popen:
    """The CLI as a process of its own session, so that `stop` takes down all it started."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=cli_env(cache, ray_address),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def finish(driver: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(driver)
        pytest.fail(f"the CLI did not end within {timeout:.0f} s")
    assert driver.returncode == 0, out[-4000:]
    return out


def trial_processes(tracking_uri: str) -> list[int]:
    """The processes of the Ray actors running this sweep's Tune trials (function trainables): its
    runtime environment carries the sweep's tracking URI, which no other test's sweep has."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if not any(part.startswith("ray::ImplicitFunc") for part in process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get("MLFLOW_TRACKING_URI") == tracking_uri:
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def command_lines(text: str) -> dict[int, list[str]]:
    """pid -> argv of the live processes whose command line mentions `text`."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        argv = process.info["cmdline"] or []
        if any(text in part for part in argv):
            found[process.pid] = argv
    return found


def long_space(teacher: str, tmp: Path, **fields) -> dict:
    spec = tiny_space(teacher, tmp, **fields)
    spec["base"]["training"].update(max_steps=40, eval_steps=4)
    return spec


def test_killed_trial_processes_resume_from_their_checkpoints(tiny_demo_teacher, demo_cache, tmp_path, ray_address):
    spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2]}}, max_failures=2,
                      max_concurrent_trials=2)
    spec["base"]["training"].update(max_steps=120)  # the kill lands mid-training
    uri = spec["tracking"]["uri"]
    driver = start_cli(["sweep", str(write_space(spec, tmp_path / "s.yaml"))], demo_cache, tmp_path, ray_address)
    folder = tmp_path / "sweeps" / "tiny"
    try:
        # Both trials (one per CPU) past their second evaluation, so each holds a checkpoint.
        wait_for(lambda: trials_past(folder, 8) == 2, what="two trials with two evaluations",
                 seen=lambda: journal_tail(folder))
        killed = trial_processes(uri)
        assert len(killed) == 2, killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        finish(driver)
    finally:
        kill_group(driver)

    results = trial_results(folder)
    _, children = sweep_runs(uri, "tests")
    assert len(results) == len(children) == 2
    for trial, rows in results.items():
        steps = [row["step"] for row in rows]
        ran_in = [(row["step"], row["pid"]) for row in rows]
        assert rows[0]["pid"] in killed and rows[-1]["pid"] not in killed, f"not on in a new process: {ran_in}"
        assert steps[-1] == 120
        assert steps.count(4) == 1, f"the trial restarted from zero: {steps}"
        assert sorted(set(steps)) == list(range(4, 121, 4)), f"Tune's result.json lost rows on the retry: {steps}"
        child = next(c for c in children if c.data.tags["ray_trial_id"] == trial)
        assert metric_steps(uri, child.info.run_id) == list(range(4, 121, 4))
        assert child.info.status == "FINISHED"
    assert_mlflow_holds_what_tune_holds(uri, folder)


def test_mlflow_down_driver_killed_resumed_and_server_back_loses_nothing(
    tiny_demo_teacher, demo_cache, tmp_path, ray_address
):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2, 3]}},
                      tracking={"uri": uri, "experiment": "tests"}, max_concurrent_trials=2)
    # Long enough that the driver is killed mid-training: trials of 40 steps can all end before it.
    spec["base"]["training"].update(max_steps=120)
    space_file = write_space(spec, tmp_path / "s.yaml")
    folder = tmp_path / "sweeps" / "tiny"

    driver = start_cli(["sweep", str(space_file)], demo_cache, tmp_path, ray_address)
    resumed = None
    try:
        wait_for(lambda: journaled_metrics(folder) >= 2, what="first results", seen=lambda: journal_tail(folder))
        kill_group(server)
        before_outage = journaled_metrics(folder)
        wait_for(lambda: journaled_metrics(folder) >= before_outage + 3, what="training to go on while MLflow is down",
                 seen=lambda: journal_tail(folder))
        kill_group(driver)
        assert undelivered(folder) > 0, "the records made while MLflow was down are in the journal"

        resumed = start_cli(["resume", str(folder)], demo_cache, tmp_path, ray_address)
        # Counted by report time: resume first journals, with their old times, rows the killed driver missed.
        resumed_at = time.time()
        wait_for(lambda: journaled_metrics(folder, since=resumed_at) >= 2,
                 what="the resumed sweep to train while MLflow is still down", seen=lambda: journal_tail(folder))
        server = start_mlflow_server(tmp_path, port)
        out = finish(resumed)
        assert "answers again" in out
        assert undelivered(folder) == 0
        assert_mlflow_holds_what_tune_holds(uri, folder)
    finally:
        for process in (server, driver, resumed):
            if process is not None:
                kill_group(process)


def test_sync_delivers_what_a_sweep_ended_without_and_finishes_its_parent_run(
    tiny_demo_teacher, demo_cache, tmp_path, ray_address
):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    # The sweep's end waits 1 s for the dead server (30 by default) before leaving the rest to `sync`.
    spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2]}},
                      tracking={"uri": uri, "experiment": "tests", "finish_wait_s": 1})
    folder = tmp_path / "sweeps" / "tiny"
    driver = start_cli(["sweep", str(write_space(spec, tmp_path / "s.yaml"))], demo_cache, tmp_path, ray_address)
    try:
        wait_for(lambda: journaled_metrics(folder), what="first results", seen=lambda: journal_tail(folder))
        kill_group(server)
        out = finish(driver)
        assert f"distillsweep sync {folder}" in out, out[-2000:]

        status = distillsweep(["status", str(folder)], demo_cache, tmp_path)
        assert "has not confirmed" in status.stdout
        down = distillsweep(["sync", str(folder), "--attempts", "1"], demo_cache, tmp_path)
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
        kill_group(server)
        kill_group(driver)


@pytest.fixture(scope="module")
def failing_sweeps(tiny_demo_teacher, demo_cache, tmp_path_factory, ray_address) -> dict[str, tuple]:
    """Two sweeps run at once: one with a diverging trial beside a sound one, one whose only trial
    diverges; name -> (the CLI's result, its spec, its sweep folder)."""
    diverging = tmp_path_factory.mktemp("diverging")
    # Names of their own: Ray stages a driver's files under the sweep's name and start second.
    spec = tiny_space(tiny_demo_teacher, diverging, name="diverging",
                      space={"training.learning_rate": {"grid": [1e-3, 1e12]}}, max_failures=1, max_concurrent_trials=2)
    spec["base"]["objectives"] = [{"name": "hidden_mse", "weight": 1.0}]
    spec["base"]["training"].update(max_grad_norm=0.0, warmup_ratio=0.0)
    all_fail = tmp_path_factory.mktemp("all-fail")
    failing = tiny_space(tiny_demo_teacher, all_fail, name="all-fail", space={"training.seed": {"grid": [1]}},
                         max_failures=0)
    failing["base"]["objectives"] = [{"name": "hidden_mse", "weight": 1.0}]
    failing["base"]["training"].update(learning_rate=1e12, max_grad_norm=0.0, warmup_ratio=0.0)
    sweeps = {"diverging": (spec, diverging), "all_fail": (failing, all_fail)}
    calls = [(["sweep", str(write_space(s, folder / "s.yaml"))], folder) for s, folder in sweeps.values()]
    done = distillsweep_together(calls, demo_cache, ray_address)
    return {name: (result, s, folder / "sweeps" / s["name"]) for (name, (s, folder)), result in zip(sweeps.items(), done)}


def test_diverging_trial_fails_with_its_reason_and_the_others_finish(failing_sweeps, demo_cache, tmp_path):
    done, spec, folder = failing_sweeps["diverging"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 of 2 trials finished (1 completed their budget, 0 stopped early by the scheduler), 1 failed" in done.stdout
    assert "non-finite" in done.stdout
    _, children = sweep_runs(spec["tracking"]["uri"], "tests")
    states = {c.data.params["training.learning_rate"]: c for c in children}
    assert states["0.001"].info.status == "FINISHED"
    failed = states["1000000000000.0"]
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["error"]
    assert failed.data.tags["trial_outcome"] == "diverged" and states["0.001"].data.tags["trial_outcome"] == "completed"
    status = distillsweep(["status", str(folder)], demo_cache, tmp_path)
    assert "1 completed, 1 diverged" in status.stdout


def test_sweep_whose_every_trial_fails_marks_its_parent_run_failed(failing_sweeps):
    done, spec, _ = failing_sweeps["all_fail"]
    assert done.returncode == 2 and "every trial failed" in done.stderr + done.stdout
    parent, children = sweep_runs(spec["tracking"]["uri"], "tests")
    assert parent.info.status == "FAILED" and [c.info.status for c in children] == ["FAILED"]


def test_lost_worker_node_moves_its_trials_to_the_head(tiny_demo_teacher, demo_cache, tmp_path):
    """Its own two-node cluster (the local recipe), since the drill kills the worker node's raylet."""
    cluster = LocalCluster.start(head_cpus=1, workers=1, cpus_per_worker=1)
    driver = None
    try:
        assert cluster.started.returncode == 0, cluster.started.stderr[-4000:]
        spec = long_space(tiny_demo_teacher, tmp_path, space={"training.seed": {"grid": [1, 2, 3]}}, max_failures=3,
                          max_concurrent_trials=2)
        driver = start_cli(["sweep", str(write_space(spec, tmp_path / "s.yaml"))], demo_cache, tmp_path,
                           cluster.address)
        folder = tmp_path / "sweeps" / "tiny"
        wait_for(lambda: trials_past(folder, 8) >= 2, what="two trials running, one of them on the worker node",
                 seen=lambda: journal_tail(folder))
        # The worker node's raylet: this cluster's (its temp folder) raylet started without --head.
        raylets = {pid: cmd for pid, cmd in command_lines(cluster.temp_dir).items() if cmd[0].endswith("/raylet")}
        pids = [pid for pid, cmd in raylets.items() if "--head" not in cmd]
        assert len(raylets) == 2 and len(pids) == 1, f"no single worker raylet among {raylets}"
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
        if driver is not None:
            kill_group(driver)
        cluster.stop()


def test_trial_whose_reused_worker_dies_as_it_is_handed_over_gets_its_retry(tmp_path, ray_address):
    """With `reuse_actors`, Tune hands the next trial to a finished trial's worker through `reset`. A worker
    that dies then must cost the trial one retry, not end it in ERROR (orchestrator/tune_reset_retry.py)."""
    import ray
    from ray import tune

    from orchestrator import tune_reset_retry

    death = tmp_path / "die-at-next-reset"
    death.touch()

    class DiesAtItsFirstReset(tune.Trainable):  # defined here: Ray ships it to the worker by value
        def setup(self, config: dict) -> None:
            self.steps = 0

        def step(self) -> dict:
            self.steps += 1
            return {"score": self.steps, "pid": os.getpid(), "done": self.steps >= 2}

        def reset_config(self, new_config: dict) -> bool:
            if os.path.exists(new_config["death"]):
                os.remove(new_config["death"])
                os._exit(1)
            self.steps = 0
            return True

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            return None

        def load_checkpoint(self, checkpoint: dict) -> None:
            return None

    tune_reset_retry.install()
    ray.init(address=ray_address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        results = tune.Tuner(
            DiesAtItsFirstReset,
            param_space={"seed": tune.grid_search([1, 2, 3]), "death": str(death)},
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="handover", verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        ).fit()
    finally:
        ray.shutdown()
    assert not death.exists(), "no worker died while being reset, so this proved nothing"
    assert [r.error for r in results] == [None] * 3, [repr(r.error)[:300] for r in results]
    assert [r.metrics["score"] for r in results] == [2, 2, 2]
    assert len({r.metrics["pid"] for r in results}) == 2, "the retry runs in a new worker, the next trial reuses it"


def test_a_worker_whose_stopped_trial_is_slow_to_tear_down_takes_the_next_trial(tmp_path, ray_address):
    """Tune stops a trial inside `tune.report` and hands its worker the next trial once the trial's
    thread has ended, waiting 2 s by default; past that it ends the next trial in ERROR, unretried. A
    sweep's workers wait as long as a real teardown takes (orchestrator.sweep.HANDOVER_WAIT)."""
    import ray
    from ray import tune

    from orchestrator.config import SweepSpec
    from orchestrator.sweep import HANDOVER_WAIT, trial_env

    def slow_to_tear_down(config: dict) -> None:
        try:
            for step in range(1, 100):
                tune.report({"step": step, "pid": os.getpid()})
        finally:
            # Stands for the work a stopped distillation trial does here (freeing models, removing
            # copies): longer than Tune's default wait of 2 s.
            time.sleep(3)

    spec = SweepSpec.model_validate({"name": "handover", "base": {"task": "rte", "teacher": "roberta-base"}})
    env = trial_env(spec, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert env[HANDOVER_WAIT[0]] == os.environ.get(HANDOVER_WAIT[0], HANDOVER_WAIT[1])
    ray.init(address=ray_address, runtime_env={"env_vars": env})
    try:
        results = tune.Tuner(
            slow_to_tear_down,
            # Two workers at a time (one CPU a trial). With one, a failed hand-over leaves Tune (2.60)
            # waiting for a worker for good instead of failing the trial.
            param_space={"seed": tune.grid_search([1, 2, 3, 4])},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="handover", verbose=0,
                                      stop={"training_iteration": 2}),
        ).fit()
    finally:
        ray.shutdown()
    assert [r.error for r in results] == [None] * 4, [repr(r.error)[:300] for r in results]
    assert [r.metrics["step"] for r in results] == [2, 2, 2, 2]
    # Up to two workers: how many Tune starts depends on how fast a worker starts beside the first trial's
    # handovers (all four trials ran in one worker on a slower CPU); a handover is all this needs.
    workers = {r.metrics["pid"] for r in results}
    assert len(workers) < len(results), f"no trial was handed a stopped trial's worker ({len(workers)} workers)"
