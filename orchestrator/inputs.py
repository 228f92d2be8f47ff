"""What each trial trained and was scored on, as MLflow dataset inputs (the runs page's Dataset column).

Described once per task before launch, from the task's files (name, source path, digest of the
bytes, number of rows) or from its hub dataset (path, subset and split; rows where the local
`datasets` cache knows them), and journaled with each trial's run like every other record.
A trial that trains on a subset (`max_train_samples`) still names the whole split here; its
params say how many rows it took.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trainables.config import RunConfig
from trainables.tasks import TaskSpec, read_local_file, resolve_task

GLUE_HUB_PATH = "nyu-mll/glue"
CONTEXTS = {"train": "training", "validation": "evaluation"}
DIGEST_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def hub_rows(subset: str, split: str) -> int | None:
    """Rows of a GLUE split from the `datasets` cache's metadata; None where it holds none."""
    try:
        from datasets import load_dataset_builder

        info = load_dataset_builder(GLUE_HUB_PATH, subset).info
        return info.splits[split].num_examples if info.splits and split in info.splits else None
    except Exception:  # offline without the dataset cached: the source is still named
        return None


def task_inputs(spec: TaskSpec) -> list[dict[str, Any]]:
    """MLflow dataset fields (name, digest, source_type, source, profile) and context, per split."""
    described = []
    for split, path, hub_split in (("train", spec.train_file, spec.train_split),
                                   ("validation", spec.validation_file, spec.eval_split)):
        if path is not None:
            rows: int | None = read_local_file(path).num_rows
            source_type, source, digest = "local", {"uri": str(path)}, file_digest(path)
        else:
            rows = hub_rows(spec.glue_subset or spec.name, hub_split)
            source_type = "hugging_face"
            source = {"path": GLUE_HUB_PATH, "config_name": spec.glue_subset, "split": hub_split}
            digest = hashlib.md5(json.dumps(source, sort_keys=True).encode(), usedforsecurity=False).hexdigest()[:8]
        described.append({
            "name": f"{spec.name}-{split}", "digest": digest, "source_type": source_type,
            "source": json.dumps(source), "profile": json.dumps({"num_rows": rows}) if rows is not None else None,
            "context": CONTEXTS[split],
        })
    return described


def dataset_inputs(described: list[dict[str, Any]]) -> list[Any]:
    """MLflow entities from `task_inputs`' fields (the journal stores the fields)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"]),
                     tags=[InputTag("mlflow.data.context", d["context"])])
        for d in described
    ]


def describe_tasks(configs: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """Each task's train and validation sets, for the MLflow runs' Dataset column (distillation only)."""
    described = {}
    for cfg in configs:
        if isinstance(cfg, RunConfig) and cfg.task_name not in described:
            described[cfg.task_name] = task_inputs(resolve_task(cfg.task))
    return described
