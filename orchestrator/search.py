"""The searcher and the scheduler a sweep asks for, both comparing `score` only where it exists.

Two-stage trials report stage-1 evaluations without `score` (the classifier is untrained then).
Tune's schedulers skip a result that lacks their metric or time attribute; Optuna's searcher and
Tune's per-result metric check would fail on it instead, so the searcher skips such results and
the check is left to `orchestrator.metric_names`, which refuses unknown names before Ray starts.
The time axis is `prediction_step`, the steps of the stage that trains the prediction layer, so
a one-stage and a two-stage trial are compared after the same training of what `score` measures.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from orchestrator.config import SweepSpec
from orchestrator.spaces import OptunaSpace, tune_domain

# Tune's own check, which would refuse stage-1 results for lacking `score`.
STRICT_METRIC_CHECK = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


class PredictionStageOptunaSearch(OptunaSearch):
    """Optuna's Tune searcher, fed intermediate values only from prediction-stage evaluations."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, list) or self.metric not in result:
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._ot_trials[trial_id].report(result[self.metric], int(result["prediction_step"]))


def build_search(spec: SweepSpec) -> Any:
    if spec.search.algorithm != "optuna":
        return None
    import optuna

    if spec.search.multi_objective:
        sampler = optuna.samplers.NSGAIISampler(seed=spec.search.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.search.seed)
    return PredictionStageOptunaSearch(
        space=OptunaSpace(spec), metric=spec.search.metric, mode=spec.search.mode, sampler=sampler
    )


def build_scheduler(spec: SweepSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, PopulationBasedTraining

    s = spec.scheduler
    if s.type == "asha":
        return ASHAScheduler(
            time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
        )
    if s.type == "median":
        return MedianStoppingRule(time_attr=s.time_attr, grace_period=s.grace_period)
    if s.type == "pbt":
        return PopulationBasedTraining(
            time_attr=s.time_attr,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={k: tune_domain(v) for k, v in s.hyperparam_mutations.items()},
            require_attrs=False,  # stage-1 results carry no score: wait for the prediction stage
        )
    return None
