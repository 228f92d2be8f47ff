"""A task-agnostic study end to end through the CLI: distil on text, fine-tune, report."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from sweep_helpers import distillsweep, sqlite_store

pytestmark = pytest.mark.slow


def test_study_distils_two_objectives_fine_tunes_each_and_reports_them(
    tiny_demo_teacher, demo_cache, tmp_path, ray_address
):
    from trainables.demo import ensure_demo_data

    train, _ = ensure_demo_data(demo_cache / "demo")
    corpus = tmp_path / "tweets.txt"
    corpus.write_text("\n".join(pd.read_csv(train)["text"].astype(str)) + "\n")
    uri = sqlite_store(tmp_path)
    study = {
        "name": "ta",
        "storage": str(tmp_path / "sweeps"),
        "tracking": {"uri": uri, "experiment": "study"},
        "distill": {
            "base": {
                "corpus": {"files": [str(corpus)], "block_size": 32, "validation_fraction": 0.05},
                "teacher": tiny_demo_teacher,
                "student": {"num_layers": 2, "init": "skip"},
                "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_steps": 6,
                             "eval_steps": 3},
            },
            "space": {"objectives.mix": {"grid": [["hidden_mse"], ["att_kl"]]}},
            "max_concurrent_trials": 1,
        },
        "finetune": {
            "base": {"task": "demo", "training": {"per_device_train_batch_size": 32, "max_seq_length": 48,
                                                  "max_steps": 6, "eval_steps": 3}},
            "space": {"training.learning_rate": {"grid": [1e-3, 3e-4]}},
            "max_concurrent_trials": 1,
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    done = distillsweep(["study", str(path)], demo_cache, tmp_path, ray_address=ray_address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    parents = {r.data.tags.get("distillsweep_sweep"): r for r in runs if r.data.tags.get("distillsweep_role") == "sweep"}
    stage1 = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["ta-distill"].info.run_id]
    stage2 = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["ta-finetune"].info.run_id]
    assert len(stage1) == 2 and len(stage2) == 4
    mixes = {r.info.run_id: r.data.tags["objective_mix"] for r in stage1}
    for run in stage1:
        assert "student" in {a.path for a in client.list_artifacts(run.info.run_id)}
    for run in stage2:  # stage 2 starts from the registered students, linked to the runs that made them
        assert run.data.tags["distilled_from_run_id"] in mixes
        model, version = run.data.tags["distilled_from_model"].split("/")
        assert model == f"ta-{mixes[run.data.tags['distilled_from_run_id']]}"
        assert client.get_model_version(model, version).run_id == run.data.tags["distilled_from_run_id"]

    report = pd.read_csv(tmp_path / "sweeps" / "ta" / "study_report.csv", index_col=0)
    assert sorted(report.index) == ["att_kl", "hidden_mse"]
    for run_id, mix in mixes.items():
        best = max(
            max(m.value for m in client.get_metric_history(r.info.run_id, "score"))
            for r in stage2 if r.data.tags["distilled_from_run_id"] == run_id
        )
        assert report.loc[mix, "demo"] == pytest.approx(best)
    assert "hidden_mse" in done.stdout and "att_kl" in done.stdout
