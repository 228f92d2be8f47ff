"""Each benchmark runs once at its smallest size: it exits 0 and writes its JSON (bench/, issue #5).

Benchmarks are not timed tests: the figures in BENCHMARKS.md come from `--size default` runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["throughput", "precision", "step_profile", "padding", "teacher_cache", "packing", "early_stopping"]


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """One cache for all benchmarks: the tiny teacher and tokenised data are built once."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_at_smallest_size(name, bench_cache, tmp_path, ray_address):
    if name == "throughput" and importlib.util.find_spec("torchdistill") is None:
        pytest.skip("the throughput benchmark needs torchdistill: pip install --no-deps torchdistill==1.1.5")
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(RAY_ADDRESS=ray_address, RAY_AUTH_MODE="token")  # the benches that sweep join the tests' cluster
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--size", "smallest", "--out", str(out), "--cache-dir", str(bench_cache)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["size"] == "smallest"
    assert result["machine"]["cpu"] and result["machine"]["date"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the JSON line on stdout
