"""training.compile: length buckets, the compile decision, and compiled training against eager.

The compiled tests build real inductor kernels on this CPU (gcc), with a 2-layer teacher and a
1-layer student 32 wide, so each bucket costs tens of seconds of compilation: one compiled and one
eager run are shared by those tests (module-scoped fixture) and the tests read what they recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pydantic
import pytest
import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, BertTokenizerFast

import trainables.compile as compile_module
from conftest import tiny_bert_config
from trainables.compile import BucketPadding, bucket_for, compile_wanted, length_buckets, step_compiler
from trainables.config import ObjectiveSpec, StudentConfig, TrainingConfig
from trainables.data import TaskData, make_collator
from trainables.distiller import Distiller, build_modules, make_terms, plan_stages
from trainables.mapping import layer_pairs
from trainables.models import build_student
from trainables.objectives import ModuleContext
from trainables.precision import make_accelerator
from trainables.teacher_source import LiveTeacher, TeacherSource
from trainables.training import (
    CHECKPOINT_STATE, DistillationLoop, RunOutputs, epoch_batches, load_tensors, read_checkpoint,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(115))]  # tiny_bert_config's 120 ids
MAX_SEQ_LENGTH = 32  # buckets 16 and 32
BATCH = 4
ROWS = 26  # 6 full batches and one of 2 rows an epoch
STEPS = 14  # two epochs
OBJECTIVES = ("kd", "hidden_mse", "att_kl")  # logits, hidden states, and Q/K captured by forward hooks


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def row_lengths() -> list[int]:
    """26 rows of 3 to 32 tokens; batched by length (group_by_length), nearly every batch has a longest
    row no other batch has, and both buckets are met."""
    return [3 + (i * 11) % 30 for i in range(ROWS)]


def task_data(tokenizer: BertTokenizerFast) -> TaskData:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, len(VOCAB), (n,), generator=generator).tolist() for n in row_lengths()]
    train = Dataset.from_dict({
        "input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
        "labels": [i % 2 for i in range(ROWS)], "example_id": list(range(ROWS)),
    })
    return TaskData(train=train, validation=train.select(range(8)), collate=make_collator(tokenizer), score=None,
                    main_metric="loss")


def training_config(compile: bool | str) -> TrainingConfig:
    return TrainingConfig(
        learning_rate=1e-3, per_device_train_batch_size=BATCH, max_seq_length=MAX_SEQ_LENGTH, max_steps=STEPS,
        eval_steps=1, save_steps=1000, warmup_ratio=0.0, group_by_length=True, lr_scheduler_type="constant_with_warmup",
        mixed_precision="no", compile=compile,
    )


@dataclass
class Recorded:
    """What a run reported at each step, and the graphs compiled by then."""

    loop: DistillationLoop | None = None
    metrics: list[dict] = field(default_factory=list)
    graphs: list[int] = field(default_factory=list)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        self.metrics.append(metrics)
        self.graphs.append(self.loop.compiler.graphs if self.loop.compiler is not None else 0)


def distillation_loop(tokenizer: BertTokenizerFast, out: Path, compile: bool | str) -> tuple[DistillationLoop, Recorded]:
    """kd + hidden_mse + att_kl from a 2-layer teacher into a random 1-layer student (every term far
    from 0), no dropout (inductor's random streams are not eager's), the same initial weights whatever
    `compile` says."""
    config = tiny_bert_config(layers=2)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(config).eval()
    student = build_student(teacher, StudentConfig(num_layers=1, init="random"), 2)
    data = task_data(tokenizer)
    stages = plan_stages(make_terms([ObjectiveSpec(name=n) for n in OBJECTIVES]), 0.5, two_stage=False)
    context = ModuleContext(32, 32, 1, 2, num_train_examples=ROWS, train_labels=torch.tensor(data.train["labels"]),
                            combine=False)
    distiller = Distiller(student, build_modules(list(stages[0].terms), context), layer_pairs("skip", 2, 1), False,
                          False)
    training = training_config(compile)
    accelerator = make_accelerator(training)
    recorded = Recorded()
    recorded.loop = DistillationLoop(
        distiller, TeacherSource(LiveTeacher(teacher, accelerator, dropout=False)), stages, data, training,
        accelerator, RunOutputs(out, reporter=recorded.report),
    )
    return recorded.loop, recorded


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory) -> dict[str, Recorded]:
    """The same 14 steps eagerly with dynamic padding and compiled with length buckets."""
    recorded = {}
    for name, setting in (("eager", False), ("compiled", True)):
        loop, recorded[name] = distillation_loop(tokenizer, tmp_path_factory.mktemp(name), setting)
        loop.run()
    return recorded


def final_checkpoint(recorded: Recorded) -> Path:
    return recorded.loop.output_dir / "checkpoints" / f"step-{STEPS:07d}"


# --- fast: buckets, the collator, the decision ----------------------------------------------------


def test_buckets_are_powers_of_two_from_16_ending_at_max_seq_length() -> None:
    assert length_buckets(128) == (16, 32, 64, 128)
    assert length_buckets(48) == (16, 32, 48)
    assert length_buckets(8) == (8,)
    assert [bucket_for(n, (16, 32)) for n in (1, 16, 17, 32, 40)] == [16, 16, 32, 32, 40]


def test_bucket_collator_pads_to_the_smallest_bucket_holding_the_longest_row_and_never_truncates(tokenizer) -> None:
    collate = make_collator(tokenizer)
    bucketed = BucketPadding(collate, (16, 32))
    for lengths, padded in (([3, 5], 16), ([3, 16], 16), ([3, 17], 32), ([32, 2], 32), ([40, 3], 40)):
        rows = [{"input_ids": list(range(5, 5 + n)), "attention_mask": [1] * n, "labels": 1} for n in lengths]
        batch = bucketed(rows)
        assert batch["input_ids"].shape == (len(lengths), padded)
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        for row, n in zip(batch["input_ids"].tolist(), lengths):
            assert row == list(range(5, 5 + n)) + [tokenizer.pad_token_id] * (padded - n)
        assert batch["labels"].tolist() == [1] * len(lengths)


def test_auto_compiles_nowhere_on_cpu_and_on_cuda_only_once_a_gain_is_measured(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not compile_wanted("auto", cpu) and not compile_wanted("auto", cuda)
    monkeypatch.setattr(compile_module, "COMPILE_GAINS_ON_CUDA", True)
    assert not compile_wanted("auto", cpu) and compile_wanted("auto", cuda)
    assert compile_wanted(True, cpu) and not compile_wanted(False, cuda)
    assert step_compiler("auto", cpu, 128, 32, stages=1, count_padding=False) is None


def test_compile_takes_auto_true_or_false() -> None:
    assert TrainingConfig().compile == "auto"
    assert TrainingConfig.model_validate({"compile": True}).compile is True
    with pytest.raises(pydantic.ValidationError, match="compile"):
        TrainingConfig.model_validate({"compile": "sometimes"})


def test_auto_on_cpu_trains_eagerly_with_dynamic_padding(tokenizer, tmp_path) -> None:
    loop, _ = distillation_loop(tokenizer, tmp_path, "auto")
    assert loop.compiler is None and loop._compiled is None
    assert loop._collate_train is loop.data.collate


# --- slow: real inductor compilation --------------------------------------------------------------


@pytest.mark.slow
def test_compiled_steps_give_the_eager_losses(runs) -> None:
    """Every term of every step within 1e-5 relative or 1e-6 absolute: the same fp32 maths, summed in
    another order by inductor's fused kernels, differs by a few ulps per op (measured: at most 1e-6, 4 ulps
    of a loss of 3.7, over 14 AdamW steps); a wrong mask, a missed hook or stale weights differ by far more.
    The compiled run pads to buckets and the eager run to each batch's longest row; every term masks padding."""
    eager, compiled = runs["eager"].metrics, runs["compiled"].metrics
    assert len(eager) == len(compiled) == STEPS
    names = ["train_loss", *(f"train_{n}" for n in OBJECTIVES), "train_ce", "eval_loss"]
    for step, (e, c) in enumerate(zip(eager, compiled), start=1):
        for name in names:
            assert c[name] == pytest.approx(e[name], rel=1e-5, abs=1e-6), f"step {step}: {name}"


@pytest.mark.slow
def test_compilations_stop_once_every_bucket_has_been_seen(runs) -> None:
    """Graphs are built only at the first full batch of each bucket; the epoch's last batch (2 rows)
    runs eagerly and builds none, and lengths seen later in their bucket build none either."""
    recorded = runs["compiled"]
    buckets = recorded.loop.compiler.buckets
    lengths = row_lengths()
    seen, first_of_bucket, batch_lengths = set(), [], set()
    for epoch in range(2):
        for step, batch in enumerate(epoch_batches(lengths, BATCH, 42, epoch, True), start=epoch * 7 + 1):
            longest = max(lengths[i] for i in batch)
            batch_lengths.add(longest)
            bucket = bucket_for(longest, buckets)
            if len(batch) == BATCH and bucket not in seen:
                seen.add(bucket)
                first_of_bucket.append(step)
    growth = [step for step, (before, after) in enumerate(zip([0, *recorded.graphs], recorded.graphs), start=1)
              if after > before]
    assert len(batch_lengths) > 2 * len(buckets)  # unbucketed, nearly every batch would compile
    assert growth == first_of_bucket
    assert len(growth) <= len(buckets) == 2


@pytest.mark.slow
def test_compiled_and_eager_runs_resume_from_each_others_checkpoints(runs, tokenizer, tmp_path) -> None:
    """Each loads the other's weights exactly and resumes where the run it loaded stood. Both stood at the
    same point of the same schedule; their best scores differ in the last bits (as their losses do)."""
    compiled, eager = runs["compiled"], runs["eager"]
    compiled_saved, _ = read_checkpoint(final_checkpoint(compiled))
    eager_saved, _ = read_checkpoint(final_checkpoint(eager))
    assert compiled_saved.global_step == STEPS
    assert replace(compiled_saved, best_score=None) == replace(eager_saved, best_score=None)
    assert compiled_saved.best_score == pytest.approx(eager_saved.best_score, rel=1e-5)
    state = load_tensors(final_checkpoint(compiled) / CHECKPOINT_STATE)["distiller"]
    assert not any("_orig_mod" in key for key in state)
    fresh_eager, _ = distillation_loop(tokenizer, tmp_path / "eager", False)
    fresh_eager.load_checkpoint(final_checkpoint(compiled))
    for key, value in fresh_eager.distiller.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert fresh_eager.progress == compiled_saved
    compiled.loop.load_checkpoint(final_checkpoint(eager))
    expected = load_tensors(final_checkpoint(eager) / CHECKPOINT_STATE)["distiller"]
    for key, value in compiled.loop.distiller.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert compiled.loop.progress == eager_saved
