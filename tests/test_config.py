"""Every impossible run config is rejected at validation, with its field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.messages import describe_error
from trainables.config import RunConfig, check_against_teacher, load_run_config

BASE = {"teacher": "some/teacher", "task": "rte"}


def rejected(raw: dict) -> str:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate({**BASE, **raw})
    return describe_error(info.value)


def test_defaults_follow_the_study_three_layer_skip_student() -> None:
    cfg = RunConfig.model_validate(BASE)
    assert cfg.student.num_layers == 3 and cfg.student.init == "skip" and cfg.mapping == "skip"
    assert cfg.objectives[0].name == "kd" and cfg.objectives[0].params == {}


def test_a_run_config_without_task_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate({"teacher": "some/teacher"})
    message = describe_error(info.value)
    assert "task" in message and "required" in message.lower()


def test_unknown_objective_is_named_with_known_ones() -> None:
    message = rejected({"objectives": [{"name": "att_kld"}]})
    assert "objectives.0.name" in message and "att_kld" in message and "att_kl" in message


def test_negative_weight_names_the_weight() -> None:
    message = rejected({"objectives": [{"name": "kd", "weight": -1}]})
    assert "objectives.0.weight" in message


def test_unknown_objective_param_names_the_objective() -> None:
    message = rejected({"objectives": [{"name": "kd", "temprature": 2}]})
    assert "'kd'" in message and "temprature" in message


def test_unknown_top_level_key_is_rejected() -> None:
    assert "learning_rate" in rejected({"learning_rate": 1e-4})


def test_mapping_longer_than_student_is_rejected() -> None:
    message = rejected({"mapping": [1, 3, 5, 7], "student": {"num_layers": 3}})
    assert "mapping" in message and "3 layers" in message


def test_init_list_of_wrong_length_is_rejected() -> None:
    message = rejected({"student": {"num_layers": 3, "init": [0, 1]}})
    assert "student" in message and "init" in message


def test_two_stage_without_intermediate_objective_is_rejected() -> None:
    assert "two_stage" in rejected({"stages": "two_stage", "objectives": [{"name": "kd"}]})


def test_duplicate_objectives_are_rejected() -> None:
    assert "more than once" in rejected({"objectives": [{"name": "kd"}, {"name": "kd"}]})


def test_crd_is_rejected_with_several_data_parallel_processes() -> None:
    objectives = [{"name": "kd"}, {"name": "crd"}]
    message = rejected({"objectives": objectives, "training": {"num_processes": 2}})
    assert "objectives.1.name 'crd'" in message and "training.num_processes is 2" in message
    assert RunConfig.model_validate({**BASE, "objectives": objectives}).training.num_processes == 1


def test_both_precisions_are_rejected() -> None:
    assert "bf16" in rejected({"training": {"bf16": True, "fp16": True}})


def test_init_layers_beyond_teacher_depth_name_field_and_range() -> None:
    cfg = RunConfig.model_validate({**BASE, "student": {"init": [10, 11, 12]}})
    with pytest.raises(ValueError, match=r"student.init \[10, 11, 12\]: teacher has 12 layers \(0-11\)"):
        check_against_teacher(cfg, teacher_layers=12, teacher_heads=12)


def test_mapping_beyond_teacher_depth_is_rejected() -> None:
    cfg = RunConfig.model_validate({**BASE, "mapping": [3, 7, 12]})
    with pytest.raises(ValueError, match="mapping"):
        check_against_teacher(cfg, teacher_layers=12, teacher_heads=12)


def test_student_deeper_than_teacher_cannot_copy_layers() -> None:
    cfg = RunConfig.model_validate({**BASE, "student": {"num_layers": 6, "init": "lower"}})
    with pytest.raises(ValueError, match="student.num_layers"):
        check_against_teacher(cfg, teacher_layers=4, teacher_heads=12)


def test_attention_objective_with_mismatched_heads_is_rejected() -> None:
    cfg = RunConfig.model_validate(
        {**BASE, "student": {"init": "random", "hidden_size": 256, "num_attention_heads": 4},
         "objectives": [{"name": "att_kl"}]}
    )
    with pytest.raises(ValueError, match="att_kl.*4 heads.*12"):
        check_against_teacher(cfg, teacher_layers=12, teacher_heads=12)


def test_narrow_student_cannot_copy_teacher_layers() -> None:
    assert "cannot copy" in rejected({"student": {"hidden_size": 256, "init": "skip"}})


def test_load_run_config_applies_dotted_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\ntask: rte\ntraining:\n  seed: 1\n")
    cfg = load_run_config(path, {"training.learning_rate": 3e-4, "student.init": "lower"})
    assert cfg.training.learning_rate == 3e-4 and cfg.training.seed == 1 and cfg.student.init == "lower"


@pytest.mark.parametrize(
    ("student", "relation_heads", "problem"),
    [
        ({"init": "skip"}, 10, "must divide the teacher's width 768"),
        ({"init": "random", "hidden_size": 200, "num_attention_heads": 4}, None, "12: must divide the student's width 200"),
        ({"init": "random", "hidden_size": 200, "num_attention_heads": 4}, 8, None),  # 8 divides 768 and 200
    ],
)
def test_minilm_v2_relation_heads_must_divide_both_widths(student, relation_heads, problem) -> None:
    objective = {"name": "minilm_v2", **({"relation_heads": relation_heads} if relation_heads else {})}
    cfg = RunConfig.model_validate({**BASE, "student": {"num_layers": 4, **student}, "objectives": [objective]})
    if problem is None:
        check_against_teacher(cfg, teacher_layers=12, teacher_heads=12, teacher_width=768)
    else:
        with pytest.raises(ValueError, match=problem):
            check_against_teacher(cfg, teacher_layers=12, teacher_heads=12, teacher_width=768)


def test_unknown_selection_metric_names_the_field_and_the_metrics() -> None:
    message = rejected({"training": {"metric_for_best_model": "acc"}})
    assert "training.metric_for_best_model" in message and "'matthews_correlation'" in message


def test_pretraining_refuses_a_selection_metric() -> None:
    from trainables.config import PretrainConfig

    with pytest.raises(ValidationError, match="metric_for_best_model: pre-training is scored by its loss"):
        PretrainConfig.model_validate({"corpus": {"files": ["a.txt"]}, "teacher": "t",
                                       "training": {"max_steps": 10, "metric_for_best_model": "accuracy"}})


def test_keep_best_makes_every_trial_export_its_best_student_and_a_contradiction_is_refused():
    from orchestrator.config import SweepSpec

    base = {"task": "rte", "teacher": "roberta-base", "training": {"learning_rate": 1e-4}}
    spec = SweepSpec.model_validate({"name": "s", "base": base, "keep": "best"})
    assert spec.trial_base()["training"] == {"learning_rate": 1e-4, "load_best_model_at_end": True}
    assert SweepSpec.model_validate({"name": "s", "base": base}).trial_base() == base
    contradiction = {**base, "training": {"load_best_model_at_end": True}}
    with pytest.raises(ValueError, match="keep final, but base.training.load_best_model_at_end is true: write keep: best"):
        SweepSpec.model_validate({"name": "s", "base": contradiction})
    with pytest.raises(ValueError, match="keep"):
        SweepSpec.model_validate({"name": "s", "base": base, "keep": "last"})
