"""The offline demo: real tweets, the MiniLM teacher fine-tuned on them once, then a sweep, its report,
and its best student in MLflow's Model Registry."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from orchestrator.config import load_sweep_spec
from orchestrator.report import build_report
from orchestrator.state import SweepState, sweep_dir
from orchestrator.student_models import load_line, register_best_students
from orchestrator.sweep import resume_sweep, start_sweep

REGISTERED_NAME = "quickstart"
EXAMPLE_TWEET = "what a lovely sunny morning, best day in ages"


@dataclass(frozen=True)
class DemoResult:
    folder: Path
    registered: list[str]  # one line per registered model: name, version, the trial it came from
    load_lines: list[str]  # the shell line that loads each and predicts


def run_demo(workdir: Path, address: str | None = None, verbose: bool = False) -> DemoResult:
    """The README's main job: the quickstart sweep into `workdir`, its report, and its best student
    registered (a rerun finds the sweep and the version it made)."""
    preset = Path(str(files("search_spaces") / "quickstart.yaml"))
    spec = load_sweep_spec(preset, {"storage": str(workdir / "sweeps")})
    folder = sweep_dir(spec)
    if folder.exists():
        resume_sweep(folder, address, verbose=verbose)
    else:
        start_sweep(spec, address, verbose)
    build_report(folder, "best_score")
    return register_demo_students(folder)


def register_demo_students(folder: Path) -> DemoResult:
    state = SweepState.load(folder)
    registered, lines = [], []
    for task, run, version in register_best_students(folder, REGISTERED_NAME):
        name = f"{REGISTERED_NAME}-{task}"
        registered.append(f"registered {name} version {version}: the student of {run}")
        lines.append(load_line(state.tracking_uri, name, version, EXAMPLE_TWEET))
    return DemoResult(Path(state.sweep_dir), registered, lines)
