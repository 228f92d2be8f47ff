"""Early stopping within study cells (`scheduler.group_by`) and the warning where a scheduler would
rank the study's own factors (init, mix, task) against each other at a short horizon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import tune
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import SweepSpec, load_sweep_spec
from orchestrator.preflight import scheduler_warnings
from orchestrator.search import SCHEDULERS, WithinGroups, group_key
from orchestrator.spaces import tune_param_space
from orchestrator.study import check_study, load_study_spec, placeholder_students
from orchestrator.trials import TrialTemplate
from trainables.config import RUN_CONFIG

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "search_spaces"
runner = CliRunner()

# Synthetic learning curves, one score per prediction step 1-4: students copying upper teacher
# layers start well and level off; students copying lower layers start near chance and end higher.
FAST_START = (0.60, 0.62, 0.64, 0.65)
SLOW_START = (0.50, 0.52, 0.80, 0.90)
GOOD_KD, WORSE_KD = 0.5, 0.9  # objectives.kd.weight: the worse weighting scores 0.05 less all along
STEPS = len(FAST_START)


def spec_with(teacher: str, **scheduler: Any) -> dict[str, Any]:
    return {
        "name": "cells",
        "base": {"task": "demo", "teacher": teacher, "student": {"num_layers": 2}},
        "space": {
            "objectives.mix": {"grid": [["kd"], ["kd", "att_kl"]]},
            "student.init": {"grid": ["lower", "upper"]},
            "training.learning_rate": {"grid": [1e-4, 1e-2]},
            "training.seed": {"grid": [1, 2]},
        },
        "scheduler": {"type": "asha", "max_t": 4, **scheduler},
    }


def dry_run(tmp_path: Path, spec: dict[str, Any]) -> tuple[int, str]:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    return result.exit_code, " ".join(result.output.split())


# --- the groups ------------------------------------------------------------------------------


def test_group_by_defaults_to_the_study_factors_the_space_varies(teacher_dir):
    spec = SweepSpec.model_validate(spec_with(teacher_dir))
    assert spec.scheduler.group_by == ["objectives.mix", "student.init"]  # not the learning rate, not the seed
    one_init = spec_with(teacher_dir)
    one_init["space"]["student.init"] = {"grid": ["lower"]}
    assert SweepSpec.model_validate(one_init).scheduler.group_by == ["objectives.mix"]


def test_an_empty_group_by_compares_all_trials(teacher_dir):
    spec = SweepSpec.model_validate(spec_with(teacher_dir, group_by=[]))
    assert spec.scheduler.group_by == []
    assert isinstance(SCHEDULERS["asha"](spec.scheduler, TrialTemplate(spec.base)), WithinGroups)


def test_group_by_key_outside_the_space_is_refused_naming_it_and_the_space_keys(tmp_path, teacher_dir):
    code, out = dry_run(tmp_path, spec_with(teacher_dir, group_by=["student.int"]))
    assert code == 2, out
    assert "group_by: 'student.int' is not a key of this sweep's space" in out
    assert "objectives.mix, student.init, training.learning_rate, training.seed" in out
    assert "did you mean student.init?" in out and "Traceback" not in out


def test_pbt_may_not_mutate_a_key_it_groups_by(teacher_dir):
    spec = spec_with(teacher_dir, type="pbt", group_by=["training.learning_rate"],
                     hyperparam_mutations={"training.learning_rate": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(ValueError, match="PBT would move trials between groups"):
        SweepSpec.model_validate(spec)


def test_trials_with_equal_drawn_values_share_a_group_whatever_their_spelling():
    keys = ("objectives.mix", "student.init")
    first = {"objectives.mix": ["kd", "att_kl"], "student.init": {"pretrained": "a", "revision": "b"}}
    same = {"student.init": {"revision": "b", "pretrained": "a"}, "objectives.mix": ["kd", "att_kl"], "seed": 3}
    assert group_key(first, keys) == group_key(same, keys)
    assert group_key(first, keys) != group_key({**first, "objectives.mix": ["att_kl", "kd"]}, keys)


# --- the warning -----------------------------------------------------------------------------


def test_dry_run_warns_where_the_scheduler_compares_initialisations(tmp_path, teacher_dir):
    code, out = dry_run(tmp_path, spec_with(teacher_dir, group_by=["objectives.mix"]))
    assert code == 0, out
    assert "warning: sweep cells: scheduler asha ranks trials of different initialisation (student.init)" in out
    assert "short-horizon bias" in out and "add student.init to scheduler.group_by" in out
    assert "objective mix (objectives.mix)" not in out  # grouped: not compared


def test_dry_run_is_silent_where_the_scheduler_compares_only_within_cells(tmp_path, teacher_dir):
    for spec in (spec_with(teacher_dir), spec_with(teacher_dir, type="none", group_by=[])):
        code, out = dry_run(tmp_path, spec)
        assert code == 0 and "warning" not in out, out


def test_pbt_warning_says_slow_starters_are_replaced(teacher_dir):
    spec = SweepSpec.model_validate(spec_with(teacher_dir, type="pbt", group_by=[],
                                              hyperparam_mutations={"training.seed": {"grid": [1, 2]}}))
    [line] = scheduler_warnings(spec)
    assert "objective mix (objectives.mix) and initialisation (student.init)" in line
    assert "replaced by a copy of a faster trial" in line


def test_study_dry_run_warns_for_stage_two_across_its_students(capsys):
    """Stage 2's student.init is the grid of stage 1's students, one per stage-1 trial."""
    study = load_study_spec(PRESETS / "paper_task_agnostic.yaml",
                            {"finetune.scheduler": {"type": "asha", "max_t": 100, "group_by": ["task"]}})
    check_study(study)
    out = capsys.readouterr().out
    assert "sweep paper_task_agnostic-finetune: scheduler asha ranks trials of different initialisation" in out
    assert "-distill" not in out


def preset_stages() -> list[SweepSpec]:
    stages = []
    for path in sorted(PRESETS.glob("*.yaml")):
        if "distill" in yaml.safe_load(path.read_text()):
            study = load_study_spec(path)
            stages += [study.stage("distill"), study.stage("finetune", placeholder_students(study))]
        else:
            stages.append(load_sweep_spec(path))
    return stages


def test_no_preset_compares_study_factors_with_early_stopping():
    stages = preset_stages()
    assert len(stages) >= 6
    for spec in stages:
        assert scheduler_warnings(spec) == [], spec.name


def test_every_preset_groups_or_trains_every_trial_to_the_end_and_says_why():
    for path in sorted(PRESETS.glob("*.yaml")):
        if path.name == "quickstart.yaml":
            continue
        raw = yaml.safe_load(path.read_text())
        for section in [raw[stage] for stage in ("distill", "finetune")] if "distill" in raw else [raw]:
            scheduler = section.get("scheduler", {})
            assert "group_by" in scheduler or scheduler.get("type") == "none", f"{path.name}: {scheduler}"
        for written in scheduler_sections(path.read_text()):
            assert "#" in written, f"{path.name}: the scheduler section says not why: {written}"


def scheduler_sections(text: str) -> list[str]:
    """Each `scheduler: {...}` as written, comments included (a flow mapping may span lines)."""
    lines, sections = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip().startswith("scheduler:"):
            end = next(j for j in range(i, len(lines)) if "}" in lines[j].split("#")[0])
            sections.append("\n".join(lines[i:end + 1]))
    return sections


# --- a real Ray Tune run ---------------------------------------------------------------------


def synthetic_curve(config: dict[str, Any]) -> None:
    """A trainable reporting the curve of its initialisation: the scheduler is what is under test."""
    curve = SLOW_START if config["student.init"] == "lower" else FAST_START
    handicap = 0.05 if config["objectives.kd.weight"] == WORSE_KD else 0.0
    for step, score in enumerate(curve, start=1):
        tune.report({"score": score - handicap, "prediction_step": step})


@pytest.fixture(scope="module")
def ray_driver(ray_address):
    """This process as a driver of the session's cluster; its workers import this module."""
    ray.init(address=ray_address, log_to_driver=False, runtime_env={"env_vars": {
        "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    try:
        yield
    finally:
        ray.shutdown()


def run_asha(tmp_path: Path, **scheduler: Any) -> dict[tuple[str, float], int]:
    """(init, KD weight) -> the last step each trial reported. Trials run one at a time in Tune's
    grid order (the first key in sorted order varies fastest): the fast starters first, so that
    they fill the first rungs."""
    spec = SweepSpec.model_validate({
        "name": "curves",
        "base": {"task": "demo", "teacher": "demo", "student": {"num_layers": 2},
                 "objectives": [{"name": "kd", "weight": GOOD_KD}]},
        "space": {"objectives.kd.weight": {"grid": [GOOD_KD, WORSE_KD]},
                  "student.init": {"grid": ["upper", "lower"]}},
        "scheduler": {"type": "asha", "max_t": STEPS, "grace_period": 1, "reduction_factor": 2, **scheduler},
    })
    tuner = tune.Tuner(
        synthetic_curve,
        param_space=tune_param_space(spec.space),
        tune_config=tune.TuneConfig(
            metric="score", mode="max", max_concurrent_trials=1, reuse_actors=True,
            scheduler=SCHEDULERS["asha"](spec.scheduler, TrialTemplate(spec.base)),
        ),
        run_config=tune.RunConfig(name="curves", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    assert all(isinstance(r.config[RUN_CONFIG], dict) for r in results)  # each trial's RunConfig resolved
    in_order = [r.config["student.init"] for r in sorted(results, key=lambda r: r.metrics["trial_id"])]
    assert in_order[:2] == ["upper", "upper"], f"a slow starter ran first, which proves nothing: {in_order}"
    return {(r.config["student.init"], r.config["objectives.kd.weight"]): r.metrics["prediction_step"]
            for r in results}


def test_slow_starters_are_not_stopped_by_a_faster_group_but_the_worse_in_each_group_are(tmp_path, ray_driver):
    steps = run_asha(tmp_path)  # group_by defaults to student.init, the one study factor varied
    assert steps == {("upper", GOOD_KD): STEPS, ("upper", WORSE_KD): 1,
                     ("lower", GOOD_KD): STEPS, ("lower", WORSE_KD): 1}, steps


def test_without_groups_asha_stops_the_slow_starters_that_would_end_best(tmp_path, ray_driver):
    steps = run_asha(tmp_path, group_by=[])
    assert steps == {("upper", GOOD_KD): STEPS, ("upper", WORSE_KD): 1,
                     ("lower", GOOD_KD): 1, ("lower", WORSE_KD): 1}, steps
