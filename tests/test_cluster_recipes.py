"""The launch recipes in cluster/: their files are well formed, their commands run.

The cluster launcher YAML is checked the way `ray up` checks it before touching a cloud, and its
sweep command is run against this checkout with `--dry-run`. The RayJob entrypoint goes through
the same two shells as on KubeRay. The SLURM script's dry run and the local multi-node recipe
start real Ray nodes on this machine (on their own ports and temp folders) and must leave no
process behind. Each recipe is also checked to be closed by default: token auth everywhere, no
port open beyond the cluster, private temp folders, arguments and passwords that stay data.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shlex
import shutil
import socket
import stat
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
HEAD_POLICY = CLUSTER / "aws-head-policy.json"
# A password with every character a shell acts on: it must reach distillsweep as it is.
NASTY_PASSWORD = "p&ss;w`touch OWNED1`$(touch OWNED2)|x"


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
    assert '"storage=$DISTILLSWEEP_STORAGE"' in submit
    assert '"tracking.uri=$MLFLOW_TRACKING_URI"' in submit
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


def test_launcher_names_its_own_security_group_with_no_ssh_from_anywhere(launcher):
    group = launcher["provider"]["security_group"]
    assert group["GroupName"] == launcher["cluster_name"]
    ssh = [p for p in group["IpPermissions"] if p["FromPort"] <= 22 <= p["ToPort"]]
    assert ssh, "no SSH rule: Ray would add its own, open to 0.0.0.0/0"
    for rule in group["IpPermissions"]:
        for cidr in (r["CidrIp"] for r in rule.get("IpRanges", [])):
            assert cidr != "0.0.0.0/0"
            # The placeholder must be filled in: AWS refuses a CIDR that is not one.
            with pytest.raises(ValueError):
                ipaddress.ip_network(cidr)
    assert "EDIT" in ssh[0]["IpRanges"][0]["CidrIp"]


def test_launcher_head_has_a_scoped_instance_profile_not_ray_full_access(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/distillsweep-head")
    policy = json.loads(HEAD_POLICY.read_text())
    actions = {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert not {"*", "ec2:*", "s3:*", "iam:*"} & actions
    for statement in policy["Statement"]:
        acts = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        if "iam:PassRole" in acts:
            assert statement["Resource"].endswith(":role/distillsweep-worker")
        if any(a.startswith("s3:") for a in acts):
            assert statement["Resource"] in ("arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*")
        if "ec2:TerminateInstances" in acts:
            assert statement["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == launcher["cluster_name"]
    worker_role = launcher["available_node_types"]["gpu_1x_a10g"]["node_config"]["IamInstanceProfile"]["Arn"]
    assert worker_role.endswith("/distillsweep-worker")


def test_launcher_dashboard_listens_on_loopback_and_shared_is_not_world_writable(launcher):
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    init = " ".join(launcher["initialization_commands"])
    assert "1777" not in init and "777" not in init
    assert "chmod 0755 /shared" in init and "chown 1000:100 /shared" in init


@pytest.mark.parametrize("command", ["submit", "submit_job"])
def test_launcher_commands_keep_a_password_with_shell_characters_out_of_the_heads_shell(launcher, tmp_path, command):
    """`&`, `;`, `$(...)` or a backtick in the tracking URI's password stay in the password: the
    head's shell (a stand-in `ray exec` / `ray job submit` running it with bash) runs nothing."""
    line = launcher["metadata"]["distillsweep"][command]
    head = tmp_path / "head-home"
    (head / "distillsweep").mkdir(parents=True)
    fakes = tmp_path / "bin"
    fakes.mkdir()
    argv_file = tmp_path / "argv.json"
    fake_command(fakes, "distillsweep", f"""
import json, sys
json.dump(sys.argv[1:], open({str(argv_file)!r}, "w"))
""")
    # `ray exec CONFIG --tmux CMD` runs CMD on the head; `ray job submit ... -- WORDS` re-quotes the
    # words (shlex.join) and the head runs them through a shell: both end in bash on the head.
    fake_command(fakes, "ray", f"""
import os, shlex, subprocess, sys
words = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else ["bash", "-c", sys.argv[-1]]
env = dict(os.environ, HOME={str(head)!r})
sys.exit(subprocess.run(shlex.join(words), shell=True, env=env, cwd={str(head)!r}).returncode)
""")
    uri = f"http://user:{NASTY_PASSWORD}@mlflow.internal:5000"
    env = script_env(DISTILLSWEEP_STORAGE="s3://bucket/a b", MLFLOW_TRACKING_URI=uri)
    env["PATH"] = f"{fakes}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = json.loads(argv_file.read_text())
    assert argv[-4:] == ["--set", "storage=s3://bucket/a b", "--set", f"tracking.uri={uri}"]
    assert not [p for p in tmp_path.rglob("OWNED*")], "the password ran as a command"


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


@pytest.fixture(scope="module")
def network_policy() -> dict:
    policies = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d.get("kind") == "NetworkPolicy"]
    assert len(policies) == 1, "the RayJob recipe ships no NetworkPolicy: every pod could reach Ray"
    return policies[0]


def pod_labels(template: dict) -> dict[str, str]:
    return template.get("metadata", {}).get("labels", {})


def test_rayjob_turns_token_auth_on_for_head_workers_and_submitter(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    major, minor = (int(part) for part in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token auth needs Ray 2.52+"


def test_rayjob_network_policy_admits_only_the_clusters_pods_and_the_submitter(rayjob, network_policy):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_labels = pod_labels(cluster["headGroupSpec"]["template"])
    selected = network_policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= head_labels.items(), "the policy does not select the head"
    for group in cluster["workerGroupSpecs"]:
        assert selected.items() <= pod_labels(group["template"]).items(), group["groupName"]
    assert network_policy["spec"]["policyTypes"] == ["Ingress"]
    submitter = pod_labels(rayjob["spec"]["submitterPodTemplate"])
    for rule in network_policy["spec"]["ingress"]:
        sources = rule["from"]
        assert sources, "a rule without `from` admits everyone"
        for source in sources:
            assert "ipBlock" not in source
            labels = source["podSelector"]["matchLabels"]
            if "namespaceSelector" in source:  # the KubeRay operator, following the job
                assert labels == {"app.kubernetes.io/name": "kuberay-operator"}
                assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
            elif labels.items() <= submitter.items():
                assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
            else:
                assert labels == selected, labels


def test_rayjob_declares_no_ray_client_port_and_keeps_the_head_service_internal(rayjob):
    head_group = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    ports = {p["containerPort"] for p in head_container(rayjob)["ports"]}
    assert 10001 not in ports and ports == {6379, 8265}
    assert head_group.get("serviceType", "ClusterIP") == "ClusterIP"


# --- scripts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch")]), ids=lambda p: p.name
)
def test_scripts_parse_as_bash_and_are_executable(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if script.read_text().startswith("#!"):  # the others are sourced by the scripts
        assert os.access(script, os.X_OK)
        assert "set -euo pipefail" in script.read_text()


def test_every_recipe_starts_ray_with_token_auth(launcher, rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    for command in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("RAY_AUTH_MODE=token" in c for c in launcher[command] if "ray start" in c)
    for script in (START, SBATCH):
        assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in script.read_text(), script.name


def run_with_stand_ins(script: Path, tmp_path: Path, args: list[str] = (), **env: str) -> subprocess.CompletedProcess:
    """Run a cluster script with stand-ins for `ray` (a node that blocks until stopped, a status
    that lists every node) and `distillsweep` (records its arguments in argv.json)."""
    fakes = tmp_path / "bin"
    fakes.mkdir(exist_ok=True)
    fake_command(fakes, "ray", """
import signal, sys
if sys.argv[1] == "start":
    signal.pause()
elif sys.argv[1] == "status":
    print("Active:\\n 1 node_stand_in\\nPending:\\n (no pending nodes)")
""")
    fake_command(fakes, "distillsweep", f"""
import json, sys
json.dump(sys.argv[1:], open({str(tmp_path / "argv.json")!r}, "w"))
""")
    full_env = script_env(SPACE_FILE=str(ROOT / "search_spaces" / "quickstart.yaml"), RAY_AUTH_TOKEN="t" * 32, **env)
    full_env["PATH"] = f"{fakes}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=60)


def kill_processes_mentioning(text: str) -> list[str]:
    """Kill what a script left running (stand-in nodes name their folder); returns what was found."""
    left = processes_mentioning(text)
    for line in left:
        try:
            os.kill(int(line.split(":")[0]), 9)
        except ProcessLookupError:
            pass
    return left


def test_sbatch_passes_arguments_with_glob_characters_and_spaces_unchanged(tmp_path):
    (tmp_path / "space.training.seed=1").write_text("a file the glob [1,2] would match")
    done = run_with_stand_ins(
        SBATCH, tmp_path, ["--set", "tracking.experiment=my sweep"],
        DISTILLSWEEP_SLURM_DRY_RUN="1", DISTILLSWEEP_ARGS="--set space.training.seed=[1,2]",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[-5:] == ["--set", "space.training.seed=[1,2]", "--set", "tracking.experiment=my sweep", "--dry-run"]


def test_sbatch_job_log_hides_the_tracking_uri_password(tmp_path):
    uri = f"postgresql://sweeper:{NASTY_PASSWORD}@db.internal:5432/mlflow"
    done = run_with_stand_ins(SBATCH, tmp_path, DISTILLSWEEP_SLURM_DRY_RUN="1", MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"tracking.uri={uri}" in json.loads((tmp_path / "argv.json").read_text())
    log = done.stdout + done.stderr
    assert "tracking.uri=postgresql://sweeper:***@db.internal:5432/mlflow" in log
    assert "sweeper:p" not in log and "OWNED" not in log


@pytest.mark.parametrize("script", [START, SBATCH], ids=lambda p: p.name)
def test_scripts_refuse_unauthenticated_ray_unless_asked_twice(script, tmp_path):
    temp_dir = tmp_path / "ray-temp"
    env = {"RAY_AUTH_MODE": "disabled", "RAY_PORT": str(free_port()), "RAY_TEMP_DIR": str(temp_dir),
           "DISTILLSWEEP_SLURM_DRY_RUN": "1"}
    try:
        refused = run_with_stand_ins(script, tmp_path, **env)
        assert refused.returncode == 2
        assert "ALLOW_UNAUTHENTICATED=1" in refused.stdout + refused.stderr
        assert not temp_dir.exists() and not (tmp_path / "argv.json").exists(), "it started something first"

        odd = run_with_stand_ins(script, tmp_path, **env | {"RAY_AUTH_MODE": "token; touch OWNED"})
        assert odd.returncode == 2 and "must be token or disabled" in odd.stdout + odd.stderr
        assert not (tmp_path / "OWNED").exists()

        if script == SBATCH:  # asked twice it runs, warned (the local script would wait for a real head)
            allowed = run_with_stand_ins(script, tmp_path, **env | {"ALLOW_UNAUTHENTICATED": "1"})
            assert "WARNING: Ray authentication is OFF" in allowed.stdout
            assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    finally:
        subprocess.run([str(STOP)], env=script_env(RAY_TEMP_DIR=str(temp_dir)), capture_output=True, timeout=60)
        assert kill_processes_mentioning(str(tmp_path)) == []


def other_users_folder(tmp_path: Path) -> Path:
    """A folder that belongs to someone else: made and handed to `nobody` as root, else `/`."""
    if os.geteuid() != 0:
        return Path("/")
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o755)
    os.chown(folder, 65534, 65534)
    return folder


@pytest.mark.parametrize("whose", ["someone else's", "world-writable"])
def test_local_start_refuses_a_temp_folder_others_control(whose, tmp_path):
    """Ray's sockets, logs and the pid files would be theirs to read or replace."""
    if whose == "world-writable":
        folder = tmp_path / "open"
        folder.mkdir()
        folder.chmod(0o777)
    else:
        folder = other_users_folder(tmp_path)
    try:
        done = run_with_stand_ins(START, tmp_path, RAY_PORT=str(free_port()), RAY_TEMP_DIR=str(folder))
        assert done.returncode == 1, done.stderr
        assert ("belongs to another user" if whose != "world-writable" else "writable by other users") in done.stderr
        assert done.stdout == "" and not (folder / "launcher").exists()
    finally:
        assert kill_processes_mentioning(f"--temp-dir {folder}") == [], "it started nodes in that folder"


def test_local_stop_leaves_alone_a_process_that_got_a_recorded_pid(tmp_path):
    """A pid file whose PID now belongs to another process (same words `ray start --block` in its
    command line, another start time) must not make stop-cluster.sh kill it."""
    temp_dir = tmp_path / "ray"
    (temp_dir / "launcher").mkdir(parents=True)
    temp_dir.chmod(0o700)
    bystander = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()", "ray", "start", "--block"])
    try:
        (temp_dir / "launcher" / "head.pid").write_text(f"{bystander.pid} 1\n")
        done = subprocess.run([str(STOP)], env=script_env(RAY_PORT="1", RAY_TEMP_DIR=str(temp_dir)),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "no running node found" in done.stderr
        assert bystander.poll() is None, "stop-cluster.sh killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


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
        assert "sweep quickstart: 8 trials" in out
        assert "8 trial configs checked" in out
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
    # Ray makes its own temp folder world-writable; the folder around it keeps everyone else out.
    assert stat.S_IMODE(os.stat(env["RAY_TEMP_DIR"]).st_mode) == 0o700
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


# --- data-parallel rendezvous ----------------------------------------------------------------


def listening_sockets_of_this_process(_cfg: object, _reporter: object, _resume_from: object) -> dict:
    """Run inside a data-parallel worker: the TCP listeners this process holds once Accelerate has
    set up the process group, as a run does, and a collective has gone through it."""
    import torch

    from trainables.config import TrainingConfig
    from trainables.precision import make_accelerator

    accelerator = make_accelerator(TrainingConfig())
    accelerator.reduce(torch.ones(1, device=accelerator.device), "sum")
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                listening.append(fields[1].split(":")[0])
    return {"listening": listening}


@pytest.mark.slow
def test_data_parallel_rendezvous_does_not_listen_beyond_loopback():
    """torch's default TCP store listened on every interface, unauthenticated, during a run."""
    from trainables.launch import run_data_parallel

    final = run_data_parallel(listening_sockets_of_this_process, None, num_processes=2)
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc writes them
    assert final["listening"], "no socket seen: the check would pass on anything"
    assert set(final["listening"]) <= loopback, final["listening"]
