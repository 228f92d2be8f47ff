"""The launch recipes in cluster/: their files are well formed, their commands run.

The cluster launcher YAML is checked the way `ray up` checks it before touching a cloud, and its
sweep command is run against this checkout with `--dry-run`. The RayJob entrypoint goes through
the same two shells as on KubeRay. The SLURM script's dry run and the local multi-node recipe
start real Ray nodes on this machine (on their own ports and temp folders) and must leave no
process behind.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from services import POLL_S, LocalCluster, free_port, processes_mentioning, script_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
SBATCH = CLUSTER / "slurm" / "distillsweep.sbatch"
START = CLUSTER / "local" / "start-cluster.sh"
STOP = CLUSTER / "local" / "stop-cluster.sh"


def wait_until_gone(text: str, timeout: float = 20.0) -> list[str]:
    """The processes still mentioning `text` after they had `timeout` seconds to end (none: all ended)."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return left


def fake_command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


# --- Ray cluster launcher --------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_yaml_declares_head_and_autoscaling_gpu_workers(launcher):
    assert launcher["cluster_name"]
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker type offers GPUs"
    assert launcher["head_node_type"] not in gpu_types
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0 < node_type["max_workers"]
        assert node_type["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    assert launcher["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_launcher_yaml_installs_the_project_on_every_node(launcher):
    # setup_commands run on the head and on every worker; the checkout is copied there first.
    install = [c for c in launcher["setup_commands"] if "pip install" in c and "distillsweep" in c]
    assert install, launcher["setup_commands"]
    assert launcher["file_mounts"]["~/distillsweep"] == "."
    assert f"ray[default,tune]=={_ray_version()}" in install[0], "pin the cluster's Ray to the local one"
    assert _ray_version() in launcher["docker"]["image"]


def _ray_version() -> str:
    import ray

    return ray.__version__


def test_launcher_yaml_passes_ray_up_config_validation(launcher):
    """Ray's JSON schema, then what `ray up` does before contacting AWS (defaults + checks)."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert any("distillsweep" in c for c in prepared["worker_setup_commands"])
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])


def test_launcher_yaml_starts_every_node_with_token_auth(launcher):
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in launcher[command] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), command


def test_launcher_submit_command_runs_the_sweep_from_the_copied_checkout(launcher, tmp_path):
    """The documented `ray exec ... "..."` line: parameters expanded locally, run on the head."""
    submit = launcher["metadata"]["distillsweep"]["submit"]
    assert "distillsweep sweep" in submit and "--address auto" in submit
    assert "--set storage=$DISTILLSWEEP_STORAGE" in submit
    assert "--set tracking.uri=$MLFLOW_TRACKING_URI" in submit
    # A stand-in `ray exec CONFIG --tmux CMD` runs CMD in a login shell of a "head" whose home
    # holds the checkout at ~/distillsweep, adding --dry-run so nothing trains.
    home = tmp_path / "head-home"
    home.mkdir()
    (home / "distillsweep").symlink_to(ROOT)
    fakes = tmp_path / "bin"
    fakes.mkdir()
    fake_command(fakes, "ray", f"""
import os, subprocess, sys
assert sys.argv[1:3] == ["exec", "cluster/aws-gpu.yaml"], sys.argv
command = sys.argv[-1] + " --dry-run"
env = dict(os.environ, HOME={str(home)!r})
sys.exit(subprocess.run(["bash", "-c", command], env=env).returncode)
""")
    env = script_env(DISTILLSWEEP_STORAGE="s3://bucket/distillsweep", MLFLOW_TRACKING_URI="http://mlflow.internal:5000")
    env["PATH"] = f"{fakes}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-c", submit], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep paper_task_specific: 756 trials" in done.stdout
    assert "756 trial configs" in done.stdout


# --- KubeRay ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def head_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_rayjob_manifest_runs_a_sweep_and_deletes_its_cluster(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert "distillsweep sweep" in spec["entrypoint"]
    assert "--address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == _ray_version()


def test_rayjob_worker_group_requests_gpus(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = []
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)) > 0:
                gpu_groups.append(group)
                assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert gpu_groups
    assert all(g["maxReplicas"] >= 1 and g["minReplicas"] == 0 for g in gpu_groups)


def test_rayjob_head_holds_storage_mlflow_and_space_file(rayjob):
    head = head_container(rayjob)
    env = env_of(head)
    assert env["DISTILLSWEEP_STORAGE"].startswith(("s3://", "gs://", "/"))
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    space_dir = str(Path(env["DISTILLSWEEP_SPACE_FILE"]).parent)
    mounts = {m["mountPath"]: m["name"] for m in head["volumeMounts"]}
    volumes = {v["name"]: v for v in rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[space_dir]]["configMap"]["name"] == "distillsweep-space"
    # The teacher cache is on a volume every pod mounts.
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "/shared" in mounts and "/shared" in {m["mountPath"] for m in worker["volumeMounts"]}


def test_rayjob_entrypoint_expands_parameters_on_the_head_not_in_the_submitter(rayjob, tmp_path):
    """KubeRay's submitter runs `... ray job submit ... -- ENTRYPOINT` in its own shell (without
    the head's env); `ray job submit` re-quotes the words (shlex.join) and the head runs them
    through a shell again. The sweep must see the head's values."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    submitted = tmp_path / "submitted.txt"
    argv_file = tmp_path / "argv.json"
    fake_command(fakes, "ray", f"""
import shlex, sys
words = sys.argv[sys.argv.index("--") + 1:]
open({str(submitted)!r}, "w").write(shlex.join(words))
""")
    fake_command(fakes, "distillsweep", f"""
import json, sys
json.dump(sys.argv[1:], open({str(argv_file)!r}, "w"))
""")
    path = f"{fakes}{os.pathsep}{os.environ['PATH']}"
    submitter_env = {"PATH": path, "HOME": str(tmp_path)}
    submitter = (
        "if false; then :; else ray job submit --address http://head-svc:8265 --submission-id s1 -- "
        f"{rayjob['spec']['entrypoint']} ; fi"
    )
    subprocess.run(["bash", "-c", submitter], env=submitter_env, check=True, timeout=30)

    head_env = {"PATH": path, "HOME": str(tmp_path)} | {
        k: v for k, v in env_of(head_container(rayjob)).items() if v is not None
    }
    subprocess.run(submitted.read_text(), shell=True, env=head_env, check=True, timeout=30)
    argv = json.loads(argv_file.read_text())
    assert argv == [
        "sweep", head_env["DISTILLSWEEP_SPACE_FILE"], "--address", "auto",
        "--set", f"storage={head_env['DISTILLSWEEP_STORAGE']}",
        "--set", f"tracking.uri={head_env['MLFLOW_TRACKING_URI']}",
        "--set", "state_dir=/shared/distillsweep/state",
    ]


# --- scripts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch")]), ids=lambda p: p.name
)
def test_scripts_parse_as_bash_and_are_executable(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()


def test_sbatch_outside_slurm_refuses_without_dry_run(tmp_path):
    env = script_env(SPACE_FILE="search_spaces/quickstart.yaml")
    for name in ("SLURM_JOB_NODELIST", "DISTILLSWEEP_SLURM_DRY_RUN"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(SBATCH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "DISTILLSWEEP_SLURM_DRY_RUN=1" in done.stdout


@pytest.mark.slow
def test_sbatch_dry_run_starts_ray_validates_the_sweep_and_stops():
    temp_root = tempfile.mkdtemp(prefix="dssl", dir="/tmp")  # Ray's socket paths must stay short
    temp_dir = f"{temp_root}/ray"  # made by the script, so the script removes it afterwards
    env = script_env(
        DISTILLSWEEP_SLURM_DRY_RUN="1", SPACE_FILE=str(ROOT / "search_spaces" / "quickstart.yaml"),
        RAY_PORT=str(free_port()), RAY_TEMP_DIR=temp_dir, COLUMNS="120",
    )
    try:
        done = subprocess.run(
            ["bash", str(SBATCH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        assert "Ray runtime started" in out
        assert "Ray head started (1/1 nodes active at 127.0.0.1:" in out
        assert "sweep quickstart: 6 trials" in out
        assert "6 trial configs checked" in out
        assert "Ray stopped" in out
        assert not Path(temp_dir).exists(), "the dry run leaves its Ray temp folder behind"
        assert wait_until_gone(temp_dir) == []
    finally:
        leftovers = processes_mentioning(temp_dir)
        for line in leftovers:
            os.kill(int(line.split(":")[0]), 9)
        shutil.rmtree(temp_root, ignore_errors=True)
        assert leftovers == [], leftovers


# --- local multi-node recipe -----------------------------------------------------------------


@pytest.fixture
def local_cluster():
    """Head + 1 worker on a free port and a private temp folder; always stopped afterwards."""
    cluster = LocalCluster.start(head_cpus=1, workers=1, cpus_per_worker=1)
    try:
        yield cluster.env, cluster.started
    finally:
        assert cluster.stop() == [], "processes of the cluster outlived stop-cluster.sh"


@pytest.mark.slow
def test_local_recipe_starts_head_and_worker_as_two_ray_nodes(local_cluster):
    env, started = local_cluster
    assert started.returncode == 0, started.stderr[-4000:]
    assert processes_mentioning(env["RAY_TEMP_DIR"]), "no Ray daemon names the temp folder: the leak check would see nothing"
    address = f"127.0.0.1:{env['RAY_PORT']}"
    assert started.stdout.strip() == f"export RAY_ADDRESS={address} RAY_AUTH_MODE=token"
    assert "2 nodes active" in started.stderr

    status = subprocess.run(
        ["ray", "status", "--address", address], env=env | {"RAY_AUTH_MODE": "token"},
        capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    active = status.stdout.split("Active:")[1].split("Pending:")[0]
    assert active.count("node_") == 2, status.stdout

    # What the printed line exports is all a driver (distillsweep's ray.init) needs.
    exported = dict(word.split("=", 1) for word in shlex.split(started.stdout)[1:])
    probe = subprocess.run(
        [sys.executable, "-c",
         "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources()['CPU'])"],
        env=env | exported, capture_output=True, text=True, timeout=90,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split()[-2:] == ["2", "2.0"]


def test_local_start_refuses_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(START)], env=script_env(RAY_PORT=str(port), RAY_TEMP_DIR=str(tmp_path / "ray")),
            capture_output=True, text=True, timeout=30,
        )
    assert done.returncode == 1
    assert f"port {port} is in use" in done.stderr
    assert done.stdout == ""


def test_local_stop_without_a_cluster_is_a_no_op(tmp_path):
    done = subprocess.run(
        [str(STOP)], env=script_env(RAY_PORT="1", RAY_TEMP_DIR=str(tmp_path / "none")),
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0
    assert "nothing to stop" in done.stderr
