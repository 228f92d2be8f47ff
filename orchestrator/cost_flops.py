"""One trial's work, counted before it runs: its stages, examples, padded tokens and FLOPs.

**FLOPs** are the matrix products, 2*m*n*k each. For a BERT-family encoder of width h and
feed-forward width i, per token of a batch padded to s tokens, each layer computes
    query, key, value and output projections      4 x 2*h*h
    attention scores Q.K^T and their sum over V    2 x 2*s*h   (the heads split h between them:
                                                               their number does not change the count)
    feed-forward up and down                       2 x 2*h*i
and the head: a classifier per row (pooler or dense 2*h*h, output 2*h*labels), or the MLM head per
token (transform 2*h*h, decoder 2*h*vocab). A backward pass is twice its forward; the MLM head is
in the student's backward only where the MLM loss is weighted. Not counted: embedding look-ups,
norms, softmaxes and activations, the objectives' own terms (projections, CRD banks, KL) and the
optimiser (att_kl and AdamW: 6% and 4% of a CPU step, BENCHMARKS.md 2). Shapes are read as
orchestrator.model_shapes reads them; where none can be, the FLOPs say "unknown shape".

**Per trial**: the student's forward and backward on every training batch; the teacher's forward on
every batch, except in stages that read only its logits where the logits cache applies
(`training.teacher_logits_cache`, teacher dropout off): there the teacher runs once over the
training split per (teacher, task, max_seq_length, precision) for the whole sweep; evaluations
(the student's forward over the validation split; stages that report their loss run the teacher
too). Row lengths and padding: orchestrator.cost_lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from orchestrator.config import SweepSpec
from orchestrator.cost_lengths import TaskSize, mean_length, padded_length, task_size
from orchestrator.cost_stages import cached_stages, run_stages
from orchestrator.model_shapes import Architecture, UnknownShape, architecture_or_none, student_architecture
from orchestrator.teachers import teacher_source
from trainables.config import PretrainConfig, PretrainedInit, RunConfig, TrainingConfig

if TYPE_CHECKING:
    from trainables.distiller import StagePlan

MLM, CLASSIFIER = "mlm", "classifier"


@dataclass(frozen=True)
class Shape:
    """What the FLOP count reads of an encoder's shape."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, architecture: Architecture) -> Shape:
        return cls(architecture.layers, architecture.hidden, architecture.intermediate, architecture.vocab)

    def encoder_flops(self, rows: float, length: float) -> float:
        """Forward FLOPs of the encoder layers over `rows` rows padded to `length` tokens."""
        h, i = self.hidden, self.intermediate
        per_token_layer = 4 * 2 * h * h + 2 * 2 * length * h + 2 * 2 * h * i
        return rows * length * self.layers * per_token_layer

    def head_flops(self, rows: float, length: float, head: str, labels: int) -> float:
        """Forward FLOPs of the head: a classifier on each row, or the MLM head on each token."""
        h = self.hidden
        if head == MLM:
            return rows * length * (2 * h * h + 2 * h * self.vocab)
        return rows * (2 * h * h + 2 * h * labels)

    def forward_flops(self, rows: float, length: float, head: str, labels: int) -> float:
        return self.encoder_flops(rows, length) + self.head_flops(rows, length, head, labels)


def shape_of(source: str) -> Shape | None:
    """The shape of a model by hub id, local directory or MLflow URI; None when it cannot be read."""
    architecture = architecture_or_none(source)
    return None if architecture is None else Shape.of(architecture)


def student_of(cfg: RunConfig | PretrainConfig, teacher: Architecture | None,
               known: dict[str, Architecture]) -> Architecture | None:
    """The trial's student (`known`: a study's stage-1 students); None when its shape is unknown."""
    try:
        return student_architecture(cfg.student, teacher, known)
    except UnknownShape:
        return None


@dataclass(frozen=True)
class Work:
    """What some training does, summed: rows, padded and real tokens, FLOPs by whom."""

    examples: float = 0.0
    tokens: float = 0.0
    real_tokens: float = 0.0
    teacher_flops: float = 0.0
    student_flops: float = 0.0
    eval_flops: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> Work:
        return Work(*(getattr(self, f.name) * factor for f in fields(self)))

    @property
    def flops(self) -> float:
        return self.teacher_flops + self.student_flops + self.eval_flops


@dataclass(frozen=True)
class StageCost:
    """One training stage as the cost counts it."""

    steps: int
    offset: int  # optimiser steps of the stages before it
    teacher_each_step: bool
    teacher_in_evaluation: bool  # the stage reports its loss, computed with the teacher
    head_trained: bool  # the loss reads the student's head: it is in the backward


@dataclass(frozen=True)
class TrialPlan:
    """One trial: its stages, data and models, and what its scheduler's counters mean in steps."""

    task: str
    stages: tuple[StageCost, ...]
    size: TaskSize
    training: TrainingConfig
    teacher: Shape | None
    student: Shape | None
    head: str
    unknown: str | None = None  # why its FLOPs cannot be counted

    @property
    def global_batch(self) -> int:
        return self.training.per_device_train_batch_size * self.training.num_processes

    @property
    def micro_batches_per_epoch(self) -> int | None:
        rows = self.size.train_rows
        return None if rows is None else max(1, math.ceil(rows / self.global_batch))

    @property
    def prediction(self) -> StageCost:
        """The last stage: the one whose evaluations carry the score and prediction_step."""
        return self.stages[-1]

    def examples(self, steps: int) -> float:
        """Rows seen in `steps` optimiser steps (the last batch of an epoch is short)."""
        micro = steps * self.training.gradient_accumulation_steps
        per_epoch, rows = self.micro_batches_per_epoch, self.size.train_rows
        if per_epoch is None or rows is None:
            return micro * self.global_batch
        epochs, rest = divmod(micro, per_epoch)
        return epochs * rows + min(rest * self.global_batch, rows)

    def epoch_ends(self, steps: int) -> int:
        """Steps among a stage's first `steps` that end an epoch."""
        per_epoch = self.micro_batches_per_epoch
        if per_epoch is None:
            return 0
        accumulation = self.training.gradient_accumulation_steps
        return steps if accumulation >= per_epoch else steps * accumulation // per_epoch

    def evaluations(self, stage: StageCost, steps: int) -> int:
        """Evaluations in a stage's first `steps` steps, the one at its end included."""
        t = self.training
        if t.eval_strategy == "steps":
            count = (stage.offset + steps) // t.eval_steps - stage.offset // t.eval_steps
            end_evaluates = (stage.offset + stage.steps) % t.eval_steps == 0
        else:
            count = self.epoch_ends(steps)
            end_evaluates = self.epoch_ends(stage.steps) > self.epoch_ends(stage.steps - 1)
        return count + int(steps == stage.steps and not end_evaluates)

    def nth_evaluation(self, n: int) -> int:
        """The prediction stage's step of its n-th evaluation (its last step past the end)."""
        stage, t = self.prediction, self.training
        n = max(1, n)
        if t.eval_strategy == "steps":
            step = (stage.offset // t.eval_steps + n) * t.eval_steps - stage.offset
        elif self.micro_batches_per_epoch is None:
            step = stage.steps
        elif t.gradient_accumulation_steps >= self.micro_batches_per_epoch:
            step = n
        else:
            step = -(-n * self.micro_batches_per_epoch // t.gradient_accumulation_steps)
        return min(step, stage.steps)

    def first_evaluation_from(self, step: int) -> int:
        """The prediction stage's first evaluation at or after its step `step`."""
        stage, t = self.prediction, self.training
        step = max(1, step)
        if step >= stage.steps:
            return stage.steps
        if t.eval_strategy == "steps":
            return min(-(-(stage.offset + step) // t.eval_steps) * t.eval_steps - stage.offset, stage.steps)
        return self.nth_evaluation(self.epoch_ends(step - 1) + 1)

    def step_at(self, time_attr: str, value: float) -> int | None:
        """The prediction stage's step where a scheduler counter reaches `value` (None: a counter
        in seconds, which the estimate does not turn into steps)."""
        stage = self.prediction
        if time_attr == "prediction_step":
            return math.ceil(value)
        if time_attr == "step":
            return math.ceil(value) - stage.offset
        if time_attr == "training_iteration":
            before = sum(self.evaluations(s, s.steps) for s in self.stages[:-1])
            return self.nth_evaluation(math.ceil(value) - before)
        if time_attr == "epoch" and self.micro_batches_per_epoch is not None:
            return math.ceil(value * self.micro_batches_per_epoch / self.training.gradient_accumulation_steps)
        return None

    def stage_work(self, stage: StageCost, steps: int) -> Work:
        t, size = self.training, self.size
        rows = self.examples(steps)
        padded = padded_length(size.train, t.per_device_train_batch_size, t.max_seq_length, t.group_by_length)
        work = Work(examples=rows, tokens=rows * padded, real_tokens=rows * mean_length(size.train, t.max_seq_length))
        if self.unknown is not None:
            return work
        student = self.student.encoder_flops(rows, padded) * 3 + self.student.head_flops(
            rows, padded, self.head, size.labels) * (3 if stage.head_trained else 1)
        teacher = self.teacher_forward(rows, padded) if stage.teacher_each_step else 0.0
        evaluation = self.evaluations(stage, steps) * self.evaluation_flops(stage)
        return work + Work(teacher_flops=teacher, student_flops=student, eval_flops=evaluation)

    def teacher_forward(self, rows: float, length: float) -> float:
        return self.teacher.forward_flops(rows, length, self.head, self.size.labels) if self.teacher else 0.0

    def evaluation_flops(self, stage: StageCost) -> float:
        t, size = self.training, self.size
        rows = size.validation_rows
        padded = padded_length(size.validation, t.per_device_eval_batch_size, t.max_seq_length, False)
        student = self.student.forward_flops(rows, padded, self.head, size.labels)
        return student + (self.teacher_forward(rows, padded) if stage.teacher_in_evaluation else 0.0)

    def work_until(self, step: int) -> Work:
        """Every stage before the prediction stage, and that stage up to its step `step`."""
        done = sum((self.stage_work(s, s.steps) for s in self.stages[:-1]), Work())
        return done + self.stage_work(self.prediction, step)

    def cache_pass(self) -> Work:
        """One teacher pass over the training split for the logits cache: batches sorted by
        length, so rows are padded little."""
        t, size = self.training, self.size
        if self.unknown is not None or size.train_rows is None:
            return Work()
        return Work(teacher_flops=self.teacher_forward(size.train_rows, mean_length(size.train, t.max_seq_length)))


def stage_costs(cfg: RunConfig | PretrainConfig, stages: list[StagePlan], steps: int) -> tuple[StageCost, ...]:
    """The run's stages (trainables.distiller's plans) with their steps and who runs in each."""
    from trainables.objectives import Reads

    scored_by_loss = isinstance(cfg, PretrainConfig)
    out, offset = [], 0
    for index, (stage, cached) in enumerate(zip(stages, cached_stages(cfg, stages))):
        length = steps if stage.steps is None else stage.steps
        reads_logits = any(Reads.LOGITS in t.objective.reads for t in stage.terms)
        out.append(StageCost(
            steps=length, offset=offset,
            teacher_each_step=stage.needs_teacher and not cached,
            teacher_in_evaluation=stage.needs_teacher and (scored_by_loss or index < len(stages) - 1),
            head_trained=stage.ce_weight > 0 or reads_logits,
        ))
        offset += length
    return tuple(out)


def stage_steps(plan_size: TaskSize, training: TrainingConfig) -> int:
    """`DistillationLoop.steps_per_stage`: max_steps, else the epochs' optimiser steps."""
    if training.max_steps > 0 or plan_size.train_rows is None:
        return max(1, training.max_steps)
    per_epoch = math.ceil(plan_size.train_rows / (training.per_device_train_batch_size * training.num_processes))
    return max(1, math.ceil(training.num_train_epochs * per_epoch / training.gradient_accumulation_steps))


def plan_trial(spec: SweepSpec, cfg: RunConfig | PretrainConfig,
               known: dict[str, Architecture]) -> tuple[TrialPlan, tuple | None]:
    """A trial's plan, and the key of the teacher-logits cache file it shares (None: no cache)."""
    source = teacher_source(spec, cfg) if cfg.teacher is not None else None
    pretrained = cfg.student.init.pretrained if isinstance(cfg.student.init, PretrainedInit) else None
    teacher = architecture_or_none(source) if source else None
    student = student_of(cfg, teacher, known)
    tokenizer = source or pretrained  # what the run tokenises with; a model not yet logged has none on disk
    size = task_size(cfg, None if tokenizer is None or tokenizer.startswith(("models:/", "runs:/")) else tokenizer)
    stages = run_stages(cfg)
    t = cfg.training
    costs = stage_costs(cfg, stages, stage_steps(size, t))
    if source is not None and teacher is None:
        unknown: str | None = f"teacher {source}: unknown shape"
    else:
        unknown = None if student is not None else f"student {pretrained}: unknown shape"
    head = MLM if isinstance(cfg, PretrainConfig) else CLASSIFIER
    shapes = (None if model is None else Shape.of(model) for model in (teacher, student))
    plan = TrialPlan(cfg.task_name, costs, size, t, *shapes, head, unknown)
    key = (source, cfg.task_name, t.max_seq_length, t.bf16, t.fp16, t.mixed_precision, t.max_train_samples,
           t.seed if t.max_train_samples else None) if any(cached_stages(cfg, stages)) else None
    return plan, key
