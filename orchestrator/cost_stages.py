"""A trial's training as the dry run's estimates read it, before anything loads: its stages (as
trainables.distiller plans them), the stages the teacher-logits cache serves, and its precision.
The cost (orchestrator.cost_flops) and the GPU memory (orchestrator.gpu_memory) read the same
answers from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.config import PretrainConfig, RunConfig, TrainingConfig

if TYPE_CHECKING:
    from trainables.distiller import StagePlan


def run_stages(cfg: RunConfig | PretrainConfig) -> list[StagePlan]:
    """The run's stages with their objectives: one, or the study's two (trainables.distiller)."""
    from trainables.distiller import make_terms, plan_stages, pretrain_stages

    terms = make_terms(cfg.objectives)
    if isinstance(cfg, PretrainConfig):
        return pretrain_stages(terms, cfg.mlm_weight, cfg.training.max_steps)
    return plan_stages(terms, cfg.ce_weight, two_stage=cfg.two_stage)


def cached_stages(cfg: RunConfig | PretrainConfig, stages: list[StagePlan]) -> list[bool]:
    """For each stage, whether cached logits stand in for the teacher (trainables.teacher_source): the
    stage reads nothing of the teacher but its logits, the cache is on, and the teacher has no
    dropout (its logits would differ every pass)."""
    on = cfg.training.teacher_logits_cache and not cfg.fidelity.teacher_dropout
    return [on and stage.needs_teacher and stage.reads_only_logits for stage in stages]


def precision(training: TrainingConfig, auto: str) -> str:
    """bf16, fp16 or fp32 as the run trains; `auto` is what mixed_precision: auto picks on the device."""
    if training.bf16:
        return "bf16"
    if training.fp16:
        return "fp16"
    return "fp32" if training.mixed_precision == "no" else auto
