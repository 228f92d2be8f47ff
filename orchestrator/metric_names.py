"""The metric names trials report, so a misspelt `search.metric` or `scheduler.time_attr` is refused
before Ray starts rather than failing every trial (or silently never stopping one) after."""

from __future__ import annotations

from typing import get_args

from orchestrator.search import SchedulerConfig, SearchConfig
from trainables.config import MetricName
from trainables.objectives import REGISTRY
from trainables.reported import LOOP_METRICS, MEASURED_METRICS
from trainables.system_metrics import SYSTEM_PREFIX

# What Tune adds to every result.
TUNE_METRICS = {"training_iteration", "time_total_s", "time_this_iter_s", "timesteps_total"}
TIME_ATTRS = {"prediction_step", "training_iteration", "time_total_s", "step", "epoch"}
TASK_METRICS = get_args(MetricName)


def is_measurement(name: str) -> bool:
    return name in MEASURED_METRICS or name.startswith(SYSTEM_PREFIX)


def reported_metrics() -> set[str]:
    terms = set(REGISTRY)
    return (LOOP_METRICS | TUNE_METRICS | {f"eval_{m}" for m in TASK_METRICS}
            | {f"train_{t}" for t in terms} | {f"eval_{t}" for t in terms})


def unknown_metric_message(search: SearchConfig, scheduler: SchedulerConfig) -> str | None:
    """Why the settings name a metric no trial reports, or None when every name is known."""
    known = reported_metrics()
    metrics = search.metric if isinstance(search.metric, list) else [search.metric]
    for name in metrics:
        if name not in known:
            return (f"search.metric {name!r} is not a metric trials report; use score (the task's main "
                    f"metric), eval_<metric> ({', '.join(sorted('eval_' + m for m in TASK_METRICS))}), eval_loss, "
                    "train_loss or train_<objective>")
    if scheduler.type != "none" and scheduler.time_attr not in TIME_ATTRS:
        return (f"scheduler.time_attr {scheduler.time_attr!r} is not a counter trials report; "
                f"use one of {', '.join(sorted(TIME_ATTRS))}")
    return None
