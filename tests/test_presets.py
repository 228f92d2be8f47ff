"""The study's presets carry the study's recipe (shared/paper_spec.md 7.1, 7.3), checked on the
configs the dry run resolves, for students and for the teachers fine-tuned before them."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_sweep_spec
from orchestrator.study import load_study_spec
from orchestrator.preflight import validate
from orchestrator.teachers import teacher_requests
from trainables.tasks import resolve_task, selection_metric

PRESETS = Path(__file__).parent.parent / "search_spaces"
# fairseq's RoBERTa GLUE recipe, the study's task_param: peak LR, batch, warmup share of the updates
RECIPE = {
    "mnli": (1e-5, 32, 0.06), "qnli": (1e-5, 32, 0.06), "qqp": (1e-5, 32, 0.25), "rte": (2e-5, 16, 0.06),
    "sst2": (1e-5, 32, 0.06), "mrpc": (1e-5, 16, 0.06), "cola": (1e-5, 16, 0.06),
}
# accuracy (MNLI matched) as the recipe's --best-checkpoint-metric, Matthews correlation for CoLA
METRIC = {task: "matthews_correlation" if task == "cola" else "accuracy" for task in RECIPE}


@pytest.fixture(scope="module")
def task_specific() -> dict:
    """preset name -> (student configs, teacher requests per task)."""
    resolved = {}
    for name in ("paper_task_specific", "init_layers"):
        spec = load_sweep_spec(PRESETS / f"{name}.yaml")
        configs = validate(spec)
        resolved[name] = (configs, teacher_requests(spec, configs))
    return resolved


def recipe_of(training) -> tuple[float, int, float]:
    return training.learning_rate, training.per_device_train_batch_size, training.warmup_ratio


def selected(task: str, training) -> str:
    return selection_metric(resolve_task(task), training.metric_for_best_model)


@pytest.mark.parametrize("preset", ["paper_task_specific", "init_layers"])
def test_task_specific_students_follow_the_recipe_per_task_with_one_evaluation_per_epoch(task_specific, preset):
    configs, _ = task_specific[preset]
    for cfg in configs:
        t = cfg.training
        assert recipe_of(t) == RECIPE[cfg.task], cfg.task
        assert (t.eval_strategy, t.num_train_epochs, t.max_seq_length) == ("epoch", 10, 512)
        assert selected(cfg.task, t) == METRIC[cfg.task]


@pytest.mark.parametrize("preset", ["paper_task_specific", "init_layers"])
def test_each_teacher_is_fine_tuned_with_its_tasks_recipe(task_specific, preset):
    configs, requests = task_specific[preset]
    assert set(requests) == {cfg.task for cfg in configs}
    for task, request in requests.items():
        t = request.training
        assert request.base_model == "roberta-base"
        assert recipe_of(t) == RECIPE[task], task
        assert (t.eval_strategy, t.num_train_epochs, t.max_seq_length) == ("epoch", 10, 512)
        assert (t.weight_decay, t.adam_beta2, t.adam_epsilon, t.max_grad_norm) == (0.1, 0.98, 1e-6, 0.0)
        assert selected(task, t) == METRIC[task]


def test_both_task_specific_studies_share_their_teachers(task_specific):
    _, everything = task_specific["paper_task_specific"]
    _, init_study = task_specific["init_layers"]
    assert {task: everything[task] for task in init_study} == init_study


def test_task_agnostic_fine_tuning_evaluates_as_the_studys_run_glue():
    spec = load_study_spec(PRESETS / "paper_task_agnostic.yaml").stage("finetune")
    for cfg in validate(spec):
        large = cfg.task in ("mnli", "qqp", "qnli")
        t = cfg.training
        assert (t.eval_strategy, t.eval_steps, t.num_train_epochs) == ("steps", 500 if large else 50, 10 if large else 20)
        assert (t.max_seq_length, selected(cfg.task, t)) == (128, METRIC[cfg.task])
        # the grid script passes none of these, so run_glue.py trains with TrainingArguments' defaults
        assert (t.weight_decay, t.warmup_ratio, t.lr_scheduler_type) == (0.0, 0.0, "linear")
        assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.max_grad_norm) == (0.9, 0.999, 1e-8, 1.0)
