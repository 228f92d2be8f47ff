"""The MLflow journal against a real SQLite store: on disk before MLflow, delivered exactly once
across restarts, dead servers and replays."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from pyarrow.fs import LocalFileSystem

from orchestrator.experiment_state import LAST_COMPLETE, repair
from orchestrator.journal import DELIVERED_FILE, JOURNAL_FILE, Journal, undelivered
from orchestrator.messages import UserError
from orchestrator.mlflow_callback import SweepTracker
from orchestrator.report import tune_trial_states
from orchestrator.tracking import ensure_experiment
from orchestrator.trials import TrialTemplate
from sweep_helpers import sqlite_store

KEY = "sweep/trial_1"


def metrics(step: int) -> dict:
    return {"op": "metrics", "key": KEY, "step": step, "time": step, "metrics": {"score": step / 100, "loss": 1 / step}}


def create(parent: str) -> dict:
    return {"op": "create", "key": KEY, "parent": parent, "tags": {"distillsweep_key": KEY, "mlflow.parentRunId": parent}}


@pytest.fixture
def store(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "journal", uri)
    parent = client.create_run(experiment).info.run_id
    return uri, experiment, parent


def dead_server_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def steps_of(uri: str, run_id: str, name: str = "score") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, name))


def child_run(uri: str, experiment: str) -> str:
    runs = MlflowClient(uri).search_runs([experiment], filter_string=f"tags.distillsweep_key = '{KEY}'")
    assert len(runs) == 1, "exactly one run per trial"
    return runs[0].info.run_id


def test_records_are_on_disk_before_append_returns_and_a_replayed_step_is_not_journaled_twice(tmp_path, store):
    uri, experiment, parent = store
    journal = Journal(tmp_path / "sweep", uri, experiment, {"sweep": parent})
    assert journal.append(create(parent))
    assert journal.append(metrics(4)) and journal.append(metrics(8))
    assert not journal.append(metrics(8)), "a restored trial replaying step 8 must not journal it again"
    lines = [json.loads(line) for line in (tmp_path / "sweep" / JOURNAL_FILE).read_text().splitlines()]
    assert [(r["op"], r.get("step")) for r in lines] == [("create", None), ("metrics", 4), ("metrics", 8)]
    assert undelivered(tmp_path / "sweep") == 3, "nothing was sent yet"
    journal.close()


def test_a_driver_killed_after_sending_but_before_noting_resends_nothing_twice(tmp_path, store):
    uri, experiment, parent = store
    folder = tmp_path / "sweep"
    journal = Journal(folder, uri, experiment, {"sweep": parent})
    for record in (create(parent), metrics(4), metrics(8), metrics(12)):
        journal.append(record)
    assert journal.deliver_all().left == 0
    journal.close()
    # The kill: MLflow took steps 8 and 12, but the process died before noting them as delivered.
    delivered = (folder / DELIVERED_FILE).read_text().splitlines()
    (folder / DELIVERED_FILE).write_text("\n".join(delivered[:2]) + "\n")

    restarted = Journal(folder, uri, experiment, {"sweep": parent})
    assert restarted.pending == 2
    assert not restarted.append(metrics(12)), "the journal knows step 12 although MLflow's answer was never noted"
    restarted.append(metrics(16))
    result = restarted.deliver_all()
    restarted.close()
    assert (result.sent, result.left) == (3, 0)
    run_id = child_run(uri, experiment)
    assert steps_of(uri, run_id) == [4, 8, 12, 16] and steps_of(uri, run_id, "loss") == [4, 8, 12, 16]


def test_a_dead_server_never_blocks_append_and_the_records_reach_mlflow_once_it_answers(tmp_path, store):
    uri, experiment, parent = store
    folder = tmp_path / "sweep"
    dead = dead_server_uri()
    down = Journal(folder, dead, experiment, {"sweep": parent})
    down.start()
    for record in (create(parent), *(metrics(s) for s in (4, 8, 12))):
        down.append(record)
    down.append({"op": "tags", "key": "sweep", "tags": {"trials": 1}})
    down.append({"op": "end", "key": KEY, "status": "FINISHED"})
    down.append({"op": "end", "key": "sweep", "status": "FINISHED"})
    assert down.drain(3) == 7, "nothing can be delivered to a dead server"
    assert dead.removeprefix("http://") in down.last_error, "the message names the server that failed"
    down.close()

    # `distillsweep sync` once the server is back: same journal, reachable store.
    back = Journal(folder, uri, experiment, {"sweep": parent})
    result = back.deliver_all()
    back.close()
    assert result.left == 0 and result.dropped == []
    client = MlflowClient(uri)
    run_id = child_run(uri, experiment)
    assert steps_of(uri, run_id) == [4, 8, 12]
    assert client.get_run(run_id).info.status == "FINISHED"
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["trials"] == "1"
    assert undelivered(folder) == 0


def test_a_line_cut_by_a_kill_is_skipped_and_the_journal_goes_on(tmp_path, store):
    uri, experiment, parent = store
    folder = tmp_path / "sweep"
    journal = Journal(folder, uri, experiment, {"sweep": parent})
    journal.append(create(parent))
    journal.append(metrics(4))
    journal.close()
    with open(folder / JOURNAL_FILE, "a") as handle:
        handle.write('{"op": "metrics", "key": "sweep/tr')  # the driver died mid-write: append never returned

    reopened = Journal(folder, uri, experiment, {"sweep": parent})
    reopened.append(metrics(8))
    assert reopened.deliver_all().left == 0
    reopened.close()
    assert steps_of(uri, child_run(uri, experiment)) == [4, 8]


def test_only_one_process_delivers_a_journal(tmp_path, store):
    uri, experiment, parent = store
    journal = Journal(tmp_path / "sweep", uri, experiment, {"sweep": parent})
    with pytest.raises(UserError, match="another distillsweep process"):
        Journal(tmp_path / "sweep", uri, experiment, {"sweep": parent})
    journal.close()
    Journal(tmp_path / "sweep", uri, experiment, {"sweep": parent}).close()


def test_a_rejected_record_is_reported_and_skipped_instead_of_blocking_the_rest(tmp_path, store):
    uri, experiment, parent = store
    journal = Journal(tmp_path / "sweep", uri, experiment, {"sweep": parent, "sweep/gone": "0" * 32})
    journal.append({"op": "tags", "key": "sweep/gone", "tags": {"a": "b"}})
    journal.append({"op": "tags", "key": "sweep", "tags": {"after": "yes"}})
    result = journal.deliver_all(attempts=5)
    journal.close()
    assert result.left == 0 and len(result.dropped) == 1 and "sweep/gone" in result.dropped[0]
    assert MlflowClient(uri).get_run(parent).data.tags["after"] == "yes"


def test_status_reads_the_experiment_state_tune_would_resume_from(tmp_path):
    """After a resume Tune writes the old state file once more: the newer name, not the newer mtime, is current."""
    def state(status: str) -> str:
        return json.dumps({"trial_data": [[json.dumps({"trial_id": "t1", "status": status}), "{}"]]})

    newer = tmp_path / "experiment_state-2026-11-30_04-00-00.json"
    older = tmp_path / "experiment_state-2026-11-30_03-00-00.json"
    newer.write_text(state("RUNNING"))
    older.write_text(state("PAUSED"))
    os.utime(newer, (1_000_000, 1_000_000))  # the older name written last
    assert older.stat().st_mtime > newer.stat().st_mtime
    assert tune_trial_states(tmp_path) == {"t1": "RUNNING"}


def test_a_state_file_cut_by_a_kill_is_read_and_repaired_from_the_last_complete_snapshot(tmp_path):
    def state(status: str) -> str:
        return json.dumps({"trial_data": [[json.dumps({"trial_id": "t1", "status": status}), "{}"]]})

    current = tmp_path / "experiment_state-2026-11-30_04-00-00.json"
    current.write_text(state("RUNNING")[:30])
    with pytest.raises(UserError, match="cut short"):
        repair(tmp_path)

    (tmp_path / LAST_COMPLETE).write_text(state("PENDING"))
    assert tune_trial_states(tmp_path) == {"t1": "PENDING"}, "status reads the last complete snapshot"
    assert repair(tmp_path) and json.loads(current.read_text())["trial_data"]
    assert not repair(tmp_path), "a complete file is left alone"


def test_a_record_for_a_run_never_created_is_skipped_and_the_rest_delivered(tmp_path, store):
    """Found by the rehearsal: one such record held back every later one, the sweep's to the end."""
    uri, experiment, parent = store
    journal = Journal(tmp_path / "sweep", uri, experiment, {"sweep": parent})
    journal.append({"op": "tags", "key": "sweep/never", "tags": {"a": "b"}})
    journal.append({"op": "tags", "key": "sweep", "tags": {"after": "yes"}})
    result = journal.deliver_all(attempts=2)
    journal.close()
    assert result.left == 0 and len(result.dropped) == 1 and "sweep/never" in result.dropped[0]
    assert "no run created" in result.dropped[0]
    assert MlflowClient(uri).get_run(parent).data.tags["after"] == "yes"


def test_a_trial_that_fails_before_tune_starts_it_gets_a_failed_run_with_its_reason(tmp_path, store):
    """An actor that dies as it starts (its node lost) fails the trial with no start event."""
    uri, experiment, parent = store
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\nActorUnavailableError: the actor is unavailable\n")
    base = {"task": "demo", "teacher": "/teachers/tiny", "student": {"num_layers": 2, "init": "lower"},
            "objectives": [{"name": "kd"}], "training": {"max_steps": 12, "eval_steps": 4}}
    tracker = SweepTracker(uri, experiment, parent, "tiny", TrialTemplate(base), tmp_path / "sweep")
    (tmp_path / "trial").mkdir()
    trial = SimpleNamespace(trial_id="t0", config={}, last_result={}, error_file=str(error_file),
                            path=str(tmp_path / "trial"), storage=SimpleNamespace(storage_filesystem=LocalFileSystem()))
    tracker.on_trial_error(0, [trial], trial)
    journal = tracker.journal  # delivering in its background thread, as in a sweep's driver
    left = journal.drain(timeout_s=120)
    journal.close()
    assert left == 0 and not journal.dropped, journal.dropped
    runs = MlflowClient(uri).search_runs([experiment], filter_string="tags.ray_trial_id = 't0'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["mlflow.parentRunId"] == parent
    assert "the actor is unavailable" in runs[0].data.tags["trial_outcome_detail"]
    assert json.loads((tmp_path / "trial" / "outcome.json").read_text())["outcome"] == "failed"
