"""How a trial ended: completed, stopped by the scheduler at step N of M, failed, or diverged.

One rule, used by the MLflow tracker (tags and run status), `status` and `report`, so that an
early-stopped trial is never shown as a finished one. A trial counts as completed only when it
reported its last step (`step == total_steps`); Tune's own state says TERMINATED for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from trainables.errors import DIVERGED_MESSAGE

OutcomeKind = Literal["completed", "stopped", "failed", "diverged", "running", "pending"]
OUTCOME_FILE = "outcome.json"
ENDED_STATES = ("TERMINATED", "ERROR")  # Tune states a trial leaves only by a resume
MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED", "diverged": "FAILED"}


@dataclass(frozen=True)
class TrialOutcome:
    kind: OutcomeKind
    step: int = 0
    total_steps: int | None = None
    error: str = ""

    @property
    def detail(self) -> str:
        """A sentence for tables and tags: 'stopped by the scheduler at step 15 of 60'."""
        of = f" of {self.total_steps}" if self.total_steps else ""
        if self.kind == "completed":
            return f"completed {self.step} steps"
        if self.kind == "stopped":
            return f"stopped by the scheduler at step {self.step}{of}"
        if self.kind in ("failed", "diverged"):
            return f"{self.kind} at step {self.step}{of}: {self.error}" if self.error else f"{self.kind} at step {self.step}{of}"
        return f"{self.kind} at step {self.step}{of}"

    @property
    def mlflow_status(self) -> str:
        return MLFLOW_STATUS.get(self.kind, "RUNNING")

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.kind, "step": self.step, "total_steps": self.total_steps,
                "detail": self.detail, "error": self.error}


def trial_outcome(tune_status: str, last_result: dict[str, Any] | None, error: str = "") -> TrialOutcome:
    """The outcome from Tune's trial status, the trial's last reported result and its error text."""
    result = last_result or {}
    step = int(result.get("step", 0) or 0)
    total = result.get("total_steps")
    total_steps = int(total) if total else None
    if tune_status == "ERROR":
        kind: OutcomeKind = "diverged" if DIVERGED_MESSAGE in error else "failed"
        return TrialOutcome(kind, step, total_steps, error)
    if tune_status == "TERMINATED":
        finished = step >= total_steps if total_steps else bool(result.get("done"))
        return TrialOutcome("completed" if finished else "stopped", step, total_steps)
    if tune_status == "PENDING":
        return TrialOutcome("pending", step, total_steps)
    return TrialOutcome("running", step, total_steps)
