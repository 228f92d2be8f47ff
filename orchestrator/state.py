"""Where a sweep lives, and what `resume`, `status` and `report` read back about it.

A sweep's own state (the spec, the MLflow parent run, the teachers it uses) is saved next to
Tune's experiment folder, so every command after `sweep` needs only the sweep's path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from orchestrator.config import SweepSpec
from orchestrator.messages import UserError
from orchestrator.search import SEARCHERS
from orchestrator.tracking import default_tracking_uri
from orchestrator.trials import TrialTemplate, labelled_choices

STATE_FILE = "distillsweep.json"
OPTUNA_DB = "optuna.db"
STUDY_FILE = "study.json"  # marks a study folder (orchestrator.study), whose stages are sweeps


@dataclass(frozen=True)
class Storage:
    """Where Tune keeps a sweep's trials: an absolute local folder, or a URI (s3://, gs://)."""

    root: str

    @classmethod
    def of(cls, storage: str) -> Storage:
        given = cls(storage)
        return given if given.is_remote else cls(str(Path(storage).expanduser().resolve()))

    @property
    def is_remote(self) -> bool:
        return "://" in self.root

    def experiment(self, name: str) -> str:
        """Tune's experiment folder (or URI) for sweep `name`."""
        return f"{self.root.rstrip('/')}/{name}" if self.is_remote else str(Path(self.root) / name)

    def local_experiment(self, name: str) -> Path:
        """Tune's experiment folder, for reading its files here."""
        if self.is_remote:
            raise UserError(f"storage {self.root} is remote: run status/report where it is mounted, or copy it locally")
        return Path(self.root) / name


def sweep_dir(spec: SweepSpec) -> Path:
    """Where the sweep's own state lives: beside Tune's folder, or `state_dir` for URI storage."""
    if spec.state_dir is not None:
        return Path(spec.state_dir).expanduser().resolve() / spec.name
    storage = Storage.of(spec.storage)
    if storage.is_remote:
        return Path.cwd() / ".distillsweep" / spec.name
    return storage.local_experiment(spec.name)


def tracking_uri_for(spec: SweepSpec) -> str:
    if spec.tracking.uri:
        return spec.tracking.uri
    storage = Storage.of(spec.storage)
    return default_tracking_uri(None if storage.is_remote else Path(storage.root))


@dataclass
class SweepState:
    """What `resume`, `status` and `report` need to know about a sweep."""

    spec: dict[str, Any]
    sweep_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teachers: dict[str, str]
    base: dict[str, Any]
    # models:/ URIs that trials start their students from -> the run that logged each (for its tag)
    source_runs: dict[str, str] = field(default_factory=dict)
    # task name -> its train and validation sets as MLflow dataset fields (orchestrator.inputs)
    task_inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def save(self) -> None:
        path = Path(self.sweep_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepState:
        path = Path(sweep_dir).expanduser().resolve() / STATE_FILE
        if not path.exists():
            raise UserError(f"{sweep_dir}: not a sweep folder (no {STATE_FILE}); give the folder `sweep` printed")
        return cls(**json.loads(path.read_text()))

    @cached_property
    def sweep_spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec)

    @cached_property
    def storage(self) -> Storage:
        return Storage.of(self.sweep_spec.storage)

    @property
    def optuna_url(self) -> str:
        """The sweep's Optuna study (Optuna searchers only): `optuna-dashboard <this URL>` opens it."""
        return f"sqlite:///{Path(self.sweep_dir) / OPTUNA_DB}"

    @property
    def experiment_dir(self) -> Path:
        """Tune's experiment folder, for reading its files here."""
        return self.storage.local_experiment(self.sweep_spec.name)

    @cached_property
    def template(self) -> TrialTemplate:
        spec = self.sweep_spec
        labelled = SEARCHERS[spec.search.algorithm].suggests_labels
        return TrialTemplate(self.base, spec.per_task, self.teachers,
                             labelled_choices(spec.space) if labelled else {}, kind=spec.run)
