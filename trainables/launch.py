"""Data-parallel runs inside one trial: N processes, one per GPU (or CPU slot), one process group.

Each process gets the environment `torchrun` would set (RANK, WORLD_SIZE, LOCAL_RANK) and joins
the process group (Gloo for CPU tensors, NCCL for GPU ones) before Accelerate starts, which then
uses that group and places each process on its GPU. Reports from rank 0 travel back over a queue
to the parent, which owns the reporter: under Ray Tune only the trial's own process may call
`tune.report`.

The processes all run on this machine, so they meet through a file in a private (0700) folder
rather than torch's default TCP store, which listens on every interface with no authentication;
Gloo and NCCL open their own sockets on the loopback interface only. Nothing of the rendezvous is
reachable from the network.
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from trainables.training import Reporter

RunFn = Callable[[Any, Reporter | None, Path | None], dict[str, float]]

LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"


def _join_process_group(rank: int, world: int, rendezvous: Path) -> None:
    """Meet the other processes through `rendezvous` (a file store: no TCP listener) on loopback."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME=LOOPBACK, NCCL_SOCKET_IFNAME=LOOPBACK,
    )
    dist.init_process_group(init_method=rendezvous.as_uri(), rank=rank, world_size=world)


def _worker(
    rank: int, world: int, rendezvous: Path, run: RunFn, cfg: Any, resume_from: Path | None, messages: Any
) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    def forward(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        messages.put(("report", metrics, str(checkpoint) if checkpoint else None))

    try:
        _join_process_group(rank, world, rendezvous)
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
    folder = Path(tempfile.mkdtemp(prefix="distillsweep-rendezvous-"))  # 0700, ours alone
    try:
        return _run_workers(run, cfg, num_processes, reporter, resume_from, folder / "store")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_workers(
    run: RunFn, cfg: Any, num_processes: int, reporter: Reporter | None, resume_from: Path | None, rendezvous: Path
) -> dict[str, float]:
    context = mp.get_context("spawn")
    messages = context.Queue()
    workers = [
        context.Process(target=_worker, args=(rank, num_processes, rendezvous, run, cfg, resume_from, messages))
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
