"""The trial template: a trial's draw (Optuna labels included) becomes one resolved RunConfig, in the driver."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from orchestrator.spaces import Distribution
from orchestrator.trials import OptunaSpace, TrialTemplate, labelled_choices
from trainables.config import RUN_CONFIG

BASE = {"teacher": "some/teacher", "task": "demo", "student": {"num_layers": 2},
        "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}]}


def test_per_task_override_reaches_a_local_csv_task_by_its_name(tmp_path: Path) -> None:
    base = {
        "teacher": "some/teacher",
        "task": {"name": "tweets", "train_file": str(tmp_path / "train.csv"),
                 "validation_file": str(tmp_path / "validation.csv")},
        "training": {"learning_rate": 1e-4},
    }
    template = TrialTemplate(base, per_task={"tweets": {"training.learning_rate": 3e-5}}, teachers={"tweets": "t/dir"})
    cfg = template.resolve({"training.seed": 2})
    assert cfg.training.learning_rate == 3e-5 and cfg.training.seed == 2
    assert cfg.teacher == "t/dir" and cfg.task_name == "tweets"


def test_optuna_labels_for_mixes_decode_to_the_mix_with_its_drawn_parameters() -> None:
    space = {"objectives.mix": Distribution(choice=[["kd"], ["kd", "hidden_mse"]]),
             "objectives.hidden_mse.weight": Distribution(uniform=(0.1, 0.9))}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(8):
        trial = study.ask()
        OptunaSpace(space)(trial)
        drawn.append(trial.params)
    assert {d["objectives.mix"] for d in drawn} == {"kd", "kd+hidden_mse"}, "lists are suggested by label"
    template = TrialTemplate(BASE, choices=labelled_choices(space))
    for params in drawn:
        cfg = template.resolve(params)
        names = [o.name for o in cfg.objectives]
        assert names == params["objectives.mix"].split("+")
        assert ("objectives.hidden_mse.weight" in params) == ("hidden_mse" in names), "drawn only where it applies"


def test_driver_resolved_config_is_what_worker_and_report_read_back() -> None:
    template = TrialTemplate(BASE, teachers={"demo": "t/dir"})
    drawn = {"objectives.mix": ["kd", "hidden_mse"], "training.seed": 3, "objectives.kd.weight": None}
    config = template.with_run_config(drawn)
    assert set(config) == {*drawn, RUN_CONFIG}
    cfg = template.run_config_of(config)
    assert cfg == template.resolve(drawn)
    assert cfg.teacher == "t/dir" and cfg.training.seed == 3 and cfg.objective_mix == "hidden_mse+kd"
    assert template.decode(config) == {"objectives.mix": ["kd", "hidden_mse"], "training.seed": 3}


def test_a_draw_that_is_no_valid_config_carries_its_reason_to_the_trial() -> None:
    template = TrialTemplate(BASE)
    config = template.with_run_config({"training.warmup_ratio": 2.0})
    assert isinstance(config[RUN_CONFIG], str) and "training.warmup_ratio" in config[RUN_CONFIG]
    with pytest.raises(ValueError, match="training.warmup_ratio"):
        template.run_config_of(config)
