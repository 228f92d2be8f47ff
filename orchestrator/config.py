"""`SweepSpec`: a search-space file, typed and validated before anything starts.

A file says *what* to explore: a base run config, a space of dotted RunConfig paths with fixed
values or distributions, how to search and schedule, what each trial may use, and where results
and MLflow records go. Nothing in it is Python.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from orchestrator.messages import brief
from orchestrator.metric_names import unknown_metric_message
from orchestrator.search import SEARCHERS, SchedulerConfig, SearchConfig, study_keys
from orchestrator.spaces import DISTRIBUTIONS, MIX_KEY, Distribution, check_mixes, distribution_kinds, is_distribution
from trainables.config import FOLDER_NAME, StrictModel, TrainingConfig, read_yaml, set_dotted



GPU_AUTO = "auto"
GPU_COUNT = TypeAdapter(Annotated[float, Field(ge=0, allow_inf_nan=False)])


class Resources(StrictModel):
    """What each trial may use. `gpu: auto` gives each trial the GPU share its memory needs
    (orchestrator.gpu_memory): as many trials share a GPU as fit, at most `max_trials_per_gpu`."""

    cpu: float = Field(default=1.0, gt=0)
    gpu: float | Literal["auto"] = Field(
        default=0.0, description="a share of one GPU (at most 1), whole GPUs, or auto: the share the trial's memory needs"
    )
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="for gpu auto: memory of one GPU in GiB; None: from the GPU type Ray reports"
    )
    max_trials_per_gpu: int = Field(
        default=8, ge=1,
        description="for gpu auto: the most trials that share one GPU, however little each needs (they share its compute too)",
    )

    @field_validator("gpu", mode="before")
    @classmethod
    def _auto_fraction_or_whole(cls, gpu: Any) -> Any:
        """One message naming the field, rather than one per member of `float | auto`."""
        if gpu == GPU_AUTO:
            return gpu
        try:
            gpu = GPU_COUNT.validate_python(gpu)
        except ValidationError as err:
            raise ValueError(f"{first_message(err)} (a number of GPUs, or auto)") from None
        if gpu > 1 and not gpu.is_integer():
            raise ValueError(
                f"{gpu}: a fractional GPU share must be at most 1 (several trials share a GPU); "
                "ask for whole GPUs above 1"
            )
        return gpu

    @model_validator(mode="after")
    def _memory_needs_auto(self) -> Resources:
        if self.gpu_memory_gb is not None and self.gpu != GPU_AUTO:
            raise ValueError(f"gpu_memory_gb sizes GPU shares by memory, which only gpu: auto does; set gpu: auto "
                             f"or leave gpu_memory_gb out (gpu is {self.gpu:g})")
        return self


class TrackingConfig(StrictModel):
    uri: str | None = Field(default=None, description="None: $MLFLOW_TRACKING_URI or SQLite in the storage folder")
    experiment: str = "distillsweep"
    finish_wait_s: float = Field(
        default=30.0, ge=0,
        description="how long a sweep's end waits for a tracking server that does not answer; what it has not "
        "taken stays in the sweep's journal for `distillsweep sync`",
    )


class TeacherFinetune(StrictModel):
    """Fine-tune one teacher per task of the sweep before trials start (cached across sweeps).

    `per_task` holds dotted overrides of `base_model` or `training.<field>` per task, as the
    sweep's own `per_task` does for trials: the study's recipe differs by task (learning rate,
    batch, warmup).
    """

    base_model: str
    training: TrainingConfig = TrainingConfig(learning_rate=2e-5, num_train_epochs=3.0)
    output_root: Path | None = None
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task name -> dotted overrides, e.g. training.learning_rate"
    )

    @model_validator(mode="after")
    def _per_task_valid(self) -> TeacherFinetune:
        for task, overrides in self.per_task.items():
            for key in overrides:
                check_teacher_override(task, key)
            try:
                self.for_task(task)
            except ValidationError as err:
                item = err.errors()[0]
                where = ".".join(str(p) for p in item["loc"])
                raise ValueError(f"per_task.{task}.{where}: {item['msg'].removeprefix('Value error, ')}") from None
        return self

    def for_task(self, task: str) -> TeacherFinetune:
        """The recipe for `task`: the shared one with the task's overrides applied."""
        raw = self.model_dump(exclude={"per_task"})
        for key, value in self.per_task.get(task, {}).items():
            set_dotted(raw, key, value)
        return TeacherFinetune.model_validate(raw)


def check_teacher_override(task: str, key: str) -> None:
    """Only the base model and training fields can differ between a sweep's teachers."""
    head, _, field = key.partition(".")
    if key == "base_model" or (head == "training" and field in TrainingConfig.model_fields):
        return
    guess = difflib.get_close_matches(field or key, [*TrainingConfig.model_fields, "base_model"], n=1)
    hint = f"; did you mean {'base_model' if guess == ['base_model'] else 'training.' + guess[0]}?" if guess else ""
    raise ValueError(f"per_task.{task}.{key}: a teacher override is base_model or training.<field>{hint}")


def check_folder_name(name: str) -> str:
    """A sweep or study name names its folder under storage: no `.`, `..` or path."""
    if not FOLDER_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r}: a name starts with a letter or digit and holds only letters, digits, '_', '.' and '-' "
            "(it names a folder under storage; without `name:` it is the file's name without .yaml): set name"
        )
    return name


class SweepSpec(StrictModel):
    name: str
    run: Literal["distill", "pretrain"] = Field(
        default="distill", description="distill: task-specific (RunConfig base); pretrain: on text (PretrainConfig base)"
    )
    log_students: bool = Field(default=False, description="log each finished trial's student to its MLflow run")
    keep: Literal["best", "final", "none"] = Field(
        default="final",
        description="what a completed trial keeps in storage: the student (weights, config, tokenizer) of its best "
        "prediction-stage evaluation, of its last step, or nothing; stopped and diverged trials keep nothing, "
        "failed ones their last checkpoint, optimiser included, for resume --retry-errored",
    )
    base: dict[str, Any] = Field(description="a run config; the space's values are set on top of it")
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = Field(default=SchedulerConfig(), validate_default=True)  # group_by resolved
    resources: Resources = Resources()
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    storage: str = Field(default="runs/sweeps", description="local folder or URI (s3://, gs://, NFS path)")
    tracking: TrackingConfig = TrackingConfig()
    state_dir: str | None = Field(
        default=None,
        description="folder for the sweep's own state when storage is a URI; put it on a volume that outlives the cluster",
    )
    max_failures: int = Field(default=2, ge=-1, description="retries per trial; -1 retries forever")
    reuse_actors: bool = Field(
        default=True,
        description="run the next trial in the finished trial's worker process instead of starting a new one "
        "(saves ~7 s per trial: bench/packing)",
    )
    teacher_finetune: TeacherFinetune | None = None
    teachers: dict[str, str] = Field(default_factory=dict, description="task name -> teacher, per task")
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task name -> dotted overrides, e.g. the study's per-task learning rates"
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, name: str) -> str:
        return check_folder_name(name)

    @field_validator("space")
    @classmethod
    def _parse_space(cls, space: dict[str, Any]) -> dict[str, Any]:
        parsed: dict[str, Any] = {}
        for key, value in space.items():
            if not all(part.isidentifier() for part in key.split(".")):
                raise ValueError(f"space key {key!r}: expected a dotted RunConfig path like training.learning_rate")
            if is_distribution(value):
                try:
                    parsed[key] = Distribution.model_validate(value)
                except ValueError as err:
                    raise ValueError(f"space.{key}: {first_message(err)}") from None
            elif isinstance(value, dict) and set(value) & set(DISTRIBUTIONS):
                raise ValueError(f"space.{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {sorted(value)}")
            else:
                parsed[key] = value
        if MIX_KEY in parsed:
            check_mixes(parsed[MIX_KEY])
        return parsed

    @field_validator("scheduler")
    @classmethod
    def _groups_of_space_keys(cls, scheduler: SchedulerConfig, info: ValidationInfo) -> SchedulerConfig:
        """Without group_by, the study factors this space varies; with it, keys of this space only."""
        space = info.data.get("space")
        if space is None:  # the space is invalid: its own error says why
            return scheduler
        if scheduler.group_by is None:
            return scheduler.model_copy(update={"group_by": study_keys(space)})
        for key in scheduler.group_by:
            if key not in space:
                raise ValueError(unknown_group_key(key, list(space)))
        return scheduler

    @model_validator(mode="after")
    def _metrics_trials_report(self) -> SweepSpec:
        problem = unknown_metric_message(self.search, self.scheduler)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _one_metric_for_early_stopping(self) -> SweepSpec:
        if self.search.multi_objective and self.scheduler.type != "none":
            raise ValueError(
                f"scheduler.type {self.scheduler.type}: early stopping needs one metric, but search.metric "
                f"lists {self.search.metric}; use scheduler.type none for multi-objective search"
            )
        return self

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepSpec:
        algorithm = self.search.algorithm
        missing = sorted(distribution_kinds(self.space) - SEARCHERS[algorithm].draws)
        if "grid" in missing:
            raise ValueError(f"search.algorithm {algorithm} samples every entry: write `choice` instead of `grid` in space")
        if missing:
            able = [name for name, entry in SEARCHERS.items() if set(missing) <= entry.draws]
            raise ValueError(f"search.algorithm {algorithm} tries {', '.join(sorted(SEARCHERS[algorithm].draws))} "
                             f"entries only: use {' or '.join(able)} for {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _keep_agrees_with_base(self) -> SweepSpec:
        training = self.base.get("training")
        exported = isinstance(training, dict) and training.get("load_best_model_at_end")
        if exported and self.keep != "best":
            raise ValueError(f"keep {self.keep}, but base.training.load_best_model_at_end is true: write keep: best")
        return self

    def trial_base(self) -> dict[str, Any]:
        """`base` as trials run it: `keep: best` makes each run export its best student at its end."""
        if self.keep != "best":
            return self.base
        return {**self.base, "training": {**(self.base.get("training") or {}), "load_best_model_at_end": True}}

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.grid) for d in self.space.values() if isinstance(d, Distribution) and d.grid)

    @property
    def trial_count(self) -> int:
        """Trials Tune will run: every grid point, `num_samples` times."""
        return self.grid_size * self.search.num_samples



def unknown_group_key(key: str, space_keys: list[str]) -> str:
    guess = difflib.get_close_matches(key, space_keys, n=1)
    hint = f"; did you mean {guess[0]}?" if guess else ""
    keys = ", ".join(space_keys) or "none"
    return f"group_by: {brief(key)} is not a key of this sweep's space (its keys: {keys}){hint}"


def first_message(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        return errors()[0]["msg"].removeprefix("Value error, ")
    return str(err)


def load_sweep_spec(path: Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a space file and apply `--set` overrides (dotted keys into the file's structure).

    `--set base.training.max_steps=10` edits the base config; `--set space.training.seed=[1,2]`
    fixes a space entry (keys inside `space` and `teachers` are dotted paths themselves, so
    everything after `space.` is one key).
    """
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, base, space, ...")
    raw.setdefault("name", Path(path).stem)
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if head in ("space", "teachers", "per_task") and rest:
            raw.setdefault(head, {})[rest] = value
        else:
            set_dotted(raw, key, value)
    return SweepSpec.model_validate(raw)
