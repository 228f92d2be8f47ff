"""Figure 4: teacher forward passes per training example across a KD-only sweep, with and without
the teacher-logits cache (trainables/teacher_cache.py), and the wall-time effect.

The sweep is a grid of KD-only trials (learning rate x temperature; CE + KD, nothing that reads the
teacher's hidden states) run one after another in this process, each through `distill` end to end
(teacher and data loading, training, evaluations, checkpoints). It runs twice, trial by trial
interleaved so that machine drift affects both alike: once with the live teacher, once with a
`TeacherLogitsCache` on a fresh cache folder shared by the sweep's trials (the first trial
computes the logits in one pass; the rest read the file). A forward hook on the teacher counts
the rows it processes. Both runs of a trial must end with the same metrics.
"""

from __future__ import annotations

from bench import common  # noqa: I001

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "teacher_cache"


def run_trial(cfg, cache_dir: Path | None) -> dict[str, Any]:
    import trainables.run as run_module
    import trainables.teacher_source as teacher_source_module
    from trainables.models import load_teacher
    from trainables.teacher_cache import TeacherLogitsCache

    rows: list[int] = []

    def counting_load_teacher(*args, **kwargs):
        teacher = load_teacher(*args, **kwargs)
        teacher.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
        return teacher

    # this cache, for the variant whose config turns the cache on
    cache = TeacherLogitsCache(cache_dir) if cache_dir is not None else None
    patches = [(run_module, "load_teacher", counting_load_teacher),
               (teacher_source_module, "TeacherLogitsCache", lambda cache_dir: cache)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    start = time.perf_counter()
    try:
        with common.silence():
            metrics = run_module.distill(cfg)
    finally:
        for module, name, value in originals:
            setattr(module, name, value)
    return {"wall_s": time.perf_counter() - start, "teacher_rows": sum(rows), "metrics": metrics,
            "passes_computed": cache.passes_computed if cache else None}


def main() -> None:
    args = common.parse_args(NAME, __doc__)
    started = time.perf_counter()
    smallest = args.size == "smallest"
    teacher = common.teacher_for(args.size)
    grid = list(itertools.product([1e-4, 2e-4], [1.0, 4.0] if not smallest else [2.0]))
    training = {"max_steps": 4, "eval_steps": 2, "max_eval_samples": 64} if smallest else \
        {"num_train_epochs": 2.0, "eval_steps": 25}
    sweeps: dict[str, list[dict[str, Any]]] = {"live": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "logits-cache"
        for k, (lr, temperature) in enumerate(grid):
            for variant in ("live", "cached"):
                cfg = common.run_config(
                    teacher, Path(tmp) / f"{variant}-{k}", size=args.size,
                    objectives=[{"name": "kd", "weight": 0.5, "temperature": temperature}],
                    training={**training, "learning_rate": lr, "teacher_logits_cache": variant == "cached"},
                )
                result = run_trial(cfg, shared if variant == "cached" else None)
                result["config"] = {"learning_rate": lr, "temperature": temperature}
                sweeps[variant].append(result)
                common.log(f"trial {k} {variant}: {result['wall_s']:.1f}s, teacher rows {result['teacher_rows']}")
        from trainables.data import load_task_data  # the training-split size, for passes per example
        from trainables.tasks import resolve_task
        from transformers import AutoTokenizer

        train_rows = len(load_task_data(resolve_task(cfg.task), AutoTokenizer.from_pretrained(str(teacher)),
                                        cfg.training, cfg.cache_dir).train)
    summary = {}
    for variant, trials in sweeps.items():
        summary[variant] = {
            "teacher_passes_per_example_per_sweep": round(sum(t["teacher_rows"] for t in trials) / train_rows, 3),
            "teacher_passes_per_example_per_trial": [round(t["teacher_rows"] / train_rows, 3) for t in trials],
            "sweep_wall_s": round(sum(t["wall_s"] for t in trials), 1),
            "trial_wall_s": [round(t["wall_s"], 1) for t in trials],
            "scores": [round(t["metrics"]["score"], 4) for t in trials],
        }
    score_diff = max(abs(a["metrics"]["score"] - b["metrics"]["score"]) for a, b in zip(sweeps["live"], sweeps["cached"]))
    loss_diff = max(abs(a["metrics"]["eval_loss"] - b["metrics"]["eval_loss"]) for a, b in zip(sweeps["live"], sweeps["cached"]))
    figures = {
        "figure": "teacher forward passes per training example per KD-only sweep, and sweep wall time",
        "setup": {"trials": len(grid), "grid": "learning_rate x temperature", "objectives": "0.5 ce + 0.5 kd",
                  "train_examples": train_rows, "training": training, "teacher": Path(str(teacher)).name,
                  "student_layers": cfg.student.num_layers, "max_seq_length": cfg.training.max_seq_length,
                  "execution": "trials one after another in one process (one slot)"},
        **summary,
        "cache_files_built": sum(1 for t in sweeps["cached"] if t["passes_computed"]),
        "wall_time_speedup": round(summary["live"]["sweep_wall_s"] / summary["cached"]["sweep_wall_s"], 3),
        "max_abs_score_difference": score_diff,
        "max_abs_eval_loss_difference": loss_diff,
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
