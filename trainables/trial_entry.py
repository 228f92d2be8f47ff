"""The function Ray Tune runs for each trial, importable without the training stack.

The sweep's driver hands Tune this function, which Ray pickles by reference: importing
`trainables.tune_trainable` there would load torch's and transformers' model code (seconds of CPU
at every `sweep`, `resume` and `study`) in a process that never trains. The trial's worker imports
it when the trial starts.
"""

from __future__ import annotations

from typing import Any


def distillation_trial(config: dict[str, Any], kind: str = "distill", cpus_per_trial: int = 1) -> None:
    """One trial: see `trainables.tune_trainable.distillation_trial`."""
    from trainables.tune_trainable import distillation_trial as run_trial

    run_trial(config, kind=kind, cpus_per_trial=cpus_per_trial)
