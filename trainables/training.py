"""The optimisation loop: stages, evaluation, checkpoints and exact resume.

Built on Accelerate (device placement, mixed precision, data parallelism, gradient sync) with the
step itself written out, so what happens in a step is visible in the step. Resume is exact: data
order is a pure function of (seed, epoch), and checkpoints hold weights, optimiser, scheduler,
the fp16 loss scale, RNG states and the position in the epoch.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, get_scheduler

from trainables.compile import StepCompiler, bucketed, step_compiler
from trainables.config import TrainingConfig
from trainables.data import TaskData
from trainables.errors import DIVERGED_MESSAGE, NonFiniteLossError, TrialOutOfMemoryError
from trainables.distiller import Distiller, StagePlan, task_loss
from trainables.models import forward_view
from trainables.teacher_source import TeacherSource

Reporter = Callable[[dict[str, float], Path | None], None]
StepCallback = Callable[[int, int], None]
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_PROGRESS = "progress.json"
BEST_STUDENT = "best_student.pt"  # weights only, for `load_best_model_at_end`
STEP_FOLDER = re.compile(r"^step-\d{7}$")  # a checkpoint folder's name; pruning touches no other folder


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    examples_seen: int = 0
    best_score: float | None = None


class CheckpointFormatError(ValueError):
    """A checkpoint file this version will not load: it needs more than tensors and plain data."""


def load_tensors(path: Path) -> Any:
    """`torch.load` of tensors and plain data only: a pickle naming any other object is refused, never run.

    Checkpoints come back from storage others may write (Tune's bucket, a shared mount, a folder
    handed over to resume from), and unpickling runs whatever code the file names.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        raise not_our_checkpoint(path) from None


def read_checkpoint(path: Path) -> tuple[Progress, dict[str, Any]]:
    """A checkpoint folder's progress and state; CheckpointFormatError where either is not as this version writes."""
    try:
        progress = Progress(**json.loads((path / CHECKPOINT_PROGRESS).read_text()))
    except (TypeError, ValueError):
        raise not_our_checkpoint(path / CHECKPOINT_PROGRESS) from None
    state = load_tensors(path / CHECKPOINT_STATE)
    parts = {"distiller", "optimizer", "scheduler", "rng"}
    rng = state.get("rng") if isinstance(state, dict) else None
    if not (isinstance(rng, dict) and parts <= state.keys() and isinstance(rng.get("numpy"), dict)):
        raise not_our_checkpoint(path / CHECKPOINT_STATE)
    return progress, state


def not_our_checkpoint(path: Path) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path}: not loaded: it was written by an older distillsweep (whose checkpoints held pickled "
        "objects) or is not a distillsweep checkpoint; resume from a checkpoint this version wrote, "
        "or start the run again without resuming"
    )


@dataclass(frozen=True)
class RunOutputs:
    """Where the loop puts what it makes, and who hears of it.

    directory: checkpoints (the last `keep_checkpoints`) and the best student's weights.
    reporter: receives every evaluation's metrics (reported.LOOP_METRICS and the per-term and per-metric
    names) with the checkpoint saved with them; on_step: (global step, total steps) after each step.
    export_student: saves a loadable student to a path: into the final checkpoint, and at
    `snapshot_steps` under directory/students/ (pre-training keeps students along its budget).
    """

    directory: Path
    reporter: Reporter | None = None
    on_step: StepCallback | None = None
    keep_checkpoints: int = 2
    export_student: Callable[[Path], None] | None = None
    snapshot_steps: frozenset[int] = frozenset()


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The epoch's batches of example indices, reproducible from (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        # Sort within mega-batches of 50 batches: batches of similar length, order still random.
        mega = batch_size * 50
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda k: -lengths[k])
        ]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def rows(dataset: Dataset, indices: list[int]) -> list[dict[str, Any]]:
    """Examples by index through one columnar read (row-by-row access is much slower)."""
    columns = dataset[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain numbers: what `torch.load(weights_only=True)` reads back."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")
FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda"})
PROBE_EXAMPLES = 2  # what a stage's loss reaches does not depend on the batch


def param_groups(model: torch.nn.Module, weight_decay: float, names: set[str] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters (those named, else those requiring grad) in a decayed group and a no-decay
    group (biases, LayerNorm weights)."""
    named = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if names is None else n in names)]
    return [
        {"params": [p for n, p in named if not n.endswith(NO_DECAY)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
    ]


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """`fused=True` where torch has a fused AdamW kernel for every parameter.

    The fused kernel makes one pass over memory instead of a dozen: on the bench student (17 M
    parameters, one CPU thread) the optimiser step drops from 117 ms to 23 ms (bench/step_profile).
    """
    fusable = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if params and fusable else {}


class DistillationLoop:
    """Trains a `Distiller` through its stages, evaluating and checkpointing every `eval_steps` or epoch."""

    def __init__(
        self,
        distiller: Distiller,
        teacher: TeacherSource,
        stages: list[StagePlan],
        data: TaskData,
        training: TrainingConfig,
        accelerator: Accelerator,
        outputs: RunOutputs,
    ) -> None:
        self.teacher = teacher
        self.training = training
        self.stages = stages
        self.data = data
        self.outputs = outputs
        self.output_dir = outputs.directory
        self.accelerator = accelerator
        self.progress = Progress()
        # This run's checkpoint folders, oldest first: the only ones pruning may delete.
        self._checkpoints: list[Path] = []
        # fp16 on a GPU: Accelerate's GradScaler, stepped here (_optimizer_step); None otherwise.
        self.scaler = accelerator.scaler
        # Placement and mixed precision here; the data-parallel wrapper is built per stage, over the
        # parameters that stage trains (_start_stage).
        self.distiller = accelerator.prepare_model(distiller, evaluation_mode=True)
        self._trainable = {n for n, p in distiller.named_parameters() if p.requires_grad}
        self._lengths = [len(ids) for ids in data.train["input_ids"]]
        # A second objective for multi-objective searches (accuracy against size): the student model's
        # own weights, not the projections or CRD heads the objectives train alongside it.
        self.student_parameters = sum(p.numel() for p in distiller.student.parameters())
        self.compiler = self._set_up_compile(distiller)
        self._start_stage()

    # --- schedule ----------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        t = self.training
        return t.per_device_train_batch_size * self.accelerator.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self._lengths) / self.global_batch)

    @property
    def steps_per_stage(self) -> int:
        """The training budget: what a stage of no set length trains."""
        t = self.training
        if t.max_steps > 0:
            return t.max_steps
        return max(1, math.ceil(t.num_train_epochs * self.micro_batches_per_epoch / t.gradient_accumulation_steps))

    def stage_steps(self, index: int) -> int:
        steps = self.stages[index].steps
        return self.steps_per_stage if steps is None else steps

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps(i) for i in range(len(self.stages)))

    def _schedule_stages(self) -> range:
        """The current stage with those it continues and those that continue it: one optimiser and
        one learning-rate schedule run through them."""
        first = last = self.progress.stage_index
        while first > 0 and self.stages[first].continues:
            first -= 1
        while last + 1 < len(self.stages) and self.stages[last + 1].continues:
            last += 1
        return range(first, last + 1)

    def _start_stage(self, new_optimizer: bool = True) -> None:
        """The current stage's trainable parameters, data-parallel wrapper and (unless it continues the
        stage before) a new optimiser and schedule."""
        if self.accelerator.use_distributed:
            self._train_only_reached(self.stages[self.progress.stage_index])
            module = self.accelerator.unwrap_model(self.distiller)
            device_ids = [self.accelerator.device.index] if self.accelerator.device.type == "cuda" else None
            self.distiller = DistributedDataParallel(module, device_ids=device_ids)
        self._compiled = self.compiler.compile(self.distiller) if self.compiler is not None else None
        if new_optimizer:
            self._build_optimizer()

    def _set_up_compile(self, distiller: Distiller) -> StepCompiler | None:
        """With `training.compile` on here: training batches padded to length buckets and the live
        teacher's forward compiled (the step is compiled per stage, in _start_stage); None otherwise."""
        t = self.training
        compiler = step_compiler(t.compile, self.accelerator.device, t.max_seq_length, t.per_device_train_batch_size,
                                 len(self.stages), distiller.count_padding)
        self._collate_train = self.data.collate if compiler is None else bucketed(self.data.collate, compiler.buckets)
        if compiler is not None:
            self.teacher.compile(compiler)
        return compiler

    def _train_only_reached(self, stage: StagePlan) -> None:
        """Freeze the parameters `stage`'s loss does not reach, as every process agrees.

        DDP all-reduces every parameter it holds and fails at the second step when one got no
        gradient: attention objectives on the top layer without MLM, say, leave the LM head and
        that layer's value and feed-forward weights out of the loss. Every process probes the same
        stage, so all find the same set; a parameter any of them reached is trained. A later stage
        that reaches a frozen parameter trains it again. One process needs none of this: AdamW and
        clipping skip a parameter without a gradient.
        """
        module = self.accelerator.unwrap_model(self.distiller)
        named = [(n, p) for n, p in module.named_parameters() if n in self._trainable]
        for _, p in named:
            p.requires_grad_(True)
        unreached = self._probe_unreached(module, stage)
        reached = torch.tensor([float(n not in unreached) for n, _ in named], device=self.accelerator.device)
        for (_, p), count in zip(named, self.accelerator.reduce(reached, "sum").tolist()):
            p.requires_grad_(count > 0)

    def _probe_unreached(self, module: Distiller, stage: StagePlan) -> set[str]:
        """`Distiller.unreached_parameters` on the first training examples, leaving the RNGs as they were."""
        state = rng_state()
        try:
            batch = self.data.collate(rows(self.data.train, list(range(min(PROBE_EXAMPLES, len(self._lengths))))))
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            module.train()
            return module.unreached_parameters(batch, self.teacher.view(batch, stage), stage)
        finally:
            set_rng_state(state)

    def _build_optimizer(self) -> None:
        """A fresh AdamW and schedule per stage, as the study resets them between task-specific stages;
        one for a stage and the stages that continue it.

        It holds every trainable parameter, also those a stage's loss does not reach (frozen while
        several processes train): AdamW skips a parameter without a gradient, and the optimiser a
        continuing stage keeps, or resumes from a checkpoint, has the same parameters in every stage.
        """
        t = self.training
        groups = param_groups(self.accelerator.unwrap_model(self.distiller), t.weight_decay, self._trainable)
        self.optimizer = torch.optim.AdamW(
            groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            **adamw_implementation([p for g in groups for p in g["params"]]),
        )
        total = sum(self.stage_steps(i) for i in self._schedule_stages())
        self.scheduler = get_scheduler(
            t.lr_scheduler_type, self.optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total),
            num_training_steps=total,
        )

    # --- the loop ----------------------------------------------------------------------------

    def run(self, resume_from: Path | None = None) -> dict[str, float]:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            (self.output_dir / BEST_STUDENT).unlink(missing_ok=True)  # an earlier run's, in the same folder
        metrics: dict[str, float] = {}
        while self.progress.stage_index < len(self.stages):
            stage = self.stages[self.progress.stage_index]
            metrics = self._train_stage(stage)
            self.progress.stage_index += 1
            self.progress.stage_step = 0
            if self.progress.stage_index < len(self.stages):
                continues = self.stages[self.progress.stage_index].continues
                if not continues:
                    self.progress.epoch = 0
                    self.progress.batches_in_epoch = 0
                self._start_stage(new_optimizer=not continues)
        return metrics or self.evaluate(self.stages[-1])

    def _micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position onwards, for this process, forever (epoch by epoch)."""
        t = self.training
        while True:
            batches = epoch_batches(self._lengths, self.global_batch, t.seed, self.progress.epoch, t.group_by_length)
            for index in range(self.progress.batches_in_epoch, len(batches)):
                shard = batches[index][self.accelerator.process_index :: self.accelerator.num_processes]
                self.progress.batches_in_epoch = index + 1
                self.progress.examples_seen += len(batches[index])
                batch = self._collate_train(rows(self.data.train, shard))
                yield {k: v.to(self.accelerator.device) for k, v in batch.items()}
            self.progress.epoch += 1
            self.progress.batches_in_epoch = 0

    def _train_stage(self, stage: StagePlan) -> dict[str, float]:
        t = self.training
        total_steps = self.stage_steps(self.progress.stage_index)
        eval_now: dict[str, float] = {}
        sums: dict[str, torch.Tensor] = {}
        window_start, window_examples, window_steps = time.perf_counter(), self.progress.examples_seen, 0
        batches = self._micro_batches()
        self.distiller.train()
        while self.progress.stage_step < total_steps:
            for micro in range(t.gradient_accumulation_steps):
                batch = next(batches)
                try:
                    loss, terms = self._forward_backward(batch, stage, sync=micro == t.gradient_accumulation_steps - 1)
                except torch.OutOfMemoryError as err:
                    raise self._out_of_memory(batch) from err
                for name, value in {"loss": loss, **terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / t.gradient_accumulation_steps
            self._optimizer_step()
            self.progress.stage_step += 1
            self.progress.global_step += 1
            window_steps += 1
            if self.outputs.on_step is not None:
                self.outputs.on_step(self.progress.global_step, self.total_steps)
            if self.progress.global_step in self.outputs.snapshot_steps and self.outputs.export_student is not None:
                if self.accelerator.is_main_process:
                    self.outputs.export_student(self.output_dir / "students" / f"step-{self.progress.global_step:07d}")
            at_end = self.progress.stage_step == total_steps
            if self._evaluation_due() or at_end:
                train_metrics = {f"train_{k}": (v / window_steps).item() for k, v in sums.items()}
                self._check_finite(train_metrics)
                elapsed = time.perf_counter() - window_start
                eval_now = {
                    **train_metrics,
                    **self.evaluate(stage),
                    "examples_per_second": (self.progress.examples_seen - window_examples) / max(elapsed, 1e-9),
                    "learning_rate": self.scheduler.get_last_lr()[0],
                }
                self._report(stage, eval_now, save=at_end or self._save_due())
                sums, window_steps = {}, 0
                window_start, window_examples = time.perf_counter(), self.progress.examples_seen
                self.distiller.train()
        return eval_now

    def _forward_backward(
        self, batch: dict[str, torch.Tensor], stage: StagePlan, sync: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch; gradients sync across processes only on the last of an accumulation. Through
        the compiled step where `training.compile` is on and the batch is full (StepCompiler.serves)."""
        context = nullcontext() if sync else self.accelerator.no_sync(self.distiller)
        compiled = self._compiled is not None and self.compiler.serves(batch)
        distiller = self._compiled if compiled else self.distiller
        with context, self.accelerator.autocast():
            loss, terms = distiller(batch, self.teacher.view(batch, stage, compiled), stage)
            scaled = loss / self.training.gradient_accumulation_steps
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        return loss, terms

    def _optimizer_step(self) -> None:
        """Clip and apply the accumulated gradients, advance the schedule, clear the gradients.

        Under fp16 the gradients carry the loss scale: they are unscaled before clipping; the
        scaler skips a step whose gradients hold inf or NaN and halves the scale (the schedule
        waits, as Accelerate's does), and grows the scale again after a run of clean steps.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), self.training.max_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
            self.scheduler.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() >= scale:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _out_of_memory(self, batch: dict[str, torch.Tensor]) -> TrialOutOfMemoryError:
        rows, length = batch["input_ids"].shape
        return TrialOutOfMemoryError(
            f"out of memory on {self.accelerator.device} at step {self.progress.global_step}: batch of {rows} "
            f"x {length} tokens (per_device_train_batch_size {self.training.per_device_train_batch_size}, "
            f"max_seq_length {self.training.max_seq_length}), student {self.student_parameters:,} "
            f"parameters, teacher {self.teacher.num_parameters:,}; lower per_device_train_batch_size and raise "
            "gradient_accumulation_steps, or give the trial a whole GPU"
        )

    def _evaluation_due(self) -> bool:
        """Every `eval_steps` steps, or (`eval_strategy: epoch`) at the step that ends an epoch of the stage.

        An epoch is `micro_batches_per_epoch` micro-batches, so with gradient accumulation it may end
        inside a step; that step evaluates. Epochs count from the stage's start (a stage that continues
        another's place in the data counts its epochs from where it took over).
        """
        if self.training.eval_strategy == "epoch":
            step = self.progress.stage_step
            return self._epochs_done(step) > self._epochs_done(step - 1)
        return self.progress.global_step % self.training.eval_steps == 0

    def _epochs_done(self, stage_step: int) -> int:
        return stage_step * self.training.gradient_accumulation_steps // self.micro_batches_per_epoch

    def _save_due(self) -> bool:
        if self.training.save_steps is not None:
            return self.progress.global_step % self.training.save_steps == 0
        return self._evaluation_due()

    def _check_finite(self, train_metrics: dict[str, float]) -> None:
        bad = {k: v for k, v in train_metrics.items() if not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k.removeprefix('train_')}={v}" for k, v in train_metrics.items())
            raise NonFiniteLossError(
                f"{DIVERGED_MESSAGE} by step {self.progress.global_step} "
                f"(learning_rate {self.training.learning_rate:g}; terms: {terms})"
            )

    # --- evaluation --------------------------------------------------------------------------

    def is_prediction_stage(self, stage: StagePlan) -> bool:
        """The last stage trains the prediction layer; before it, in a two-stage run, the classifier
        is untrained and its predictions say nothing about the student."""
        return stage is self.stages[-1]

    @torch.no_grad()
    def evaluate(self, stage: StagePlan | None = None) -> dict[str, float]:
        """Validation metrics for `stage`; `score` only where it means what it says.

        In the prediction stage `score` is the task's main metric (sharded over processes and
        gathered). Stage 1 of a two-stage run reports its own losses on the validation split
        (`eval_<term>`, `eval_intermediate_loss`) and no score. Without a task metric
        (pre-training on text) the score is minus the loss on the held-out blocks.
        """
        stage = stage or self.stages[min(self.progress.stage_index, len(self.stages) - 1)]
        if self.data.score is None:
            losses = self._evaluate_loss(stage)
            return {**losses, "score": -losses["eval_loss"]}
        if not self.is_prediction_stage(stage):
            losses = self._evaluate_loss(stage)
            return {"eval_intermediate_loss" if k == "eval_loss" else k: v for k, v in losses.items()}
        student = self.accelerator.unwrap_model(self.distiller).student
        student.eval()
        validation = self.data.validation
        size = self.training.per_device_eval_batch_size
        indices = list(range(self.accelerator.process_index, len(validation), self.accelerator.num_processes))
        logits, labels, losses = [], [], []
        loader = DataLoader(validation.select(indices), batch_size=size, collate_fn=self.data.collate)
        for batch in loader:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            with self.accelerator.autocast():
                out = forward_view(student, batch, need_qkv=False).logits.float()
            losses.append(task_loss(out, batch["labels"]).item() * len(out))
            logits.append(out.cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
        gathered = gather_object([(np.concatenate(logits), np.concatenate(labels), sum(losses))])
        all_logits = np.concatenate([g[0] for g in gathered])
        all_labels = np.concatenate([g[1] for g in gathered])
        metrics = {f"eval_{k}": float(v) for k, v in self.data.score(all_logits, all_labels).items()}
        metrics["eval_loss"] = sum(g[2] for g in gathered) / len(all_labels)
        metrics["score"] = metrics[f"eval_{self.data.main_metric}"]
        return metrics

    def _evaluate_loss(self, stage: StagePlan) -> dict[str, float]:
        """The stage's loss and each of its terms on the validation split."""
        distiller = self.accelerator.unwrap_model(self.distiller)
        distiller.eval()
        validation = self.data.validation
        indices = list(range(self.accelerator.process_index, len(validation), self.accelerator.num_processes))
        loader = DataLoader(
            validation.select(indices), batch_size=self.training.per_device_eval_batch_size,
            collate_fn=self.data.collate,
        )
        sums: dict[str, float] = {}
        count = 0
        for batch in loader:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            with self.accelerator.autocast():
                loss, terms = distiller(batch, self.teacher.view(batch, stage), stage)
            rows = len(batch["input_ids"])
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.item() * rows
            count += rows
        gathered = gather_object([(sums, count)])
        total = sum(g[1] for g in gathered)
        return {f"eval_{k}": sum(g[0].get(k, 0.0) for g in gathered) / total for k in sums}

    # --- reporting and checkpoints -----------------------------------------------------------

    def _report(self, stage: StagePlan, metrics: dict[str, float], save: bool) -> None:
        p = self.progress
        if "score" in metrics and (p.best_score is None or metrics["score"] > p.best_score):
            p.best_score = metrics["score"]
            if self.training.load_best_model_at_end and self.accelerator.is_main_process:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                torch.save(self._student().state_dict(), self.output_dir / BEST_STUDENT)
        metrics.update(
            step=p.global_step,
            stage=p.stage_index,
            total_steps=self.total_steps,
            epoch=p.epoch + p.batches_in_epoch / self.micro_batches_per_epoch,
            peak_memory_mb=peak_memory_mb(self.accelerator.device),
            student_parameters=self.student_parameters,
        )
        if self.is_prediction_stage(stage):
            # The schedulers' time axis: steps of the stage that trains the prediction layer, so
            # one- and two-stage trials are compared at equal training of what `score` measures.
            metrics.update(prediction_step=p.stage_step, best_score=p.best_score)
        checkpoint = self.save_checkpoint() if save else None
        last = p.stage_index == len(self.stages) - 1 and p.stage_step == self.stage_steps(p.stage_index)
        if last and self.training.load_best_model_at_end and self.accelerator.is_main_process:
            # After the final checkpoint (which resumes the last step), so only what is saved from here on is the best.
            self._student().load_state_dict(load_tensors(self.output_dir / BEST_STUDENT))
        export = self.outputs.export_student
        if checkpoint is not None and last and export is not None and self.accelerator.is_main_process:
            export(checkpoint / "student")  # the final checkpoint carries a loadable student
        if self.outputs.reporter is not None and self.accelerator.is_main_process:
            self.outputs.reporter(dict(metrics, stage_name=stage.name), checkpoint)

    def save_checkpoint(self) -> Path:
        path = self.output_dir / "checkpoints" / f"step-{self.progress.global_step:07d}"
        if self.accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            state = {
                "distiller": self.accelerator.unwrap_model(self.distiller).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
            }
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, path / CHECKPOINT_STATE)
            (path / CHECKPOINT_PROGRESS).write_text(json.dumps(asdict(self.progress)))
            if self.training.load_best_model_at_end and (self.output_dir / BEST_STUDENT).exists():
                shutil.copy2(self.output_dir / BEST_STUDENT, path / BEST_STUDENT)  # a resumed run keeps its best
            self._prune_checkpoints(keep=path)
        self.accelerator.wait_for_everyone()
        return path

    def _prune_checkpoints(self, keep: Path) -> None:
        """Delete this run's oldest checkpoints beyond `keep_checkpoints`; a folder it did not make
        (a user's `checkpoints/my-model-v1`, another run's) is never touched."""
        older = [p for p in self._checkpoints if p != keep]
        self._checkpoints = [*older, keep]
        for old in older[: max(0, len(older) - (self.outputs.keep_checkpoints - 1))]:
            shutil.rmtree(old, ignore_errors=True)
            self._checkpoints.remove(old)

    def _adopt_checkpoint(self, path: Path) -> None:
        """The checkpoint resumed from, when it sits among this run's own: the run continues it, so prunes it."""
        own = self.output_dir / "checkpoints"
        if path.resolve().parent == own.resolve() and STEP_FOLDER.match(path.name):
            self._checkpoints.append(own / path.name)

    def load_checkpoint(self, path: Path) -> None:
        self.progress, state = read_checkpoint(path)
        self.accelerator.unwrap_model(self.distiller).load_state_dict(state["distiller"])
        self._start_stage()  # the optimiser of the checkpoint's stage, over that stage's parameters
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self._adopt_checkpoint(path)
        if (path / BEST_STUDENT).exists() and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path / BEST_STUDENT, self.output_dir / BEST_STUDENT)

    def _student(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.distiller).student


