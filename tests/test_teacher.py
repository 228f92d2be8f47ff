"""Teacher fine-tuning keeps the evaluation that scored best on the dev set, not the last one."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import trainables.teacher as teacher_module
from trainables.config import TrainingConfig
from trainables.data import load_task_data
from trainables.tasks import resolve_task
from trainables.teacher import TeacherRequest, finetune_teacher
from trainables.training import rows


def dev_accuracy(path, training: TrainingConfig, cache) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    data = load_task_data(resolve_task("demo"), AutoTokenizer.from_pretrained(path), training, cache)
    batch = data.collate(rows(data.validation, list(range(len(data.validation)))))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return data.score(logits.numpy(), batch["labels"].numpy())["accuracy"]


def test_fine_tuned_teacher_is_the_best_dev_evaluation_not_the_last(tiny_demo_teacher, demo_cache, tmp_path, monkeypatch):
    # from the demo teacher (dev accuracy about 0.78); 160 examples in batches of 32: an evaluation
    # every 5 steps, 4 in all
    training = TrainingConfig(learning_rate=1e-4, num_train_epochs=4, per_device_train_batch_size=32,
                              max_seq_length=48, max_train_samples=160, eval_strategy="epoch", warmup_ratio=0.1)
    models = []
    from_pretrained = AutoModelForSequenceClassification.from_pretrained

    def keep_model(*args, **kwargs):
        models.append(from_pretrained(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(teacher_module.AutoModelForSequenceClassification, "from_pretrained", keep_model)

    def flip_head_before_last_evaluation(step: int, total: int) -> None:
        if step == total:  # negated logits: every prediction flips, so the last evaluation is the worst
            for parameter in models[0].classifier.parameters():
                parameter.data.neg_()

    reports: list[dict] = []
    request = TeacherRequest(base_model=tiny_demo_teacher, task="demo", training=training,
                             output_root=tmp_path, cache_dir=demo_cache)
    path, reused = finetune_teacher(request, lambda metrics, checkpoint: reports.append(metrics),
                                    on_step=flip_head_before_last_evaluation)
    monkeypatch.undo()

    scores = [r["score"] for r in reports]
    assert not reused and [r["step"] for r in reports] == [5, 10, 15, 20]
    assert scores[-1] < max(scores)
    best = max(i for i, s in enumerate(scores) if s == max(scores))  # ties: the later one, as fairseq
    record = json.loads((path / "teacher.json").read_text())
    assert record["metrics"]["step"] == reports[best]["step"] and record["metrics"]["score"] == max(scores)
    assert np.isclose(dev_accuracy(path, training, demo_cache), max(scores))
