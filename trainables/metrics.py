"""Task metrics that work offline.

`evaluate.load("glue", ...)` fetches its script from the hub, which trials on an offline cluster
cannot reach. `GlueMetric` is the same computation as the hub's GLUE metric (scikit-learn and
scipy on the same arguments), defined here as an `evaluate.Metric` so it keeps that interface.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from trainables.config import MetricName
from trainables.tasks import TaskSpec


def _accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean())


def _f1(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(f1_score(y_true=labels, y_pred=preds))


def _matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(matthews_corrcoef(labels, preds))


def _pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(pearsonr(preds, labels)[0])


def _spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(spearmanr(preds, labels)[0])


# One function per name a config may give (config.MetricName), and no other.
METRICS: dict[MetricName, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": _spearman,
}
REGRESSION_METRICS = {"pearson", "spearmanr"}


class GlueMetric(evaluate.Metric):
    """The GLUE metric for a metric set named by `config_name`, e.g. `f1+accuracy` or `pearson+spearmanr`."""

    def _names(self) -> list[str]:
        names = self.config_name.split("+")
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"GlueMetric config_name {self.config_name!r}: {unknown} unknown; known: {', '.join(METRICS)}")
        return names

    def _info(self) -> evaluate.MetricInfo:
        dtype = "float32" if REGRESSION_METRICS & set(self._names()) else "int64"
        return evaluate.MetricInfo(
            description="GLUE metrics (accuracy, binary F1, Matthews correlation, Pearson, Spearman), offline.",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description="predictions: predicted class ids or scores; references: gold labels.",
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions: list, references: list) -> dict[str, float]:
        preds, labels = np.asarray(predictions), np.asarray(references)
        return {name: METRICS[name](preds, labels) for name in self._names()}


def compute_task_metrics(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics from model logits: argmax for classification, the single score for regression."""
    logits = np.asarray(logits)
    preds = logits.reshape(-1) if spec.is_regression else logits.argmax(axis=-1)
    metric = GlueMetric(config_name="+".join(spec.metrics), keep_in_memory=True)
    return metric.compute(predictions=preds, references=np.asarray(labels))
