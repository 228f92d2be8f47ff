"""Figure 6: ASHA against the full grid on the same space, in student training steps.

Two real sweeps through `orchestrator.sweep.start_sweep` on the same grid (objective mix x student
initialisation x learning rate), one CPU per trial, trials two at a time: one with no scheduler
(every trial runs all its steps), one with ASHA on the prediction-stage time axis (max_t = the
steps of a stage, grace period = one evaluation, reduction factor 2). Mixes with an intermediate
objective train in two stages (`stages: auto`, as the study did), so ASHA compares one-stage and
two-stage trials after equal training of the prediction layer. From each trial's Tune results
(step, score and wall-clock timestamp of every evaluation; stage-1 rows carry no score):
- the grid's best = the best final validation score of any grid trial; the grid's steps = all
  steps its trials trained;
- ASHA's steps to target = student training steps all ASHA trials had trained (as last reported)
  at the first moment one of its trials reported a score within 1 point (0.01 accuracy) of the
  grid's best; also ASHA's total steps and best score.
Target: ASHA's steps to target <= 40% of the grid's steps.
"""

from __future__ import annotations

from bench import common  # noqa: I001

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "early_stopping"


def sweep_spec(teacher: Path, tmp: Path, size: str, scheduler: str) -> Any:
    from orchestrator.config import SweepSpec

    smallest = size == "smallest"
    steps, every = (4, 2) if smallest else (40, 10)
    space: dict[str, Any] = {
        "objectives.mix": {"grid": [["kd"]] if smallest else [["kd"], ["kd", "hidden_mse"], ["kd", "att_kl"]]},
        "student.init": {"grid": ["upper", "lower"]},
    }
    if not smallest:
        space["training.learning_rate"] = {"grid": [5e-5, 2e-4]}
    return SweepSpec.model_validate({
        "name": f"bench-{scheduler}",
        "base": {
            "task": "demo", "teacher": str(teacher),
            "student": {"num_layers": 2 if smallest else 3},
            "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}], "ce_weight": 0.5, "stages": "auto",
            "cache_dir": os.environ.get("DISTILLSWEEP_CACHE"),
            # save_steps = max_steps: one checkpoint per trial (ASHA stops trials, never resumes
            # them), which keeps a 12-trial sweep at a few GB of disk instead of about 20
            "training": {"learning_rate": 1e-4, "per_device_train_batch_size": 32, "max_steps": steps,
                         "eval_steps": every, "save_steps": steps, "max_seq_length": 48 if smallest else 64, "seed": 1,
                         **({"max_eval_samples": 64} if smallest else {})},
        },
        "space": space,
        "search": {"algorithm": "grid", "metric": "score", "mode": "max"},
        "scheduler": {"type": "asha", "time_attr": "prediction_step", "max_t": steps, "grace_period": every,
                      "reduction_factor": 2}
        if scheduler == "asha" else {"type": "none"},
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent_trials": 2,
        "storage": str(tmp / "sweeps"),
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": f"bench-{scheduler}"},
        "max_failures": 0,
    })


def trial_results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """trial id -> its reported results, in order, from Tune's result.json files."""
    trials: dict[str, list[dict[str, Any]]] = {}
    for path in folder.rglob("result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            trials[rows[0]["trial_id"]] = rows
    return trials


def steps_until(trials: dict[str, list[dict]], target: float) -> tuple[int | None, float | None]:
    """Steps trained by all trials when a score >= target was first reported, and when (s from start)."""
    events = sorted((r["timestamp"], r.get("time_total_s", 0.0), tid, r) for tid, rows in trials.items() for r in rows)
    latest: dict[str, int] = {}
    t0 = events[0][0] if events else 0
    for timestamp, _, tid, row in events:
        latest[tid] = max(latest.get(tid, 0), int(row["step"]))
        if row.get("score", float("-inf")) >= target:
            return sum(latest.values()), timestamp - t0
    return None, None


def run(spec: Any) -> tuple[dict[str, list[dict]], float]:
    from orchestrator.sweep import start_sweep

    start = time.time()
    try:
        with common.silence():
            start_sweep(spec)
    finally:
        common.shutdown_ray()
    return trial_results(Path(spec.storage) / spec.name), time.time() - start


def main() -> None:
    args = common.parse_args(NAME, __doc__)
    started = time.perf_counter()
    teacher = common.teacher_for(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        grid, grid_wall = run(sweep_spec(teacher, Path(tmp) / "grid", args.size, "none"))
        common.log(f"grid: {len(grid)} trials in {grid_wall:.0f}s")
        asha, asha_wall = run(sweep_spec(teacher, Path(tmp) / "asha", args.size, "asha"))
        common.log(f"asha: {len(asha)} trials in {asha_wall:.0f}s")
    grid_best = max(rows[-1]["score"] for rows in grid.values())
    grid_steps = sum(int(rows[-1]["step"]) for rows in grid.values())
    asha_steps = sum(int(rows[-1]["step"]) for rows in asha.values())
    asha_best = max(r["score"] for rows in asha.values() for r in rows if "score" in r)
    target = grid_best - 0.01
    asha_to_target, asha_time_to_target = steps_until(asha, target)
    grid_to_target, _ = steps_until(grid, target)
    figures = {
        "figure": "student training steps: ASHA until within 1 point of the grid's best, against the whole grid",
        "setup": {"trials_per_sweep": len(grid), "teacher": Path(str(teacher)).name,
                  "space": "objectives.mix x student.init x learning_rate" if args.size == "default" else "student.init",
                  "asha": "time_attr prediction_step, max_t = steps per stage, grace_period = one evaluation, "
                          "reduction_factor 2; mixes with an intermediate objective in two stages",
                  "concurrency": 2, "resources_per_trial": "1 CPU"},
        "grid": {"trials": len(grid), "total_steps": grid_steps, "best_final_score": round(grid_best, 4),
                 "steps_until_within_1_point": grid_to_target, "wall_s": round(grid_wall, 1),
                 "final_scores": sorted(round(rows[-1]["score"], 4) for rows in grid.values())},
        "asha": {"trials": len(asha), "total_steps": asha_steps, "best_score": round(asha_best, 4),
                 "steps_until_within_1_point": asha_to_target,
                 "seconds_until_within_1_point": None if asha_time_to_target is None else round(asha_time_to_target, 1),
                 "wall_s": round(asha_wall, 1),
                 "steps_per_trial": sorted(int(rows[-1]["step"]) for rows in asha.values())},
        "asha_steps_to_target_over_grid_steps": None if asha_to_target is None else round(asha_to_target / grid_steps, 3),
        "asha_total_steps_over_grid_steps": round(asha_steps / grid_steps, 3),
        "target <= 0.40": asha_to_target is not None and asha_to_target / grid_steps <= 0.40,
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
