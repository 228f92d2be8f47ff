"""The registry of distillation objectives.

An objective is one function of a `DistillBatch` (student and teacher views, padding mask, layer
pairs), its validated parameters, and optionally a trainable module it owns (a projection, memory
banks). It declares what it reads (`Reads`): the teacher-logits cache, the Q/K/V hooks, the
two-stage split and config validation all decide from that declaration, so adding one is one
decorated function here plus its tests; nothing else changes.

Conventions, shared by every objective (shared/paper_spec.md sections 2-3):
- divergences are KL(teacher || student);
- terms over several layer pairs are summed, not averaged, as in the study's code;
- padded positions are excluded unless `count_padding` (the authors' behaviour) is set;
- the other switches of `fidelity: authors` that reach an objective arrive on the batch too
  (`crd_without_replacement`, `minilm_v2_last_pair`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from trainables.views import DistillBatch


class Stage(enum.Enum):
    """Which stage of two-stage training an objective belongs to."""

    PREDICTION = "prediction"
    INTERMEDIATE = "intermediate"


class Reads(enum.Enum):
    """What an objective reads of a batch besides the student's outputs.

    LOGITS: the teacher's task-head logits (such objectives train the prediction layer).
    HIDDEN_STATES: the teacher's hidden states. ATTENTION: attention scores, rebuilt from the
    query/key projections the hooks capture. QKV: the query/key/value projections themselves.
    LABELS: the gold labels of the training split.
    """

    LOGITS = "logits"
    HIDDEN_STATES = "hidden_states"
    ATTENTION = "attention"
    QKV = "qkv"
    LABELS = "labels"


HOOKED = frozenset({Reads.ATTENTION, Reads.QKV})  # what only the Q/K/V forward hooks provide


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
BuildFn = Callable[[ModuleContext, Any], nn.Module | None]


@dataclass(frozen=True)
class Objective:
    name: str
    compute: ComputeFn
    reads: frozenset[Reads]
    params_model: type[BaseModel]
    matches_heads: bool
    build_module: BuildFn | None
    keeps_state: bool
    own_loss_first: bool = False

    @property
    def stage(self) -> Stage:
        """Objectives on the teacher's logits train the prediction layer; the rest the layers below."""
        return Stage.PREDICTION if Reads.LOGITS in self.reads else Stage.INTERMEDIATE

    @property
    def needs_qkv(self) -> bool:
        """Whether the forward passes must install the Q/K/V hooks."""
        return bool(self.reads & HOOKED)

    @property
    def needs_labels(self) -> bool:
        return Reads.LABELS in self.reads

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
    reads: set[Reads],
    params: type[BaseModel] = NoParams,
    matches_heads: bool = False,
    module: BuildFn | None = None,
    keeps_state: bool = False,
    own_loss_first: bool = False,
) -> Callable[[ComputeFn], ComputeFn]:
    """Register `fn` under `name`.

    reads: what the objective reads (`Reads`). It decides the objective's stage (LOGITS: the
    prediction stage), whether the Q/K/V hooks are installed (ATTENTION, QKV), whether a cache of
    the teacher's logits can stand in for the teacher (LOGITS alone) and whether label-free
    pre-training may use it (neither LOGITS nor LABELS).
    matches_heads: student and teacher heads are paired by index, so their counts must agree.
    module: builds the objective's trainable module (projection, memory banks) from the run's
    shapes and the parameters; it returns None when this run needs none.
    keeps_state: the module's buffers change at every training step (CRD's memory banks); each
    data-parallel process would change its own copy, so the objective trains in one process only.
    own_loss_first: a pre-training method in two halves: the student trains on its own (MLM) loss
    alone for the first half of the budget, and the objective joins for the second.
    """

    def register(fn: ComputeFn) -> ComputeFn:
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        REGISTRY[name] = Objective(
            name, fn, frozenset(reads), params, matches_heads, module, keeps_state, own_loss_first
        )
        return fn

    return register


# --- logits -------------------------------------------------------------------------------------


class KDParams(NoParams):
    temperature: float = Field(default=2.0, gt=0.0)


@objective("kd", reads={Reads.LOGITS}, params=KDParams)
def kd(batch: DistillBatch, params: KDParams, module: nn.Module | None) -> Tensor:
    """T^2 * mean over sentences of KL(softmax(z_T/T) || softmax(z_S/T)) (paper 3.1).

    For regression heads (one output) the soft target is the teacher's prediction: the MSE of each
    sentence's output against its own teacher output. The study's code compared a [B] student
    against a [B, 1] teacher, which broadcasts to every (student, teacher) pair of the batch, a
    [B, B] loss that is not reproduced.
    """
    student, teacher = batch.student.logits.float(), batch.teacher.logits.float()
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    t = params.temperature
    log_p_student = F.log_softmax(student / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


@objective("logit_mse", reads={Reads.LOGITS})
def logit_mse(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """Mean over sentences of the squared distance between student and teacher logits.

    The study's code distils a regression head with the summed MSE of the outputs (paper 3.1);
    averaged over the batch, as `kd` is, and for one output exactly kd's regression loss. On a
    classifier it matches raw logits instead of softened probabilities.
    """
    diff = batch.student.logits.float() - batch.teacher.logits.float()
    return diff.pow(2).sum(dim=-1).mean()


# --- shared helpers -----------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` where the broadcastable 0/1 `mask` is set; of everything when it is None."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def key_mask(batch: DistillBatch) -> Tensor:
    """[B, 1, 1, T] bool, True on real keys: broadcasts over heads and query rows."""
    return batch.attention_mask.bool()[:, None, None, :]


def query_rows(batch: DistillBatch) -> Tensor:
    """[B, 1, T] bool, True on real query rows: broadcasts over heads."""
    return batch.attention_mask.bool()[:, None, :]


def masked_softmax(scores: Tensor, keys: Tensor | None) -> Tensor:
    """Softmax over the last dim with masked keys at probability exactly 0.

    Filling with the dtype's finite minimum (not -inf) keeps every row finite, even a row whose
    keys are all masked, so no -inf * 0 = NaN can appear downstream.
    """
    if keys is not None:
        scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def kl_rows(p_teacher: Tensor, p_student: Tensor) -> Tensor:
    """KL(P_T || P_S) of each row; student probabilities clamped to [1e-7, 1] before the log (3.7).

    kl_div treats 0 * log 0 as 0, so zero teacher probabilities (masked keys) add nothing.
    """
    log_student = p_student.clamp(1e-7, 1.0).log()
    return F.kl_div(log_student, p_teacher, reduction="none").sum(dim=-1)


def first_tokens(states: Sequence[Tensor]) -> list[Tensor]:
    """The first ([CLS] / <s>) vector [B, d] of each hidden state, in float32."""
    return [h[:, 0].float() for h in states]


def concat_features(states: Sequence[Tensor]) -> Tensor:
    """Concatenate hidden states along the feature dim, in float32."""
    return torch.cat([h.float() for h in states], dim=-1)


# --- hidden states ------------------------------------------------------------------------------


def build_hidden_projection(ctx: ModuleContext, params: NoParams) -> nn.Module | None:
    """The learned maps that make hidden states comparable, or None when widths already agree.

    combine: one affine map from all teacher layers concatenated to all student layers
    concatenated; the teacher side is projected, as in the study's code (paper 3.3).
    Otherwise, widths differing: one map per student hidden state (so one per layer pair, each
    student layer is matched at most once) from the student's width to the teacher's (TinyBERT).
    """
    if ctx.combine:
        return nn.Linear(
            (ctx.teacher_layers + 1) * ctx.teacher_hidden_size,
            (ctx.student_layers + 1) * ctx.student_hidden_size,
        )
    if ctx.student_hidden_size != ctx.teacher_hidden_size:
        return nn.ModuleList(
            nn.Linear(ctx.student_hidden_size, ctx.teacher_hidden_size)
            for _ in range(ctx.student_layers + 1)
        )
    return None


def combine_projection(module: nn.Module | None, name: str) -> nn.Linear:
    """The teacher-to-student map of a concatenation of layers; a clear error if it was not built."""
    if not isinstance(module, nn.Linear):
        raise RuntimeError(
            f"objective {name!r} concatenates layers and needs its teacher-to-student projection; build "
            "the objective's module first (for mapping combine: ModuleContext(combine=True))"
        )
    return module


def to_teacher_width(module: nn.Module | None, layer: int, state: Tensor) -> Tensor:
    """Student hidden state `layer` mapped to the teacher's width (identity when widths agree)."""
    state = state.float()
    if module is None:
        return state
    if not isinstance(module, nn.ModuleList):
        raise RuntimeError("the objective's module was built for mapping combine, but the batch is not")
    return module[layer](state)


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over real tokens ([B, T] mask) or over everything when mask is None."""
    diff = (student.float() - teacher.float()).pow(2)
    return masked_mean(diff, None if mask is None else mask[..., None])


@objective("hidden_mse", reads={Reads.HIDDEN_STATES}, module=build_hidden_projection)
def hidden_mse(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """Sum over layer pairs of the hidden-state MSE over real tokens (paper 3.2, 3.3).

    skip / last / explicit pairs index hidden_states (0 = embeddings); a student narrower or wider
    than the teacher is mapped to the teacher's width. combine: one MSE between the student's
    concatenated layers and the projected concatenation of the teacher's. count_padding averages
    over padded tokens too (the authors' behaviour).
    """
    mask = None if batch.count_padding else batch.attention_mask
    s, t = batch.student.hidden_states, batch.teacher.hidden_states
    if batch.pairs.combine:
        projected = combine_projection(module, "hidden_mse")(concat_features(t))
        return masked_mse(concat_features(s), projected, mask)
    return sum(masked_mse(to_teacher_width(module, i, s[i]), t[j], mask) for i, j in batch.pairs.hidden)


def build_layers_projection(ctx: ModuleContext, params: NoParams) -> nn.Linear:
    """hidden_mse_combine's map: the teacher's transformer layers concatenated to the student's."""
    return nn.Linear(ctx.teacher_layers * ctx.teacher_hidden_size, ctx.student_layers * ctx.student_hidden_size)


@objective("hidden_mse_combine", reads={Reads.HIDDEN_STATES}, module=build_layers_projection)
def hidden_mse_combine(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """The task-agnostic study's hidden_mse_combine (paper 4), whatever `mapping` says: one MSE
    between the student's transformer layers concatenated and a trained affine map of the teacher's.

    Embedding outputs take no part: the study's task-agnostic hidden states hold none (its
    task-specific `mapping: combine`, hidden_mse's, has them). The study's projector was never given
    to the optimiser and was drawn anew every epoch, a fixed random map; ours is trained.
    """
    mask = None if batch.count_padding else batch.attention_mask
    s, t = batch.student.hidden_states[1:], batch.teacher.hidden_states[1:]
    projected = combine_projection(module, "hidden_mse_combine")(concat_features(t))
    return masked_mse(concat_features(s), projected, mask)


@objective("hidden_mse_token", reads={Reads.HIDDEN_STATES}, module=build_hidden_projection)
def hidden_mse_token(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """hidden_mse on the first token ([CLS] / <s>) only: per pair the mean over B * d (paper 3.4);
    the task-agnostic study's hidden_cls on the mapped layers (paper 4).

    The first token is never padding, so count_padding does not apply. combine concatenates the
    first-token vectors of all layers (the study's code crashes there). Each sentence's own first
    token: the study's task-agnostic code took `.transpose(0, 1)[:, 0]` of batch-first states, the
    first sentence's tokens, which is not reproduced.
    """
    s, t = first_tokens(batch.student.hidden_states), first_tokens(batch.teacher.hidden_states)
    if batch.pairs.combine:
        projected = combine_projection(module, "hidden_mse_token")(torch.cat(t, dim=-1))
        return F.mse_loss(torch.cat(s, dim=-1), projected)
    return sum(F.mse_loss(to_teacher_width(module, i, s[i]), t[j]) for i, j in batch.pairs.hidden)


# --- attention ----------------------------------------------------------------------------------


class AttMSEParams(NoParams):
    tensor: Literal["scores", "probs"] = Field(
        default="scores", description="pre-softmax scaled scores (TinyBERT) or attention probabilities"
    )


def attention_mse(batch: DistillBatch, student_layer: int, teacher_layer: int, tensor: str) -> Tensor:
    """MSE of one layer pair's attention scores (or probabilities), heads matched by index."""
    keys = key_mask(batch)
    pairs = None if batch.count_padding else keys & keys.transpose(-1, -2)
    s = batch.student.attention_scores(student_layer).float()
    t = batch.teacher.attention_scores(teacher_layer).float()
    if tensor == "probs":
        s, t = masked_softmax(s, keys), masked_softmax(t, keys)
    else:
        s, t = s.masked_fill(~keys, 0.0), t.masked_fill(~keys, 0.0)
    return masked_mean((s - t).pow(2), pairs)


@objective("att_mse", reads={Reads.ATTENTION}, params=AttMSEParams, matches_heads=True)
def att_mse(batch: DistillBatch, params: AttMSEParams, module: nn.Module | None) -> Tensor:
    """Sum over attention pairs of the MSE of attention scores (paper 3.6, TinyBERT).

    Padded keys are zeroed on both sides. The mean runs over (query, key) pairs that are both real;
    count_padding averages over all B * H * T * T entries instead (the authors' behaviour, whose
    scale depends on the batch's padding ratio).
    """
    return sum(attention_mse(batch, i, j, params.tensor) for i, j in batch.pairs.attention)


def attention_kl(batch: DistillBatch, student_layer: int, teacher_layer: int) -> Tensor:
    """Mean over query rows of KL(P_T || P_S), P = softmax over real keys (paper 3.7).

    Padded query rows are counted only with count_padding (the authors' behaviour).
    """
    keys = key_mask(batch)
    rows = None if batch.count_padding else query_rows(batch)
    p_student = masked_softmax(batch.student.attention_scores(student_layer).float(), keys)
    p_teacher = masked_softmax(batch.teacher.attention_scores(teacher_layer).float(), keys)
    return masked_mean(kl_rows(p_teacher, p_student), rows)


@objective("att_kl", reads={Reads.ATTENTION}, matches_heads=True)
def att_kl(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """Sum over attention pairs of the mean row KL between attention distributions (paper 3.7)."""
    return sum(attention_kl(batch, i, j) for i, j in batch.pairs.attention)


def self_relation(x: Tensor, keys: Tensor | None) -> Tensor:
    """softmax(X X^T / sqrt(d)) per head of a [B, H, T, d] tensor, masked keys at probability 0."""
    x = x.float()
    return masked_softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), keys)


def relation_kl(student: Tensor, teacher: Tensor, batch: DistillBatch) -> Tensor:
    """Mean row KL(teacher || student) of the self-relations of two [B, H, T, d] tensors.

    Padded keys are masked and only real query rows averaged; count_padding uses no mask at all and
    averages every row, as the study's value-relation code does (paper 3.8, 4).
    """
    keys, rows = (None, None) if batch.count_padding else (key_mask(batch), query_rows(batch))
    return masked_mean(kl_rows(self_relation(teacher, keys), self_relation(student, keys)), rows)


@objective("minilm", reads={Reads.ATTENTION, Reads.QKV}, matches_heads=True)
def minilm(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """att_kl plus the value-relation KL, softmax(V V^T / sqrt(d_h)) per head (paper 3.8).

    Both terms use every attention pair, as the study's code does (MiniLM itself: last layer only).
    """
    s, t = batch.student.values, batch.teacher.values
    value_relations = sum(relation_kl(s[i], t[j], batch) for i, j in batch.pairs.attention)
    return att_kl(batch, params, module) + value_relations


@objective("att_val_two_stage", reads={Reads.ATTENTION, Reads.QKV}, matches_heads=True, own_loss_first=True)
def att_val_two_stage(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """The study's two-stage pre-training (paper 4): the student's MLM loss alone for the first half of
    the budget, then this loss, minilm's attention and value-relation KL (the MLM loss drops out
    unless mlm_weight keeps it). The halves share one optimiser and learning-rate schedule."""
    return minilm(batch, params, module)


class MiniLMv2Params(NoParams):
    relation_heads: int | None = Field(
        default=None, ge=1, description="heads the width is re-split into; None takes the teacher's"
    )


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, H, T, d_h] -> [B, heads, T, H * d_h / heads]: merge the heads, then split the width anew."""
    b, h, t, d = x.shape
    if (h * d) % heads:
        raise ValueError(f"minilm_v2 relation_heads {heads}: must divide the width {h * d} (= {h} x {d})")
    return x.transpose(1, 2).reshape(b, t, heads, h * d // heads).transpose(1, 2)


@objective("minilm_v2", reads={Reads.QKV}, params=MiniLMv2Params)
def minilm_v2(batch: DistillBatch, params: MiniLMv2Params, module: nn.Module | None) -> Tensor:
    """Sum over attention pairs of the Q-Q, K-K and V-V self-relation KLs (paper 4, MiniLMv2).

    Both sides are re-split into the same number of relation heads, so the student's head count and
    width may differ from the teacher's. Each side merges its heads back into tokens' vectors before
    the split: the study's code reshaped the student's [B, H, T, d] raw, which mixes tokens across
    relation heads when head counts differ (not reproduced). minilm_v2_last_pair (the authors'
    behaviour) keeps the last pair only: the study paired the student's last layer alone.
    """
    pairs = batch.pairs.attention[-1:] if batch.minilm_v2_last_pair else batch.pairs.attention
    terms = []
    for i, j in pairs:
        heads = params.relation_heads or batch.teacher.queries[j].shape[1]
        for kind in ("queries", "keys", "values"):
            student_x = split_heads(getattr(batch.student, kind)[i], heads)
            teacher_x = split_heads(getattr(batch.teacher, kind)[j], heads)
            terms.append(relation_kl(student_x, teacher_x, batch))
    return sum(terms)


def pearson_loss(student: Tensor, teacher: Tensor, weights: Tensor, dim: int) -> Tensor:
    """1 - the mean Pearson correlation of student and teacher along `dim`.

    Entries of weight 0 (padding) take no part, and the mean runs over the vectors with at least two
    entries left (a single value has no correlation; the study's code counts such a vector as 0).
    """
    count = weights.sum(dim, keepdim=True)

    def centred(x: Tensor) -> Tensor:
        return (x - (x * weights).sum(dim, keepdim=True) / count.clamp_min(1.0)) * weights

    s, t = centred(student), centred(teacher)
    correlation = (s * t).sum(dim) / (s.norm(dim=dim) * t.norm(dim=dim) + 1e-8)
    return 1.0 - masked_mean(correlation, count.squeeze(dim) >= 2)


@objective("pear_col", reads={Reads.ATTENTION}, matches_heads=True)
def pear_col(batch: DistillBatch, params: NoParams, module: nn.Module | None) -> Tensor:
    """Sum over four views of 1 - mean Pearson correlation of the attention probabilities of the last
    attention pair (the top layers; paper 4, DIST-style): along the keys of each query row, along the
    queries of each key column, across heads and across the batch's sentences.

    Only real (query, key) pairs take part; count_padding takes every entry, as the study's code.
    """
    i, j = batch.pairs.attention[-1]
    keys = key_mask(batch)
    student = masked_softmax(batch.student.attention_scores(i).float(), keys)
    teacher = masked_softmax(batch.teacher.attention_scores(j).float(), keys)
    real = torch.ones_like(student) if batch.count_padding else (keys & keys.transpose(-1, -2)).expand_as(student)
    weights = real.to(student.dtype)
    return sum(pearson_loss(student, teacher, weights, dim) for dim in (3, 2, 1, 0))


# --- contrastive representation distillation ----------------------------------------------------


class CRDParams(NoParams):
    feat_dim: int = Field(default=128, ge=1, description="width of the contrastive embedding")
    nce_k: int = Field(default=100, ge=1, description="negatives per anchor")
    temperature: float = Field(default=0.07, gt=0.0, description="tau of the scores exp(<m, g> / tau)")
    momentum: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the old memory row")
    label_aware_negatives: bool = Field(
        default=True, description="draw negatives only among examples of another gold label"
    )


class ContrastiveMemory(nn.Module):
    """CRD's trainable embeds and its per-example memory banks (paper 3.5, Tian et al. 2020).

    Banks and normalisation constants are buffers, so checkpoints carry them. Negatives are drawn
    uniformly from a set that excludes one block of a fixed ordering of the training set: with
    label-aware negatives the ordering groups examples by label and the block is the anchor's label;
    otherwise the ordering is the identity and the block is the anchor itself.
    """

    def __init__(self, ctx: ModuleContext, params: CRDParams) -> None:
        super().__init__()
        n, dim = ctx.num_train_examples, params.feat_dim
        if n < 2:
            raise ValueError(f"crd needs at least 2 training examples, got num_train_examples {n}")
        self.num_examples = n
        self.embed_student = nn.Linear((ctx.student_layers + 1) * ctx.student_hidden_size, dim)
        self.embed_teacher = nn.Linear((ctx.teacher_layers + 1) * ctx.teacher_hidden_size, dim)
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_student", torch.rand(n, dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(n, dim) * 2 * bound - bound)
        # Z of student-anchored and teacher-anchored scores; 0 until fixed from the first batch.
        self.register_buffer("z_student", torch.zeros(()))
        self.register_buffer("z_teacher", torch.zeros(()))
        labels = ctx.train_labels
        self.label_blocks: tuple[Tensor, Tensor, Tensor] | None = None
        self.smallest_pool = n - 1  # the fewest negatives any anchor has
        if params.label_aware_negatives and labels is not None and not labels.is_floating_point():
            self.label_blocks = label_blocks(labels.long().cpu(), n)
            self.smallest_pool = n - int(self.label_blocks[2].max())

    def draw_negatives(self, example_ids: Tensor, k: int, distinct: bool = False) -> Tensor:
        """[B, k] negative example ids per anchor, from torch's global CPU RNG (so restoring the RNG
        state on resume reproduces the draws).

        With replacement, unless `distinct` (the authors' behaviour): then each anchor's k are drawn
        without replacement, and, as the study's code decides once for all anchors, with replacement
        only where k reaches the smallest pool of negatives.
        """
        ids = example_ids.cpu().long()
        if self.label_blocks is None:
            order, start, size = None, ids, torch.ones_like(ids)
        else:
            order, block_start, block_size = self.label_blocks
            start, size = block_start[ids], block_size[ids]
        pool = (self.num_examples - size)[:, None]
        if distinct and k < self.smallest_pool:
            offsets = distinct_offsets(pool[:, 0], k)
        else:
            offsets = (torch.rand(len(ids), k, dtype=torch.float64) * pool).long().minimum(pool - 1)
        positions = offsets + size[:, None] * (offsets >= start[:, None])
        negatives = positions if order is None else order[positions]
        return negatives.to(example_ids.device)


def distinct_offsets(pool: Tensor, k: int) -> Tensor:
    """[B, k] distinct offsets per row, uniform over the k-subsets of range(pool[b]) (Floyd's
    algorithm: k vectorised steps, whatever the pool's size); needs k <= every pool."""
    rows = len(pool)
    chosen = torch.empty(rows, k, dtype=torch.long)
    for step in range(k):
        top = pool - k + step  # this step draws from range(top + 1)
        drawn = (torch.rand(rows, dtype=torch.float64) * (top + 1)).long().minimum(top)
        taken = (chosen[:, :step] == drawn[:, None]).any(dim=1)
        chosen[:, step] = torch.where(taken, top, drawn)
    return chosen


def label_blocks(labels: Tensor, num_examples: int) -> tuple[Tensor, Tensor, Tensor]:
    """Example ids ordered by label, and for each example the start and size of its label's block."""
    if len(labels) != num_examples:
        raise ValueError(f"crd: {len(labels)} train_labels for num_train_examples {num_examples}")
    _, label_index, counts = labels.unique(return_inverse=True, return_counts=True)
    if len(counts) < 2:
        raise ValueError(
            "crd label_aware_negatives: every training example has the same label, so there are "
            "no negatives; set label_aware_negatives to false"
        )
    starts = counts.cumsum(0) - counts
    return labels.argsort(stable=True), starts[label_index], counts[label_index]


def nce_loss(anchor: Tensor, memory: Tensor, candidates: Tensor, z: Tensor, tau: float) -> Tensor:
    """CRD's NCE loss of one direction: candidates[:, 0] is the positive, the rest negatives (3.5).

    -(1/B) sum_i [log(s_pos / (s_pos + K/N)) + sum_neg log((K/N) / (s_neg + K/N))] with
    s = exp(<m, g> / tau) / Z, written with softplus in log space so large scores cannot overflow.
    Z is fixed from the first batch it sees, as mean(s) * N.
    """
    n, k = memory.shape[0], candidates.shape[1] - 1
    rows = memory.index_select(0, candidates.flatten()).view(*candidates.shape, -1)
    logits = torch.einsum("bkd,bd->bk", rows, anchor) / tau
    with torch.no_grad():  # without a host sync: only a still-zero Z takes the batch's value
        z.copy_(torch.where(z > 0, z, logits.exp().mean() * n))
    log_s = logits - z.log()
    log_noise = math.log(k / n)
    positive = F.softplus(log_noise - log_s[:, 0])
    negatives = F.softplus(log_s[:, 1:] - log_noise).sum(dim=1)
    return (positive + negatives).mean()


@torch.no_grad()
def update_memory(memory: Tensor, example_ids: Tensor, embeds: Tensor, momentum: float) -> None:
    """row <- normalize(momentum * row + (1 - momentum) * g) for each example of the batch."""
    rows = memory.index_select(0, example_ids) * momentum + embeds * (1.0 - momentum)
    memory.index_copy_(0, example_ids, F.normalize(rows, dim=-1))


def build_contrastive_memory(ctx: ModuleContext, params: CRDParams) -> ContrastiveMemory:
    return ContrastiveMemory(ctx, params)


@objective(
    "crd", reads={Reads.HIDDEN_STATES, Reads.LABELS}, params=CRDParams, module=build_contrastive_memory, keeps_state=True
)
def crd(batch: DistillBatch, params: CRDParams, module: nn.Module | None) -> Tensor:
    """Contrastive representation distillation on all layers' first-token vectors (paper 3.5).

    The mean of the student-anchored (against the teacher memory) and teacher-anchored (against
    the student memory) NCE losses. Memory rows move only in training mode, so evaluation batches,
    whose ids index another split, leave the banks alone.
    """
    if not isinstance(module, ContrastiveMemory):
        raise RuntimeError("objective 'crd' needs its ContrastiveMemory module")
    if batch.example_ids is None:
        raise ValueError("objective 'crd' needs batch.example_ids (dataset indices of the training examples)")
    ids = batch.example_ids.to(module.memory_student.device).long()
    f_student = torch.cat(first_tokens(batch.student.hidden_states), dim=-1)
    f_teacher = torch.cat(first_tokens(batch.teacher.hidden_states), dim=-1)
    g_student = F.normalize(module.embed_student(f_student), dim=-1)
    g_teacher = F.normalize(module.embed_teacher(f_teacher), dim=-1)
    negatives = module.draw_negatives(ids, params.nce_k, distinct=batch.crd_without_replacement)
    candidates = torch.cat([ids[:, None], negatives], dim=1)
    tau = params.temperature
    loss_student = nce_loss(g_student, module.memory_teacher, candidates, module.z_student, tau)
    loss_teacher = nce_loss(g_teacher, module.memory_student, candidates, module.z_teacher, tau)
    if module.training:
        update_memory(module.memory_student, ids, g_student, params.momentum)
        update_memory(module.memory_teacher, ids, g_teacher, params.momentum)
    return (loss_student + loss_teacher) / 2
