"""One distillation run: load, build, initialise, train, evaluate, report.

Plain PyTorch + transformers (through Accelerate); nothing here knows about Ray. A reporter
callback receives the metrics of every evaluation and the checkpoint saved with them.
`RunParts`, `build_loop` and `train` are the run builder that pre-training distillation
(trainables.pretrain) and teacher fine-tuning (trainables.teacher) share with `distill`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainables.config import PretrainConfig, RunConfig, RunSettings, check_against_teacher
from trainables.data import TaskData, load_task_data
from trainables.distiller import Distiller, StagePlan, build_modules, make_terms, plan_stages
from trainables.mapping import layer_pairs
from trainables.model_source import resolve_model_source
from trainables.models import build_student, encoder_layers, load_teacher, save_model
from trainables.objectives import ModuleContext
from trainables.precision import make_accelerator
from trainables.tasks import resolve_task
from trainables.teacher_source import teacher_source
from trainables.training import DistillationLoop, Reporter, RunOutputs, StepCallback
from trainables.views import LayerPairs


def distill(
    cfg: RunConfig,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Run `cfg` to the end and return the final metrics; the student is saved under output_dir."""
    accelerator = make_accelerator(cfg.training)
    spec = resolve_task(cfg.task)

    # Load the teacher and its tokenizer; without a teacher a pretrained student is fine-tuned on
    # cross-entropy alone, with its own tokenizer.
    source = resolve_model_source(cfg.teacher if cfg.teacher is not None else cfg.student.init.pretrained)
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = None
    if cfg.teacher is not None:
        teacher = load_teacher(source, spec.num_labels)
        check_teacher(cfg, teacher)

    # Build the student, initialised as `student.init` says, and load the task's data.
    set_seed(cfg.training.seed)
    student = build_student(teacher, cfg.student, spec.num_labels)
    data = load_task_data(spec, tokenizer, cfg.training, cfg.cache_dir)
    stages = plan_stages(make_terms(cfg.objectives), cfg.ce_weight, two_stage=cfg.two_stage)

    # Train, evaluating and reporting as the training settings say; save the student.
    return train(RunParts(student, tokenizer, teacher, data, stages), cfg, accelerator, reporter, on_step, resume_from)


def check_teacher(cfg: RunConfig | PretrainConfig, teacher: PreTrainedModel) -> None:
    """`check_against_teacher` with the loaded teacher's shape."""
    config = teacher.config
    check_against_teacher(cfg, len(encoder_layers(teacher)), config.num_attention_heads, config.hidden_size)


# --- the run builder ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunParts:
    """What a run trains; distillation, pre-training and teacher fine-tuning each build their own."""

    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    teacher: PreTrainedModel | None
    data: TaskData
    stages: list[StagePlan]

    def save_student(self, path: Path) -> None:
        save_model(self.student, self.tokenizer, path)


def build_distiller(parts: RunParts, settings: RunSettings) -> Distiller:
    """The student with the trainable modules its objectives own, learning over the mapping's layer
    pairs, with the fidelity switches its loss obeys."""
    fidelity = settings.fidelity
    switches = dict(crd_without_replacement=fidelity.crd_without_replacement,
                    minilm_v2_last_pair=fidelity.minilm_v2_last_pair)
    if parts.teacher is None:
        return Distiller(parts.student, {}, LayerPairs(hidden=(), attention=()), fidelity.count_padding,
                         fidelity.ild_scale_by_batch, **switches)
    teacher_layers = len(encoder_layers(parts.teacher))
    pairs = layer_pairs(settings.mapping, teacher_layers, settings.student.num_layers, fidelity.mapping_floor)
    context = ModuleContext(
        student_hidden_size=parts.student.config.hidden_size,
        teacher_hidden_size=parts.teacher.config.hidden_size,
        student_layers=settings.student.num_layers,
        teacher_layers=teacher_layers,
        num_train_examples=len(parts.data.train),
        train_labels=parts.data.train_labels,
        combine=pairs.combine,
    )
    terms = {term.name: term for stage in parts.stages for term in stage.terms}  # in the config's order
    modules = build_modules(list(terms.values()), context)
    return Distiller(parts.student, modules, pairs, fidelity.count_padding, fidelity.ild_scale_by_batch, **switches)


def build_loop(
    parts: RunParts, settings: RunSettings, accelerator: Accelerator, outputs: RunOutputs
) -> DistillationLoop:
    """The loop over `parts`: the distiller, and the teacher source its objectives' reads call for."""
    distiller = build_distiller(parts, settings)
    teacher = teacher_source(
        parts.teacher, parts.stages, parts.data, settings.training, settings.fidelity, settings.cache_dir, accelerator
    )
    return DistillationLoop(distiller, teacher, parts.stages, parts.data, settings.training, accelerator, outputs)


def train(
    parts: RunParts,
    settings: RunSettings,
    accelerator: Accelerator,
    reporter: Reporter | None = None,
    on_step: StepCallback | None = None,
    resume_from: Path | None = None,
    snapshot_steps: frozenset[int] = frozenset(),
) -> dict[str, float]:
    """Train `parts` to the end; the main process saves the student and metrics.json under output_dir."""
    output_dir = settings.output_dir.expanduser().resolve()
    outputs = RunOutputs(
        output_dir, reporter, on_step, export_student=parts.save_student, snapshot_steps=snapshot_steps
    )
    metrics = build_loop(parts, settings, accelerator, outputs).run(resume_from)
    if accelerator.is_main_process:
        parts.save_student(output_dir / "student")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
