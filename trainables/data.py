"""Task data: raw splits, tokenisation cached on disk, and the dynamic-padding collator.

Every trial of a sweep needs the same tokenised splits, so they are built once per (task, data files,
tokenizer, length, sample limits) and saved under the cache directory; later trials load them.
Examples are truncated but not padded here: the collator pads each batch to its own longest row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset, load_from_disk
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

if TYPE_CHECKING:
    from trainables.tasks import TaskSpec

log = logging.getLogger(__name__)

GLUE_DATASET = "nyu-mll/glue"
BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CACHE_FORMAT = 1  # bump when the layout of cached splits changes
EVAL_SAMPLE_SEED = 0  # the eval subset is the same for every trial, whatever its seed


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """`cache_dir`, else $DISTILLSWEEP_CACHE, else ~/.cache/distillsweep; absolute for Ray trials."""
    root = cache_dir or os.environ.get("DISTILLSWEEP_CACHE") or "~/.cache/distillsweep"
    return Path(root).expanduser().resolve()


def read_local_file(path: Path) -> Dataset:
    """Read one CSV / JSON / JSONL / Parquet file, choosing the `datasets` builder by suffix."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"data file {path}: suffix {path.suffix!r} unsupported; use one of {', '.join(BUILDERS)}"
        )
    return load_dataset(builder, data_files=str(path), split="train")


def _require_columns(ds: Dataset, columns: list[str], where: str) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"{where}: column {column!r} not found; columns present: {ds.column_names}")


def infer_labels(
    train_file: Path, label_column: str, num_labels: int | None
) -> tuple[int, tuple[str, ...] | None]:
    """Settle (num_labels, string label names) from the training file's label column.

    Strings become ids by their sorted order, so train and validation agree; floats mean
    regression; integers must be ids 0..K-1 and K defaults to the largest id + 1.
    """
    ds = read_local_file(train_file)
    _require_columns(ds, [label_column], f"task.train_file {train_file}")
    kind = ds.data.schema.field(label_column).type
    values = ds.unique(label_column)
    if None in values:
        raise ValueError(f"task.train_file {train_file}: column {label_column!r} has missing labels")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        names = tuple(sorted(values))
        if num_labels is not None and num_labels != len(names):
            raise ValueError(
                f"task.num_labels {num_labels}: column {label_column!r} of {train_file} holds "
                f"{len(names)} distinct string labels {list(names)}"
            )
        log.info("task labels %s map to ids 0..%d in this order", list(names), len(names) - 1)
        return len(names), names
    if num_labels == 1 or (num_labels is None and pa.types.is_floating(kind)):
        return 1, None
    if not all(float(v).is_integer() for v in values):
        raise ValueError(
            f"task.num_labels {num_labels}: column {label_column!r} of {train_file} holds non-integer "
            "labels; set num_labels 1 for regression"
        )
    inferred = int(max(values)) + 1
    _check_ids(values, num_labels or inferred, f"task.train_file {train_file}", label_column)
    return num_labels or inferred, None


def _check_ids(values: list[Any], num_labels: int, where: str, label_column: str) -> None:
    bad = sorted((v for v in values if v is None or not 0 <= v < num_labels), key=str)
    if bad:
        raise ValueError(f"{where}: column {label_column!r} holds labels {bad}; allowed: ids 0..{num_labels - 1}")


def _encode_labels(ds: Dataset, spec: TaskSpec, where: str) -> Dataset:
    """Labels as class ids (int64, or ClassLabel for string labels) or float32 for regression."""
    column = spec.label_column
    if spec.label_names is not None:
        unseen = sorted(set(ds.unique(column)) - set(spec.label_names), key=str)
        if unseen:
            raise ValueError(f"{where}: column {column!r} holds labels {unseen}; allowed: {list(spec.label_names)}")
        return ds.cast_column(column, ClassLabel(names=list(spec.label_names)))
    if spec.is_regression:
        return ds.cast_column(column, Value("float32"))
    _check_ids(ds.unique(column), spec.num_labels, where, column)
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
        _require_columns(ds, columns, where)
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


def save_atomically(splits: DatasetDict, path: Path) -> None:
    """Concurrent writers (trials, data-parallel ranks) may build the same cache entry: the first
    rename wins and the others drop their copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    splits.save_to_disk(str(tmp))
    try:
        tmp.rename(path)
    except OSError:
        if not path.exists():
            raise
        shutil.rmtree(tmp)


def make_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorWithPadding:
    """Pads each batch to its longest row; labels and example_id pass through as tensors."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def length_grouped_sampler(
    dataset: Dataset, batch_size: int, generator: torch.Generator | None = None
) -> LengthGroupedSampler:
    """`group_by_length`: batches of similar lengths waste less compute on padding."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
