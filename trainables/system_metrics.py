"""System metrics of a trial, sampled as MLflow's own monitors do and reported with its evaluations.

MLflow's `SystemMetricsMonitor` sends its samples straight to the tracking server from the
trial's process, so a server that is down loses them and one that is slow holds the trial's
thread. Here a background thread samples with the same monitors (CPU and memory, MLflow's own
rewritten here; NVIDIA or AMD GPUs where their libraries see one) and each report carries the
means since the previous one under MLflow's names (`system/cpu_utilization_percentage`,
`system/gpu_0_utilization_percentage`, ...), which the MLflow UI shows in its System metrics tab.
They travel with the trial's metrics through the sweep's journal, at the evaluation's step. CPU,
memory and GPU figures are the node's and each device's as the driver libraries see them, not
this trial's share.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections import defaultdict
from typing import Any

import psutil

SYSTEM_PREFIX = "system/"
SAMPLING_INTERVAL_S = 5.0


class CpuMemoryMonitor:
    """MLflow's `CPUMonitor` (its names, its means to one decimal) without importing MLflow, which
    costs a trial's process about 2.5 s of its start on a 2-core EPYC: MLflow's monitors are
    imported only where a GPU binding is installed."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def collect_metrics(self) -> None:
        memory = psutil.virtual_memory()
        self.metrics["cpu_utilization_percentage"].append(psutil.cpu_percent())
        self.metrics["system_memory_usage_megabytes"].append(memory.used / 1e6)
        self.metrics["system_memory_usage_percentage"].append(memory.used / memory.total * 100)

    def aggregate_metrics(self) -> dict[str, float]:
        return {name: round(sum(values) / len(values), 1) for name, values in self.metrics.items()}

    def clear_metrics(self) -> None:
        self.metrics.clear()


# binding -> MLflow's monitor that needs it: without the binding the monitor cannot start
GPU_MONITORS = {"pynvml": ("gpu_monitor", "GPUMonitor"), "pyrsmi": ("rocm_monitor", "ROCMMonitor")}


def available_monitors() -> list[Any]:
    monitors: list[Any] = [CpuMemoryMonitor()]
    for binding, (module, name) in GPU_MONITORS.items():
        if importlib.util.find_spec(binding) is None:
            continue
        try:
            monitors.append(getattr(importlib.import_module(f"mlflow.system_metrics.metrics.{module}"), name)())
            break
        except Exception:  # no such GPU or no driver library: nothing to sample
            logging.getLogger(__name__).debug("no %s", name, exc_info=True)
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
