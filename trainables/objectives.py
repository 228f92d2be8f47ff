"""The registry of distillation objectives.

An objective is one function of a `DistillBatch` (student and teacher views, padding mask, layer
pairs), its validated parameters, and optionally a trainable module it owns (a projection, memory
banks). Adding one is one decorated function here plus its tests; nothing else changes.

Conventions, shared by every objective (shared/paper_spec.md sections 2-3):
- divergences are KL(teacher || student);
- terms over several layer pairs are summed, not averaged, as in the study's code;
- padded positions are excluded unless `count_padding` (the authors' behaviour) is set.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from trainables.views import DistillBatch


class Stage(enum.Enum):
    """Which stage of two-stage training an objective belongs to."""

    PREDICTION = "prediction"
    INTERMEDIATE = "intermediate"


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ModuleContext:
    """What an objective needs to know to build its trainable module."""

    student_hidden_size: int
    teacher_hidden_size: int
    student_layers: int
    teacher_layers: int
    num_train_examples: int
    train_labels: Tensor | None
    combine: bool


ComputeFn = Callable[[DistillBatch, Any, nn.Module | None], Tensor]
BuildFn = Callable[[ModuleContext, Any], nn.Module]


@dataclass(frozen=True)
class Objective:
    name: str
    compute: ComputeFn
    stage: Stage
    params_model: type[BaseModel]
    needs_qkv: bool
    needs_labels: bool
    matches_heads: bool
    build_module: BuildFn | None

    def parse_params(self, raw: dict[str, Any]) -> BaseModel:
        """Validate an objective's own parameters; errors name the objective."""
        try:
            return self.params_model.model_validate(raw)
        except Exception as err:  # pydantic's message lists the offending keys
            raise ValueError(f"objective {self.name!r}: {err}") from None


REGISTRY: dict[str, Objective] = {}


def objective(
    name: str,
    *,
    stage: Stage = Stage.INTERMEDIATE,
    params: type[BaseModel] = NoParams,
    needs_qkv: bool = False,
    needs_labels: bool = False,
    matches_heads: bool = False,
    module: BuildFn | None = None,
) -> Callable[[ComputeFn], ComputeFn]:
    """Register `fn` under `name`.

    needs_qkv: the views must carry per-layer queries/keys/values (hooks are installed only then).
    needs_labels: the objective reads gold labels (rejected for label-free pre-training).
    matches_heads: student and teacher heads are paired by index, so their counts must agree.
    """

    def register(fn: ComputeFn) -> ComputeFn:
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        REGISTRY[name] = Objective(
            name, fn, stage, params, needs_qkv, needs_labels, matches_heads, module
        )
        return fn

    return register


# --- logits -------------------------------------------------------------------------------------


class KDParams(NoParams):
    temperature: float = Field(default=2.0, gt=0.0)


@objective("kd", stage=Stage.PREDICTION, params=KDParams)
def kd(batch: DistillBatch, params: KDParams, module: nn.Module | None) -> Tensor:
    """T^2 * mean over sentences of KL(softmax(z_T/T) || softmax(z_S/T)) (paper 3.1).

    For regression heads (one output) the soft target is the teacher's prediction (MSE).
    """
    student, teacher = batch.student.logits.float(), batch.teacher.logits.float()
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    t = params.temperature
    log_p_student = F.log_softmax(student / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


# --- hidden states ------------------------------------------------------------------------------


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over real tokens ([B, T] mask) or over everything when mask is None."""
    diff = (student.float() - teacher.float()).pow(2)
    if mask is None:
        return diff.mean()
    mask = mask.to(diff.dtype).unsqueeze(-1)
    return (diff * mask).sum() / (mask.sum() * diff.shape[-1]).clamp_min(1.0)


@objective("hidden_mse")
def hidden_mse(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """Sum over mapped layer pairs of the hidden-state MSE (paper 3.2, `skip`/`last`/explicit)."""
    mask = None if batch.count_padding else batch.attention_mask
    s, t = batch.student.hidden_states, batch.teacher.hidden_states
    return sum(masked_mse(s[i], t[j], mask) for i, j in batch.pairs.hidden)
