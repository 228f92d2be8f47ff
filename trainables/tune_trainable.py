"""Ray Tune glue: a trial's config -> `RunConfig` -> `distill`, reporting every evaluation.

The only module of `trainables` that imports Ray. Trials run in their own working directory,
so every path handed to the run is absolute. After a failure or a scheduler pause Tune hands the
last checkpoint back through `tune.get_checkpoint()` and the run resumes from it exactly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from ray import tune

from trainables.config import TrialTemplate
from trainables.launch import run_data_parallel
from trainables.pretrain import pretrain
from trainables.run import distill
from trainables.training import NonFiniteLossError

DIVERGED_MARKER = "diverged.txt"


def distillation_trial(config: dict[str, Any], template: TrialTemplate, cpus_per_trial: int = 1) -> None:
    """One Tune trial: one distillation run (task-specific or pre-training), data-parallel if asked."""
    torch.set_num_threads(max(1, cpus_per_trial))
    trial_dir = Path(tune.get_context().get_trial_dir()).resolve()
    cfg = template.resolve(config).model_copy(update={"output_dir": trial_dir / "run"})

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
            # Tune has copied it to the sweep's storage before `report` returns: a second copy
            # in the trial folder would only fill the disk (199 MB per checkpoint on the bench student).
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    diverged = trial_dir / DIVERGED_MARKER
    if diverged.exists():
        # Tune retries failed trials; a diverged run would only diverge again from its checkpoint.
        raise NonFiniteLossError(diverged.read_text())
    run = pretrain if template.kind == "pretrain" else distill
    try:
        if cfg.training.num_processes > 1:
            run_data_parallel(run, cfg, cfg.training.num_processes, report, resume_from)
        else:
            run(cfg, report, resume_from)
    except NonFiniteLossError as err:
        diverged.write_text(str(err))
        raise
