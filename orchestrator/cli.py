"""`distillsweep`: the command line.

Errors a user can cause (bad files, unknown objectives, missing teachers) are printed as one
message naming the problem, with exit code 2, never as a traceback. Each command imports what it
runs when it runs: those modules bring Ray and PyTorch, which `--help` should not wait for.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
console = Console(stderr=True, markup=False, emoji=False, soft_wrap=True)
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
    reads no `[/]` or `[link=...]` in it as markup, and long table rows stay whole lines."""
    Console(soft_wrap=True).print(Text(text))


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

    result = run_demo(workdir.resolve(), address, verbose)
    folder = result.folder
    print_data((folder / "report" / "report.md").read_text())
    for line in result.registered:
        print_data(line)
    print_data("load it and predict:")
    for line in result.load_lines:
        print_data(f"  {line}")
    console.print(
        f"sweep folder: {folder}\n  distillsweep status {folder}\n  distillsweep ui {folder}   "
        "# MLflow UI on http://127.0.0.1:5000 (Models: the registered student)"
    )


ProfileOption = Annotated[str | None, typer.Option(
    "--device-profile", help="the dry run's cost estimate on this device: a shipped profile (h200, cpu-xeon-amx) or "
    "a YAML file of your own (default: h200 where trials ask for a GPU, else cpu-xeon-amx)")]
DevicesOption = Annotated[int | None, typer.Option(
    "--devices", min=1, help="devices the dry run's wall-clock assumes (default: what one trial holds)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the dry run's cost estimate as JSON, for scripts")]
GpuMemoryOption = Annotated[float | None, typer.Option(
    "--gpu-memory-gb", help="for resources.gpu auto: memory of one GPU in GiB, which sizes each trial's share "
    "(sets resources.gpu_memory_gb; default: from the GPU type Ray reports)")]


@app.command()
@user_errors
def sweep(
    space_file: Annotated[Path, typer.Argument(help="search-space YAML (see search_spaces/)")],
    address: AddressOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="validate, print the trials and what they will cost; start nothing")] = False,
    verbose: VerboseOption = False,
    device_profile: ProfileOption = None,
    devices: DevicesOption = None,
    as_json: JsonOption = False,
    gpu_memory_gb: GpuMemoryOption = None,
) -> None:
    """Run a sweep: every trial of the space file, scheduled by Ray Tune, recorded in MLflow."""
    from orchestrator.config import load_sweep_spec

    spec = sweep_with_gpu_memory(load_sweep_spec(space_file, parse_overrides(set_)), gpu_memory_gb)
    if dry_run:
        dry_run_sweep(spec, device_profile, devices, as_json)
        return
    refuse_estimate_options(device_profile, devices, as_json)
    from orchestrator.sweep import start_sweep

    state = start_sweep(spec, address, verbose)
    console.print(f"sweep finished: {state.sweep_dir}")
    console.print(f"  distillsweep status {state.sweep_dir}\n  distillsweep report {state.sweep_dir}")


def dry_run_sweep(spec: Any, device_profile: str | None, devices: int | None, as_json: bool) -> None:
    """`sweep --dry-run`: the checks, then the space, the GPU plan and the cost estimate, or all as JSON."""
    from orchestrator.cost import estimate_sweep, gpus_per_trial
    from orchestrator.device_profiles import load_profile
    from orchestrator.preflight import validate

    with data_only(as_json):
        configs = validate(spec)
        plan = gpu_plan(spec, configs)
        profile = load_profile(device_profile, gpus_per_trial(spec.resources) > 0)
        estimate = estimate_sweep(spec, configs, profile, devices)
    if as_json:
        print(json.dumps({**estimate.as_json(), "gpu_plan": plan_json(plan)}, indent=2))
        return
    print_space(spec, len(configs))
    print_plan(plan)
    print_cost(estimate)


def data_only(as_json: bool) -> contextlib.AbstractContextManager[Any]:
    """With --json, what checks print (warnings) goes to stderr: stdout holds the JSON alone."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


AUTO_ONLY = "--gpu-memory-gb sizes GPU shares by memory, which only resources.gpu: auto does"


def sweep_with_gpu_memory(spec: Any, gib: float | None) -> Any:
    """The sweep with --gpu-memory-gb as its resources.gpu_memory_gb."""
    from orchestrator.config import GPU_AUTO

    if gib is None:
        return spec
    if spec.resources.gpu != GPU_AUTO:
        raise UserError(f"{AUTO_ONLY}; sweep {spec.name} asks for gpu {spec.resources.gpu:g}: set resources.gpu: "
                        "auto (--set resources.gpu=auto) or leave the option out")
    return spec.model_copy(update={"resources": with_gpu_memory(spec.resources, gib)})


def study_with_gpu_memory(spec: Any, gib: float | None) -> Any:
    """The study with --gpu-memory-gb on each stage whose resources.gpu is auto."""
    from orchestrator.config import GPU_AUTO

    if gib is None:
        return spec
    stages = {name: getattr(spec, name) for name in ("distill", "finetune")
              if getattr(spec, name).resources.gpu == GPU_AUTO}
    if not stages:
        raise UserError(f"{AUTO_ONLY}; neither stage of study {spec.name} uses it (distill.resources.gpu "
                        f"{spec.distill.resources.gpu:g}, finetune.resources.gpu {spec.finetune.resources.gpu:g}): "
                        "set one to auto or leave the option out")
    return spec.model_copy(update={name: stage.model_copy(update={"resources": with_gpu_memory(stage.resources, gib)})
                                   for name, stage in stages.items()})


def with_gpu_memory(resources: Any, gib: float) -> Any:
    from orchestrator.config import Resources

    return Resources.model_validate({**resources.model_dump(), "gpu_memory_gb": gib})


def gpu_plan(spec: Any, configs: list[Any], known: dict[str, Any] | None = None) -> Any:
    """The dry run's GPU plan where trials size their GPU share by memory (None elsewhere)."""
    from orchestrator.config import GPU_AUTO
    from orchestrator.gpu_memory import dry_run_plan

    return dry_run_plan(spec, configs, known) if spec.resources.gpu == GPU_AUTO else None


def dry_run_study(spec: Any, device_profile: str | None, devices: int | None, as_json: bool) -> None:
    """`study --dry-run`: both stages checked, the distill stage's space, each stage's GPU plan and
    cost estimate, or all as JSON."""
    from orchestrator.cost import estimate_study, gpus_per_trial
    from orchestrator.cost_table import study_total_line
    from orchestrator.device_profiles import load_profile
    from orchestrator.study import check_study

    wants_gpu = gpus_per_trial(spec.distill.resources) > 0 or gpus_per_trial(spec.finetune.resources) > 0
    with data_only(as_json):
        distill_count, finetune_count = check_study(spec)
        plans = study_gpu_plans(spec)
        estimate = estimate_study(spec, load_profile(device_profile, wants_gpu), devices)
    if as_json:
        gpu_plans = {name: plan_json(plan) for name, plan in plans.items()}
        print(json.dumps({**estimate.as_json(), "gpu_plan": gpu_plans}, indent=2))
        return
    Console().print(
        f"study {spec.name}: stage 1 distils {spec.stage('distill').trial_count} students "
        f"({distill_count} configs checked); stage 2 fine-tunes each over "
        f"{spec.stage('finetune').trial_count} configurations ({finetune_count} checked)"
    )
    print_space(spec.stage("distill"), distill_count)
    for name, plan in plans.items():
        print_plan(plan, f"stage {name}: ")
    print_cost(estimate.distill, f"stage 1 of study {spec.name}: distil, on {estimate.distill.profile.name}")
    print_cost(estimate.finetune, f"stage 2 of study {spec.name}: fine-tune every student, on "
               f"{estimate.finetune.profile.name}")
    print_data(study_total_line(estimate))


def study_gpu_plans(spec: Any) -> dict[str, Any]:
    """Each stage's GPU plan (None where it does not use gpu auto); stage 2's students have stage 1's shape."""
    from orchestrator.cost import stage_one_students
    from orchestrator.gpu_memory import representative_configs

    students, known = stage_one_students(spec)
    stages = {"distill": spec.stage("distill"), "finetune": spec.stage("finetune", students)}
    return {name: gpu_plan(stage, representative_configs(stage), known) for name, stage in stages.items()}


def plan_json(plan: Any) -> dict[str, Any] | None:
    return None if plan is None else plan.as_json()


def print_plan(plan: Any, where: str = "") -> None:
    """The GPU plan's lines, the first saying `where` (a study's stage)."""
    for index, line in enumerate(plan.lines() if plan else []):
        print_data(f"{where}{line}" if index == 0 else line)


def refuse_estimate_options(device_profile: str | None, devices: int | None, as_json: bool) -> None:
    given = [name for name, value in (("--device-profile", device_profile), ("--devices", devices),
                                      ("--json", as_json)) if value]
    if given:
        raise UserError(f"{', '.join(given)}: options of the cost estimate, which only --dry-run prints; add --dry-run")


def print_space(spec: Any, checked: int) -> None:
    from orchestrator.spaces import Distribution

    table = Table(title=f"sweep {spec.name}: {spec.trial_count} trials"
                  + ("" if spec.search.algorithm == "grid" else f" ({spec.search.algorithm} samples)"))
    table.add_column("space entry")
    table.add_column("values")
    for key, value in spec.space.items():
        shown = f"{value.kind} {shown_values(key, value)}" if isinstance(value, Distribution) else brief(value)
        table.add_row(key, Text(shown))  # Text: values are shown as written, never read as markup
    out = Console()
    out.print(table)
    out.print(
        f"search {spec.search.algorithm}, scheduler {spec.scheduler.type}, "
        f"{spec.resources.cpu} CPU + {spec.resources.gpu} GPU per trial; {checked} trial configs checked"
    )


SHOWN_MIXES = 40  # objective mixes the dry run's table names; more are counted


def shown_values(key: str, dist: Any) -> str:
    """A distribution's values, bounded; every objective mix by name (`att_kl+hidden_mse`), up to SHOWN_MIXES."""
    from orchestrator.spaces import MIX_KEY
    from orchestrator.trials import label

    values = getattr(dist, dist.kind)
    if key != MIX_KEY or dist.kind not in ("grid", "choice"):
        return brief(values)
    more = f", and {len(values) - SHOWN_MIXES} more" if len(values) > SHOWN_MIXES else ""
    return ", ".join(label(mix) for mix in values[:SHOWN_MIXES]) + more


def print_cost(estimate: Any, title: str | None = None) -> None:
    from orchestrator.cost_table import cost_notes, cost_table

    Console().print(cost_table(estimate, title))
    for line in cost_notes(estimate):
        print_data(line)


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
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="validate both stages and print what they will cost; start nothing")] = False,
    device_profile: ProfileOption = None,
    devices: DevicesOption = None,
    as_json: JsonOption = False,
    gpu_memory_gb: GpuMemoryOption = None,
) -> None:
    """Task-agnostic study: distil students on text, fine-tune each on GLUE tasks, report objective x task."""
    from orchestrator.study import load_study_spec, run_study, study_report

    spec = study_with_gpu_memory(load_study_spec(study_file, parse_overrides(set_)), gpu_memory_gb)
    if dry_run:
        dry_run_study(spec, device_profile, devices, as_json)
        return
    refuse_estimate_options(device_profile, devices, as_json)
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
        "(logged from its kept checkpoint if the sweep did not log students)")] = None,
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

    from orchestrator.tracking import default_tracking_uri, redact, runs_page_url, with_credentials, without_server_jobs

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
    env = without_server_jobs(dict(os.environ)) | {"MLFLOW_BACKEND_STORE_URI": with_credentials(uri)}
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)],
                                     env=env))


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
