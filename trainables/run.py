"""One distillation run: load, build, initialise, train, evaluate, report.

Plain PyTorch + transformers (through Accelerate); nothing here knows about Ray. A reporter
callback receives the metrics of every evaluation and the checkpoint saved with them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trainables.config import RunConfig, TrainingConfig, check_against_teacher
from trainables.data import make_collator, tokenized_splits
from trainables.distiller import Distiller, build_modules, make_terms, plan_stages
from trainables.mapping import layer_pairs
from trainables.metrics import compute_task_metrics
from trainables.models import build_student, encoder_layers, load_teacher, resolve_model_source
from trainables.objectives import ModuleContext
from trainables.views import LayerPairs
from trainables.tasks import TaskSpec, resolve_task, selection_metric
from trainables.teacher_cache import TeacherLogitsCache
from trainables.training import DistillationLoop, Reporter, StepCallback, TaskData

log = logging.getLogger(__name__)



def distill(
    cfg: RunConfig,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Run `cfg` to the end and return the final metrics; the student is saved under output_dir."""
    output_dir = cfg.output_dir.expanduser().resolve()
    accelerator = make_accelerator(cfg.training)

    spec = resolve_task(cfg.task)
    if cfg.teacher is None:
        # Fine-tuning a distilled student: no teacher, cross-entropy only.
        source = resolve_model_source(cfg.student.init.pretrained)
        tokenizer = AutoTokenizer.from_pretrained(source)
        teacher, modules, pairs = None, {}, LayerPairs(hidden=(), attention=())
        set_seed(cfg.training.seed)
        student = build_student(None, cfg.student, spec.num_labels)
        data = load_task_data(spec, tokenizer, cfg.training, cfg.cache_dir)
    else:
        teacher_source = resolve_model_source(cfg.teacher)
        tokenizer = AutoTokenizer.from_pretrained(teacher_source)
        teacher = load_teacher(teacher_source, spec.num_labels)
        teacher_layers = len(encoder_layers(teacher))
        check_against_teacher(cfg, teacher_layers, teacher.config.num_attention_heads, teacher.config.hidden_size)

        set_seed(cfg.training.seed)
        student = build_student(teacher, cfg.student, spec.num_labels)
        data = load_task_data(spec, tokenizer, cfg.training, cfg.cache_dir)
        pairs = layer_pairs(cfg.mapping, teacher_layers, cfg.student.num_layers)
        context = ModuleContext(
            student_hidden_size=student.config.hidden_size,
            teacher_hidden_size=teacher.config.hidden_size,
            student_layers=cfg.student.num_layers,
            teacher_layers=teacher_layers,
            num_train_examples=len(data.train),
            train_labels=torch.tensor(data.train["labels"]) if spec.num_labels > 1 else None,
            combine=pairs.combine,
        )
        modules = build_modules(make_terms(cfg.objectives), context)
    terms = make_terms(cfg.objectives)
    distiller = Distiller(student, modules, pairs, cfg.fidelity.count_padding, cfg.fidelity.ild_scale_by_batch)
    stages = plan_stages(terms, cfg.ce_weight, two_stage=cfg.two_stage)
    loop = DistillationLoop(
        distiller, teacher, stages, data, cfg.training, output_dir, accelerator, reporter,
        teacher_dropout=cfg.fidelity.teacher_dropout, on_step=on_step,
        teacher_cache=TeacherLogitsCache(cfg.cache_dir) if cfg.training.teacher_logits_cache else None,
        export_student=lambda path: save_model(student, tokenizer, path),
    )
    metrics = loop.run(resume_from)

    if accelerator.is_main_process:
        save_model(student, tokenizer, output_dir / "student")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def make_accelerator(training: TrainingConfig) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    precision = precision_here(training)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # Accelerate keeps one precision per process, but one process may train runs of several:
        # a reused Tune worker, a benchmark. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not on_gpu)


def precision_here(training: TrainingConfig) -> str:
    """Accelerate's mixed_precision for `training` on this machine's device."""
    on_gpu = torch.cuda.is_available()
    native = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
    return choose_precision(training, on_gpu, native)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX).

    There bf16 autocast runs a BERT distillation step about 1.7x faster than fp32 (bench/precision);
    elsewhere torch emulates bf16 on CPU and autocast only slows training down.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def choose_precision(training: TrainingConfig, on_gpu: bool, native_bf16: bool) -> str:
    """Accelerate's mixed_precision for this device.

    An explicit bf16/fp16 wins; `auto` picks bf16 where the device does bf16 matrix products
    natively (Ampere or later GPUs, CPUs with AMX), else fp16 on GPUs and fp32 on CPUs.
    CPUs never train in fp16: torch has no fast fp16 kernels there.
    """
    if not on_gpu:
        if training.fp16:
            log.warning("no GPU: training in fp32 instead of fp16")
            return "no"
        if training.bf16:
            if not native_bf16:
                log.warning("this CPU has no bf16 matrix units (AMX): bf16 autocast will be slow here")
            return "bf16"
        return "bf16" if training.mixed_precision == "auto" and native_bf16 else "no"
    if training.fp16:
        return "fp16"
    if training.bf16 or training.mixed_precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    return "no"


def load_task_data(
    spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, training: TrainingConfig, cache_dir: Path | None
) -> TaskData:
    """Tokenised splits (cached on disk), the padding collator and the task's metrics; the score is the
    selection metric (`training.metric_for_best_model`, else the task's main metric)."""
    main_metric = selection_metric(spec, training.metric_for_best_model)
    splits = tokenized_splits(
        spec,
        tokenizer,
        max_seq_length=training.max_seq_length,
        cache_dir=cache_dir,
        max_train_samples=training.max_train_samples,
        max_eval_samples=training.max_eval_samples,
        seed=training.seed,
    )
    return TaskData(
        train=splits["train"],
        validation=splits["validation"],
        collate=make_collator(tokenizer),
        score=lambda logits, labels: compute_task_metrics(spec, logits, labels),
        main_metric=main_metric,
    )


def save_model(model, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
