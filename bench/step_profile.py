"""Figure 2: where one training step's time goes, and the fraction of matmul peak it reaches.

The loop `trainables.run.distill` builds (captured before it trains) runs steps whose phases are
timed one by one with the same code the loop runs: data (columnar read, collation), teacher
forward (`TeacherSource.view`), student forward (`forward_view`), each objective's `compute`, the
backward pass, and the optimiser (clip, AdamW, schedule, zero_grad). The whole step is also timed
as the loop runs it (`_forward_backward` + optimiser), so the phases can be checked against it.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies and attention)
over one step; achieved FLOP/s divided by the machine's matrix-multiply peak, measured here with
the same thread count (best of square fp32 matmuls, and at the step's own projection shape), is
the fraction of peak. The step runs in fp32 (`mixed_precision: no`) to match that peak.
Also measured: AdamW's step on the student's parameters in its default
CPU implementation against `foreach=True` and `fused=True`, and what one evaluation and one
checkpoint cost (the loop does both every `eval_steps`).
"""

from __future__ import annotations

from bench import common  # noqa: I001

import inspect
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

NAME = "step_profile"


def capture_loop(cfg) -> Any:
    """The DistillationLoop `distill(cfg)` builds, captured instead of run."""
    import trainables.run as run_module
    from trainables.training import DistillationLoop

    captured: dict[str, Any] = {}

    class Captured(DistillationLoop):
        def run(self, resume_from=None):
            captured["loop"] = self
            return {"score": 0.0}

    original = run_module.DistillationLoop
    run_module.DistillationLoop = Captured
    try:
        with common.silence():
            run_module.distill(cfg)
    finally:
        run_module.DistillationLoop = original
    return captured["loop"]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def profiled_step(loop, stage, batches, count_flops: bool = False) -> tuple[dict[str, float], float]:
    """One step, phase by phase; returns ({phase: seconds}, FLOPs counted when asked).

    Counting FLOPs intercepts every operator, so a counted step's times are not used."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    from trainables.distiller import task_loss
    from trainables.models import forward_view
    from trainables.views import DistillBatch

    distiller = loop.accelerator.unwrap_model(loop.distiller)
    phases: dict[str, float] = {}
    counter = FlopCounterMode(display=False) if count_flops else None
    batch, phases["data"] = timed(next, batches)
    with counter if counter is not None else contextlib.nullcontext():
        teacher_view, phases["teacher_forward"] = timed(loop.teacher.view, batch, stage)
        student_view, phases["student_forward"] = timed(forward_view, distiller.student, batch, stage.needs_qkv)
        start = time.perf_counter()
        total = stage.ce_weight * task_loss(student_view.logits, batch["labels"])
        phases["objective_ce"] = time.perf_counter() - start
        distill_batch = DistillBatch(student_view, teacher_view, batch["attention_mask"], batch["labels"],
                                     batch.get("example_id"), distiller.pairs, distiller.count_padding)
        for term in stage.terms:
            module = distiller.objective_modules[term.name] if term.name in distiller.objective_modules else None
            value, phases[f"objective_{term.name}"] = timed(term.objective.compute, distill_batch, term.params, module)
            total = total + term.weight * value
        _, phases["backward"] = timed(total.backward)
    start = time.perf_counter()
    loop._optimizer_step()
    phases["optimizer"] = time.perf_counter() - start
    return phases, float(counter.get_total_flops()) if counter is not None else 0.0


def whole_step(loop, stage, batches) -> float:
    """One step exactly as `DistillationLoop._train_stage` runs it."""
    start = time.perf_counter()
    batch = next(batches)
    loop._forward_backward(batch, stage, sync=True)
    loop._optimizer_step()
    return time.perf_counter() - start


def matmul_gflops(m: int, k: int, n: int, seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def adamw_variants(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Milliseconds per AdamW step on `model`'s parameters (random gradients), by implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for name, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        for p in copies:
            p.grad = torch.randn_like(p)
        try:
            optimizer = torch.optim.AdamW(copies, lr=1e-4, **kwargs)
        except (RuntimeError, TypeError) as err:
            results[name] = f"unsupported: {err}"
            continue
        optimizer.step()
        times = []
        for _ in range(repeats):
            _, seconds = timed(optimizer.step)
            times.append(seconds)
        results[name] = round(common.median(times) * 1e3, 2)
    return results


def main() -> None:
    args = common.parse_args(NAME, __doc__)
    started = time.perf_counter()
    smallest = args.size == "smallest"
    warmup, steps = (1, 2) if smallest else (2, 12)
    teacher = common.teacher_for(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = common.run_config(teacher, Path(tmp) / "run", size=args.size,
                                # fp32: the phases are compared with the fp32 matmul peak (figure 1 has bf16)
                                training={"max_steps": 1000, "eval_steps": 1000, "max_eval_samples": 400,
                                          "mixed_precision": "no"})
        loop = capture_loop(cfg)
        stage = loop.stages[0]
        loop.distiller.train()
        batches = loop._micro_batches()
        samples: dict[str, list[float]] = {}
        flops: list[float] = []
        wholes: list[float] = []
        for step in range(warmup + steps):
            phases, _ = profiled_step(loop, stage, batches)
            whole = whole_step(loop, stage, batches)  # interleaved: drift affects both alike
            if step >= warmup:
                for k, v in phases.items():
                    samples.setdefault(k, []).append(v)
                wholes.append(whole)
        for _ in range(3 if not smallest else 1):  # FLOPs of a few steps (batches differ in length)
            flops.append(profiled_step(loop, stage, batches, count_flops=True)[1])
        med = {k: common.median(v) for k, v in samples.items()}
        phase_sum = sum(med.values())
        step_time = common.median(wholes)
        flops_per_step = common.median(flops)
        takes_stage = len(inspect.signature(loop.evaluate).parameters) > 0
        (_, eval_s) = timed(loop.evaluate, *([stage] if takes_stage else []))
        (_, checkpoint_s) = timed(loop.save_checkpoint)
        checkpoint_mb = sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints").rglob("*") if f.is_file()) / 2**20
        student = loop.accelerator.unwrap_model(loop.distiller)
        optimizer_ms = adamw_variants(student, 3 if smallest else 10)
        hidden = loop.teacher.live.model.config.hidden_size
        tokens = cfg.training.per_device_train_batch_size * cfg.training.max_seq_length
        peaks = {
            "square_best": max(matmul_gflops(n, n, n, 0.3 if smallest else 1.0) for n in (512, 1024, 2048)),
            f"projection_{tokens}x{hidden}x{4 * hidden}": matmul_gflops(tokens, hidden, 4 * hidden, 0.3 if smallest else 1.0),
        }
        # what bf16 autocast (figure 1) can reach on this device, for context
        bf16_projection = matmul_gflops(tokens, hidden, 4 * hidden, 0.3 if smallest else 1.0, torch.bfloat16)
    peak = peaks["square_best"]
    achieved = flops_per_step / step_time / 1e9
    figures = {
        "figure": "one training step by phase (median seconds), FLOPs and fraction of matmul peak",
        "setup": {
            "teacher": Path(str(teacher)).name, "teacher_layers": loop.teacher.live.model.config.num_hidden_layers,
            "hidden_size": hidden, "student_layers": cfg.student.num_layers,
            "objectives": [o.name for o in cfg.objectives], "batch_size": cfg.training.per_device_train_batch_size,
            "max_seq_length": cfg.training.max_seq_length, "steps": steps, "warmup_steps": warmup,
        },
        "phase_seconds": {k: round(v, 4) for k, v in med.items()},
        "phase_share": {k: round(v / phase_sum, 3) for k, v in med.items()},
        "phase_sum_seconds": round(phase_sum, 4),
        "whole_step_seconds": round(step_time, 4),
        "phase_sum_vs_whole_step": round(phase_sum / step_time, 3),
        "gflop_per_step": round(flops_per_step / 1e9, 2),
        "achieved_gflops": round(achieved, 1),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "fraction_of_matmul_peak": round(achieved / peak, 3),
        "bf16_matmul_gflops_projection": round(bf16_projection, 1),
        "adamw_step_ms": optimizer_ms,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "evaluation_seconds": round(eval_s, 3),
        "evaluation_examples": len(loop.data.validation),
        "checkpoint_seconds": round(checkpoint_s, 3),
        "checkpoint_mb": round(checkpoint_mb, 1),
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
