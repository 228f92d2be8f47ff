"""MLflow bookkeeping: where the store lives, and what one run records.

The default store is SQLite next to the user's work (MLflow 3 refuses a bare folder store), with
artifacts in an absolute folder, because Ray trials run in their own working directories.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from orchestrator.messages import UserError
from trainables.config import PretrainConfig, RunConfig

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the MLflow UI's kind for model-training experiments


def fail_fast_http() -> None:
    """Report a dead tracking server in seconds rather than after MLflow's minutes of retries;
    the journal retries on its own schedule, and users may still set their own values."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def without_server_jobs(env: dict[str, str]) -> dict[str, str]:
    """`env` for an MLflow server or UI, with MLflow's job execution off unless the user set it.

    Those jobs are GenAI evaluations (judges, scorers), which a training sweep's store never has. On,
    a server starts 8 more processes (a job runner, huey consumers): 48 CPU-seconds in its first 90 s
    against 11 off (2-core AMD EPYC), taken from the trials training beside it.
    """
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | env


# scheme://netloc; the userinfo is what precedes the netloc's last "@"
URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/\s?#'\"]+)")
HIDDEN = "***"
# redacted URI -> the URI with its credentials, known to this process only (never written anywhere)
_CREDENTIALED: dict[str, str] = {}


def _hide_userinfo(match: re.Match[str]) -> str:
    userinfo, at, host = match[2].rpartition("@")
    if not at:
        return match[0]
    user, colon, _ = userinfo.partition(":")
    return f"{match[1]}{user + ':' if colon else ''}{HIDDEN}@{host}"


def redact(text: str) -> str:
    """`text` with the password (or a lone token) of every URL's userinfo replaced by ***:
    `postgresql://user:pw@db/mlflow` -> `postgresql://user:***@db/mlflow`. Used for every message,
    artifact, tag and file that names a tracking URI, which readers of those must not learn."""
    return URL.sub(_hide_userinfo, text)


def keep_credentials(uri: str) -> str:
    """Remember `uri` in this process, so its redacted form read back from a state file works; returns it.
    MLflow's "View run at <URI>" lines are turned off where the URI holds credentials."""
    if redact(uri) != uri:
        _CREDENTIALED[redact(uri)] = uri
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def with_credentials(uri: str) -> str:
    """The tracking URI whose redacted form is `uri`: known to this process, or $MLFLOW_TRACKING_URI."""
    if f"{HIDDEN}@" not in uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        keep_credentials(os.environ["MLFLOW_TRACKING_URI"])
    if uri in _CREDENTIALED:
        return _CREDENTIALED[uri]
    raise UserError(
        f"the tracking URI {uri} needs credentials, which distillsweep never stores: set MLFLOW_TRACKING_URI "
        "to the full URI (password included) in this shell and run the command again"
    )


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
    """The experiment's id, creating it with an absolute artifact location if needed, marked as
    model training (an experiment that already says what it is keeps its kind)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except Exception:  # another trial created it concurrently
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def runs_page_url(server: str, experiment_id: str) -> str:
    """The experiment's training-runs page. MLflow 3.17's UI opens experiments on its GenAI overview
    unless the URL names the workflow (the experiment-kind tag serves older 3.x); sorted by best
    score, the table lists every trial's run beside its sweep's parent run instead of folded under it."""
    query = "workflowType=machine_learning&orderByKey=metrics.%60best_score%60&orderByAsc=false"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


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


def run_tags(cfg: RunConfig | PretrainConfig, source_runs: dict[str, str] | None = None) -> dict[str, str]:
    """Tags for filtering in the MLflow UI; a fine-tuned student links to the run that distilled it
    (`source_runs`: registered students' models:/ URIs -> their runs, looked up before launch)."""
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
    elif source in (source_runs or {}):
        tags["distilled_from_run_id"] = source_runs[source]
        tags["distilled_from_model"] = source.removeprefix("models:/")
    return tags


def registered_source_runs(client: Any, sources: set[str]) -> dict[str, str]:
    """The run behind each `models:/NAME/VERSION` in `sources` (other URIs are left out)."""
    runs = {}
    for source in sources:
        parts = source.removeprefix("models:/").split("/")
        if source.startswith("models:/") and len(parts) == 2 and parts[1].isdigit():
            runs[source] = client.get_model_version(parts[0], parts[1]).run_id
    return runs


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
