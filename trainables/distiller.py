"""The student plus the trainable parts of its objectives, computing the weighted loss mix.

One `nn.Module` owns everything the optimiser updates (student weights, projections, CRD heads
and memory banks), so a single state dict checkpoints it and data-parallel wrapping covers it.
The teacher is not a submodule: it is never optimised, saved with the student, or wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.objectives import REGISTRY, ModuleContext, Objective, Reads, Stage
from trainables.views import DistillBatch, LayerPairs, ModelView

if TYPE_CHECKING:  # the dry run imports this module for stage planning, not transformers' model code
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Term:
    """One weighted objective of the mix, with its validated parameters."""

    objective: Objective
    weight: float
    params: Any

    @property
    def name(self) -> str:
        return self.objective.name


@dataclass(frozen=True)
class StagePlan:
    """The loss of one training stage: which terms, the weight of the student's own loss (cross-entropy,
    or MLM in pre-training), and how long it trains.

    steps: optimiser steps; None takes the whole budget (each stage of the study's task-specific
    runs trains its full epochs). continues: the stage keeps the optimiser, learning-rate schedule and
    place in the data of the stage before (the study's task-agnostic two-stage run switches its loss
    mid-run); otherwise it starts them afresh, as the study's task-specific stage 2 did.
    """

    name: str
    terms: tuple[Term, ...]
    ce_weight: float
    steps: int | None = None
    continues: bool = False

    @property
    def reads(self) -> frozenset[Reads]:
        """What the stage's objectives read, together."""
        return frozenset().union(*(t.objective.reads for t in self.terms))

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)

    @property
    def needs_qkv(self) -> bool:
        return any(t.objective.needs_qkv for t in self.terms)

    @property
    def reads_only_logits(self) -> bool:
        """Whether the teacher's logits are all the stage reads of the teacher, so cached logits can stand in."""
        return self.reads - {Reads.LABELS} == {Reads.LOGITS}


def make_terms(specs: list[Any]) -> list[Term]:
    """Registry objectives with their validated parameters, from config `ObjectiveSpec`s."""
    return [Term(REGISTRY[o.name], o.weight, REGISTRY[o.name].parse_params(o.params)) for o in specs]


def build_modules(terms: list[Term], context: ModuleContext) -> dict[str, nn.Module]:
    """The trainable modules the terms own (projections, CRD heads and memory banks)."""
    modules = {}
    for term in terms:
        if term.objective.build_module is not None:
            module = term.objective.build_module(context, term.params)
            if module is not None:
                modules[term.name] = module
    return modules


def pretrain_stages(terms: list[Term], mlm_weight: float, max_steps: int) -> list[StagePlan]:
    """One pre-training stage, or, when an objective trains on the student's own loss first
    (att_val_two_stage), the study's two halves of the budget: MLM alone, then the mix."""
    if not any(t.objective.own_loss_first for t in terms):
        return [StagePlan("pretrain", tuple(terms), mlm_weight)]
    first = max_steps // 2
    return [
        StagePlan("mlm", (), 1.0, steps=first),
        StagePlan("pretrain", tuple(terms), mlm_weight, steps=max_steps - first, continues=True),
    ]


def plan_stages(terms: list[Term], ce_weight: float, two_stage: bool) -> list[StagePlan]:
    """One stage with every term, or the study's two: intermediate layers, then prediction layer."""
    if not two_stage:
        return [StagePlan("train", tuple(terms), ce_weight)]
    intermediate = tuple(t for t in terms if t.objective.stage is Stage.INTERMEDIATE)
    prediction = tuple(t for t in terms if t.objective.stage is Stage.PREDICTION)
    return [StagePlan("intermediate", intermediate, 0.0), StagePlan("prediction", prediction, ce_weight)]


class Distiller(nn.Module):
    """Student forward and the loss mix for one batch."""

    def __init__(
        self,
        student: PreTrainedModel,
        objective_modules: dict[str, nn.Module],
        pairs: LayerPairs,
        count_padding: bool,
        ild_scale_by_batch: bool,
        *,
        crd_without_replacement: bool = False,
        minilm_v2_last_pair: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.objective_modules = nn.ModuleDict(objective_modules)
        self.pairs = pairs
        self.count_padding = count_padding
        self.ild_scale_by_batch = ild_scale_by_batch
        self.crd_without_replacement = crd_without_replacement
        self.minilm_v2_last_pair = minilm_v2_last_pair

    def forward(
        self, batch: dict[str, Tensor], teacher_view: ModelView | None, stage: StagePlan
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and each term's unweighted value (for reporting)."""
        from trainables.models import forward_view

        student_view = forward_view(self.student, batch, need_qkv=stage.needs_qkv)
        labels = batch.get("labels")
        values: dict[str, Tensor] = {}
        total = student_view.logits.new_zeros((), dtype=torch.float32)
        if stage.ce_weight > 0:
            values["ce"] = task_loss(student_view.logits, labels)
            total = total + stage.ce_weight * values["ce"]
        if stage.terms:
            distill_batch = DistillBatch(
                student=student_view,
                teacher=teacher_view,
                attention_mask=batch["attention_mask"],
                labels=labels,
                example_ids=batch.get("example_id"),
                pairs=self.pairs,
                count_padding=self.count_padding,
                crd_without_replacement=self.crd_without_replacement,
                minilm_v2_last_pair=self.minilm_v2_last_pair,
            )
            batch_size = batch["input_ids"].shape[0]
            # Objectives compute in float32 even under mixed precision: softmaxes and KL of
            # attention maps lose too much in bf16/fp16.
            with torch.autocast(student_view.logits.device.type, enabled=False):
                for term in stage.terms:
                    module = self.objective_modules[term.name] if term.name in self.objective_modules else None
                    values[term.name] = term.objective.compute(distill_batch, term.params, module)
                    weight = term.weight
                    if self.ild_scale_by_batch and term.objective.stage is Stage.INTERMEDIATE:
                        weight = weight / batch_size
                    total = total + weight * values[term.name]
        return total, values

    def unreached_parameters(
        self, batch: dict[str, Tensor], teacher_view: ModelView | None, stage: StagePlan
    ) -> set[str]:
        """Names of the trainable parameters that `stage`'s loss does not depend on.

        Autograd decides from one batch: what the loss reaches follows from the stage's terms, the
        layer pairs and the architecture, not from the data. Buffers the forward moves (CRD's
        memory banks) are put back, so the probe leaves no trace.
        """
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        buffers = {n: b.clone() for n, b in self.named_buffers()}
        loss, _ = self(batch, teacher_view, stage)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for n, b in self.named_buffers():
                b.copy_(buffers[n])
        return {n for (n, _), g in zip(named, grads) if g is None}


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy for classification, MSE for a single-output regression head, and masked-LM
    cross-entropy over the masked tokens (labels -100 elsewhere) for [B, T, V] logits."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)
