"""`distillsweep run` and `distillsweep teacher` through the real CLI, in-process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from sweep_helpers import cli_env, sqlite_store

runner = CliRunner()


def write_config(path: Path, teacher: str, cache: Path, **fields) -> Path:
    raw = {
        "task": "demo",
        "teacher": teacher,
        "student": {"num_layers": 2, "init": "lower"},
        "objectives": [{"name": "kd", "weight": 0.5}, {"name": "hidden_mse"}],
        "output_dir": str(path.parent / "run"),
        "cache_dir": str(cache),
        "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 32, "max_seq_length": 48,
                     "max_steps": 8, "eval_steps": 4},
        **fields,
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_logs_params_metric_history_and_student_to_mlflow(tiny_demo_teacher, demo_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_demo_teacher, demo_cache)
    uri = sqlite_store(tmp_path)
    result = runner.invoke(app, ["run", str(config), "--mlflow", "--tracking-uri", uri, "--experiment", "cli"])
    assert result.exit_code == 0, result.output
    assert "final metrics" in result.output and "eval_accuracy" in result.output
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("cli").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["objectives"] == "kd+hidden_mse"
    assert run.data.params["training.max_steps"] == "8"
    assert run.data.tags["objective_mix"] == "hidden_mse+kd" and run.data.tags["init"] == "lower"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_hidden_mse")] == [4, 8]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run_config.yaml", "student"} <= artifacts


def test_set_overrides_reach_the_run(tiny_demo_teacher, demo_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_demo_teacher, demo_cache)
    result = runner.invoke(app, ["run", str(config), "--set", "training.max_steps=4"])
    assert result.exit_code == 0, result.output
    assert "step      4" in result.output and "step      8" not in result.output


def test_two_stage_run_shows_stage_one_losses_then_scores(tiny_demo_teacher, demo_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_demo_teacher, demo_cache, stages="two_stage")
    result = runner.invoke(app, ["run", str(config), "--set", "training.max_steps=4"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("step")]
    assert "step      4  stage 1 eval loss" in lines[0] and "step      8  score" in lines[1]


def test_unknown_objective_is_a_message_not_a_traceback(teacher_dir, demo_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", teacher_dir, demo_cache, objectives=[{"name": "attn_kl"}])
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert "objectives.0.name" in result.output and "attn_kl" in result.output
    assert "Traceback" not in result.output


def test_init_layers_beyond_teacher_are_rejected_before_training(teacher_dir, demo_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", teacher_dir, demo_cache, student={"num_layers": 2, "init": [3, 4]})
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert "student.init [3, 4]: teacher has 4 layers (0-3)" in " ".join(result.output.split())
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_command_reuses_a_teacher_trained_before(tiny_demo_teacher, demo_cache):
    args = [
        "teacher", "--base-model", str(demo_cache / "tiny-base"), "--task", "demo",
        "--output-root", str(demo_cache / "teachers"),
        "--set", "cache_dir=" + str(demo_cache), "--set", "training.learning_rate=1e-3",
        "--set", "training.num_train_epochs=4", "--set", "training.per_device_train_batch_size=32",
        "--set", "training.max_seq_length=48", "--set", "training.eval_steps=50", "--set", "training.warmup_ratio=0.1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher reused" in result.output and tiny_demo_teacher in result.output


def test_teacher_from_mlflow_model_uri_loads(tiny_demo_teacher, tmp_path, monkeypatch):
    from trainables.models import load_teacher

    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("teachers", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, tiny_demo_teacher, "teacher")
    model = load_teacher(f"runs:/{run.info.run_id}/teacher", num_labels=2)
    assert model.config.num_hidden_layers == 4


def test_cli_output_holds_no_library_progress_bars(tiny_demo_teacher, demo_cache, tmp_path):
    """The CLI turns off Hugging Face's bars through the environment, before any command imports them."""
    config = write_config(tmp_path / "run.yaml", tiny_demo_teacher, demo_cache)
    env = {k: v for k, v in cli_env(demo_cache).items()
           if k not in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final metrics" in done.stdout + done.stderr
    assert "Loading weights" not in done.stderr and "it/s]" not in done.stderr, done.stderr[-3000:]
