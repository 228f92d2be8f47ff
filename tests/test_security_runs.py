"""A run's own files on a shared cluster: checkpoints load no pickles, trials get private scratch,
`run` writes and deletes only its own folders, and teachers in a shared cache survive each other.

Each test is named for the attack it stops (issue 22: H2, M3, M6, L2, L3).
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification
from typer.testing import CliRunner

from conftest import tiny_bert_config
from orchestrator.cli import app
from orchestrator.single_run import claim_output_dir
from services import wait_for
from sweep_helpers import cli_env
from trainables.config import LocalTask, RunConfig, load_run_config
from trainables.demo import demo_teacher_base
from trainables.run import distill
from trainables.tasks import demo_task_spec
from trainables.teacher import TeacherRequest, teacher_dir
from trainables.tune_trainable import SCRATCH_NOTE, trial_scratch
from trainables.training import CHECKPOINT_PROGRESS, CHECKPOINT_STATE, Progress, rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TRAINING = {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_seq_length": 32,
            "max_train_samples": 64, "max_eval_samples": 32, "mixed_precision": "no"}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    """An untrained 2-layer BERT with the demo's real tokenizer: all a run needs to build and load."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-teacher")
    config = tiny_bert_config(layers=2, hidden=32, heads=4)
    config.vocab_size, config.max_position_embeddings = 30522, 64
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_teacher_base()).save_pretrained(path)
    return str(path)


def run_fields(teacher: str, cache: Path, out: Path | None, **training: int) -> dict:
    fields = {"task": "demo", "teacher": teacher, "student": {"num_layers": 1, "init": "lower"},
              "cache_dir": str(cache), "training": {**TRAINING, **training}}
    return fields if out is None else {**fields, "output_dir": str(out)}


def write_run_config(path: Path, fields: dict) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


class Crash(Exception):
    pass


def crash_at(step: int, saved: list[Path]):
    def reporter(metrics: dict, checkpoint: Path | None) -> None:
        saved.append(checkpoint)
        if metrics["step"] == step:
            raise Crash

    return reporter


def one_line_error(output: str) -> str:
    """The CLI's message with Rich's line folding undone (it folds a long path anywhere)."""
    assert "Traceback" not in output, output
    return " ".join(output.split())


def names(message: str, path: Path) -> bool:
    return "".join(str(path).split()) in "".join(message.split())


# --- H2: nothing pickled is loaded ----------------------------------------------------------------


class RunsCode:
    """Unpickling this calls `open(marker, "w")`: code named by the file, run by whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_whose_pickle_would_run_code_is_refused(tiny_teacher, demo_cache, tmp_path):
    handed_over = tmp_path / "handed-over" / "checkpoints" / "step-0000002"
    handed_over.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (handed_over / CHECKPOINT_PROGRESS).write_text(json.dumps(asdict(Progress(global_step=2, stage_step=2))))
    torch.save({"distiller": RunsCode(marker), "optimizer": {}, "scheduler": {}, "rng": {}},
               handed_over / CHECKPOINT_STATE)
    config = write_run_config(tmp_path / "run.yaml", run_fields(tiny_teacher, demo_cache, tmp_path / "run", max_steps=4))

    result = runner.invoke(app, ["run", str(config), "--resume", str(handed_over)])

    assert not marker.exists(), "loading the checkpoint ran the code its pickle names"
    assert result.exit_code == 2, result.output
    message = one_line_error(result.output)
    assert names(message, handed_over / CHECKPOINT_STATE)
    assert "older distillsweep" in message and "not a distillsweep checkpoint" in message
    assert "start the run again without resuming" in message


def test_checkpoint_in_the_old_pickled_format_gets_a_clear_message(tiny_teacher, demo_cache, tmp_path):
    saved: list[Path] = []
    cfg = RunConfig.model_validate(run_fields(tiny_teacher, demo_cache, tmp_path / "old", max_steps=4, eval_steps=2))
    with pytest.raises(Crash):
        distill(cfg, crash_at(2, saved))
    state = torch.load(saved[-1] / CHECKPOINT_STATE, weights_only=True)
    # As distillsweep saved it before issue 22: numpy's state is a tuple holding an ndarray.
    state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(state, saved[-1] / CHECKPOINT_STATE)
    config = write_run_config(tmp_path / "run.yaml", run_fields(tiny_teacher, demo_cache, tmp_path / "old", max_steps=4))

    result = runner.invoke(app, ["run", str(config), "--resume", str(saved[-1])])

    assert result.exit_code == 2, result.output
    message = one_line_error(result.output)
    assert names(message, saved[-1] / CHECKPOINT_STATE) and "older distillsweep" in message


def test_rng_states_travel_through_a_weights_only_checkpoint_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)

    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))

    drawn = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert drawn[:3] == expected[:3] and torch.equal(drawn[3], expected[3])


def test_resume_from_a_weights_only_checkpoint_ends_where_the_uninterrupted_run_ends(tiny_teacher, demo_cache, tmp_path):
    fields = {"max_steps": 4, "eval_steps": 2}
    uninterrupted = distill(RunConfig.model_validate(run_fields(tiny_teacher, demo_cache, tmp_path / "a", **fields)))
    interrupted = RunConfig.model_validate(run_fields(tiny_teacher, demo_cache, tmp_path / "b", **fields))
    saved: list[Path] = []
    with pytest.raises(Crash):
        distill(interrupted, crash_at(2, saved))
    assert torch.load(saved[-1] / CHECKPOINT_STATE, weights_only=True)["rng"]["numpy"]["keys"].shape == (624,)

    resumed = distill(interrupted, resume_from=saved[-1])

    for key in ("score", "eval_loss", "train_loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-7), key


# --- M6: pruning and output folders ---------------------------------------------------------------


def test_checkpoint_pruning_leaves_a_users_folders_in_checkpoints(tiny_teacher, demo_cache, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    theirs = ["my-model-v1", "my-model-v2", "zz-notes", "step-0000001"]  # the last: another run's
    for name in theirs:
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "weights.bin").write_bytes(b"precious")

    distill(RunConfig.model_validate(run_fields(tiny_teacher, demo_cache, tmp_path / "run", max_steps=6, eval_steps=2)))

    left = sorted(p.name for p in checkpoints.iterdir())
    assert left == sorted([*theirs, "step-0000004", "step-0000006"]), left
    assert all((checkpoints / name / "weights.bin").read_bytes() == b"precious" for name in theirs)


def test_run_refuses_a_non_empty_output_dir_without_resume_or_overwrite(demo_cache, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    config = write_run_config(tmp_path / "run.yaml", run_fields("some/teacher", demo_cache, folder, max_steps=2))

    result = runner.invoke(app, ["run", str(config)])

    assert result.exit_code == 2, result.output
    message = one_line_error(result.output)
    assert names(message, folder) and "--resume" in message and "--overwrite" in message
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    cfg = load_run_config(config)
    assert claim_output_dir(cfg, None, overwrite=True) == cfg, "--overwrite lets the run write there"


def test_two_runs_without_output_dir_get_folders_of_their_own(demo_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.model_validate(run_fields("some/teacher", demo_cache, None))

    first, second = (claim_output_dir(cfg, None, overwrite=False).output_dir for _ in range(2))

    assert first != second and first.parent == second.parent == Path("runs")
    for folder in (first, second):
        assert folder.is_dir() and not any(folder.iterdir()) and cfg.objective_mix in folder.name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    resumed = claim_output_dir(cfg, first / "checkpoints" / "step-0000002", overwrite=False)
    assert resumed.output_dir == first, "resuming continues in the checkpoint's own run folder"


# --- M3: private trial scratch --------------------------------------------------------------------


def test_two_users_trial_scratch_folders_never_collide_and_are_private(tmp_path, monkeypatch):
    """Two users' trials of the same name on one node (the old fixed /tmp path made the second fail)
    each get a folder only they enter."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    trial_dirs = [tmp_path / user / "trial_00000" for user in ("alice", "bob")]
    for trial_dir in trial_dirs:
        trial_dir.mkdir(parents=True)
    folders = [trial_scratch(trial_dir) for trial_dir in trial_dirs]

    assert folders[0] != folders[1]
    for folder in folders:
        assert folder.parent == tmp_path and folder.name.startswith("distillsweep-trial_00000-")
        info = folder.lstat()
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)


def test_a_killed_attempts_scratch_is_removed_by_the_next_attempt_and_a_forged_note_removes_nothing(
    tmp_path, monkeypatch
):
    """A SIGKILLed attempt cannot clean up: its checkpoints would fill the node's /tmp. The next attempt
    removes them, but only a folder this code made for this trial: the note is data in shared storage."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    trial_dir = tmp_path / "sweep" / "trial_00000"
    trial_dir.mkdir(parents=True)
    killed = trial_scratch(trial_dir)
    (killed / "run" / "checkpoints").mkdir(parents=True)
    (killed / "run" / "checkpoints" / "weights.pt").write_bytes(b"0" * 1000)

    retried = trial_scratch(trial_dir)
    assert not killed.exists() and retried.is_dir() and retried != killed

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "id_rsa").write_text("key")
    lookalike = tmp_path / "distillsweep-other_trial-x"
    lookalike.mkdir()
    for forged in (victim, lookalike, tmp_path / "distillsweep-trial_00000-x" / ".." / "victim"):
        (trial_dir / SCRATCH_NOTE).write_text(str(forged))
        trial_scratch(trial_dir)
    assert (victim / "id_rsa").read_text() == "key" and lookalike.is_dir()


# --- L2, L3: the teacher cache --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/absolute"], ids=["dot-dot", "absolute"])
def test_task_name_that_is_a_path_stays_in_the_teacher_cache(tmp_path, name):
    demo = demo_task_spec()
    # Built without validation: the cache must hold even for a name that got past the config's checks.
    task = LocalTask.model_construct(name=name, train_file=demo.train_file, validation_file=demo.validation_file,
                                     text_columns=("text",), label_column="label", num_labels=None)
    root = tmp_path / "teachers"
    request = TeacherRequest(base_model="tiny", task=task, output_root=root)

    path = teacher_dir(request, "tiny")

    assert path.parent == root.resolve() and path.resolve().is_relative_to(root.resolve())


FINE_TUNE = """
import json, os, sys, time
from pathlib import Path
from trainables.config import TrainingConfig
from trainables.model_source import resolve_model_source
from trainables.teacher import TeacherRequest, finetune_teacher, teacher_dir

role, base, root, cache, sync = sys.argv[1:]
sync = Path(sync)
training = TrainingConfig(**json.loads(os.environ["TEACHER_TRAINING"]))
request = TeacherRequest(base_model=base, task="demo", training=training, output_root=root, cache_dir=cache)
final = teacher_dir(request, resolve_model_source(base))
lock = final.with_name(final.name + ".lock")


def another_waits_on_the_lock() -> bool:
    # /proc/locks lists a process blocked in flock on the file as a line with '->' and the file's inode.
    inode = f":{lock.stat().st_ino} " if lock.exists() else None
    return inode is not None and any("->" in line and inode in line for line in open("/proc/locks"))


def on_step(step, total):
    if role == "first" and step == 1:
        (sync / "first-training").touch()
        deadline = time.monotonic() + 240
        while not another_waits_on_the_lock():
            if time.monotonic() > deadline:
                sys.exit("the second fine-tuning of the same teacher never waited for the first one's lock")
            time.sleep(0.05)


path, reused = finetune_teacher(request, on_step=on_step)
print(json.dumps({"path": str(path), "reused": reused}))
"""


@pytest.mark.slow  # two processes each fine-tune a teacher
def test_two_concurrent_fine_tunings_of_one_teacher_both_end_with_it_and_delete_nothing(tiny_teacher, demo_cache, tmp_path):
    """The second request comes while the first trains (the first waits until the second is at the lock)."""
    if not Path("/proc/locks").exists():
        pytest.skip("needs Linux /proc/locks to see the second process wait; run on Linux")
    root, sync = tmp_path / "teachers", tmp_path / "sync"
    sync.mkdir()
    env = {**cli_env(demo_cache), "TEACHER_TRAINING": json.dumps({**TRAINING, "max_steps": 4, "eval_steps": 2})}

    def start(role: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", FINE_TUNE, role, tiny_teacher, str(root), str(demo_cache), str(sync)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    processes = [start("first")]
    try:
        wait_for(lambda: (sync / "first-training").exists() or processes[0].poll() is not None,
                 "the first fine-tuning to start training")
        processes.append(start("second"))
        done = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
            p.wait()
    assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in done]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in done)

    assert (first["reused"], second["reused"]) == (False, True) and first["path"] == second["path"]
    teacher = Path(first["path"])
    assert (teacher / "teacher.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(teacher).config.num_hidden_layers == 2
    assert sorted(p.name for p in root.iterdir()) == sorted([teacher.name, teacher.name + ".lock"]), "work folders left"
