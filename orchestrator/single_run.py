"""`distillsweep run`: one distillation outside Ray, optionally recorded in MLflow."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.tracking import (
    default_tracking_uri,
    ensure_experiment,
    numeric_metrics,
    run_params,
    run_tags,
)
from trainables.config import RunConfig
from trainables.run import distill
from trainables.training import Reporter, StepCallback


def run_single(
    cfg: RunConfig,
    reporter: Reporter | None,
    on_step: StepCallback | None,
    log_to_mlflow: bool,
    tracking_uri: str | None,
    experiment: str,
    resume: Path | None,
) -> dict[str, float]:
    if not log_to_mlflow:
        return distill(cfg, reporter, resume, on_step)

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    run = client.create_run(experiment_id, tags={**run_tags(cfg), "mlflow.runName": cfg.output_dir.name})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in run_params(cfg).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "run_config.yaml"
        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(run_id, str(resolved))

    def log(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        step, now = int(metrics["step"]), int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()])
        client.set_tag(run_id, "stage", str(metrics.get("stage_name", "")))
        if reporter is not None:
            reporter(metrics, checkpoint)

    try:
        metrics = distill(cfg, log, resume, on_step)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.log_artifacts(run_id, str(cfg.output_dir.expanduser().resolve() / "student"), "student")
    client.set_terminated(run_id, "FINISHED")
    return metrics
