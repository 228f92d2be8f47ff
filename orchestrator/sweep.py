"""Start and resume a sweep: Ray, the MLflow parent run, and the Tuner with its search, scheduler,
resources and storage."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from orchestrator import tune_reset_retry
from orchestrator.config import GPU_AUTO, SweepSpec
from orchestrator.console import RAY_LOG, SweepProgress, TableLog, log_tune_to
from orchestrator.experiment_state import repair
from orchestrator.gpu_memory import GpuPacking, cluster_nodes, gpu_memory_gib, plan_lines, representative_configs
from orchestrator.inputs import describe_tasks
from orchestrator.journal import STUDENTS_DIR
from orchestrator.messages import UserError, first_line, last_line
from orchestrator.mlflow_callback import SweepTracker, reconcile_with_tune
from orchestrator.outcome import trial_outcome
from orchestrator.preflight import validate
from orchestrator.retention import CheckpointRetention
from orchestrator.search import SCHEDULERS, SEARCHERS, STRICT_METRIC_CHECK
from orchestrator.state import STATE_FILE, SweepState, public_json, sweep_dir, tracking_uri_for
from orchestrator.teachers import prepare_teachers, resolve_demo_teacher
from orchestrator.tracking import (
    ensure_experiment,
    fail_fast_http,
    keep_credentials,
    redact,
    registered_source_runs,
)
from orchestrator.tune_files import ResultRowsKeeper, StateKeeper
from trainables.trial_entry import distillation_trial

# Non-secret settings trials need wherever they run: offline hub use, caches, endpoints, regions.
# Ray keeps a runtime environment in its job table (the dashboard's jobs API) and its session
# logs, so credentials never go there: workers get them as each recipe gives them (instance
# profile, pod env, srun env; a private local Ray inherits the driver's environment).
FORWARDED_ENV = frozenset({
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT",
    "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_OFFLINE",
    "TRANSFORMERS_VERBOSITY", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
})
FORWARDED_PREFIXES = ("DISTILLSWEEP_",)
SECRET_NAME = re.compile("SECRET|TOKEN|PASSWORD|KEY|CREDENTIAL", re.IGNORECASE)
# With `reuse_actors`, Tune gives a worker its next trial only once the last trial's thread has ended,
# and waits TUNE_FUNCTION_THREAD_TIMEOUT_S for it (2 s by default): past that it ends the next trial in
# ERROR, unretried. A stopped trial first frees its models and removes its scratch copies, which took
# longer than 2 s on a loaded 2-core machine (the suite's two-stage sweep lost a trial to it).
HANDOVER_WAIT = ("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")


def forwarded_env(tracking_uri: str) -> dict[str, str]:
    """The driver's settings trials get through Ray: the allowlist, never a name that looks secret,
    and the tracking URI (trials read students given as runs:/ URIs from it) unless it holds credentials."""
    env = {name: value for name, value in os.environ.items()
           if (name in FORWARDED_ENV or name.startswith(FORWARDED_PREFIXES)) and not SECRET_NAME.search(name)}
    if redact(tracking_uri) == tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def keep_cloud_keys_out_of_trials() -> None:
    """Tune copies the driver's AWS keys into every trial actor's runtime env, which Ray's
    runtime-env agent writes into its log; trials get them as the recipes give them instead."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in class_cache.ENV_VARS_TO_PROPAGATE
                                         if not SECRET_NAME.search(name)}


def trial_env(spec: SweepSpec, tracking_uri: str) -> dict[str, str]:
    """The environment every trial worker of the sweep starts with (Ray's runtime env)."""
    name, default = HANDOVER_WAIT
    return {
        "OMP_NUM_THREADS": str(max(1, int(spec.resources.cpu))),
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        name: os.environ.get(name, default),
    } | forwarded_env(tracking_uri)


def init_ray(address: str | None, spec: SweepSpec, tracking_uri: str, verbose: bool = True) -> None:
    import ray

    keep_cloud_keys_out_of_trials()
    if ray.is_initialized():
        return
    env = trial_env(spec, tracking_uri)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
            os.environ["RAY_AUTH_MODE"] = "token"  # a cluster started here by `ray start` wants the token
        if "MLFLOW_TRACKING_URI" not in env:
            print(f"[distillsweep] the tracking URI {redact(tracking_uri)} holds credentials, which are not sent "
                  "to Ray: trials that read models from MLflow need MLFLOW_TRACKING_URI in the workers' own "
                  "environment (the cluster recipes set it)")
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose)
    else:
        if "MLFLOW_TRACKING_URI" not in env:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the private Ray's processes inherit it
        # A private instance: Ray would otherwise join any cluster `ray start` left on this machine
        # (`--address auto` asks for that).
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=verbose)


def start_sweep(spec: SweepSpec, address: str | None = None, verbose: bool = False) -> SweepState:
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
            f"MLflow tracking store {redact(uri)} does not answer ({redact(first_line(err))}): start the server "
            "or set tracking.uri"
        ) from None
    spec = spec.model_copy(update={"base": resolve_demo_teacher(spec.trial_base())})
    init_ray(address, spec, uri, verbose)
    teachers = prepare_teachers(spec, configs)
    parent = client.create_run(
        experiment_id,
        run_name=spec.name,
        tags={"distillsweep_sweep": spec.name, "distillsweep_role": "sweep", "sweep_dir": str(folder)},
    )
    client.log_text(parent.info.run_id, public_json(spec.model_dump(mode="json")), "sweep_spec.json")
    client.log_batch(parent.info.run_id, params=sweep_params(spec, len(configs)))
    state = SweepState(
        spec=spec.model_dump(mode="json"),
        sweep_dir=str(folder),
        uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent.info.run_id,
        teachers=teachers,
        base=spec.base,
        source_runs=registered_source_runs(
            client, {getattr(cfg.student.init, "pretrained", None) or "" for cfg in configs}),
        task_inputs=describe_tasks(configs),
    )
    state.save()
    run_tuner(state, address, restore=False, verbose=verbose)
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


def resume_sweep(folder: Path, address: str | None = None, retry_errored: bool = False,
                 verbose: bool = False, tracking_uri: str | None = None) -> SweepState:
    """Continue an interrupted sweep: finished trials stay, unfinished ones resume from checkpoints.
    `tracking_uri` gives the credentials the state file leaves out (else $MLFLOW_TRACKING_URI)."""
    if tracking_uri:
        keep_credentials(tracking_uri)
    state = SweepState.load(folder)
    if state.started_in:
        raise UserError(f"{state.sweep_dir}: this sweep was started in {state.started_in}, and Tune's saved state "
                        "names that folder; resume it there (status, report and sync work on any copy)")
    run_tuner(state, address, restore=True, retry_errored=retry_errored, verbose=verbose)
    return state


def trainable_for(state: SweepState) -> Any:
    from ray import tune

    spec = state.sweep_spec
    trainable = tune.with_parameters(distillation_trial, kind=spec.run, cpus_per_trial=max(1, int(spec.resources.cpu)))
    return tune.with_resources(trainable, trial_resources(state))


def trial_resources(state: SweepState) -> Any:
    """What each trial asks Ray for: the file's numbers, or with gpu auto each trial's GPU share from
    its memory (orchestrator.gpu_memory), checked on the representative configs and printed first."""
    spec = state.sweep_spec
    if spec.resources.gpu != GPU_AUTO:
        return {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    nodes = cluster_nodes()
    memory = gpu_memory_gib(nodes, spec.resources.gpu_memory_gb)
    packing = GpuPacking(spec, state.template, memory)
    fits = packing.check(representative_configs(spec, state.template))
    for line in plan_lines(fits, nodes, spec.resources.cpu, memory):
        print(f"[distillsweep] {line}")
    return packing


def run_config_for(state: SweepState, tracker: SweepTracker, verbose: bool) -> Any:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    spec = state.sweep_spec
    # Tune keeps every checkpoint's metrics in each trial's state, written at every snapshot;
    # CheckpointRetention reads only paths, so the state stays small however many a trial makes.
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")
    # A complete copy of Tune's experiment state for `resume`, where storage is a local folder.
    keeper = [] if state.storage.is_remote else [StateKeeper(state.experiment_dir)]
    return tune.RunConfig(
        name=spec.name,
        storage_path=state.storage.root,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # No `num_to_keep`: CheckpointRetention deletes what no resumable state names (see there).
        checkpoint_config=tune.CheckpointConfig(),
        # result.json first: a driver killed between the two leaves a row that `resume` journals from
        # result.json, so MLflow holds each step as Tune first recorded it. The pruner after the
        # tracker, which may copy the student out of the final checkpoint.
        callbacks=[JsonLoggerCallback(), ResultRowsKeeper(), tracker, CheckpointRetention(spec.keep), *keeper,
                   SweepProgress(spec.trial_count, state.template)],
        verbose=1,
        progress_reporter=None if verbose else TableLog(str(Path(state.sweep_dir) / RAY_LOG)),
    )


def run_tuner(state: SweepState, address: str | None, restore: bool, retry_errored: bool = False,
              verbose: bool = False) -> Any:
    from ray import tune

    tune_reset_retry.install()
    spec = state.sweep_spec
    searcher = SEARCHERS[spec.search.algorithm]
    os.environ[STRICT_METRIC_CHECK] = "1"  # metric names were checked before launch (metric_names)
    if not verbose:  # Tune's legacy output engine is the one that takes a reporter: TableLog, to ray.log
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        log_tune_to(Path(state.sweep_dir) / RAY_LOG)
    init_ray(address, spec, state.tracking_uri, verbose)
    tracker = SweepTracker(state.tracking_uri, state.experiment_id, state.parent_run_id, spec.name,
                           state.template, Path(state.sweep_dir),
                           students_dir=Path(state.sweep_dir) / STUDENTS_DIR if spec.log_students else None,
                           source_runs=state.source_runs, task_inputs=state.task_inputs)
    experiment_path = state.storage.experiment(spec.name)
    if restore:
        if not state.storage.is_remote and repair(state.experiment_dir):
            print("[distillsweep] Tune's experiment state was cut short when the driver was killed; "
                  "resuming from its last complete snapshot")
        if not tune.Tuner.can_restore(experiment_path):
            raise UserError(f"{experiment_path}: Tune has no experiment state to resume from yet")
        if not state.storage.is_remote:
            added = reconcile_with_tune(tracker.journal, state.experiment_dir, spec.name)
            if added:
                print(f"[distillsweep] {added} MLflow records that Tune holds but the journal missed were added")
        # Tune uses the tracker and scheduler it saved with the experiment; both share this process's journal.
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable_for(state), resume_unfinished=True,
            resume_errored=retry_errored, param_space=searcher.param_space(spec.space),
        )
    else:
        tuner = tune.Tuner(
            trainable_for(state),
            param_space=searcher.param_space(spec.space),
            tune_config=tune.TuneConfig(
                metric=None if spec.search.multi_objective else spec.search.metric,
                mode=None if spec.search.multi_objective else spec.search.mode,
                search_alg=searcher.search_algorithm(spec.search, spec.space, (spec.name, state.optuna_url)),
                scheduler=SCHEDULERS[spec.scheduler.type](spec.scheduler, state.template),
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.max_concurrent_trials,
                reuse_actors=spec.reuse_actors,
            ),
            run_config=run_config_for(state, tracker, verbose),
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
        tracker.finish(spec.tracking.finish_wait_s)  # an interrupted sweep's records stay journaled for `resume` or `sync`
    finished = len(results) - len(failed)
    print(f"[distillsweep] {finished} of {len(results)} trials finished ({finished - stopped} completed their budget, "
          f"{stopped} stopped early by the scheduler), {len(failed)} failed")
    for result in failed:
        print(f"  failed: {Path(result.path).name}: {last_line(result.error)[:300]}")
    if every_trial_failed:
        raise UserError(f"every trial failed; the first error: {last_line(failed[0].error)}")
    return results
