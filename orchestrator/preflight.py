"""What a sweep checks before Ray starts that needs more than the file: every representative trial
config resolved and checked against its teacher's shape and its task.

Rules that need only the file are `SweepSpec` validators (orchestrator.config).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from orchestrator.config import SweepSpec
from orchestrator.messages import UserError, brief, describe_error
from orchestrator.search import compared_study_keys, factor_of
from orchestrator.spaces import MIX_KEY, Distribution, objective_of
from orchestrator.teachers import teacher_shape, teacher_source
from orchestrator.trials import TrialTemplate
from trainables.config import LocalTask, ObjectiveSpec, RunConfig, check_against_teacher
from trainables.tasks import resolve_task, selection_metric

MAX_CHECKED_COMBINATIONS = 20_000
STAGE_BLIND_TIME_ATTRS = ("training_iteration", "step", "epoch")


def validate(spec: SweepSpec) -> list[RunConfig]:
    """Everything that can be checked without starting Ray or training anything; what the
    scheduler would compare that the report keeps apart is printed as a warning."""
    configs = check(spec)
    print_warnings(scheduler_warnings(spec))
    return configs


def check(spec: SweepSpec) -> list[RunConfig]:
    """Every representative trial config, checked against its teacher and task."""
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


def scheduler_warnings(spec: SweepSpec) -> list[str]:
    """One line where a stopping scheduler would rank trials of different study cells (init, mix,
    task) against each other: judged early, a slow starter loses before it can catch up."""
    keys = compared_study_keys(spec.space, spec.scheduler)
    if not keys:
        return []
    factors = " and ".join(key if factor_of(key) == key else f"{factor_of(key)} ({key})" for key in keys)
    loses = "replaced by a copy of a faster trial" if spec.scheduler.type == "pbt" else "stopped"
    return [f"sweep {spec.name}: scheduler {spec.scheduler.type} ranks trials of different {factors} against each "
            f"other, though the report compares them: judged early, a slow starter is {loses} before it can catch "
            f"up (short-horizon bias); add {', '.join(keys)} to scheduler.group_by to compare trials only within "
            "their cell, or use scheduler.type none"]


def print_warnings(lines: list[str]) -> None:
    for line in lines:
        print(f"[distillsweep] warning: {line}")


def stage_blind_time_attr(spec: SweepSpec, configs: list[RunConfig]) -> str | None:
    """A scheduler counting stage-1 evaluations would judge two-stage trials early."""
    if spec.scheduler.type == "none" or spec.scheduler.time_attr not in STAGE_BLIND_TIME_ATTRS:
        return None
    if not any(getattr(cfg, "two_stage", False) for cfg in configs):
        return None
    return (f"scheduler.time_attr {spec.scheduler.time_attr}: this sweep has two-stage trials, whose stage-1 "
            "evaluations report no score, so this counter would compare them after less training of the "
            "prediction layer than one-stage trials; use prediction_step (the default)")


def mixes(spec: SweepSpec) -> list[list[str]]:
    """Every objective mix a trial can get."""
    value = spec.space.get(MIX_KEY)
    if isinstance(value, Distribution):
        return [list(m) for m in value.representatives()]
    if value is not None:
        return [list(value)]
    return [[o["name"] for o in spec.base.get("objectives", []) if isinstance(o, dict) and "name" in o]]


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
        drawn = ", ".join(f"{k}={brief(v)}" for k, v in assignment.items()) or "the base config"
        configs.append(checked_config(template, assignment, teacher_shape, f"trial with {drawn}"))
    for key, dist in spec.scheduler.hyperparam_mutations.items():
        for value in dist.representatives():  # PBT sets these on running trials
            where = f"scheduler.hyperparam_mutations.{key}={brief(value)}"
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
    if isinstance(task, LocalTask):
        selection_metric(checked_local_task(task), metric_for_best_model)
    elif task.lower() != "demo":  # the demo task would be unpacked just to be named
        selection_metric(resolve_task(task), metric_for_best_model)


@functools.cache
def checked_local_task(task: LocalTask) -> Any:
    """Both files read as a trial will read them: present, readable, text and label columns there,
    labels usable as class ids (or floats for regression). Once per task, however many trials."""
    spec = resolve_task(task)
    from trainables.data import load_raw_splits  # evaluate, sklearn, scipy: only for local tasks

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
