"""A trial's system metrics: MLflow's names and means, without MLflow imported into the trial."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

from trainables.system_metrics import GPU_MONITORS, CpuMemoryMonitor, SystemSampler


def test_cpu_monitor_reports_what_mlflows_reports_under_its_names():
    ours, mlflows = CpuMemoryMonitor(), CPUMonitor()
    for monitor in (ours, mlflows, ours, mlflows):
        monitor.collect_metrics()
    mine, theirs = ours.aggregate_metrics(), mlflows.aggregate_metrics()
    assert mine.keys() == theirs.keys()
    assert mine["system_memory_usage_megabytes"] == pytest.approx(theirs["system_memory_usage_megabytes"], rel=0.05)
    assert 0 <= mine["cpu_utilization_percentage"] <= 100
    ours.clear_metrics()
    assert not ours.metrics


def test_a_sampler_reports_means_since_the_last_report_with_the_system_prefix():
    sampler = SystemSampler(interval_s=3600)
    try:
        first = sampler.take()
        assert set(first) == {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                              "system/system_memory_usage_percentage"}
        assert sampler.take().keys() == first.keys()  # sampled anew: nothing was left from the first report
    finally:
        sampler.close()


def test_sampling_imports_mlflow_only_where_a_gpu_binding_is_installed():
    """MLflow's import is a trial's 2 s; its monitors are needed only for GPUs."""
    code = ("import sys; from trainables.system_metrics import SystemSampler; s = SystemSampler(); s.take(); "
            "s.close(); print('mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bindings = any(importlib.util.find_spec(binding) for binding in GPU_MONITORS)
    assert done.stdout.strip() == str(bindings)
