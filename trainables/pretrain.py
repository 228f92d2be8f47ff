"""One task-agnostic distillation run: a student distilled on unlabelled text.

The study's second setting (shared/paper_spec.md sections 4 and 7.2): teacher and student read
the same (MLM-masked) blocks of text, the student learns from the teacher's intermediate layers,
optionally plus its own MLM loss, for a budget of optimiser steps (att_val_two_stage: the MLM loss
alone for its first half). Students are saved at chosen fractions of the budget, ready for GLUE
fine-tuning (`RunConfig` with no teacher).
"""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import set_seed
from transformers import AutoModelForMaskedLM, AutoTokenizer

from trainables.config import PretrainConfig
from trainables.corpus import block_splits, load_corpus, mlm_collator
from trainables.data import TaskData
from trainables.distiller import make_terms, pretrain_stages
from trainables.model_source import resolve_model_source
from trainables.models import build_student, load_masked_lm_teacher
from trainables.precision import make_accelerator
from trainables.run import RunParts, check_teacher, train
from trainables.training import Reporter, StepCallback


def pretrain(
    cfg: PretrainConfig,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Distil for `training.max_steps` steps; the student is saved under output_dir/student."""
    accelerator = make_accelerator(cfg.training)

    source = resolve_model_source(cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = load_masked_lm_teacher(source)
    check_teacher(cfg, teacher)

    set_seed(cfg.training.seed)
    student = build_student(teacher, cfg.student, num_labels=2, auto_class=AutoModelForMaskedLM)
    corpus = cfg.corpus
    raw = load_corpus(corpus.dataset, corpus.dataset_config, corpus.split, corpus.files, corpus.text_column)
    splits = block_splits(
        raw, tokenizer, corpus.block_size, corpus.text_column, corpus.validation_fraction,
        cache_key_parts=corpus.model_dump(mode="json") | {"files": [_identity(p) for p in corpus.files]},
        cache_dir=cfg.cache_dir, max_train_blocks=corpus.max_train_blocks,
    )
    data = TaskData(
        train=splits["train"], validation=splits["validation"],
        collate=mlm_collator(tokenizer, cfg.mlm_probability), score=None, main_metric="loss",
    )
    stages = pretrain_stages(make_terms(cfg.objectives), cfg.mlm_weight, cfg.training.max_steps)

    parts = RunParts(student, tokenizer, teacher, data, stages)
    return train(parts, cfg, accelerator, reporter, on_step, resume_from, snapshot_steps=frozenset(cfg.save_steps()))


def _identity(path: Path) -> list[object]:
    """A file's identity for the block cache: a changed file is cut again."""
    resolved = path.expanduser().resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]
