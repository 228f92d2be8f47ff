"""`distillsweep`: the command line.

Errors a user can cause (bad files, unknown objectives, missing teachers) are printed as one
message naming the problem, with exit code 2, never as a traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from orchestrator.messages import UserError, describe_error

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="override a field: --set training.learning_rate=1e-4")
]


def user_errors(command: F) -> F:
    """Turn the errors users meet into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (UserError, ValidationError, ValueError, FileNotFoundError, OSError) as err:
            if os.environ.get("DISTILLSWEEP_TRACEBACK"):
                raise
            console.print(f"[bold red]error:[/] {describe_error(err)}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` strings into a dict, values parsed as YAML (numbers, lists, booleans)."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def step_progress(description: str) -> tuple[Progress, Callable[[int, int], None]]:
    """A rich progress bar and the step callback that drives it."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task(description, total=None)

    def on_step(step: int, total: int) -> None:
        bar.update(task, completed=step, total=total)

    return bar, on_step


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


@app.command()
@user_errors
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    set_: SetOption = None,
    mlflow: Annotated[bool, typer.Option(help="log params, metrics and the student to MLflow")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "distillsweep",
    resume: Annotated[Path | None, typer.Option(help="checkpoint directory to resume from")] = None,
) -> None:
    """Run one distillation from a config file."""
    from orchestrator.single_run import run_single
    from trainables.config import load_run_config

    cfg = load_run_config(config, parse_overrides(set_))
    bar, on_step = step_progress(f"distilling {cfg.objective_mix}")

    def show(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        bar.console.print(
            f"step {metrics['step']:>6}  score {metrics['score']:.4f}  train_loss {metrics['train_loss']:.4f}"
        )

    with bar:
        metrics = run_single(cfg, show, on_step, mlflow, tracking_uri, experiment, resume)
    print_metrics(f"final metrics ({cfg.output_dir})", metrics)


@app.command()
@user_errors
def teacher(
    base_model: Annotated[str, typer.Option("--base-model", help="pretrained encoder: path, hub id or MLflow URI")],
    task: Annotated[str, typer.Option(help="GLUE task name, 'demo', or a local-task YAML file")] = "demo",
    set_: SetOption = None,
    output_root: Annotated[Path | None, typer.Option(help="where fine-tuned teachers are kept")] = None,
) -> None:
    """Fine-tune a teacher on a task (reused when the same request was trained before)."""
    path, reused = prepare_teacher(base_model, task, parse_overrides(set_), output_root)
    console.print(f"teacher {'reused' if reused else 'saved'}: {path}")
    print(path)


def prepare_teacher(
    base_model: str, task: str, overrides: dict[str, Any], output_root: Path | None
) -> tuple[Path, bool]:
    from trainables.config import set_dotted
    from trainables.teacher import TeacherRequest, finetune_teacher

    raw: dict[str, Any] = {"base_model": base_model, "task": load_task_arg(task)}
    if output_root is not None:
        raw["output_root"] = str(output_root)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    request = TeacherRequest.model_validate(raw)
    bar, on_step = step_progress("fine-tuning teacher")
    with bar:
        return finetune_teacher(request, on_step=on_step)


def load_task_arg(task: str) -> Any:
    """A task name, or the mapping inside a local-task YAML file."""
    if task.endswith((".yaml", ".yml")):
        return yaml.safe_load(Path(task).read_text())
    return task


@app.command()
@user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo writes its runs and MLflow store")] = Path(
        "distillsweep-demo"
    ),
) -> None:
    """Offline demo: build the tweet-sentiment data, fine-tune the MiniLM teacher, distil a student."""
    from orchestrator.demo import run_demo

    metrics = run_demo(workdir.resolve(), console)
    print_metrics("demo student", metrics)


if __name__ == "__main__":
    app()
