"""Which precision a run trains in, per device, and the optimiser implementation it gets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from datasets import Dataset
from transformers import PreTrainedModel

from trainables.config import ObjectiveSpec, StudentConfig, TrainingConfig
from trainables.distiller import Distiller, StagePlan, make_terms
from trainables.mapping import layer_pairs
from trainables.models import build_student
from trainables.precision import choose_precision
from trainables.data import TaskData
from trainables.teacher_source import LiveTeacher, TeacherSource
from trainables.training import DistillationLoop, RunOutputs, adamw_implementation


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


def cpu_accelerator(mixed_precision: str) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=True)


def gpu_fp16_accelerator(init_scale: float, growth_interval: int = 2000) -> Accelerator:
    """Accelerate's fp16 set-up on a GPU, made on this CPU: fp16 autocast and a real GradScaler.

    Accelerate switches both on only on accelerators; the two attributes it sets there are set here.
    """
    accelerator = cpu_accelerator("fp16")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    return accelerator


def stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([e[key] for e in examples]) for key in examples[0]}


def kd_loop(teacher: PreTrainedModel, accelerator: Accelerator, out: Path, **training) -> DistillationLoop:
    """A 2-layer student distilled with kd + CE on 16 random sequences, one step by default; no dropout."""
    teacher = copy.deepcopy(teacher)
    teacher.config.hidden_dropout_prob = teacher.config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    student = build_student(teacher, StudentConfig(num_layers=2, init="lower"), 2)
    ids = torch.randint(5, 120, (16, 12), generator=torch.Generator().manual_seed(0))
    train = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 16, "labels": [i % 2 for i in range(16)]}
    )
    data = TaskData(train=train, validation=train.select(range(8)), collate=stack, score=None, main_metric="loss")
    settings = {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_steps": 1, "eval_steps": 1,
                "warmup_ratio": 0.0, "lr_scheduler_type": "constant_with_warmup", **training}
    return DistillationLoop(
        Distiller(student, {}, layer_pairs("skip", 4, 2), False, False),
        TeacherSource(LiveTeacher(teacher, accelerator, dropout=False)),
        [StagePlan("train", tuple(make_terms([ObjectiveSpec(name="kd")])), 0.5)], data,
        TrainingConfig(**settings), accelerator, RunOutputs(out),
    )


def student_weights(loop: DistillationLoop) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in loop.accelerator.unwrap_model(loop.distiller).parameters()])


def test_fp16_step_unscales_gradients_before_clipping_and_adamw(tiny_bert, tmp_path) -> None:
    """fp16 autocast + loss scale 256 takes the fp32 step. A large adam_epsilon makes AdamW's step
    follow the gradients' size, not only their sign, and the clipping norm lies between the true
    norm and the scaled one, so gradients left scaled would show twice; a clean step grows the scale."""
    training = {"adam_epsilon": 1e-2, "max_grad_norm": 1.0}  # true norm 0.03, scaled 7.5
    accelerators = {"fp32": cpu_accelerator("no"), "fp16": gpu_fp16_accelerator(2.0**8, growth_interval=1)}
    updates = {}
    for name, accelerator in accelerators.items():
        loop = kd_loop(tiny_bert, accelerator, tmp_path / name, **training)
        before = student_weights(loop)
        loop.run()
        updates[name] = student_weights(loop) - before
    assert updates["fp32"].abs().max() > 0
    torch.testing.assert_close(updates["fp16"], updates["fp32"], rtol=0.05, atol=2e-6)
    assert accelerators["fp16"].scaler.get_scale() == 2.0**9


def test_fp16_step_with_overflowing_gradients_is_skipped_and_the_scale_halved(tiny_bert, tmp_path) -> None:
    accelerator = gpu_fp16_accelerator(2.0**40)  # far past fp16's range: the scaled gradients overflow
    loop = kd_loop(tiny_bert, accelerator, tmp_path)
    before = student_weights(loop)
    loop.run()
    assert torch.equal(student_weights(loop), before)
    assert accelerator.scaler.get_scale() == 2.0**39


def test_resumed_fp16_run_continues_with_the_saved_loss_scale(tiny_bert, tmp_path) -> None:
    kd_loop(tiny_bert, gpu_fp16_accelerator(2.0**40), tmp_path).run()  # overflows once: scale 2^39
    accelerator = gpu_fp16_accelerator(2.0**40)
    kd_loop(tiny_bert, accelerator, tmp_path).load_checkpoint(tmp_path / "checkpoints" / "step-0000001")
    assert accelerator.scaler.get_scale() == 2.0**39
