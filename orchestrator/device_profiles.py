"""Device profiles: what one device achieves on a distillation step, for the cost estimate.

A profile is a small table of achieved TFLOP/s, one entry per measured model width, per-device
batch and precision, each with its source. The shipped ones (`device_profiles.yaml` beside this
module) are BENCHMARKS.md's measurements of figure 1: examples per second of whole steps (teacher
forward, student forward and backward, optimiser) turned into TFLOP/s with
`orchestrator.cost_flops`'s count of the same step, so that an estimate made with that count gives
back the measured time.
`--device-profile FILE` reads one profile in the same format, validated here.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from orchestrator.messages import UserError, brief, describe_error
from trainables.config import StrictModel, read_yaml

SHIPPED = Path(__file__).with_name("device_profiles.yaml")
Precision = Literal["bf16", "fp16", "fp32"]
HALF = frozenset({"bf16", "fp16"})  # tensor units run both at one rate


class Rate(StrictModel):
    """One measurement: whole training steps at this width, per-device batch and precision."""

    precision: Precision
    batch_size: int = Field(ge=1, description="per-device training batch of the measurement")
    hidden_size: int = Field(ge=1, description="width of the teacher and student measured")
    tflops: float = Field(gt=0, description="achieved TFLOP/s of whole steps, FLOPs as orchestrator.cost_flops counts them")
    source: str = Field(min_length=1, description="where the figure comes from")


class DeviceProfile(StrictModel):
    name: str = Field(min_length=1)
    device: str = Field(min_length=1, description="the device in words, e.g. one NVIDIA H200")
    unit: Literal["GPU", "CPU core"] = Field(description="what one device is: hours are counted in it")
    auto_precision: Precision = Field(description="what mixed_precision: auto picks on this device")
    rates: list[Rate] = Field(min_length=1)

    def rate(self, precision: str, batch_size: int, hidden_size: int) -> Rate:
        """The entry nearest a run: its precision first (bf16 and fp16 stand in for each other),
        then its batch and width, on a log scale."""

        def distance(rate: Rate) -> tuple[int, float]:
            mismatch = 0 if rate.precision == precision else 1 if {rate.precision, precision} <= HALF else 2
            return mismatch, abs(math.log(batch_size / rate.batch_size)) + abs(math.log(hidden_size / rate.hidden_size))

        return min(self.rates, key=distance)


class ShippedProfiles(StrictModel):
    profiles: list[DeviceProfile] = Field(min_length=1)


@functools.cache
def shipped_profiles() -> dict[str, DeviceProfile]:
    return {p.name: p for p in ShippedProfiles.model_validate(read_yaml(SHIPPED)).profiles}


def load_profile(choice: str | None, wants_gpu: bool) -> DeviceProfile:
    """The profile named or written in `choice`; without one, the first shipped profile of the
    sweep's kind of device (a GPU when its trials ask for one, else a CPU core)."""
    shipped = shipped_profiles()
    if choice is None:
        unit = "GPU" if wants_gpu else "CPU core"
        return next(p for p in shipped.values() if p.unit == unit)
    if choice in shipped:
        return shipped[choice]
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(f"--device-profile {brief(choice)}: neither a shipped profile ({', '.join(shipped)}) nor a "
                        "file; write one as orchestrator/device_profiles.yaml writes each of its profiles")
    try:
        return DeviceProfile.model_validate(read_yaml(path))
    except ValidationError as err:
        problems = describe_error(err).removeprefix("invalid configuration:\n  ")
        raise UserError(f"--device-profile {path}: {problems}") from None
