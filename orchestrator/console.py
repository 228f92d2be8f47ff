"""What a running sweep shows on the console: one live line, not Ray's tables.

Trials done (completed, stopped by the scheduler, failed), running, the best score so far and its
trial, time elapsed and an estimate of the time left. On a terminal the line updates in place; in a
log or a pipe, a line is printed when a trial ends, at most one every 10 s. Tune's trial tables and
its log (a failed trial's traceback) go to `SWEEP_DIR/ray.log` and the trials' own output stays in
Ray's session logs (`--verbose` brings both back).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ray.tune import Callback, CLIReporter
from rich.console import Console
from rich.live import Live
from rich.text import Text

from orchestrator.mlflow_callback import run_name
from orchestrator.outcome import trial_outcome
from orchestrator.trials import TrialTemplate

SCORE = "score"
RAY_LOG = "ray.log"
LOG_EVERY_S = 10.0


def log_tune_to(path: Path) -> None:
    """Tune's own log lines (a failed trial's traceback, warnings) go to the sweep's ray.log; the
    progress line counts failures and the sweep's summary names each with its error."""
    tune_logger = logging.getLogger("ray.tune")
    for handler in [h for h in tune_logger.handlers if h.get_name() == RAY_LOG]:  # an earlier sweep's (studies)
        tune_logger.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path)
    handler.set_name(RAY_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    tune_logger.addHandler(handler)
    tune_logger.propagate = False


class TableLog(CLIReporter):
    """Tune's trial tables, appended to a file instead of the console."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(max_report_frequency=30, **kwargs)
        self.path = path

    def _print(self, msg: str) -> None:
        with open(self.path, "a") as log:
            log.write(msg + "\n")


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class SweepProgress(Callback):
    """Counts trials by how they ended and keeps the best score any trial reported."""

    def __init__(self, total: int, template: TrialTemplate) -> None:
        self.total = total
        self.template = template
        self._reset()

    def _reset(self) -> None:
        self.ended: dict[str, str] = {}  # trial id -> outcome kind
        self.running = 0
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()
        self.ended_before = 0  # trials that ended before this driver started (a resumed sweep)
        self._live: Live | None = None
        self._trials: list[Any] = []
        self._printed = -LOG_EVERY_S

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment
        return {"total": self.total, "template": self.template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.total, self.template = state["total"], state["template"]
        self._reset()

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()
        console = Console(file=sys.stdout)
        if console.is_terminal:
            self._live = Live(self, console=console, refresh_per_second=1, transient=False)
            self._live.start()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._trials and trials:  # first step: count what a resumed sweep had already ended
            self._trials = trials
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self._end(trial, trial.status)
            self.ended_before = len(self.ended)
        self._trials = trials

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update_running(trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        score = result.get(SCORE)
        if isinstance(score, (int, float)) and (self.best is None or score > self.best[0]):
            try:
                name = run_name(self.template.run_config_of(trial.config), trial.trial_id)
            except ValueError:
                name = trial.trial_id
            self.best = (float(score), name)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "TERMINATED")
        self._update_running(trials)
        self._print_if_not_live()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "ERROR")
        self._update_running(trials)
        self._print_if_not_live()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._update_running(trials)
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _end(self, trial: Any, status: str) -> None:
        error = ""
        if status == "ERROR" and getattr(trial, "error_file", None):
            try:
                error = open(trial.error_file).read()
            except OSError:
                pass
        self.ended[trial.trial_id] = trial_outcome(status, trial.last_result, error).kind

    def _update_running(self, trials: list) -> None:
        self.running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)

    def _print_if_not_live(self) -> None:
        """In a log, a line at most every `LOG_EVERY_S` seconds, and the last one always."""
        now = time.monotonic()
        if self._live is None and (now - self._printed >= LOG_EVERY_S or len(self.ended) >= self.total):
            self._printed = now
            print(self.line(), flush=True)

    def line(self) -> str:
        counts = Counter(self.ended.values())
        done = len(self.ended)
        parts = [f"trials {done}/{self.total} done"]
        kinds = [f"{counts[k]} {k}" for k in ("completed", "stopped", "failed", "diverged") if counts[k]]
        if kinds:
            parts[0] += f" ({', '.join(kinds)})"
        parts.append(f"{self.running} running")
        if self.best is not None:
            parts.append(f"best score {self.best[0]:.4f} ({self.best[1]})")
        elapsed = time.monotonic() - self.started
        parts.append(f"{duration(elapsed)} elapsed")
        ended_here = done - self.ended_before
        if ended_here and done < self.total:
            left = elapsed / ended_here * (self.total - done)
            parts.append(f"about {duration(left)} left")
        return " | ".join(parts)

    def __rich__(self) -> Text:
        return Text(self.line())
