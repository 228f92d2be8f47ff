"""`distillsweep`: the command line.

Errors a user can cause (bad files, unknown objectives, missing teachers) are printed as one
message naming the problem, with exit code 2, never as a traceback. Each command imports what it
runs when it runs: those modules bring Ray and PyTorch, which `--help` should not wait for.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from orchestrator.messages import UserError, brief, describe_error
from orchestrator.tracking import fail_fast_http
from trainables.config import RefusedYAML, load_yaml, read_yaml


def prepare_libraries() -> None:
    """Library progress bars and load reports drown ours (warnings and errors still show); a dead
    tracking server is reported in seconds. Set as the environment's defaults, which the libraries
    read when a command imports them (`status` and `report` never do) and a user's own settings win."""
    fail_fast_http()
    for name, value in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0],
    callback=lambda: prepare_libraries(),
    pretty_exceptions_show_locals=False,  # a traceback must not print the locals: configs, URIs, tokens
)
# Messages quote paths, names and trial errors: Rich reads no markup or emoji codes in them.
console = Console(stderr=True, markup=False, emoji=False)
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
            # soft_wrap: a path in the message stays whole, for the terminal to wrap and the user to copy
            console.print(Text.assemble(("error:", "bold red"), " ", describe_error(err)), soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` strings into a dict, values parsed as YAML (numbers, lists, booleans; no aliases,
    as in files)."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {brief(pair)}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
        try:
            overrides[key.strip()] = load_yaml(value)
        except RefusedYAML as err:
            raise UserError(f"--set {brief(pair)}: {err.problem}") from None
        except yaml.YAMLError:
            raise UserError(f"--set {brief(pair)}: the value is not valid YAML; quote it, e.g. --set 'key=\"text\"'") from None
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
    table = Table(title=Text(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def print_data(text: str) -> None:
    """Print text made of data (a report's task names, trial errors) as written: as `Text`, Rich
    reads no `[/]` or `[link=...]` in it as markup."""
    Console().print(Text(text))


@app.command()
@user_errors
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    set_: SetOption = None,
    mlflow: Annotated[bool, typer.Option(help="log params, metrics and the student to MLflow")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "distillsweep",
    resume: Annotated[Path | None, typer.Option(help="checkpoint directory to resume from")] = None,
    overwrite: Annotated[bool, typer.Option(help="write into an output_dir that already holds files")] = False,
) -> None:
    """Run one distillation from a config file (without output_dir: into a new folder under runs/)."""
    from orchestrator.single_run import claim_output_dir, run_single
    from orchestrator.teachers import DEMO_TEACHER, demo_teacher
    from trainables.config import load_run_config

    cfg = claim_output_dir(load_run_config(config, parse_overrides(set_)), resume, overwrite)
    if cfg.teacher == DEMO_TEACHER:
        cfg = cfg.model_copy(update={"teacher": str(demo_teacher())})
    bar, on_step = step_progress(f"distilling {cfg.objective_mix}")

    def show(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        # stage 1 of a two-stage run has no score yet (its classifier is untrained): its own loss instead
        shown = (f"score {metrics['score']:.4f}" if "score" in metrics
                 else f"stage 1 eval loss {metrics['eval_intermediate_loss']:.4f}")
        bar.console.print(f"step {metrics['step']:>6}  {shown}  train_loss {metrics['train_loss']:.4f}")

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
        return read_yaml(Path(task))
    return task


AddressOption = Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")]
VerboseOption = Annotated[bool, typer.Option(
    "--verbose", help="Ray's trial tables and the trials' own output on the console (else in SWEEP_DIR/ray.log "
    "and Ray's session logs)")]


@app.command()
@user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo keeps its sweep and MLflow store")] = Path(
        "distillsweep-demo"
    ),
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray)")] = None,
    verbose: VerboseOption = False,
) -> None:
    """The offline demo: fine-tune the MiniLM teacher on real tweets once, then run the quickstart sweep."""
    from orchestrator.demo import run_demo

    folder = run_demo(workdir.resolve(), address, verbose)
    print_data((folder / "report" / "report.md").read_text())
    console.print(
        f"sweep folder: {folder}\n  distillsweep status {folder}\n  distillsweep ui {folder}   "
        "# MLflow UI on http://127.0.0.1:5000"
    )


@app.command()
@user_errors
def sweep(
    space_file: Annotated[Path, typer.Argument(help="search-space YAML (see search_spaces/)")],
    address: AddressOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the trials; start nothing")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Run a sweep: every trial of the space file, scheduled by Ray Tune, recorded in MLflow."""
    from orchestrator.config import load_sweep_spec
    from orchestrator.preflight import validate
    from orchestrator.sweep import start_sweep

    spec = load_sweep_spec(space_file, parse_overrides(set_))
    if dry_run:
        configs = validate(spec)
        print_space(spec, len(configs))
        return
    state = start_sweep(spec, address, verbose)
    console.print(f"sweep finished: {state.sweep_dir}")
    console.print(f"  distillsweep status {state.sweep_dir}\n  distillsweep report {state.sweep_dir}")


def print_space(spec: Any, checked: int) -> None:
    from orchestrator.spaces import Distribution

    table = Table(title=f"sweep {spec.name}: {spec.trial_count} trials"
                  + ("" if spec.search.algorithm == "grid" else f" ({spec.search.algorithm} samples)"))
    table.add_column("space entry")
    table.add_column("values")
    for key, value in spec.space.items():
        shown = f"{value.kind} {brief(getattr(value, value.kind))}" if isinstance(value, Distribution) else brief(value)
        table.add_row(key, Text(shown))  # Text: values are shown as written, never read as markup
    out = Console()
    out.print(table)
    out.print(
        f"search {spec.search.algorithm}, scheduler {spec.scheduler.type}, "
        f"{spec.resources.cpu} CPU + {spec.resources.gpu} GPU per trial; {checked} trial configs checked"
    )


@app.command()
@user_errors
def resume(
    sweep_dir: Annotated[Path, typer.Argument(help="the sweep folder printed by `sweep`")],
    address: AddressOption = None,
    retry_errored: Annotated[bool, typer.Option(help="also rerun failed trials from their checkpoints")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Continue an interrupted sweep; finished trials are kept, not rerun."""
    from orchestrator.sweep import resume_sweep

    state = resume_sweep(sweep_dir, address, retry_errored, verbose)
    console.print(f"sweep finished: {state.sweep_dir}")


@app.command()
@user_errors
def status(sweep_dir: Annotated[Path, typer.Argument(help="the sweep folder")]) -> None:
    """Show each trial of a sweep: state, steps and score so far, and the disk the sweep uses."""
    from orchestrator.disk import describe, sweep_disk_use
    from orchestrator.status import trial_statuses, undelivered_records

    table = Table(title=Text(str(sweep_dir)))
    for column in ("trial", "state", "outcome", "objective mix", "init", "task", "seed", "step", "score"):
        table.add_column(column)
    rows = trial_statuses(sweep_dir)
    for row in rows:  # cells as Text: task names and trial errors are data, never markup
        table.add_row(*(Text(str(row[c])) for c in ("trial", "state", "outcome", "objective_mix", "init", "task", "seed", "step", "score")))
    Console().print(table)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome_kind"]] = counts.get(row["outcome_kind"], 0) + 1
    print_data(", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
    print_data(describe(sweep_disk_use(sweep_dir)))
    waiting = undelivered_records(sweep_dir)
    if waiting:
        print_data(f"MLflow has not confirmed {waiting} records of this sweep yet: if its driver has ended, "
                   f"run `distillsweep sync {sweep_dir}`")


@app.command()
@user_errors
def study(
    study_file: Annotated[Path, typer.Argument(help="study YAML: a distill stage and a finetune stage")],
    address: AddressOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate both stages; start nothing")] = False,
) -> None:
    """Task-agnostic study: distil students on text, fine-tune each on GLUE tasks, report objective x task."""
    from orchestrator.study import check_study, load_study_spec, run_study, study_report

    spec = load_study_spec(study_file, parse_overrides(set_))
    if dry_run:
        distill_count, finetune_count = check_study(spec)
        Console().print(
            f"study {spec.name}: stage 1 distils {spec.stage('distill').trial_count} students "
            f"({distill_count} configs checked); stage 2 fine-tunes each over "
            f"{spec.stage('finetune').trial_count} configurations ({finetune_count} checked)"
        )
        return
    state = run_study(spec, address)
    _, markdown = study_report(Path(state.study_dir))
    print_data(markdown)
    console.print(f"study folder: {state.study_dir}")


@app.command()
@user_errors
def report(
    sweep_dir: Annotated[Path, typer.Argument(help="the sweep folder")],
    value: Annotated[str, typer.Option(help="best_score (best evaluation) or final_score")] = "best_score",
    include_stopped: Annotated[
        bool, typer.Option(help="average early-stopped trials into the cells too, at the step they reached")
    ] = False,
    register: Annotated[str | None, typer.Option(
        help="register the best completed student of each task in MLflow's Model Registry as NAME-TASK "
        "(needs `log_students: true`)")] = None,
) -> None:
    """Print and save the study's tables and figures (Markdown, CSV, SVG, report.html) and log them
    to the sweep's MLflow run."""
    from orchestrator.state import STUDY_FILE

    if (sweep_dir / STUDY_FILE).exists():
        from orchestrator.study import study_report

        md_path, markdown = study_report(sweep_dir)
        print_data(markdown)
        console.print(f"saved {md_path}")
        return

    if value not in ("best_score", "final_score"):
        raise UserError(f"--value {value!r}: expected best_score or final_score")
    from orchestrator.report import build_report

    md_path, csv_path, markdown, logged = build_report(sweep_dir, value, include_stopped)
    print_data(markdown)
    console.print(f"saved {md_path.parent / 'report.html'} (tables and figures) and {csv_path}"
                  + ("; logged to MLflow" if logged else ""))
    if register:
        from orchestrator.student_models import register_best_students

        for task, run, version in register_best_students(sweep_dir, register):
            console.print(f"registered {register}-{task} version {version}: the student of {run}")


@app.command()
@user_errors
def ui(
    sweep_dir: Annotated[Path | None, typer.Argument(help="a sweep folder (its tracking store)")] = None,
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 against a sweep's (or the default) tracking store, and print
    the URL of the sweep's runs page."""
    import subprocess

    from orchestrator.tracking import default_tracking_uri, redact, runs_page_url, with_credentials

    uri = default_tracking_uri()
    experiment_id = None
    if sweep_dir is not None:
        from orchestrator.state import SweepState

        state = SweepState.load(sweep_dir)
        uri, experiment_id = state.uri, state.experiment_id  # credentials, if any, only where needed below
    if not uri.startswith(("sqlite:", "file:", "/", "mysql", "postgresql")):
        where = runs_page_url(uri, experiment_id) if experiment_id else uri
        raise UserError(f"the tracking store is a server: open {redact(where)} in a browser instead")
    server = f"http://127.0.0.1:{port}"
    page = runs_page_url(server, experiment_id) if experiment_id else server
    console.print(f"MLflow UI for {redact(uri)} (Ctrl-C stops it); the sweep's runs:\n{page}", soft_wrap=True)
    # the store's URI through the environment: a command line is visible to every user of the machine
    raise typer.Exit(
        subprocess.call([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)],
                        env=os.environ | {"MLFLOW_BACKEND_STORE_URI": with_credentials(uri)})
    )


@app.command()
@user_errors
def sync(
    sweep_dir: Annotated[Path, typer.Argument(help="the sweep folder")],
    attempts: Annotated[int, typer.Option(min=1, help="tries while the server does not answer (backing off 2, 4, 8 s ...)")] = 4,
) -> None:
    """Send MLflow the records of a sweep that it does not hold yet (e.g. after the server was down)."""
    from orchestrator.mlflow_callback import sync_journal

    delivery = sync_journal(sweep_dir, attempts)
    console.print(f"sent {delivery.sent} MLflow records" + (f"; {delivery.left} still unsent" if delivery.left else ""))
    for reason in delivery.dropped:
        console.print(f"skipped: {reason}")
    if delivery.left:
        raise UserError(f"MLflow did not answer ({delivery.last_error}); run `distillsweep sync {sweep_dir}` again "
                        "when it does: the records stay in the sweep's journal")


if __name__ == "__main__":
    app()
