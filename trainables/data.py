"""Task data: raw splits, tokenisation cached on disk, the dynamic-padding collator, and the
`TaskData` a run trains on.

Every trial of a sweep needs the same tokenised splits, so they are built once per (task, data files,
tokenizer, length, sample limits) and saved under the cache directory; later trials load them.
Examples are truncated but not padded here: the collator pads each batch to its own longest row.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset, load_from_disk
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from trainables.cache import cache_root, save_atomically
from trainables.config import TrainingConfig
from trainables.metrics import compute_task_metrics
from trainables.tasks import TaskSpec, check_label_ids, read_local_file, require_columns, selection_metric, some

GLUE_DATASET = "nyu-mll/glue"
CACHE_FORMAT = 1  # bump when the layout of cached splits changes
EVAL_SAMPLE_SEED = 0  # the eval subset is the same for every trial, whatever its seed

EvaluateFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class TaskData:
    """The splits a run trains and evaluates on, how a batch is made of them, and how it is scored.

    `score` is None for text without a task metric (pre-training), which is scored by its loss.
    """

    train: Dataset
    validation: Dataset
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    score: EvaluateFn | None
    main_metric: str

    @property
    def train_labels(self) -> torch.Tensor | None:
        """Gold labels of the training split, for objectives that read them; None for unlabelled text."""
        return torch.tensor(self.train["labels"]) if "labels" in self.train.column_names else None


def load_task_data(
    spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, training: TrainingConfig, cache_dir: Path | None
) -> TaskData:
    """Tokenised splits (cached on disk), the padding collator and the task's metrics; the score is the
    selection metric (`training.metric_for_best_model`, else the task's main metric)."""
    main_metric = selection_metric(spec, training.metric_for_best_model)
    splits = tokenized_splits(
        spec,
        tokenizer,
        max_seq_length=training.max_seq_length,
        cache_dir=cache_dir,
        max_train_samples=training.max_train_samples,
        max_eval_samples=training.max_eval_samples,
        seed=training.seed,
    )
    return TaskData(
        train=splits["train"],
        validation=splits["validation"],
        collate=make_collator(tokenizer),
        score=lambda logits, labels: compute_task_metrics(spec, logits, labels),
        main_metric=main_metric,
    )


def _encode_labels(ds: Dataset, spec: TaskSpec, where: str) -> Dataset:
    """Labels as class ids (int64, or ClassLabel for string labels) or float32 for regression."""
    column = spec.label_column
    if spec.label_names is not None:
        unseen = sorted(set(ds.unique(column)) - set(spec.label_names), key=str)
        if unseen:
            raise ValueError(f"{where}: column {column!r} holds labels {some(unseen)}; allowed: {some(spec.label_names)}")
        return ds.cast_column(column, ClassLabel(names=list(spec.label_names)))
    if spec.is_regression:
        return ds.cast_column(column, Value("float32"))
    check_label_ids(ds.unique(column), spec.num_labels, where, column)
    return ds.cast_column(column, Value("int64"))


def _sources(spec: TaskSpec) -> dict[str, tuple[Dataset, str]]:
    """Each split with the words an error message uses to point at it."""
    if spec.glue_subset is not None:
        hub = load_dataset(GLUE_DATASET, spec.glue_subset)
        return {
            split: (hub[name], f"{GLUE_DATASET} {spec.glue_subset} split {name}")
            for split, name in (("train", spec.train_split), ("validation", spec.eval_split))
        }
    assert spec.train_file is not None and spec.validation_file is not None  # TaskSpec checks this
    return {
        "train": (read_local_file(spec.train_file), f"task.train_file {spec.train_file}"),
        "validation": (read_local_file(spec.validation_file), f"task.validation_file {spec.validation_file}"),
    }


def load_raw_splits(spec: TaskSpec) -> DatasetDict:
    """`train` and `validation` splits holding only the text columns and the encoded label column."""
    columns = [*spec.text_columns, spec.label_column]
    splits = {}
    for split, (ds, where) in _sources(spec).items():
        require_columns(ds, columns, where)
        splits[split] = _encode_labels(ds.select_columns(columns), spec, where)
    return DatasetDict(splits)


def _file_fingerprint(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    stat = path.stat()
    return [str(path), stat.st_mtime_ns, stat.st_size]


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    """A relative local path means a different model in each trial's directory, so resolve it."""
    name = tokenizer.name_or_path
    if Path(name).exists():
        name = str(Path(name).resolve())
    return [name, len(tokenizer), type(tokenizer).__name__]


def cache_key(
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    seed: int,
) -> str:
    """Hash of everything the tokenised splits depend on; the seed counts only when it picks a subset."""
    parts = {
        "format": CACHE_FORMAT,
        "spec": asdict(spec),
        "files": [_file_fingerprint(spec.train_file), _file_fingerprint(spec.validation_file)],
        "tokenizer": _tokenizer_identity(tokenizer),
        "max_seq_length": max_seq_length,
        "samples": [max_train_samples, max_eval_samples, seed if max_train_samples else None],
    }
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A random subset kept in file order: local files are often sorted by label, so no head()."""
    if limit is None or limit >= len(ds):
        return ds
    picked = np.random.default_rng(seed).choice(len(ds), size=limit, replace=False)
    return ds.select(sorted(picked.tolist()))


def _tokenize(
    ds: Dataset, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, fingerprint: str
) -> Dataset:
    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        texts = [batch[column] for column in spec.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        return {**encoded, "labels": batch[spec.label_column], "example_id": indices}

    return ds.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        new_fingerprint=fingerprint,  # skip hashing the tokenizer; our cache key already names it
        desc=f"tokenizing {spec.name}",
    )


def tokenized_splits(
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    cache_dir: Path | str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
) -> DatasetDict:
    """Tokenised `train` / `validation` with input_ids, attention_mask, [token_type_ids], labels, example_id.

    `example_id` is the row index within the (sampled) split, which contrastive objectives use to
    address their memory banks. Cached under `<cache root>/tokenized/<task>-<key>`.
    """
    key = cache_key(spec, tokenizer, max_seq_length, max_train_samples, max_eval_samples, seed)
    safe_name = re.sub(r"[^\w.-]", "_", spec.name)  # a task name must not become a path
    path = cache_root(cache_dir) / "tokenized" / f"{safe_name}-{key}"
    if not path.exists():
        raw = load_raw_splits(spec)
        sampled = {
            "train": _subset(raw["train"], max_train_samples, seed),
            "validation": _subset(raw["validation"], max_eval_samples, EVAL_SAMPLE_SEED),
        }
        tokenized = DatasetDict(
            {split: _tokenize(ds, spec, tokenizer, max_seq_length, f"{key}-{split}")
             for split, ds in sampled.items()}
        )
        save_atomically(tokenized, path)
    return load_from_disk(str(path))


def make_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorWithPadding:
    """Pads each batch to its longest row; labels and example_id pass through as tensors."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

