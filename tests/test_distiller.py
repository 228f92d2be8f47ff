"""Which student parameters a stage's loss reaches: data-parallel runs train only those."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertForMaskedLM

from trainables.config import ObjectiveSpec, StudentConfig
from trainables.distiller import Distiller, StagePlan, build_modules, make_terms, plan_stages
from trainables.mapping import layer_pairs
from trainables.models import build_student, forward_view
from trainables.objectives import ModuleContext

TOP = "student.bert.encoder.layer.1."
QUERY_KEY = ("attention.self.query.", "attention.self.key.")
VALUE = "attention.self.value."


def distiller_and_batch(
    teacher: torch.nn.Module, objectives: list[str], mapping: str | list[int], auto_class: type
) -> tuple[Distiller, list, dict[str, torch.Tensor]]:
    student = build_student(teacher, StudentConfig(num_layers=2, init="skip"), 2, auto_class=auto_class)
    terms = make_terms([ObjectiveSpec(name=n) for n in objectives])
    context = ModuleContext(32, 32, 2, 4, num_train_examples=8, train_labels=torch.tensor([0, 1] * 4), combine=False)
    distiller = Distiller(student, build_modules(terms, context), layer_pairs(mapping, 4, 2), False, False)
    batch = {
        "input_ids": torch.randint(0, 120, (2, 8), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1]),
        "example_id": torch.tensor([3, 4]),
    }
    return distiller, terms, batch


def unreached(distiller: Distiller, teacher: torch.nn.Module, batch: dict, stage: StagePlan) -> set[str]:
    teacher_view = forward_view(teacher, batch, need_qkv=stage.needs_qkv) if stage.terms else None
    return distiller.unreached_parameters(batch, teacher_view, stage)


@pytest.fixture
def mlm_teacher(tiny_bert) -> BertForMaskedLM:
    return BertForMaskedLM(tiny_bert.config).eval()


@pytest.mark.parametrize(("objective", "values_reached"), [("att_kl", False), ("att_mse", False), ("minilm", True)])
def test_attention_on_the_top_layer_without_mlm_leaves_head_and_top_layer_rest_unreached(
    objective, values_reached, mlm_teacher
):
    distiller, terms, batch = distiller_and_batch(mlm_teacher, [objective], [3], AutoModelForMaskedLM)
    names = {n for n, _ in distiller.named_parameters()}
    found = unreached(distiller, mlm_teacher, batch, StagePlan("pretrain", tuple(terms), 0.0))
    reached_in_top = QUERY_KEY + ((VALUE,) if values_reached else ())
    expected = {
        n for n in names
        if n.startswith("student.cls.") or (n.startswith(TOP) and not n.removeprefix(TOP).startswith(reached_in_top))
    }
    assert found == expected
    assert "student.bert.embeddings.word_embeddings.weight" not in found  # tied to the MLM decoder


def test_mlm_loss_reaches_every_parameter(mlm_teacher):
    distiller, terms, batch = distiller_and_batch(mlm_teacher, ["att_kl"], [3], AutoModelForMaskedLM)
    batch["labels"] = torch.where(torch.arange(8) % 3 == 0, batch["input_ids"], -100)
    assert unreached(distiller, mlm_teacher, batch, StagePlan("pretrain", tuple(terms), 0.5)) == set()


def test_two_stage_leaves_the_classifier_out_of_stage_one_only(tiny_bert):
    distiller, terms, batch = distiller_and_batch(tiny_bert, ["att_mse", "kd"], "skip", AutoModelForSequenceClassification)
    intermediate, prediction = plan_stages(terms, ce_weight=0.5, two_stage=True)
    found = unreached(distiller, tiny_bert, batch, intermediate)
    assert {"student.classifier.weight", "student.classifier.bias", "student.bert.pooler.dense.weight"} <= found
    assert f"{TOP}intermediate.dense.weight" in found and f"{TOP}attention.self.query.weight" not in found
    assert unreached(distiller, tiny_bert, batch, prediction) == set()


def test_probe_leaves_crd_memory_banks_and_gradients_untouched(tiny_bert):
    distiller, terms, batch = distiller_and_batch(tiny_bert, ["crd"], "skip", AutoModelForSequenceClassification)
    distiller.train()
    before = {n: b.clone() for n, b in distiller.named_buffers()}
    found = unreached(distiller, tiny_bert, batch, StagePlan("train", tuple(terms), 0.5))
    assert "objective_modules.crd.embed_student.weight" not in found
    for name, buffer in distiller.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in distiller.parameters())
