"""What a sweep will cost, before it starts: examples, tokens, FLOPs, device-hours, wall-clock.

`distillsweep sweep FILE --dry-run` and `study FILE --dry-run` print it per task and in total, so
that a cluster is booked from the grid's cost rather than a guess (rendered by
orchestrator.cost_table). Each trial's work is counted by orchestrator.cost_flops (FLOPs, per
trial) from orchestrator.cost_lengths (rows and padded tokens); schedulers' expected stops come
from orchestrator.cost_stopping. Fine-tuning the sweep's teachers (`teacher_finetune`) is counted
apart.

**Time**: FLOPs divided by the achieved rate of the device profile's entry nearest the run's
precision, batch and width (`orchestrator.device_profiles`). Compute only: loading, checkpoints
and Ray's per-trial overhead (0.08 s with reused workers, BENCHMARKS.md 5) are not counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from orchestrator.config import GPU_AUTO, SweepSpec
from orchestrator.cost_flops import TrialPlan, Work, plan_trial, student_of
from orchestrator.cost_lengths import mean_length, padded_length
from orchestrator.cost_stages import precision
from orchestrator.cost_stopping import Stopping, stopping_of
from orchestrator.device_profiles import DeviceProfile
from orchestrator.gpu_memory import representative_configs
from orchestrator.model_shapes import Architecture, architecture_or_none
from orchestrator.teachers import teacher_source, teacher_tasks
from trainables.config import PretrainConfig, RunConfig, TrainingConfig

if TYPE_CHECKING:
    from orchestrator.study import StudySpec

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
    rate = profile.rate(precision(t, profile.auto_precision), t.per_device_train_batch_size, width).tflops * 1e12
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


def gpus_per_trial(resources: Any) -> float:
    """A trial's GPUs, or share of one, as asked; `auto` (a share sized by memory) counts as one
    GPU: trials that share one also share its speed."""
    return 1.0 if resources.gpu == GPU_AUTO else float(resources.gpu)


def trial_devices(spec: SweepSpec, profile: DeviceProfile, training: TrainingConfig) -> float:
    """What one trial holds: its GPUs (or share of one) on a GPU profile, else a core per process."""
    if profile.unit == "GPU" and gpus_per_trial(spec.resources) > 0:
        return gpus_per_trial(spec.resources)
    return float(training.num_processes)


def estimate_sweep(spec: SweepSpec, configs: list[RunConfig | PretrainConfig], profile: DeviceProfile,
                   devices: float | None = None, known: dict[str, Architecture] | None = None) -> SweepEstimate:
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
    tasks = teacher_tasks(spec, configs) if spec.run == "distill" else {}
    if not tasks:
        return None
    held = float(max(1, math.ceil(gpus_per_trial(spec.resources)))) if profile.unit == "GPU" else 1.0
    timed = []
    for name, task in tasks.items():
        recipe = spec.teacher_finetune.for_task(name)
        cfg = RunConfig(task=task, teacher=None, objectives=[], training=recipe.training,
                        student={"init": {"pretrained": recipe.base_model}})
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


@dataclass
class StudyEstimate:
    name: str
    distill: SweepEstimate
    finetune: SweepEstimate  # one fine-tuning grid per stage-1 student
    total: TaskEstimate

    def as_json(self) -> dict[str, Any]:
        return {"study": self.name, "stages": {"distill": self.distill.as_json(), "finetune": self.finetune.as_json()},
                "total": self.total.as_json()}


def stage_one_students(spec: StudySpec) -> tuple[list[str], dict[str, Architecture]]:
    """Stand-ins for the students stage 1 registers, one per stage-1 trial, and their shape: stage
    1's student, known where every stage-1 trial makes the same one (else none is known)."""
    from orchestrator.study import placeholder_students

    distill = spec.stage("distill")
    shapes = {student_of(cfg, architecture_or_none(teacher_source(distill, cfg)), {})
              for cfg in representative_configs(distill)}
    students = placeholder_students(spec)
    return students, dict.fromkeys(students, shapes.pop()) if len(shapes) == 1 and None not in shapes else {}


def estimate_study(spec: StudySpec, profile: DeviceProfile, devices: float | None = None) -> StudyEstimate:
    """Stage 1 distils its students; stage 2 fine-tunes each of them over its grid."""
    distill_spec = spec.stage("distill")
    distill = estimate_sweep(distill_spec, representative_configs(distill_spec), profile, devices)
    students, known = stage_one_students(spec)
    finetune_spec = spec.stage("finetune", students)
    finetune = estimate_sweep(finetune_spec, representative_configs(finetune_spec), profile, devices, known)
    total = TaskEstimate("total", add_figures(distill.total.full, finetune.total.full),
                         add_figures(distill.total.expected, finetune.total.expected), [],
                         sorted({*distill.total.unknown, *finetune.total.unknown}))
    return StudyEstimate(spec.name, distill, finetune, total)


def add_figures(a: Figures, b: Figures) -> Figures:
    """Two phases one after the other: work, hours and wall-clock add up."""
    hours = None if a.device_hours is None or b.device_hours is None else a.device_hours + b.device_hours
    wall = None if a.wall_hours is None or b.wall_hours is None else a.wall_hours + b.wall_hours
    return Figures(a.trials + b.trials, a.work + b.work, hours, wall)
