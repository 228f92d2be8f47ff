"""What a sweep will cost, before it starts: examples, tokens, FLOPs, device-hours, wall-clock.

`distillsweep sweep FILE --dry-run` and `study FILE --dry-run` print it per task and in total, so
that a cluster is booked from the grid's cost rather than a guess.

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
optimiser (att_kl and AdamW: 6% and 4% of a CPU step, BENCHMARKS.md 2). Shapes come from a table of the hub models the presets use,
a local directory's config.json or the hub cache; otherwise the FLOPs say "unknown shape".

**Per trial**: the student's forward and backward on every training batch; the teacher's forward on
every batch, except in stages that read only its logits where the logits cache applies
(`training.teacher_logits_cache`, teacher dropout off): there the teacher runs once over the
training split per (teacher, task, max_seq_length, precision) for the whole sweep; evaluations
(the student's forward over the validation split; stages that report their loss run the teacher
too). Fine-tuning the sweep's teachers (`teacher_finetune`) is counted apart.

**Tokens**: batches are padded to their longest row, so a step of b rows processes b x E[longest of
b lengths], from the length distribution: measured on local data (a sample of rows, tokenised
with the run's tokenizer, or words x 1.3 when no tokenizer is on disk), else a stated mean per
GLUE task with a log-normal spread (coefficient of variation 0.5); lengths are cut at
max_seq_length. Pre-training blocks are full.

**Time**: FLOPs divided by the achieved rate of the device profile's entry nearest the run's
precision, batch and width (`orchestrator.device_profiles`). Compute only: loading, checkpoints
and Ray's per-trial overhead (0.08 s with reused workers, BENCHMARKS.md 5) are not counted.

**Early stopping**: the range from the expected stops to none. ASHA's rungs are Ray's
(grace_period x reduction_factor^k below max_t, where every trial ends); a trial is judged at its
first evaluation at or after a rung, within its group (`scheduler.group_by`), against the trials
that reached the rung before it: the i-th to arrive stops when below the (1 - 1/rf) quantile of
the i - 1 before, which for exchangeable scores happens with probability ((1 - 1/rf)(i - 2) + 1) / i
(never for the first). Median stopping: half the trials of groups of at least 4 (Ray compares a
trial with 3 others or more) stop at their first evaluation after grace_period. PBT stops nothing.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from orchestrator.config import SweepSpec
from orchestrator.device_profiles import DeviceProfile
from orchestrator.spaces import Distribution
from orchestrator.teachers import teacher_requests, teacher_source
from trainables.config import PretrainConfig, PretrainedInit, RunConfig, TrainingConfig
from trainables.distiller import StagePlan, make_terms, plan_stages, pretrain_stages
from trainables.objectives import Reads
from trainables.tasks import TaskSpec, read_local_file, resolve_task

if TYPE_CHECKING:
    from orchestrator.study import StudySpec

MLM, CLASSIFIER = "mlm", "classifier"
SAMPLE_ROWS = 2000  # rows of a local split tokenised to measure its lengths
TOKENS_PER_WORD = 1.3  # sub-word tokens per whitespace word, when no tokenizer is on disk
LENGTH_SPREAD = 0.5  # coefficient of variation of the log-normal around a stated mean
GROUPED_BATCHES = 50  # group_by_length sorts within mega-batches of this many batches (trainables.training)
MEDIAN_MIN_GROUP = 4  # Ray's MedianStoppingRule compares with at least 3 other trials

# Hub models the presets use (and their kin): layers, width, feed-forward width, vocabulary.
KNOWN_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "bert-base-uncased": (12, 768, 3072, 30522), "bert-base-cased": (12, 768, 3072, 28996),
    "bert-large-uncased": (24, 1024, 4096, 30522), "bert-large-cased": (24, 1024, 4096, 28996),
    "roberta-base": (12, 768, 3072, 50265), "roberta-large": (24, 1024, 4096, 50265),
    "distilroberta-base": (6, 768, 3072, 50265),
}
HUB_OWNERS = ("google-bert/", "FacebookAI/", "distilbert/")  # the table's models under their owners' names

# GLUE splits as `datasets` holds them (train, validation; mnli: validation_matched) and a stated
# mean length in sub-word tokens with special tokens (BERT/RoBERTa vocabularies; approximate
# figures from the tasks' published statistics, not measured here).
GLUE_SIZES: dict[str, tuple[int, int, float]] = {
    "cola": (8551, 1043, 11), "sst2": (67349, 872, 13), "mrpc": (3668, 408, 53), "qqp": (363846, 40430, 30),
    "stsb": (5749, 1500, 31), "mnli": (392702, 9815, 40), "qnli": (104743, 5463, 51), "rte": (2490, 277, 69),
}


# --- model shapes and their FLOPs ----------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the FLOP count reads of an encoder's config."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int

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


def known_shape(source: str) -> Shape | None:
    """A shape from the table, with or without the hub owner's prefix."""
    name = source.split("/", 1)[1] if source.startswith(HUB_OWNERS) else source
    return Shape(*KNOWN_SHAPES[name]) if name in KNOWN_SHAPES else None


@functools.cache
def shape_of(source: str) -> Shape | None:
    """The shape of a model by hub id or local directory, read without loading weights or reaching
    the network; None when unknown (an MLflow URI, a hub id neither in the table nor the cache)."""
    shape = known_shape(source)
    if shape is not None:
        return shape
    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        config = hub_cached_config(source)
    if config is None:
        return None
    try:
        fields_ = json.loads(config.read_text())
        return Shape(int(fields_["num_hidden_layers"]), int(fields_["hidden_size"]),
                     int(fields_["intermediate_size"]), int(fields_["vocab_size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hub_cached_config(source: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a hub id
        return None
    return Path(found) if isinstance(found, str) else None


def student_shape(cfg: RunConfig | PretrainConfig, teacher: Shape | None, known: dict[str, Shape]) -> Shape | None:
    """The student as `build_student` makes it: the teacher's config cut to its depth and widths,
    or a pretrained model's own."""
    spec = cfg.student
    if isinstance(spec.init, PretrainedInit):
        return known.get(spec.init.pretrained) or shape_of(spec.init.pretrained)
    if teacher is None:
        return None
    return Shape(spec.num_layers, spec.hidden_size or teacher.hidden, spec.intermediate_size or teacher.intermediate,
                 teacher.vocab)


# --- lengths of rows -----------------------------------------------------------------------------


class Lengths(Protocol):
    source: str

    def at_most(self, length: int) -> float:
        """P(a row has at most `length` tokens), before truncation."""


@dataclass(frozen=True)
class MeasuredLengths:
    sample: tuple[int, ...]  # sorted
    source: str

    def at_most(self, length: int) -> float:
        return bisect.bisect_right(self.sample, length) / len(self.sample)


@dataclass(frozen=True)
class StatedLengths:
    """A log-normal of the stated mean and coefficient of variation LENGTH_SPREAD."""

    mean: float
    source: str

    def at_most(self, length: int) -> float:
        sigma = math.sqrt(math.log(1 + LENGTH_SPREAD**2))
        mu = math.log(self.mean) - sigma**2 / 2
        return 0.5 * (1 + math.erf((math.log(length + 0.5) - mu) / (sigma * math.sqrt(2))))


@dataclass(frozen=True)
class FixedLengths:
    length: int
    source: str

    def at_most(self, length: int) -> float:
        return 1.0 if length >= self.length else 0.0


def upto(lengths: Lengths, cap: int) -> list[float]:
    """P(length <= l) for l = 0 .. cap - 1, stopping where no longer row is left."""
    cdf = []
    for length in range(cap):
        cdf.append(lengths.at_most(length))
        if cdf[-1] >= 1 - 1e-12:
            break
    return cdf


@functools.cache
def mean_length(lengths: Lengths, cap: int) -> float:
    """Mean row length once cut at `cap` tokens."""
    return sum(1 - p for p in upto(lengths, cap))


@functools.cache
def padded_length(lengths: Lengths, batch: int, cap: int, grouped: bool) -> float:
    """Mean padded length of a batch: E[longest of `batch` rows], or with group_by_length the
    mean over a sorted mega-batch of its batches' longest rows."""
    cdf = upto(lengths, cap)
    if not grouped:
        return sum(1 - p**batch for p in cdf)
    rows = GROUPED_BATCHES * batch
    quantiles = [1 - (j * batch + 1) / (rows + 1) for j in range(GROUPED_BATCHES)]
    return sum(next((length for length, p in enumerate(cdf) if p >= q), cap) for q in quantiles) / GROUPED_BATCHES


# --- task sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSize:
    """Rows of each split (None: not known before a corpus is cut; 0: not counted) and their lengths."""

    train_rows: int | None
    validation_rows: int
    labels: int
    train: Lengths
    validation: Lengths


def task_size(cfg: RunConfig | PretrainConfig, tokenizer_source: str | None) -> TaskSize:
    if isinstance(cfg, PretrainConfig):
        blocks = FixedLengths(cfg.corpus.block_size, "full blocks")
        return TaskSize(None, 0, 0, blocks, blocks)
    spec = resolve_task(cfg.task)
    if spec.glue_subset is not None:
        train, validation, mean = GLUE_SIZES[spec.glue_subset]
        lengths = StatedLengths(mean, f"stated means, log-normal spread (CV {LENGTH_SPREAD:g})")
        size = TaskSize(train, validation, spec.num_labels, lengths, lengths)
    else:
        size = local_task_size(spec, tokenizer_source)
    t = cfg.training
    return TaskSize(cap(size.train_rows, t.max_train_samples), cap(size.validation_rows, t.max_eval_samples),
                    size.labels, size.train, size.validation)


def cap(rows: int | None, limit: int | None) -> int | None:
    return rows if rows is None or limit is None else min(rows, limit)


@functools.cache
def local_task_size(spec: TaskSpec, tokenizer_source: str | None) -> TaskSize:
    """Rows and measured lengths of a task's local files."""
    tokenizer = local_tokenizer(tokenizer_source) if tokenizer_source else None
    splits = [read_local_file(path) for path in (spec.train_file, spec.validation_file)]
    train, validation = (measured_lengths(ds, spec.text_columns, tokenizer) for ds in splits)
    return TaskSize(len(splits[0]), len(splits[1]), spec.num_labels, train, validation)


@functools.cache
def local_tokenizer(source: str) -> Any:
    """The run's tokenizer where it is on disk; None (word counts instead) where it is not."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measured_lengths(ds: Any, columns: tuple[str, ...], tokenizer: Any) -> MeasuredLengths:
    """Token lengths of up to SAMPLE_ROWS rows drawn at random (seed 0) from a split."""
    rows = len(ds)
    if rows > SAMPLE_ROWS:
        ds = ds.select(sorted(np.random.default_rng(0).choice(rows, SAMPLE_ROWS, replace=False).tolist()))
    texts = [[text if isinstance(text, str) else "" for text in ds[column]] for column in columns]
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(*texts, truncation=False)["input_ids"]]
        how = "tokenised"
    else:
        specials = len(columns) + 1
        lengths = [specials + round(TOKENS_PER_WORD * sum(len(t.split()) for t in row)) for row in zip(*texts)]
        how = f"words x {TOKENS_PER_WORD}: no tokenizer on disk"
    return MeasuredLengths(tuple(sorted(lengths)) or (0,), f"measured on {len(lengths)} local rows, {how}")


# --- one trial's work ----------------------------------------------------------------------------


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


# --- early stopping ------------------------------------------------------------------------------


def asha_stops(arrivals: float, reduction_factor: float) -> float:
    """Expected trials stopped at a rung that `arrivals` trials of one group reach one after
    another (linear between whole numbers of trials)."""
    q = 1 - 1 / reduction_factor
    whole = math.floor(arrivals)
    stopped = sum((q * (i - 2) + 1) / i for i in range(2, whole + 1))
    return stopped + (arrivals - whole) * ((q * (whole - 1) + 1) / (whole + 1) if whole >= 1 else 0.0)


def asha_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[float]:
    """Ray's rungs (one bracket) that come before max_t, where every trial ends anyway."""
    rungs = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [m for k in range(rungs) if (m := grace_period * reduction_factor**k) < max_t]


@dataclass(frozen=True)
class Stopping:
    """A scheduler's expected stops: at each milestone of its counter, the share of the trials
    reaching it that stop there."""

    kind: str
    time_attr: str
    milestones: tuple[float, ...]
    stop_rates: tuple[float, ...]
    group_size: float
    max_t: float | None = None

    def end(self, plan: TrialPlan) -> int:
        """The prediction stage's last step: its end, or the first evaluation past max_t."""
        step = plan.step_at(self.time_attr, self.max_t) if self.max_t is not None else None
        return plan.prediction.steps if step is None else plan.first_evaluation_from(step)

    def expected(self, plan: TrialPlan) -> Work:
        end, reach, work = self.end(plan), 1.0, Work()
        for milestone, rate in zip(self.milestones, self.stop_rates):
            step = plan.step_at(self.time_attr, milestone)
            if step is None:
                continue
            judged = plan.first_evaluation_from(step)
            if judged >= end:
                break
            work += plan.work_until(judged).scaled(reach * rate)
            reach *= 1 - rate
        return work + plan.work_until(end).scaled(reach)

    def describe(self) -> str:
        at = ", ".join(f"{m:g}" for m in self.milestones) or "none before max_t"
        return (f"{self.kind} at {self.time_attr} {at}; {self.group_size:g} trials per group (scheduler.group_by); "
                f"share stopped at each: {', '.join(f'{r:.2f}' for r in self.stop_rates) or '-'}")


def stopping_of(spec: SweepSpec) -> Stopping | None:
    s = spec.scheduler
    if s.type not in ("asha", "median"):
        return None
    group = group_size(spec)
    if s.type == "median":
        rate = 0.5 if group >= MEDIAN_MIN_GROUP else 0.0
        return Stopping("median", s.time_attr, (float(s.grace_period),), (rate,), group)
    milestones, rates, arrivals = asha_milestones(s.grace_period, s.max_t, s.reduction_factor), [], group
    for _ in milestones:
        stopped = asha_stops(arrivals, s.reduction_factor)
        rates.append(stopped / arrivals if arrivals else 0.0)
        arrivals -= stopped
    return Stopping("asha", s.time_attr, tuple(milestones), tuple(rates), group, float(s.max_t))


def group_size(spec: SweepSpec) -> float:
    """Trials per group of trials the scheduler compares: the values of the group_by keys split them."""
    groups = 1.0
    for key in spec.scheduler.group_by or []:
        value = spec.space.get(key)
        if isinstance(value, Distribution):
            if value.kind not in ("grid", "choice"):
                return 1.0  # a drawn number: every trial its own group
            groups *= len(value.representatives())
    return max(1.0, spec.trial_count / groups)


# --- a sweep's trials ----------------------------------------------------------------------------


def precision(training: TrainingConfig, profile: DeviceProfile) -> str:
    if training.bf16:
        return "bf16"
    if training.fp16:
        return "fp16"
    return "fp32" if training.mixed_precision == "no" else profile.auto_precision


def stage_costs(cfg: RunConfig | PretrainConfig, stages: list[StagePlan], cached: bool, steps: int) -> tuple[StageCost, ...]:
    """The run's stages (trainables.distiller's plans) with their steps and who runs in each."""
    scored_by_loss = isinstance(cfg, PretrainConfig)
    out, offset = [], 0
    for index, stage in enumerate(stages):
        length = steps if stage.steps is None else stage.steps
        reads_logits = any(Reads.LOGITS in t.objective.reads for t in stage.terms)
        out.append(StageCost(
            steps=length, offset=offset,
            teacher_each_step=stage.needs_teacher and not (cached and stage.reads_only_logits),
            teacher_in_evaluation=stage.needs_teacher and (scored_by_loss or index < len(stages) - 1),
            head_trained=stage.ce_weight > 0 or reads_logits,
        ))
        offset += length
    return tuple(out)


def run_stages(cfg: RunConfig | PretrainConfig) -> list[StagePlan]:
    terms = make_terms(cfg.objectives)
    if isinstance(cfg, PretrainConfig):
        return pretrain_stages(terms, cfg.mlm_weight, cfg.training.max_steps)
    return plan_stages(terms, cfg.ce_weight, two_stage=cfg.two_stage)


def stage_steps(plan_size: TaskSize, training: TrainingConfig) -> int:
    """`DistillationLoop.steps_per_stage`: max_steps, else the epochs' optimiser steps."""
    if training.max_steps > 0 or plan_size.train_rows is None:
        return max(1, training.max_steps)
    per_epoch = math.ceil(plan_size.train_rows / (training.per_device_train_batch_size * training.num_processes))
    return max(1, math.ceil(training.num_train_epochs * per_epoch / training.gradient_accumulation_steps))


def plan_trial(spec: SweepSpec, cfg: RunConfig | PretrainConfig, known: dict[str, Shape]) -> tuple[TrialPlan, tuple | None]:
    """A trial's plan, and the key of the teacher-logits cache file it shares (None: no cache)."""
    source = teacher_source(spec, cfg) if cfg.teacher is not None else None
    pretrained = cfg.student.init.pretrained if isinstance(cfg.student.init, PretrainedInit) else None
    teacher = (known.get(source) or shape_of(source)) if source else None
    student = student_shape(cfg, teacher, known)
    tokenizer = source or pretrained  # what the run tokenises with; a model not yet logged has none on disk
    size = task_size(cfg, None if tokenizer is None or tokenizer.startswith(("models:/", "runs:/")) else tokenizer)
    stages = run_stages(cfg)
    t = cfg.training
    cached = source is not None and t.teacher_logits_cache and not cfg.fidelity.teacher_dropout
    costs = stage_costs(cfg, stages, cached, stage_steps(size, t))
    if source is not None and teacher is None:
        unknown: str | None = f"teacher {source}: unknown shape"
    else:
        unknown = None if student is not None else f"student {pretrained}: unknown shape"
    head = MLM if isinstance(cfg, PretrainConfig) else CLASSIFIER
    plan = TrialPlan(cfg.task_name, costs, size, t, teacher, student, head, unknown)
    uses_cache = cached and any(s.reads_only_logits for s in stages)
    key = (source, cfg.task_name, t.max_seq_length, t.bf16, t.fp16, t.mixed_precision, t.max_train_samples,
           t.seed if t.max_train_samples else None) if uses_cache else None
    return plan, key


# --- the estimate --------------------------------------------------------------------------------


@dataclass
class Figures:
    """A group of trials' work, device-hours and wall-clock hours (None: some shape unknown)."""

    trials: float
    work: Work
    device_hours: float | None
    wall_hours: float | None

    def as_json(self) -> dict[str, Any]:
        known = self.device_hours is not None
        work = {f.name: getattr(self.work, f.name) if known or not f.name.endswith("flops") else None
                for f in fields(self.work)}
        return {"trials": self.trials, **work, "flops": self.work.flops if known else None,
                "device_hours": self.device_hours, "wall_hours": self.wall_hours}


@dataclass
class TaskEstimate:
    task: str
    full: Figures  # no trial stopped early
    expected: Figures  # with the scheduler's expected stops
    lengths: list[tuple[str, float, float]]  # (source, mean tokens a row, mean padded) of its trials
    unknown: list[str]

    def as_json(self) -> dict[str, Any]:
        lengths = [{"source": source, "mean_tokens": mean, "padded_tokens": padded} for source, mean, padded in self.lengths]
        return {"task": self.task, "no_stopping": self.full.as_json(), "expected_stops": self.expected.as_json(),
                "lengths": lengths, "unknown": self.unknown}


@dataclass
class SweepEstimate:
    name: str
    profile: DeviceProfile
    devices: float
    tasks: list[TaskEstimate]
    teachers: TaskEstimate | None
    total: TaskEstimate
    stopping: Stopping | None
    notes: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"sweep": self.name, "profile": self.profile.model_dump(mode="json"), "devices": self.devices,
                "tasks": [t.as_json() for t in self.tasks],
                "teacher_finetune": self.teachers.as_json() if self.teachers else None,
                "total": self.total.as_json(), "stopping": asdict(self.stopping) if self.stopping else None,
                "notes": self.notes}


@dataclass(frozen=True)
class Timed:
    """Work and device time of one trial config, or of one teacher pass for the logits cache, and
    how many trials it stands for (0 for a cache pass)."""

    task: str
    trials: float
    full: Work
    expected: Work
    seconds_full: float | None  # None: a shape is unknown
    seconds_expected: float | None
    devices: float  # devices one trial holds
    lengths: tuple[str, float, float]  # where row lengths come from, mean tokens a row, mean padded
    unknown: str | None

    def times(self, trials: float) -> Timed:
        return replace(self, trials=trials)


def time_work(plan: TrialPlan, trials: float, full: Work, expected: Work, profile: DeviceProfile,
              devices: float) -> Timed:
    t = plan.training
    width = max((s.hidden for s in (plan.teacher, plan.student) if s), default=1)
    rate = profile.rate(precision(t, profile), t.per_device_train_batch_size, width).tflops * 1e12
    lengths = (plan.size.train.source, mean_length(plan.size.train, t.max_seq_length),
               padded_length(plan.size.train, t.per_device_train_batch_size, t.max_seq_length, t.group_by_length))
    known = plan.unknown is None
    return Timed(plan.task, trials, full, expected, full.flops / rate if known else None,
                 expected.flops / rate if known else None, devices, lengths, plan.unknown)


def figures(timed: list[Timed], which: str, devices: float, concurrency: int | None) -> Figures:
    """Summed work and device-hours; wall-clock on `devices` devices: the longest of the packing
    bound, the longest trial and, with max_concurrent_trials, the trials in turn."""
    trials = sum(t.trials for t in timed)
    work = sum((getattr(t, which).scaled(t.trials or 1.0) for t in timed), Work())
    if any(t.unknown for t in timed):
        return Figures(trials, work, None, None)
    spent = [(t.trials or 1.0, getattr(t, f"seconds_{which}"), t) for t in timed]
    device_s = sum(n * s for n, s, _ in spent)
    bounds = [device_s / devices, max(t.seconds_full / t.devices for t in timed)]
    if concurrency:
        bounds.append(sum(n * s / t.devices for n, s, t in spent) / concurrency)
    return Figures(trials, work, device_s / 3600, max(bounds) / 3600)


def combined(name: str, timed: list[Timed], devices: float, concurrency: int | None) -> TaskEstimate:
    unknown = sorted({t.unknown for t in timed if t.unknown})
    lengths = list(dict.fromkeys(t.lengths for t in timed if t.trials))
    return TaskEstimate(name, figures(timed, "full", devices, concurrency),
                        figures(timed, "expected", devices, concurrency), lengths, unknown)


def cost_identity(cfg: RunConfig | PretrainConfig) -> str:
    """What a trial's cost depends on: its config but its folders, and its seed unless the seed
    draws a sample of the data."""
    exclude: dict[str, Any] = {"output_dir": True, "cache_dir": True}
    if cfg.training.max_train_samples is None and cfg.training.max_eval_samples is None:
        exclude["training"] = {"seed"}
    return cfg.model_dump_json(exclude=exclude)


def gpu_share(resources: Any) -> float:
    """A trial's GPUs, or share of one, as asked; `auto` (a share sized by memory) counts as one
    GPU: trials that share one also share its speed."""
    return 1.0 if resources.gpu == "auto" else float(resources.gpu)


def trial_devices(spec: SweepSpec, profile: DeviceProfile, training: TrainingConfig) -> float:
    """What one trial holds: its GPUs (or share of one) on a GPU profile, else a core per process."""
    if profile.unit == "GPU" and gpu_share(spec.resources) > 0:
        return gpu_share(spec.resources)
    return float(training.num_processes)


def estimate_sweep(spec: SweepSpec, configs: list[RunConfig | PretrainConfig], profile: DeviceProfile,
                   devices: float | None = None, known: dict[str, Shape] | None = None) -> SweepEstimate:
    """The cost of `spec`, whose representative trial configs (`preflight.validate`) each stand
    for trial_count / len(configs) trials. `known`: shapes of models no file describes yet (a
    study's stage-1 students)."""
    weight = spec.trial_count / len(configs)
    stopping = stopping_of(spec)
    timed: dict[str, Timed] = {}  # configs that cost alike (seeds, say) are counted once
    cache_passes: dict[tuple, Timed] = {}
    for cfg in configs:
        alike = cost_identity(cfg)
        if alike in timed:
            timed[alike] = timed[alike].times(timed[alike].trials + weight)
            continue
        plan, key = plan_trial(spec, cfg, known or {})
        full = plan.work_until(stopping.end(plan) if stopping else plan.prediction.steps)
        expected = stopping.expected(plan) if stopping else full
        held = trial_devices(spec, profile, cfg.training)
        timed[alike] = time_work(plan, weight, full, expected, profile, held)
        if key is not None and key not in cache_passes:
            cache_passes[key] = time_work(plan, 0.0, plan.cache_pass(), plan.cache_pass(), profile, held)
    devices = devices or max(1.0, math.ceil(max(t.devices for t in timed.values())))
    everything = [*timed.values(), *cache_passes.values()]
    by_task: dict[str, list[Timed]] = defaultdict(list)
    for entry in everything:
        by_task[entry.task].append(entry)
    tasks = [combined(task, entries, devices, spec.max_concurrent_trials) for task, entries in by_task.items()]
    total = combined("total", everything, devices, spec.max_concurrent_trials)
    total.lengths = []
    teachers = teacher_estimate(spec, configs, profile, devices)
    if teachers is not None:
        total = with_teachers(total, teachers)
    return SweepEstimate(spec.name, profile, devices, tasks, teachers, total, stopping,
                         notes(spec, stopping, cache_passes))


def with_teachers(total: TaskEstimate, teachers: TaskEstimate) -> TaskEstimate:
    """The sweep's total with its teachers fine-tuned first (they train before any trial starts)."""
    full, expected = add_figures(total.full, teachers.full), add_figures(total.expected, teachers.expected)
    full.trials, expected.trials = total.full.trials, total.expected.trials
    return TaskEstimate("total", full, expected, [], sorted({*total.unknown, *teachers.unknown}))


def teacher_estimate(spec: SweepSpec, configs: list[Any], profile: DeviceProfile, devices: float) -> TaskEstimate | None:
    """Fine-tuning one teacher per task (`teacher_finetune`): a one-stage run of the base model on
    the task, as trainables.teacher trains it, on the GPUs `prepare_teachers` gives it."""
    requests = teacher_requests(spec, configs) if spec.run == "distill" else {}
    if not requests:
        return None
    held = float(max(1, math.ceil(gpu_share(spec.resources)))) if profile.unit == "GPU" else 1.0
    timed = []
    for request in requests.values():
        cfg = RunConfig(task=request.task, teacher=None, objectives=[], training=request.training,
                        student={"init": {"pretrained": request.base_model}})
        plan, _ = plan_trial(spec, cfg, {})
        work = plan.work_until(plan.prediction.steps)
        timed.append(time_work(plan, 1.0, work, work, profile, held))
    teachers = combined("teachers", timed, devices, None)
    teachers.lengths = []
    return teachers


def notes(spec: SweepSpec, stopping: Stopping | None, cache_passes: dict[tuple, Timed]) -> list[str]:
    out = []
    if spec.run == "pretrain":
        out.append("evaluation on held-out text not counted: its size is known only once the corpus is cut")
    if cache_passes:
        out.append(f"teacher logits cached: {len(cache_passes)} teacher pass(es) over a training split serve "
                   "the stages that read only logits")
    if stopping is not None and stopping.time_attr == "time_total_s":
        out.append("scheduler.time_attr time_total_s: stops in seconds are not estimated (none counted)")
    if spec.scheduler.type == "pbt":
        out.append("pbt: every trial trains its whole budget")
    return out


# --- a study: two sweeps, one after the other ----------------------------------------------------

STAGE_ONE_STUDENT = "models:/stage-1-student/"  # stand-ins for the students stage 1 registers


@dataclass
class StudyEstimate:
    name: str
    distill: SweepEstimate
    finetune: SweepEstimate  # one fine-tuning grid per stage-1 student
    total: TaskEstimate

    def as_json(self) -> dict[str, Any]:
        return {"study": self.name, "stages": {"distill": self.distill.as_json(), "finetune": self.finetune.as_json()},
                "total": self.total.as_json()}


def trial_configs(spec: SweepSpec) -> list[RunConfig | PretrainConfig]:
    """The representative trial configs `preflight.validate` checks, resolved without its checks."""
    from orchestrator.preflight import representative_assignments
    from orchestrator.trials import TrialTemplate

    template = TrialTemplate(spec.base, spec.per_task, kind=spec.run)
    return [template.resolve(assignment) for assignment in representative_assignments(spec)]


def estimate_study(spec: StudySpec, profile: DeviceProfile, devices: float | None = None) -> StudyEstimate:
    """Stage 1 distils its students; stage 2 fine-tunes each of them over its grid, so its students'
    shape is stage 1's student (known where every stage-1 trial makes the same one)."""
    distill_spec = spec.stage("distill")
    distill_configs = trial_configs(distill_spec)
    distill = estimate_sweep(distill_spec, distill_configs, profile, devices)
    shapes = {student_shape(cfg, shape_of(teacher_source(distill_spec, cfg)), {}) for cfg in distill_configs}
    students = [f"{STAGE_ONE_STUDENT}{i}" for i in range(1, distill_spec.trial_count + 1)]
    known = dict.fromkeys(students, shapes.pop()) if len(shapes) == 1 and None not in shapes else {}
    finetune_spec = spec.stage("finetune", students)
    finetune = estimate_sweep(finetune_spec, trial_configs(finetune_spec), profile, devices, known)
    total = TaskEstimate("total", add_figures(distill.total.full, finetune.total.full),
                         add_figures(distill.total.expected, finetune.total.expected), [],
                         sorted({*distill.total.unknown, *finetune.total.unknown}))
    return StudyEstimate(spec.name, distill, finetune, total)


def add_figures(a: Figures, b: Figures) -> Figures:
    """Two phases one after the other: work, hours and wall-clock add up."""
    hours = None if a.device_hours is None or b.device_hours is None else a.device_hours + b.device_hours
    wall = None if a.wall_hours is None or b.wall_hours is None else a.wall_hours + b.wall_hours
    return Figures(a.trials + b.trials, a.work + b.work, hours, wall)
