"""Sweeps end to end: the real CLI, a real local Ray runtime, real MLflow stores, real Optuna."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from orchestrator.experiment_state import newest_state_file
from services import free_port, kill_group, start_mlflow_server, wait_for
from sweep_helpers import (
    ROOT, assert_mlflow_holds_what_tune_holds, cli_env, distillsweep, distillsweep_together, metric_steps,
    sqlite_store, sweep_runs, tiny_space, trial_results, write_space,
)

pytestmark = pytest.mark.slow


def test_quickstart_preset_runs_from_cli_with_asha_and_mlflow(tiny_demo_teacher, demo_cache, tmp_path, ray_address):
    """The preset as shipped but for its teacher: the tiny one (the MiniLM demo teacher takes minutes
    to fine-tune on 2 cores, and `distillsweep demo` is what runs it). ASHA compares the two learning
    rates of a cell, never two cells: every cell keeps a trial trained to the end."""
    uri = sqlite_store(tmp_path)
    done = distillsweep(
        ["sweep", str(ROOT / "search_spaces" / "quickstart.yaml"), "--set", f"storage={tmp_path / 'sweeps'}",
         "--set", f"tracking.uri={uri}", "--set", f"base.teacher={tiny_demo_teacher}"],
        demo_cache, tmp_path, ray_address=ray_address,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "warning" not in done.stdout + done.stderr, "the preset groups what the report compares"
    results = trial_results(tmp_path / "sweeps" / "quickstart")
    assert len(results) == 8
    # The console: one line per ended trial (and a few of Ray's and MLflow's), not Tune's tables,
    # which go to the sweep's ray.log.
    console = (done.stdout + done.stderr).splitlines()
    progress = [line for line in console if line.startswith("trials ")]
    assert len(console) < 40 and 1 <= len(progress) <= 8 and progress[-1].startswith("trials 8/8 done"), console
    assert "best score" in progress[-1] and "| 0 running" in progress[-1], progress[-1]
    assert "Trial name" in (tmp_path / "sweeps" / "quickstart" / "ray.log").read_text()
    steps = {trial: rows[-1]["step"] for trial, rows in results.items()}
    scores = {trial: max(r["score"] for r in rows) for trial, rows in results.items()}
    cell_of = {trial: ("kd" if rows[0]["config"]["objectives.mix"] == ["kd"] else "att_kl+kd",
                       rows[0]["config"]["student.init"]) for trial, rows in results.items()}
    cells: dict[tuple, list[int]] = {}
    for trial, rows in results.items():
        config = rows[0]["config"]
        cells.setdefault((str(config["objectives.mix"]), config["student.init"]), []).append(steps[trial])
    assert len(cells) == 4 and all(40 in reached for reached in cells.values()), f"a cell lost every trial: {cells}"
    assert min(steps.values()) < 40, f"ASHA stopped no trial early inside any cell: {cells}"

    parent, children = sweep_runs(uri, "quickstart")
    assert len(children) == 8
    by_trial = {c.data.tags["ray_trial_id"]: c for c in children}
    assert set(by_trial) == set(results)
    for trial, rows in results.items():
        child = by_trial[trial]
        completed = rows[-1]["step"] == 40
        assert child.data.tags["trial_outcome"] == ("completed" if completed else "stopped")
        assert child.info.status == ("FINISHED" if completed else "KILLED")
        if not completed:
            assert child.data.tags["trial_outcome_detail"] == f"stopped by the scheduler at step {rows[-1]['step']} of 40"
        assert child.data.tags["objective_mix"] in ("kd", "att_kl+kd")
        assert child.data.params["student.init"] in ("lower", "upper")
        assert metric_steps(uri, child.info.run_id) == [r["step"] for r in rows]
    assert parent.info.status == "FINISHED"

    folder = tmp_path / "sweeps" / "quickstart"
    status = distillsweep(["status", str(folder)], demo_cache, tmp_path)
    stopped = sum(step < 40 for step in steps.values())
    assert status.returncode == 0 and f"{8 - stopped} completed, {stopped} stopped" in status.stdout

    report = distillsweep(["report", str(folder), "--register", "quickstart"], demo_cache, tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    # One row per objective mix x initialisation: the learning rate was tuned within each cell.
    table = pd.read_csv(folder / "report" / "report.csv")
    assert len(table) == 4 and table["stopped"].sum() == stopped
    assert table["mean"].notna().all(), "every cell of the objective x initialisation table holds a score"
    for cell in table.to_dict("records"):
        best = max(scores[trial] for trial in results if cell_of[trial] == (cell["configuration"], cell["init"])
                   and steps[trial] == 40)
        assert cell["mean"] == pytest.approx(best)
    assert "tuned training.learning_rate within each cell" in report.stdout
    assert "stopped by the scheduler at step" in report.stdout
    assert "registered quickstart-demo version 1" in report.stdout + report.stderr

    # The demo's closing lines: the registered student (logged from its kept checkpoint, since the
    # preset logs no students) loads by its registry name and predicts. Registering again is a no-op.
    from orchestrator.demo import register_demo_students

    demo = register_demo_students(folder)
    assert len(demo.registered) == 1 and "quickstart-demo version 1" in demo.registered[0], demo.registered
    registry = MlflowClient(uri)
    assert [m.name for m in registry.search_registered_models()] == ["quickstart-demo"]
    line = demo.load_lines[0].replace(" python -c ", f" {sys.executable} -c ")  # this test's interpreter
    loaded = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=cli_env(demo_cache),
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "label" in loaded.stdout and "score" in loaded.stdout, loaded.stdout


@pytest.fixture(scope="module")
def searched_sweeps(tiny_demo_teacher, demo_cache, tmp_path_factory, ray_address) -> dict[str, tuple]:
    """Three sweeps with Optuna's samplers, run at once on the shared cluster:
    name -> (the CLI's result, its spec, its working folder)."""
    optuna_space = {
        "objectives.mix": {"choice": [["kd"], ["kd", "hidden_mse"]]},
        "objectives.kd.weight": {"uniform": [0.1, 0.9]},
        "objectives.kd.temperature": {"choice": [1.0, 2.0, 4.0]},
        "objectives.hidden_mse.weight": {"loguniform": [0.01, 10.0]},
    }
    qmc_space = {
        "objectives.mix": {"choice": [["kd"], ["kd", "hidden_mse"]]},
        "objectives.kd.weight": {"uniform": [0.1, 0.9]},
        "training.learning_rate": {"loguniform": [1e-4, 1e-2]},
    }
    two_stage_space = {"objectives.mix": {"choice": [["kd"], ["kd", "hidden_mse"]]},
                       "training.learning_rate": {"loguniform": [1e-5, 1e-2]}}
    fields = {
        "optuna": dict(space=optuna_space, search={"algorithm": "optuna", "num_samples": 5, "seed": 0},
                       scheduler={"type": "asha", "max_t": 3, "grace_period": 1}),
        # max_concurrent_trials 1: each trial sampled after the one before ended, as a sequence
        "qmc": dict(space=qmc_space, search={"algorithm": "qmc", "num_samples": 5, "seed": 0}, max_concurrent_trials=1),
        # two at a time: ASHA judges trials while others still run, and hands stopped trials' workers on
        "two_stage": dict(space=two_stage_space, search={"algorithm": "optuna", "num_samples": 6, "seed": 0},
                          scheduler={"type": "asha", "max_t": 12, "grace_period": 4, "reduction_factor": 2},
                          max_concurrent_trials=2),
    }
    sweeps = {}
    for name, extra in fields.items():
        work = tmp_path_factory.mktemp(name)
        # Names of their own: Ray stages a driver's files under the sweep's name and start second.
        spec = tiny_space(tiny_demo_teacher, work, name=name, **extra)
        if name == "two_stage":
            spec["base"]["stages"] = "auto"
        sweeps[name] = (spec, work)
    done = distillsweep_together([(["sweep", str(write_space(spec, work / "space.yaml"))], work)
                                  for spec, work in sweeps.values()], demo_cache, ray_address)
    return {name: (result, spec, work) for (name, (spec, work)), result in zip(sweeps.items(), done)}


def test_optuna_sweep_samples_objective_weights_and_logs_them(searched_sweeps, demo_cache):
    done, spec, work = searched_sweeps["optuna"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = sweep_runs(spec["tracking"]["uri"], "tests")
    assert len(children) == 5
    weights = [float(c.data.params["objectives.kd.weight"]) for c in children]
    assert len(set(weights)) == 5 and all(0.1 <= w <= 0.9 for w in weights)
    for child in children:
        mix = child.data.params["objectives"]
        assert ("objectives.hidden_mse.weight" in child.data.params) == ("hidden_mse" in mix)

    folder = work / "sweeps" / "optuna"  # Optuna's study is kept, for optuna-dashboard and the report
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert sorted(t.params["objectives.kd.weight"] for t in study.trials) == pytest.approx(sorted(weights))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 2
    report = distillsweep(["report", str(folder)], demo_cache, work)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    importances = (folder / "report" / "optuna-importances.svg").read_text()
    assert "objectives.kd.weight" in importances and 'src="optuna-importances.svg"' in (
        folder / "report" / "report.html").read_text()


def test_quasi_random_search_is_one_table_entry_and_runs_a_real_sweep(searched_sweeps):
    done, spec, _ = searched_sweeps["qmc"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = sweep_runs(spec["tracking"]["uri"], "tests")
    assert len(children) == 5 and all(c.info.status == "FINISHED" for c in children)
    # Optuna's QMCSampler draws the first trial at random to learn the space, then the Sobol points.
    first, *sobol = sorted(children, key=lambda c: c.info.start_time)
    rates = [float(c.data.params["training.learning_rate"]) for c in sobol]
    assert all(1e-4 <= r <= 1e-2 for r in rates)
    # The first 4 points of a scrambled Sobol sequence put one in each quarter of every axis (here the
    # log learning rate): evenly spread, where 4 independent draws leave a quarter empty 9 times in 10.
    quarters = sorted(int((math.log10(r) + 4) / 2 * 4) for r in rates)
    assert quarters == [0, 1, 2, 3], rates


def test_two_stage_trials_are_judged_only_in_their_prediction_stage(searched_sweeps):
    """Optuna and ASHA see stage-1 results without a score; neither may fail on them or act on them."""
    done, spec, work = searched_sweeps["two_stage"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = trial_results(work / "sweeps" / "two_stage")
    assert len(results) == 6, done.stdout[-3000:] + done.stderr[-3000:]
    two_stage = {t: rows for t, rows in results.items() if rows[0]["total_steps"] == 24}  # 12 steps a stage
    assert two_stage, "no trial drew the two-stage mix"
    for rows in two_stage.values():
        stage_one = [r for r in rows if r["stage"] == 0]
        assert [r["step"] for r in stage_one] == [4, 8, 12], "a two-stage trial was stopped in stage 1"
        assert not any("score" in r for r in stage_one)
    for rows in results.values():
        if rows[-1]["step"] < rows[-1]["total_steps"]:
            assert "prediction_step" in rows[-1], "stopped on a result without a score"
    _, children = sweep_runs(spec["tracking"]["uri"], "tests")
    outcomes = {c.data.tags["trial_outcome"] for c in children}
    assert outcomes <= {"completed", "stopped"} and "completed" in outcomes


def test_sweep_against_real_mlflow_server_and_report(tiny_demo_teacher, demo_cache, tmp_path, ray_address):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        uri = f"http://127.0.0.1:{port}"
        spec = tiny_space(
            tiny_demo_teacher, tmp_path,
            space={"objectives.mix": {"grid": [["kd"], ["kd", "att_kl"]]},
                   "student.init": {"grid": ["lower", "upper"]}, "training.seed": {"grid": [1, 2]}},
            tracking={"uri": uri, "experiment": "tests"},
        )
        done = distillsweep(["sweep", str(write_space(spec, tmp_path / "grid.yaml"))], demo_cache, tmp_path,
                            ray_address=ray_address)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        parent, children = sweep_runs(uri, "tests")
        assert len(children) == 8
        for child in children:
            assert metric_steps(uri, child.info.run_id) == [4, 8, 12]
            assert child.data.params["training.seed"] in ("1", "2")

        folder = tmp_path / "sweeps" / "tiny"
        report = distillsweep(["report", str(folder)], demo_cache, tmp_path)
        assert report.returncode == 0, report.stdout + report.stderr
        table = pd.read_csv(folder / "report" / "report.csv")
        client = MlflowClient(uri)
        for _, row in table.iterrows():
            best = [
                max(m.value for m in client.get_metric_history(c.info.run_id, "score"))
                for c in children
                if c.data.tags["objective_mix"] == row["configuration"] and c.data.params["student.init"] == row["init"]
            ]
            assert row["n"] == len(best) == 2
            assert row["mean"] == pytest.approx(sum(best) / 2)
        assert "att_kl+kd" in report.stdout and "lower" in report.stdout
        artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
        assert "report/report.md" in artifacts and "report/report.csv" in artifacts
    finally:
        kill_group(server)


def test_driver_killed_mid_snapshot_resumes_with_each_trial_once_in_mlflow(
    tiny_demo_teacher, demo_cache, tmp_path, ray_address
):
    spec = tiny_space(
        tiny_demo_teacher, tmp_path,
        space={"training.seed": {"grid": [1, 2, 3, 4]}},
        max_concurrent_trials=1,
    )
    spec["base"]["training"].update(max_steps=40, eval_steps=4)
    space_file = write_space(spec, tmp_path / "resume.yaml")
    folder = tmp_path / "sweeps" / "tiny"
    # Tune snapshots its state (and copies result.json into the sweep folder) every second: with its
    # default period, which can outlast these short trials, the sweep could end before the wait saw
    # a running trial in result.json.
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "sweep", str(space_file)], cwd=tmp_path,
        env=cli_env(demo_cache, ray_address) | {"TUNE_GLOBAL_CHECKPOINT_S": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )

    def one_finished_one_running() -> tuple[list[str], list[str]] | None:
        """In Tune's snapshot of result.json (what resume reads): a trial at its end and one short of it."""
        results = trial_results(folder)
        finished = [t for t, rows in results.items() if rows[-1]["step"] == 40]
        running = [t for t, rows in results.items() if rows[-1]["step"] < 40]
        return (finished, running) if finished and running else None

    try:
        finished, _ = wait_for(one_finished_one_running, what="a finished and a running trial in result.json",
                               seen=lambda: {t: rows[-1]["step"] for t, rows in trial_results(folder).items()})
    finally:
        kill_group(driver)
    before = {t: len(rows) for t, rows in trial_results(folder).items()}
    finished_rows = {t: trial_results(folder)[t] for t in finished}
    # The worst moment for the kill: while Tune rewrote its experiment state in place.
    state_file = newest_state_file(folder)
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])

    done = distillsweep(["resume", str(folder)], demo_cache, tmp_path, ray_address=ray_address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from its last complete snapshot" in done.stdout

    after = trial_results(folder)
    assert len(after) == 4 and all(rows[-1]["step"] == 40 for rows in after.values())
    for trial in finished:
        assert after[trial] == finished_rows[trial], "a finished trial was rerun"
    _, children = sweep_runs(spec["tracking"]["uri"], "tests")
    trial_ids = [c.data.tags["ray_trial_id"] for c in children]
    assert sorted(trial_ids) == sorted(after), "each trial exactly once in MLflow"
    for child in children:
        steps = metric_steps(spec["tracking"]["uri"], child.info.run_id)
        assert steps == sorted(set(steps)) and steps[-1] == 40
        assert child.info.status == "FINISHED"
    assert sum(before.values()) > 0
    assert_mlflow_holds_what_tune_holds(spec["tracking"]["uri"], folder)


def test_reused_worker_trains_trials_exactly_as_fresh_workers(tiny_demo_teacher, demo_cache, tmp_path, ray_address):
    """`reuse_actors` (the default) runs trial after trial in one process: nothing may leak between them."""
    scores: dict[bool, dict[int, list[float]]] = {}
    roots = {reuse: tmp_path / ("reused" if reuse else "fresh") for reuse in (True, False)}
    calls = []
    for reuse, root in roots.items():
        root.mkdir()
        # Names of their own: Ray stages a driver's files under the sweep's name and start second.
        spec = tiny_space(tiny_demo_teacher, root, name=root.name, space={"training.seed": {"grid": [1, 2]}},
                          max_concurrent_trials=1, reuse_actors=reuse)
        calls.append((["sweep", str(write_space(spec, root / "space.yaml"))], root))
    for (reuse, root), done in zip(roots.items(), distillsweep_together(calls, demo_cache, ray_address)):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = trial_results(root / "sweeps" / root.name)
        pids = {rows[0]["pid"] for rows in results.values()}
        assert (len(pids) == 1) == reuse, f"reuse_actors={reuse} but trials ran in processes {pids}"
        scores[reuse] = {rows[0]["config"]["training.seed"]: [r["score"] for r in rows] for rows in results.values()}
        checkpoints = list((root / "sweeps" / root.name).glob("*/checkpoint_*"))
        assert len(checkpoints) == 2, "a completed trial keeps its final checkpoint folder, with the student only"
        assert all([p.name for p in c.iterdir()] == ["student"] for c in checkpoints)
    assert scores[True] == scores[False]
    assert len({tuple(s) for s in scores[True].values()}) == 2, "the seeds should give different runs"
