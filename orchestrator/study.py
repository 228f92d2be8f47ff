"""Task-agnostic studies: distil students on text, then fine-tune each on GLUE tasks, as one file.

Stage 1 is a pre-training sweep whose trials log their students to MLflow. Stage 2 is a
fine-tuning sweep whose `student.init` is the grid of those students, registered in MLflow's Model
Registry (`models:/STUDY-MIX/VERSION`), whose versions link to the runs that distilled them. The report gives, per
objective and task, the best dev score over the fine-tuning grid, as the study did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field, field_validator

from orchestrator.config import Resources, SweepSpec, TrackingConfig, check_folder_name
from orchestrator.messages import UserError
from orchestrator.preflight import check, print_warnings, scheduler_warnings, validate
from orchestrator.report import markdown_table, read_trials
from orchestrator.search import SchedulerConfig, SearchConfig
from orchestrator.state import (
    STATE_FILE,
    STUDY_FILE,
    SweepState,
    private_folder,
    public_json,
    read_state_file,
    sweep_dir,
    write_private,
)
from orchestrator.student_models import STUDENT_ARTIFACT
from orchestrator.sweep import resume_sweep, start_sweep
from orchestrator.tracking import keep_credentials
from trainables.config import StrictModel, read_yaml, set_dotted

PLACEHOLDER_STUDENT = "models:/stage-1-student/1"


class StageSpec(StrictModel):
    """One stage's sweep; name, storage and tracking come from the study."""

    base: dict[str, Any]
    space: dict[str, Any] = Field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = Field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: Resources = Resources()
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=2, ge=-1)


class StudySpec(StrictModel):
    name: str
    distill: StageSpec
    finetune: StageSpec
    storage: str = "runs/sweeps"
    tracking: TrackingConfig = TrackingConfig()
    state_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, name: str) -> str:
        return check_folder_name(name)

    def stage(self, which: str, students: list[str] | None = None) -> SweepSpec:
        """The SweepSpec of stage `distill` or `finetune` (students fill the fine-tuning grid)."""
        stage = self.distill if which == "distill" else self.finetune
        fields = stage.model_dump(mode="json")
        fields.update(name=f"{self.name}-{which}", storage=self.storage, tracking=self.tracking.model_dump(),
                      state_dir=self.state_dir)
        if which == "distill":
            fields.update(run="pretrain", log_students=True)
        else:
            fields["base"] = {**fields["base"], "objectives": [], "teacher": None}
            init = [{"pretrained": uri} for uri in students or [PLACEHOLDER_STUDENT]]
            fields["space"] = {**fields["space"], "student.init": {"grid": init}}
        return SweepSpec.model_validate(fields)


@dataclass
class StudyState:
    study_dir: str
    spec: dict[str, Any]
    students: dict[str, str]  # models:/ URI -> objective mix of the run that distilled it

    def save(self) -> None:
        write_private(private_folder(Path(self.study_dir)) / STUDY_FILE, public_json(asdict(self)))

    @classmethod
    def load(cls, study_dir: Path) -> StudyState:
        """The study saved in `study_dir`, which it then works on (a copied or moved study works on itself)."""
        folder = Path(study_dir).expanduser().resolve()
        fields = read_state_file(folder / STUDY_FILE, "study")
        try:
            return cls(**(fields | {"study_dir": str(folder)}))
        except TypeError as err:
            raise UserError(f"{folder / STUDY_FILE}: not a distillsweep study file ({err})") from None


def load_study_spec(path: Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, distill, finetune, ...")
    raw.setdefault("name", Path(path).stem)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return StudySpec.model_validate(raw)


def check_study(spec: StudySpec) -> tuple[int, int]:
    """Validate both stages before anything starts; returns the configs checked per stage. Stage 2's
    scheduler is judged on the grid it will run: one student per stage-1 trial."""
    distill = validate(spec.stage("distill"))
    finetune = check(spec.stage("finetune"))
    print_warnings(scheduler_warnings(spec.stage("finetune", placeholder_students(spec))))
    return len(distill), len(finetune)


def placeholder_students(spec: StudySpec) -> list[str]:
    """Stand-ins for the students stage 1 registers, one per stage-1 trial."""
    return [f"models:/stage-1-student/{i}" for i in range(1, spec.stage("distill").trial_count + 1)]


def run_stage(spec: SweepSpec, address: str | None) -> SweepState:
    """Start a stage, or resume it if an earlier run of the study got that far."""
    folder = sweep_dir(spec)
    if (folder / STATE_FILE).exists():
        return resume_sweep(folder, address)
    return start_sweep(spec, address)


def distilled_students(state: SweepState, study_name: str) -> dict[str, str]:
    """The students stage 1 logged, each registered in MLflow's Model Registry as
    `STUDY-MIX` (one version per student), as `models:/NAME/VERSION` URIs with the objective mix
    that made each. Registering is idempotent: a resumed study finds the versions it made."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(state.tracking_uri)
    client = MlflowClient(state.tracking_uri)
    runs = client.search_runs(
        [state.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{state.parent_run_id}' and tags.student_logged = 'true'",
        max_results=10_000,
    )
    students = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        mix = run.data.tags["objective_mix"]
        name = f"{study_name}-{mix}"
        held = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'") if v.name == name]
        version = held[0] if held else mlflow.register_model(f"runs:/{run.info.run_id}/{STUDENT_ARTIFACT}", name)
        students[f"models:/{name}/{version.version}"] = mix
    return students


def run_study(spec: StudySpec, address: str | None = None) -> StudyState:
    check_study(spec)
    if spec.tracking.uri:
        keep_credentials(spec.tracking.uri)  # a resumed stage's state file holds the URI without them
    distill_state = run_stage(spec.stage("distill"), address)
    students = distilled_students(distill_state, spec.name)
    if not students:
        raise UserError(f"stage 1 of study {spec.name} produced no student; see distillsweep status {distill_state.sweep_dir}")
    finetune_spec = spec.stage("finetune", sorted(students))
    study = StudyState(study_dir=str(sweep_dir(finetune_spec).parent / spec.name), spec=spec.model_dump(mode="json"),
                       students=students)
    study.save()
    run_stage(finetune_spec, address)
    return study


def study_report(study_dir: Path) -> tuple[Path, str]:
    """Objective x task: the best dev score over the fine-tuning grid; saved and logged to MLflow."""
    study = StudyState.load(study_dir)
    spec = StudySpec.model_validate(study.spec)
    # the stages' sweep folders sit beside the study's (run_study puts it there)
    state = SweepState.load(Path(study.study_dir).parent / spec.stage("finetune", sorted(study.students)).name)
    rows = []
    for record in read_trials(state.experiment_dir, state.template):
        if record.outcome.kind != "completed":
            continue  # a fine-tuning run cut short is no student's best score
        source = record.config.get("student.init", {}).get("pretrained")
        rows.append({"objective_mix": study.students.get(source, source), "task": record.task,
                     "best_score": record.best_score, "trial": record.trial_id})
    if not rows:
        raise UserError("no fine-tuning trial has completed yet")
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="objective_mix", columns="task", values="best_score", aggfunc="max")
    out = Path(study.study_dir)
    table.to_csv(out / "study_report.csv")
    shown = table.map(lambda v: f"{100 * v:.1f}")
    markdown = "\n".join([
        f"# Study {spec.name}: best dev score per objective and task (x100, max over the fine-tuning grid)", "",
        markdown_table(shown, corner="objective \\ task"), "",
    ])
    (out / "study_report.md").write_text(markdown)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(state.tracking_uri)
        client.log_artifact(state.parent_run_id, str(out / "study_report.md"), "report")
        client.log_artifact(state.parent_run_id, str(out / "study_report.csv"), "report")
    except Exception as err:  # the files on disk are the result
        print(f"[distillsweep] could not log the study report to MLflow ({err})")
    return out / "study_report.md", markdown
