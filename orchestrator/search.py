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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from pydantic import Field, model_validator
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, PopulationBasedTraining
from ray.tune.search.optuna import OptunaSearch

from orchestrator.spaces import DISTRIBUTIONS, Distribution, tune_domain, tune_param_space
from orchestrator.trials import OptunaSpace, TrialTemplate
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

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if RUN_CONFIG not in trial.config:  # a restored trial keeps the one it ran with
            trial.set_config(self.template.with_run_config(trial.config))
        super().on_trial_add(tune_controller, trial)


class FIFO(ResolvesRunConfigs, FIFOScheduler):
    """Every trial runs its whole budget."""


class ASHA(ResolvesRunConfigs, ASHAScheduler):
    """Successive halving: at each rung the worse trials stop."""


class MedianStopping(ResolvesRunConfigs, MedianStoppingRule):
    """A trial below the median of the others at the same time stops."""


class PBT(ResolvesRunConfigs, PopulationBasedTraining):
    """Population-based training: the worse trials continue from the better ones with perturbed values."""


def asha(s: SchedulerConfig, template: TrialTemplate) -> Any:
    return ASHA(template, time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                reduction_factor=s.reduction_factor)


def pbt(s: SchedulerConfig, template: TrialTemplate) -> Any:
    return PBT(
        template,
        time_attr=s.time_attr,
        perturbation_interval=s.perturbation_interval,
        hyperparam_mutations={k: tune_domain(v) for k, v in s.hyperparam_mutations.items()},
        custom_explore_fn=template.with_run_config,  # a perturbed trial is resolved again
        require_attrs=False,  # stage-1 results carry no score: wait for the prediction stage
    )


SCHEDULERS: dict[str, Callable[[SchedulerConfig, TrialTemplate], Any]] = {
    "none": lambda s, template: FIFO(template),
    "asha": asha,
    "median": lambda s, template: MedianStopping(template, time_attr=s.time_attr, grace_period=s.grace_period),
    "pbt": pbt,
}


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

    @model_validator(mode="after")
    def _coherent(self) -> SchedulerConfig:
        if self.type == "asha" and self.grace_period > self.max_t:
            raise ValueError(f"scheduler.grace_period {self.grace_period} exceeds scheduler.max_t {self.max_t}")
        if self.type == "pbt" and not self.hyperparam_mutations:
            raise ValueError("scheduler pbt needs hyperparam_mutations (e.g. training.learning_rate)")
        return self
