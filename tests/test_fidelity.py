"""`fidelity: authors | clean` and the study's task-agnostic methods (shared/paper_spec.md 3-5, 10;
README "Fidelity to the study").

Each behaviour of the study's released code that `authors` turns on differs from `clean` as documented,
on values computed by hand. The three plain errors of that code stay out of `authors`: for each, the
test computes the authors' result by hand with plain torch and shows that ours differs and is the
right one. Last, the two-stage pre-training method on a real tiny run, and the task-agnostic preset's
eleven methods.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from pydantic import ValidationError
from transformers import AutoTokenizer, BertForMaskedLM

from conftest import tiny_bert_config
from test_objectives import (
    B, EXAMPLE_IDS, NO_PADDING, PAIRS, STUDENT_LAYERS, TEACHER_LAYERS, arr, build, make_batch, make_view,
    ref_minilm_v2, ref_nce, run,
)
from trainables.config import FidelityConfig, ObjectiveSpec, PretrainConfig, PretrainFidelity, RunConfig, StudentConfig
from trainables.data import TaskData
from trainables.distiller import make_terms, pretrain_stages
from trainables.launch import run_data_parallel
from trainables.mapping import layer_pairs, skip_layers
from trainables.models import build_student
from trainables.objectives import REGISTRY, ContrastiveMemory, CRDParams, ModuleContext
from trainables.pretrain import pretrain
from trainables.run import RunParts, build_distiller
from trainables.views import DistillBatch, LayerPairs, ModelView

SWITCHES = sorted(FidelityConfig.AUTHORS)


def run_config(fidelity: object = None, **fields: object) -> RunConfig:
    raw = {"task": "rte", "teacher": "teacher", **fields}
    if fidelity is not None:
        raw["fidelity"] = fidelity
    return RunConfig.model_validate(raw)


# --- the switch -----------------------------------------------------------------------------------


def test_authors_turns_every_switch_on_and_clean_every_switch_off() -> None:
    authors, clean, default = run_config("authors").fidelity, run_config("clean").fidelity, run_config().fidelity
    assert SWITCHES == ["count_padding", "crd_without_replacement", "ild_scale_by_batch", "mapping_floor",
                        "minilm_v2_last_pair", "teacher_dropout"]
    assert all(getattr(authors, s) for s in SWITCHES) and not any(getattr(clean, s) for s in SWITCHES)
    assert default == clean and default.defaults == "clean"


def test_a_switch_named_beside_the_defaults_keeps_its_own_value() -> None:
    almost_authors = run_config({"defaults": "authors", "teacher_dropout": False}).fidelity
    assert not almost_authors.teacher_dropout
    assert all(getattr(almost_authors, s) for s in SWITCHES if s != "teacher_dropout")
    one_quirk = run_config({"count_padding": True}).fidelity  # a file written before the switch
    assert one_quirk.count_padding and not any(getattr(one_quirk, s) for s in SWITCHES if s != "count_padding")


@pytest.mark.parametrize(("fidelity", "shown"), [("autors", "'autors'"), ({"defaults": "paper"}, "defaults 'paper'"),
                                                 (3, "'3'")])
def test_an_unknown_fidelity_is_refused_naming_the_choices(fidelity: object, shown: str) -> None:
    message = f"fidelity\n  Value error, {shown} is not known: choose authors .* or clean"
    with pytest.raises(ValidationError, match=message):
        run_config(fidelity)


def test_a_trials_resolved_config_reads_back_with_the_same_switches() -> None:
    cfg = run_config({"defaults": "authors", "mapping_floor": False})
    assert RunConfig.model_validate(cfg.model_dump(mode="json")).fidelity == cfg.fidelity


def test_authors_pretraining_does_not_divide_by_the_batch_size() -> None:
    """fairseq divided the task-specific losses by B; the study's DeepSpeed pre-training did not."""
    cfg = PretrainConfig.model_validate({"corpus": {"files": ["x.txt"]}, "teacher": "t", "fidelity": "authors"})
    assert isinstance(cfg.fidelity, PretrainFidelity) and not cfg.fidelity.ild_scale_by_batch
    assert all(getattr(cfg.fidelity, s) for s in SWITCHES if s != "ild_scale_by_batch")


def test_authors_reaches_the_distiller_and_its_layer_pairs(tiny_bert) -> None:
    """A 3-layer student of the 4-layer teacher: round picks 0, 2, 3; the study's floor 0, 1, 2."""
    data = Dataset.from_dict({"input_ids": [[1, 2]] * 4, "labels": [0, 1, 0, 1]})
    student = build_student(tiny_bert, StudentConfig(num_layers=3, init="lower"), 2)
    parts = RunParts(student, None, tiny_bert, TaskData(data, data, lambda rows: {}, None, "accuracy"), [])
    cfg = {"student": {"num_layers": 3, "init": "lower"}}
    clean = build_distiller(parts, run_config("clean", **cfg))
    authors = build_distiller(parts, run_config("authors", **cfg))
    assert clean.pairs.attention == ((0, 0), (1, 2), (2, 3)) and authors.pairs.attention == ((0, 0), (1, 1), (2, 2))
    flags = ("count_padding", "ild_scale_by_batch", "crd_without_replacement", "minilm_v2_last_pair")
    assert all(getattr(authors, f) for f in flags) and not any(getattr(clean, f) for f in flags)


# --- layer mapping: floor -----------------------------------------------------------------------------


def test_floor_mapping_takes_the_studys_layers_where_depths_do_not_divide() -> None:
    """5 of 12: the study's j * floor(12 / 5) = 2, 4, ..., 10 (1-based) leaves 11 and 12 out; ours ends at 12."""
    assert skip_layers(12, 5) == [1, 4, 6, 9, 11]
    assert skip_layers(12, 5, floor=True) == [1, 3, 5, 7, 9]
    authors = layer_pairs("skip", 12, 5, floor=True)
    assert authors.attention == ((0, 1), (1, 3), (2, 5), (3, 7), (4, 9))
    assert authors.hidden == ((0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10))
    assert layer_pairs("last", 12, 5, floor=True).hidden == ((5, 12),)  # `last` is the top, either way
    assert layer_pairs([11], 12, 5, floor=True) == layer_pairs([11], 12, 5)  # explicit lists are taken as written


@pytest.mark.parametrize(("teacher", "student"), [(12, 3), (12, 4), (12, 6), (24, 6), (12, 12)])
def test_floor_and_round_agree_where_depths_divide(teacher: int, student: int) -> None:
    assert layer_pairs("skip", teacher, student, floor=True) == layer_pairs("skip", teacher, student)


# --- CRD negatives without replacement -------------------------------------------------------------


def memory(labels: list[int]) -> ContrastiveMemory:
    ctx = ModuleContext(8, 8, 1, 1, num_train_examples=len(labels), train_labels=torch.tensor(labels), combine=False)
    return ContrastiveMemory(ctx, CRDParams())


def test_authors_crd_draws_each_anchors_negatives_without_replacement() -> None:
    """Labels 0 0 0 0 0 1 1 1 1 1: each anchor has the 5 examples of the other label as negatives."""
    bank, anchors = memory([0] * 5 + [1] * 5), torch.tensor([0, 7] * 200)
    torch.manual_seed(0)
    distinct = bank.draw_negatives(anchors, 4, distinct=True)
    assert all(len(set(row)) == 4 for row in distinct.tolist())
    assert set(distinct[::2].flatten().tolist()) == {5, 6, 7, 8, 9}
    assert set(distinct[1::2].flatten().tolist()) == {0, 1, 2, 3, 4}
    with_replacement = bank.draw_negatives(anchors, 4)  # 4 of 5 with replacement: a repeat in 81% of rows
    assert sum(len(set(row)) < 4 for row in with_replacement.tolist()) > 200


def test_authors_crd_draws_every_subset_of_negatives_equally_often() -> None:
    bank, anchors = memory([0, 0, 0, 1, 1, 1]), torch.zeros(6000, dtype=torch.long)
    torch.manual_seed(1)
    pairs = [frozenset(row) for row in bank.draw_negatives(anchors, 2, distinct=True).tolist()]
    for subset in ({3, 4}, {3, 5}, {4, 5}):
        assert pairs.count(frozenset(subset)) / len(pairs) == pytest.approx(1 / 3, abs=0.03)


def test_authors_crd_falls_back_to_replacement_where_nce_k_reaches_the_smallest_pool() -> None:
    """Labels 0 0 0 1 1 1 1 1 1 1: label-1 anchors have 3 negatives, label-0 anchors 7. The study decides
    once: nce_k >= 3 (the smallest pool) draws every anchor's negatives with replacement."""
    bank, anchors = memory([0] * 3 + [1] * 7), torch.zeros(300, dtype=torch.long)
    assert bank.smallest_pool == 3
    torch.manual_seed(2)
    assert any(len(set(row)) < 3 for row in bank.draw_negatives(anchors, 3, distinct=True).tolist())
    assert all(len(set(row)) == 2 for row in bank.draw_negatives(anchors, 2, distinct=True).tolist())


def test_authors_crd_loss_is_computed_on_the_distinct_negatives() -> None:
    batch = make_batch()
    batch.crd_without_replacement = True
    params, module = build("crd", batch, nce_k=5, feat_dim=4)
    memory_s, memory_t = arr(module.memory_student), arr(module.memory_teacher)
    state = torch.get_rng_state()
    loss = REGISTRY["crd"].compute(batch, params, module).item()
    torch.set_rng_state(state)
    negatives = module.draw_negatives(EXAMPLE_IDS, 5, distinct=True).tolist()
    assert all(len(set(row)) == 5 for row in negatives)
    candidates = [[int(i)] + row for i, row in zip(EXAMPLE_IDS, negatives)]
    feats_s = [torch.cat([h[b, 0] for h in batch.student.hidden_states]) for b in range(B)]
    feats_t = [torch.cat([h[b, 0] for h in batch.teacher.hidden_states]) for b in range(B)]
    g_s = [arr(F.normalize(module.embed_student(f), dim=-1)) for f in feats_s]
    g_t = [arr(F.normalize(module.embed_teacher(f), dim=-1)) for f in feats_t]
    expected = (ref_nce(g_s, memory_t, candidates, 0.07) + ref_nce(g_t, memory_s, candidates, 0.07)) / 2
    assert loss == pytest.approx(expected, rel=1e-4)


# --- MiniLMv2 on the last pair ----------------------------------------------------------------------


def test_authors_minilm_v2_distils_the_last_layer_pair_only() -> None:
    clean, authors = make_batch(), make_batch()
    authors.minilm_v2_last_pair = True
    last_only = make_batch(pairs=LayerPairs(hidden=PAIRS.hidden, attention=PAIRS.attention[-1:]))
    assert run("minilm_v2", authors) == pytest.approx(ref_minilm_v2(last_only, 2), rel=1e-5)
    assert run("minilm_v2", clean) == pytest.approx(ref_minilm_v2(clean, 2), rel=1e-5)
    assert run("minilm_v2", clean) > run("minilm_v2", authors) + 0.01  # the first pair's relations


# --- the study's plain errors, not reproduced ---------------------------------------------------------


def regroup(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The same tokens' vectors, [B, H, T, d] regrouped into `heads` heads."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d).reshape(b, t, heads, -1).transpose(1, 2)


def studys_minilm_v2_query_term(student_q: torch.Tensor, teacher_q: torch.Tensor) -> torch.Tensor:
    """The study's Q-Q relation KL: the student reshaped raw to the teacher's head count."""
    b, heads, t, d_t = teacher_q.shape
    s = student_q.reshape(b, heads, t, -1)  # raw: a relation head's rows take parts of several tokens
    log_s = torch.log_softmax(s @ s.transpose(-1, -2) / math.sqrt(s.shape[-1]), dim=-1)
    p_t = torch.softmax(teacher_q @ teacher_q.transpose(-1, -2) / math.sqrt(d_t), dim=-1)
    return F.kl_div(log_s, p_t, reduction="sum") / (b * heads * t)


def test_minilm_v2_regroups_a_student_with_other_heads_by_token_not_by_raw_reshape() -> None:
    """The student holds the teacher's very Q/K/V vectors, in 3 heads instead of 2: the relations are the
    teacher's, so the loss is 0. The study's raw reshape mixes tokens and finds a difference."""
    teacher = make_view(TEACHER_LAYERS, seed=2)
    student = make_view(STUDENT_LAYERS, seed=1, heads=3, head_dim=2)
    for kind in ("queries", "keys", "values"):
        getattr(student, kind)[1] = regroup(getattr(teacher, kind)[3], 3)
    pairs = LayerPairs(hidden=(), attention=((1, 3),))
    ours = run("minilm_v2", make_batch(NO_PADDING, pairs=pairs, student=student, teacher=teacher))
    studys = studys_minilm_v2_query_term(student.queries[1], teacher.queries[3]).item()
    assert ours == pytest.approx(0.0, abs=1e-6)
    assert studys > 0.01


def hidden_batch(student_top: torch.Tensor, teacher: ModelView) -> DistillBatch:
    student = make_view(STUDENT_LAYERS, seed=1)
    student.hidden_states = (*student.hidden_states[:2], student_top)
    return make_batch(NO_PADDING, pairs=LayerPairs(hidden=((2, 4),), attention=()), student=student, teacher=teacher)


def studys_hidden_cls(student_top: torch.Tensor, teacher_top: torch.Tensor) -> float:
    """The study's task-agnostic `.transpose(0, 1)[:, 0]` on batch-first [B, T, d] states."""
    return F.mse_loss(student_top.transpose(0, 1)[:, 0], teacher_top.transpose(0, 1)[:, 0]).item()


def test_hidden_cls_compares_each_sentences_first_token_not_the_first_sentences_tokens() -> None:
    teacher = make_view(TEACHER_LAYERS, seed=2)
    top = teacher.hidden_states[4]
    wrong_cls = top.clone()
    wrong_cls[1, 0] += 1.0  # the second sentence's [CLS] is off by 1 in every feature
    assert run("hidden_mse_token", hidden_batch(wrong_cls, teacher)) == pytest.approx(1.0 / B)  # mean over B * d
    assert studys_hidden_cls(wrong_cls, top) == 0.0  # reads sentence 0's tokens only: blind to it
    wrong_token = top.clone()
    wrong_token[0, 2] += 1.0  # a token that is no [CLS]
    assert run("hidden_mse_token", hidden_batch(wrong_token, teacher)) == 0.0
    assert studys_hidden_cls(wrong_token, top) > 0.1


def test_regression_kd_matches_each_sentence_with_its_own_teacher_output() -> None:
    batch = make_batch()
    student, teacher = torch.tensor([[0.5], [2.0]]), torch.tensor([[0.5], [2.0]])
    batch.student.logits, batch.teacher.logits = student, teacher
    studys = ((student.view(-1) - teacher) ** 2).sum() / B  # [B] - [B, 1] -> [B, B], fairseq's sum / B
    assert studys.item() == pytest.approx((1.5**2 + 1.5**2) / 2)  # every sentence against every other
    assert run("kd", batch) == 0.0  # the student predicts what the teacher does
    batch.teacher.logits = torch.tensor([[1.0], [0.0]])
    assert run("kd", batch) == pytest.approx(((0.5 - 1.0) ** 2 + (2.0 - 0.0) ** 2) / 2)


def test_attention_kl_stays_finite_on_padding_where_the_studys_unclamped_log_softmax_is_nan() -> None:
    """att_kl_hiden_mse_learn and minilm take log_softmax of scores that hold -inf at padded keys."""
    student, teacher = torch.tensor([[0.3, -0.2, -math.inf]]), torch.tensor([[0.1, 0.4, -math.inf]])
    studys = F.kl_div(torch.log_softmax(student, dim=-1), torch.softmax(teacher, dim=-1), reduction="sum")
    assert torch.isnan(studys)
    padded = make_batch()  # the second sentence has two padded tokens
    assert all(math.isfinite(run(name, padded)) for name in ("att_kl", "minilm"))


# --- att_val_two_stage: MLM alone for half the budget, then attention and value relations --------------


def test_two_stage_pretraining_splits_the_budget_into_mlm_alone_then_the_mix() -> None:
    terms = make_terms([ObjectiveSpec(name="att_val_two_stage")])
    mlm, distil = pretrain_stages(terms, mlm_weight=0.0, max_steps=7)
    assert (mlm.terms, mlm.ce_weight, mlm.steps, mlm.continues) == ((), 1.0, 3, False)
    assert (distil.terms, distil.ce_weight, distil.steps, distil.continues) == (tuple(terms), 0.0, 4, True)
    one = make_terms([ObjectiveSpec(name="minilm")])
    assert [(s.terms, s.steps) for s in pretrain_stages(one, 0.0, 7)] == [(tuple(one), None)]


def test_att_val_two_stage_is_refused_where_it_cannot_train_as_the_study() -> None:
    with pytest.raises(ValidationError, match="'att_val_two_stage' is a pre-training method"):
        run_config(objectives=[{"name": "att_val_two_stage"}])
    base = {"corpus": {"files": ["x.txt"]}, "teacher": "t", "objectives": [{"name": "att_val_two_stage"}]}
    with pytest.raises(ValidationError, match="set mlm_probability above 0"):
        PretrainConfig.model_validate({**base, "mlm_probability": 0.0})
    with pytest.raises(ValidationError, match="splits training.max_steps into two halves"):
        PretrainConfig.model_validate({**base, "training": {"max_steps": 1}})


@pytest.fixture
def mlm_teacher_dir(tmp_path: Path) -> str:
    """A random 4-layer, 32-wide BERT masked LM with the demo's real tokenizer."""
    from trainables.demo import demo_teacher_base

    torch.manual_seed(0)
    config = tiny_bert_config(layers=4, hidden=32, heads=4)
    config.vocab_size = 30522
    BertForMaskedLM(config).save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(demo_teacher_base()).save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher")


def two_stage_config(teacher: str, tmp_path: Path, out: str) -> PretrainConfig:
    words = "the a cat dog sat ran on under mat tree quickly slowly red blue".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * k) % len(words)] for k in range(1, 12)) for i in range(300)))
    return PretrainConfig.model_validate({
        "corpus": {"files": [str(corpus)], "block_size": 16, "validation_fraction": 0.05},
        "teacher": teacher,
        "student": {"num_layers": 2, "init": "skip"},
        "objectives": [{"name": "att_val_two_stage"}],
        "mapping": [3],
        "output_dir": str(tmp_path / out),
        "cache_dir": str(tmp_path / "cache"),
        "save_fractions": [1.0],
        "training": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "per_device_train_batch_size": 8, "max_steps": 6,
                     "eval_steps": 2},
    })


def test_att_val_two_stage_trains_mlm_alone_then_distils_on_one_learning_rate_schedule(
    mlm_teacher_dir, tmp_path
) -> None:
    reports: list[dict] = []
    final = pretrain(two_stage_config(mlm_teacher_dir, tmp_path, "run"), lambda m, c: reports.append(m))
    assert [(r["step"], r["stage_name"]) for r in reports] == [(2, "mlm"), (3, "mlm"), (4, "pretrain"), (6, "pretrain")]
    assert all(r["total_steps"] == 6 for r in reports)
    assert not any("train_att_val_two_stage" in r for r in reports[:2])
    assert all(math.isfinite(r["train_att_val_two_stage"]) for r in reports[2:])
    # linear decay over all 6 steps: 1e-3 * (6 - step) / 6; a schedule restarted at the switch would give 1e-3 * 2 / 3 at step 4
    assert [r["learning_rate"] for r in reports] == pytest.approx([1e-3 * (6 - r["step"]) / 6 for r in reports])
    assert final["step"] == 6 and (tmp_path / "run" / "student" / "config.json").exists()


class Crash(Exception):
    pass


def test_att_val_two_stage_resumed_in_its_second_half_ends_as_uninterrupted(mlm_teacher_dir, tmp_path) -> None:
    uninterrupted = pretrain(two_stage_config(mlm_teacher_dir, tmp_path, "a"))
    cfg = two_stage_config(mlm_teacher_dir, tmp_path, "b")
    saved: list[Path] = []

    def crash_at_step_4(metrics: dict, checkpoint: Path | None) -> None:
        saved.append(checkpoint)
        if metrics["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, crash_at_step_4)
    resumed = pretrain(cfg, resume_from=saved[-1])
    for key in ("eval_loss", "eval_att_val_two_stage", "train_loss", "learning_rate"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow  # two spawned processes
def test_att_val_two_stage_trains_data_parallel_through_the_switch(mlm_teacher_dir, tmp_path) -> None:
    """The second half's loss leaves the MLM head out, which data-parallel processes freeze; the optimiser
    of the first half carries on over the rest."""
    reports: list[dict] = []
    cfg = two_stage_config(mlm_teacher_dir, tmp_path, "ddp")
    final = run_data_parallel(pretrain, cfg, num_processes=2, reporter=lambda m, c: reports.append(m))
    assert [(r["step"], r["stage_name"]) for r in reports] == [(2, "mlm"), (3, "mlm"), (4, "pretrain"), (6, "pretrain")]
    assert math.isfinite(final["eval_att_val_two_stage"]) and final["learning_rate"] == pytest.approx(0.0, abs=1e-12)


# --- the task-agnostic preset --------------------------------------------------------------------


def test_the_task_agnostic_preset_varies_the_studys_eleven_methods_with_clean_fidelity() -> None:
    from orchestrator.preflight import validate
    from orchestrator.study import load_study_spec

    spec = load_study_spec(Path(__file__).parent.parent / "search_spaces" / "paper_task_agnostic.yaml").stage("distill")
    configs = validate(spec)
    assert sorted(cfg.objective_mix for cfg in configs) == sorted([
        "hidden_mse", "hidden_mse_token", "hidden_mse_combine", "att_mse", "att_kl", "att_mse+hidden_mse",
        "att_kl+hidden_mse", "minilm", "minilm_v2", "pear_col", "att_val_two_stage",
    ])
    assert all(cfg.fidelity == PretrainFidelity() for cfg in configs)
