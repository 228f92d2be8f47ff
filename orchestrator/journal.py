"""The sweep's MLflow journal: every write recorded on disk first, delivered to MLflow exactly once.

Tune's callbacks append a record (fsynced) and return at once; one thread delivers records in
order, backing off while the server does not answer, so a slow or dead server never slows the
sweep. Each delivered record is noted beside the journal. A restarted driver, or `distillsweep
sync`, resends only what was not noted, after checking what the run already holds: a request
that failed may still have been applied, and MLflow would keep a second value at the same step.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from orchestrator.inputs import dataset_inputs
from orchestrator.messages import UserError
from orchestrator.student_models import save_student_model
from orchestrator.tracking import fail_fast_http, redact

JOURNAL_FILE = "mlflow_journal.jsonl"
DELIVERED_FILE = "mlflow_delivered.jsonl"
LOCK_FILE = "mlflow_journal.lock"
STUDENTS_DIR = "students"  # students copied out of trials' checkpoints, each removed once MLflow holds it
MAX_BACKOFF_S = 15.0
PERMANENT_ATTEMPTS = 3  # a record the server rejects (4xx) is retried this often, then reported and skipped
PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit


@dataclass
class Delivery:
    """What one delivery pass achieved."""

    sent: int
    left: int
    dropped: list[str]
    last_error: str = ""


def is_permanent(err: BaseException) -> bool:
    """A 4xx answer (bad value, unknown run) fails the same way on every retry; anything else may pass later."""
    status = getattr(err, "get_http_status_code", lambda: 500)()
    return 400 <= status < 500


def first_line(err: BaseException) -> str:
    text = redact(str(err).strip())
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


class RefusedRecord(ValueError):
    """A journal record this sweep cannot have written: it is skipped, and nothing it names is touched."""


def end_with_newline(path: Path) -> None:
    """A line cut short by a kill leaves no final newline; the next append must start a line of its own."""
    with open(path, "rb+") as handle:
        if handle.seek(0, os.SEEK_END) and (handle.seek(-1, os.SEEK_END), handle.read(1))[1] != b"\n":
            handle.write(b"\n")


class MlflowWriter:
    """Sends journal records to MLflow; with `check`, sends only what the run does not hold yet.

    The journal is a file in the sweep folder, which others may be able to write: a record may
    make this process upload and delete only a student under the sweep's own `students/`.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, run_ids: dict[str, str], sweep_folder: Path) -> None:
        from mlflow import MlflowClient

        fail_fast_http()
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id
        self.run_ids = run_ids
        self.sweep_folder = Path(sweep_folder)
        self.logged_steps: dict[tuple[str, str], set[int]] = {}

    def send(self, record: dict[str, Any], check: bool) -> str | None:
        """Deliver one record; returns the run id a `create` record resolved to."""
        from mlflow.entities import Metric, Param, RunTag

        kind, key = record["op"], record["key"]
        if kind == "create":
            if key not in self.run_ids:
                # Only a create that may have reached MLflow before needs the (slow, growing) search.
                found = self.find_run(key, record.get("parent")) if check else None
                if found is None:
                    run = self.client.create_run(self.experiment_id, tags=record["tags"], run_name=record.get("name"))
                    found = run.info.run_id
                self.run_ids[key] = found
            return self.run_ids[key]
        run_id = self.run_ids.get(key)
        if run_id is None:
            raise RefusedRecord(f"{kind} for {key}: the journal holds no run created for it")
        if kind == "params":
            # MLflow accepts a param logged again with the same value; only a resend must skip what is held.
            existing = self.client.get_run(run_id).data.params if check else {}
            params = [Param(k, v) for k, v in record["params"].items() if k not in existing]
            for start in range(0, len(params), PARAMS_PER_REQUEST):
                self.client.log_batch(run_id, params=params[start : start + PARAMS_PER_REQUEST])
        elif kind == "metrics":
            values = record["metrics"]
            if check:
                values = {k: v for k, v in values.items() if record["step"] not in self.steps_held(run_id, k)}
            if values:
                metrics = [Metric(k, v, record["time"], record["step"]) for k, v in values.items()]
                self.client.log_batch(run_id, metrics=metrics)
            for name in values:
                if (run_id, name) in self.logged_steps:
                    self.logged_steps[run_id, name].add(record["step"])
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
        elif kind == "text":
            self.client.log_text(run_id, record["text"], record["file"])
        elif kind == "inputs":
            if not (check and self.client.get_run(run_id).inputs.dataset_inputs):
                self.client.log_inputs(run_id, datasets=dataset_inputs(record["datasets"]))
        elif kind == "model":
            self.deliver_model(run_id, record, check)
        elif kind == "end":
            self.client.set_terminated(run_id, record["status"])
        else:
            raise RefusedRecord(f"unknown journal record {kind!r} for {key}: distillsweep writes none such")
        return None

    def student_folder(self, record: dict[str, Any]) -> Path:
        """The student a `model` record names: relative to the sweep folder (older journals: absolute),
        and only inside the sweep's own students/ folder."""
        students = (self.sweep_folder / STUDENTS_DIR).resolve()
        path = (self.sweep_folder / record["path"]).resolve()  # an absolute path replaces the folder
        if path.parent != students:
            raise RefusedRecord(f"model for {record['key']}: {record['path']} is not a student in {students}; "
                                "nothing there was uploaded or deleted")
        return path

    def deliver_model(self, run_id: str, record: dict[str, Any], check: bool) -> None:
        """Log the student saved at `path` as an MLflow model; a resend skips a run that holds one."""
        path = self.student_folder(record)
        if check and any(a.path.endswith("MLmodel") for a in self.client.list_artifacts(run_id, record["artifact_path"])):
            shutil.rmtree(path, ignore_errors=True)
            return
        if not path.exists():
            if check:
                return
            raise FileNotFoundError(f"{path} is gone; the student cannot be logged")
        with tempfile.TemporaryDirectory() as folder:
            model = Path(folder) / "model"
            save_student_model(path, model, record["kind"])
            self.client.log_artifacts(run_id, str(model), record["artifact_path"])
        shutil.rmtree(path, ignore_errors=True)

    def steps_held(self, run_id: str, name: str) -> set[int]:
        if (run_id, name) not in self.logged_steps:
            history = self.client.get_metric_history(run_id, name)
            self.logged_steps[run_id, name] = {m.step for m in history}
        return self.logged_steps[run_id, name]

    def find_run(self, key: str, parent: str | None) -> str | None:
        """A run already created for `key` (e.g. before the driver was killed), so none is duplicated."""
        query = f"tags.distillsweep_key = '{key}'"
        if parent:
            query += f" and tags.mlflow.parentRunId = '{parent}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None


class Journal:
    """The on-disk journal of one sweep, with the thread that delivers it.

    Only one process delivers a journal at a time (a lock file): the sweep's driver while it runs,
    else `distillsweep sync`.
    """

    def __init__(self, folder: Path, tracking_uri: str, experiment_id: str, run_ids: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self._lock_handle = self._take_lock()
        self.records: list[dict[str, Any]] = []
        self.run_ids = dict(run_ids)
        delivered = self._read_delivered()
        self._read_journal()
        self.metric_steps = {(r["key"], r["step"]) for r in self.records if r["op"] == "metrics"}
        self.created = {r["key"] for r in self.records if r["op"] == "create"}
        self.ended = {r["key"] for r in self.records if r["op"] == "end"}
        # Anything not noted as delivered may have reached MLflow before the last process stopped.
        self._queue: deque[dict[str, Any]] = deque(r for r in self.records if r["seq"] not in delivered)
        self._uncertain = {r["seq"] for r in self._queue}
        self._journal: IO[str] = open(self.folder / JOURNAL_FILE, "a")
        self._delivered: IO[str] = open(self.folder / DELIVERED_FILE, "a")
        self._writer: MlflowWriter | None = None
        self._experiment_id = experiment_id
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failures = 0
        self._attempts: dict[int, int] = {}
        self.down_since: float | None = None
        self.last_error = ""
        self.dropped: list[str] = []
        self.sent = 0

    # --- the files ----------------------------------------------------------------------------

    def _take_lock(self) -> IO[str]:
        handle = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(
                f"{self.folder}: another distillsweep process (the sweep's driver, or a sync) is delivering this "
                "sweep's MLflow records; wait for it to end"
            ) from None
        return handle

    def _read_journal(self) -> None:
        path = self.folder / JOURNAL_FILE
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill mid-write: its callback never returned
        end_with_newline(path)

    def _read_delivered(self) -> set[int]:
        path = self.folder / DELIVERED_FILE
        delivered: set[int] = set()
        if not path.exists():
            return delivered
        end_with_newline(path)
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            delivered.add(entry["seq"])
            if "run_id" in entry:
                self.run_ids[entry["key"]] = entry["run_id"]
        return delivered

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = MlflowWriter(self.tracking_uri, self._experiment_id, self.run_ids, self.folder)
        return self._writer

    def append(self, record: dict[str, Any]) -> bool:
        """Put a record on disk (fsynced) and in the delivery queue; False for a metrics step already journaled."""
        with self._cond:
            if record["op"] == "metrics":
                if (record["key"], record["step"]) in self.metric_steps:
                    return False
                self.metric_steps.add((record["key"], record["step"]))
            elif record["op"] == "create":
                self.created.add(record["key"])
            elif record["op"] == "end":
                self.ended.add(record["key"])
            record = dict(record, seq=len(self.records))
            self._journal.write(json.dumps(record) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self.records.append(record)
            self._queue.append(record)
            self._cond.notify_all()
        return True

    def _note_delivered(self, record: dict[str, Any], run_id: str | None, dropped: str = "") -> None:
        entry: dict[str, Any] = {"seq": record["seq"]}
        if run_id is not None:
            entry |= {"key": record["key"], "run_id": run_id}
        if dropped:
            entry["dropped"] = dropped
        self._delivered.write(json.dumps(entry) + "\n")
        self._delivered.flush()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    # --- delivery -----------------------------------------------------------------------------

    def deliver_one(self) -> bool:
        """Try the oldest record once; True if it is done with (sent, or rejected for good)."""
        with self._cond:
            if not self._queue:
                return True
            record = self._queue[0]
        seq = record["seq"]
        try:
            run_id = self.writer.send(record, check=seq in self._uncertain)
        except RefusedRecord as err:
            self._drop(record, f"refused journal record {seq}: {err}")
        except Exception as err:  # any transport or server error: keep the record and say what failed
            self._uncertain.add(seq)
            self.last_error = first_line(err)
            if not is_permanent(err):
                return False
            self._attempts[seq] = self._attempts.get(seq, 0) + 1
            if self._attempts[seq] < PERMANENT_ATTEMPTS:
                return False
            self._drop(record, f"MLflow rejected {record['op']} for {record['key']} {PERMANENT_ATTEMPTS} times: "
                               f"{self.last_error}")
        else:
            self._note_delivered(record, run_id)
            self.sent += 1
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()
        return True

    def _drop(self, record: dict[str, Any], reason: str) -> None:
        """Skip a record for good, saying why."""
        print(f"[distillsweep] skipped an MLflow record: {reason}")
        self.dropped.append(reason)
        self._note_delivered(record, None, dropped=reason)

    def start(self) -> None:
        """Deliver in the background until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver_loop, name="mlflow-journal", daemon=True)
            self._thread.start()

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            if self.deliver_one():
                self._answered()
                continue
            self._did_not_answer()
            with self._cond:
                self._cond.wait(timeout=min(MAX_BACKOFF_S, 2.0 ** min(self._failures, 4)))

    def _did_not_answer(self) -> None:
        self._failures += 1
        if self.down_since is None:
            self.down_since = time.time()
            print(f"[distillsweep] MLflow at {redact(self.tracking_uri)} did not answer ({self.last_error}); training goes "
                  "on and its records wait in the sweep's journal")

    def _answered(self) -> None:
        self._failures = 0
        if self.down_since is not None:
            print(f"[distillsweep] MLflow at {redact(self.tracking_uri)} answers again after "
                  f"{time.time() - self.down_since:.0f} s; sending the records it missed")
            self.down_since = None

    def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the background thread to deliver everything; returns what is left."""
        deadline = time.time() + timeout_s
        with self._cond:
            while self._queue and time.time() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.time())))
            return len(self._queue)

    def deliver_all(self, attempts: int = 4) -> Delivery:
        """Deliver in this thread (for `sync`), giving up after `attempts` consecutive failures."""
        failures = 0
        while self.pending and failures < attempts:
            if self.deliver_one():
                failures = 0
                continue
            failures += 1
            if failures < attempts:
                time.sleep(min(MAX_BACKOFF_S, 2.0**failures))
        return Delivery(self.sent, self.pending, self.dropped, self.last_error if self.pending else "")

    def close(self) -> None:
        OPEN_JOURNALS.pop(self.folder.resolve(), None)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self._journal.close()
        self._delivered.close()
        self._lock_handle.close()


def undelivered(folder: Path) -> int:
    """How many journaled records MLflow has not confirmed, read without taking the journal."""
    def seqs(path: Path) -> set[int]:
        if not path.exists():
            return set()
        found = set()
        for line in path.read_text().splitlines():
            try:
                found.add(json.loads(line)["seq"])
            except (json.JSONDecodeError, KeyError):
                continue
        return found

    return len(seqs(folder / JOURNAL_FILE) - seqs(folder / DELIVERED_FILE))


OPEN_JOURNALS: dict[Path, Journal] = {}


def open_journal(folder: Path, tracking_uri: str, experiment_id: str, run_ids: dict[str, str]) -> Journal:
    """This process's one journal for a sweep folder: after `resume`, Tune calls a tracker it
    unpickled from its own state, while the driver holds the one it built; both must share it."""
    key = Path(folder).resolve()
    if key not in OPEN_JOURNALS:
        OPEN_JOURNALS[key] = Journal(key, tracking_uri, experiment_id, run_ids)
    return OPEN_JOURNALS[key]
