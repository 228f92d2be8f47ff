"""System metrics of a trial, sampled with MLflow's own monitors and reported with its evaluations.

MLflow's `SystemMetricsMonitor` sends its samples straight to the tracking server from the
trial's process, so a server that is down loses them and one that is slow holds the trial's
thread. Here a background thread samples with the same monitors (CPU and memory; NVIDIA or AMD
GPUs where their libraries see one) and each report carries the means since the previous one
under MLflow's names (`system/cpu_utilization_percentage`, `system/gpu_0_utilization_percentage`,
...), which the MLflow UI shows in its System metrics tab. They travel with the trial's metrics
through the sweep's journal, at the evaluation's step. CPU, memory and GPU figures are the
node's and each device's as the driver libraries see them, not this trial's share.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psutil

SYSTEM_PREFIX = "system/"
SAMPLING_INTERVAL_S = 5.0


def available_monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors: list[Any] = [CPUMonitor()]
    for gpu_monitor in (GPUMonitor, ROCMMonitor):
        try:
            monitors.append(gpu_monitor())
            break
        except Exception:  # no such GPU or no driver library: nothing to sample
            logging.getLogger(__name__).debug("no %s", gpu_monitor.__name__, exc_info=True)
    return monitors


class SystemSampler:
    """Samples every `interval_s` seconds until `close`; `take()` returns and clears the means."""

    def __init__(self, interval_s: float = SAMPLING_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.monitors = available_monitors()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        psutil.cpu_percent()  # its first call has nothing to compare with and returns 0
        self._thread = threading.Thread(target=self._run, name="distillsweep-system-metrics", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            for monitor in self.monitors:
                monitor.collect_metrics()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def take(self) -> dict[str, float]:
        if not any(monitor.metrics for monitor in self.monitors):
            self._sample()  # a report sooner than the first interval still gets a figure
        with self._lock:
            means: dict[str, float] = {}
            for monitor in self.monitors:
                if monitor.metrics:
                    means.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        return {f"{SYSTEM_PREFIX}{name}": float(value) for name, value in means.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
