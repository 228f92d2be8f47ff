"""Teacher loading, student construction and initialisation, and the forward pass objectives see.

The student is the teacher's architecture with fewer layers (optionally narrower). A layer-copying
initialisation copies the embeddings, the chosen teacher layers and, for BERT, the pooler; the
classification head is always freshly initialised, as in the study's code (paper_spec section 6).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from trainables.config import PretrainedInit, StudentConfig
from trainables.mapping import init_layers
from trainables.model_source import resolve_model_source
from trainables.views import ModelView


# Every teacher and student this process built, while something still references it: a Tune
# worker reused for the next trial must not keep the last trial's models (and their GPU memory).
_LIVE_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def track(model: PreTrainedModel) -> PreTrainedModel:
    """Register `model` in the process's registry of live models; returns it."""
    _LIVE_MODELS.add(model)
    return model


def live_models() -> list[nn.Module]:
    """The models built here that are still referenced from somewhere."""
    return list(_LIVE_MODELS)



def load_teacher(ref: str, num_labels: int) -> PreTrainedModel:
    """Load a fine-tuned sequence-classification teacher; refuse one whose head is untrained."""
    source = resolve_model_source(ref)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=num_labels, output_loading_info=True
    )
    fresh = [k for k in info["missing_keys"] if "classifier" in k or "score" in k]
    if fresh:
        raise ValueError(
            f"teacher {ref!r} has no trained classification head ({fresh[0]} is missing): "
            "fine-tune it first with `distillsweep teacher`"
        )
    return track(model)


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a BERT-family model."""
    try:
        return model.base_model.encoder.layer
    except AttributeError:
        raise ValueError(
            f"model type {model.config.model_type!r} has no `encoder.layer` list: "
            "only BERT-family encoders (BERT, RoBERTa, ELECTRA, ...) are supported"
        ) from None


def build_student(
    teacher: PreTrainedModel | None, spec: StudentConfig, num_labels: int, auto_class: type = AutoModelForSequenceClassification
) -> PreTrainedModel:
    """Build the student from the teacher's config and initialise it as `spec.init` says.

    `auto_class` is AutoModelForMaskedLM for pre-training distillation; its LM head is copied
    from the teacher when the widths agree, as the head predicts from the same space.
    """
    if isinstance(spec.init, PretrainedInit):
        return track(auto_class.from_pretrained(resolve_model_source(spec.init.pretrained), num_labels=num_labels))
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = spec.num_layers
    config.num_labels = num_labels
    for field in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(spec, field) is not None:
            setattr(config, field, getattr(spec, field))
    student = auto_class.from_config(config)
    if spec.init != "random":
        teacher_layers = len(encoder_layers(teacher))
        copy_teacher_layers(teacher, student, init_layers(spec.init, teacher_layers, spec.num_layers))
        if auto_class is AutoModelForMaskedLM:
            head = getattr(teacher, "cls", None) or getattr(teacher, "lm_head", None)
            student_head = getattr(student, "cls", None) or getattr(student, "lm_head", None)
            if head is not None and student_head is not None:
                student_head.load_state_dict(head.state_dict())
    return track(student)


def load_masked_lm_teacher(ref: str) -> PreTrainedModel:
    """A teacher for pre-training distillation: its encoder matters, its LM head is optional."""
    return track(AutoModelForMaskedLM.from_pretrained(resolve_model_source(ref)))


@torch.no_grad()
def copy_teacher_layers(teacher: PreTrainedModel, student: PreTrainedModel, layers: list[int]) -> None:
    """Copy embeddings, teacher layer layers[k] into student layer k, and the pooler if any."""
    t_base, s_base = teacher.base_model, student.base_model
    s_base.embeddings.load_state_dict(t_base.embeddings.state_dict())
    t_layers, s_layers = encoder_layers(teacher), encoder_layers(student)
    for k, t in enumerate(layers):
        s_layers[k].load_state_dict(t_layers[t].state_dict())
    if getattr(t_base, "pooler", None) is not None and getattr(s_base, "pooler", None) is not None:
        s_base.pooler.load_state_dict(t_base.pooler.state_dict())


class QKVCapture:
    """Forward hooks that keep each layer's query/key/value projections as [B, H, T, d_head]."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.num_heads = model.config.num_attention_heads
        self.queries: list[Tensor] = []
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self._handles = []
        for layer in encoder_layers(model):
            attention = getattr(getattr(layer, "attention", None), "self", None)
            if attention is None or not all(hasattr(attention, n) for n in ("query", "key", "value")):
                raise ValueError(
                    f"model type {model.config.model_type!r}: attention objectives need "
                    "`attention.self.query/key/value` projections, which this model does not have"
                )
            for name, store in (("query", self.queries), ("key", self.keys), ("value", self.values)):
                self._handles.append(getattr(attention, name).register_forward_hook(self._keep(store)))

    def _keep(self, store: list[Tensor]):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            batch, length, width = output.shape
            store.append(output.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2))

        return hook

    def clear(self) -> None:
        self.queries, self.keys, self.values = [], [], []
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def captured_qkv(model: PreTrainedModel, enabled: bool) -> Iterator[QKVCapture | None]:
    """Install the hooks for one forward pass only, so other passes pay nothing."""
    if not enabled:
        yield None
        return
    capture = QKVCapture(model)
    try:
        yield capture
    finally:
        capture.clear()


def forward_view(model: PreTrainedModel, batch: dict[str, Tensor], need_qkv: bool) -> ModelView:
    """Run the model and collect what the objectives read."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with captured_qkv(model, need_qkv) as capture:
        out = model(**inputs, output_hidden_states=True)
        view = ModelView(logits=out.logits, hidden_states=tuple(out.hidden_states))
        if capture is not None:
            view.queries, view.keys, view.values = capture.queries, capture.keys, capture.values
            if len(view.queries) != view.num_layers:
                raise RuntimeError(
                    f"captured attention for {len(view.queries)} of {view.num_layers} layers: "
                    "attention objectives need every layer's projections"
                )
    return view


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """The model and its tokenizer in one directory, loadable by `from_pretrained`."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
