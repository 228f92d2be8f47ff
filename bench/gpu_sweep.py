"""(a) A real `distillsweep sweep` with `resources.gpu: auto`, end to end, checked afterwards.

The CLI runs as a user runs it, in a process of its own, on a private local Ray: the trials' GPU
shares come from orchestrator.gpu_memory (the plan it prints first), Ray places them, the KD-only
trials read the teacher's logits from the cache (moved to the GPU), the full-mix trials run the
teacher live, in bf16 (fp32 in the rehearsal), MLflow records each trial in a SQLite store. Then:
every trial a FINISHED child run of the sweep's parent run, the printed plan, how many trials ran at
once, and each trial's peak memory (`peak_memory_mb`: torch.cuda.max_memory_allocated on a GPU; the
process's peak RSS on a CPU, which is no measure of the estimate) against the estimate.

In the rehearsal Ray declares fake GPUs (RAY_OVERRIDE_RESOURCES) and the sweep is told one GPU's
memory (`resources.gpu_memory_gb`), sized so that trials share one: `gpu: auto` plans and Ray places
as on a GPU machine, and the trials train on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import common
from bench.gpu_plan import GpuPlan, PartRecord

MIXES = {"kd": ["kd"], "full": ["hidden_mse", "att_kl", "kd"]}  # logits from the cache; teacher live
EXPERIMENT = "gpu-check"
MIB = 2**20


def space(plan: GpuPlan, gpu_memory_gb: float | None) -> dict[str, Any]:
    """The sweep's space file: both mixes x the plan's seeds, gpu auto."""
    s = plan.sweep
    resources: dict[str, Any] = {"cpu": 1, "gpu": "auto"}
    if gpu_memory_gb is not None:
        resources["gpu_memory_gb"] = gpu_memory_gb
    return {
        "name": EXPERIMENT,
        "base": {
            "task": "demo", "teacher": str(plan.teacher),
            "student": {"num_layers": common.STUDENT_LAYERS[plan.size], "init": "skip"},
            "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}], "ce_weight": 0.5, "mapping": "skip",
            "cache_dir": str(plan.cache),
            "training": {"learning_rate": 1e-4, "per_device_train_batch_size": plan.batch_size,
                         "max_seq_length": common.MAX_SEQ_LENGTH[plan.size], "max_steps": s.steps,
                         "eval_steps": s.eval_steps, "max_eval_samples": s.max_eval_samples,
                         "teacher_logits_cache": True, **plan.training_precision},
        },
        "space": {"objectives.mix": {"grid": list(MIXES.values())}, "training.seed": {"grid": s.seeds}},
        "search": {"algorithm": "grid", "metric": "score", "mode": "max"},
        "scheduler": {"type": "none"},
        "resources": resources,
        "storage": str(plan.work / "sweeps"),
        "tracking": {"uri": tracking_uri(plan), "experiment": EXPERIMENT},
        "max_failures": 0,
    }


def tracking_uri(plan: GpuPlan) -> str:
    return f"sqlite:///{plan.work / 'mlflow.db'}"


def ray_accelerator_type(device: str) -> str | None:
    """The accelerator type Ray will label this node with (its own parsing of the GPU's name)."""
    if device == "cpu":
        return None
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(device)


def gpu_memory(plan: GpuPlan, largest_need: int) -> tuple[float, float | None, str]:
    """(one GPU's GiB as the plan uses it, the value for resources.gpu_memory_gb or None, where it comes from)."""
    from orchestrator.gpu_memory import GIB, GPU_MEMORY_GIB

    if plan.sweep.fake_gpus:
        given = round(plan.sweep.fake_gpu_trials * largest_need / GIB, 4)
        return given, given, f"given: {plan.sweep.fake_gpu_trials:g} x the largest trial's need (fake GPUs)"
    kind = ray_accelerator_type(plan.device)
    if kind in GPU_MEMORY_GIB:
        return GPU_MEMORY_GIB[kind], None, f"Ray's accelerator type {kind} (orchestrator.gpu_memory.GPU_MEMORY_GIB)"
    import torch

    given = int(torch.cuda.get_device_properties(0).total_memory / GIB * 10) / 10
    return given, given, f"torch's total memory: Ray's accelerator type {kind!r} is not in GPU_MEMORY_GIB"


def planned(plan: GpuPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the space file, the plan gpu auto makes of it: per mix its need, share and trials per GPU)."""
    from orchestrator.config import SweepSpec
    from orchestrator.gpu_memory import GpuPacking, estimate, representative_configs, shapes_of, workload_of
    from orchestrator.trials import TrialTemplate

    spec = SweepSpec.model_validate(space(plan, None))
    template = TrialTemplate(spec.trial_base())
    configs = {name: template.resolve({"objectives.mix": mix}) for name, mix in MIXES.items()}
    largest = max(estimate(*shapes_of(cfg, str(plan.teacher)), workload_of(cfg)).total for cfg in configs.values())
    memory, given, source = gpu_memory(plan, largest)
    raw = space(plan, given)
    spec = SweepSpec.model_validate(raw)
    packing = GpuPacking(spec, template, memory)
    packing.check(representative_configs(spec, template))
    fits = {}
    for name, cfg in configs.items():
        fit = packing.fit(cfg)
        tensors = fit.need.total - fit.need.margin - fit.need.context
        fits[cfg.objective_mix] = {"mix": name, "label": fit.label, "gpu_share": fit.gpu, "trials_per_gpu": fit.per_gpu,
                                   "estimate_mib": round(fit.need.total / MIB), "estimate_tensors_mib": round(tensors / MIB)}
    return raw, {"gpu_memory_gib": memory, "gpu_memory_from": source, "fits": fits}


def cli_env(plan: GpuPlan) -> dict[str, str]:
    """The CLI's environment: this checkout and the installed wheels on the path, a private Ray in the
    scratch folder (fake GPUs in the rehearsal), no cluster or tracking server inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(common.ROOT)]))
    env.update(RAY_TMPDIR=str(plan.work / "ray"), DISTILLSWEEP_CACHE=str(plan.cache), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if plan.sweep.fake_gpus:
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"GPU": plan.sweep.fake_gpus})
    return env


def run_cli(plan: GpuPlan, space_file: Path, log: Path) -> subprocess.CompletedProcess:
    (plan.work / "ray").mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(space_file)], cwd=common.ROOT,
                              env=cli_env(plan), stdout=out, stderr=subprocess.STDOUT, text=True)


def at_once(intervals: list[tuple[int, int]]) -> int:
    """The most intervals (start, end) that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def recorded_trials(plan: GpuPlan, fits: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """What MLflow holds of the sweep: its child runs, their states, peak memory (against the estimate
    `on_gpu`, where it is CUDA's allocated peak)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(plan))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("distillsweep_role") == "sweep"]
    children = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trials = []
    for run in children:
        peak = max((m.value for m in client.get_metric_history(run.info.run_id, "peak_memory_mb")), default=None)
        fit = fits.get(run.data.tags.get("objective_mix"), {})
        trials.append({
            "mix": run.data.tags.get("objective_mix"), "seed": run.data.params.get("training.seed"),
            "status": run.info.status, "score": run.data.metrics.get("score"),
            "peak_memory_mib": peak and round(peak), "estimate_mib": fit.get("estimate_mib"),
            "peak_over_estimate_tensors": round(peak / fit["estimate_tensors_mib"], 3) if on_gpu and peak and fit else None,
        })
    finished = [r for r in children if r.info.status == "FINISHED"]
    return {
        "parent_runs": len(parents), "child_runs": len(children), "child_runs_finished": len(finished),
        "trials_at_once": at_once([(r.info.start_time, r.info.end_time) for r in finished if r.info.end_time]),
        "trials": trials,
    }


def run_sweep(plan: GpuPlan, record: PartRecord) -> None:
    from trainables.teacher_cache import CACHE_SUBDIR

    raw, gpu_plan = planned(plan)
    space_file = plan.work / "gpu-check.yaml"
    space_file.write_text(json.dumps(raw, indent=1))  # JSON is YAML
    trials = len(MIXES) * len(plan.sweep.seeds)
    record.update(trials_planned=trials, precision=plan.precision, memory_measure="torch.cuda.max_memory_allocated"
                  if not plan.rehearsal else "peak RSS of the trial's process (CPU): not comparable with the estimate",
                  plan=gpu_plan, space=raw)
    log = plan.work / "sweep.log"
    done = run_cli(plan, space_file, log)
    output = log.read_text()
    printed = [line.strip() for line in output.splitlines() if "resources.gpu auto" in line or " per GPU; at once" in line]
    record.update(cli_exit=done.returncode, printed_plan=printed)
    if done.returncode != 0:
        raise RuntimeError(f"distillsweep sweep exited {done.returncode}: {output[-2000:]}")
    shares = [f"GPU {fit['gpu_share']:g}, {fit['trials_per_gpu']} per GPU" for fit in gpu_plan["fits"].values()]
    cache = plan.cache / CACHE_SUBDIR
    record.update(printed_plan_matches=all(any(share in line for line in printed) for share in shares),
                  teacher_logit_cache_files=sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0,
                  **recorded_trials(plan, gpu_plan["fits"], on_gpu=not plan.rehearsal))
    data = record.data
    if data["child_runs_finished"] != trials or not data["printed_plan_matches"]:
        raise RuntimeError(f"{data['child_runs_finished']} of {trials} trials FINISHED in MLflow; printed plan "
                           f"{'matches' if data['printed_plan_matches'] else 'differs from'} {shares}")
