"""The cost estimate of `sweep --dry-run` / `study --dry-run` (orchestrator/cost.py): FLOPs against
the matrix products written out by hand and against torch's own counter on the real model, padded
lengths against real random batches, ASHA's expected stops against a simulation of Ray's rule,
the shipped device profiles against the benchmark results they come from, and the CLI's table,
JSON and messages."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import SweepSpec
from orchestrator.cost import estimate_sweep
from orchestrator.cost_flops import CLASSIFIER, MLM, Shape, shape_of
from orchestrator.cost_lengths import TOKENS_PER_WORD, MeasuredLengths, padded_length
from orchestrator.cost_stopping import asha_milestones
from orchestrator.device_profiles import load_profile, shipped_profiles
from orchestrator.gpu_memory import representative_configs
from sweep_helpers import distillsweep

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
WIDTH, FFN, HEADS, LAYERS, LABELS, VOCAB = 8, 16, 2, 2, 2, 40
ROW = "w w w w"  # [CLS] w w w w [SEP]: 6 tokens, every row alike, so no padding
ROW_TOKENS = 6


def written_out(rows: int, length: int, layers: int, head: str = CLASSIFIER, labels: int = LABELS) -> int:
    """Forward FLOPs as the list of the matrix products a BERT layer computes, 2*m*n*k each."""
    h, d = WIDTH, WIDTH // HEADS
    matmuls: list[tuple[int, int, int]] = []
    for _ in range(layers):
        matmuls += [(rows * length, h, h)] * 4  # query, key, value, attention output
        matmuls += [(length, length, d)] * (rows * HEADS)  # scores Q.K^T, per row and head
        matmuls += [(length, d, length)] * (rows * HEADS)  # scores times V
        matmuls += [(rows * length, FFN, h), (rows * length, h, FFN)]  # feed-forward up and down
    if head == MLM:
        matmuls += [(rows * length, h, h), (rows * length, VOCAB, h)]  # transform, decoder
    else:
        matmuls += [(rows, h, h), (rows, labels, h)]  # pooler, classifier
    return sum(2 * m * n * k for m, n, k in matmuls)


def tiny_config(**extra: object) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=FFN, num_labels=LABELS, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 8-wide BERT teacher with a real word-level tokenizer, saved as a local directory."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config()).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "w"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return str(folder)


def local_task(folder: Path, train_rows: int = 8, validation_rows: int = 4) -> dict:
    for name, rows in (("train", train_rows), ("validation", validation_rows)):
        (folder / f"{name}.csv").write_text("text,label\n" + "".join(f"{ROW},{i % 2}\n" for i in range(rows)))
    return {"name": "same", "train_file": str(folder / "train.csv"), "validation_file": str(folder / "validation.csv")}


def space(teacher: str, folder: Path, **fields: object) -> dict:
    """Two seeds of a one-layer student distilled with hidden-state MSE and KD (the teacher runs live)."""
    spec = {
        "name": "costly",
        "base": {
            "task": local_task(folder), "teacher": teacher, "student": {"num_layers": 1, "init": "lower"},
            "objectives": [{"name": "kd", "weight": 0.5}, {"name": "hidden_mse", "weight": 1.0}],
            "training": {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_steps": 3,
                         "eval_steps": 2, "max_seq_length": 32, "mixed_precision": "no"},
        },
        "space": {"training.seed": {"grid": [1, 2]}},
        "storage": str(folder / "sweeps"),
    }
    spec.update(fields)
    return spec


def estimate(spec: dict, profile: str | None = None, devices: float | None = None):
    sweep = SweepSpec.model_validate(spec)
    return estimate_sweep(sweep, representative_configs(sweep), load_profile(profile, False), devices)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- FLOPs ---------------------------------------------------------------------------------------


def test_encoder_flops_are_the_matrix_products_written_out():
    shape = Shape(LAYERS, WIDTH, FFN, VOCAB)
    for rows, length in ((1, 1), (4, 6), (3, 17)):
        assert shape.forward_flops(rows, length, CLASSIFIER, LABELS) == written_out(rows, length, LAYERS)
        assert shape.forward_flops(rows, length, MLM, LABELS) == written_out(rows, length, LAYERS, MLM)


@pytest.mark.parametrize("model_class, head", [(BertForSequenceClassification, CLASSIFIER), (BertForMaskedLM, MLM)])
def test_flop_count_agrees_with_torchs_counter_on_the_real_model(model_class, head):
    torch.manual_seed(0)
    model = model_class(tiny_config(attn_implementation="eager"))
    ids = torch.randint(5, VOCAB, (4, 6))
    with FlopCounterMode(display=False) as forward:
        model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))
    with FlopCounterMode(display=False) as step:
        model.train()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    counted = Shape(LAYERS, WIDTH, FFN, VOCAB).forward_flops(4, 6, head, LABELS)
    assert forward.get_total_flops() == counted
    assert step.get_total_flops() == 3 * counted  # backward = twice the forward


def test_sweep_flops_are_the_hand_count_of_each_pass(teacher, tmp_path):
    """3 steps of 4 rows (8 training rows: an epoch and a half), evaluations at step 2 and at the end
    over 4 validation rows; a live teacher (hidden states are read); two seeds."""
    cost = estimate(space(teacher, tmp_path))
    task, = cost.tasks
    work = task.full.work
    trials, rows, evaluations = 2, 3 * 4, 2
    assert task.full.trials == trials and work.examples == trials * rows
    assert work.tokens == work.real_tokens == trials * rows * ROW_TOKENS
    assert work.teacher_flops == trials * written_out(rows, ROW_TOKENS, LAYERS)
    assert work.student_flops == trials * 3 * written_out(rows, ROW_TOKENS, 1)
    assert work.eval_flops == trials * evaluations * written_out(4, ROW_TOKENS, 1)
    assert task.lengths == [("measured on 8 local rows, tokenised", ROW_TOKENS, ROW_TOKENS)]
    assert task.expected.work == work  # no scheduler: nothing stops early


def test_kd_only_sweep_runs_the_teacher_once_over_the_split_for_all_its_trials(teacher, tmp_path):
    spec = space(teacher, tmp_path)
    spec["base"]["objectives"] = [{"name": "kd", "weight": 0.5}]
    task, = estimate(spec).tasks
    assert task.full.work.teacher_flops == written_out(8, ROW_TOKENS, LAYERS)  # one pass, not one per step and trial
    spec["base"]["training"]["teacher_logits_cache"] = False
    task, = estimate(spec).tasks
    assert task.full.work.teacher_flops == 2 * written_out(12, ROW_TOKENS, LAYERS)


def test_device_hours_are_flops_over_the_nearest_profile_rate(teacher, tmp_path):
    cost = estimate(space(teacher, tmp_path), profile="cpu-xeon-amx")
    rate = shipped_profiles()["cpu-xeon-amx"].rate("fp32", 4, WIDTH)
    assert rate.precision == "fp32"
    assert cost.total.full.device_hours == pytest.approx(cost.total.full.work.flops / (rate.tflops * 1e12) / 3600)
    # two one-core trials: on one core they run in turn, on two side by side
    assert cost.total.full.wall_hours == pytest.approx(cost.total.full.device_hours)
    assert estimate(space(teacher, tmp_path), "cpu-xeon-amx", 2).total.full.wall_hours == pytest.approx(
        cost.total.full.device_hours / 2)


def test_a_teacher_of_unknown_shape_is_said_unknown_not_guessed(tmp_path):
    spec = space("someone/not-a-known-model", tmp_path)
    assert shape_of("someone/not-a-known-model") is None
    cost = estimate(spec)
    task, = cost.tasks
    assert task.full.device_hours is None and task.unknown == ["teacher someone/not-a-known-model: unknown shape"]
    assert task.full.work.examples == 24  # what does not need the shape is still counted
    assert cost.total.as_json()["no_stopping"]["teacher_flops"] is None


def test_hub_models_of_the_presets_have_their_shapes_without_a_download():
    assert shape_of("roberta-base") == Shape(12, 768, 3072, 50265)
    assert shape_of("google-bert/bert-base-uncased") == Shape(12, 768, 3072, 30522)


# --- lengths -------------------------------------------------------------------------------------


def test_padded_length_is_the_mean_longest_row_of_random_batches():
    rng = np.random.default_rng(0)
    sample = rng.lognormal(3.3, 0.5, 5000).astype(int) + 2
    lengths = MeasuredLengths(tuple(sorted(sample.tolist())), "test")
    for batch, cap in ((32, 512), (8, 40)):
        batches = np.minimum(rng.choice(sample, (20_000, batch)), cap).max(axis=1)
        assert padded_length(lengths, batch, cap, False) == pytest.approx(batches.mean(), rel=0.01)
    # sorted within mega-batches, as group_by_length does: batches hold rows of about one length
    grouped = padded_length(lengths, 32, 512, True)
    assert np.minimum(sample, 512).mean() < grouped < 1.1 * np.minimum(sample, 512).mean()


# --- early stopping ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """numpy's linear percentile (Ray's cutoff is np.nanpercentile of the recorded scores)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def simulated_asha_steps(trials: int, rungs: list[int], end: int, reduction_factor: float, runs: int) -> float:
    """Mean steps a trial trains under Ray's asynchronous rule: at each rung, trials arrive one by
    one and stop when their score is below the (1 - 1/rf) percentile of those recorded before."""
    rng = random.Random(1)
    total = 0
    for _ in range(runs):
        alive = trials
        for rung in rungs:
            recorded: list[float] = []
            going_on = 0
            for _ in range(alive):
                score = rng.random()
                if recorded and score < percentile(recorded, 1 - 1 / reduction_factor):
                    total += rung
                else:
                    going_on += 1
                recorded.append(score)
            alive = going_on
        total += end * alive
    return total / (runs * trials)


@pytest.mark.parametrize("seeds, reduction_factor", [(8, 2.0), (5, 3.0)])
def test_asha_range_matches_a_simulated_schedule(teacher, tmp_path, seeds, reduction_factor):
    """Rungs at steps 5, 10, 20 of 40 (evaluations every 5 steps); one group of trials."""
    spec = space(teacher, tmp_path, scheduler={"type": "asha", "max_t": 40, "grace_period": 5,
                                               "reduction_factor": reduction_factor, "group_by": []})
    spec["space"] = {"training.seed": {"grid": list(range(seeds))}}
    spec["base"]["task"] = local_task(tmp_path, train_rows=4000)  # no epoch wraps: rows = steps x batch
    spec["base"]["training"].update(max_steps=60, eval_steps=5)
    rungs = asha_milestones(5, 40, reduction_factor)
    draws = random.Random(seeds)
    scores = [draws.random() for _ in range(seeds)]
    assert percentile(scores, 1 - 1 / reduction_factor) == pytest.approx(
        np.nanpercentile(scores, (1 - 1 / reduction_factor) * 100))
    cost = estimate(spec)
    steps = cost.total.expected.work.examples / (4 * seeds)
    assert steps == pytest.approx(simulated_asha_steps(seeds, [int(r) for r in rungs], 40, reduction_factor, 20_000),
                                  rel=0.01)
    assert cost.total.full.work.examples == seeds * 40 * 4  # none stopped: every trial to max_t
    assert rungs == ([5, 10, 20] if reduction_factor == 2 else [5, 15]) and cost.stopping.milestones == tuple(rungs)


def test_asha_stops_nothing_where_each_group_holds_one_trial(teacher, tmp_path):
    spec = space(teacher, tmp_path, scheduler={"type": "asha", "max_t": 3, "grace_period": 1})
    spec["space"] = {"student.init": {"grid": ["lower", "upper"]}}  # group_by's default: one trial per init
    cost = estimate(spec)
    assert cost.total.expected.work == cost.total.full.work


# --- device profiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("result, teacher_shape, student_layers, precision, profile", [
    ("throughput.paper-b256.gpu.json", (12, 768, 3072), 6, "bf16", "h200"),
    ("throughput.paper-b256.gpu.json", (12, 768, 3072), 6, "fp32", "h200"),
    ("throughput.paper-b32.gpu.json", (12, 768, 3072), 6, "bf16", "h200"),
    ("throughput.paper-b32.gpu.json", (12, 768, 3072), 6, "fp32", "h200"),
    ("throughput.default-b32.gpu.json", (6, 384, 1536), 3, "bf16", "h200"),
    ("throughput.default-b32.gpu.json", (6, 384, 1536), 3, "fp32", "h200"),
    ("throughput.json", (6, 384, 1536), 3, "bf16", "cpu-xeon-amx"),
    ("throughput.json", (6, 384, 1536), 3, "fp32", "cpu-xeon-amx"),
])
def test_shipped_rates_are_the_benchmarks_examples_per_second_in_flops(
        result, teacher_shape, student_layers, precision, profile):
    """A step of the benchmark: the live teacher's forward, the student's forward and backward."""
    measured = json.loads((ROOT / "bench" / "results" / result).read_text())
    setup = measured["setup"]
    examples_per_s = measured["median_examples_per_second"]["ours" if precision == "bf16" else "ours_fp32"]
    teacher_model, student = Shape(*teacher_shape, 30522), Shape(student_layers, *teacher_shape[1:], 30522)
    batch, length = setup["batch_size"], setup["mean_padded_length"]
    step = teacher_model.forward_flops(batch, length, CLASSIFIER, 2) + 3 * student.forward_flops(batch, length, CLASSIFIER, 2)
    rate = shipped_profiles()[profile].rate(precision, batch, teacher_shape[1])
    assert (rate.precision, rate.batch_size, rate.hidden_size) == (precision, batch, teacher_shape[1])
    assert rate.tflops == pytest.approx(step / batch * examples_per_s / 1e12, rel=0.005)
    assert result in rate.source


# --- the CLI -------------------------------------------------------------------------------------


def test_dry_run_prints_the_cost_table_on_the_default_profile(teacher, tmp_path):
    path = write(tmp_path / "space.yaml", space(teacher, tmp_path))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "cost of sweep costly on cpu-xeon-amx" in flat  # trials ask for no GPU: the CPU profile
    assert "CPU core-h" in flat and "cpu-xeon-amx: one core of an Intel Xeon" in flat
    assert "same 6 -> 6 (measured on 8 local rows, tokenised)" in flat


def test_dry_run_json_from_the_cli_is_the_estimate(teacher, tmp_path):
    path = write(tmp_path / "space.yaml", space(teacher, tmp_path, resources={"cpu": 1, "gpu": 1}))
    done = distillsweep(["sweep", str(path), "--dry-run", "--json", "--devices", "2"], tmp_path / "cache", tmp_path,
                        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    expected = estimate(space(teacher, tmp_path, resources={"cpu": 1, "gpu": 1}), "h200", 2).as_json()
    assert printed["profile"]["name"] == "h200" and printed["devices"] == 2
    assert printed["total"] == json.loads(json.dumps(expected["total"]))
    assert printed["tasks"][0]["no_stopping"]["examples"] == 24


def test_bad_device_profile_file_names_the_field(teacher, tmp_path):
    path = write(tmp_path / "space.yaml", space(teacher, tmp_path))
    profile = {"name": "mine", "device": "a GPU", "unit": "GPU", "auto_precision": "bf16",
               "rates": [{"precision": "bf16", "batch_size": 32, "hidden_size": 768, "tflops": -3, "source": "me"}]}
    bad = write(tmp_path / "mine.yaml", profile)
    result = runner.invoke(app, ["sweep", str(path), "--dry-run", "--device-profile", str(bad)])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"--device-profile {bad}: rates.0.tflops: Input should be greater than 0" in flat
    assert "Traceback" not in result.output

    profile["rates"][0]["tflops"] = 50.0
    result = runner.invoke(app, ["sweep", str(path), "--dry-run", "--device-profile", str(write(bad, profile))])
    assert result.exit_code == 0, result.output
    assert "cost of sweep costly on mine" in " ".join(result.output.split())

    result = runner.invoke(app, ["sweep", str(path), "--dry-run", "--device-profile", "h100"])
    assert result.exit_code == 2
    assert "--device-profile 'h100': neither a shipped profile (h200, cpu-xeon-amx) nor a file" in " ".join(
        result.output.split())


@pytest.fixture(scope="module")
def masked_lm_teacher(teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("mlm-teacher")
    BertForMaskedLM(tiny_config()).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(teacher).save_pretrained(folder)
    return str(folder)


def test_study_counts_stage_two_once_per_stage_one_student_of_stage_ones_shape(masked_lm_teacher, tmp_path):
    (tmp_path / "corpus.txt").write_text("w w w w w w w w\n" * 50)
    study = {
        "name": "tiny-study", "storage": str(tmp_path / "sweeps"),
        "distill": {
            "base": {"corpus": {"files": [str(tmp_path / "corpus.txt")], "block_size": 16},
                     "teacher": masked_lm_teacher, "student": {"num_layers": 1, "init": "lower"},
                     "training": {"max_steps": 4, "per_device_train_batch_size": 2, "eval_steps": 2}},
            "space": {"objectives.mix": {"grid": [["hidden_mse"], ["att_kl"]]}},
        },
        "finetune": {
            "base": {"task": local_task(tmp_path), "training": {"max_steps": 3, "per_device_train_batch_size": 4,
                                                                "per_device_eval_batch_size": 4, "eval_steps": 2}},
            "space": {"training.learning_rate": {"grid": [1e-4, 2e-4]}},
        },
    }
    result = runner.invoke(app, ["study", str(write(tmp_path / "study.yaml", study)), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    cost = json.loads(result.stdout)
    distill, finetune = cost["stages"]["distill"]["total"], cost["stages"]["finetune"]["total"]
    assert distill["no_stopping"]["examples"] == 2 * 4 * 2 and distill["no_stopping"]["tokens"] == 2 * 4 * 2 * 16
    # stage 2: 2 students x 2 learning rates, each a 1-layer student cut from the 2-layer teacher; rows are
    # measured in words (a stage-1 student's tokenizer is not on disk before stage 1 runs)
    length = 2 + round(TOKENS_PER_WORD * 4)
    assert finetune["no_stopping"]["trials"] == 4
    assert finetune["no_stopping"]["student_flops"] == 4 * 3 * written_out(12, length, 1)
    assert finetune["no_stopping"]["eval_flops"] == 4 * 2 * written_out(4, length, 1)
    assert cost["total"]["no_stopping"]["flops"] == distill["no_stopping"]["flops"] + finetune["no_stopping"]["flops"]


def test_study_dry_run_names_every_method_of_the_distill_stage_and_plans_both_stages():
    """The task-agnostic preset's eleven methods (more than a bounded repr lists) each by name in the
    distill stage's space table; stage 2's students take stage 1's shape in its GPU plan."""
    preset = ROOT / "search_spaces" / "paper_task_agnostic.yaml"
    mixes = yaml.safe_load(preset.read_text())["distill"]["space"]["objectives.mix"]["grid"]
    result = runner.invoke(app, ["study", str(preset), "--dry-run", "--gpu-memory-gb", "80"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    table = out[out.index("objectives.mix"):out.index("stage distill: resources.gpu auto: one GPU holds 80 GiB")]
    assert len(mixes) == 11 and {"+".join(mix) for mix in mixes} <= set(re.findall(r"[\w+]+", table))
    assert "stage finetune: resources.gpu auto: one GPU holds 80 GiB" in out
    assert "student 6x768, no teacher" in out  # the stage-1 student, fine-tuned


def test_estimate_options_without_dry_run_are_refused(teacher, tmp_path):
    path = write(tmp_path / "space.yaml", space(teacher, tmp_path))
    result = runner.invoke(app, ["sweep", str(path), "--json"])
    assert result.exit_code == 2
    assert "--json: options of the cost estimate, which only --dry-run prints; add --dry-run" in " ".join(
        result.output.split())
