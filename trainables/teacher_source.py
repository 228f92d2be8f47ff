"""The teacher as the loop sees it: the live model, or its logits read from the shared cache.

Chosen here, in `teacher_source`, from what each stage's objectives declare they read
(`objectives.Reads`): a stage that reads nothing but the teacher's logits is served from
`TeacherLogitsCache` when the run allows the cache and the teacher is deterministic (no dropout);
every other stage runs the teacher live, with the Q/K/V hooks only where an objective reads
attention or the projections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from transformers import PreTrainedModel

from trainables.compile import StepCompiler
from trainables.config import FidelityConfig, TrainingConfig
from trainables.data import TaskData
from trainables.distiller import StagePlan
from trainables.models import forward_view
from trainables.teacher_cache import TeacherLogitsCache, teacher_identity
from trainables.views import ModelView

log = logging.getLogger(__name__)


class LiveTeacher:
    """The teacher model, placed on the run's device, frozen, in eval mode unless dropout is kept."""

    def __init__(self, model: PreTrainedModel, accelerator: Accelerator, dropout: bool) -> None:
        self.model = accelerator.prepare_model(model, evaluation_mode=True)
        self.model.train(dropout)
        self.model.requires_grad_(False)
        # With training.compile: a compiled wrapper over the same weights, for the batches the loop compiles.
        self.compiled: nn.Module | None = None

    def view(self, batch: dict[str, Tensor], stage: StagePlan, compiled: bool = False) -> ModelView:
        model = self.compiled if compiled and self.compiled is not None else self.model
        return forward_view(model, batch, need_qkv=stage.needs_qkv)


class CachedLogits:
    """The teacher's logits by the batch's `example_id`, loaded (or built) at the first batch that asks."""

    def __init__(
        self, cache: TeacherLogitsCache, live: LiveTeacher, data: TaskData, training: TrainingConfig,
        accelerator: Accelerator,
    ) -> None:
        self.cache = cache
        self.live = live
        self.data = data
        self.training = training
        self.accelerator = accelerator
        self._logits: Tensor | None = None

    def view(self, batch: dict[str, Tensor]) -> ModelView:
        if self._logits is None:
            logits = self.cache.logits(self.live.model, self.data, self.training, self.accelerator)
            self._logits = logits.to(self.accelerator.device)
        ids = batch["example_id"].to(self._logits.device).long()
        return ModelView(logits=self._logits.index_select(0, ids))


@dataclass(frozen=True)
class TeacherSource:
    """What the loop asks for the teacher's view of a batch; None where the stage reads nothing of it."""

    live: LiveTeacher | None
    cached: CachedLogits | None = None

    @torch.no_grad()
    def view(self, batch: dict[str, Tensor], stage: StagePlan, compiled: bool = False) -> ModelView | None:
        """`compiled`: through the live teacher's compiled forward (the batch is one the loop compiles)."""
        if not stage.needs_teacher or self.live is None:
            return None
        if self.cached is not None and stage.reads_only_logits:
            return self.cached.view(batch)
        return self.live.view(batch, stage, compiled)

    def compile(self, compiler: StepCompiler) -> None:
        """Give the live teacher a compiled forward; the logit cache and evaluation keep the eager one."""
        if self.live is not None:
            self.live.compiled = compiler.compile(self.live.model)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.live.model.parameters()) if self.live is not None else 0


def teacher_source(
    teacher: PreTrainedModel | None,
    stages: list[StagePlan],
    data: TaskData,
    training: TrainingConfig,
    fidelity: FidelityConfig,
    cache_dir: Path | None,
    accelerator: Accelerator,
) -> TeacherSource:
    """The live teacher, plus cached logits when some stage reads only logits and the cache may serve it."""
    if teacher is None:
        return TeacherSource(None)
    live = LiveTeacher(teacher, accelerator, fidelity.teacher_dropout)
    wanted = training.teacher_logits_cache and not fidelity.teacher_dropout
    if not wanted or not any(stage.reads_only_logits for stage in stages):
        return TeacherSource(live)
    reason = None
    if "example_id" not in data.train.column_names:
        reason = "the training split has no example_id"
    elif teacher_identity(teacher) is None:
        reason = "the teacher has no name_or_path to key the file by"
    if reason is not None:
        log.warning("teacher logits not cached: %s", reason)
        return TeacherSource(live)
    return TeacherSource(live, CachedLogits(TeacherLogitsCache(cache_dir), live, data, training, accelerator))
