"""Fine-tune a teacher on a task once; every later request for the same teacher reuses it.

The cache key is the whole request (base model, task, hyperparameters), so changing any of them
trains a new teacher instead of silently reusing a stale one (paper_spec section 10). The teacher
kept is the evaluation that scored best on the dev set, as the study's `checkpoint_best.pt`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from accelerate.utils import set_seed
from pydantic import Field
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from trainables.cache import cache_root
from trainables.config import LocalTask, RunSettings, StrictModel, TrainingConfig
from trainables.data import load_task_data
from trainables.distiller import StagePlan
from trainables.models import resolve_model_source, save_model
from trainables.precision import make_accelerator
from trainables.run import RunParts, build_loop
from trainables.tasks import resolve_task
from trainables.training import Reporter, RunOutputs, StepCallback

TEACHER_RECORD = "teacher.json"


class TeacherRequest(StrictModel):
    """What to fine-tune, on which task, how (`training.metric_for_best_model` picks the evaluation kept)."""

    base_model: str = Field(description="pretrained encoder: local directory, hub id or MLflow URI")
    task: str | LocalTask = "demo"
    training: TrainingConfig = TrainingConfig(learning_rate=2e-5, num_train_epochs=3.0)
    output_root: Path | None = Field(default=None, description="None: <cache>/teachers")
    cache_dir: Path | None = None


def teacher_dir(request: TeacherRequest, base_source: str) -> Path:
    """`<output_root>/<task>-<base>-<hash of the request>`."""
    key = request.model_dump(mode="json", exclude={"output_root", "cache_dir"})
    key["base_model"] = base_source
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    task_name = resolve_task(request.task).name
    base_name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(base_source).name or base_source)
    root = request.output_root or cache_root(request.cache_dir) / "teachers"
    return root.expanduser().resolve() / f"{task_name}-{base_name}-{digest}"


class BestWeights:
    """A reporter that keeps a CPU copy of the weights of the best evaluation so far, then forwards.

    Best is by the run's score (the task's selection metric); a tie goes to the later evaluation,
    as fairseq's `--maximize-best-checkpoint-metric` does.
    """

    def __init__(self, model: PreTrainedModel, forward: Reporter | None) -> None:
        self.model = model
        self.forward = forward
        self.state: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, float] = {}

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if not self.metrics or metrics["score"] >= self.metrics["score"]:
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.metrics = dict(metrics)
        if self.forward is not None:
            self.forward(metrics, checkpoint)

    def restore(self) -> dict[str, float]:
        """Load the best weights into the model; return that evaluation's metrics."""
        self.model.load_state_dict(self.state)
        return self.metrics


def finetune_teacher(
    request: TeacherRequest, reporter: Reporter | None = None, on_step: StepCallback | None = None
) -> tuple[Path, bool]:
    """Return (directory of the fine-tuned teacher, whether it was reused from an earlier run)."""
    base_source = resolve_model_source(request.base_model)
    final = teacher_dir(request, base_source)
    if (final / TEACHER_RECORD).exists():
        return final, True
    spec = resolve_task(request.task)
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)

    set_seed(request.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_source)
    model = AutoModelForSequenceClassification.from_pretrained(base_source, num_labels=spec.num_labels)
    data = load_task_data(spec, tokenizer, request.training, request.cache_dir)
    accelerator = make_accelerator(request.training)
    best = BestWeights(model, reporter)
    parts = RunParts(model, tokenizer, None, data, [StagePlan("finetune", (), ce_weight=1.0)])
    settings = RunSettings(objectives=[], training=request.training, output_dir=work, cache_dir=request.cache_dir)
    build_loop(parts, settings, accelerator, RunOutputs(work, best, on_step, keep_checkpoints=1)).run()
    if accelerator.is_main_process:  # the only process that reports, so the one that holds the best weights
        metrics = best.restore()
        save_model(model, tokenizer, work)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        record = {"request": request.model_dump(mode="json"), "base_source": base_source, "metrics": metrics}
        (work / TEACHER_RECORD).write_text(json.dumps(record, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    accelerator.wait_for_everyone()
    return final, False
