"""What the objectives see of one forward pass: plain tensors, no model objects.

Attention objectives need pre-softmax scores, which no transformers attention implementation
returns (eager returns post-softmax, post-dropout probabilities; SDPA returns nothing). We capture
each layer's query/key/value projections with forward hooks (see `trainables.models`) and rebuild
scores here, so the model keeps its fast attention kernel and the maths stays explicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelView:
    """One model's outputs for a batch.

    hidden_states: num_layers + 1 tensors [B, T, d]; index 0 is the embedding output.
    queries / keys / values: one [B, H, T, d_head] tensor per layer, present only when an
    objective asked for them.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] = ()
    queries: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.hidden_states) - 1

    def attention_scores(self, layer: int) -> Tensor:
        """Pre-softmax scaled scores Q K^T / sqrt(d_head), [B, H, T, T], in float32, without the
        padding mask (half-precision scores lose the small differences the objectives compare)."""
        if not self.queries:
            raise RuntimeError(
                "attention objective got no attention maps: the query/key hooks captured nothing. "
                "The model type may not expose `encoder.layer[i].attention.self.query/key/value`."
            )
        q, k = self.queries[layer].float(), self.keys[layer].float()
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


@dataclass(frozen=True)
class LayerPairs:
    """Which student layer learns from which teacher layer.

    hidden: (student, teacher) indices into hidden_states (0 = embeddings).
    attention: (student, teacher) 0-based transformer layer indices for attention/value objectives.
    """

    hidden: tuple[tuple[int, int], ...]
    attention: tuple[tuple[int, int], ...]
    combine: bool = False


@dataclass
class DistillBatch:
    """Everything an objective may read for one batch, with the fidelity switches objectives obey
    (each true reproduces a behaviour of the study's released code; trainables.config.FidelityConfig)."""

    student: ModelView
    teacher: ModelView
    attention_mask: Tensor
    labels: Tensor | None
    example_ids: Tensor | None
    pairs: LayerPairs
    count_padding: bool = False
    crd_without_replacement: bool = False
    minilm_v2_last_pair: bool = False

    @property
    def token_mask(self) -> Tensor:
        """[B, T] float mask of real tokens."""
        return self.attention_mask.float()
