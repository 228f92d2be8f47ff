"""One task-agnostic distillation run: a student distilled on unlabelled text.

The study's second setting (shared/paper_spec.md sections 4 and 7.2): teacher and student read
the same (MLM-masked) blocks of text, the student learns from the teacher's intermediate layers,
optionally plus its own MLM loss, for a budget of optimiser steps. Students are saved at chosen
fractions of the budget, ready for GLUE fine-tuning (`RunConfig` with no teacher).
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import set_seed
from transformers import AutoModelForMaskedLM, AutoTokenizer

from trainables.config import PretrainConfig, check_against_teacher
from trainables.corpus import block_splits, load_corpus, mlm_collator
from trainables.distiller import Distiller, StagePlan, build_modules, make_terms
from trainables.mapping import layer_pairs
from trainables.models import build_student, encoder_layers, load_masked_lm_teacher, resolve_model_source
from trainables.objectives import ModuleContext
from trainables.run import make_accelerator, save_model
from trainables.training import DistillationLoop, Reporter, StepCallback, TaskData


def pretrain(
    cfg: PretrainConfig,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Distil for `training.max_steps` steps; the student is saved under output_dir/student."""
    output_dir = cfg.output_dir.expanduser().resolve()
    accelerator = make_accelerator(cfg.training)

    source = resolve_model_source(cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = load_masked_lm_teacher(source)
    teacher_layers = len(encoder_layers(teacher))
    check_against_teacher(cfg, teacher_layers, teacher.config.num_attention_heads, teacher.config.hidden_size)

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

    terms = make_terms(cfg.objectives)
    pairs = layer_pairs(cfg.mapping, teacher_layers, cfg.student.num_layers)
    context = ModuleContext(
        student_hidden_size=student.config.hidden_size,
        teacher_hidden_size=teacher.config.hidden_size,
        student_layers=cfg.student.num_layers,
        teacher_layers=teacher_layers,
        num_train_examples=len(data.train),
        train_labels=None,
        combine=pairs.combine,
    )
    distiller = Distiller(student, build_modules(terms, context), pairs, cfg.fidelity.count_padding, cfg.fidelity.ild_scale_by_batch)
    loop = DistillationLoop(
        distiller, teacher, [StagePlan("pretrain", tuple(terms), cfg.mlm_weight)], data, cfg.training, output_dir,
        accelerator, reporter, teacher_dropout=cfg.fidelity.teacher_dropout, on_step=on_step,
        export_student=lambda path: save_model(student, tokenizer, path),
        snapshot_steps=frozenset(cfg.save_steps()),
    )
    metrics = loop.run(resume_from)

    if accelerator.is_main_process:
        save_model(student, tokenizer, output_dir / "student")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _identity(path: Path) -> list[object]:
    """A file's identity for the block cache: a changed file is cut again."""
    resolved = path.expanduser().resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]
