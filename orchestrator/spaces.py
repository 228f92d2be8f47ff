"""From a `SweepSpec`'s space to what Tune and Optuna sample, and the whole-space check.

Objective parameters are conditional: `objectives.kd.weight` is drawn only for trials whose
`objectives.mix` contains `kd`. Tune's variant generator gets that through `sample_from`;
Optuna gets a define-by-run function, so its TPE model never sees parameters that did not apply.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from orchestrator.config import Distribution, SweepSpec
from orchestrator.messages import UserError, describe_error
from trainables.config import MIX_KEY, LocalTask, ObjectiveSpec, RunConfig, TrialTemplate, check_against_teacher

MAX_CHECKED_COMBINATIONS = 20_000


def objective_of(key: str) -> str | None:
    """`objectives.kd.weight` -> `kd`; other keys -> None."""
    parts = key.split(".")
    return parts[1] if parts[0] == "objectives" and len(parts) == 3 else None


def mixes(spec: SweepSpec) -> list[list[str]]:
    """Every objective mix a trial can get."""
    value = spec.space.get(MIX_KEY)
    if isinstance(value, Distribution):
        return [list(m) for m in value.representatives()]
    if value is not None:
        return [list(value)]
    return [[o["name"] for o in spec.base.get("objectives", []) if isinstance(o, dict) and "name" in o]]


# --- checking -------------------------------------------------------------------------------


def representative_assignments(spec: SweepSpec) -> list[dict[str, Any]]:
    """Assignments covering every grid/choice value and both bounds of every range.

    The full product when it is small; otherwise each key's values are varied one at a time.
    """
    keys = list(spec.space)
    options = [
        spec.space[k].representatives() if isinstance(spec.space[k], Distribution) else [spec.space[k]]
        for k in keys
    ]
    total = 1
    for values in options:
        total *= len(values)
    if total <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip(keys, combo)) for combo in itertools.product(*options)]
    first = {k: values[0] for k, values in zip(keys, options)}
    return [dict(first, **{k: v}) for k, values in zip(keys, options) for v in values]


def check_space(spec: SweepSpec, teacher_shape: Callable[[RunConfig], tuple[int, int, int]]) -> list[RunConfig]:
    """Validate every representative trial config; raise one error naming the space entries."""
    check_base_objectives(spec.base)
    for key in spec.space:
        name = objective_of(key)
        if name is not None and not any(name in mix for mix in mixes(spec)):
            raise UserError(f"space.{key}: objective {name!r} is in no objective mix of this sweep")
    configs = []
    template = TrialTemplate(spec.base, spec.per_task, kind=spec.run)
    assignments = representative_assignments(spec)
    for assignment in assignments:
        drawn = ", ".join(f"{k}={v!r}" for k, v in assignment.items()) or "the base config"
        configs.append(checked_config(template, assignment, teacher_shape, f"trial with {drawn}"))
    for key, dist in spec.scheduler.hyperparam_mutations.items():
        for value in dist.representatives():  # PBT sets these on running trials
            where = f"scheduler.hyperparam_mutations.{key}={value!r}"
            checked_config(template, {**assignments[0], key: value}, teacher_shape, where)
    tasks = {c.task_name for c in configs}
    for task in spec.per_task:
        if task not in tasks:
            raise UserError(f"per_task.{task}: no trial of this sweep has task {task!r} (tasks: {sorted(tasks)})")
    if spec.teacher_finetune is not None:
        check_teacher_recipes(spec, tasks)
    return configs


def check_teacher_recipes(spec: SweepSpec, tasks: set[str]) -> None:
    """Each `teacher_finetune.per_task` entry names a task whose teacher is fine-tuned, and each
    teacher's selection metric is one its task reports."""
    for task in spec.teacher_finetune.per_task:
        if task not in tasks:
            raise UserError(
                f"teacher_finetune.per_task.{task}: no trial of this sweep has task {task!r} (tasks: {sorted(tasks)})"
            )
        if task in spec.teachers:
            raise UserError(f"teacher_finetune.per_task.{task}: teachers.{task} is given, so no teacher is fine-tuned for it")
    for task in sorted(tasks - set(spec.teachers)):
        try:
            check_task(task, spec.teacher_finetune.for_task(task).training.metric_for_best_model)
        except ValueError as err:
            raise UserError(f"teacher_finetune for task {task}: {err}") from None


def checked_config(
    template: TrialTemplate,
    assignment: dict[str, Any],
    teacher_shape: Callable[[RunConfig], tuple[int, int, int]],
    where: str,
) -> RunConfig:
    """One trial's config, checked against its teacher and task; errors say which draw made it."""
    try:
        cfg = template.resolve(assignment)
        if cfg.teacher is not None:  # fine-tuning runs have none
            check_against_teacher(cfg, *teacher_shape(cfg))
        if template.kind == "distill":
            check_task(cfg.task, cfg.training.metric_for_best_model)
    except (ValidationError, ValueError, OSError) as err:
        raise UserError(f"{where} is invalid: {describe_error(err)}") from None
    return cfg


def check_task(task: Any, metric_for_best_model: str | None = None) -> None:
    """An unknown task name, a local task whose files cannot be trained on, or a selection metric
    the task does not report fails here rather than in every trial."""
    from trainables.tasks import resolve_task, selection_metric

    if isinstance(task, LocalTask):
        selection_metric(checked_local_task(task), metric_for_best_model)
    elif task.lower() != "demo":  # the demo task would be unpacked just to be named
        selection_metric(resolve_task(task), metric_for_best_model)


@functools.cache
def checked_local_task(task: LocalTask) -> Any:
    """Both files read as a trial will read them: present, readable, text and label columns there,
    labels usable as class ids (or floats for regression). Once per task, however many trials."""
    from trainables.data import load_raw_splits
    from trainables.tasks import resolve_task

    spec = resolve_task(task)
    load_raw_splits(spec)
    return spec


def check_base_objectives(base: dict[str, Any]) -> None:
    """Check the base objectives even where a searched mix replaces them: they lend it their defaults,
    so a typo there would otherwise be ignored."""
    try:
        TypeAdapter(list[ObjectiveSpec]).validate_python(base.get("objectives", []))
    except ValidationError as err:
        item = err.errors()[0]
        where = ".".join(["base.objectives", *(str(part) for part in item["loc"])])
        raise UserError(f"{where}: {item['msg'].removeprefix('Value error, ')}") from None


# --- Tune -----------------------------------------------------------------------------------


def tune_domain(dist: Distribution) -> Any:
    from ray import tune

    kind, value = dist.kind, getattr(dist, dist.kind)
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    if kind == "loguniform":
        return tune.loguniform(*value)
    if kind == "randint":
        return tune.randint(value[0], value[1] + 1)
    return tune.quniform(*value)


def tune_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: distributions as Tune domains, objective parameters conditional."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, value in spec.space.items():
        domain = tune_domain(value) if isinstance(value, Distribution) else value
        name = objective_of(key)
        if name is not None and MIX_KEY in spec.space and isinstance(value, Distribution) and value.kind != "grid":
            space[key] = tune.sample_from(conditional_sampler(name, domain))
        else:
            space[key] = domain
    return space


def conditional_sampler(name: str, domain: Any) -> Callable[[Any], Any]:
    def sample(trial_spec: Any) -> Any:
        return domain.sample() if name in trial_spec.config[MIX_KEY] else None

    return sample


# --- Optuna ---------------------------------------------------------------------------------


class OptunaSpace:
    """A define-by-run space: the mix first, then only the parameters of objectives in it.

    A class rather than a closure because Tune pickles the searcher with the experiment.
    Optuna's categorical choices must be scalars, so list-valued choices (mixes, layer lists)
    are suggested by their label and mapped back.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.entries = sorted(spec.space.items(), key=lambda item: item[0] != MIX_KEY)

    def __call__(self, trial: Any) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        mix: list[str] | None = None
        for key, value in self.entries:
            name = objective_of(key)
            if name is not None and mix is not None and name not in mix:
                continue
            if isinstance(value, Distribution):
                drawn = suggest(trial, key, value)
            else:
                constants[key] = drawn = value
            if key == MIX_KEY:
                mix = list(drawn)
        return constants


def label(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "+".join(label(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={label(v)}" for k, v in value.items())
    return value


def suggest(trial: Any, key: str, dist: Distribution) -> Any:
    kind, value = dist.kind, getattr(dist, dist.kind)
    if kind in ("grid", "choice"):
        labels = [label(v) for v in value]
        picked = trial.suggest_categorical(key, labels)
        return value[labels.index(picked)]
    if kind == "uniform":
        return trial.suggest_float(key, value[0], value[1])
    if kind == "loguniform":
        return trial.suggest_float(key, value[0], value[1], log=True)
    if kind == "randint":
        return trial.suggest_int(key, value[0], value[1])
    return trial.suggest_float(key, value[0], value[1], step=value[2])
