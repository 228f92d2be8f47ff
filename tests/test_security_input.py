"""Hostile and odd input is refused cheaply, as one message naming the problem (issue 22, part 5).

YAML alias bombs, oversized, deeply nested or non-UTF-8 files, huge values, Rich markup in trial
data, Latin-1 CSV files and task names that would climb out of the teacher cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_sweep_spec
from orchestrator.spaces import Distribution
from orchestrator.trials import MAX_LABEL_CHARS, labelled_choices
from sweep_helpers import distillsweep, sqlite_store
from trainables.config import MAX_YAML_BYTES, MAX_YAML_DEPTH, load_yaml

runner = CliRunner()
MARKUP = "ValueError: label [/]weird in [link=https://evil.example]sst2[/link]"


def alias_bomb(levels: int = 6) -> str:
    """A space file whose one grid value nests `levels` lists of ten aliases (*a ... *f): 10**levels seeds."""
    rows = ["- &a [1,1,1,1,1,1,1,1,1,1]"]
    rows += [f"- &{name} [" + ",".join([f"*{inner}"] * 10) + "]" for inner, name in zip("abcde", "bcdef"[:levels - 1])]
    return ("name: bomb\nbase: {task: demo, teacher: t}\nspace:\n  training.seed:\n    grid:\n    - "
            + "\n      ".join(rows) + "\n")


def space(teacher: str, **base: object) -> dict:
    return {"name": "odd", "base": {"task": "demo", "teacher": teacher, "student": {"num_layers": 2}, **base},
            "space": {"training.seed": {"grid": [1]}}}


def dry_run(tmp_path: Path, spec: dict | str, *extra: str) -> tuple[int, str]:
    path = tmp_path / "space.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run", *extra])
    return result.exit_code, result.output


def local_task(tmp_path: Path, train: bytes, name: str = "tweets") -> dict:
    (tmp_path / "train.csv").write_bytes(train)
    (tmp_path / "validation.csv").write_bytes(b"text,label\na,0\nb,1\n")
    return {"name": name, "train_file": str(tmp_path / "train.csv"),
            "validation_file": str(tmp_path / "validation.csv")}


def test_329_byte_alias_bomb_is_refused_through_the_cli_in_seconds(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size <= 329
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"bomb.yaml:10:\d+: aliases copy more than 100000 values"):
        load_sweep_spec(path)
    assert time.monotonic() - started < 1.0

    started = time.monotonic()
    done = distillsweep(["sweep", str(path), "--dry-run"], tmp_path, tmp_path, timeout=300)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "aliases copy more than 100000 values" in " ".join(output.split()) and f"{path}:10:" in output
    assert len(output) < 2000, "the aliases were expanded into the message"
    assert elapsed < 60, "a generous bound: most of it is the CLI's imports on a loaded machine"


def test_alias_bomb_in_a_set_value_is_refused(tmp_path, teacher_dir):
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1]" + "".join(
        f", &{name} [" + ",".join([f"*{inner}"] * 10) + "]" for inner, name in zip("abcde", "bcdef")) + "]"
    code, out = dry_run(tmp_path, space(teacher_dir), "--set", f"space.training.seed={{grid: {bomb}}}")
    assert code == 2, out[:3000]
    assert "aliases copy more than 100000 values" in " ".join(out.split()) and len(out) < 2000


def test_anchors_for_shared_defaults_and_pyyamls_own_dumps_still_load(tmp_path, teacher_dir):
    """Refusing every alias would refuse `<<: *defaults` and any file PyYAML wrote from shared lists."""
    path = tmp_path / "space.yaml"
    path.write_text(f"name: anchors\nbase:\n  task: demo\n  teacher: {teacher_dir}\n  student: {{num_layers: 2}}\n"
                    "  training: {learning_rate: &lr 1.0e-4}\nspace:\n  training.learning_rate: {grid: [*lr, 2.0e-4]}\n")
    assert load_sweep_spec(path).space["training.learning_rate"].grid == [1e-4, 2e-4]
    shared = [1, 2]
    assert load_yaml(yaml.safe_dump({"a": shared, "b": shared})) == {"a": [1, 2], "b": [1, 2]}
    assert load_yaml("base: &b {lr: 1, seed: 2}\nrun:\n  <<: *b\n  seed: 3\n")["run"] == {"lr": 1, "seed": 3}


def test_recursive_alias_is_refused(tmp_path):
    with pytest.raises(yaml.YAMLError, match="refers to the value that holds it"):
        load_yaml("a: &a [1, *a]")


def test_space_file_over_the_size_limit_is_refused_unparsed(tmp_path, teacher_dir):
    text = yaml.safe_dump(space(teacher_dir))
    code, out = dry_run(tmp_path, text + "#" * (MAX_YAML_BYTES - len(text) + 1))
    assert code == 2, out
    assert "larger than 1024 KiB, refused unparsed" in " ".join(out.split())


def test_deeply_nested_space_file_is_refused_not_a_recursion_traceback(tmp_path):
    code, out = dry_run(tmp_path, "name: deep\nbase: " + "[" * 5000 + "]" * 5000 + "\n")
    assert code == 2, out
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in out and "Traceback" not in out


def test_space_file_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "space.yaml").write_bytes("name: odd\nbase: {task: caf\u00e9}\n".encode("latin-1"))
    result = runner.invoke(app, ["sweep", str(tmp_path / "space.yaml"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'space.yaml'}:2: not UTF-8 text (byte 0xe9)" in " ".join(result.output.split())


def test_huge_value_in_a_space_file_gives_a_bounded_error(tmp_path, teacher_dir):
    spec = space(teacher_dir)
    spec["space"] = {"training.seed": {"grid": [[0] * 100_000]}}
    code, out = dry_run(tmp_path, spec)
    assert code == 2, out[:3000]
    assert "training.seed=[0, 0, 0, 0, 0, 0, 0, 0, ...] is invalid" in " ".join(out.split())
    assert len(out) < 2000


def test_huge_value_in_a_space_file_gives_a_bounded_dry_run_table(tmp_path, teacher_dir):
    spec = space(teacher_dir)
    spec["space"]["cache_dir"] = "/tmp/" + "a " * 100_000
    code, out = dry_run(tmp_path, spec)
    assert code == 0, out[:3000]
    assert "cache_dir" in out and len(out) < 3000


def test_huge_choices_get_short_optuna_labels_that_stay_distinct():
    mixes = [["kd"] * 500 + ["att_kl"], ["kd"] * 500 + ["hidden_mse"]]
    labelled = labelled_choices({"objectives.mix": Distribution(choice=mixes)})["objectives.mix"]
    assert len(labelled) == 2 and all(len(label) <= MAX_LABEL_CHARS for label in labelled)
    assert sorted(labelled.values()) == sorted(mixes)


def sweep_folder(tmp_path: Path) -> Path:
    """A sweep's folder as `sweep` leaves it: its state file, Tune's experiment state, one completed
    trial and one that failed with an error quoting Rich markup from its data."""
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("odd")
    parent = client.create_run(experiment_id).info.run_id
    folder = tmp_path / "sweeps" / "odd"
    base = {"task": "demo", "teacher": "t", "student": {"num_layers": 2}}
    spec = {"name": "odd", "base": base, "space": {"training.seed": {"grid": [1, 2]}},
            "storage": str(tmp_path / "sweeps"), "tracking": {"uri": uri}}
    trials = {"a0001": ("TERMINATED", 1, 10), "b0002": ("ERROR", 2, 5)}
    for trial_id, (status, seed, step) in trials.items():
        trial_dir = folder / f"train_{trial_id}_{seed}"
        trial_dir.mkdir(parents=True)
        (trial_dir / "params.json").write_text(json.dumps({"training.seed": seed}))
        row = {"trial_id": trial_id, "step": step, "total_steps": 10, "score": 0.5 + step / 100}
        (trial_dir / "result.json").write_text(json.dumps(row) + "\n")
    (folder / "train_b0002_2" / "error.txt").write_text(f"Traceback (most recent call last):\n{MARKUP}\n")
    trial_data = [[json.dumps({"trial_id": t, "status": s}), "{}"] for t, (s, _, _) in trials.items()]
    (folder / "experiment_state-2026-12-04_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    (folder / "distillsweep.json").write_text(json.dumps({
        "spec": spec, "sweep_dir": str(folder), "tracking_uri": uri, "experiment_id": experiment_id,
        "parent_run_id": parent, "teachers": {}, "base": base}))
    return folder


def test_trial_error_with_rich_markup_prints_literally_in_status_and_report(tmp_path):
    folder = sweep_folder(tmp_path)
    for command in ("status", "report"):
        result = runner.invoke(app, [command, str(folder)], env={"COLUMNS": "400"})
        assert result.exit_code == 0, (command, result.output, result.exception)
        assert "[/]weird in [link=https://evil.example]sst2[/link]" in result.output, command
        assert "\x1b]8;" not in result.output, "no terminal hyperlink was planted"


def test_latin1_csv_local_task_is_one_line_naming_the_file(tmp_path, teacher_dir):
    task = local_task(tmp_path, "text,label\ncaf\u00e9 ol\u00e9,0\nb,1\n".encode("latin-1"))
    code, out = dry_run(tmp_path, space(teacher_dir, task=task))
    flat = " ".join(out.split())
    assert code == 2, out[-3000:]
    assert f"data file {task['train_file']}: not UTF-8 (byte 0xe9 on line 2" in flat
    assert "re-save it as UTF-8" in flat
    assert "Traceback" not in out and len(out.strip().splitlines()) <= 6


def test_utf8_csv_with_a_byte_order_mark_still_validates(tmp_path, teacher_dir):
    task = local_task(tmp_path, "\ufefftext,label\ncaf\u00e9,0\nb,1\n".encode())
    code, out = dry_run(tmp_path, space(teacher_dir, task=task))
    assert code == 0, out


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", ".hidden", "[/]weird"])
def test_local_task_name_that_would_leave_the_teacher_cache_is_refused(tmp_path, teacher_dir, name):
    code, out = dry_run(tmp_path, space(teacher_dir, task=local_task(tmp_path, b"text,label\na,0\nb,1\n", name)))
    assert code == 2, out
    assert f"task.name {name!r}: a task name becomes part of folder names" in " ".join(out.split())


def test_cli_tracebacks_never_show_local_variables():
    assert app.pretty_exceptions_show_locals is False
