"""`SweepSpec`: a search-space file, typed and validated before anything starts.

A file says *what* to explore: a base run config, a space of dotted RunConfig paths with fixed
values or distributions, how to search and schedule, what each trial may use, and where results
and MLflow records go. Nothing in it is Python.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from trainables.config import MIX_KEY, StrictModel, TrainingConfig, read_yaml, set_dotted

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")


class Distribution(StrictModel):
    """One searched value. Exactly one field is set; `grid` values are all tried."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    quniform: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> Distribution:
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} is empty: list at least one value")
        if kind in ("uniform", "loguniform", "randint", "quniform") and not value[0] < value[1]:
            raise ValueError(f"{kind} [{value[0]}, {value[1]}]: the lower bound must be below the upper")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform [{value[0]}, {value[1]}]: bounds must be positive")
        if kind == "quniform" and value[2] <= 0:
            raise ValueError(f"quniform step {value[2]} must be positive")
        return self

    @property
    def kind(self) -> str:
        set_fields = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}")
        return set_fields[0]

    @model_serializer
    def _as_written(self) -> dict[str, Any]:
        """Dump as the file wrote it (`{grid: [...]}`), so a saved spec loads back unchanged."""
        return {self.kind: getattr(self, self.kind)}

    def representatives(self) -> list[Any]:
        """Values that stand for the whole distribution when checking configs before a sweep."""
        value = getattr(self, self.kind)
        if self.kind in ("grid", "choice"):
            return list(value)
        return [value[0], value[1]]


def is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


class SearchConfig(StrictModel):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(default=1, ge=1, description="repeats of the grid, or samples to draw")
    metric: str | list[str] = "score"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    seed: int | None = None

    @model_validator(mode="after")
    def _objectives_agree(self) -> SearchConfig:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        modes = self.mode if isinstance(self.mode, list) else [self.mode]
        if not metrics:
            raise ValueError("search.metric is empty: name the metric to optimise, e.g. score")
        if len(metrics) != len(modes):
            raise ValueError(f"search.metric lists {len(metrics)} metrics but search.mode {len(modes)} modes")
        if len(metrics) > 1 and self.algorithm != "optuna":
            raise ValueError("several search.metric values (multi-objective) need search.algorithm optuna")
        return self

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list) and len(self.metric) > 1


class SchedulerConfig(StrictModel):
    type: Literal["none", "asha", "median", "pbt"] = "none"
    time_attr: str = Field(
        default="prediction_step",
        description="the counter max_t, grace_period and perturbation_interval are in: prediction_step is the "
        "optimiser steps of the stage that trains the prediction layer (all steps of a one-stage trial)",
    )
    max_t: int = Field(default=100, ge=1)
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)
    perturbation_interval: int = Field(default=2, ge=1)
    hyperparam_mutations: dict[str, Distribution] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _coherent(self) -> SchedulerConfig:
        if self.type == "asha" and self.grace_period > self.max_t:
            raise ValueError(f"scheduler.grace_period {self.grace_period} exceeds scheduler.max_t {self.max_t}")
        if self.type == "pbt" and not self.hyperparam_mutations:
            raise ValueError("scheduler pbt needs hyperparam_mutations (e.g. training.learning_rate)")
        return self


class Resources(StrictModel):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, gpu: float) -> float:
        if gpu > 1 and not float(gpu).is_integer():
            raise ValueError(
                f"{gpu}: a fractional GPU share must be at most 1 (several trials share a GPU); "
                "ask for whole GPUs above 1"
            )
        return gpu


class TrackingConfig(StrictModel):
    uri: str | None = Field(default=None, description="None: $MLFLOW_TRACKING_URI or SQLite in the storage folder")
    experiment: str = "distillsweep"


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


class SweepSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
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
    scheduler: SchedulerConfig = SchedulerConfig()
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

    def storage_root(self) -> str:
        """Absolute local folder, or the URI unchanged."""
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())


def check_mixes(value: Any) -> None:
    """Every objective mix must be a list of names: a bare `kd` would be read as the mix [k, d]."""
    for mix in value.representatives() if isinstance(value, Distribution) else [value]:
        if not isinstance(mix, list) or not all(isinstance(name, str) for name in mix):
            raise ValueError(f"space.{MIX_KEY}: each mix is a list of objective names like [kd, att_kl], got {mix!r}")


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
