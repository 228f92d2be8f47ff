"""Fine-tune a teacher on a task once; every later request for the same teacher reuses it.

The cache key is the whole request (base model, task, hyperparameters), so changing any of them
trains a new teacher instead of silently reusing a stale one (paper_spec section 10). The teacher
kept is the evaluation that scored best on the dev set, as the study's `checkpoint_best.pt`.
The cache may be shared (several sweeps, several users): one process at a time fine-tunes a
teacher, under a lock, in a work folder of its own, and a finished teacher is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from pathlib import Path

import torch
from accelerate.utils import set_seed
from pydantic import Field
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from trainables.cache import cache_root
from trainables.config import LocalTask, RunSettings, StrictModel, TrainingConfig
from trainables.data import load_task_data
from trainables.distiller import StagePlan
from trainables.model_source import resolve_model_source
from trainables.models import save_model
from trainables.precision import make_accelerator
from trainables.run import RunParts, build_loop
from trainables.tasks import resolve_task
from trainables.teacher_cache import exclusive_lock
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
    """`<output_root>/<task>-<base>-<hash of the request>`, always one folder inside output_root."""
    key = request.model_dump(mode="json", exclude={"output_root", "cache_dir"})
    key["base_model"] = base_source
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    task_name = re.sub(r"[^\w.-]", "_", resolve_task(request.task).name)  # `../` or `/abs` must not leave root
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
    """Return (directory of the fine-tuned teacher, whether it was reused from an earlier run).

    A second request for the same teacher waits for the first one's lock, then reuses its teacher.
    """
    base_source = resolve_model_source(request.base_model)
    final = teacher_dir(request, base_source)
    if (final / TEACHER_RECORD).exists():
        return final, True
    with exclusive_lock(final.with_name(final.name + ".lock")):
        if (final / TEACHER_RECORD).exists():  # fine-tuned by the process that held the lock before us
            return final, True
        work = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:12]}")
        try:
            train_teacher(request, base_source, work, reporter, on_step)
            return final, not publish(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def train_teacher(
    request: TeacherRequest, base_source: str, work: Path, reporter: Reporter | None, on_step: StepCallback | None
) -> None:
    """Fine-tune into `work`: the best evaluation's weights, tokenizer and `teacher.json`."""
    spec = resolve_task(request.task)
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
    accelerator.wait_for_everyone()


def publish(work: Path, final: Path) -> bool:
    """Rename `work` to `final` unless a finished teacher is there already; True if `work` became it.

    A teacher already at `final` (from a process that took no lock) may be loading in other trials:
    it stays, and `work` is dropped by the caller.
    """
    try:
        work.rename(final)
        return True
    except OSError:
        if (final / TEACHER_RECORD).exists():
            return False
        raise ValueError(
            f"{final} exists but holds no {TEACHER_RECORD}, so it is no finished teacher; move it away "
            "and ask for the teacher again"
        ) from None
