"""Figure 1b: does the precision our `auto` default picks train as well as fp32, and how much faster?

The same full `distill` run (the demo task, the full mix of figure 1: CE + KD + hidden-state MSE
+ attention KL, 3-layer student copied from the teacher, 2 epochs, evaluated on the 400
validation examples) in fp32 (`mixed_precision: no`) and in the precision `auto` picks on this
device, for several seeds, the two precisions interleaved seed by seed. Reported: validation
accuracy per seed and its mean per precision, and training examples per second (from the loop's
`on_step` timestamps, first step excluded).
"""

from __future__ import annotations

from bench import common  # noqa: I001

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "precision"


def extra_args(parser) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="seeds per precision (default 3; 1 at smallest)")
    common.add_teacher_args(parser)


def run(cfg) -> dict[str, Any]:
    from trainables.run import distill

    stamps: list[float] = []
    with common.silence():
        metrics = distill(cfg, on_step=lambda step, total: stamps.append(time.perf_counter()))
    batch = cfg.training.per_device_train_batch_size
    return {"accuracy": metrics["eval_accuracy"],
            "examples_per_second": batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def main() -> None:
    from trainables.precision import precision_here

    args = common.parse_args(NAME, __doc__, extra_args)
    started = time.perf_counter()
    smallest = args.size == "smallest"
    seeds = list(range(1, 1 + (args.seeds or (1 if smallest else 3))))
    teacher = common.teacher_for(args.size, random_weights=args.random_teacher)
    results: dict[str, list[dict[str, Any]]] = {"no": [], "auto": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for precision in results:
                training = {"num_train_epochs": 1 if smallest else 2, "eval_steps": 1000, "seed": seed,
                            "mixed_precision": precision}
                cfg = common.run_config(teacher, Path(tmp) / f"{precision}-{seed}", size=args.size, training=training)
                results[precision].append({"seed": seed, **run(cfg)})
                common.log(f"seed {seed}, mixed_precision {precision}: {results[precision][-1]}")
        auto_precision = precision_here(cfg.training)
    mean = {p: {k: statistics.fmean(r[k] for r in rows) for k in ("accuracy", "examples_per_second")}
            for p, rows in results.items()}
    figures = {
        "figure": "accuracy and speed of the precision `auto` picks against fp32, same runs, several seeds",
        "setup": {"teacher": Path(str(teacher)).name, "student_layers": cfg.student.num_layers,
                  "objectives": "0.5 ce + 0.5 kd(T=2) + hidden_mse(skip) + att_kl(skip)",
                  "epochs": training["num_train_epochs"], "seeds": seeds, "auto_picks": auto_precision},
        "runs": {"fp32" if p == "no" else f"auto ({auto_precision})": rows for p, rows in results.items()},
        "mean_accuracy": {"fp32": round(mean["no"]["accuracy"], 4), "auto": round(mean["auto"]["accuracy"], 4)},
        "accuracy_difference_points": round(100 * (mean["auto"]["accuracy"] - mean["no"]["accuracy"]), 2),
        "speedup_auto_vs_fp32": round(mean["auto"]["examples_per_second"] / mean["no"]["examples_per_second"], 3),
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
