"""`training.compile`: the student's training step and the live teacher's forward under torch.compile.

A compiled graph is specialised to its input shapes, and dynamic padding gives nearly every batch a
new length: left alone, inductor would compile again for each one. With compile on, training
batches are padded instead to the smallest of a few LENGTH BUCKETS, so each bucket compiles once:
powers of two from 16 up to max_seq_length, and max_seq_length itself (16, 32, 64, 128 for the
paper's 128; 6 buckets for 512). Powers of two keep the number of compilations at about
log2(max_seq_length / 8), at the price of at most doubling a batch's padded length; finer
buckets would pad less but compile more, and each compilation of a BERT step costs tens of seconds.

Shapes are static (`dynamic=False`): every bucket gets kernels for its exact shape. A batch with
fewer rows than `per_device_train_batch_size` (the epoch's last) runs eagerly on the same module:
compiling a graph for one batch an epoch costs far more than it saves (measured on 2 CPU cores: 45 to
60 s of compilation per new shape for a 4-layer teacher and a 2-layer student 32 wide, where their
eager step takes milliseconds), and marking the batch dimension dynamic instead would give every
full batch generic kernels for the sake of one. Evaluation stays eager: its batches have another
size and no backward, so compiling them would double the graphs for a pass that runs only every
`eval_steps`.

The step registers the Q/K/V capture hooks inside the compiled call (models.forward_view), which
dynamo cannot trace: the graph breaks there, and the teacher's forward, the student's forward and
the objectives compile as separate graphs (three per bucket on torch 2.13), still once per bucket.

The compiled wrappers share the parameters of the plain modules and the loop checkpoints the
plain modules, so state dicts carry no `_orig_mod.` prefixes and compiled and eager runs resume
each other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import DataCollatorWithPadding

log = logging.getLogger(__name__)

CompileSetting = Literal["auto"] | bool
Collate = Callable[[list[dict[str, Any]]], dict[str, Tensor]]

# Whether compiling the step has been measured faster on a CUDA GPU: `auto` compiles only then.
# No GPU has been lent yet; bench/gpu_check.sh measures eager against compiled throughput, and this
# turns True only once it has measured a gain.
COMPILE_GAINS_ON_CUDA = False
SMALLEST_BUCKET = 16
# Teacher and student run through the same transformers functions, which dynamo caches per function:
# each bucket adds one graph per model there (no-grad teacher, training student).
MODELS_PER_FUNCTION = 2


def compile_wanted(setting: CompileSetting, device: torch.device) -> bool:
    """`true` and `false` as given; `auto` only on a CUDA device, and there only once a gain is measured."""
    if setting == "auto":
        return device.type == "cuda" and COMPILE_GAINS_ON_CUDA
    return setting


def length_buckets(max_seq_length: int) -> tuple[int, ...]:
    """Powers of two from SMALLEST_BUCKET below max_seq_length, then max_seq_length itself."""
    buckets = []
    length = SMALLEST_BUCKET
    while length < max_seq_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_seq_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length`; a row longer than every bucket keeps its own length."""
    return next((b for b in buckets if b >= length), length)


@dataclasses.dataclass(frozen=True)
class BucketPadding:
    """A padding collator that pads each batch to its length bucket instead of to its longest row."""

    collator: DataCollatorWithPadding
    buckets: tuple[int, ...]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        target = bucket_for(longest, self.buckets)
        return dataclasses.replace(self.collator, padding="max_length", max_length=target)(features)


def bucketed(collate: Collate, buckets: tuple[int, ...]) -> Collate:
    """`collate` padding to length buckets; a collator that does not pad (fixed-length pre-training
    blocks, whose every batch has one shape already) is returned as it is."""
    if isinstance(collate, DataCollatorWithPadding):
        return BucketPadding(collate, buckets)
    return collate


class StepCompiler:
    """A run's torch.compile set-up: the buckets, which batches the compiled graphs serve, and a
    count of the graphs inductor built (a graph break splits one compilation into several graphs)."""

    def __init__(self, max_seq_length: int, full_batch: int, stages: int) -> None:
        self.buckets = length_buckets(max_seq_length)
        self.full_batch = full_batch
        self.graphs = 0
        self._inductor = torch._dynamo.lookup_backend("inductor")
        # Graphs of an earlier run in this process (a reused Tune worker) are of no use to this one,
        # and would count against the recompile limit.
        torch._dynamo.reset()
        limit = len(self.buckets) * MODELS_PER_FUNCTION * stages
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), limit))

    def compile(self, module: nn.Module) -> nn.Module:
        """A compiled wrapper sharing `module`'s parameters; `module` itself stays eager."""
        return torch.compile(module, backend=self._count_and_compile, dynamic=False)

    def serves(self, batch: dict[str, Tensor]) -> bool:
        """Whether `batch` goes through the compiled graphs: full batches do, the epoch's last may not."""
        return batch["input_ids"].shape[0] == self.full_batch

    def _count_and_compile(self, graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        self.graphs += 1
        log.info("torch.compile: graph %d built", self.graphs)
        return self._inductor(graph, example_inputs)


def step_compiler(
    setting: CompileSetting, device: torch.device, max_seq_length: int, full_batch: int, stages: int,
    count_padding: bool,
) -> StepCompiler | None:
    """The run's StepCompiler where `training.compile` asks for one on `device`, else None."""
    if not compile_wanted(setting, device):
        return None
    if count_padding:
        log.warning("training.compile pads batches to length buckets: the terms that fidelity.count_padding "
                    "averages over padded positions too see more padding than in an eager run, and change")
    return StepCompiler(max_seq_length, full_batch, stages)
