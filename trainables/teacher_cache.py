"""The teacher's logits for every training example, computed once and shared by a sweep's trials.

When every term of a training stage reads only the teacher's logits (`kd`) and the teacher runs
without dropout, the teacher's output for an example is the same in every epoch of every trial
that uses the same teacher and the same tokenised data. `TeacherLogitsCache` then runs the teacher
once over the training split (eval mode, no gradient, under the run's autocast), keeps the logits
in one file under `<cache root>/teacher_logits/`, and serves `ModelView(logits=...)` by the
batch's `example_id`; later trials, in this process or another, load the file and never run the
teacher. Stages whose objectives read hidden states or attention keep the live teacher.

The file is keyed by the teacher's identity (its directory, the size and modification time of its
files, a hash of its classification head), a hash of the tokenised training split's content
(which covers the tokenizer, the sample limits and truncation at `max_seq_length`),
`max_seq_length` itself and the mixed-precision mode. It is written under an exclusive lock to a
temporary name and renamed into place, so concurrent trials neither corrupt it nor compute it
twice; a file that cannot be read is rebuilt.

`trainables.run.distill` gives every task-specific run one; pre-training runs need hidden states.
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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainables.data import cache_root
from trainables.views import ModelView

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from trainables.distiller import StagePlan
    from trainables.training import DistillationLoop

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the key changes
CACHE_SUBDIR = "teacher_logits"
# Objectives whose only read of the teacher is `batch.teacher.logits`.
LOGITS_ONLY_OBJECTIVES = frozenset({"kd"})
# Files that make a model directory's weights and architecture.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth")


def logits_only(stage: StagePlan) -> bool:
    """Whether every term of `stage` reads only the teacher's logits."""
    return bool(stage.terms) and all(t.name in LOGITS_ONLY_OBJECTIVES for t in stage.terms)


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
    """Serves the teacher's logits by example id for stages that need nothing else from it.

    One object per run; the file it reads or writes is shared by every run with the same key.
    `passes_computed` counts the teacher passes over the training split this object made (0 when it
    reused a file), for benchmarks and tests.
    """

    def __init__(self, cache_dir: Path | str | None = None) -> None:
        self.root = cache_root(cache_dir) / CACHE_SUBDIR
        self.path: Path | None = None
        self.passes_computed = 0
        self._logits: Tensor | None = None
        self._disabled = False

    # --- called by DistillationLoop._teacher_view -----------------------------------------------

    def serves(self, stage: StagePlan, loop: DistillationLoop) -> bool:
        """True when `stage` reads only logits and the teacher is deterministic (no dropout)."""
        return (
            not self._disabled
            and logits_only(stage)
            and loop.teacher is not None
            and not loop.teacher.training
        )

    def view(self, batch: dict[str, Tensor], loop: DistillationLoop) -> ModelView:
        """The teacher's view of `batch` from the cache: logits only."""
        if self._logits is None:
            reason = None
            if "example_id" not in batch:
                reason = "batches carry no example_id"
            elif teacher_identity(loop.accelerator.unwrap_model(loop.teacher)) is None:
                reason = "the teacher has no name_or_path to key the file by"
            if reason is not None:  # run the teacher live, as without a cache
                log.warning("teacher logits not cached: %s", reason)
                self._disabled = True
                from trainables.models import forward_view

                return forward_view(loop.teacher, batch, need_qkv=False)
            self._logits = self._load_or_build(loop).to(loop.accelerator.device)
        ids = batch["example_id"].to(self._logits.device).long()
        return ModelView(logits=self._logits.index_select(0, ids))

    # --- the file ---------------------------------------------------------------------------------

    def key(self, loop: DistillationLoop) -> dict[str, Any]:
        teacher = loop.accelerator.unwrap_model(loop.teacher)
        return {
            "format": CACHE_FORMAT,
            "teacher": teacher_identity(teacher),
            "data": dataset_content_hash(loop.data.train),
            "rows": len(loop.data.train),
            "max_seq_length": loop.training.max_seq_length,
            "precision": str(loop.accelerator.mixed_precision),
        }

    def _load_or_build(self, loop: DistillationLoop) -> Tensor:
        key = self.key(loop)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = self.root / f"{digest}.pt"
        accelerator = loop.accelerator
        if accelerator.is_main_process:
            logits = self._read(self.path, key)
            if logits is None:
                with exclusive_lock(self.path.with_suffix(".lock")):
                    logits = self._read(self.path, key)  # another trial may have built it meanwhile
                    if logits is None:
                        logits = compute_logits(loop)
                        self.passes_computed += 1
                        self._write(self.path, key, logits)
                        log.info("teacher logits of %d examples cached at %s", len(loop.data.train), self.path)
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


@torch.no_grad()
def compute_logits(loop: DistillationLoop) -> Tensor:
    """The teacher's logits [max example_id + 1, num_labels] in float32, one pass over the split.

    Examples go in order of length, so batches carry little padding; each row lands at its
    `example_id`. The forward runs as the live teacher's does: eval mode, the run's autocast.
    """
    train = loop.data.train
    teacher = loop.teacher
    ids = train["example_id"]
    lengths = [len(x) for x in train["input_ids"]]
    order = sorted(range(len(train)), key=lambda i: lengths[i])
    size = loop.training.per_device_eval_batch_size
    table: Tensor | None = None
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, len(order), size):
            indices = order[start : start + size]
            columns = train[indices]
            features = [dict(zip(columns, values)) for values in zip(*columns.values())]
            batch = loop.data.collate(features)
            inputs = {
                k: v.to(loop.accelerator.device)
                for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            with loop.accelerator.autocast():
                logits = teacher(**inputs).logits.float().cpu()
            if table is None:
                table = torch.full((max(ids) + 1, logits.shape[-1]), float("nan"))
            table[torch.as_tensor([ids[i] for i in indices])] = logits
    finally:
        teacher.train(was_training)
    assert table is not None, "empty training split"
    return table
