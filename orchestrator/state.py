"""Where a sweep lives, and what `resume`, `status` and `report` read back about it.

A sweep's own state (the spec, the MLflow parent run, the teachers it uses) is saved next to
Tune's experiment folder, so every command after `sweep` needs only the sweep's path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from orchestrator.config import SweepSpec
from orchestrator.messages import UserError, first_line
from orchestrator.search import SEARCHERS
from orchestrator.tracking import default_tracking_uri, keep_credentials, redact, with_credentials
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
    """The sweep's tracking URI, credentials included (kept in this process only)."""
    if spec.tracking.uri:
        return keep_credentials(spec.tracking.uri)
    storage = Storage.of(spec.storage)
    return keep_credentials(default_tracking_uri(None if storage.is_remote else Path(storage.root)))


def private_folder(folder: Path) -> Path:
    """Create `folder` (and its parents) for this user only where the umask allows: 0700 for the last one."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def write_private(path: Path, text: str) -> None:
    """Write a state file whole or not at all (a kill mid-write leaves the old one), readable by its
    owner only: it names the sweep's storage, tracking store and runs."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")  # mode 0600
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def read_state_file(path: Path, what: str) -> dict[str, Any]:
    """A state file's fields; a missing or unreadable one is a message saying which and what to do."""
    if not path.exists():
        raise UserError(f"{path.parent}: not a {what} folder (no {path.name}); give the folder distillsweep printed")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path} cannot be read ({first_line(err)}): it was cut short or changed by hand; the trials' own folders "
            f"keep their results, but this {what}'s commands need the file"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected the {what}'s fields, found {type(data).__name__}")
    return data


def public_json(fields: dict[str, Any]) -> str:
    """`fields` as JSON with every URL's credentials hidden: what files and artifacts may show."""
    return redact(json.dumps(fields, indent=2, default=str))


@dataclass
class SweepState:
    """What `resume`, `status` and `report` need to know about a sweep.

    `sweep_dir` is the folder it was loaded from (a copied or moved sweep works on itself); `uri`
    is the tracking URI, whose credentials the state file leaves out.
    """

    spec: dict[str, Any]
    sweep_dir: str
    uri: str
    experiment_id: str
    parent_run_id: str
    teachers: dict[str, str]
    base: dict[str, Any]
    # models:/ URIs that trials start their students from -> the run that logged each (for its tag)
    source_runs: dict[str, str] = field(default_factory=dict)
    # task name -> its train and validation sets as MLflow dataset fields (orchestrator.inputs)
    task_inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # where the sweep was started, when it was loaded from another folder (a copy, or moved)
    started_in: str | None = field(default=None, repr=False)

    def save(self) -> None:
        fields = asdict(self)
        del fields["started_in"]
        fields["tracking_uri"] = fields.pop("uri")
        write_private(private_folder(Path(self.sweep_dir)) / STATE_FILE, public_json(fields))

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepState:
        folder = Path(sweep_dir).expanduser().resolve()
        fields = read_state_file(folder / STATE_FILE, "sweep")
        fields["uri"] = fields.pop("tracking_uri", "")
        saved_in = fields.get("sweep_dir")
        fields["sweep_dir"] = str(folder)
        try:
            state = cls(**fields)
        except TypeError as err:
            raise UserError(f"{folder / STATE_FILE}: not a distillsweep state file ({err})") from None
        state.started_in = saved_in if saved_in != str(folder) else None
        return state

    @property
    def tracking_uri(self) -> str:
        """The tracking URI with its credentials: as started, or from $MLFLOW_TRACKING_URI after a load."""
        return with_credentials(self.uri)

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
        """Tune's experiment folder, for reading its files here: the sweep folder itself unless
        `state_dir` put the sweep's own state elsewhere."""
        if self.sweep_spec.state_dir is None and not self.storage.is_remote:
            return Path(self.sweep_dir)
        return self.storage.local_experiment(self.sweep_spec.name)

    @cached_property
    def template(self) -> TrialTemplate:
        spec = self.sweep_spec
        labelled = SEARCHERS[spec.search.algorithm].suggests_labels
        return TrialTemplate(self.base, spec.per_task, self.teachers,
                             labelled_choices(spec.space) if labelled else {}, kind=spec.run)
