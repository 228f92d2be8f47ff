"""Which precision a run trains in, per device, and the optimiser implementation it gets."""

from __future__ import annotations

import pytest
import torch

from trainables.config import TrainingConfig
from trainables.run import choose_precision
from trainables.training import adamw_implementation


@pytest.mark.parametrize(
    ("settings", "on_gpu", "native_bf16", "expected"),
    [
        ({}, False, True, "bf16"),  # CPU with AMX: auto autocasts to bf16
        ({}, False, False, "no"),  # CPU without bf16 units: fp32
        ({"mixed_precision": "no"}, False, True, "no"),
        ({"bf16": True}, False, False, "bf16"),  # asked for explicitly: honoured, with a warning
        ({"fp16": True}, False, True, "no"),  # no fp16 training on CPU
        ({}, True, True, "bf16"),
        ({}, True, False, "fp16"),  # pre-Ampere GPU
        ({"mixed_precision": "no"}, True, True, "no"),
        ({"fp16": True}, True, True, "fp16"),
        ({"bf16": True}, True, False, "fp16"),
    ],
)
def test_precision_follows_device_and_request(settings, on_gpu, native_bf16, expected) -> None:
    assert choose_precision(TrainingConfig(**settings), on_gpu, native_bf16) == expected


def test_yaml_no_means_fp32() -> None:
    assert TrainingConfig.model_validate({"mixed_precision": False}).mixed_precision == "no"


def test_fused_adamw_only_where_every_parameter_has_a_kernel() -> None:
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_implementation(cpu) == {"fused": True}
    assert adamw_implementation(cpu + [torch.nn.Parameter(torch.zeros(3, device="meta"))]) == {}
    assert adamw_implementation([]) == {}


def test_fused_adamw_takes_the_same_step_as_the_reference_implementation() -> None:
    torch.manual_seed(0)
    start = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(5)]
    params = {}
    for name, kwargs in (("reference", {"foreach": False}), ("chosen", None)):
        p = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, **(kwargs or adamw_implementation([p])))
        for g in grads:
            p.grad = g.clone()
            optimizer.step()
        params[name] = p.detach()
    torch.testing.assert_close(params["chosen"], params["reference"], rtol=1e-5, atol=1e-6)
