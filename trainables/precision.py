"""The precision a run trains in on this device, and the Accelerator that applies it.

fp32, bf16 or fp16 autocast; under fp16 on a GPU Accelerate's GradScaler carries the loss scale,
which `DistillationLoop._optimizer_step` steps.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from trainables.config import TrainingConfig

log = logging.getLogger(__name__)


def make_accelerator(training: TrainingConfig) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    precision = precision_here(training)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # Accelerate keeps one precision per process, but one process may train runs of several:
        # a reused Tune worker, a benchmark. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not on_gpu)


def precision_here(training: TrainingConfig) -> str:
    """Accelerate's mixed_precision for `training` on this machine's device."""
    on_gpu = torch.cuda.is_available()
    native = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
    return choose_precision(training, on_gpu, native)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX).

    There bf16 autocast runs a BERT distillation step about 1.7x faster than fp32 (bench/precision);
    elsewhere torch emulates bf16 on CPU and autocast only slows training down.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def choose_precision(training: TrainingConfig, on_gpu: bool, native_bf16: bool) -> str:
    """Accelerate's mixed_precision for this device.

    An explicit bf16/fp16 wins; `auto` picks bf16 where the device does bf16 matrix products
    natively (Ampere or later GPUs, CPUs with AMX), else fp16 on GPUs and fp32 on CPUs.
    CPUs never train in fp16: torch has no fast fp16 kernels there.
    """
    if not on_gpu:
        if training.fp16:
            log.warning("no GPU: training in fp32 instead of fp16")
            return "no"
        if training.bf16:
            if not native_bf16:
                log.warning("this CPU has no bf16 matrix units (AMX): bf16 autocast will be slow here")
            return "bf16"
        return "bf16" if training.mixed_precision == "auto" and native_bf16 else "no"
    if training.fp16:
        return "fp16"
    if training.bf16 or training.mixed_precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    return "no"
