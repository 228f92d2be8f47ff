"""The teacher-logits cache: same losses as the live teacher, one teacher pass per sweep, live
teacher kept wherever an objective needs more than logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainables.run as run_module
import trainables.teacher_source as teacher_source_module
from trainables.config import RunConfig
from trainables.models import load_teacher
from trainables.run import distill
from trainables.teacher_cache import TeacherLogitsCache

# fp32: the cache runs the teacher on batches padded differently from the training batches; under
# bf16 autocast that moves the logits by bf16 rounding (~1e-4 relative), in fp32 by nothing measurable.
TRAINING = {"learning_rate": 1e-3, "per_device_train_batch_size": 32, "max_seq_length": 48,
            "max_steps": 12, "eval_steps": 6, "mixed_precision": "no"}
DEMO_TRAIN_ROWS = 1200
DEMO_VALIDATION_ROWS = 400


def run_config(teacher: str, cache: Path, out: Path, **fields) -> RunConfig:
    raw = {
        "task": "demo",
        "teacher": teacher,
        "student": {"num_layers": 2, "init": "lower"},
        "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}],
        "output_dir": str(out),
        "cache_dir": str(cache),
        "training": {**TRAINING, **fields.pop("training", {})},
        **fields,
    }
    return RunConfig.model_validate(raw)


@pytest.fixture
def teacher_rows(monkeypatch) -> list[int]:
    """Rows the teacher ran a forward pass on, one entry per pass (counted by a forward hook)."""
    rows: list[int] = []

    def counting_load_teacher(*args, **kwargs):
        teacher = load_teacher(*args, **kwargs)
        teacher.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
        return teacher

    monkeypatch.setattr(run_module, "load_teacher", counting_load_teacher)
    return rows


def with_cache(monkeypatch, cache: TeacherLogitsCache) -> None:
    """Make `distill` use `cache` wherever it uses one, to watch what it computes."""
    monkeypatch.setattr(teacher_source_module, "TeacherLogitsCache", lambda cache_dir: cache)


LIVE = {"teacher_logits_cache": False}


def distill_reports(cfg: RunConfig) -> tuple[list[dict], dict]:
    reports: list[dict] = []
    final = distill(cfg, lambda metrics, checkpoint: reports.append(metrics))
    return reports, final


KEYS = ("train_loss", "train_kd", "train_ce", "eval_loss", "score")


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for left, right in zip(a, b):
        for key in KEYS:
            assert right[key] == pytest.approx(left[key], rel=1e-5, abs=1e-6), (left["step"], key)


def test_cached_kd_run_matches_live_teacher_and_second_run_skips_the_teacher(
    tiny_demo_teacher, demo_cache, tmp_path, monkeypatch, teacher_rows
):
    live, _ = distill_reports(run_config(tiny_demo_teacher, demo_cache, tmp_path / "live", training=LIVE))
    assert sum(teacher_rows) == 12 * 32  # one live teacher pass per training batch
    teacher_rows.clear()

    first = TeacherLogitsCache(tmp_path / "shared")
    with_cache(monkeypatch, first)
    cached, _ = distill_reports(run_config(tiny_demo_teacher, demo_cache, tmp_path / "cached"))
    assert first.passes_computed == 1
    assert sum(teacher_rows) == DEMO_TRAIN_ROWS  # one pass over the training split, nothing per step
    assert first.path is not None and first.path.exists()
    assert_same_run(live, cached)
    teacher_rows.clear()

    second = TeacherLogitsCache(tmp_path / "shared")  # another trial of the sweep, same key
    with_cache(monkeypatch, second)
    reused, _ = distill_reports(run_config(tiny_demo_teacher, demo_cache, tmp_path / "reused"))
    assert teacher_rows == []  # no teacher forward at all
    assert second.passes_computed == 0 and second.path == first.path
    assert_same_run(live, reused)


def test_hidden_state_and_attention_objectives_keep_the_live_teacher(
    tiny_demo_teacher, demo_cache, tmp_path, monkeypatch, teacher_rows
):
    cache = TeacherLogitsCache(tmp_path / "shared")
    with_cache(monkeypatch, cache)
    objectives = [{"name": "kd", "weight": 0.5}, {"name": "hidden_mse"}, {"name": "att_kl"}]
    distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "run", objectives=objectives,
                       training={"max_steps": 4, "eval_steps": 4}))
    assert sum(teacher_rows) == 4 * 32
    assert cache.passes_computed == 0 and cache.path is None
    assert not (tmp_path / "shared" / "teacher_logits").exists()


def test_two_stage_caches_only_the_logits_only_prediction_stage(
    tiny_demo_teacher, demo_cache, tmp_path, monkeypatch, teacher_rows
):
    cache = TeacherLogitsCache(tmp_path / "shared")
    with_cache(monkeypatch, cache)
    objectives = [{"name": "hidden_mse"}, {"name": "kd", "weight": 0.5}]
    distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "run", objectives=objectives, stages="two_stage",
                       training={"max_steps": 4, "eval_steps": 4}))
    # stage 1 (hidden_mse): live, 4 batches and its evaluation of hidden_mse on the validation split;
    # stage 2 (kd): one pass over the training split, then the file
    assert sum(teacher_rows) == 4 * 32 + DEMO_VALIDATION_ROWS + DEMO_TRAIN_ROWS
    assert cache.passes_computed == 1


def test_teacher_dropout_keeps_the_live_teacher(tiny_demo_teacher, demo_cache, tmp_path, monkeypatch, teacher_rows):
    cache = TeacherLogitsCache(tmp_path / "shared")
    with_cache(monkeypatch, cache)
    distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "run", fidelity={"teacher_dropout": True},
                       training={"max_steps": 4, "eval_steps": 4}))
    assert sum(teacher_rows) == 4 * 32
    assert cache.passes_computed == 0


def test_a_different_max_seq_length_gets_its_own_file_and_a_broken_file_is_rebuilt(
    tiny_demo_teacher, demo_cache, tmp_path, monkeypatch
):
    paths = []
    for length in (48, 32):
        cache = TeacherLogitsCache(tmp_path / "shared")
        with_cache(monkeypatch, cache)
        distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / f"run{length}",
                           training={"max_seq_length": length, "max_steps": 2, "eval_steps": 2}))
        assert cache.passes_computed == 1
        paths.append(cache.path)
    assert paths[0] != paths[1]

    paths[0].write_bytes(b"half a file")
    cache = TeacherLogitsCache(tmp_path / "shared")
    with_cache(monkeypatch, cache)
    distill(run_config(tiny_demo_teacher, demo_cache, tmp_path / "again", training={"max_steps": 2, "eval_steps": 2}))
    assert cache.passes_computed == 1 and cache.path == paths[0]
    saved = torch.load(paths[0], weights_only=True)
    assert saved["logits"].shape == (DEMO_TRAIN_ROWS, 2) and torch.isfinite(saved["logits"]).all()


def test_a_new_logits_only_objective_gets_the_cache_from_its_declaration(
    tiny_demo_teacher, demo_cache, tmp_path, monkeypatch, teacher_rows
):
    objectives = [{"name": "logit_mse", "weight": 0.5}]
    training = {"max_steps": 4, "eval_steps": 2}
    live, _ = distill_reports(run_config(tiny_demo_teacher, demo_cache, tmp_path / "live", objectives=objectives,
                                         training={**training, **LIVE}))
    teacher_rows.clear()
    cache = TeacherLogitsCache(tmp_path / "shared")
    with_cache(monkeypatch, cache)
    cached, _ = distill_reports(run_config(tiny_demo_teacher, demo_cache, tmp_path / "cached", objectives=objectives,
                                           training=training))
    assert cache.passes_computed == 1
    assert sum(teacher_rows) == DEMO_TRAIN_ROWS  # one pass over the training split, nothing per step
    for left, right in zip(live, cached):
        for key in ("train_loss", "train_logit_mse", "eval_loss", "score"):
            assert right[key] == pytest.approx(left[key], rel=1e-5, abs=1e-6), (left["step"], key)
