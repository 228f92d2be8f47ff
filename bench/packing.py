"""Figure 5: wall time of a sweep of many small trials against their ideal packing on the slots.

A real sweep through `orchestrator.sweep.start_sweep`: Ray Tune on a local runtime, grid search,
no early stopping, one CPU per trial (so the machine's cores are the slots), MLflow tracking in a
SQLite store, checkpoints at every evaluation, the same `distillation_trial` every sweep runs,
wrapped only to record when the trial function starts and ends in its worker. Then:
- ideal packing = sum of trial times / slots (trial time: inside the trial function, from its
  first line to its return: teacher and data loading, training, evaluations, checkpoints);
- span = from the first trial's start to the last trial's end; wall = the whole `start_sweep`
  call (Ray start-up, MLflow set-up, Tune, the tracker's last writes);
- per-trial overhead = (slots x span - sum of trial times) / trials: slot time no trial function
  was running (Ray actor start, worker imports, result handling, MLflow logging, idle tail).
Sweeps reuse worker processes across trials (`reuse_actors`, on by default); `--fresh-workers`
also runs the same sweep with a new worker process per trial, to show what that default saves.
"""

from __future__ import annotations

from bench import common  # noqa: I001

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "packing"


def extra_args(parser) -> None:
    parser.add_argument("--trials", type=int, default=None, help="trials in the sweep (default 12; 4 at smallest)")
    parser.add_argument("--fresh-workers", action="store_true", help="also run the sweep with reuse_actors: false")


def timed_trial(config: dict[str, Any], kind: str = "distill", cpus_per_trial: int = 1, timing_dir: str = "") -> None:
    """`distillation_trial`, plus a record of when it ran (wall clock, so workers agree)."""
    from ray import tune

    from trainables.tune_trainable import distillation_trial

    start = time.time()
    try:
        distillation_trial(config, kind, cpus_per_trial)
    finally:
        record = {"start": start, "end": time.time(), "pid": os.getpid(), "trial": tune.get_context().get_trial_id()}
        Path(timing_dir, f"{record['trial']}-{start:.6f}.json").write_text(json.dumps(record))


def sweep_spec(teacher: Path, tmp: Path, size: str, trials: int, name: str, reuse_actors: bool) -> Any:
    from orchestrator.config import SweepSpec

    smallest = size == "smallest"
    steps = 4 if smallest else 24
    seeds = list(range(1, trials + 1))
    return SweepSpec.model_validate({
        "name": name,
        "base": {
            "task": "demo", "teacher": str(teacher),
            "student": {"num_layers": 2 if smallest else 3, "init": "skip"},
            "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}], "ce_weight": 0.5,
            "cache_dir": os.environ.get("DISTILLSWEEP_CACHE"),
            "training": {"learning_rate": 1e-4, "per_device_train_batch_size": 32, "max_steps": steps,
                         "eval_steps": steps // 2, "max_seq_length": 48 if smallest else 64,
                         "max_eval_samples": 64 if smallest else 200,
                         # live teacher: every trial does the same work (with the logits cache
                         # the first trial would also fill it, and the sum of trial times would say so)
                         "teacher_logits_cache": False},
        },
        "space": {"training.seed": {"grid": seeds}},
        "search": {"algorithm": "grid", "metric": "score", "mode": "max"},
        "scheduler": {"type": "none"},
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent_trials": slots(),
        "storage": str(tmp / "sweeps"),
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": name},
        "max_failures": 0,
        "reuse_actors": reuse_actors,
    })


def slots() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_sweep(spec: Any, timing_dir: Path) -> dict[str, Any]:
    from ray import tune

    import orchestrator.sweep as sweep_module

    timing_dir.mkdir(parents=True, exist_ok=True)

    def trainable_for(state):
        s = state.sweep_spec
        trainable = tune.with_parameters(timed_trial, kind=s.run, cpus_per_trial=max(1, int(s.resources.cpu)),
                                         timing_dir=str(timing_dir))
        return tune.with_resources(trainable, {"cpu": s.resources.cpu, "gpu": s.resources.gpu})

    original_trainable = sweep_module.trainable_for
    sweep_module.trainable_for = trainable_for
    start = time.time()
    try:
        with common.silence():
            sweep_module.start_sweep(spec)
    finally:
        wall = time.time() - start
        sweep_module.trainable_for = original_trainable
        common.shutdown_ray()
    records = [json.loads(p.read_text()) for p in timing_dir.glob("*.json")]
    durations = [r["end"] - r["start"] for r in records]
    span = max(r["end"] for r in records) - min(r["start"] for r in records)
    n, k = len(records), min(slots(), len(records))
    ideal = sum(durations) / k
    return {
        "trials": n, "slots": k, "reuse_actors": spec.reuse_actors,
        "worker_processes": len({r["pid"] for r in records}),
        "sweep_wall_s": round(wall, 1),
        "trials_span_s": round(span, 1),
        "sum_trial_s": round(sum(durations), 1),
        "mean_trial_s": round(sum(durations) / n, 2),
        "ideal_packing_s": round(ideal, 1),
        "span_vs_ideal": round(span / ideal, 3),
        "wall_vs_ideal": round(wall / ideal, 3),
        "overhead_per_trial_s": round((k * span - sum(durations)) / n, 2),
        "overhead_per_trial_incl_startup_s": round((k * wall - sum(durations)) / n, 2),
        "fixed_startup_s": round(min(r["start"] for r in records) - start, 1),
    }


def main() -> None:
    args = common.parse_args(NAME, __doc__, extra_args)
    started = time.perf_counter()
    trials = args.trials or (4 if args.size == "smallest" else 12)
    teacher = common.teacher_for(args.size)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [True, False] if args.fresh_workers else [True]
        for reuse in variants:
            name = "bench-packing" if reuse else "bench-packing-fresh-workers"
            spec = sweep_spec(teacher, Path(tmp), args.size, trials, name, reuse)
            results["default" if reuse else "fresh_workers"] = result = run_sweep(spec, Path(tmp) / f"timing-{name}")
            common.log(f"{name}: {result}")
    figures = {
        "figure": "sweep wall time vs ideal packing (sum of trial times / slots), per-trial overhead",
        "setup": {"trials": trials, "teacher": Path(str(teacher)).name,
                  "trial": "kd + ce, 24 steps of 32, 2 evaluations + checkpoints" if args.size == "default" else "4 steps",
                  "tracking": "MLflow, SQLite store", "resources_per_trial": "1 CPU", "scheduler": "none (grid)"},
        **results,
        "target_span_vs_ideal <= 1.10": results["default"]["span_vs_ideal"] <= 1.10,
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
