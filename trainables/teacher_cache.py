"""The teacher's logits for every training example, computed once and shared by a sweep's trials.

When every term of a training stage reads only the teacher's logits and the teacher runs without
dropout, the teacher's output for an example is the same in every epoch of every trial that uses
the same teacher and the same tokenised data. `TeacherLogitsCache` then runs the teacher once over
the training split (eval mode, no gradient, under the run's autocast) and keeps the logits in one
file under `<cache root>/teacher_logits/`; later trials, in this process or another, load the file
and never run the teacher. Which stages read the cache is decided in `trainables.teacher_source`
from what their objectives declare they read.

The file is keyed by the teacher's identity (its directory, the size and modification time of its
files, a hash of its classification head), a hash of the tokenised training split's content
(which covers the tokenizer, the sample limits and truncation at `max_seq_length`),
`max_seq_length` itself and the mixed-precision mode. It is written under an exclusive lock to a
temporary name and renamed into place, so concurrent trials neither corrupt it nor compute it
twice; a file that cannot be read is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import Tensor
from transformers import PreTrainedModel

from trainables.cache import cache_root
from trainables.config import TrainingConfig
from trainables.data import TaskData

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the key changes
CACHE_SUBDIR = "teacher_logits"
# Files that make a model directory's weights and architecture.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth")


def teacher_identity(teacher: PreTrainedModel) -> dict[str, Any] | None:
    """What tells one teacher from another without hashing its weights; None when unknown.

    A local directory counts by its resolved path and the (name, size, mtime) of its model files,
    as the tokenisation cache counts data files; a hub id by its name and commit. The hash of the
    classification head is added either way: two fine-tunings differ there first.
    """
    source = str(getattr(teacher, "name_or_path", "") or getattr(teacher.config, "_name_or_path", ""))
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            [f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in path.iterdir()
            if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
        )
        where: dict[str, Any] = {"dir": str(path.resolve()), "files": files}
    else:
        where = {"hub": source, "commit": getattr(teacher.config, "_commit_hash", None)}
    head = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        if name.startswith(("classifier", "score")) or ".classifier" in name:
            head.update(name.encode())
            head.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {**where, "class": type(teacher).__name__, "num_labels": teacher.config.num_labels,
            "head": head.hexdigest()[:16]}


def dataset_content_hash(dataset: Dataset) -> str:
    """Hash of the model inputs and example ids of a tokenised split (its Arrow buffers)."""
    digest = hashlib.sha256()
    columns = [c for c in ("input_ids", "token_type_ids", "attention_mask", "example_id") if c in dataset.column_names]
    table = dataset.data.table.select(columns)
    digest.update(json.dumps([columns, table.num_rows]).encode())
    for column in table.columns:
        for chunk in column.chunks:
            digest.update(json.dumps([chunk.offset, len(chunk)]).encode())
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    indices = getattr(dataset, "_indices", None)
    if indices is not None:  # a `select`ed view: the mapping decides which rows are seen
        for chunk in indices.column(0).chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock on `path` (POSIX flock); a no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class TeacherLogitsCache:
    """The teacher's logits over a training split, from the shared file or computed into it.

    One object per run; the file it reads or writes is shared by every run with the same key.
    `passes_computed` counts the teacher passes over the training split this object made (0 when it
    reused a file), for benchmarks and tests.
    """

    def __init__(self, cache_dir: Path | str | None = None) -> None:
        self.root = cache_root(cache_dir) / CACHE_SUBDIR
        self.path: Path | None = None
        self.passes_computed = 0

    def logits(
        self, teacher: PreTrainedModel, data: TaskData, training: TrainingConfig, accelerator: Accelerator
    ) -> Tensor:
        """[max example_id + 1, num_labels] float32 logits of `data.train`, on the main process built
        under an exclusive lock when no file holds them yet; every process then reads the file."""
        key = cache_key(accelerator.unwrap_model(teacher), data.train, training, accelerator)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = self.root / f"{digest}.pt"
        if accelerator.is_main_process:
            logits = self._read(self.path, key)
            if logits is None:
                with exclusive_lock(self.path.with_suffix(".lock")):
                    logits = self._read(self.path, key)  # another trial may have built it meanwhile
                    if logits is None:
                        logits = compute_logits(teacher, data, training.per_device_eval_batch_size, accelerator)
                        self.passes_computed += 1
                        self._write(self.path, key, logits)
                        log.info("teacher logits of %d examples cached at %s", len(data.train), self.path)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            logits = self._read(self.path, key)
            if logits is None:
                raise RuntimeError(f"teacher logits cache {self.path} is missing after the main process built it")
        return logits

    @staticmethod
    def _read(path: Path, key: dict[str, Any]) -> Tensor | None:
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: rebuild it
            log.warning("teacher logits cache %s unreadable (%s); rebuilding", path, err)
            return None
        if saved.get("key") != json.dumps(key, sort_keys=True, default=str):
            return None
        return saved["logits"]

    @staticmethod
    def _write(path: Path, key: dict[str, Any], logits: Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        torch.save({"key": json.dumps(key, sort_keys=True, default=str), "logits": logits}, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def cache_key(
    teacher: PreTrainedModel, train: Dataset, training: TrainingConfig, accelerator: Accelerator
) -> dict[str, Any]:
    """Everything the cached logits depend on."""
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_identity(teacher),
        "data": dataset_content_hash(train),
        "rows": len(train),
        "max_seq_length": training.max_seq_length,
        "precision": str(accelerator.mixed_precision),
    }


@torch.no_grad()
def compute_logits(teacher: PreTrainedModel, data: TaskData, batch_size: int, accelerator: Accelerator) -> Tensor:
    """The teacher's logits [max example_id + 1, num_labels] in float32, one pass over the split.

    Examples go in order of length, so batches carry little padding; each row lands at its
    `example_id`. The forward runs as the live teacher's does: eval mode, the run's autocast.
    """
    train = data.train
    ids = train["example_id"]
    lengths = [len(x) for x in train["input_ids"]]
    order = sorted(range(len(train)), key=lambda i: lengths[i])
    table: Tensor | None = None
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            columns = train[indices]
            features = [dict(zip(columns, values)) for values in zip(*columns.values())]
            batch = data.collate(features)
            inputs = {
                k: v.to(accelerator.device)
                for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            with accelerator.autocast():
                logits = teacher(**inputs).logits.float().cpu()
            if table is None:
                table = torch.full((max(ids) + 1, logits.shape[-1]), float("nan"))
            table[torch.as_tensor([ids[i] for i in indices])] = logits
    finally:
        teacher.train(was_training)
    assert table is not None, "empty training split"
    return table
