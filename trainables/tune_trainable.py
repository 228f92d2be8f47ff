"""Ray Tune glue: a trial's config -> `RunConfig` -> `distill`, reporting every evaluation.

The only module of `trainables` that imports Ray. Trials run in their own working directory,
so every path handed to the run is absolute. After a failure or a scheduler pause Tune hands the
last checkpoint back through `tune.get_checkpoint()` and the run resumes from it exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from ray import tune

from trainables.config import resolve_run_config
from trainables.run import distill



def decode_labels(config: dict[str, Any], choices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Optuna suggests list-valued categories by label; map them back to their values."""
    return {k: choices[k].get(v, v) if k in choices and isinstance(v, str) else v for k, v in config.items()}


def distillation_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    teachers: dict[str, str] | None = None,
    choices: dict[str, dict[str, Any]] | None = None,
    cpus_per_trial: int = 1,
) -> None:
    """One Tune trial: one distillation run."""
    torch.set_num_threads(max(1, cpus_per_trial))
    assignments = {k: v for k, v in decode_labels(config, choices or {}).items() if v is not None}
    cfg = resolve_run_config(base, assignments)
    task = cfg.task if isinstance(cfg.task, str) else cfg.task.name
    if teachers and task in teachers:
        cfg = cfg.model_copy(update={"teacher": teachers[task]})
    trial_dir = Path(tune.get_context().get_trial_dir()).resolve()
    cfg = cfg.model_copy(update={"output_dir": trial_dir / "run"})

    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory(str(trial_dir / "restored_checkpoint")))

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        numeric = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        if checkpoint_dir is None:
            tune.report(numeric)
        else:
            tune.report(numeric, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    distill(cfg, report, resume_from)
