"""Where cached work lives on disk (tokenised splits, corpus blocks, teachers, teacher logits), and
how a cache entry is written so that concurrent trials never see half of one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from datasets import DatasetDict


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """`cache_dir`, else $DISTILLSWEEP_CACHE, else ~/.cache/distillsweep; absolute for Ray trials."""
    root = cache_dir or os.environ.get("DISTILLSWEEP_CACHE") or "~/.cache/distillsweep"
    return Path(root).expanduser().resolve()


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
