"""One distillation run end to end on the demo tweets, with tiny real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainables.config import RunConfig
from trainables.distiller import task_loss
from trainables.launch import run_data_parallel
from trainables.data import load_task_data
from trainables.run import distill
from trainables.tasks import demo_task_spec, resolve_task
from trainables.metrics import METRICS
from trainables.precision import precision_here
from trainables.errors import NonFiniteLossError
from trainables.reported import LOOP_METRICS

TRAINING = {"learning_rate": 1e-3, "per_device_train_batch_size": 32, "max_seq_length": 48}


def run_config(teacher: str, cache: Path, out: Path, **fields) -> RunConfig:
    training = {**TRAINING, **fields.pop("training", {})}
    raw = {
        "task": "demo",
        "teacher": teacher,
        "student": {"num_layers": 2, "init": "lower"},
        "output_dir": str(out),
        "cache_dir": str(cache),
        "training": training,
        **fields,
    }
    return RunConfig.model_validate(raw)


def test_distillation_on_demo_data_lowers_distillation_loss_and_beats_chance(tiny_demo_teacher, demo_cache, tmp_path):
    cfg = run_config(
        tiny_demo_teacher, demo_cache, tmp_path / "run",
        objectives=[{"name": "kd", "weight": 0.5}, {"name": "att_kl", "weight": 1.0}],
        training={"num_train_epochs": 2, "eval_steps": 15},
    )
    reports: list[dict] = []
    final = distill(cfg, lambda metrics, checkpoint: reports.append(metrics))
    assert reports[-1]["train_kd"] < reports[0]["train_kd"]
    assert reports[-1]["train_att_kl"] < reports[0]["train_att_kl"]
    assert final["eval_accuracy"] > 0.65  # balanced binary task: chance is 0.5
    assert (tmp_path / "run" / "student" / "config.json").exists()
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert reports[-1]["student_parameters"] == sum(p.numel() for p in student.parameters())
    per_name = {f"{side}_{name}" for side in ("train", "eval") for name in ("kd", "att_kl")} | {f"eval_{m}" for m in METRICS}
    assert set(reports[-1]) - per_name - {"stage_name"} <= LOOP_METRICS
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["score"] == final["score"]


class Crash(Exception):
    pass


def test_stop_and_resume_from_checkpoint_ends_with_same_metrics(tiny_demo_teacher, demo_cache, tmp_path):
    fields = {
        "objectives": [{"name": "kd", "weight": 0.5}, {"name": "hidden_mse"}, {"name": "crd", "nce_k": 16}],
        "training": {"max_steps": 24, "eval_steps": 8},
    }
    uninterrupted = distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "a", **fields))

    interrupted = run_config(tiny_demo_teacher, demo_cache, tmp_path / "b", **fields)
    saved: list[Path] = []

    def crash_after_second_evaluation(metrics: dict, checkpoint: Path | None) -> None:
        saved.append(checkpoint)
        if metrics["step"] == 16:
            raise Crash

    with pytest.raises(Crash):
        distill(interrupted, crash_after_second_evaluation)
    steps_after_resume: list[int] = []
    resumed = distill(interrupted, lambda m, c: steps_after_resume.append(m["step"]), resume_from=saved[-1])

    assert steps_after_resume == [24]
    assert resumed["step"] == uninterrupted["step"] == 24
    for key in ("score", "eval_loss", "train_loss", "train_kd", "train_hidden_mse", "train_crd"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-6), key


def test_two_stage_trains_intermediate_layers_then_prediction_layer(tiny_demo_teacher, demo_cache, tmp_path):
    cfg = run_config(
        tiny_demo_teacher, demo_cache, tmp_path / "run",
        objectives=[{"name": "att_mse"}, {"name": "kd", "weight": 0.5}],
        stages="two_stage",
        training={"max_steps": 10, "eval_steps": 10},
    )
    reports: list[dict] = []
    distill(cfg, lambda metrics, checkpoint: reports.append(metrics))
    first, second = reports
    assert first["stage_name"] == "intermediate" and "train_att_mse" in first
    assert "train_ce" not in first and "train_kd" not in first
    assert second["stage_name"] == "prediction" and "train_kd" in second and "train_ce" in second
    assert "train_att_mse" not in second
    assert second["step"] == 20


def test_stage_one_evaluations_report_losses_but_no_score(tiny_demo_teacher, demo_cache, tmp_path):
    """The classifier is untrained in stage 1: its accuracy would put a floor under best_score."""
    cfg = run_config(
        tiny_demo_teacher, demo_cache, tmp_path / "run",
        objectives=[{"name": "hidden_mse"}, {"name": "kd", "weight": 0.5}],
        stages="two_stage",
        training={"max_steps": 8, "eval_steps": 4, "learning_rate": 1e-6},
    )
    reports: list[dict] = []
    distill(cfg, lambda metrics, checkpoint: reports.append(metrics))
    stage_one = [r for r in reports if r["stage_name"] == "intermediate"]
    prediction = [r for r in reports if r["stage_name"] == "prediction"]
    assert [r["step"] for r in stage_one] == [4, 8] and [r["step"] for r in prediction] == [12, 16]
    for report in stage_one:
        assert not {"score", "best_score", "eval_accuracy", "prediction_step"} & set(report), report
        assert report["eval_hidden_mse"] > 0 and "eval_intermediate_loss" in report
    assert [r["prediction_step"] for r in prediction] == [4, 8]
    assert all(r["total_steps"] == 16 for r in reports)
    assert prediction[0]["best_score"] == prediction[0]["score"]
    assert prediction[1]["best_score"] == max(r["score"] for r in prediction)


def test_diverging_learning_rate_fails_with_non_finite_loss(tiny_demo_teacher, demo_cache, tmp_path):
    cfg = run_config(
        tiny_demo_teacher, demo_cache, tmp_path / "run",
        objectives=[{"name": "hidden_mse", "weight": 1.0}],
        training={"learning_rate": 1e12, "max_grad_norm": 0.0, "warmup_ratio": 0.0, "max_steps": 20, "eval_steps": 5},
    )
    with pytest.raises(NonFiniteLossError, match="non-finite.*learning_rate 1e\\+12"):
        distill(cfg)


def test_teacher_request_is_reused_the_second_time(tiny_demo_teacher, demo_cache):
    from trainables.config import TrainingConfig
    from trainables.teacher import TeacherRequest, finetune_teacher

    request = TeacherRequest(
        base_model=str(demo_cache / "tiny-base"), task="demo", output_root=demo_cache / "teachers",
        cache_dir=demo_cache,
        training=TrainingConfig(learning_rate=1e-3, num_train_epochs=4, per_device_train_batch_size=32,
                                max_seq_length=48, eval_steps=50, warmup_ratio=0.1),
    )
    path, reused = finetune_teacher(request)
    assert reused and str(path) == tiny_demo_teacher


def test_untrained_teacher_head_is_refused(tiny_bert, tmp_path):
    from trainables.models import load_teacher

    tiny_bert.bert.save_pretrained(tmp_path / "headless")  # the encoder alone, as a base model is published
    with pytest.raises(ValueError, match="no trained classification head"):
        load_teacher(str(tmp_path / "headless"), num_labels=2)


def test_bf16_autocast_on_cpu_trains_as_well_as_fp32(tiny_demo_teacher, demo_cache, tmp_path):
    # One epoch (38 steps): bf16 without AMX is emulated, 4x slower than fp32 on an AVX2 CPU.
    fields = {"objectives": [{"name": "kd", "weight": 0.5}, {"name": "att_kl", "weight": 1.0}]}
    fp32 = distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "fp32",
                              training={"num_train_epochs": 1, "eval_steps": 30, "mixed_precision": "no"}, **fields))
    bf16 = distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "bf16",
                              training={"num_train_epochs": 1, "eval_steps": 30, "bf16": True}, **fields))
    assert bf16["train_loss"] != fp32["train_loss"], "bf16 was asked for but the run computed in fp32"
    assert bf16["eval_accuracy"] > 0.65
    assert abs(bf16["eval_accuracy"] - fp32["eval_accuracy"]) <= 0.05


@pytest.mark.parametrize(
    ("accumulation", "report_steps", "epochs"),
    [
        # 200 examples in batches of 32: 7 micro-batches an epoch, 2 epochs a stage
        (1, [7, 14, 21, 28], [1.0, 2.0, 1.0, 2.0]),
        # 3.5 steps an epoch: epoch 1 ends inside step 4 (its 7th micro-batch), epoch 2 with step 7
        (2, [4, 7, 11, 14], [8 / 7, 2.0, 8 / 7, 2.0]),
    ],
)
def test_eval_strategy_epoch_evaluates_and_saves_at_each_epoch_end_of_both_stages(
    tiny_demo_teacher, demo_cache, tmp_path, accumulation, report_steps, epochs
):
    cfg = run_config(
        tiny_demo_teacher, demo_cache, tmp_path / "run",
        objectives=[{"name": "hidden_mse"}, {"name": "kd", "weight": 0.5}],
        stages="two_stage",
        training={"eval_strategy": "epoch", "num_train_epochs": 2, "max_train_samples": 200,
                  "gradient_accumulation_steps": accumulation, "eval_steps": 3},
    )
    reports: list[tuple[dict, Path | None]] = []
    distill(cfg, lambda metrics, checkpoint: reports.append((metrics, checkpoint)))
    assert [m["step"] for m, _ in reports] == report_steps
    assert [m["stage_name"] for m, _ in reports] == ["intermediate"] * 2 + ["prediction"] * 2
    assert [m["epoch"] for m, _ in reports] == pytest.approx(epochs)
    assert all(checkpoint is not None for _, checkpoint in reports)


def demo_as_local_task() -> dict:
    """The demo tweets as a local binary task, which reports accuracy and f1."""
    spec = demo_task_spec()
    return {"name": "tweets", "train_file": str(spec.train_file), "validation_file": str(spec.validation_file)}


def test_metric_for_best_model_is_the_score_and_the_best_score(tiny_demo_teacher, demo_cache, tmp_path):
    cfg = run_config(tiny_demo_teacher, demo_cache, tmp_path / "run", task=demo_as_local_task(),
                     training={"max_steps": 6, "eval_steps": 2, "metric_for_best_model": "f1"})
    reports: list[dict] = []
    distill(cfg, lambda metrics, checkpoint: reports.append(metrics))
    assert [r["score"] for r in reports] == [r["eval_f1"] for r in reports]
    assert any(r["eval_f1"] != r["eval_accuracy"] for r in reports)
    assert reports[-1]["best_score"] == max(r["eval_f1"] for r in reports)


def test_metric_for_best_model_the_task_does_not_report_is_refused(tiny_demo_teacher, demo_cache, tmp_path):
    cfg = run_config(tiny_demo_teacher, demo_cache, tmp_path / "run", task=demo_as_local_task(),
                     training={"max_steps": 2, "metric_for_best_model": "matthews_correlation"})
    with pytest.raises(ValueError, match="metric_for_best_model 'matthews_correlation': task tweets reports accuracy, f1"):
        distill(cfg)


def saved_student_eval_loss(cfg: RunConfig) -> float:
    """The validation loss of the student a run saved, computed here in one process.

    In the run's precision and eval batches: under bf16 autocast the run's evaluations multiply in
    bf16, and an fp32 evaluation of the very same weights differs from them by that rounding."""
    path = cfg.output_dir / "student"
    student = AutoModelForSequenceClassification.from_pretrained(path).eval()
    data = load_task_data(resolve_task(cfg.task), AutoTokenizer.from_pretrained(path), cfg.training, cfg.cache_dir)
    in_bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision_here(cfg.training) == "bf16")
    total = 0.0
    with torch.no_grad(), in_bf16:
        for batch in DataLoader(data.validation, batch_size=cfg.training.per_device_eval_batch_size,
                                collate_fn=data.collate):
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            total += task_loss(student(**inputs).logits.float(), batch["labels"]).item() * len(batch["labels"])
    return total / len(data.validation)


def test_two_stage_data_parallel_run_trains_the_classifier_in_stage_two_alike_on_every_process(
    tiny_demo_teacher, demo_cache, tmp_path
):
    """Stage 1 (attention only) leaves the classifier out of the loss, stage 2 trains it."""
    cfg = run_config(
        tiny_demo_teacher, demo_cache, tmp_path / "ddp",
        objectives=[{"name": "att_mse"}, {"name": "kd", "weight": 0.5}],
        stages="two_stage",
        training={"max_steps": 4, "eval_steps": 4, "mixed_precision": "no", "num_processes": 2},
    )
    final = run_data_parallel(distill, cfg, num_processes=2)
    stage_one, stage_two = (
        torch.load(path / "state.pt", weights_only=False)["distiller"]["student.classifier.weight"]
        for path in sorted((tmp_path / "ddp" / "checkpoints").iterdir())
    )
    assert final["step"] == 8 and not torch.equal(stage_one, stage_two)
    # Each process evaluates its shard with its own weights: the gathered loss is the saved
    # student's only if the processes trained the same weights.
    assert final["eval_loss"] == pytest.approx(saved_student_eval_loss(cfg), rel=1e-5)



# Both precisions on every CPU: `auto` resolves to bf16 on CPUs with AMX and to fp32 elsewhere.
@pytest.mark.parametrize("precision", [{"mixed_precision": "no"}, {"bf16": True}], ids=["fp32", "bf16"])
def test_load_best_model_at_end_saves_the_student_of_the_best_evaluation_also_after_a_resume(
    tiny_demo_teacher, demo_cache, tmp_path, precision
):
    fields = {"training": {"learning_rate": 1e-2, "max_steps": 16, "eval_steps": 2, "load_best_model_at_end": True,
                           **precision}}
    cfg = run_config(tiny_demo_teacher, demo_cache, tmp_path / "run", **fields)
    reports: list[dict] = []
    saved: list[Path] = []

    def crash_at_step_10(metrics: dict, checkpoint: Path | None) -> None:
        reports.append(metrics)
        saved.append(checkpoint)
        if metrics["step"] == 10:
            raise Crash

    with pytest.raises(Crash):
        distill(cfg, crash_at_step_10)
    distill(cfg, lambda metrics, checkpoint: reports.append(metrics), resume_from=saved[-1])
    assert [r["step"] for r in reports] == list(range(2, 17, 2))
    # At this learning rate the score stalls at its first value (chance): the best is step 2's student,
    # before the crash, so its weights had to travel through the checkpoint the run resumed from.
    best = max(reports, key=lambda r: r["score"])  # the first of equal scores, as the run keeps it
    assert best["step"] < 16 and best["eval_loss"] != reports[-1]["eval_loss"], "the last evaluation is the best"
    assert saved_student_eval_loss(cfg) == pytest.approx(best["eval_loss"], rel=1e-6)
