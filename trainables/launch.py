"""Data-parallel runs inside one trial: N processes, one per GPU (or CPU slot), one process group.

Each process gets the environment `torchrun` would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
so Accelerate builds the process group (NCCL on GPUs, Gloo on CPUs) and places each process on
its GPU. Reports from rank 0 travel back over a queue to the parent, which owns the reporter:
under Ray Tune only the trial's own process may call `tune.report`.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from trainables.training import Reporter

RunFn = Callable[[Any, Reporter | None, Path | None], dict[str, float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, run: RunFn, cfg: Any, resume_from: Path | None, messages: Any
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    def forward(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        messages.put(("report", metrics, str(checkpoint) if checkpoint else None))

    try:
        final = run(cfg, forward if rank == 0 else None, resume_from)
        if rank == 0:
            messages.put(("done", final, None))
    except BaseException as err:  # the parent re-raises it with the worker's traceback
        messages.put(("error", f"rank {rank}: {type(err).__name__}: {err}", traceback.format_exc()))
        raise


def _exit_with_parent(parent: int) -> None:
    """A trial process killed by Ray (scheduler stop, node loss) must not leave workers on its GPUs."""
    while os.getppid() == parent:
        time.sleep(2.0)
    os._exit(1)


class WorkerError(RuntimeError):
    """A data-parallel worker failed; the message carries its error."""


def run_data_parallel(
    run: RunFn, cfg: Any, num_processes: int, reporter: Reporter | None = None, resume_from: Path | None = None
) -> dict[str, float]:
    """Run `run(cfg, reporter, resume_from)` in `num_processes` processes; return rank 0's result."""
    context = mp.get_context("spawn")
    messages = context.Queue()
    port = free_port()
    workers = [
        context.Process(target=_worker, args=(rank, num_processes, port, run, cfg, resume_from, messages))
        for rank in range(num_processes)
    ]
    for worker in workers:
        worker.start()
    final: dict[str, float] | None = None
    error: tuple[str, str] | None = None
    while final is None and error is None:
        try:
            kind, payload, extra = messages.get(timeout=1.0)
        except queue_module.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                error = (f"worker exited with code {dead[0].exitcode}", "")
            continue
        if kind == "report" and reporter is not None:
            reporter(payload, Path(extra) if extra else None)
        elif kind == "done":
            final = payload
        elif kind == "error":
            error = (payload, extra)
    if error is not None:
        for worker in workers:
            worker.kill()
        raise WorkerError(f"data-parallel run failed: {error[0]}\n{error[1]}")
    for worker in workers:
        worker.join()
    return final
