"""The teachers of a sweep: where each trial's teacher comes from, its shape before any weights
load, and fine-tuning one teacher per task as Ray tasks before trials start.

`teacher: demo` in a run config or space file stands for the MiniLM teacher fine-tuned on the
demo task; it is trained on first use and reused afterwards (the teacher cache keys on the
whole request).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import SweepSpec
from orchestrator.gpu_memory import teacher_task_gpus
from orchestrator.model_shapes import UnknownShape, read_architecture
from trainables.config import RunConfig, TrainingConfig
from trainables.demo import demo_teacher_base

if TYPE_CHECKING:
    from trainables.teacher import TeacherRequest

DEMO_TEACHER = "demo"
DEMO_TEACHER_TRAINING = TrainingConfig(
    learning_rate=1e-4,
    num_train_epochs=2.0,
    per_device_train_batch_size=32,
    max_seq_length=64,
    eval_steps=25,
    warmup_ratio=0.1,
    seed=0,
)

def demo_teacher(on_step: Any = None) -> Path:
    """The MiniLM-L6 teacher fine-tuned on the demo task (trained once, then reused)."""
    from trainables.teacher import TeacherRequest, finetune_teacher

    request = TeacherRequest(base_model=str(demo_teacher_base()), task="demo", training=DEMO_TEACHER_TRAINING)
    path, reused = finetune_teacher(request, on_step=on_step or quarterly("fine-tuning the demo teacher"))
    print(f"[distillsweep] demo teacher {'reused' if reused else 'fine-tuned'}: {path}")
    return path


def quarterly(what: str) -> Any:
    """A step callback that prints a line at each quarter of the steps: progress in logs and pipes too."""
    shown: set[int] = set()

    def on_step(step: int, total: int) -> None:
        quarter = 4 * step // max(total, 1)
        if step and quarter not in shown:
            shown.add(quarter)
            print(f"[distillsweep] {what}: step {step} of {total}", flush=True)

    return on_step


def resolve_demo_teacher(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace `teacher: demo` by the fine-tuned demo teacher's directory."""
    if raw.get("teacher") == DEMO_TEACHER:
        return {**raw, "teacher": str(demo_teacher())}
    return raw


def teacher_source(spec: SweepSpec, cfg: RunConfig) -> str:
    """Where a trial's teacher architecture can be read before any teacher is fine-tuned."""
    if cfg.task_name in spec.teachers:
        return spec.teachers[cfg.task_name]
    if spec.teacher_finetune is not None:
        return spec.teacher_finetune.for_task(cfg.task_name).base_model
    if cfg.teacher == DEMO_TEACHER:
        return str(demo_teacher_base())
    return cfg.teacher


def teacher_shape(source: str) -> tuple[int, int, int]:
    """(layers, heads, width) of a teacher, without loading weights (orchestrator.model_shapes)."""
    try:
        shape = read_architecture(source)
    except UnknownShape as err:
        raise ValueError(f"teacher {source!r}: {err.reason}") from None
    return shape.layers, shape.heads, shape.hidden


def teacher_tasks(spec: SweepSpec, configs: list[RunConfig]) -> dict[str, Any]:
    """task name -> task, for each task of the trials that fine-tunes its own teacher (`teacher_finetune`
    set, no `teachers` entry)."""
    if spec.teacher_finetune is None:
        return {}
    tasks: dict[str, Any] = {}
    for cfg in configs:
        tasks.setdefault(cfg.task_name, cfg.task)
    return {name: task for name, task in tasks.items() if name not in spec.teachers}


def teacher_requests(spec: SweepSpec, configs: list[RunConfig]) -> dict[str, TeacherRequest]:
    """task name -> TeacherRequest with that task's recipe, for each task without a given teacher."""
    from trainables.teacher import TeacherRequest

    requests = {}
    for name, task in teacher_tasks(spec, configs).items():
        recipe = spec.teacher_finetune.for_task(name)
        fields: dict[str, Any] = {"base_model": recipe.base_model, "task": task, "training": recipe.training}
        if recipe.output_root is not None:
            fields["output_root"] = recipe.output_root
        requests[name] = TeacherRequest(**fields)
    return requests


def prepare_teachers(spec: SweepSpec, configs: list[RunConfig]) -> dict[str, str]:
    """Fine-tune (or reuse) one teacher per task when the spec asks; `teachers` entries win.

    Each fine-tuning is a Ray task with a trial's resources, so on a cluster they run on GPU
    workers in parallel; the output root must be a folder every node can read.
    """
    teachers = dict(spec.teachers)
    if spec.teacher_finetune is None:
        return teachers
    import ray

    remote = ray.remote(finetune_teacher_task).options(
        num_cpus=spec.resources.cpu, num_gpus=teacher_task_gpus(spec.resources), max_retries=spec.max_failures
    )
    futures = {name: remote.remote(request) for name, request in teacher_requests(spec, configs).items()}
    for name, future in futures.items():
        path, reused = ray.get(future)
        print(f"[distillsweep] teacher for {name}: {path} ({'reused' if reused else 'fine-tuned'})")
        teachers[name] = str(path)
    return teachers


def finetune_teacher_task(request: TeacherRequest) -> tuple[str, bool]:
    from trainables.teacher import finetune_teacher

    path, reused = finetune_teacher(request)
    return str(path), reused
