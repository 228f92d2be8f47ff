"""Task-agnostic distillation: a student distilled on unlabelled text, resumable, data-parallel."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from trainables.config import ObjectiveSpec, PretrainConfig
from trainables.launch import run_data_parallel
from trainables.pretrain import pretrain


@pytest.fixture(scope="session")
def tweet_corpus(demo_cache, tiny_demo_teacher) -> Path:
    """A small local text corpus: the demo tweets' text, one document per line, no labels."""
    from trainables.demo import ensure_demo_data

    train, _ = ensure_demo_data(demo_cache / "demo")
    path = demo_cache / "tweets.txt"
    path.write_text("\n".join(pd.read_csv(train)["text"].astype(str)) + "\n")
    return path


def pretrain_config(teacher: str, corpus: Path, cache: Path, out: Path, **training) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "corpus": {"files": [str(corpus)], "block_size": 32, "validation_fraction": 0.05},
            "teacher": teacher,
            "student": {"num_layers": 2, "init": "skip"},
            "objectives": [{"name": "hidden_mse"}, {"name": "att_kl"}],
            "mlm_weight": 0.5,
            "output_dir": str(out),
            "cache_dir": str(cache),
            "save_fractions": [0.5, 1.0],
            "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_steps": 12,
                         "eval_steps": 4, **training},
        }
    )


def test_label_needing_objectives_are_rejected_for_pretraining(tiny_demo_teacher, tmp_path):
    for name in ("kd", "crd", "logit_mse"):
        with pytest.raises(ValidationError, match=f"objectives.0.name '{name}' needs gold labels"):
            PretrainConfig.model_validate(
                {"corpus": {"files": ["x.txt"]}, "teacher": tiny_demo_teacher, "objectives": [{"name": name}]}
            )


def test_pretraining_lowers_distillation_loss_and_keeps_students_at_fractions(
    tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path
):
    cfg = pretrain_config(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path / "run")
    reports: list[dict] = []
    final = pretrain(cfg, lambda metrics, checkpoint: reports.append(metrics))
    assert [r["step"] for r in reports] == [4, 8, 12]
    assert reports[-1]["eval_hidden_mse"] < reports[0]["eval_hidden_mse"]
    assert final["score"] == -final["eval_loss"]
    assert sorted(p.name for p in (tmp_path / "run" / "students").iterdir()) == ["step-0000006", "step-0000012"]
    assert (tmp_path / "run" / "student" / "config.json").exists()


class Crash(Exception):
    pass


def test_pretraining_stopped_and_resumed_ends_with_the_same_loss(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path):
    uninterrupted = pretrain(pretrain_config(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path / "a"))
    cfg = pretrain_config(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path / "b")
    saved: list[Path] = []

    def crash_at_step_8(metrics: dict, checkpoint: Path | None) -> None:
        saved.append(checkpoint)
        if metrics["step"] == 8:
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, crash_at_step_8)
    resumed = pretrain(cfg, resume_from=saved[-1])
    for key in ("eval_loss", "eval_hidden_mse", "eval_att_kl", "train_loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key


def test_two_gloo_processes_train_one_student_data_parallel(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path):
    cfg = pretrain_config(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path / "ddp", max_steps=6, eval_steps=3)
    reports: list[dict] = []
    final = run_data_parallel(pretrain, cfg, num_processes=2, reporter=lambda m, c: reports.append(m))
    assert [r["step"] for r in reports] == [3, 6]
    assert final["step"] == 6 and final["eval_loss"] > 0
    assert (tmp_path / "ddp" / "student" / "config.json").exists()


@pytest.mark.parametrize("objective", ["att_kl", "minilm"])
def test_attention_only_distillation_of_the_top_layer_runs_data_parallel(
    objective, tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path
):
    """The paper's task-agnostic shape: no MLM loss and attention objectives on the last layer leave
    the MLM head and the last layer's value/FFN weights out of the loss, which DDP must cope with."""
    cfg = pretrain_config(tiny_demo_teacher, tweet_corpus, demo_cache, tmp_path / "ddp", max_steps=4, eval_steps=2)
    cfg = cfg.model_copy(update={"objectives": [ObjectiveSpec(name=objective)], "mlm_weight": 0.0, "mapping": [3]})
    reports: list[dict] = []
    final = run_data_parallel(pretrain, cfg, num_processes=2, reporter=lambda m, c: reports.append(m))
    assert [r["step"] for r in reports] == [2, 4]
    assert all(math.isfinite(r[f"train_{objective}"]) for r in reports) and final[f"eval_{objective}"] > 0
