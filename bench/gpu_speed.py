"""(b) Batch-32 throughput, ours eager / ours compiled / torchdistill, and (c) trials per GPU-hour.

(b) reuses bench.throughput: its Setup (the same teacher, student, objective mix and batches for
every run) and its runs, with `ours_compiled` the compiled variant of `ours` (training.compile:
true). Each of ours' runs is timed step by step: `window` is figure 1's examples/s over all timed
steps, `steady` leaves out the steps at which a compiled run compiles (the first full batch of
each length bucket; the same steps for the eager run), so that a short run measures the speed of
the compiled graphs rather than the compiler. Compilation itself is `run_s` of the compiled run
less that of the eager one. Compile counts as a gain when its steady examples/s beat eager's by
GAIN_MARGIN: rounds of the same code at batch 32 on a GPU spread by up to 15% (BENCHMARKS.md 1).

(c) k trials share one GPU, for k in the plan's levels: k processes each train the same short
fixed-step run (`trainables.run.distill`), wait for each other after their warm-up steps, and are
timed from there to their last step. Trials per GPU-hour are of trials of that many steps, start-up
(imports, loading, the first steps) left out, which a sweep with reused workers pays once per worker.
"""

from __future__ import annotations

import multiprocessing
import queue
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common
from bench.gpu_plan import GpuPlan, PartRecord

GAIN_MARGIN = 1.10


# --- (b) throughput -------------------------------------------------------------------------------


def compiling_steps(setup: Any) -> set[int]:
    """The steps (1-based) at which a compiled run compiles: the first full batch of each length bucket."""
    from trainables.compile import bucket_for, length_buckets

    lengths = [len(ids) for ids in setup.data.train["input_ids"]]
    buckets = length_buckets(setup.cfg.training.max_seq_length)
    full = setup.cfg.training.per_device_train_batch_size
    seen: set[int] = set()
    steps = set()
    for step, batch in enumerate(setup.batches, start=1):
        bucket = bucket_for(max(lengths[i] for i in batch), buckets)
        if len(batch) == full and bucket not in seen:
            seen.add(bucket)
            steps.add(step)
    return steps


def steady_examples_per_second(batches: list[list[int]], stamps: dict[int, float], warmup: int, total: int,
                               skipped: set[int]) -> float:
    """Examples per second over steps warmup+1..total but those `skipped` (stamps: time after each step)."""
    kept = [s for s in range(warmup + 1, total + 1) if s not in skipped]
    return sum(len(batches[s - 1]) for s in kept) / sum(stamps[s] - stamps[s - 1] for s in kept)


def ours_sample(setup: Any, out: Path, precision: str, compile: bool, skipped: set[int]) -> dict[str, float]:
    from bench import throughput

    stamps: dict[int, float] = {}
    start = time.perf_counter()
    window = throughput.ours_examples_per_second(setup, out, precision, compile, stamps)
    return {"window": round(window, 2), "run_s": round(time.perf_counter() - start, 1),
            "steady": round(steady_examples_per_second(setup.batches, stamps, setup.warmup, setup.total_steps,
                                                       skipped), 2)}


def compile_verdict(samples: dict[str, list[dict[str, float]]], skipped_because: str | None) -> dict[str, Any]:
    """Whether compiling gained, from the medians of ours and ours_compiled."""
    if skipped_because:
        return {"gained": None, "why": skipped_because}
    if not samples.get("ours") or not samples.get("ours_compiled"):
        return {"gained": None, "why": "not measured: the eager or the compiled run did not finish"}
    median = {name: {k: statistics.median(s[k] for s in samples[name]) for k in ("steady", "window", "run_s")}
              for name in ("ours", "ours_compiled")}
    steady = median["ours_compiled"]["steady"] / median["ours"]["steady"]
    compile_s = median["ours_compiled"]["run_s"] - median["ours"]["run_s"]
    return {"gained": steady >= GAIN_MARGIN, "steady_ratio": round(steady, 3),
            "window_ratio": round(median["ours_compiled"]["window"] / median["ours"]["window"], 3),
            "compilation_s_per_run": round(compile_s, 1), "margin": GAIN_MARGIN,
            "why": f"compiled / eager steady examples/s {steady:.2f} (a gain from {GAIN_MARGIN:.2f}); "
                   f"compilation about {compile_s:.0f} s per run"}


def run_throughput(plan: GpuPlan, record: PartRecord) -> None:
    from bench import throughput
    from trainables.precision import precision_here

    t = plan.throughput
    total = t.warmup + t.steps
    cfg = common.run_config(plan.teacher, plan.work / "throughput" / "unused", size=plan.size, training={
        "max_steps": total, "eval_steps": total, "max_eval_samples": 64, "mixed_precision": "no",
        "per_device_train_batch_size": plan.batch_size})
    throughput.import_torchdistill()
    setup = throughput.Setup(cfg, t.warmup, t.steps)
    precision = "auto" if plan.precision == "bf16" else "no"  # auto: bf16 on Ampere and later GPUs
    skipped = compiling_steps(setup)
    runners = {
        "ours": lambda r: ours_sample(setup, plan.work / "throughput" / f"ours-{r}", precision, False, skipped),
        "torchdistill": lambda r: {"window": round(throughput.torchdistill_examples_per_second(setup, False), 2)},
        "ours_compiled": lambda r: ours_sample(setup, plan.work / "throughput" / f"compiled-{r}", precision, True,
                                               skipped),
    }
    names = list(runners) if t.compile else ["ours", "torchdistill"]
    chosen = precision_here(cfg.training.model_copy(update={"mixed_precision": precision}))
    ours_precision = "fp32" if chosen == "no" else chosen
    record.update(setup={"teacher_layers": setup.teacher_layers, "hidden_size": setup.teacher.config.hidden_size,
                         "student_layers": cfg.student.num_layers, "batch_size": plan.batch_size,
                         "max_seq_length": cfg.training.max_seq_length, "mean_padded_length": round(setup.mean_tokens, 1),
                         "warmup_steps": t.warmup, "timed_steps": t.steps, "repeats": t.repeats,
                         "precision": {"ours": ours_precision, "ours_compiled": ours_precision, "torchdistill": "fp32"},
                         "compiling_steps": sorted(skipped)},
                  compile=compile_verdict({}, t.compile_skipped or "not measured yet"))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(t.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated, as figure 1
            samples[name].append(runners[name](r))
            common.log(f"round {r}: {name} {samples[name][-1]}")
            record.update(samples=samples, medians=medians(samples),
                          compile=compile_verdict(samples, t.compile_skipped))


def medians(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {name: {k: round(statistics.median(s[k] for s in runs), 2) for k in runs[0]}
            for name, runs in samples.items() if runs}


# --- (c) trials per GPU-hour ----------------------------------------------------------------------


def timed_window(cfg: Any, warmup: int, steps: int) -> tuple[int, float]:
    """(examples, mean padded length) of steps warmup+1..warmup+steps of a run of `cfg`: its loop's batches."""
    from transformers import AutoTokenizer

    from trainables.data import load_task_data
    from trainables.model_source import resolve_model_source
    from trainables.tasks import resolve_task
    from trainables.training import epoch_batches

    t = cfg.training
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(cfg.teacher))
    data = load_task_data(resolve_task(cfg.task), tokenizer, t, cfg.cache_dir)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < warmup + steps:
        batches += epoch_batches(lengths, t.per_device_train_batch_size, t.seed, epoch, False)
        epoch += 1
    timed = batches[warmup:warmup + steps]
    examples = sum(len(b) for b in timed)
    return examples, sum(max(lengths[i] for i in b) * len(b) for b in timed) / examples


def trial_config(plan: GpuPlan, out: Path) -> Any:
    """A trial of (c): one evaluation at its end and no checkpoint (save_steps past its end), which would
    only add the level's disk writes to its start-up."""
    p = plan.packing
    total = p.warmup + p.steps
    return common.run_config(plan.teacher, out, size=plan.size, training={
        "max_steps": total, "eval_steps": total, "save_steps": total + 1, "max_eval_samples": 32,
        "per_device_train_batch_size": plan.batch_size, **plan.training_precision})


def timed_trial(plan: GpuPlan, index: int, level: int, barrier: Any) -> dict[str, Any]:
    """One trial of the level: its timed steps start when every trial of the level has warmed up."""
    from bench.throughput import sync
    from trainables.run import distill

    p = plan.packing
    total = p.warmup + p.steps
    times: dict[str, float] = {}

    def on_step(step: int, steps: int) -> None:
        if step == p.warmup:
            sync()
            barrier.wait(timeout=plan.budgets["packing"])
            times["start"] = time.time()
        elif step == total:
            sync()
            times["end"] = time.time()

    with common.silence():
        distill(trial_config(plan, plan.work / "packing" / f"k{level}-{index}"), on_step=on_step)
    return {"level": level, "index": index, **times}


def packing_worker(index: int, plan_json: str, barriers: dict[int, Any], level_done: Any, results: Any) -> None:
    """A process of (c): takes part in every level with more trials than its index, then waits for the level."""
    common.quiet_logs()
    plan = GpuPlan.model_validate_json(plan_json)
    for level in plan.packing.levels:
        try:
            if index < level:
                results.put(timed_trial(plan, index, level, barriers[level]))
            level_done.wait(timeout=plan.budgets["packing"])
        except Exception:
            results.put({"level": level, "index": index, "error": traceback.format_exc()[-2000:]})
            barriers[level].abort()
            level_done.abort()
            return


def level_figures(trials: list[dict[str, Any]], examples_per_trial: int) -> dict[str, Any]:
    """k trials' examples/s together and trials per GPU-hour, from their timed windows."""
    k = len(trials)
    wall = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    return {"trials_per_gpu": k, "wall_s": round(wall, 2),
            "median_trial_s": round(statistics.median(t["end"] - t["start"] for t in trials), 2),
            "examples_per_second": round(k * examples_per_trial / wall, 2),
            "trials_per_gpu_hour": round(k * 3600 / wall, 1)}


def run_packing(plan: GpuPlan, record: PartRecord) -> None:
    p = plan.packing
    examples, padded = timed_window(trial_config(plan, plan.work / "packing" / "window"), p.warmup, p.steps)
    record.update(setup={"levels": p.levels, "warmup_steps": p.warmup, "timed_steps": p.steps,
                         "batch_size": plan.batch_size, "examples_per_trial": examples,
                         "mean_padded_length": round(padded, 1), "precision": plan.precision}, levels=[])
    context = multiprocessing.get_context("spawn")
    most = max(p.levels)
    barriers = {level: context.Barrier(level) for level in p.levels}
    level_done = context.Barrier(most)
    results = context.Queue()
    workers = [context.Process(target=packing_worker, args=(i, plan.model_dump_json(), barriers, level_done, results))
               for i in range(most)]
    for worker in workers:
        worker.start()
    try:
        for level in p.levels:
            trials = [results.get(timeout=plan.budgets["packing"]) for _ in range(level)]
            errors = [t["error"] for t in trials if "error" in t]
            if errors:
                raise RuntimeError(f"a trial of level {level} failed: {errors[0]}")
            record.update(levels=[*record.data["levels"], level_figures(trials, examples)])
    except queue.Empty:
        raise RuntimeError("a packing trial sent no result in time") from None
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    one = record.data["levels"][0]["examples_per_second"]
    record.update(levels=[{**level, "vs_one_trial": round(level["examples_per_second"] / one, 3)}
                          for level in record.data["levels"]])
