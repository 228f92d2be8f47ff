"""The shapes of BERT-family encoders, read before any weights load: what checking a space against
its teachers (orchestrator.preflight), its cost (orchestrator.cost) and its GPU memory
(orchestrator.gpu_memory) need to know of a model.

A model's shape is read, in turn, from: a local directory's config.json; an MLflow model URI's
config.json alone (under model/ in an MLflow transformers model, as students are logged; else at the
top); the table below of the hub models the presets name, so that planning needs neither the network
nor transformers; the hub (its cache, or config.json downloaded where the hub is reachable).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.messages import brief, first_line
from trainables.config import PretrainedInit, StudentConfig


@dataclass(frozen=True)
class Architecture:
    """What a BERT-family config.json says of the model's size."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    positions: int
    type_vocab: int

    @classmethod
    def of_config(cls, config: Any) -> Architecture:
        """From a transformers config (BERT, RoBERTa, ELECTRA... field names)."""
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
                   config.vocab_size, config.max_position_embeddings, getattr(config, "type_vocab_size", 1) or 1)

    def cut(self, layers: int, hidden: int | None, heads: int | None, intermediate: int | None) -> Architecture:
        """The student `trainables.models.build_student` makes of this teacher: fewer layers, optionally
        narrower (a subclass keeps its own fields)."""
        return replace(self, layers=layers, hidden=hidden or self.hidden, heads=heads or self.heads,
                       intermediate=intermediate or self.intermediate)


# The hub models the presets use, and their kin, under the names the hub also gives them without an owner.
KNOWN_MODELS: dict[str, Architecture] = {
    "bert-base-uncased": Architecture(12, 768, 12, 3072, 30522, 512, 2),
    "bert-base-cased": Architecture(12, 768, 12, 3072, 28996, 512, 2),
    "bert-large-uncased": Architecture(24, 1024, 16, 4096, 30522, 512, 2),
    "bert-large-cased": Architecture(24, 1024, 16, 4096, 28996, 512, 2),
    "roberta-base": Architecture(12, 768, 12, 3072, 50265, 514, 1),
    "roberta-large": Architecture(24, 1024, 16, 4096, 50265, 514, 1),
    "distilroberta-base": Architecture(6, 768, 12, 3072, 50265, 514, 1),
}
HUB_OWNERS = ("google-bert/", "FacebookAI/", "distilbert/")  # the table's models under their owners' names


class UnknownShape(ValueError):
    """A model whose shape cannot be read: `reason` says why; the message also names the model."""

    def __init__(self, reason: str, model: str = "") -> None:
        super().__init__(f"{model}: {reason}" if model else reason)
        self.reason = reason


def known_architecture(source: str) -> Architecture | None:
    """A shape from the table, with or without the hub owner's prefix; None for a local directory."""
    name = source.split("/", 1)[1] if source.startswith(HUB_OWNERS) else source
    if name not in KNOWN_MODELS or Path(source).expanduser().exists():
        return None
    return KNOWN_MODELS[name]


@functools.cache
def read_architecture(source: str) -> Architecture:
    """The shape of a model by local directory, MLflow URI or hub id, without its weights (see the
    module's order); UnknownShape where none of them has it."""
    known = known_architecture(source)
    if known is not None:
        return known
    try:
        return Architecture.of_config(read_config(source))
    except Exception as err:  # hub, MLflow, file and config errors alike: say what could not be read
        raise UnknownShape(f"cannot read its config ({first_line(err)})", f"model {brief(source)}") from None


@functools.cache
def architecture_or_none(source: str) -> Architecture | None:
    try:
        return read_architecture(source)
    except UnknownShape:
        return None


def read_config(source: str) -> Any:
    """A model's transformers config; from an MLflow URI, config.json alone."""
    from transformers import AutoConfig

    from trainables.model_source import MLFLOW_URI_PREFIXES, resolve_model_source

    if not source.startswith(MLFLOW_URI_PREFIXES):
        return AutoConfig.from_pretrained(resolve_model_source(source))
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(f"{source.rstrip('/')}/model/config.json", dst_path=folder)
        except (OSError, mlflow.MlflowException):
            local = mlflow.artifacts.download_artifacts(f"{source.rstrip('/')}/config.json", dst_path=folder)
        return AutoConfig.from_pretrained(Path(local).parent)


def student_architecture(student: StudentConfig, teacher: Architecture | None,
                         known: Mapping[str, Architecture] | None = None) -> Architecture:
    """The student as `build_student` makes it: a pretrained model's own shape (`known`: shapes of
    models no file describes yet, a study's stage-1 students), or the teacher's cut to the student's
    depth and widths (`teacher` None: its shape is not known). UnknownShape where neither can be read."""
    if isinstance(student.init, PretrainedInit):
        return (known or {}).get(student.init.pretrained) or read_architecture(student.init.pretrained)
    if teacher is None:
        raise UnknownShape("its teacher's shape is unknown", "student")
    return teacher.cut(student.num_layers, student.hidden_size, student.num_attention_heads, student.intermediate_size)
