"""Ray Tune glue: a trial's resolved `RunConfig` -> `distill` (or `pretrain`), reporting every evaluation.

The only module of `trainables` that imports Ray. The driver resolves each trial's RunConfig and
puts it, as JSON, in the trial's config under `RUN_CONFIG`; this module knows nothing of sweeps.
Trials run in their own working directory, so every path handed to the run is absolute; the
run's own output goes to a private scratch folder. After a failure or a scheduler pause Tune hands the
last checkpoint back through `tune.get_checkpoint()` and the run resumes from it exactly.
Checkpoints live in Tune's storage only: the trial's own copies are deleted once Tune has them,
and a trial leaves its worker with nothing of its models, ready for the next trial.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from trainables.config import CONFIG_OF_RUN, RUN_CONFIG
from trainables.launch import run_data_parallel
from trainables.models import live_models
from trainables.pretrain import pretrain
from trainables.run import distill
from trainables.system_metrics import SystemSampler
from trainables.errors import NonFiniteLossError
from trainables.training import BEST_STUDENT

RUNS = {"distill": distill, "pretrain": pretrain}
DIVERGED_MARKER = "diverged.txt"
RESTORED_CHECKPOINT = "restored_checkpoint"
SCRATCH_NOTE = ".scratch"  # in the trial folder: the path of its scratch folder on its node

log = logging.getLogger(__name__)


def distillation_trial(config: dict[str, Any], kind: str = "distill", cpus_per_trial: int = 1) -> None:
    """One Tune trial: one distillation run (task-specific or pre-training), data-parallel if asked.

    `config[RUN_CONFIG]` is the resolved RunConfig, or why the trial's draw is no valid config.
    """
    resolved = config[RUN_CONFIG]
    if isinstance(resolved, str):
        raise ValueError(resolved)
    config_class, run = CONFIG_OF_RUN[kind], RUNS[kind]
    torch.set_num_threads(max(1, cpus_per_trial))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trial_dir = Path(tune.get_context().get_trial_dir()).resolve()
    diverged = trial_dir / DIVERGED_MARKER
    if diverged.exists():
        # Tune retries failed trials; a diverged run would only diverge again from its checkpoint.
        raise NonFiniteLossError(diverged.read_text())
    # The run writes outside the trial folder: on the driver's node that folder can be Tune's staging
    # folder, which the driver copies to storage as it is, checkpoints and all, and never prunes.
    scratch = trial_scratch(trial_dir)
    cfg = config_class.model_validate(resolved).model_copy(update={"output_dir": scratch / "run"})
    system = SystemSampler()

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        numeric = {k: v for k, v in metrics.items() if not isinstance(v, str)} | system.take()
        if checkpoint_dir is None:
            tune.report(numeric)
            return
        try:
            tune.report(numeric, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        finally:
            # Tune has copied it to the sweep's storage before `report` returns, and before it raises
            # SystemExit there to stop the trial (a scheduler's decision, or max_t reached): a second
            # copy in the trial folder would only fill the disk (199 MB per checkpoint on the bench student).
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    stop: SystemExit | None = None
    try:
        checkpoint = tune.get_checkpoint()
        resume_from = None if checkpoint is None else Path(checkpoint.to_directory(str(scratch / RESTORED_CHECKPOINT)))
        if cfg.training.num_processes > 1:
            run_data_parallel(run, cfg, cfg.training.num_processes, report, resume_from)
        else:
            run(cfg, report, resume_from)
    except NonFiniteLossError as err:
        diverged.write_text(str(err))
        raise
    except SystemExit as err:
        # Tune stops a trial by raising SystemExit inside `tune.report`. Its traceback holds every
        # frame of the run, models included: keep only the code, so the memory can go below.
        stop = SystemExit(err.code)
    finally:
        system.close()
        remove_copies(scratch, cfg.output_dir)
    release_memory()
    if stop is not None:
        raise stop


def trial_scratch(trial_dir: Path) -> Path:
    """A new folder for one attempt of a trial, that only this user can enter (mkdtemp: 0700, unique name).

    A fixed name under /tmp would be the first user's on a shared node: every other user's trials
    would fail, and its owner could read the checkpoints, swap one before it loads, or turn the
    cleanup elsewhere through a symlink. The trial folder notes the path, so that the next attempt
    on this node removes what a killed one left (checkpoints and all).
    """
    remove_earlier_scratch(trial_dir)
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(trial_dir)))
    (trial_dir / SCRATCH_NOTE).write_text(str(scratch))
    return scratch


def scratch_prefix(trial_dir: Path) -> str:
    return f"distillsweep-{trial_dir.name}-"


def remove_earlier_scratch(trial_dir: Path) -> None:
    """Delete the scratch folder an earlier attempt of this trial noted, if it is one this code made
    for this trial and this user owns: a note that names anything else is ignored."""
    note = trial_dir / SCRATCH_NOTE
    if not note.is_file():
        return
    earlier = Path(note.read_text().strip())
    if earlier.parent != Path(tempfile.gettempdir()) or not earlier.name.startswith(scratch_prefix(trial_dir)):
        return
    try:
        info = earlier.lstat()
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
        shutil.rmtree(earlier, ignore_errors=True)


def remove_copies(scratch: Path, run_dir: Path) -> None:
    """Delete, inside `scratch` only, the run's own copies of what Tune's storage holds: the exported
    student (also in the final checkpoint), the best student's weights (in every checkpoint), the
    last metrics (in result.json too) and the checkpoint it resumed from. Pre-training's `students/`
    snapshots stay, and with them the folders that hold them."""
    for copy in (run_dir / "checkpoints", run_dir / "student", scratch / RESTORED_CHECKPOINT):
        shutil.rmtree(copy, ignore_errors=True)
    for name in (BEST_STUDENT, "metrics.json"):
        (run_dir / name).unlink(missing_ok=True)
    for empty in (run_dir, scratch):
        if empty.exists() and not any(empty.iterdir()):
            empty.rmdir()


def release_memory() -> None:
    """Free the ended trial's models now, before this worker takes the next trial (`reuse_actors`).

    Modules sit in reference cycles (hooks, Accelerate's forward wrappers) that only the cycle
    collector frees, and PyTorch's CUDA allocator keeps freed blocks for this process: other
    processes sharing the GPU (fractional GPUs) get them back only through `empty_cache`.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    left = live_models()
    if left:
        log.warning(
            "this worker still holds %d model(s) of the trial that ended (%s): their memory is not freed for "
            "the next trial", len(left), ", ".join(sorted({type(m).__name__ for m in left})),
        )
