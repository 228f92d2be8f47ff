"""Early stopping in the cost estimate: the share of trials a scheduler is expected to stop, and where.

The estimate is a range from the expected stops to none. ASHA's rungs are Ray's
(grace_period x reduction_factor^k below max_t, where every trial ends); a trial is judged at its
first evaluation at or after a rung, within its group (`scheduler.group_by`), against the trials
that reached the rung before it: the i-th to arrive stops when below the (1 - 1/rf) quantile of
the i - 1 before, which for exchangeable scores happens with probability ((1 - 1/rf)(i - 2) + 1) / i
(never for the first). Median stopping: half the trials of groups of at least 4 (Ray compares a
trial with 3 others or more) stop at their first evaluation after grace_period. PBT stops nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.config import SweepSpec
from orchestrator.cost_flops import TrialPlan, Work
from orchestrator.spaces import Distribution

MEDIAN_MIN_GROUP = 4  # Ray's MedianStoppingRule compares with at least 3 other trials


def asha_stops(arrivals: float, reduction_factor: float) -> float:
    """Expected trials stopped at a rung that `arrivals` trials of one group reach one after
    another (linear between whole numbers of trials)."""
    q = 1 - 1 / reduction_factor
    whole = math.floor(arrivals)
    stopped = sum((q * (i - 2) + 1) / i for i in range(2, whole + 1))
    return stopped + (arrivals - whole) * ((q * (whole - 1) + 1) / (whole + 1) if whole >= 1 else 0.0)


def asha_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[float]:
    """Ray's rungs (one bracket) that come before max_t, where every trial ends anyway."""
    rungs = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [m for k in range(rungs) if (m := grace_period * reduction_factor**k) < max_t]


@dataclass(frozen=True)
class Stopping:
    """A scheduler's expected stops: at each milestone of its counter, the share of the trials
    reaching it that stop there."""

    kind: str
    time_attr: str
    milestones: tuple[float, ...]
    stop_rates: tuple[float, ...]
    group_size: float
    max_t: float | None = None

    def end(self, plan: TrialPlan) -> int:
        """The prediction stage's last step: its end, or the first evaluation past max_t."""
        step = plan.step_at(self.time_attr, self.max_t) if self.max_t is not None else None
        return plan.prediction.steps if step is None else plan.first_evaluation_from(step)

    def expected(self, plan: TrialPlan) -> Work:
        end, reach, work = self.end(plan), 1.0, Work()
        for milestone, rate in zip(self.milestones, self.stop_rates):
            step = plan.step_at(self.time_attr, milestone)
            if step is None:
                continue
            judged = plan.first_evaluation_from(step)
            if judged >= end:
                break
            work += plan.work_until(judged).scaled(reach * rate)
            reach *= 1 - rate
        return work + plan.work_until(end).scaled(reach)

    def describe(self) -> str:
        at = ", ".join(f"{m:g}" for m in self.milestones) or "none before max_t"
        return (f"{self.kind} at {self.time_attr} {at}; {self.group_size:g} trials per group (scheduler.group_by); "
                f"share stopped at each: {', '.join(f'{r:.2f}' for r in self.stop_rates) or '-'}")


def stopping_of(spec: SweepSpec) -> Stopping | None:
    s = spec.scheduler
    if s.type not in ("asha", "median"):
        return None
    group = group_size(spec)
    if s.type == "median":
        rate = 0.5 if group >= MEDIAN_MIN_GROUP else 0.0
        return Stopping("median", s.time_attr, (float(s.grace_period),), (rate,), group)
    milestones, rates, arrivals = asha_milestones(s.grace_period, s.max_t, s.reduction_factor), [], group
    for _ in milestones:
        stopped = asha_stops(arrivals, s.reduction_factor)
        rates.append(stopped / arrivals if arrivals else 0.0)
        arrivals -= stopped
    return Stopping("asha", s.time_attr, tuple(milestones), tuple(rates), group, float(s.max_t))


def group_size(spec: SweepSpec) -> float:
    """Trials per group of trials the scheduler compares: the values of the group_by keys split them."""
    groups = 1.0
    for key in spec.scheduler.group_by or []:
        value = spec.space.get(key)
        if isinstance(value, Distribution):
            if value.kind not in ("grid", "choice"):
                return 1.0  # a drawn number: every trial its own group
            groups *= len(value.representatives())
    return max(1.0, spec.trial_count / groups)

