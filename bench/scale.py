"""The study-size rehearsal (issue 11, items 4 and 5): the paper's grid shape, driven for real.

`python -m bench.scale --size smallest|small|full [--out DIR]` runs the space of
search_spaces/paper_task_specific.yaml (7 tasks x 9 objective mixes x 3 inits x 4 seeds = 756
trials at `full`; `smallest` and `small` take the first tasks, mixes, inits and seeds of the same
grids) with a tiny random 12-layer BERT teacher and seven tiny local CSV tasks named after the
GLUE ones, so that each trial is a few optimiser steps and what is measured is the driver, not
training. Everything else is real: a Ray cluster of two nodes on 127.0.0.1 that declare fake GPUs
(trials ask for half of one, so Ray's GPU placement and CUDA_VISIBLE_DEVICES are exercised while
torch, which has no CUDA here, trains on the CPU), a `mlflow server` on SQLite with its access log,
and the `distillsweep` CLI (`sweep`, `resume`, `sync`, `status`, `report`).

Faults in the same run: the worker node's raylet is killed at 25% of trials (a fresh worker joins
after), and at 50% the MLflow server is stopped, the driver SIGKILLed while it is down and the
sweep resumed with `distillsweep resume` before the server comes back. At the end every trial must
be in Tune and in MLflow exactly once, every evaluation exactly once with the results Tune has
(measurements such as throughput, taken anew when a restored trial replays a step, are checked for
presence only), and no run RUNNING; the bench exits 1 when that check fails.

Figures (printed as a table, written to DIR/scale.json): trials per minute, driver CPU per trial
and peak RSS, Tune experiment-state size, MLflow rows and requests, resume, status and report times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.common import ROOT, cpu_model, log, rounded
from orchestrator.journal import undelivered
from orchestrator.report import read_result_rows
from orchestrator.tracking import without_server_jobs

PAPER_SPACE = ROOT / "search_spaces" / "paper_task_specific.yaml"
SWEEP_NAME = "scale"
EXPERIMENT = "scale"
MARKER = ".distillsweep-scale"  # only a folder holding it is wiped at start
PAIR_TASKS = {"mnli", "qqp", "qnli", "mrpc", "rte"}
WORDS = ("the a film movie plot actor scene story good bad great awful fine dull bright dark long short "
         "question answer premise claim true false maybe never always often cat dog house tree river road "
         "city music song play read write run walk").split()


@dataclass(frozen=True)
class Size:
    """How many of each paper grid's values to take, and how long the MLflow outage lasts."""

    tasks: int
    mixes: int
    inits: int
    seeds: int
    outage_s: float

    @property
    def trials(self) -> int:
        return self.tasks * self.mixes * self.inits * self.seeds


SIZES = {
    "smallest": Size(tasks=2, mixes=2, inits=2, seeds=2, outage_s=8),    # 16 trials, CI
    "small": Size(tasks=4, mixes=9, inits=2, seeds=2, outage_s=20),      # 144
    "full": Size(tasks=7, mixes=9, inits=3, seeds=4, outage_s=60),       # 756, the paper's grid
}
NODE_CPUS, NODE_GPUS = 1, 4            # what each Ray node declares (head and worker alike)
# One CPU a trial puts one trial on each node (with half a CPU, Tune ran one a node anyway and
# could leave the worker idle, so losing it proved nothing); half a GPU keeps Ray's fractional
# GPU placement and CUDA_VISIBLE_DEVICES in play.
TRIAL_RESOURCES = {"cpu": 1, "gpu": 0.5}
TRAINING = {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 2, "max_seq_length": 32,
            "per_device_eval_batch_size": 32, "bf16": False, "mixed_precision": "no"}


# --- inputs: teacher, tasks, space ----------------------------------------------------------------


def make_teacher(folder: Path) -> Path:
    """A random 12-layer, 32-wide BERT (12 layers: the grid's init [0, 7, 11] needs them) with a
    WordPiece vocabulary of the task words only, so a checkpoint is kilobytes, not megabytes."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def write_tasks(folder: Path, names: list[str]) -> list[dict[str, Any]]:
    """One tiny binary CSV task per name (pairs for the GLUE pair tasks), as local task mappings."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for index, name in enumerate(names):
        rng = random.Random(index)
        columns = ["sentence1", "sentence2"] if name in PAIR_TASKS else ["sentence"]
        files = {}
        for split, rows in (("train", 64), ("validation", 32)):
            path = folder / f"{name}.{split}.csv"
            lines = [",".join([*columns, "label"])]
            for row in range(rows):
                texts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in columns]
                lines.append(",".join([*texts, str(row % 2)]))
            path.write_text("\n".join(lines) + "\n")
            files[split] = str(path)
        tasks.append({"name": name, "train_file": files["train"], "validation_file": files["validation"],
                      "text_columns": columns, "label_column": "label"})
    return tasks


def rehearsal_space(size: Size, teacher: Path, tasks_dir: Path, storage: Path, tracking_uri: str) -> dict[str, Any]:
    """The paper's space file with its grids cut to `size`, the tiny teacher and tasks, and a few steps.

    Kept from the paper: the grids' values and order, per-task learning rates and batches, stages
    (auto: intermediate mixes train in two stages), the optimiser recipe, no scheduler, max_failures.
    """
    spec = yaml.safe_load(PAPER_SPACE.read_text())
    space = spec["space"]
    task_names = space["task"]["grid"][: size.tasks]
    space["task"] = {"grid": write_tasks(tasks_dir, task_names)}
    space["objectives.mix"] = {"grid": space["objectives.mix"]["grid"][: size.mixes]}
    space["student.init"] = {"grid": space["student.init"]["grid"][: size.inits]}
    space["training.seed"] = {"grid": space["training.seed"]["grid"][: size.seeds]}
    spec["name"] = SWEEP_NAME
    spec["base"]["task"] = space["task"]["grid"][0]
    spec["base"]["teacher"] = str(teacher)
    spec["base"]["training"].update(TRAINING)
    spec["per_task"] = {task: overrides for task, overrides in spec["per_task"].items() if task in task_names}
    for overrides in spec["per_task"].values():
        # The tiny tasks are binary and report accuracy and F1; CoLA's Matthews correlation is GLUE's own.
        overrides.pop("training.metric_for_best_model", None)
    spec.pop("teacher_finetune")  # the tiny teacher is given, nothing is fine-tuned
    spec["resources"] = dict(TRIAL_RESOURCES)
    spec["storage"] = str(storage)
    spec["tracking"] = {"uri": tracking_uri, "experiment": EXPERIMENT}
    return spec


# --- processes: Ray nodes, MLflow server, drivers -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f} s")


def stop_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a process we started, then SIGKILL whatever of its tree is left (by pid, never by name)."""
    try:
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [proc.pid]
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class RayCluster:
    """Head and worker nodes on 127.0.0.1 as `ray start --block` children of this process, stopped
    by pid (as cluster/local/stop-cluster.sh does): `ray stop` would stop other users' Ray too."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = Path(f"/tmp/dsscale-{self.port}")  # short: Ray's socket paths must stay < 107 chars
        self.nodes: list[subprocess.Popen] = []
        self.workers_started = 0

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"ray-{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(NODE_CPUS), "--num-gpus", str(NODE_GPUS), "--object-store-memory", "200000000",
             "--disable-usage-stats", *args],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.nodes.append(proc)
        return proc

    def start(self) -> None:
        self._start("head", "--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--temp-dir", str(self.temp_dir))
        wait_for_port(self.port, 120, "the Ray head")
        self.add_worker()

    def start_worker(self) -> subprocess.Popen:
        """Start a worker node; it joins when it is up."""
        self.workers_started += 1
        return self._start(f"worker-{self.workers_started}", "--address", self.address)

    def add_worker(self) -> subprocess.Popen:
        """Start a worker node and wait until its raylet runs and `ray status` shows head + one
        worker active (a lost node may still be listed for a while: then its raylet is the sign)."""
        proc = self.start_worker()
        deadline = time.time() + 120
        while not (self.raylets(proc) and self.active_nodes() >= 2):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"worker node {self.workers_started} did not join (see {self.logs})")
            time.sleep(1)
        return proc

    @staticmethod
    def raylets(node: subprocess.Popen) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(node.pid).children(recursive=True) if p.name() == "raylet"]
        except psutil.NoSuchProcess:
            return []

    def active_nodes(self) -> int:
        """Nodes `ray status` lists as active."""
        out = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", "--address", self.address],
                             env=self.env, capture_output=True, text=True, timeout=60).stdout
        active, count = False, 0
        for line in out.splitlines():
            if line.startswith("Active:"):
                active = True
            elif re.match(r"^[A-Z][a-z]+:", line):
                active = False
            elif active and "node_" in line:
                count += 1
        return count

    def worker_pids(self) -> set[int]:
        """Processes of the newest worker node (its raylet and the trial workers it started)."""
        try:
            return {p.pid for p in psutil.Process(self.nodes[-1].pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def kill_worker_raylet(self) -> None:
        """SIGKILL the raylet of the newest worker node: the node is lost for good."""
        raylets = self.raylets(self.nodes[-1])
        if not raylets:
            raise RuntimeError("the worker node's raylet was not found")
        for raylet in raylets:
            raylet.kill()

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            stop_tree(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on SQLite whose uvicorn access log (one line per request) goes to one file
    across restarts."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = folder / "mlflow-server.db"
        self.log = folder / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.db}", "--default-artifact-root", str(self.folder / "mlartifacts"),
             "--workers", "1", "--uvicorn-opts", "--access-log"],
            env=without_server_jobs(self.env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for_port(self.port, 180, "mlflow server")

    def crash(self) -> None:
        """Down at once, as a crashed server: SIGKILL to its whole process group."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def requests(self) -> Counter:
        """Requests per API path, from the access log."""
        pattern = re.compile(r'"(?:GET|POST|PUT|PATCH|DELETE) (/[^ ?"]*)')
        counts: Counter = Counter()
        if self.log.exists():
            for line in self.log.read_text(errors="replace").splitlines():
                match = pattern.search(line)
                if match:
                    counts[match.group(1)] += 1
        return counts

    def rows(self) -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                    for table in ("runs", "metrics", "latest_metrics", "params", "tags")}


class ProcessMonitor(threading.Thread):
    """Samples one process (children excluded): CPU seconds, peak RSS, bytes written."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.cpu_s = 0.0
        self.peak_rss = 0
        self.write_bytes = 0
        self.started = time.time()
        self.ended: float | None = None

    def run(self) -> None:
        while True:
            try:
                with self.process.oneshot():
                    times = self.process.cpu_times()
                    self.cpu_s = times.user + times.system
                    self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                    with contextlib.suppress(psutil.AccessDenied, AttributeError):
                        self.write_bytes = self.process.io_counters().write_bytes
                if self.process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(self.interval)
        self.ended = time.time()

    def summary(self) -> dict[str, Any]:
        wall = (self.ended or time.time()) - self.started
        return {"cpu_s": round(self.cpu_s, 1), "wall_s": round(wall, 1), "cpu_percent": round(100 * self.cpu_s / wall, 1),
                "peak_rss_mb": round(self.peak_rss / 2**20), "write_mb": round(self.write_bytes / 2**20, 1)}


@dataclass
class Driver:
    """A `distillsweep` CLI process and its monitor."""

    name: str
    proc: subprocess.Popen
    monitor: ProcessMonitor
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], folder: Path) -> Driver:
        log_path = folder / f"driver-{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=folder, env=env,
                                stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        monitor = ProcessMonitor(proc.pid)
        monitor.start()
        return cls(name, proc, monitor, log_path)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.monitor.join(5)


def timed_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return {"command": "distillsweep " + " ".join(args[:1]), "rc": done.returncode,
            "wall_s": round(time.perf_counter() - started, 2), "output_tail": (done.stdout + done.stderr)[-600:]}


# --- watching the sweep from its files ------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    return read_result_rows(path)  # a line being written is left out


def first_row_after(experiment_dir: Path, killed_at: float) -> float | None:
    """Seconds from the driver kill to the first result the resumed driver recorded, read from when
    rows were made (Tune stamps whole seconds; a row of the same second as the kill was the killed
    driver's), not from when a poll of hundreds of files noticed them."""
    stamps = [row.get("timestamp", 0) for path in experiment_dir.glob("*/result.json") for row in read_rows(path)]
    after = [stamp for stamp in stamps if stamp >= int(killed_at) + 1]
    return round(min(after) - killed_at, 1) if after else None


@dataclass
class Watch:
    """What Tune has written: when each trial reached its budget, when results last arrived, and
    the experiment-state size as trials accumulate.

    Results are read from the drivers' staging folders under the cluster's temp dir, where Tune
    writes each as it arrives; it copies them to the sweep folder only at its snapshots (10 s or
    more apart), by when the trials the faults should hit may have ended."""

    folder: Path
    ray_temp_dir: Path
    sizes: dict[Path, int] = field(default_factory=dict)
    done_at: dict[str, float] = field(default_factory=dict)
    last_pid: dict[str, int] = field(default_factory=dict)
    checkpointed_pid: dict[str, int] = field(default_factory=dict)
    last_change: float = 0.0
    state_series: list[tuple[float, int, int]] = field(default_factory=list)

    def poll(self) -> None:
        for path in self.ray_temp_dir.glob(f"session_*/artifacts/*/{self.folder.name}/driver_artifacts/*/result.json"):
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if size == self.sizes.get(path):
                    continue
                rows = read_rows(path)
                if not rows:
                    continue
                self.sizes[path] = size
                self.last_change = time.time()
                last, trial = rows[-1], path.parent.name
                self.last_pid[trial] = last.get("pid", 0)
                # A reported checkpoint is Tune's only once the trial's `save` call has returned, and
                # Tune asks the trial for its next result only after that: a second result from one
                # process means Tune holds that process's first checkpoint and would restore it.
                if sum(row.get("pid") == last.get("pid") for row in rows) >= 2:
                    self.checkpointed_pid[trial] = last.get("pid", 0)
                if last.get("step", 0) >= last.get("total_steps", math.inf):
                    self.done_at.setdefault(trial, time.time())
        states = list(self.folder.glob("experiment_state-*.json"))
        if states:
            with contextlib.suppress(OSError):
                newest = max(states, key=lambda p: p.stat().st_mtime).stat().st_size
                if not self.state_series or self.state_series[-1][2] != newest:
                    self.state_series.append((time.time(), len(self.done_at), newest))

    @property
    def done(self) -> int:
        return len(self.done_at)


# --- the check: every trial and evaluation exactly once -------------------------------------------


def consistency(experiment_dir: Path, db: Path, expected_trials: int) -> dict[str, Any]:
    """Tune's trial folders against the MLflow server's tables; every failed item is counted."""
    from orchestrator.metric_names import is_measurement  # a replayed step measures these anew
    from orchestrator.mlflow_callback import TUNE_BOOKKEEPING  # what the tracker leaves out of MLflow

    trials: dict[str, list[dict[str, Any]]] = {}
    folders = [p.parent for p in experiment_dir.glob("*/params.json")]
    for folder in folders:
        rows = read_rows(folder / "result.json") if (folder / "result.json").exists() else []
        if rows:
            trials.setdefault(rows[0]["trial_id"], []).extend(rows)
    short = sorted(t for t, rows in trials.items() if rows[-1].get("step") != rows[-1].get("total_steps"))
    checks: dict[str, Any] = {
        "tune_trial_folders": {"ok": len(folders) == expected_trials == len(trials),
                               "detail": f"{len(folders)} folders, {len(trials)} trial ids with results, "
                                         f"{expected_trials} expected"},
        "tune_budgets": {"ok": not short, "detail": f"{len(short)} trials did not end at their budget: {short[:5]}"},
    }

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as sql:
        (experiment_id,) = sql.execute("SELECT experiment_id FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        runs = dict(sql.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active'",
                                (experiment_id,)).fetchall())
        tags: dict[str, dict[str, str]] = defaultdict(dict)
        for run, key, value in sql.execute(
            "SELECT run_uuid, key, value FROM tags WHERE key IN ('distillsweep_role', 'mlflow.parentRunId', 'ray_trial_id')"
        ):
            if run in runs:
                tags[run][key] = value
        metrics: dict[str, dict[tuple[str, int], list[float]]] = defaultdict(lambda: defaultdict(list))
        for run, key, step, value, is_nan in sql.execute("SELECT run_uuid, key, step, value, is_nan FROM metrics"):
            if run in runs:
                metrics[run][(key, step)].append(math.nan if is_nan else value)

    parents = [r for r in runs if tags[r].get("distillsweep_role") == "sweep"]
    parent = parents[0] if len(parents) == 1 else None
    children = [r for r in runs if parent and tags[r].get("mlflow.parentRunId") == parent]
    by_trial: dict[str, list[str]] = defaultdict(list)
    for run in children:
        by_trial[tags[run].get("ray_trial_id", "")].append(run)
    duplicated = sorted(t for t, rs in by_trial.items() if len(rs) > 1)
    missing = sorted(set(trials) - set(by_trial))
    extra = sorted(set(by_trial) - set(trials))
    checks["mlflow_parent_run"] = {"ok": parent is not None and runs[parent] == "FINISHED",
                                   "detail": f"{len(parents)} parent runs" + (f", {runs[parent]}" if parent else "")}
    checks["mlflow_child_runs"] = {
        "ok": len(children) == len(trials) and not duplicated and not missing and not extra,
        "detail": f"{len(children)} child runs for {len(trials)} trials; {len(duplicated)} trials with several runs, "
                  f"{len(missing)} with none, {len(extra)} runs of unknown trials",
    }

    lost, doubled, differ, evaluations = [], [], [], 0
    for trial, rows in trials.items():
        if len(by_trial.get(trial, [])) != 1:
            continue
        held = metrics[by_trial[trial][0]]
        expected: dict[tuple[str, int], list[float]] = defaultdict(list)
        evaluations += len({r["step"] for r in rows})
        for row in rows:
            for key, value in row.items():
                if key not in TUNE_BOOKKEEPING and isinstance(value, (int, float)) and not isinstance(value, bool):
                    expected[(key, row["step"])].append(float(value))
        for point, values in expected.items():
            got = held.get(point, [])
            if not got:
                lost.append((trial, *point))
            elif len(got) > 1:
                doubled.append((trial, *point))
            elif not is_measurement(point[0]) and not any(same(got[0], v) for v in values):
                differ.append((trial, *point, got[0], values))
    lost_steps = sorted({(t, s) for t, _, s in lost})
    checks["every_evaluation_once"] = {
        "ok": not (lost or doubled or differ),
        "detail": f"{evaluations} evaluations; {len(lost_steps)} missing from MLflow (trial, step) "
                  f"{[f'{t}@{s}' for t, s in lost_steps[:6]]}, {len(doubled)} values logged twice, "
                  f"{len(differ)} values different from Tune's",
    }
    running = sorted(r for r in [*children, *parents] if runs[r] in ("RUNNING", "SCHEDULED"))
    checks["no_run_running"] = {"ok": not running, "detail": f"{len(running)} runs left RUNNING"}
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks, "evaluations": evaluations}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- the rehearsal --------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by this bench: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by python -m bench.scale; deleted by its next run\n")


def base_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               DISTILLSWEEP_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               RAY_AUTH_MODE="token", RAY_DEDUP_LOGS="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    return env


class Rehearsal:
    def __init__(self, size_name: str, out: Path) -> None:
        self.size_name, self.size, self.out = size_name, SIZES[size_name], out
        self.env = base_env(out / "cache")
        self.sweep_dir = out / "sweeps" / SWEEP_NAME
        self.events: dict[str, Any] = {}
        self.drivers: list[Driver] = []
        self.mlflow = MlflowServer(out, self.env)
        self.cluster = RayCluster(self.env, out)
        self.watch = Watch(self.sweep_dir, self.cluster.temp_dir)

    def checkpointed_trials_on_worker(self) -> list[str]:
        """The unfinished trials training on the worker node from a checkpoint Tune holds."""
        on_worker = self.cluster.worker_pids()
        return sorted(t for t, pid in self.watch.checkpointed_pid.items()
                      if t not in self.watch.done_at and pid == self.watch.last_pid[t] and pid in on_worker)

    def wait(self, until: Any, driver: Driver, what: str, timeout: float = 7200, every: float = 1.0) -> bool:
        """Poll the sweep until `until()`; False if the driver exits first. Prints progress."""
        deadline, shown = time.time() + timeout, 0.0
        while time.time() < deadline:
            self.watch.poll()
            if until():
                return True
            if driver.proc.poll() is not None:
                return False
            if time.time() - shown > 15:
                shown = time.time()
                m = driver.monitor
                log(f"{self.watch.done}/{self.size.trials} trials done ({driver.name} driver: "
                    f"{m.cpu_s:.0f} CPU s, {m.peak_rss / 2**20:.0f} MB); waiting for {what}")
            time.sleep(every)
        raise TimeoutError(f"timed out waiting for {what}")

    def run(self) -> dict[str, Any]:
        n = self.size.trials
        log(f"size {self.size_name}: {n} trials; folder {self.out}")
        teacher = make_teacher(self.out / "teacher")
        self.mlflow.start()
        self.cluster.start()
        spec = rehearsal_space(self.size, teacher, self.out / "tasks", self.out / "sweeps", self.mlflow.uri)
        space_file = self.out / "space.yaml"
        space_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        log(f"cluster {self.cluster.address} (head + worker, {NODE_CPUS} CPU and {NODE_GPUS} fake GPUs each), "
            f"MLflow {self.mlflow.uri}")

        started = time.time()
        first = Driver.start("sweep", ["sweep", str(space_file), "--address", self.cluster.address], self.env, self.out)
        self.drivers.append(first)
        if not self.wait(lambda: self.watch.last_change > 0, first, "the first result"):
            raise RuntimeError(f"the sweep driver exited before any result (see {first.log})")
        self.events["first_result_s"] = round(time.time() - started, 1)

        # Fault 1: the worker node is lost for good at 25%; a fresh worker starts at once and joins
        # when it is up. Nothing here waits on it: at the smallest size the sweep's last trials would
        # end meanwhile, before the faults below.
        if not self.wait(lambda: self.watch.done >= n // 4, first, "25% of trials", every=0.1):
            raise RuntimeError(f"the sweep driver exited early (see {first.log})")
        # Kill it while it trains a trial whose checkpoint Tune holds: that trial has to move to the
        # head and go on from its checkpoint. Trials here last a second or two. (A trial killed between
        # its first result and Tune's taking that result's checkpoint starts again from zero, rightly.)
        on_node: list[str] = []

        def checkpointed_trial_on_worker() -> bool:
            on_node[:] = self.checkpointed_trials_on_worker()
            return bool(on_node)

        self.wait(checkpointed_trial_on_worker, first, "a checkpointed trial training on the worker node",
                  timeout=300, every=0.1)
        self.cluster.kill_worker_raylet()
        self.events["worker_killed"] = {"at_done": self.watch.done, "running_trials_on_it": on_node}
        log(f"killed the worker node's raylet at {self.watch.done} trials done; {len(on_node)} running trials on it")
        self.cluster.start_worker()

        # Fault 2 and 3: at 50% MLflow goes down, the driver is SIGKILLed while it is down and
        # the sweep resumed; the server comes back `outage_s` after it went down.
        if not self.wait(lambda: self.watch.done >= n // 2, first, "50% of trials", every=0.1):
            raise RuntimeError(f"the sweep driver exited early (see {first.log})")
        down_at = time.time()
        self.mlflow.crash()
        # Kill it once a trial has reported into the outage, so it holds results MLflow has not taken,
        # and before the sweep can end (a time into the outage raced the last trials on a busy machine).
        if not self.wait(lambda: self.watch.last_change > down_at, first, "a result while MLflow is down",
                         timeout=300, every=0.1):
            raise RuntimeError(f"the sweep driver exited before a trial reported with MLflow down (see {first.log})")
        done_at_kill = self.watch.done
        if done_at_kill >= n:
            raise RuntimeError(f"all {n} trials ended before the driver could be killed: the resume would prove nothing")
        driver_killed_at = time.time()
        first.kill()
        log(f"MLflow down; driver SIGKILLed at {done_at_kill} trials done; resuming")
        resumed_at = time.time()
        second = Driver.start("resume", ["resume", str(self.sweep_dir), "--address", self.cluster.address],
                              self.env, self.out)
        self.drivers.append(second)
        came_back, shown = False, time.time()
        while second.proc.poll() is None:
            self.watch.poll()
            if not came_back and time.time() - down_at >= self.size.outage_s:
                self.mlflow.start()
                came_back = True
                self.events["mlflow_outage_s"] = round(time.time() - down_at, 1)
                log("MLflow back")
            if time.time() - shown > 15:
                shown = time.time()
                log(f"{self.watch.done}/{n} trials done (resumed driver: {second.monitor.cpu_s:.0f} CPU s)")
            time.sleep(1)
        self.watch.poll()
        self.events["resume_to_first_result_s"] = first_row_after(self.sweep_dir, resumed_at)
        if not came_back:
            time.sleep(max(0.0, self.size.outage_s - (time.time() - down_at)))
            self.mlflow.start()
            self.events["mlflow_outage_s"] = round(time.time() - down_at, 1)
        second.monitor.join(5)
        self.events["driver_killed_at_done"] = done_at_kill
        self.events["resume_rc"] = second.proc.returncode
        sweep_wall = time.time() - started

        # The trials the lost node was training: each step once means they went on from their checkpoint.
        # Only the first driver's rows: the resumed one reruns, from Tune's last snapshot, whatever
        # ended after it (a moved trial too, if it ended within that snapshot period), rightly.
        self.events["moved_trials_steps"] = {
            trial: [row["step"] for row in read_rows(self.sweep_dir / trial / "result.json")
                    if row["timestamp"] < driver_killed_at]
            for trial in self.events["worker_killed"]["running_trials_on_it"]
        }
        resume_log = second.log.read_text(errors="replace")
        self.events["undelivered_after_resume"] = undelivered(self.sweep_dir)
        if self.events["undelivered_after_resume"] or "did not take" in resume_log:
            self.events["sync"] = timed_cli(["sync", str(self.sweep_dir)], self.env, self.out)
        self.events["status"] = timed_cli(["status", str(self.sweep_dir)], self.env, self.out)
        self.events["report"] = timed_cli(["report", str(self.sweep_dir)], self.env, self.out)
        requests = self.mlflow.requests()
        self.mlflow.crash()  # the tables are read with the server stopped
        verdict = consistency(self.sweep_dir, self.mlflow.db, n)
        return self.figures(sweep_wall, requests, verdict)

    def figures(self, sweep_wall: float, requests: Counter, verdict: dict[str, Any]) -> dict[str, Any]:
        n = self.size.trials
        drivers = {d.name: d.monitor.summary() for d in self.drivers}
        driver_cpu = sum(d.monitor.cpu_s for d in self.drivers)
        times = sorted(self.watch.done_at.values())
        steady = math.nan
        if len(times) >= 10:  # trials completed between the 10th and 90th percentile of completions, per minute
            lo, hi = len(times) // 10, (9 * len(times)) // 10
            steady = (hi - lo) / max(times[hi] - times[lo], 1e-9) * 60
        states = self.watch.state_series
        state_bytes = states[-1][2] if states else 0
        evaluations = verdict["evaluations"]
        total_requests = sum(requests.values())
        log_batches = requests.get("/api/2.0/mlflow/runs/log-batch", 0)
        # Each trial's run also takes create, params, tags (twice), config text and end: not per evaluation.
        return {
            "trials": n,
            "size": asdict(self.size),
            "cluster": {"nodes": 2, "cpus_per_node": NODE_CPUS, "fake_gpus_per_node": NODE_GPUS,
                        "per_trial": TRIAL_RESOURCES, "workers_started": self.cluster.workers_started},
            "precision": "fp32 (training.mixed_precision no; torch on CPU)",
            "trials_per_minute": {"overall": round(n / sweep_wall * 60, 1), "steady_10_to_90pct": rounded(steady)},
            "sweep_wall_s": round(sweep_wall, 1),
            "driver": drivers,
            "driver_cpu_s_per_trial": rounded(driver_cpu / n),
            "driver_cpu_s_per_evaluation": rounded(driver_cpu / max(evaluations, 1)),
            "driver_peak_rss_mb": max(d["peak_rss_mb"] for d in drivers.values()),
            "experiment_state": {"final_bytes": state_bytes, "bytes_per_trial": round(state_bytes / n),
                                 "series_t_done_bytes": [(round(t - states[0][0], 1), d, b) for t, d, b in states[::max(1, len(states) // 20)]]
                                 if states else []},
            "mlflow": {"rows": self.mlflow_rows(), "requests": total_requests,
                       "requests_per_evaluation": rounded(total_requests / max(evaluations, 1)),
                       "log_batch_per_evaluation": rounded(log_batches / max(evaluations, 1)),
                       "requests_per_trial": rounded(total_requests / n),
                       "requests_per_s": rounded(total_requests / sweep_wall),
                       "by_path": dict(requests.most_common(12))},
            "evaluations": evaluations,
            "events": self.events,
            "status_s": self.events["status"]["wall_s"],
            "report_s": self.events["report"]["wall_s"],
            "consistency": verdict,
        }

    def mlflow_rows(self) -> dict[str, int]:
        try:
            return self.mlflow.rows()
        except sqlite3.Error as err:
            return {"error": str(err)}  # type: ignore[dict-item]

    def close(self) -> None:
        for driver in self.drivers:
            driver.kill()
        self.mlflow.crash()
        self.cluster.stop()


def print_table(result: dict[str, Any]) -> None:
    cpu, n = result["machine"]["cpu"], result["trials"]
    rows = [
        ("trials", n, ""),
        ("trials per minute (overall, faults included)", result["trials_per_minute"]["overall"], ""),
        ("trials per minute (steady, 10-90%)", result["trials_per_minute"]["steady_10_to_90pct"], ""),
        ("driver CPU s per trial", result["driver_cpu_s_per_trial"], "< 0.5"),
        ("driver peak RSS MB", result["driver_peak_rss_mb"], ""),
        ("experiment state bytes (per trial)",
         f"{result['experiment_state']['final_bytes']} ({result['experiment_state']['bytes_per_trial']})", ""),
        ("MLflow requests per evaluation", result["mlflow"]["requests_per_evaluation"], "~1"),
        ("MLflow log-batch per evaluation (3 more a trial)", result["mlflow"]["log_batch_per_evaluation"], ""),
        ("MLflow requests per trial", result["mlflow"]["requests_per_trial"], ""),
        ("MLflow rows (runs/metrics/params/tags)",
         "/".join(str(result["mlflow"]["rows"].get(k, "?")) for k in ("runs", "metrics", "params", "tags")), ""),
        ("resume: SIGKILL to first new result, s", result["events"].get("resume_to_first_result_s", "none"), "< 60 at 756"),
        ("status s", result["status_s"], ""),
        ("report s", result["report_s"], "< 10 at 756"),
        ("consistency", "PASS" if result["consistency"]["ok"] else "FAIL", "PASS"),
    ]
    print(f"\nbench.scale --size {result['size_name']} on {cpu} ({result['machine']['usable_cores']} cores), fp32")
    for name, value, target in rows:
        print(f"  {name:<48} {str(value):>22}  {target}")
    for name, check in result["consistency"]["checks"].items():
        print(f"  [{'ok' if check['ok'] else 'FAIL'}] {name}: {check['detail']}")


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="smallest")
    parser.add_argument("--out", type=Path, default=None,
                        help="working folder (default /tmp/distillsweep-scale-SIZE); the result is OUT/scale.json")
    args = parser.parse_args()
    out = (args.out or Path(f"/tmp/distillsweep-scale-{args.size}")).resolve()
    prepare_out(out)
    signal.signal(signal.SIGTERM, interrupted)  # cleaned up as on Ctrl-C
    started = time.time()
    rehearsal = Rehearsal(args.size, out)
    try:
        figures = rehearsal.run()
    finally:
        rehearsal.close()
    result = {
        "benchmark": "scale", "size_name": args.size, "command": f"python -m bench.scale --size {args.size}",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d")},
        "wall_s": round(time.time() - started, 1), **figures,
    }
    (out / "scale.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_table(result)
    print(f"\nwritten: {out / 'scale.json'}")
    return 0 if result["consistency"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
