"""The offline demo: real tweets, the MiniLM teacher fine-tuned on them once, then a sweep and its report."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from orchestrator.config import load_sweep_spec
from orchestrator.report import build_report
from orchestrator.state import SweepState, sweep_dir
from orchestrator.sweep import resume_sweep, start_sweep


def run_demo(workdir: Path, address: str | None = None, verbose: bool = False) -> Path:
    """The README's main job: the quickstart sweep into `workdir`, then its report."""
    preset = Path(str(files("search_spaces") / "quickstart.yaml"))
    spec = load_sweep_spec(preset, {"storage": str(workdir / "sweeps")})
    folder = sweep_dir(spec)
    if folder.exists():
        resume_sweep(folder, address, verbose=verbose)
    else:
        start_sweep(spec, address, verbose)
    build_report(folder, "best_score")
    return Path(SweepState.load(folder).sweep_dir)
