"""What the GPU check runs, typed and validated: one plan for a GPU, one for the CPU rehearsal.

The parent process of `python -m bench.gpu` writes the plan to a JSON file and each part, a
process of its own, reads it back through `GpuPlan`: a part never guesses a size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from trainables.config import StrictModel

PartName = Literal["sweep", "throughput", "packing", "peak"]  # in the order they run (bench.gpu.PART_FUNCTIONS)

# Inductor's compile of a training step costs 45 to 60 s per new shape on 2 CPU cores, even for
# tiny models (trainables/compile.py): the rehearsal skips the compiled variant unless asked.
COMPILE_SKIPPED = ("skipped in the CPU rehearsal: inductor compiles each length bucket for 45-60 s on 2 CPU cores "
                   "(trainables/compile.py); --rehearse-compile runs it anyway")


class SweepPart(StrictModel):
    """(a) A real `distillsweep sweep` with resources.gpu auto: a KD-only mix (teacher logits from the
    cache) and the full mix (live teacher), times `seeds`."""

    seeds: list[int] = Field(min_length=1)
    steps: int = Field(ge=1)
    eval_steps: int = Field(ge=1)
    max_eval_samples: int = Field(ge=1)
    fake_gpus: int = Field(ge=0, description="GPUs the private Ray declares (RAY_OVERRIDE_RESOURCES); 0: the real ones")
    fake_gpu_trials: float = Field(gt=1, description="with fake GPUs: one GPU's memory, in trials of the largest need")


class ThroughputPart(StrictModel):
    """(b) Figure 1's runs at batch 32: ours eager, ours compiled, torchdistill."""

    warmup: int = Field(ge=1)
    steps: int = Field(ge=1)
    repeats: int = Field(ge=1)
    compile: bool
    compile_skipped: str | None = None


class PackingPart(StrictModel):
    """(c) k trials at once on one GPU, each `warmup` + `steps` steps, for each k of `levels`."""

    levels: list[int] = Field(min_length=1)
    warmup: int = Field(ge=1)
    steps: int = Field(ge=1)

    @field_validator("levels")
    @classmethod
    def _from_one_up(cls, levels: list[int]) -> list[int]:
        """Each level is compared with one trial alone, which therefore comes first."""
        if levels[0] != 1 or levels != sorted(set(levels)):
            raise ValueError(f"{levels}: trials per GPU must rise from 1, each once (e.g. [1, 2, 4, 8])")
        return levels


class GpuPlan(StrictModel):
    rehearsal: bool
    device: str = Field(description="torch's name of the GPU, or cpu")
    size: Literal["smallest", "paper"] = Field(description="bench.common's model sizes")
    precision: Literal["bf16", "fp32"]
    batch_size: int = Field(ge=1)
    work: Path = Field(description="scratch: Ray's folder, the sweep, the MLflow store, run outputs")
    cache: Path = Field(description="DISTILLSWEEP_CACHE: demo data, tokenised splits, the teacher, logit caches")
    teacher: Path
    sweep: SweepPart
    throughput: ThroughputPart
    packing: PackingPart
    budgets: dict[PartName, int] = Field(description="seconds each part may run before it is stopped")

    @property
    def training_precision(self) -> dict[str, object]:
        """The TrainingConfig fields for this precision."""
        return {"bf16": True} if self.precision == "bf16" else {"mixed_precision": "no"}

    def part_file(self, part: PartName) -> Path:
        return self.work / "parts" / f"{part}.json"


class PartRecord:
    """A part's results so far, rewritten whole at each update (atomically): a part stopped at its
    budget leaves what it had measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def gpu_plan(work: Path, cache: Path, teacher: Path, device: str) -> GpuPlan:
    """One GPU, about 8 minutes: the paper's shapes (BERT-base teacher, 6-layer student, 128 tokens), bf16."""
    return GpuPlan(
        rehearsal=False, device=device, size="paper", precision="bf16", batch_size=32, work=work, cache=cache, teacher=teacher,
        sweep=SweepPart(seeds=[1, 2], steps=40, eval_steps=20, max_eval_samples=200, fake_gpus=0, fake_gpu_trials=2),
        throughput=ThroughputPart(warmup=10, steps=40, repeats=2, compile=True),
        packing=PackingPart(levels=[1, 2, 4, 8], warmup=5, steps=30),
        budgets={"sweep": 130, "throughput": 170, "packing": 100, "peak": 20},
    )


def rehearsal_plan(work: Path, cache: Path, teacher: Path, compile: bool) -> GpuPlan:
    """The same parts on 2 CPU cores in about 2 minutes: the tiny teacher, a few steps, fp32, 2 fake GPUs."""
    return GpuPlan(
        rehearsal=True, device="cpu", size="smallest", precision="fp32", batch_size=32, work=work, cache=cache, teacher=teacher,
        sweep=SweepPart(seeds=[1], steps=4, eval_steps=2, max_eval_samples=32, fake_gpus=2, fake_gpu_trials=2.5),
        throughput=ThroughputPart(warmup=1, steps=3, repeats=1, compile=compile,
                                  compile_skipped=None if compile else COMPILE_SKIPPED),
        packing=PackingPart(levels=[1, 2], warmup=1, steps=3),
        budgets={"sweep": 150, "throughput": 300 if compile else 90, "packing": 90, "peak": 30},
    )
