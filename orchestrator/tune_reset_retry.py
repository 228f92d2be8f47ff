"""Retries for a trial whose reused worker dies while Tune hands it over (Ray Tune 2.x, `reuse_actors`).

Tune gives the next trial to a finished trial's worker by calling `reset` on it. If that worker dies
then (its node is lost, its process killed), Tune handles the one death twice: its actor-failure
callback requeues the trial as a retry, and the reset task's error callback then finds the trial
PENDING and ends it in ERROR after 0 iterations, whatever `max_failures` allows. The trial also stays
marked as resetting, which would leave a retry waiting for a worker forever.

`install()` wraps `TuneController._trial_task_failure` so that the second report of that death is
dropped and the trial unmarked. Only the driver needs it; it is idempotent. A PENDING trial meets a
worker's death in no other task (Tune sets a trial RUNNING before its other tasks), so nothing else
changes. `tests/test_faults.py` reproduces the double handling on a real Tune run.
"""

from __future__ import annotations

from typing import Any

_WRAPPED = "_distillsweep_reset_retry"


def install() -> None:
    from ray.exceptions import RayActorError
    from ray.tune.experiment import Trial
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController._trial_task_failure
    if getattr(original, _WRAPPED, False):
        return

    def trial_task_failure(self: Any, trial: Trial, exception: Exception) -> None:
        if isinstance(exception, RayActorError) and trial.status == Trial.PENDING:
            # The reset task of a worker that died: Tune's actor-failure callback, which runs first,
            # has already counted the failure and requeued the trial. (With its retries spent, that
            # callback ended it in ERROR, and the trial does not reach this branch.)
            self._resetting_trials.discard(trial)
            return
        original(self, trial, exception)

    setattr(trial_task_failure, _WRAPPED, True)
    TuneController._trial_task_failure = trial_task_failure
