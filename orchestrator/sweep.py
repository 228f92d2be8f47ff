"""Run, resume and inspect sweeps: the Tuner with its search, scheduler, resources and storage.

A sweep's own state (the spec, the MLflow parent run, the teachers it uses) is saved next to
Tune's experiment folder, so `resume` and `report` need only the sweep's path.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Distribution, SweepSpec
from orchestrator.demo import DEMO_TEACHER, resolve_demo_teacher
from orchestrator.experiment_state import StateKeeper, repair
from orchestrator.retention import CheckpointRetention
from orchestrator.messages import UserError
from orchestrator.metric_names import unknown_metric_message
from orchestrator.outcome import trial_outcome
from orchestrator.search import STRICT_METRIC_CHECK, build_scheduler, build_search
from orchestrator.spaces import check_space, label, tune_param_space
from orchestrator.tracker import SweepTracker, reconcile_with_tune
from orchestrator.tracking import default_tracking_uri, ensure_experiment, fail_fast_http
from trainables.config import RunConfig, TrialTemplate, task_name_of

STATE_FILE = "distillsweep.json"
STAGE_BLIND_TIME_ATTRS = ("training_iteration", "step", "epoch")


@dataclass
class SweepState:
    """What `resume`, `status` and `report` need to know about a sweep."""

    spec: dict[str, Any]
    sweep_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teachers: dict[str, str]
    base: dict[str, Any]

    def save(self) -> None:
        path = Path(self.sweep_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepState:
        path = Path(sweep_dir).expanduser().resolve() / STATE_FILE
        if not path.exists():
            raise UserError(f"{sweep_dir}: not a sweep folder (no {STATE_FILE}); give the folder `sweep` printed")
        return cls(**json.loads(path.read_text()))

    @property
    def sweep_spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec)

    @property
    def template(self) -> TrialTemplate:
        spec = self.sweep_spec
        return TrialTemplate(self.base, spec.per_task, self.teachers, optuna_choices(spec), kind=spec.run)


def sweep_dir(spec: SweepSpec) -> Path:
    """Where the sweep's own state lives: beside Tune's folder, or `state_dir` for URI storage."""
    if spec.state_dir is not None:
        return Path(spec.state_dir).expanduser().resolve() / spec.name
    root = spec.storage_root()
    if "://" in root:
        return Path.cwd() / ".distillsweep" / spec.name
    return Path(root) / spec.name


def tracking_uri_for(spec: SweepSpec) -> str:
    if spec.tracking.uri:
        return spec.tracking.uri
    root = spec.storage_root()
    return default_tracking_uri(None if "://" in root else Path(root))


# --- before Ray -----------------------------------------------------------------------------


def teacher_source(spec: SweepSpec, cfg: RunConfig) -> str:
    """Where a trial's teacher architecture can be read before any teacher is fine-tuned."""
    if cfg.task_name in spec.teachers:
        return spec.teachers[cfg.task_name]
    if spec.teacher_finetune is not None:
        return spec.teacher_finetune.for_task(cfg.task_name).base_model
    if cfg.teacher == DEMO_TEACHER:
        from trainables.demo import demo_teacher_base

        return str(demo_teacher_base())
    return cfg.teacher


# (layers, heads) of the hub teachers the study uses, for checking spaces where the hub is out of reach.
KNOWN_TEACHERS = {  # (layers, heads, width)
    "roberta-base": (12, 12, 768), "FacebookAI/roberta-base": (12, 12, 768),
    "roberta-large": (24, 16, 1024), "FacebookAI/roberta-large": (24, 16, 1024),
    "bert-base-uncased": (12, 12, 768), "google-bert/bert-base-uncased": (12, 12, 768),
    "bert-large-uncased": (24, 16, 1024), "google-bert/bert-large-uncased": (24, 16, 1024),
}


def teacher_shape(source: str) -> tuple[int, int, int]:
    """(layers, heads, width) of a teacher from its config alone, without loading weights."""
    from transformers import AutoConfig

    from trainables.models import resolve_model_source

    try:
        config = AutoConfig.from_pretrained(resolve_model_source(source))
    except OSError as err:
        if source in KNOWN_TEACHERS:
            return KNOWN_TEACHERS[source]
        raise ValueError(f"teacher {source!r}: cannot read its config ({first_line(err)})") from None
    return config.num_hidden_layers, config.num_attention_heads, config.hidden_size


def last_line(err: BaseException) -> str:
    """The exception's own message: Ray wraps trial errors in their remote traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def validate(spec: SweepSpec) -> list[RunConfig]:
    """Everything that can be checked without starting Ray or training anything."""
    problem = unknown_metric_message(spec)
    if problem:
        raise UserError(problem)
    if spec.search.multi_objective and spec.scheduler.type != "none":
        raise UserError(
            f"scheduler.type {spec.scheduler.type}: early stopping needs one metric, but search.metric "
            f"lists {spec.search.metric}; use scheduler.type none for multi-objective search"
        )
    if spec.search.algorithm == "optuna" and any(
        isinstance(v, Distribution) and v.kind == "grid" for v in spec.space.values()
    ):
        raise UserError("search.algorithm optuna samples every entry: write `choice` instead of `grid` in space")
    if spec.search.algorithm == "grid" and any(
        isinstance(v, Distribution) and v.kind != "grid" for v in spec.space.values()
    ):
        raise UserError("search.algorithm grid tries grid entries only: use random or optuna for distributions")
    shapes: dict[str, tuple[int, int, int]] = {}

    def shape(cfg: RunConfig) -> tuple[int, int, int]:
        source = teacher_source(spec, cfg)
        if source.startswith(("models:/", "runs:/")):
            return 10**6, 0, 0  # read at trial start, where the run checks it
        if source not in shapes:
            shapes[source] = teacher_shape(source)
        return shapes[source]

    configs = check_space(spec, shape)
    problem = stage_blind_time_attr(spec, configs)
    if problem:
        raise UserError(problem)
    return configs


def stage_blind_time_attr(spec: SweepSpec, configs: list[RunConfig]) -> str | None:
    """A scheduler counting stage-1 evaluations would judge two-stage trials early."""
    if spec.scheduler.type == "none" or spec.scheduler.time_attr not in STAGE_BLIND_TIME_ATTRS:
        return None
    if not any(getattr(cfg, "two_stage", False) for cfg in configs):
        return None
    return (f"scheduler.time_attr {spec.scheduler.time_attr}: this sweep has two-stage trials, whose stage-1 "
            "evaluations report no score, so this counter would compare them after less training of the "
            "prediction layer than one-stage trials; use prediction_step (the default)")


def teacher_tasks(configs: list[RunConfig]) -> list[Any]:
    tasks: dict[str, Any] = {}
    for cfg in configs:
        tasks.setdefault(cfg.task_name, cfg.task)
    return list(tasks.values())


def prepare_teachers(spec: SweepSpec, configs: list[RunConfig]) -> dict[str, str]:
    """Fine-tune (or reuse) one teacher per task when the spec asks; `teachers` entries win.

    Each fine-tuning is a Ray task with a trial's resources, so on a cluster they run on GPU
    workers in parallel; the output root must be a folder every node can read.
    """
    teachers = dict(spec.teachers)
    if spec.teacher_finetune is None:
        return teachers
    import ray

    requests = teacher_requests(spec, configs)
    remote = ray.remote(finetune_teacher_task).options(
        num_cpus=spec.resources.cpu, num_gpus=math.ceil(spec.resources.gpu), max_retries=spec.max_failures
    )
    futures = {name: remote.remote(request) for name, request in requests.items()}
    for name, future in futures.items():
        path, reused = ray.get(future)
        print(f"[distillsweep] teacher for {name}: {path} ({'reused' if reused else 'fine-tuned'})")
        teachers[name] = str(path)
    return teachers


def teacher_requests(spec: SweepSpec, configs: list[RunConfig]) -> dict[str, Any]:
    """task name -> TeacherRequest with that task's recipe, for each task without a given teacher."""
    from trainables.teacher import TeacherRequest

    if spec.teacher_finetune is None:
        return {}
    requests = {}
    for task in teacher_tasks(configs):
        name = task_name_of(task)
        if name in spec.teachers:
            continue
        recipe = spec.teacher_finetune.for_task(name)
        fields: dict[str, Any] = {"base_model": recipe.base_model, "task": task, "training": recipe.training}
        if recipe.output_root is not None:
            fields["output_root"] = recipe.output_root
        requests[name] = TeacherRequest(**fields)
    return requests


def finetune_teacher_task(request: Any) -> tuple[str, bool]:
    from trainables.teacher import finetune_teacher

    path, reused = finetune_teacher(request)
    return str(path), reused


# --- Ray ------------------------------------------------------------------------------------


# Settings trials need wherever they run: offline hub use, caches, and MLflow / object-store
# credentials (a teacher given as an MLflow model URI is downloaded inside the trial).
FORWARDED_ENV = ("HF_", "DISTILLSWEEP_", "MLFLOW_", "AWS_", "GOOGLE_", "AZURE_")


def init_ray(address: str | None, spec: SweepSpec, tracking_uri: str) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {
        "OMP_NUM_THREADS": str(max(1, int(spec.resources.cpu))),
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": tracking_uri,  # trials read students given as runs:/ URIs from it
    }
    env |= {name: value for name, value in os.environ.items() if name.startswith(FORWARDED_ENV)}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
            os.environ["RAY_AUTH_MODE"] = "token"  # a cluster started here by `ray start` wants the token
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # A private instance: Ray would otherwise join any cluster `ray start` left on this machine
        # (`--address auto` asks for that).
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env})


def optuna_choices(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """label -> value of every categorical entry, for decoding what Optuna suggested."""
    if spec.search.algorithm != "optuna":
        return {}
    return {
        key: {label(v): v for v in getattr(dist, dist.kind)}
        for key, dist in spec.space.items()
        if isinstance(dist, Distribution) and dist.kind in ("grid", "choice")
    }


def trainable_for(state: SweepState) -> Any:
    from ray import tune

    from trainables.tune_trainable import distillation_trial

    spec = state.sweep_spec
    trainable = tune.with_parameters(
        distillation_trial, template=state.template, cpus_per_trial=max(1, int(spec.resources.cpu))
    )
    return tune.with_resources(trainable, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def run_config_for(state: SweepState, tracker: SweepTracker) -> Any:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    spec = state.sweep_spec
    # Tune keeps every checkpoint's metrics in each trial's state, written at every snapshot;
    # CheckpointRetention reads only paths, so the state stays small however many a trial makes.
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")
    return tune.RunConfig(
        name=spec.name,
        storage_path=spec.storage_root(),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # No `num_to_keep`: CheckpointRetention deletes what no resumable state names (see there).
        checkpoint_config=tune.CheckpointConfig(),
        # result.json first: a driver killed between the two leaves a row that `resume` journals from
        # result.json, so MLflow holds each step as Tune first recorded it. The pruner after the
        # tracker, which may copy the student out of the final checkpoint.
        callbacks=[JsonLoggerCallback(), tracker, CheckpointRetention(spec.keep), *state_keeper(spec)],
        verbose=1,
    )


def state_keeper(spec: SweepSpec) -> list[StateKeeper]:
    """A complete copy of Tune's experiment state for `resume`, where storage is a local folder."""
    root = spec.storage_root()
    return [] if "://" in root else [StateKeeper(Path(root) / spec.name)]


def start_sweep(spec: SweepSpec, address: str | None = None) -> SweepState:
    """Validate, prepare teachers, open the MLflow parent run, run every trial."""
    from mlflow import MlflowClient

    configs = validate(spec)
    folder = sweep_dir(spec)
    if (folder / STATE_FILE).exists():
        raise UserError(f"{folder} holds sweep {spec.name!r} already: `distillsweep resume {folder}` continues it")
    uri = tracking_uri_for(spec)
    fail_fast_http()
    client = MlflowClient(uri)
    try:
        experiment_id = ensure_experiment(client, spec.tracking.experiment, uri)
    except Exception as err:
        raise UserError(
            f"MLflow tracking store {uri} does not answer ({first_line(err)}): start the server or set tracking.uri"
        ) from None
    spec = spec.model_copy(update={"base": resolve_demo_teacher(spec.trial_base())})
    init_ray(address, spec, uri)
    teachers = prepare_teachers(spec, configs)
    parent = client.create_run(
        experiment_id,
        run_name=spec.name,
        tags={"distillsweep_sweep": spec.name, "distillsweep_role": "sweep", "sweep_dir": str(folder)},
    )
    client.log_dict(parent.info.run_id, spec.model_dump(mode="json"), "sweep_spec.json")
    client.log_batch(
        parent.info.run_id,
        params=sweep_params(spec, len(configs)),
    )
    state = SweepState(
        spec=spec.model_dump(mode="json"),
        sweep_dir=str(folder),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent.info.run_id,
        teachers=teachers,
        base=spec.base,
    )
    state.save()
    run_tuner(state, address, restore=False)
    return state


def sweep_params(spec: SweepSpec, checked: int) -> list[Any]:
    from mlflow.entities import Param

    values = {
        "search.algorithm": spec.search.algorithm,
        "search.num_samples": spec.search.num_samples,
        "search.metric": spec.search.metric,
        "scheduler.type": spec.scheduler.type,
        "resources.cpu": spec.resources.cpu,
        "resources.gpu": spec.resources.gpu,
        "trials": spec.trial_count,
        "checked_configs": checked,
    }
    return [Param(k, str(v)) for k, v in values.items()]


def resume_sweep(folder: Path, address: str | None = None, retry_errored: bool = False) -> SweepState:
    """Continue an interrupted sweep: finished trials stay, unfinished ones resume from checkpoints."""
    state = SweepState.load(folder)
    run_tuner(state, address, restore=True, retry_errored=retry_errored)
    return state


def run_tuner(state: SweepState, address: str | None, restore: bool, retry_errored: bool = False) -> Any:
    from ray import tune

    spec = state.sweep_spec
    os.environ[STRICT_METRIC_CHECK] = "1"  # metric names were checked before launch (metric_names)
    init_ray(address, spec, state.tracking_uri)
    tracker = SweepTracker(state.tracking_uri, state.experiment_id, state.parent_run_id, spec.name,
                           state.template, Path(state.sweep_dir),
                           students_dir=Path(state.sweep_dir) / "students" if spec.log_students else None)
    experiment_path = str(Path(spec.storage_root()) / spec.name) if "://" not in spec.storage_root() else (
        spec.storage_root().rstrip("/") + "/" + spec.name
    )
    if restore:
        if "://" not in experiment_path and repair(Path(experiment_path)):
            print("[distillsweep] Tune's experiment state was cut short when the driver was killed; "
                  "resuming from its last complete snapshot")
        if not tune.Tuner.can_restore(experiment_path):
            raise UserError(f"{experiment_path}: Tune has no experiment state to resume from yet")
        if "://" not in experiment_path:
            added = reconcile_with_tune(tracker.journal, Path(experiment_path), spec.name)
            if added:
                print(f"[distillsweep] {added} MLflow records that Tune holds but the journal missed were added")
        # Tune uses the tracker it saved with the experiment; both share this process's journal.
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable_for(state), resume_unfinished=True,
            resume_errored=retry_errored, param_space=tune_param_space(spec) if spec.search.algorithm != "optuna" else None,
        )
    else:
        tuner = tune.Tuner(
            trainable_for(state),
            param_space=tune_param_space(spec) if spec.search.algorithm != "optuna" else {},
            tune_config=tune.TuneConfig(
                metric=None if spec.search.multi_objective else spec.search.metric,
                mode=None if spec.search.multi_objective else spec.search.mode,
                search_alg=build_search(spec),
                scheduler=build_scheduler(spec),
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.max_concurrent_trials,
                reuse_actors=spec.reuse_actors,
            ),
            run_config=run_config_for(state, tracker),
        )
    try:
        results = tuner.fit()
        failed = [r for r in results if r.error is not None]
        stopped = sum(trial_outcome("TERMINATED", r.metrics).kind == "stopped" for r in results if r.error is None)
        every_trial_failed = bool(results) and len(failed) == len(results)
        tracker.journal.append(
            {"op": "tags", "key": "sweep", "tags": {"trials": len(results), "failed_trials": len(failed),
                                                     "stopped_trials": stopped}}
        )
        tracker.journal.append({"op": "end", "key": "sweep", "status": "FAILED" if every_trial_failed else "FINISHED"})
    finally:
        tracker.finish()  # an interrupted sweep's records stay journaled for `resume` or `sync`
    finished = len(results) - len(failed)
    print(f"[distillsweep] {finished} of {len(results)} trials finished ({finished - stopped} completed their budget, "
          f"{stopped} stopped early by the scheduler), {len(failed)} failed")
    for result in failed:
        print(f"  failed: {Path(result.path).name}: {last_line(result.error)[:300]}")
    if every_trial_failed:
        raise UserError(f"every trial failed; the first error: {last_line(failed[0].error)}")
    return results
