"""Students as MLflow models: what `log_students` logs, and registering the best student per task.

A completed trial's student (weights, config, tokenizer) is logged as an MLflow transformers model
under its run's `student` artifact path: `mlflow.transformers.load_model` gives the pipeline,
`mlflow.pyfunc.load_model` a predictor of labels and scores, and distillsweep itself reads the
weights from it (`runs:/<run id>/student` or `models:/NAME/VERSION` as a teacher or a student's
`init.pretrained`). The conversion loads the student once, on the journal's delivery thread,
never on Tune's loop.
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.messages import UserError
from orchestrator.report import read_trials
from orchestrator.state import SweepState
from orchestrator.tracking import redact

STUDENT_ARTIFACT = "student"
PIPELINE_TASKS = {"distill": "text-classification", "pretrain": "fill-mask"}
PINNED = ("transformers", "torch", "tokenizers", "accelerate")


def requirements() -> list[str]:
    """What loading the model needs, pinned to what wrote it (MLflow's own inference guesses
    packages such as torchvision that a text student does not need)."""
    pinned = []
    for package in PINNED:
        try:
            pinned.append(f"{package}=={importlib.metadata.version(package).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pinned


def save_student_model(student_dir: Path, out_dir: Path, kind: str) -> None:
    """Write the student saved at `student_dir` as an MLflow transformers model in `out_dir`."""
    import mlflow.transformers
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    model_class = AutoModelForMaskedLM if kind == "pretrain" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, path=str(out_dir), task=PIPELINE_TASKS[kind],
        pip_requirements=requirements(),
    )


def register_best_students(sweep_dir: Path, name: str) -> list[tuple[str, str, str]]:
    """Register the best completed trial's student of each task (by best score) in the Model
    Registry as `NAME-TASK`, logging it from the trial's kept checkpoint first where the sweep did not;
    returns (task, run name, model version) per task. Idempotent: a run already registered under
    that name keeps its version."""
    import mlflow
    from mlflow import MlflowClient

    state = SweepState.load(sweep_dir)
    records = read_trials(state.experiment_dir, state.template)
    mlflow.set_tracking_uri(state.tracking_uri)
    client = MlflowClient(state.tracking_uri)
    children = client.search_runs([state.experiment_id], f"tags.mlflow.parentRunId = '{state.parent_run_id}'",
                                  max_results=50_000)
    runs_by_trial = {run.data.tags.get("ray_trial_id"): run for run in children}
    registered = []
    for task in sorted({r.task for r in records}):
        completed = [r for r in records if r.task == task and r.outcome.kind == "completed" and r.best_score is not None]
        if not completed:
            continue
        best = max(completed, key=lambda r: r.best_score)
        run = runs_by_trial.get(best.trial_id)
        if run is None:
            raise UserError(f"the best {task} trial ({best.trial_id}) has no run in MLflow yet: "
                            f"run `distillsweep sync {sweep_dir}` first")
        if run.data.tags.get("student_logged") != "true":
            log_kept_student(client, run.info.run_id, kept_student(state.experiment_dir, best.trial_id), state.template.kind)
        model_name = f"{name}-{task}"
        held = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'") if v.name == model_name]
        version = held[0] if held else mlflow.register_model(f"runs:/{run.info.run_id}/{STUDENT_ARTIFACT}", model_name)
        registered.append((task, run.info.run_name, version.version))
    return registered


def kept_student(experiment_dir: Path, trial_id: str) -> Path:
    """The student a completed trial keeps in its last checkpoint (retention keeps only that)."""
    kept = sorted(experiment_dir.glob(f"*_{trial_id}_*/checkpoint_*/student"))
    if not kept:
        raise UserError(
            f"trial {trial_id} kept no student in {experiment_dir} and its run has none in MLflow: run the "
            "sweep with `log_students: true` to log every completed trial's student"
        )
    return kept[-1]


def log_kept_student(client: Any, run_id: str, student_dir: Path, kind: str) -> None:
    """Log a student that the sweep did not log (`log_students: false`) to its trial's run, so that
    registering the best one does not need every student uploaded."""
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "model"
        save_student_model(student_dir, model, kind)
        client.log_artifacts(run_id, str(model), STUDENT_ARTIFACT)
    client.set_tag(run_id, "student_logged", "true")


def load_line(tracking_uri: str, model_name: str, version: str, example: str) -> str:
    """The one shell line that loads a registered student and predicts, as a user would type it (the
    URI with any password redacted: the user's own environment holds the real one)."""
    code = (f"import mlflow; print(mlflow.pyfunc.load_model({json.dumps(f'models:/{model_name}/{version}')})"
            f".predict([{json.dumps(example)}]))")
    return f"MLFLOW_TRACKING_URI={shlex.quote(redact(tracking_uri))} python -c {shlex.quote(code)}"
