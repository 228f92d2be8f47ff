"""The offline demo: real tweets, the MiniLM teacher fine-tuned on them once, then a sweep.

`teacher: demo` in a run config or space file stands for that fine-tuned teacher; it is trained
on first use and reused afterwards (the teacher cache keys on the whole request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainables.config import TrainingConfig

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
    from trainables.demo import demo_teacher_base
    from trainables.teacher import TeacherRequest, finetune_teacher

    request = TeacherRequest(base_model=str(demo_teacher_base()), task="demo", training=DEMO_TEACHER_TRAINING)
    path, reused = finetune_teacher(request, on_step=on_step)
    print(f"[distillsweep] demo teacher {'reused' if reused else 'fine-tuned'}: {path}")
    return path


def resolve_demo_teacher(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace `teacher: demo` by the fine-tuned demo teacher's directory."""
    if raw.get("teacher") == DEMO_TEACHER:
        return {**raw, "teacher": str(demo_teacher())}
    return raw


def run_demo(workdir: Path, address: str | None = None) -> Path:
    """The README's main job: the quickstart sweep into `workdir`, then its report."""
    from importlib.resources import files

    from orchestrator.config import load_sweep_spec
    from orchestrator.status import build_report
    from orchestrator.sweep import SweepState, resume_sweep, start_sweep, sweep_dir

    preset = Path(str(files("search_spaces") / "quickstart.yaml"))
    spec = load_sweep_spec(preset, {"storage": str(workdir / "sweeps")})
    folder = sweep_dir(spec)
    if folder.exists():
        resume_sweep(folder, address)
    else:
        start_sweep(spec, address)
    build_report(folder, "best_score")
    return Path(SweepState.load(folder).sweep_dir)
