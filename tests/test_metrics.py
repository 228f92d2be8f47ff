import math
from typing import get_args

import numpy as np
import pytest

from trainables.config import MetricName
from trainables.metrics import METRICS, GlueMetric, compute_task_metrics
from trainables.tasks import resolve_task

# preds vs labels: TP=2 (rows 0, 3), TN=1 (row 1), FP=1 (row 2), FN=1 (row 4)
PREDS = np.array([1, 0, 1, 1, 0])
LABELS = np.array([1, 0, 0, 1, 1])


def _logits_for(preds: np.ndarray, num_labels: int = 2) -> np.ndarray:
    logits = np.zeros((len(preds), num_labels), dtype=np.float32)
    logits[np.arange(len(preds)), preds] = 3.0
    return logits


def test_mrpc_metrics_are_binary_f1_and_accuracy_of_argmax():
    result = compute_task_metrics(resolve_task("mrpc"), _logits_for(PREDS), LABELS)
    assert set(result) == {"f1", "accuracy"}
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_cola_metric_is_matthews_correlation():
    result = compute_task_metrics(resolve_task("cola"), _logits_for(PREDS), LABELS)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2)
    assert result == {"matthews_correlation": pytest.approx(1 / 6)}


def test_mnli_accuracy_takes_argmax_over_three_classes():
    preds = np.array([0, 1, 2, 2])
    result = compute_task_metrics(resolve_task("mnli"), _logits_for(preds, 3), np.array([0, 1, 1, 2]))
    assert result == {"accuracy": pytest.approx(0.75)}


def test_stsb_squeezes_single_score_and_reports_pearson_and_spearman():
    scores = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    result = compute_task_metrics(resolve_task("stsb"), scores, np.array([1.0, 3.0, 2.0, 8.0]))
    # centred preds [-1.5,-.5,.5,1.5], labels [-2.5,-.5,-1.5,4.5]: cov 10, sums of squares 5 and 29
    assert result["pearson"] == pytest.approx(10 / math.sqrt(5 * 29))
    # label ranks [1,3,2,4]: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6*2/60
    assert result["spearmanr"] == pytest.approx(0.8)


def test_metric_values_are_python_floats():
    result = compute_task_metrics(resolve_task("qqp"), _logits_for(PREDS), LABELS)
    assert all(type(v) is float for v in result.values())


def test_glue_metric_is_an_evaluate_metric_usable_incrementally():
    metric = GlueMetric(config_name="accuracy", keep_in_memory=True)
    metric.add_batch(predictions=[1, 0], references=[1, 1])
    metric.add_batch(predictions=[0, 0], references=[0, 0])
    assert metric.compute() == {"accuracy": pytest.approx(0.75)}


def test_glue_metric_rejects_unknown_metric_names_listing_known_ones():
    with pytest.raises(ValueError, match="'bleu'.*known: accuracy, f1, matthews_correlation, pearson, spearmanr"):
        GlueMetric(config_name="accuracy+bleu", keep_in_memory=True)


def test_every_metric_a_task_may_name_has_an_implementation():
    assert set(METRICS) == set(get_args(MetricName))
