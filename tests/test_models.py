"""Student construction and initialisation from teacher layers, on tiny real models."""

from __future__ import annotations

import pytest
import torch

from trainables.config import StudentConfig
from trainables.models import build_student, encoder_layers, forward_view


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lower_init_copies_teacher_layers_0_and_1(tiny_bert) -> None:
    student = build_student(tiny_bert, StudentConfig(num_layers=2, init="lower"), num_labels=2)
    teacher_layers, student_layers = encoder_layers(tiny_bert), encoder_layers(student)
    assert same(student_layers[0], teacher_layers[0])
    assert same(student_layers[1], teacher_layers[1])
    assert not same(student_layers[1], teacher_layers[3])


def test_upper_init_copies_teacher_layers_2_and_3(tiny_bert) -> None:
    student = build_student(tiny_bert, StudentConfig(num_layers=2, init="upper"), num_labels=2)
    teacher_layers, student_layers = encoder_layers(tiny_bert), encoder_layers(student)
    assert same(student_layers[0], teacher_layers[2])
    assert same(student_layers[1], teacher_layers[3])


def test_layer_init_copies_embeddings_and_pooler_but_not_classifier(tiny_bert) -> None:
    student = build_student(tiny_bert, StudentConfig(num_layers=2, init=[1, 3]), num_labels=2)
    assert same(student.bert.embeddings, tiny_bert.bert.embeddings)
    assert same(student.bert.pooler, tiny_bert.bert.pooler)
    assert not torch.equal(student.classifier.weight, tiny_bert.classifier.weight)


def test_random_init_copies_nothing(tiny_bert) -> None:
    torch.manual_seed(1)
    student = build_student(tiny_bert, StudentConfig(num_layers=2, init="random"), num_labels=2)
    assert not same(student.bert.embeddings, tiny_bert.bert.embeddings)
    assert not same(encoder_layers(student)[0], encoder_layers(tiny_bert)[0])


def test_roberta_student_copies_chosen_layers(tiny_roberta) -> None:
    student = build_student(tiny_roberta, StudentConfig(num_layers=2, init="skip"), num_labels=3)
    assert same(encoder_layers(student)[0], encoder_layers(tiny_roberta)[1])
    assert same(encoder_layers(student)[1], encoder_layers(tiny_roberta)[3])


def test_narrow_student_is_built_at_its_own_width(tiny_bert) -> None:
    spec = StudentConfig(num_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, init="random")
    student = build_student(tiny_bert, spec, num_labels=2)
    assert student.config.hidden_size == 16 and len(encoder_layers(student)) == 2


def test_forward_view_rebuilds_attention_scores_that_softmax_to_eager_probabilities(tiny_bert) -> None:
    tiny_bert.config._attn_implementation = "eager"
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    view = forward_view(tiny_bert, {"input_ids": ids, "attention_mask": mask}, need_qkv=True)
    eager = tiny_bert(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    scores = view.attention_scores(2).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), eager[2], atol=1e-5, rtol=1e-4)
    assert len(view.hidden_states) == 5 and len(view.values) == 4


def test_forward_view_without_hooks_carries_no_attention(tiny_bert) -> None:
    view = forward_view(tiny_bert, {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2)}, False)
    with pytest.raises(RuntimeError, match="no attention maps"):
        view.attention_scores(0)
