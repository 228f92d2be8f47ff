"""`distillsweep run`: one distillation outside Ray, optionally recorded in MLflow."""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from orchestrator.messages import UserError
from orchestrator.tracking import (
    default_tracking_uri,
    ensure_experiment,
    keep_credentials,
    numeric_metrics,
    run_params,
    run_tags,
)
from trainables.config import RunConfig
from trainables.run import distill
from trainables.training import Reporter, StepCallback

RUNS_ROOT = Path("runs")


def claim_output_dir(cfg: RunConfig, resume: Path | None, overwrite: bool) -> RunConfig:
    """`cfg` with a folder no other run writes to.

    A config without `output_dir` gets a new folder of its own (resuming, the one its checkpoint's
    run wrote to). A named folder that holds files is another run's or the user's: the run
    replaces its student, metrics and best weights there, so it is written to only when resumed or
    with --overwrite.
    """
    if "output_dir" not in cfg.model_fields_set:
        return cfg.model_copy(update={"output_dir": run_dir_of(resume) or new_run_dir(cfg.objective_mix)})
    folder = cfg.output_dir.expanduser()
    if resume is None and not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise UserError(
            f"output_dir {folder} is not empty (another run's or your files): pass --resume CHECKPOINT to "
            "continue the run there, --overwrite to write over it, or name another output_dir"
        )
    return cfg


def run_dir_of(checkpoint: Path | None) -> Path | None:
    """The run folder that holds `checkpoint` (`<run>/checkpoints/step-NNNNNNN`), if it is laid out so."""
    if checkpoint is not None and checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def new_run_dir(objective_mix: str) -> Path:
    """`runs/<UTC time>-<objective mix>-<random>`, created here (0700), so two runs never get the same."""
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(tempfile.mkdtemp(prefix=f"{stamp}-{objective_mix}-", dir=RUNS_ROOT))


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

    uri = keep_credentials(tracking_uri or default_tracking_uri())  # no "View run at <URI>" with a password
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
