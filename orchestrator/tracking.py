"""MLflow bookkeeping: where the store lives, and what one run records.

The default store is SQLite next to the user's work (MLflow 3 refuses a bare folder store), with
artifacts in an absolute folder, because Ray trials run in their own working directories.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from trainables.config import PretrainConfig, RunConfig

# The driver must not stall for minutes on a tracking server that is down: fail fast, retry later.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def default_tracking_uri(root: Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else `sqlite:///<root>/mlflow.db` (root defaults to the cwd)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or Path.cwd()).resolve() / DEFAULT_DB}"


def artifact_location(tracking_uri: str) -> str | None:
    """Absolute artifact folder beside a SQLite store; None lets a server decide."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    return None


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it with an absolute artifact location if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except Exception:  # another trial created it concurrently
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{'training': {'seed': 1}}` -> `{'training.seed': 1}`; lists of objectives keyed by name."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) and "name" in x for x in tree):
        out = {prefix.rstrip("."): "+".join(x["name"] for x in tree)}
        for item in tree:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}{item['name']}."))
        return out
    return {prefix.rstrip("."): tree}


def run_params(cfg: RunConfig | PretrainConfig) -> dict[str, str]:
    """Every resolved config value as an MLflow param (values capped at MLflow's 6000 chars)."""
    return {k: str(v)[:6000] for k, v in flatten(cfg.model_dump(mode="json")).items()}


def run_tags(cfg: RunConfig | PretrainConfig) -> dict[str, str]:
    """Tags for filtering in the MLflow UI; a fine-tuned student links to the run that distilled it."""
    tags = {
        "objective_mix": cfg.objective_mix,
        "init": cfg.student.init_name,
        "mapping": cfg.mapping if isinstance(cfg.mapping, str) else "layers_" + "_".join(map(str, cfg.mapping)),
        "task": cfg.task_name,
        "git_commit": git_commit(),
    }
    source = getattr(cfg.student.init, "pretrained", "")
    if source.startswith("runs:/"):
        tags["distilled_from_run_id"] = source.removeprefix("runs:/").split("/", 1)[0]
    return tags


def git_commit() -> str:
    """The commit of the code that ran: $DISTILLSWEEP_GIT_COMMIT (images without .git), git, or 'unknown'."""
    if os.environ.get("DISTILLSWEEP_GIT_COMMIT"):
        return os.environ["DISTILLSWEEP_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics must be numbers; strings (stage names) become tags elsewhere."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowJournal:
    """MLflow writes that survive a tracking server being down.

    Every write is an operation record (create a run, log a batch, end a run). Records are sent in
    order; when the server does not answer they wait in memory and are retried on the next write.
    Whatever is still unsent at the end is saved as JSON lines for `distillsweep sync`.
    Run ids are looked up when a record is sent, so trials started while the server was down get
    their runs once it answers.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, pending_file: Path) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.pending_file = pending_file
        self.run_ids: dict[str, str] = {}
        self.logged_step: dict[str, int] = {}
        self.queue: list[dict[str, Any]] = []
        self.warned = False

    def submit(self, record: dict[str, Any]) -> None:
        self.queue.append(record)
        self.flush()

    def flush(self) -> bool:
        """Send queued records in order; False if the server still does not answer."""
        while self.queue:
            try:
                self._send(self.queue[0])
            except Exception as err:  # any transport or server error: keep the record, retry later
                if not self.warned:
                    self.warned = True
                    print(f"[distillsweep] MLflow at {self.tracking_uri} did not answer ({type(err).__name__}); "
                          "training goes on and records are kept until it answers")
                return False
            self.queue.pop(0)
        if self.warned:
            self.warned = False
            print(f"[distillsweep] MLflow at {self.tracking_uri} answers again; kept records sent")
        return True

    def _send(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, key = record["op"], record["key"]
        if kind == "create":
            if key not in self.run_ids:
                found = self.find_run(key, record.get("parent"))
                if found is None:
                    run = self.client.create_run(self.experiment_id, tags=record["tags"], run_name=record.get("name"))
                    found = run.info.run_id
                else:
                    self.logged_step[key] = self.last_logged_step(found)
                self.run_ids[key] = found
            return
        run_id = self.run_ids[key]
        if kind == "params":
            existing = self.client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in record["params"].items() if k not in existing]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start : start + 100])
        elif kind == "metrics":
            if record["step"] <= self.logged_step.get(key, -1):
                return  # replayed after a restore whose saved experiment state lagged behind MLflow
            metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics)
            self.logged_step[key] = record["step"]
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
        elif kind == "text":
            self.client.log_text(run_id, record["text"], record["file"])
        elif kind == "artifacts":
            self.client.log_artifacts(run_id, record["path"], record.get("artifact_path"))
        elif kind == "end":
            self.client.set_terminated(run_id, record["status"])
        else:
            raise ValueError(f"unknown journal record {kind!r}")

    def last_logged_step(self, run_id: str) -> int:
        """The highest step a run has metrics for, -1 if none.

        A driver killed mid-sweep saved Tune's experiment state some results before it died; the
        restored trials replay those results, which MLflow already holds.
        """
        logged = self.client.get_run(run_id).data.metrics
        if not logged:
            return -1
        name = "score" if "score" in logged else next(iter(logged))
        return max((m.step for m in self.client.get_metric_history(run_id, name)), default=-1)

    def find_run(self, key: str, parent: str | None) -> str | None:
        """A run already created for `key` (e.g. before the driver was killed), so none is duplicated."""
        query = f"tags.distillsweep_key = '{key}'"
        if parent:
            query += f" and tags.mlflow.parentRunId = '{parent}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def save_pending(self) -> int:
        """Write unsent records for `distillsweep sync`; returns how many."""
        if not self.queue:
            self.pending_file.unlink(missing_ok=True)
            return 0
        self.pending_file.parent.mkdir(parents=True, exist_ok=True)
        self.pending_file.write_text("".join(json.dumps(r) + "\n" for r in self.queue))
        return len(self.queue)
