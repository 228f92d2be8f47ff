"""How many rows a trial reads and how long they are, padded: the token counts of the cost estimate.

Batches are padded to their longest row, so a step of b rows processes b x E[longest of b lengths],
from the length distribution: measured on local data (a sample of rows, tokenised with the run's
tokenizer, or words x 1.3 when no tokenizer is on disk), else a stated mean per GLUE task with a
log-normal spread (coefficient of variation 0.5); lengths are cut at max_seq_length. Pre-training
blocks are full.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from trainables.config import PretrainConfig, RunConfig
from trainables.tasks import TaskSpec, read_local_file, resolve_task

SAMPLE_ROWS = 2000  # rows of a local split tokenised to measure its lengths
TOKENS_PER_WORD = 1.3  # sub-word tokens per whitespace word, when no tokenizer is on disk
LENGTH_SPREAD = 0.5  # coefficient of variation of the log-normal around a stated mean
GROUPED_BATCHES = 50  # group_by_length sorts within mega-batches of this many batches (trainables.training)

# GLUE splits as `datasets` holds them (train, validation; mnli: validation_matched) and a stated
# mean length in sub-word tokens with special tokens (BERT/RoBERTa vocabularies; approximate
# figures from the tasks' published statistics, not measured here).
GLUE_SIZES: dict[str, tuple[int, int, float]] = {
    "cola": (8551, 1043, 11), "sst2": (67349, 872, 13), "mrpc": (3668, 408, 53), "qqp": (363846, 40430, 30),
    "stsb": (5749, 1500, 31), "mnli": (392702, 9815, 40), "qnli": (104743, 5463, 51), "rte": (2490, 277, 69),
}


# --- lengths of rows -----------------------------------------------------------------------------


class Lengths(Protocol):
    source: str

    def at_most(self, length: int) -> float:
        """P(a row has at most `length` tokens), before truncation."""


@dataclass(frozen=True)
class MeasuredLengths:
    sample: tuple[int, ...]  # sorted
    source: str

    def at_most(self, length: int) -> float:
        return bisect.bisect_right(self.sample, length) / len(self.sample)


@dataclass(frozen=True)
class StatedLengths:
    """A log-normal of the stated mean and coefficient of variation LENGTH_SPREAD."""

    mean: float
    source: str

    def at_most(self, length: int) -> float:
        sigma = math.sqrt(math.log(1 + LENGTH_SPREAD**2))
        mu = math.log(self.mean) - sigma**2 / 2
        return 0.5 * (1 + math.erf((math.log(length + 0.5) - mu) / (sigma * math.sqrt(2))))


@dataclass(frozen=True)
class FixedLengths:
    length: int
    source: str

    def at_most(self, length: int) -> float:
        return 1.0 if length >= self.length else 0.0


def upto(lengths: Lengths, cap: int) -> list[float]:
    """P(length <= l) for l = 0 .. cap - 1, stopping where no longer row is left."""
    cdf = []
    for length in range(cap):
        cdf.append(lengths.at_most(length))
        if cdf[-1] >= 1 - 1e-12:
            break
    return cdf


@functools.cache
def mean_length(lengths: Lengths, cap: int) -> float:
    """Mean row length once cut at `cap` tokens."""
    return sum(1 - p for p in upto(lengths, cap))


@functools.cache
def padded_length(lengths: Lengths, batch: int, cap: int, grouped: bool) -> float:
    """Mean padded length of a batch: E[longest of `batch` rows], or with group_by_length the
    mean over a sorted mega-batch of its batches' longest rows."""
    cdf = upto(lengths, cap)
    if not grouped:
        return sum(1 - p**batch for p in cdf)
    rows = GROUPED_BATCHES * batch
    quantiles = [1 - (j * batch + 1) / (rows + 1) for j in range(GROUPED_BATCHES)]
    return sum(next((length for length, p in enumerate(cdf) if p >= q), cap) for q in quantiles) / GROUPED_BATCHES


# --- task sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSize:
    """Rows of each split (None: not known before a corpus is cut; 0: not counted) and their lengths."""

    train_rows: int | None
    validation_rows: int
    labels: int
    train: Lengths
    validation: Lengths


def task_size(cfg: RunConfig | PretrainConfig, tokenizer_source: str | None) -> TaskSize:
    if isinstance(cfg, PretrainConfig):
        blocks = FixedLengths(cfg.corpus.block_size, "full blocks")
        return TaskSize(None, 0, 0, blocks, blocks)
    spec = resolve_task(cfg.task)
    if spec.glue_subset is not None:
        train, validation, mean = GLUE_SIZES[spec.glue_subset]
        lengths = StatedLengths(mean, f"stated means, log-normal spread (CV {LENGTH_SPREAD:g})")
        size = TaskSize(train, validation, spec.num_labels, lengths, lengths)
    else:
        size = local_task_size(spec, tokenizer_source)
    t = cfg.training
    return TaskSize(cap(size.train_rows, t.max_train_samples), cap(size.validation_rows, t.max_eval_samples),
                    size.labels, size.train, size.validation)


def cap(rows: int | None, limit: int | None) -> int | None:
    return rows if rows is None or limit is None else min(rows, limit)


@functools.cache
def local_task_size(spec: TaskSpec, tokenizer_source: str | None) -> TaskSize:
    """Rows and measured lengths of a task's local files."""
    tokenizer = local_tokenizer(tokenizer_source) if tokenizer_source else None
    splits = [read_local_file(path) for path in (spec.train_file, spec.validation_file)]
    train, validation = (measured_lengths(ds, spec.text_columns, tokenizer) for ds in splits)
    return TaskSize(len(splits[0]), len(splits[1]), spec.num_labels, train, validation)


@functools.cache
def local_tokenizer(source: str) -> Any:
    """The run's tokenizer where it is on disk; None (word counts instead) where it is not."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measured_lengths(ds: Any, columns: tuple[str, ...], tokenizer: Any) -> MeasuredLengths:
    """Token lengths of up to SAMPLE_ROWS rows drawn at random (seed 0) from a split."""
    rows = len(ds)
    if rows > SAMPLE_ROWS:
        ds = ds.select(sorted(np.random.default_rng(0).choice(rows, SAMPLE_ROWS, replace=False).tolist()))
    texts = [[text if isinstance(text, str) else "" for text in ds[column]] for column in columns]
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(*texts, truncation=False)["input_ids"]]
        how = "tokenised"
    else:
        specials = len(columns) + 1
        lengths = [specials + round(TOKENS_PER_WORD * sum(len(t.split()) for t in row)) for row in zip(*texts)]
        how = f"words x {TOKENS_PER_WORD}: no tokenizer on disk"
    return MeasuredLengths(tuple(sorted(lengths)) or (0,), f"measured on {len(lengths)} local rows, {how}")

