"""How a sweep searches and schedules: one table entry per `search.algorithm` and per `scheduler.type`.

Adding a search algorithm or a scheduler is one entry here; the settings' checks, the space
rules and the Tuner read the tables.

Two-stage trials report stage-1 evaluations without `score` (the classifier is untrained then).
Tune's schedulers skip a result that lacks their metric or time attribute; Optuna's searcher and
Tune's per-result metric check would fail on it instead, so the searcher skips such results and
the check is left to `orchestrator.metric_names`, which refuses unknown names before Ray starts.
The time axis is `prediction_step`, the steps of the stage that trains the prediction layer, so
a one-stage and a two-stage trial are compared after the same training of what `score` measures.

Every trial reaches Tune's controller through the scheduler's `on_trial_add`, before any worker
sees it: there the driver resolves the trial's RunConfig, once (`ResolvesRunConfigs`).

A stopping scheduler compares a trial only with the trials of its group (`scheduler.group_by`; by
default the study factors the space varies: task, objective mix, initialisation). Ranked against
each other after a few evaluations, those factors would be decided before the data can decide
them: students that copy lower teacher layers trail at first and end higher (short-horizon bias).
`WithinGroups` keeps one Tune scheduler per group: its own rungs, median and PBT population.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from pydantic import Field, model_validator
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search.optuna import OptunaSearch

from orchestrator.spaces import DISTRIBUTIONS, Distribution, tune_domain, tune_param_space
from orchestrator.trials import OptunaSpace, TrialTemplate, label
from trainables.config import StrictModel
from trainables.config import RUN_CONFIG

# Tune's own check, which would refuse stage-1 results for lacking `score`.
STRICT_METRIC_CHECK = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


# --- searchers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Searcher:
    """One `search.algorithm`: which distributions its space may hold, and how it draws them.

    sampler: builds the Optuna sampler that draws the trials; None: Tune's variant generator walks
    the space (every grid point, `num_samples` times).
    """

    draws: frozenset[str]
    sampler: Callable[[SearchConfig], Any] | None = None
    multi_objective: bool = False

    @property
    def suggests_labels(self) -> bool:
        """Optuna suggests categorical values by label (`orchestrator.trials.label`); trials read them back."""
        return self.sampler is not None

    def param_space(self, space: dict[str, Any]) -> dict[str, Any] | None:
        """Tune's param_space: the space itself for the variant generator, none for Optuna's searcher."""
        return tune_param_space(space) if self.sampler is None else None

    def search_algorithm(self, search: SearchConfig, space: dict[str, Any], study: tuple[str, str]) -> Any:
        """`study`: (name, RDB URL) of the Optuna study the trials are told to, kept for
        `optuna-dashboard` and the report; a resumed sweep continues it."""
        if self.sampler is None:
            return None
        name, url = study
        return PredictionStageOptunaSearch(space=OptunaSpace(space), metric=search.metric, mode=search.mode,
                                           sampler=self.sampler(search), study_name=name,
                                           storage=optuna.storages.RDBStorage(url))


def tpe_or_nsga2(search: SearchConfig) -> Any:
    if search.multi_objective:
        return optuna.samplers.NSGAIISampler(seed=search.seed)
    return optuna.samplers.TPESampler(seed=search.seed)


SAMPLED = frozenset(DISTRIBUTIONS) - {"grid"}
SEARCHERS: dict[str, Searcher] = {
    "grid": Searcher(draws=frozenset({"grid"})),
    "random": Searcher(draws=frozenset(DISTRIBUTIONS)),
    "optuna": Searcher(draws=SAMPLED, sampler=tpe_or_nsga2, multi_objective=True),
    # Scrambled Sobol points: the space covered evenly from the first trials on, no model to fit.
    "qmc": Searcher(draws=SAMPLED, sampler=lambda s: optuna.samplers.QMCSampler(scramble=True, seed=s.seed),
                    multi_objective=True),
}


class PredictionStageOptunaSearch(OptunaSearch):
    """Optuna's Tune searcher, fed intermediate values only from prediction-stage evaluations."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, list) or self.metric not in result:
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._ot_trials[trial_id].report(result[self.metric], int(result["prediction_step"]))


# --- schedulers -----------------------------------------------------------------------------


class ResolvesRunConfigs:
    """Resolves each trial's RunConfig as Tune adds the trial, into the config the worker gets."""

    def __init__(self, template: TrialTemplate, **settings: Any) -> None:
        super().__init__(**settings)
        self.template = template

    def resolve(self, trial: Any) -> None:
        if RUN_CONFIG not in trial.config:  # a restored trial keeps the one it ran with
            trial.set_config(self.template.with_run_config(trial.config))

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.resolve(trial)
        super().on_trial_add(tune_controller, trial)


class FIFO(ResolvesRunConfigs, FIFOScheduler):
    """Every trial runs its whole budget."""


# Sweeps started before `group_by` saved these in Tune's tuner.pkl; they resume with them.
class ASHA(ResolvesRunConfigs, ASHAScheduler):
    """Successive halving: at each rung the worse trials stop."""


class MedianStopping(ResolvesRunConfigs, MedianStoppingRule):
    """A trial below the median of the others at the same time stops."""


class PBT(ResolvesRunConfigs, PopulationBasedTraining):
    """Population-based training: the worse trials continue from the better ones with perturbed values."""


class GroupView:
    """Tune's controller as one group's scheduler sees it: only that group's trials, so the group's
    scheduler never ranks, pauses for or resumes another group's trials. Everything else (pausing,
    saving, the searcher) is the controller's own."""

    def __init__(self, controller: Any, members: set[Any]) -> None:
        self._controller = controller
        self._members = members

    def get_trials(self) -> list[Any]:
        return [trial for trial in self._controller.get_trials() if trial in self._members]

    def get_live_trials(self) -> set[Any]:
        return {trial for trial in self._controller.get_live_trials() if trial in self._members}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)


def group_key(config: dict[str, Any], group_by: tuple[str, ...]) -> str:
    """A trial's group as a stable string: drawn values may be lists or mappings (mixes, layer lists)."""
    return json.dumps([config.get(key) for key in group_by], sort_keys=True, default=str)


class WithinGroups(ResolvesRunConfigs, TrialScheduler):
    """One copy of a Tune scheduler per group of trials that agree on every `group_by` key (one group
    when it is empty): every TrialScheduler hook goes to the trial's group, which sees the
    controller through a `GroupView`. PBT's custom_explore_fn resolves a perturbed trial's RunConfig.

    Ray 2.60 never calls a scheduler's save/restore: a resumed Tuner unpickles the scheduler as it
    was built and adds every trial again through `on_trial_add`, which rebuilds the groups.
    """

    def __init__(self, template: TrialTemplate, scheduler: TrialScheduler, group_by: tuple[str, ...]) -> None:
        super().__init__(template)
        self.prototype = scheduler
        self.group_by = group_by
        self.groups: dict[str, TrialScheduler] = {}
        self.group_of: dict[Any, str] = {}

    @property
    def metric(self) -> Any:
        return self.prototype.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.prototype.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        for scheduler in self.groups.values():
            scheduler.set_search_properties(metric, mode, **spec)
        return self.prototype.set_search_properties(metric, mode, **spec)

    def view(self, controller: Any, key: str) -> GroupView:
        return GroupView(controller, {trial for trial, group in self.group_of.items() if group == key})

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.resolve(trial)
        key = self.group_of.setdefault(trial, group_key(trial.config, self.group_by))
        if key not in self.groups:
            self.groups[key] = copy.deepcopy(self.prototype)
        self.groups[key].on_trial_add(self.view(tune_controller, key), trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        key = self.group_of[trial]
        return self.groups[key].on_trial_result(self.view(tune_controller, key), trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        key = self.group_of[trial]
        self.groups[key].on_trial_complete(self.view(tune_controller, key), trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        key = self.group_of[trial]
        self.groups[key].on_trial_error(self.view(tune_controller, key), trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        key = self.group_of[trial]
        self.groups[key].on_trial_remove(self.view(tune_controller, key), trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """Each group's choice; of those, the trial Tune added first."""
        order = {trial: i for i, trial in enumerate(tune_controller.get_trials())}
        chosen = [scheduler.choose_trial_to_run(self.view(tune_controller, key))
                  for key, scheduler in self.groups.items()]
        return min((trial for trial in chosen if trial is not None), key=order.__getitem__, default=None)

    def debug_string(self) -> str:
        if not self.groups:
            return self.prototype.debug_string()
        return "\n".join(self.group_label(key) + scheduler.debug_string() for key, scheduler in self.groups.items())

    def group_label(self, key: str) -> str:
        """`student.init=lower, objectives.mix=kd+att_kl: `; nothing for the one group of `group_by: []`."""
        values = ", ".join(f"{name}={label(value)}" for name, value in zip(self.group_by, json.loads(key)))
        return f"{values}: " if values else ""


def asha(s: SchedulerConfig) -> TrialScheduler:
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def median(s: SchedulerConfig) -> TrialScheduler:
    return MedianStoppingRule(time_attr=s.time_attr, grace_period=s.grace_period)


def pbt(s: SchedulerConfig, template: TrialTemplate) -> TrialScheduler:
    return PopulationBasedTraining(
        time_attr=s.time_attr,
        perturbation_interval=s.perturbation_interval,
        hyperparam_mutations={k: tune_domain(v) for k, v in s.hyperparam_mutations.items()},
        custom_explore_fn=template.with_run_config,  # a perturbed trial is resolved again
        require_attrs=False,  # stage-1 results carry no score: wait for the prediction stage
    )


def within_groups(s: SchedulerConfig, template: TrialTemplate, scheduler: TrialScheduler) -> WithinGroups:
    return WithinGroups(template, scheduler, tuple(s.group_by or ()))


SCHEDULERS: dict[str, Callable[[SchedulerConfig, TrialTemplate], Any]] = {
    "none": lambda s, template: FIFO(template),
    "asha": lambda s, template: within_groups(s, template, asha(s)),
    "median": lambda s, template: within_groups(s, template, median(s)),
    "pbt": lambda s, template: within_groups(s, template, pbt(s, template)),
}
STOPPING = frozenset(SCHEDULERS) - {"none"}  # schedulers that compare trials with each other


# --- study cells: what a stopping scheduler must not compare ---------------------------------

# The factors the report tables (orchestrator.report): trials that differ in one belong to
# different cells of the study, and ranking them against each other early decides the study's
# question at a short horizon.
STUDY_FACTORS = {"task": "task", "objectives.mix": "objective mix", "student.init": "initialisation"}


def factor_of(key: str) -> str | None:
    """The study factor a space key sets (`student` sets the initialisation too), or None."""
    for factor, name in STUDY_FACTORS.items():
        if key == factor or factor.startswith(f"{key}.") or key.startswith(f"{factor}."):
            return name
    return None


def study_keys(space: dict[str, Any]) -> list[str]:
    """The space keys that vary a study factor: `scheduler.group_by`'s default."""
    return [key for key, value in space.items()
            if isinstance(value, Distribution) and len(value.representatives()) > 1 and factor_of(key)]


def compared_study_keys(space: dict[str, Any], scheduler: SchedulerConfig) -> list[str]:
    """Study keys whose values a stopping scheduler would rank against each other (not in group_by)."""
    if scheduler.type not in STOPPING:
        return []
    grouped = study_keys(space) if scheduler.group_by is None else scheduler.group_by
    return [key for key in study_keys(space) if key not in grouped]


# --- settings: the `search` and `scheduler` sections of a space file --------------------------


class SearchConfig(StrictModel):
    algorithm: Literal[tuple(SEARCHERS)] = "grid"
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
        if len(metrics) > 1 and not SEARCHERS[self.algorithm].multi_objective:
            able = " or ".join(name for name, entry in SEARCHERS.items() if entry.multi_objective)
            raise ValueError(f"several search.metric values (multi-objective) need search.algorithm {able}")
        return self

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list) and len(self.metric) > 1


class SchedulerConfig(StrictModel):
    type: Literal[tuple(SCHEDULERS)] = "none"
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
    group_by: list[str] | None = Field(
        default=None,
        description="space keys whose values split the trials into groups; a trial is compared (stopped, "
        "exploited) only within its group. None: the study factors the space varies (task, objectives.mix, "
        "student.init); []: all trials are compared with each other",
    )

    @model_validator(mode="after")
    def _coherent(self) -> SchedulerConfig:
        if self.type == "asha" and self.grace_period > self.max_t:
            raise ValueError(f"scheduler.grace_period {self.grace_period} exceeds scheduler.max_t {self.max_t}")
        if self.type == "pbt" and not self.hyperparam_mutations:
            raise ValueError("scheduler pbt needs hyperparam_mutations (e.g. training.learning_rate)")
        moved = sorted(set(self.group_by or ()) & set(self.hyperparam_mutations))
        if self.type == "pbt" and moved:
            raise ValueError(f"scheduler.hyperparam_mutations changes {', '.join(moved)}, which scheduler.group_by "
                             "groups trials by: PBT would move trials between groups; mutate other keys")
        return self
