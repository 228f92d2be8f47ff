"""A sweep on a shared cluster: its folder, journal and state files are input others may have
written or copied, and its credentials stay in the process that has them (issue 22)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from orchestrator.config import load_sweep_spec
from orchestrator.disk import sweep_disk_use
from orchestrator.journal import JOURNAL_FILE, Journal, MlflowWriter, RefusedRecord
from orchestrator.messages import UserError, describe_error
from orchestrator.mlflow_callback import SweepTracker, sync_journal, write_outcome
from orchestrator.outcome import OUTCOME_FILE, TrialOutcome
from orchestrator.report import build_report
from orchestrator.state import STATE_FILE, STUDY_FILE, SweepState
from orchestrator.status import trial_statuses, undelivered_records
from orchestrator.study import StudySpec, StudyState, study_report
from orchestrator.sweep import forwarded_env, start_sweep
from orchestrator.tracking import ensure_experiment
from orchestrator.trials import TrialTemplate
from services import free_port, kill_group, start_mlflow_server, wait_for
from sweep_helpers import distillsweep, sqlite_store, tiny_space, write_space

PASSWORD = "S3cret-tracking-pw"
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-4f1d9c",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-7b2e",
    "HF_TOKEN": "hf_token_9a8c7e",
    "DISTILLSWEEP_API_KEY": "distillsweep-key-3c5a",
}
BASE = {
    "task": "demo", "teacher": "/teachers/tiny", "student": {"num_layers": 2, "init": "lower"},
    "objectives": [{"name": "kd", "weight": 0.5, "temperature": 2.0}], "training": {"max_steps": 12, "eval_steps": 4},
}


@pytest.fixture
def store(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "tests", uri)
    return uri, experiment, client.create_run(experiment).info.run_id


def sweep_folder(root: Path, store: tuple[str, str, str], name: str = "tiny", drawn: dict | None = None) -> Path:
    """A sweep folder as `sweep` leaves it, written by hand (as someone else could): its state
    file and one finished trial with its rows and outcome."""
    uri, experiment, parent = store
    folder = root / name
    trial = folder / "trial_a"
    trial.mkdir(parents=True)
    spec = {"name": name, "base": BASE, "storage": str(root), "tracking": {"uri": uri, "experiment": "tests"}}
    (folder / STATE_FILE).write_text(json.dumps({
        "spec": spec, "sweep_dir": str(folder), "tracking_uri": uri, "experiment_id": experiment,
        "parent_run_id": parent, "teachers": {}, "base": BASE,
    }))
    (trial / "params.json").write_text(json.dumps(TrialTemplate(BASE).with_run_config(drawn or {})))
    rows = [{"trial_id": "a", "step": step, "score": step / 20, "total_steps": 12} for step in (4, 8, 12)]
    (trial / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (trial / OUTCOME_FILE).write_text(json.dumps(TrialOutcome("completed", 12, 12).as_dict()))
    trial_state = json.dumps({"trial_id": "a", "status": "TERMINATED"})
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [[trial_state, "{}"]]}))
    return folder


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    """`path: secret` for every file under `root` that holds one of `secrets`."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {secret}" for secret in secrets if secret.encode() in data]
    return found


# --- the journal and folder of a sweep (M5) -------------------------------------------------------


def test_a_crafted_journal_cannot_make_sync_upload_or_delete_a_folder_outside_the_sweep(tmp_path, store):
    folder = sweep_folder(tmp_path / "sweeps", store)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "id_rsa").write_text("private key")
    records = [
        {"op": "artifacts", "key": "sweep", "path": str(victim), "remove_after": True},
        {"op": "model", "key": "sweep", "path": str(victim), "artifact_path": "student", "kind": "distill"},
        {"op": "model", "key": "sweep", "path": "students/../../../victim", "artifact_path": "student", "kind": "distill"},
    ]
    (folder / JOURNAL_FILE).write_text("".join(json.dumps(r | {"seq": i}) + "\n" for i, r in enumerate(records)))

    delivery = sync_journal(folder, attempts=1)

    assert (victim / "id_rsa").read_text() == "private key", "a journal line deleted a folder outside the sweep"
    uri, _, parent = store
    assert MlflowClient(uri).list_artifacts(parent) == [], "a journal line uploaded a folder outside the sweep"
    assert delivery.left == 0 and len(delivery.dropped) == 3, delivery
    assert all("refused" in reason for reason in delivery.dropped), delivery.dropped


def test_a_student_record_names_only_a_folder_in_the_sweeps_own_students(tmp_path, store):
    folder = tmp_path / "sweep"
    writer = MlflowWriter(store[0], store[1], {}, folder)
    students = (folder / "students").resolve()
    assert writer.student_folder({"key": "k", "path": "students/t1"}) == students / "t1"
    assert writer.student_folder({"key": "k", "path": str(folder / "students" / "t1")}) == students / "t1"
    (folder / "students").mkdir(parents=True)
    (folder / "students" / "link").symlink_to(tmp_path)
    for path in ("students", "students/link", "students/../x", "/etc", str(tmp_path / "other" / "students" / "t1")):
        with pytest.raises(RefusedRecord):
            writer.student_folder({"key": "k", "path": path})


def test_a_moved_sweep_folder_reports_and_shows_status_on_itself_not_where_it_was(tmp_path, store):
    original = sweep_folder(tmp_path / "sweeps", store)
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(original, moved)
    shutil.rmtree(original)

    rows = trial_statuses(moved)
    md_path, _, _, _ = build_report(moved, "best_score")
    sync_journal(moved, attempts=1)

    assert [(r["trial"], r["outcome_kind"], r["step"]) for r in rows] == [("a", "completed", 12)]
    assert md_path == moved.resolve() / "report" / "report.md" and md_path.exists()
    assert undelivered_records(moved) == 0 and sweep_disk_use(moved) is not None
    assert not original.exists(), f"a command on the moved folder wrote into {original}: " \
                                  f"{sorted(str(p) for p in original.rglob('*'))}"


def test_a_copied_study_folder_reports_into_the_copy(tmp_path, store):
    stage = {"base": BASE}
    spec = StudySpec.model_validate({"name": "st", "distill": stage, "finetune": stage,
                                     "storage": str(tmp_path / "sweeps"), "tracking": {"uri": store[0]}})
    root = tmp_path / "sweeps"
    student = "models:/st-kd/1"
    sweep_folder(root, store, name="st-finetune", drawn={"student.init": {"pretrained": student}})
    StudyState(study_dir=str(root / "st"), spec=spec.model_dump(mode="json"), students={student: "kd"}).save()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(root)

    md_path, _ = study_report(copy / "st")

    assert md_path == (copy / "st" / "study_report.md").resolve() and md_path.exists()
    assert not root.exists()


# --- names (L1) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".", ".."])
def test_sweep_and_study_names_dot_and_dotdot_are_refused(tmp_path, name):
    space = write_space({"base": BASE, "storage": str(tmp_path / "sweeps")}, tmp_path / f"{name}.yaml")
    with pytest.raises(ValidationError) as sweep_error:
        load_sweep_spec(space, {"name": name} if name == ".." else None)  # `..yaml` names the sweep "."
    with pytest.raises(ValidationError) as study_error:
        StudySpec.model_validate({"name": name, "distill": {"base": BASE}, "finetune": {"base": BASE}})
    for error in (sweep_error, study_error):
        message = describe_error(error.value)
        assert f"name: '{name}': a name starts with a letter or digit" in message, message


# --- state files (L10) ----------------------------------------------------------------------------


def test_a_cut_outcome_json_is_read_as_absent_by_status_and_report(tmp_path, store):
    folder = sweep_folder(tmp_path / "sweeps", store)
    written = folder / "trial_a" / OUTCOME_FILE
    written.write_text(written.read_text()[:17])  # a driver killed while writing it

    rows = trial_statuses(folder)
    md_path, _, _, _ = build_report(folder, "best_score")

    assert [(r["outcome_kind"], r["step"]) for r in rows] == [("completed", 12)]
    assert md_path.exists()


@pytest.mark.parametrize("file", [STATE_FILE, STUDY_FILE])
def test_a_cut_state_file_gives_a_message_naming_it_not_a_traceback(tmp_path, store, file):
    folder = sweep_folder(tmp_path / "sweeps", store)
    (folder / file).write_text('{"spec": {"name": "tiny", "ba')
    with pytest.raises(UserError, match=f"{re.escape(str(folder / file))} cannot be read .* cut short"):
        (SweepState if file == STATE_FILE else StudyState).load(folder)
    if file == STATE_FILE:
        with pytest.raises(UserError, match="cannot be read"):
            trial_statuses(folder)


def test_state_files_are_private_and_replaced_whole(tmp_path, store):
    umask = os.umask(0o022)
    try:
        SweepState.load(sweep_folder(tmp_path / "sweeps", store)).save()
        SweepState.load(tmp_path / "sweeps" / "tiny").save()  # over an existing file
        StudyState(study_dir=str(tmp_path / "study"), spec={}, students={}).save()
        trial = SimpleNamespace(trial_id="b", path=str(tmp_path / "trial_b"),
                                storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem()))
        Path(trial.path).mkdir()
        write_outcome(trial, TrialOutcome("stopped", 4, 12))
    finally:
        os.umask(umask)
    for path in (tmp_path / "sweeps" / "tiny" / STATE_FILE, tmp_path / "study" / STUDY_FILE,
                 tmp_path / "trial_b" / OUTCOME_FILE):
        assert path.stat().st_mode & 0o777 == 0o600, f"{path}: {oct(path.stat().st_mode)}"
        assert not list(path.parent.glob(".*.partial")), "a temporary file was left behind"
    assert (tmp_path / "study").stat().st_mode & 0o777 == 0o700
    assert json.loads((tmp_path / "trial_b" / OUTCOME_FILE).read_text())["outcome"] == "stopped"


# --- credentials (M1, M2) -------------------------------------------------------------------------


def test_secret_settings_never_go_into_rays_runtime_env(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setenv("DISTILLSWEEP_CACHE", "/cache/ds")

    env = forwarded_env(f"postgresql://mlflow:{PASSWORD}@db/mlflow")

    assert env["HF_HOME"] == "/cache/hf" and env["DISTILLSWEEP_CACHE"] == "/cache/ds"
    assert not set(SECRETS) & set(env) and "MLFLOW_TRACKING_URI" not in env, sorted(env)
    assert forwarded_env("sqlite:////shared/mlflow.db")["MLFLOW_TRACKING_URI"] == "sqlite:////shared/mlflow.db"


def test_credentials_in_a_tracking_uri_appear_in_no_state_file_pickle_or_message(tmp_path, store, monkeypatch,
                                                                                 capsys):
    uri = f"postgresql://mlflow:{PASSWORD}@db.internal/mlflow"
    folder = sweep_folder(tmp_path / "sweeps", store)
    state = SweepState.load(folder)
    state.uri, state.spec["tracking"]["uri"] = uri, uri
    state.save()
    assert PASSWORD not in (folder / STATE_FILE).read_text()
    assert "mlflow:***@db.internal" in (folder / STATE_FILE).read_text()

    tracker = SweepTracker(uri, "1", "0" * 32, "tiny", TrialTemplate(BASE), folder)
    assert PASSWORD.encode() not in pickle.dumps(tracker), "Tune saves its callbacks with the experiment"

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="set MLFLOW_TRACKING_URI") as missing:
        SweepState.load(folder).tracking_uri  # as in a new process: the file holds no password
    assert PASSWORD not in str(missing.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert SweepState.load(folder).tracking_uri == uri

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://distill:{PASSWORD}@127.0.0.1:{free_port()}"
    journal = Journal(tmp_path / "journal", dead, store[1], {"sweep": store[2]})
    try:
        journal.append({"op": "tags", "key": "sweep", "tags": {"a": "b"}})
        journal.start()
        wait_for(lambda: journal.down_since, what="the journal to find the server down")
    finally:
        journal.close()
    printed = capsys.readouterr().out
    assert "distill:***@127.0.0.1" in printed and PASSWORD not in printed + journal.last_error, printed


def test_a_tracking_store_that_does_not_answer_is_named_without_its_password(tmp_path, teacher_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    space = tiny_space(teacher_dir, tmp_path, tracking={"uri": f"http://distill:{PASSWORD}@127.0.0.1:{free_port()}"})
    spec = load_sweep_spec(write_space(space, tmp_path / "tiny.yaml"))
    with pytest.raises(UserError, match="does not answer") as error:
        start_sweep(spec)
    assert PASSWORD not in str(error.value) and "distill:***@127.0.0.1" in str(error.value)


# --- a real sweep (M1, M2 end to end) --------------------------------------------------------------


RUNTIME_ENVS = """
import sys
import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2

ray.init(address=sys.argv[1], log_to_driver=False)
# Ray's job table, as the dashboard's jobs API serves it: each driver's runtime environment
for raw in state._connect_and_get_accessor().get_job_table(skip_submission_job_info_field=True,
                                                          skip_is_running_tasks_field=True):
    print(gcs_pb2.JobTableData.FromString(raw).config.runtime_env_info.serialized_runtime_env)
"""


def test_secrets_set_for_a_real_sweep_reach_no_file_artifact_tag_log_or_ray_runtime_env(
        tiny_demo_teacher, demo_cache, tmp_path, ray_cluster, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    secrets = [*SECRETS.values(), PASSWORD]
    port = free_port()
    server = start_mlflow_server(tmp_path / "server", port)
    try:
        uri = f"http://distill:{PASSWORD}@127.0.0.1:{port}"
        space = tiny_space(tiny_demo_teacher, tmp_path, space={"objectives.mix": {"grid": [["kd"]]}},
                           tracking={"uri": uri, "experiment": "tests"})
        done = distillsweep(["sweep", str(write_space(space, tmp_path / "tiny.yaml"))], demo_cache, tmp_path,
                            ray_address=ray_cluster.address)
        assert done.returncode == 0, done.stderr[-3000:]
        jobs = subprocess.run([sys.executable, "-c", RUNTIME_ENVS, ray_cluster.address], capture_output=True,
                              text=True, timeout=120, env=os.environ | {"RAY_AUTH_MODE": "token"})
        assert jobs.returncode == 0, jobs.stderr[-3000:]

        public = f"http://distill:***@127.0.0.1:{port}"
        client = MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        parent = next(r for r in runs if r.data.tags.get("distillsweep_role") == "sweep")
        sweep_spec = client.download_artifacts(parent.info.run_id, "sweep_spec.json", str(tmp_path / "downloaded"))
        assert json.loads(Path(sweep_spec).read_text())["tracking"]["uri"] == public
        recorded = json.dumps([(r.data.params, r.data.tags) for r in runs])
        assert "OMP_WAIT_POLICY" in jobs.stdout, "the sweep's runtime env was not found in Ray's job table"
        leaks = [f"{where}: {secret}" for where, text in (("CLI output", done.stdout + done.stderr),
                                                           ("Ray's job table", jobs.stdout),
                                                           ("MLflow params and tags", recorded))
                 for secret in secrets if secret in text]
        for root in (tmp_path / "sweeps", tmp_path / "server", Path(ray_cluster.temp_dir)):  # not tiny.yaml: the input
            leaks += files_holding(root, secrets)
        assert leaks == [], "\n".join(leaks)
    finally:
        kill_group(server)
