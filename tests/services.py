"""The processes tests start (a local Ray cluster, an `mlflow server`) and how tests wait on them.

Every wait polls a condition the code under test makes true, with a deadline that only fires when
something is wrong; on timeout it says what it waited for and what it saw last. Whatever a helper
starts, its caller stops in a `finally` (or a fixture's teardown), also when the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from orchestrator.tracking import without_server_jobs

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = ROOT / "cluster" / "local"
VENV_BIN = Path(sys.executable).parent
POLL_S = 0.2

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 300, seen: Callable[[], object] | None = None) -> T:
    """Poll `condition` until it is truthy and return its value; fail naming `what` and what `seen` shows."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}; saw: {seen() if seen else value!r}"[:4000])
        time.sleep(POLL_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on SQLite in `folder`, once /health answers; stop it with `kill_group`."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--default-artifact-root", str(folder / "server-artifacts"), "--workers", "1"],
        env=without_server_jobs(dict(os.environ)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: server.poll() is not None or answers(f"http://127.0.0.1:{port}/health"),
                 what=f"mlflow server on port {port}", timeout=180)
    except BaseException:
        kill_group(server)
        raise
    assert server.poll() is None, f"mlflow server exited with {server.returncode}"
    return server


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started with `start_new_session=True` and everything it started; reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def script_env(**extra: str) -> dict[str, str]:
    """The environment for cluster/ scripts: this venv's `ray` on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (Ray's daemons name their temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@dataclass
class LocalCluster:
    """A Ray cluster on 127.0.0.1 started by the project's own recipe, cluster/local/start-cluster.sh."""

    address: str
    temp_dir: str
    env: dict[str, str]
    started: subprocess.CompletedProcess

    @classmethod
    def start(cls, head_cpus: int = 2, workers: int = 0, cpus_per_worker: int = 1) -> LocalCluster:
        # Ray's socket paths must stay under 107 characters: a short folder of its own under /tmp.
        temp_dir = tempfile.mkdtemp(prefix="dsray", dir="/tmp")
        port = free_port()
        env = script_env(RAY_PORT=str(port), RAY_TEMP_DIR=temp_dir, NUM_WORKERS=str(workers),
                         HEAD_CPUS=str(head_cpus), CPUS_PER_WORKER=str(cpus_per_worker), RAY_AUTH_MODE="token")
        cluster = cls(f"127.0.0.1:{port}", temp_dir, env, subprocess.CompletedProcess([], 1))
        try:
            cluster.started = subprocess.run([str(LOCAL_CLUSTER / "start-cluster.sh")], env=env,
                                             capture_output=True, text=True, timeout=180)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def ray_dir(self) -> Path:
        """Ray's own temp folder (its sessions), which the recipe keeps inside its private temp folder."""
        return Path(self.temp_dir) / "ray"

    def stop(self) -> list[str]:
        """Stop every process of this cluster (and only those); returns what had to be killed."""
        subprocess.run([str(LOCAL_CLUSTER / "stop-cluster.sh")], env=self.env | {"REMOVE_TEMP": "1"},
                       capture_output=True, text=True, timeout=120)
        deadline = time.monotonic() + 20
        while (left := processes_mentioning(self.temp_dir)) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for line in left:
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)
        return left
