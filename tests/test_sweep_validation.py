"""`distillsweep sweep --dry-run`: malformed space files are rejected, field named, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_sweep_spec
from orchestrator.preflight import representative_assignments

runner = CliRunner()


def space(teacher: str, **changes) -> dict:
    spec = {
        "name": "check",
        "base": {"task": "demo", "teacher": teacher, "student": {"num_layers": 2}},
        "space": {
            "objectives.mix": {"grid": [["kd"], ["kd", "att_kl"]]},
            "student.init": {"grid": ["lower", "upper"]},
            "training.seed": {"grid": [1, 2]},
        },
        "scheduler": {"type": "asha", "max_t": 4},
    }
    for key, value in changes.items():
        node = spec
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


def dry_run(tmp_path: Path, spec: dict) -> tuple[int, str]:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    return result.exit_code, result.output


def test_valid_file_prints_trial_count_and_space(tmp_path, teacher_dir):
    code, out = dry_run(tmp_path, space(teacher_dir))
    assert code == 0, out
    assert "8 trials" in out and "objectives.mix" in out and "student.init" in out
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"learning_rate": 1e-4}, "learning_rate"),
        ({"scheduler/max_tt": 3}, "scheduler.max_tt"),
        ({"space/objectives.mix": {"grid": [["kd"], ["attention_kl"]]}}, "attention_kl"),
        ({"space/student.init": {"grid": [[2, 3], [3, 4]]}}, "student.init [3, 4]: teacher has 4 layers (0-3)"),
        ({"space/training.seed": {"grid": []}}, "space.training.seed: grid is empty"),
        ({"resources": {"cpu": 1, "gpu": 1.5}}, "resources.gpu"),
        ({"space/training.learning_rate": {"uniform": [1e-3, 1e-5]}}, "lower bound"),
        ({"space/objectives.hidden_mse.weight": {"grid": [1.0]}}, "space.objectives.hidden_mse.weight"),
        ({"space/mapping": [0, 1, 2]}, "mapping"),
        ({"space/training.warmup_ratio": {"grid": [0.1, 2.0]}}, "training.warmup_ratio"),
        ({"search": {"algorithm": "grid", "metric": "eval_acuracy", "mode": "max"}}, "search.metric 'eval_acuracy'"),
        ({"scheduler": {"type": "asha", "time_attr": "steps", "max_t": 4}}, "scheduler.time_attr 'steps'"),
        ({"base/stages": "auto", "scheduler": {"type": "asha", "time_attr": "training_iteration", "max_t": 4}},
         "scheduler.time_attr training_iteration: this sweep has two-stage trials"),
        ({"base/task": "cola", "base/training": {"metric_for_best_model": "accuracy"}},
         "training.metric_for_best_model 'accuracy': task cola reports matthews_correlation"),
    ],
)
def test_malformed_file_is_rejected_naming_the_field_before_ray_starts(tmp_path, teacher_dir, changes, named):
    code, out = dry_run(tmp_path, space(teacher_dir, **changes))
    flat = " ".join(out.split())
    assert code == 2, out
    assert named in flat
    assert "Traceback" not in out
    assert not ray.is_initialized()


def test_distribution_in_grid_search_is_rejected(tmp_path, teacher_dir):
    code, out = dry_run(tmp_path, space(teacher_dir, **{"space/training.learning_rate": {"loguniform": [1e-5, 1e-3]}}))
    assert code == 2 and "random or optuna" in out


def test_multi_objective_search_refuses_early_stopping(tmp_path, teacher_dir):
    spec = space(teacher_dir, search={"algorithm": "optuna", "metric": ["score", "student_parameters"],
                                      "mode": ["max", "min"]})
    spec["space"] = {"objectives.mix": {"choice": [["kd"], ["kd", "att_kl"]]}}
    code, out = dry_run(tmp_path, spec)
    assert code == 2 and "one metric" in out


def test_set_overrides_fields_and_space_entries(tmp_path, teacher_dir):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space(teacher_dir)))
    spec = load_sweep_spec(path, {"base.training.max_steps": 5, "space.training.seed": {"grid": [1, 2, 3]}})
    assert spec.base["training"]["max_steps"] == 5
    assert spec.trial_count == 12


def test_representatives_cover_every_grid_value_and_range_bounds(tmp_path, teacher_dir):
    spec = load_sweep_spec_from(tmp_path, space(teacher_dir, **{
        "search": {"algorithm": "random"},
        "space/training.learning_rate": {"loguniform": [1e-5, 1e-3]},
    }))
    drawn = representative_assignments(spec)
    assert {a["training.learning_rate"] for a in drawn} == {1e-5, 1e-3}
    assert {a["student.init"] for a in drawn} == {"lower", "upper"}


def load_sweep_spec_from(tmp_path: Path, spec: dict):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_sweep_spec(path)


@pytest.mark.parametrize("preset", sorted(Path("search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_validates(preset):
    command = "study" if "finetune" in yaml.safe_load(preset.read_text()) else "sweep"
    result = runner.invoke(app, [command, str(preset), "--dry-run"])
    assert result.exit_code == 0, result.output


def with_teacher_finetune(teacher: str, per_task: dict, **changes) -> dict:
    spec = space(teacher, **changes)
    spec["teacher_finetune"] = {"base_model": teacher, "training": {"learning_rate": 2e-5}, "per_task": per_task}
    return spec


@pytest.mark.parametrize(
    ("per_task", "named"),
    [
        ({"demo": {"training.learnin_rate": 3e-5}},
         "teacher_finetune: per_task.demo.training.learnin_rate: a teacher override is base_model or "
         "training.<field>; did you mean training.learning_rate?"),
        ({"demo": {"output_root": "/tmp"}}, "per_task.demo.output_root: a teacher override is base_model"),
        ({"demo": {"training.warmup_ratio": 2.0}}, "per_task.demo.training.warmup_ratio: Input should be less"),
        ({"rte": {"training.learning_rate": 3e-5}},
         "teacher_finetune.per_task.rte: no trial of this sweep has task 'rte' (tasks: ['demo'])"),
    ],
)
def test_teacher_recipe_override_naming_no_field_or_no_task_is_refused(tmp_path, teacher_dir, per_task, named):
    code, out = dry_run(tmp_path, with_teacher_finetune(teacher_dir, per_task))
    assert code == 2, out
    assert named in " ".join(out.split())
    assert not ray.is_initialized()


def test_teacher_recipe_for_a_task_with_a_given_teacher_is_refused(tmp_path, teacher_dir):
    spec = with_teacher_finetune(teacher_dir, {"demo": {"training.learning_rate": 3e-5}})
    spec["teachers"] = {"demo": teacher_dir}
    code, out = dry_run(tmp_path, spec)
    assert code == 2 and "teachers.demo is given" in out


def test_teacher_selection_metric_the_task_does_not_report_is_refused(tmp_path, teacher_dir):
    spec = with_teacher_finetune(teacher_dir, {"cola": {"training.metric_for_best_model": "f1"}},
                                 **{"base/task": "cola"})
    code, out = dry_run(tmp_path, spec)
    assert code == 2 and "metric_for_best_model 'f1': task cola reports matthews_correlation" in " ".join(out.split())


def test_each_task_teacher_gets_its_recipe_and_a_cache_folder_of_its_own(tmp_path, teacher_dir):
    from orchestrator.preflight import validate
    from orchestrator.teachers import teacher_requests
    from trainables.teacher import teacher_dir as cached_teacher_dir

    def requests(per_task: dict) -> dict:
        spec = load_sweep_spec_from(tmp_path, with_teacher_finetune(
            teacher_dir, per_task, **{"space/task": {"grid": ["rte", "mrpc"]}}))
        return teacher_requests(spec, validate(spec))

    shared = requests({})
    recipe = requests({"rte": {"training.learning_rate": 3e-5, "training.per_device_train_batch_size": 16}})
    assert (recipe["rte"].training.learning_rate, recipe["rte"].training.per_device_train_batch_size) == (3e-5, 16)
    assert recipe["mrpc"] == shared["mrpc"] and recipe["mrpc"].training.learning_rate == 2e-5
    assert cached_teacher_dir(recipe["rte"], teacher_dir) != cached_teacher_dir(shared["rte"], teacher_dir)
    assert cached_teacher_dir(recipe["mrpc"], teacher_dir) == cached_teacher_dir(shared["mrpc"], teacher_dir)


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("name: check\nbase:\n\tteacher: t\n")
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert f"{path}:3:1: not valid YAML" in " ".join(result.output.split())
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


def local_task(tmp_path: Path, train: str, validation: str | None = None) -> dict:
    (tmp_path / "train.csv").write_text(train)
    if validation is not None:
        (tmp_path / "validation.csv").write_text(validation)
    return {"name": "tweets", "train_file": str(tmp_path / "train.csv"),
            "validation_file": str(tmp_path / "validation.csv")}


@pytest.mark.parametrize(
    ("train", "validation", "named"),
    [
        ("text,label\na,0\nb,1\n", None, "task.validation_file"),
        ("text,label\na,0\nb,1\n", "text,stars\na,0\n", "column 'label' not found"),
        ("text,label\na,0\nb,1\n", "text,label\na,0\nb,7\n", "holds labels [7]; allowed: ids 0..1"),
        ("sentence,label\na,0\nb,1\n", "sentence,label\na,0\n", "column 'text' not found"),
    ],
)
def test_unusable_local_task_files_are_refused_before_ray_starts(tmp_path, teacher_dir, train, validation, named):
    spec = space(teacher_dir, **{"base/task": local_task(tmp_path, train, validation)})
    code, out = dry_run(tmp_path, spec)
    assert code == 2, out
    assert named in " ".join(out.split()) and "Traceback" not in out
    assert not ray.is_initialized()


def test_student_width_not_divisible_by_its_heads_is_refused(tmp_path, teacher_dir):
    spec = space(teacher_dir, **{"base/student": {"num_layers": 2, "hidden_size": 30, "num_attention_heads": 4,
                                                 "init": "random"}, "space/student.init": None})
    code, out = dry_run(tmp_path, spec)
    assert code == 2 and "student.hidden_size 30 is not a multiple of student.num_attention_heads 4" in " ".join(out.split())
