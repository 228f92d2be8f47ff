"""The report checks the paper's claims on a sweep's own numbers and says when its seeds cannot tell."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.claims import (
    AGREES, DISAGREES, NO_CLAIM, TOO_FEW_SEEDS, Observation, check_claims, family, is_lower,
)
from orchestrator.outcome import OUTCOME_FILE, TrialOutcome
from orchestrator.report import claims_of, render_markdown
from orchestrator.state import STATE_FILE
from orchestrator.tracking import ensure_experiment
from orchestrator.trials import TrialTemplate
from sweep_helpers import distillsweep, sqlite_store
from test_report import COMPLETED, STOPPED, record


def seen(task: str, mix: str, init: str, *scores: float, configuration: str | None = None) -> list[Observation]:
    """One observation per seed 1, 2, ... with these scores."""
    return [Observation(task, configuration or mix, mix, init, seed, score) for seed, score in enumerate(scores, 1)]


def on_task(task: str, *records):
    return [dataclasses.replace(r, task=task) for r in records]


# --- the numbers ---------------------------------------------------------------------------------


def test_lower_minus_upper_and_the_pooled_seed_spread_are_exact_for_known_scores() -> None:
    claims = check_claims(seen("rte", "kd", "lower", 0.80, 0.84) + seen("rte", "kd", "upper", 0.70, 0.72))

    [gap] = claims.gaps
    assert (gap.lower, gap.higher) == ("lower", "upper")
    assert gap.lower_mean == pytest.approx(0.82) and gap.higher_mean == pytest.approx(0.71)
    assert gap.difference == pytest.approx(0.11)
    # variances 0.0008 and 0.0002 over seeds, pooled: sqrt(0.0005)
    assert gap.evidence.seed_spread == pytest.approx(math.sqrt(0.0005))
    assert (gap.evidence.seeds, gap.evidence.trials) == (2, 4)
    assert (gap.claim, gap.verdict) == (3, AGREES)

    [spread] = claims.spreads
    assert spread.means == pytest.approx({"lower": 0.82, "upper": 0.71})
    assert spread.spread == pytest.approx(0.11) and (spread.claim, spread.verdict) == (2, AGREES)


def test_a_lower_init_beaten_beyond_the_seed_spread_disagrees_with_claim_3() -> None:
    claims = check_claims(seen("rte", "hidden_mse+kd", "lower", 0.60, 0.62)
                          + seen("rte", "hidden_mse+kd", "skip", 0.70, 0.72))
    [gap] = claims.gaps
    assert gap.difference == pytest.approx(-0.10) and gap.verdict == DISAGREES


def test_a_difference_inside_the_seed_spread_is_not_enough_seeds_to_tell() -> None:
    claims = check_claims(seen("rte", "kd", "lower", 0.70, 0.76) + seen("rte", "kd", "upper", 0.69, 0.75))
    [gap] = claims.gaps
    assert gap.difference == pytest.approx(0.01)
    assert gap.evidence.seed_spread == pytest.approx(math.sqrt(0.0018))  # both cells 0.03 from their mean
    assert gap.verdict == TOO_FEW_SEEDS
    assert claims.spreads[0].verdict == TOO_FEW_SEEDS


def test_a_one_seed_sweep_is_not_enough_seeds_to_tell_however_large_the_gap() -> None:
    claims = check_claims(seen("qnli", "kd", "lower", 0.90) + seen("qnli", "kd", "upper", 0.60)
                          + seen("qnli", "att_kl+kd", "lower", 0.80) + seen("qnli", "att_kl+kd", "upper", 0.81))
    assert {g.verdict for g in claims.gaps} == {TOO_FEW_SEEDS}
    assert {s.verdict for s in claims.spreads} == {TOO_FEW_SEEDS}
    assert {r.verdict for r in claims.rankings} == {TOO_FEW_SEEDS}
    assert all(g.evidence.seeds == 1 and g.evidence.seed_spread is None for g in claims.gaps)


def test_attention_within_seed_noise_agrees_with_claim_5_and_beyond_it_disagrees() -> None:
    robust = check_claims(seen("rte", "att_kl+kd", "lower", 0.70, 0.74) + seen("rte", "att_kl+kd", "upper", 0.71, 0.73)
                          + seen("rte", "att_kl+kd", "skip", 0.69, 0.75))
    assert [(s.claim, s.verdict) for s in robust.spreads] == [(5, AGREES)]
    assert robust.spreads[0].spread == pytest.approx(0.0)
    assert {(g.claim, g.verdict) for g in robust.gaps} == {(5, AGREES)}

    sensitive = check_claims(seen("rte", "att_mse+kd", "lower", 0.60, 0.61) + seen("rte", "att_mse+kd", "upper", 0.70, 0.71))
    assert [(s.claim, s.verdict) for s in sensitive.spreads] == [(5, DISAGREES)]


def test_the_ranking_averages_tasks_and_compares_the_best_attention_objective_with_kd_and_hidden() -> None:
    observations = []
    for task, shift in (("rte", 0.0), ("sst2", 0.1)):
        observations += seen(task, "kd", "skip", 0.60 + shift, 0.62 + shift)
        observations += seen(task, "hidden_mse+kd", "skip", 0.64 + shift, 0.66 + shift)
        observations += seen(task, "att_kl+kd", "skip", 0.70 + shift, 0.72 + shift)
        observations += seen(task, "crd+kd", "skip", 0.80 + shift, 0.82 + shift)
    observations += seen("rte", "minilm+kd", "skip", 0.99, 0.99)  # no counted trial on sst2
    observations.append(Observation("sst2", "minilm+kd", "minilm+kd", "skip", 1, None))

    [rank] = check_claims(observations).rankings
    assert [(r.configuration, r.family) for r in rank.ranked] == [
        ("crd+kd", "other"), ("att_kl+kd", "attention"), ("hidden_mse+kd", "hidden"), ("kd", "kd")]
    assert [r.average for r in rank.ranked] == pytest.approx([0.86, 0.76, 0.70, 0.66])
    assert rank.unranked == {"minilm+kd": "no counted trial on sst2"}
    assert (rank.attention, rank.other) == ("att_kl+kd", "hidden_mse+kd")  # crd is none of the paper's groups
    assert rank.difference == pytest.approx(0.06) and rank.verdict == AGREES
    assert (rank.evidence.seeds, rank.evidence.trials) == (2, 8)


def test_claim_4_asks_whether_qnli_has_the_largest_lower_minus_upper_gap() -> None:
    observations = []
    for task, gap in (("qnli", 0.15), ("rte", 0.05), ("sst2", 0.02)):
        observations += seen(task, "kd", "lower", 0.70 + gap, 0.72 + gap) + seen(task, "kd", "upper", 0.70, 0.72)
    [check] = check_claims(observations).qnli
    assert check.qnli_gap == pytest.approx(0.15) and check.runner_up == "rte"
    assert check.runner_up_gap == pytest.approx(0.05) and check.verdict == AGREES


def test_paper_groups_of_mixes_and_lower_layer_lists() -> None:
    assert [family(m) for m in ("kd", "hidden_mse+kd", "hidden_mse_token", "att_kl+kd", "att_kl+att_mse",
                                "att_mse+hidden_mse+kd", "crd+kd", "ce")] == [
        "kd", "hidden", "hidden", "attention", "attention", "other", "other", "other"]
    assert [is_lower(i) for i in ("lower", "layers_0_1_2", "layers_0_7_11", "upper", "layers_1_2_3")] == [
        True, True, False, False, False]


def test_mixes_the_paper_says_nothing_about_are_shown_without_a_verdict() -> None:
    [gap] = check_claims(seen("rte", "crd+kd", "lower", 0.6, 0.7) + seen("rte", "crd+kd", "upper", 0.5, 0.5)).gaps
    assert gap.claim is None and gap.verdict == NO_CLAIM


# --- through the report ---------------------------------------------------------------------------


def two_seed_init_sweep() -> list:
    """kd gains 8 points from lower layers, hidden_mse 4, attention 0.5 (inside its 1.4 seed spread)."""
    records = []
    for mix, lower in (("kd", 0.78), ("hidden_mse+kd", 0.74), ("att_kl+kd", 0.705)):
        for seed, noise in ((1, 0.01), (2, -0.01)):
            records.append(record(f"{mix}-u{seed}", mix, "upper", seed, 0.70 + noise, COMPLETED))
            records.append(record(f"{mix}-l{seed}", mix, "lower", seed, lower + noise, COMPLETED))
    return records


def test_a_two_seed_init_sweep_reports_lower_minus_upper_per_objective_with_the_seed_spread() -> None:
    markdown = render_markdown(two_seed_init_sweep(), "best_score", include_stopped=False)

    assert "## Claims of the paper, checked on this sweep" in markdown
    assert ("| demo | kd | lower − upper | +8.0 (78.0 vs 70.0) | 1.4 | 2 | 4 | lower wins (claim 3) | agrees |"
            in markdown)
    assert ("| demo | hidden_mse+kd | lower − upper | +4.0 (74.0 vs 70.0) | 1.4 | 2 | 4 | lower wins (claim 3) "
            "| agrees |" in markdown)
    assert ("| demo | att_kl+kd | lower − upper | +0.5 (70.5 vs 70.0) | 1.4 | 2 | 4 | little difference (claim 5) "
            "| agrees |" in markdown)
    assert "not checked on this sweep; it has no QNLI task" in markdown


def test_a_one_seed_sweep_in_the_report_says_not_enough_seeds_to_tell() -> None:
    records = [r for r in two_seed_init_sweep() if r.seed == 1]
    markdown = render_markdown(records, "best_score", include_stopped=False)
    claims_part = markdown[markdown.index("## Claims"):]
    assert "| demo | kd | lower − upper | +8.0 (79.0 vs 71.0) | — | 1 | 2 | lower wins (claim 3) " \
           "| not enough seeds to tell |" in claims_part
    assert "| agrees |" not in claims_part and "| disagrees |" not in claims_part


def test_stopped_trials_count_in_the_claims_only_with_include_stopped() -> None:
    records = on_task("rte", record("a", "kd", "upper", 1, 0.70, COMPLETED), record("b", "kd", "lower", 1, 0.50, STOPPED))

    [gap] = claims_of(records, "best_score", include_stopped=False).gaps
    assert gap.difference is None and gap.verdict == "no counted trial at init lower"
    [included] = claims_of(records, "best_score", include_stopped=True).gaps
    assert included.difference == pytest.approx(-0.20)


def test_a_sweep_varying_neither_init_nor_objective_has_no_claims_section() -> None:
    records = [record("a", "kd", "upper", 1, 0.7, COMPLETED), record("b", "kd", "upper", 2, 0.72, COMPLETED)]
    assert not claims_of(records, "best_score", include_stopped=False)
    assert "Claims of the paper" not in render_markdown(records, "best_score", include_stopped=False)


# --- end to end: a sweep folder, the `report` command, MLflow --------------------------------------

BASE = {
    "task": "demo", "teacher": "/teachers/tiny", "student": {"num_layers": 2, "init": "lower"},
    "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}], "training": {"max_steps": 12, "eval_steps": 4},
}


def write_sweep_folder(root: Path, uri: str, experiment: str, parent: str) -> Path:
    """A sweep folder as `sweep` leaves it: the state file and, for mixes kd and att_kl+kd x inits
    lower and upper x seeds 1 and 2, one finished trial with its rows and outcome."""
    folder = root / "inits"
    spec = {"name": "inits", "base": BASE, "storage": str(root), "tracking": {"uri": uri, "experiment": "tests"}}
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({
        "spec": spec, "sweep_dir": str(folder), "tracking_uri": uri, "experiment_id": experiment,
        "parent_run_id": parent, "teachers": {}, "base": BASE,
    }))
    states = []
    final = {("kd", "lower"): 0.80, ("kd", "upper"): 0.70, ("att_kl+kd", "lower"): 0.76, ("att_kl+kd", "upper"): 0.76}
    for (mix, init), score in final.items():
        for seed, noise in ((1, 0.01), (2, -0.01)):
            trial_id = f"{mix.replace('+', '_')}_{init}_{seed}"
            trial = folder / f"trial_{trial_id}"
            trial.mkdir()
            drawn = {"objectives.mix": mix.split("+"), "student.init": init, "training.seed": seed}
            (trial / "params.json").write_text(json.dumps(TrialTemplate(BASE).with_run_config(drawn)))
            rows = [{"trial_id": trial_id, "step": step, "score": (score + noise) * step / 12, "total_steps": 12}
                    for step in (4, 8, 12)]
            (trial / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
            (trial / OUTCOME_FILE).write_text(json.dumps(TrialOutcome("completed", 12, 12).as_dict()))
            states.append([json.dumps({"trial_id": trial_id, "status": "TERMINATED"}), "{}"])
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": states}))
    return folder


def test_report_on_a_sweep_folder_prints_the_claims_and_puts_them_in_report_files_and_the_parent_run(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "tests", uri)
    parent = client.create_run(experiment).info.run_id
    folder = write_sweep_folder(tmp_path / "sweeps", uri, experiment, parent)

    done = distillsweep(["report", str(folder)], tmp_path / "cache", tmp_path, timeout=300)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kd_row = "| demo | kd | lower − upper | +10.0 (80.0 vs 70.0) | 1.4 | 2 | 4 | lower wins (claim 3) | agrees |"
    assert " ".join(kd_row.split()) in " ".join(done.stdout.split())  # the terminal wraps long lines
    report = folder / "report"
    assert kd_row in (report / "report.md").read_text()
    page = (report / "report.html").read_text()
    assert "<h2>Claims of the paper, checked on this sweep</h2>" in page
    assert "<td>+10.0 (80.0 vs 70.0)</td>" in page and "<td>not enough seeds to tell</td>" not in page
    checked = json.loads((report / "claims.json").read_text())
    [kd_gap] = [g for g in checked["init_gaps"] if g["configuration"] == "kd"]
    assert kd_gap["difference"] == pytest.approx(0.10) and kd_gap["evidence"]["seeds"] == 2
    run = client.get_run(parent)
    assert run.data.tags["claim_3"].endswith("this sweep: agrees 1")
    assert run.data.tags["claim_5"].endswith("this sweep: agrees 2")  # the gap and the spread of att_kl+kd
    assert run.data.tags["claim_4"].endswith("this sweep: not checked")
    assert "report/claims.json" in [a.path for a in client.list_artifacts(parent, "report")]
