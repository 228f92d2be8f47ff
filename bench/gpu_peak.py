"""(d) What fraction of the device's bf16 dense peak the runs of (b) and (c) achieve.

Achieved FLOP/s = examples/s x the model FLOPs of one example, counted as the cost estimate counts
them (orchestrator.cost_flops: the matrix products of the teacher's forward, the student's forward and
its backward at twice the forward) at the runs' mean padded length under dynamic padding. A compiled run pads to length
buckets and so multiplies more, but the padding is no useful work: every run is credited with the
same FLOPs per example. The peak is the datasheet's dense bf16 tensor-core figure of the GPU named
by torch, from the table below; a device not in it (a CPU among them) has "peak unknown". Beside
it, the rate of one large bf16 matrix product measured on the device (fp32 on a CPU).
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.gpu_plan import GpuPlan, PartRecord

# (fragment of torch's device name, dense bf16 TFLOP/s, source); the first fragment found wins,
# so the specific names (NVL, PCIe) come before the family's.
BF16_DENSE_PEAK_TFLOPS = (
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, half dense"),
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, half dense"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: 1,513 TFLOP/s bf16 with sparsity, half dense"),
    ("H100", 989.5, "NVIDIA H100 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, half dense"),
    ("H200", 989.5, "NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, half dense"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense"),
)
MATMUL_SIZE = {"cuda": 8192, "cpu": 512}
MATMUL_REPEATS = 10


def bf16_dense_peak(device: str) -> tuple[float, str] | None:
    """(TFLOP/s, source) of the device torch names, or None where the table does not know it."""
    return next(((tflops, source) for fragment, tflops, source in BF16_DENSE_PEAK_TFLOPS if fragment in device), None)


def flops_per_example(teacher: Any, student: Any, padded_length: float, labels: int = 2) -> float:
    """Teacher forward + student forward and backward (3x forward) of one example, as the cost estimate
    counts them (`teacher`, `student`: orchestrator.cost_flops.Shape)."""
    from orchestrator.cost_flops import CLASSIFIER

    return (teacher.forward_flops(1, padded_length, CLASSIFIER, labels)
            + 3 * student.forward_flops(1, padded_length, CLASSIFIER, labels))


def achieved_tflops(examples_per_second: float, flops: float) -> float:
    return examples_per_second * flops / 1e12


def share(achieved: float, of: float | None) -> float | None:
    """achieved / of, rounded; None without a denominator."""
    return round(achieved / of, 4) if of else None


def measure_matmul() -> dict[str, Any]:
    """One square matrix product, repeated: bf16 on a GPU, fp32 on a CPU."""
    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    n = MATMUL_SIZE[kind]
    a, b = (torch.randn(n, n, device=kind, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(MATMUL_REPEATS):
        a @ b
    sync()
    seconds = (time.perf_counter() - start) / MATMUL_REPEATS
    return {"dtype": str(dtype).removeprefix("torch."), "size": n, "tflops": round(2 * n**3 / seconds / 1e12, 3)}


def run_peak(plan: GpuPlan, record: PartRecord) -> None:
    """The device's peak and matmul rate, then the fractions of what (b) and (c) recorded (they ran first)."""
    from bench.common import STUDENT_LAYERS
    from orchestrator.cost_flops import Shape, shape_of

    peak = bf16_dense_peak(plan.device)
    record.update(device=plan.device, peak_tflops=peak and peak[0],
                  peak_source=peak[1] if peak else f"peak unknown: {plan.device!r} is not in bench/gpu_peak.py's table")
    record.update(matmul=measure_matmul())
    teacher = shape_of(str(plan.teacher))
    student = Shape(STUDENT_LAYERS[plan.size], teacher.hidden, teacher.intermediate, teacher.vocab)
    measured = {part: json.loads(path.read_text()) if (path := plan.part_file(part)).is_file() else {}
                for part in ("throughput", "packing")}
    record.update(rows=fractions(record.data, measured["throughput"], measured["packing"], teacher, student))


def run_rows(throughput: dict[str, Any], packing: dict[str, Any]) -> list[dict[str, Any]]:
    """(label, precision, examples/s, mean padded length) of every run (b) and (c) measured."""
    rows = []
    setup, medians = throughput.get("setup", {}), throughput.get("medians", {})
    for name, measure in (("ours", "steady"), ("ours_compiled", "steady"), ("torchdistill", "window")):
        if name in medians:
            rows.append({"run": f"(b) {name}, {measure}", "precision": setup["precision"][name],
                         "examples_per_second": medians[name][measure], "padded_length": setup["mean_padded_length"]})
    for level in packing.get("levels", []):
        rows.append({"run": f"(c) {level['trials_per_gpu']} per GPU", "precision": packing["setup"]["precision"],
                     "examples_per_second": level["examples_per_second"],
                     "padded_length": packing["setup"]["mean_padded_length"]})
    return rows


def fractions(peak: dict[str, Any], throughput: dict[str, Any], packing: dict[str, Any], teacher: Any,
              student: Any) -> list[dict[str, Any]]:
    """Each measured run's achieved TFLOP/s and its fractions of the peak and of the measured matmul."""
    matmul = peak.get("matmul", {}).get("tflops")
    out = []
    for row in run_rows(throughput, packing):
        achieved = achieved_tflops(row["examples_per_second"], flops_per_example(teacher, student, row["padded_length"]))
        out.append({**row, "achieved_tflops": round(achieved, 3), "of_bf16_dense_peak": share(achieved, peak.get("peak_tflops")),
                    "of_measured_matmul": share(achieved, matmul)})
    return out
