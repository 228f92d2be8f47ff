"""The prepared GPU check (bench/gpu.py): its CPU rehearsal end to end, the arithmetic of its figures,
and the wheelhouse it installs from on a machine with no network (bench/gpu_wheelhouse.py).

The rehearsal is the very script a lent GPU runs, on the CPU with tiny shapes: a real sweep through
the CLI on a private Ray with fake GPUs and an SQLite MLflow store, figure 1's runs, concurrent trial
processes, and the peak part. The wheelhouse tests build real (tiny) wheels and install them with pip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pydantic
import pytest

from bench import gpu_wheelhouse
from bench.gpu_peak import bf16_dense_peak, flops_per_example, fractions
from bench.gpu_plan import PackingPart, gpu_plan, rehearsal_plan
from bench.gpu_speed import compile_verdict, level_figures, steady_examples_per_second
from bench.gpu_sweep import at_once, gpu_memory
from bench.gpu_wheelhouse import (
    Package,
    install_command,
    listed_requirements,
    record_line,
    repack,
    size_problem,
    unmet_requirements,
    wheelhouse_packages,
)
from orchestrator.cost_flops import Shape
from services import kill_group, processes_mentioning

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["sweep", "throughput", "packing", "peak"]


# --- the rehearsal --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict:
    """`python -m bench.gpu --cpu-rehearsal` once, as CI runs it; its JSON, Markdown and output."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "OUT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "bench.gpu", "--cpu-rehearsal", "--out", str(out)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        kill_group(process)
    assert process.returncode == 0, output[-4000:]
    result = json.loads((out / "gpu_check.rehearsal.json").read_text())
    return {"result": result, "markdown": (out / "gpu_check.rehearsal.md").read_text(), "output": output}


@pytest.mark.slow
def test_rehearsal_runs_every_part_and_leaves_no_process_or_scratch_behind(rehearsal) -> None:
    result = rehearsal["result"]
    assert result["mode"] == "cpu rehearsal"
    assert list(result["parts"]) == PARTS
    assert {name: part["status"] for name, part in result["parts"].items()} == dict.fromkeys(PARTS, "ok")
    assert all(part["seconds"] <= part["budget_s"] for part in result["parts"].values())
    assert not Path(result["work"]).exists() and processes_mentioning(result["work"]) == []
    assert "compile gained: not measured (skipped in the CPU rehearsal" in rehearsal["output"]


@pytest.mark.slow
def test_rehearsal_sweep_places_trials_by_the_plan_and_mlflow_holds_every_trial(rehearsal) -> None:
    """Two trials, each planned at half a fake GPU (one GPU holds 2.5 of the largest), both FINISHED
    child runs of one parent; the plan printed by the CLI is the plan computed here; the KD-only
    trial's teacher logits were cached."""
    sweep = rehearsal["result"]["parts"]["sweep"]
    assert sweep["cli_exit"] == 0 and sweep["printed_plan_matches"]
    assert sweep["parent_runs"] == 1 and sweep["child_runs"] == sweep["child_runs_finished"] == sweep["trials_planned"] == 2
    assert {t["status"] for t in sweep["trials"]} == {"FINISHED"}
    assert {fit["mix"]: (fit["gpu_share"], fit["trials_per_gpu"]) for fit in sweep["plan"]["fits"].values()} == {
        "kd": (0.5, 2), "full": (0.5, 2)}
    assert all(t["peak_memory_mib"] > 0 and t["peak_over_estimate_tensors"] is None for t in sweep["trials"])
    assert sweep["teacher_logit_cache_files"] >= 1


@pytest.mark.slow
def test_rehearsal_measures_throughput_packing_and_marks_a_cpu_as_having_no_peak(rehearsal) -> None:
    parts = rehearsal["result"]["parts"]
    medians = parts["throughput"]["medians"]
    assert medians["ours"]["window"] > 0 and medians["ours"]["steady"] > 0 and medians["torchdistill"]["window"] > 0
    assert parts["throughput"]["compile"]["gained"] is None
    assert [level["trials_per_gpu"] for level in parts["packing"]["levels"]] == [1, 2]
    assert all(level["trials_per_gpu_hour"] > 0 for level in parts["packing"]["levels"])
    peak = parts["peak"]
    assert peak["peak_tflops"] is None and peak["peak_source"].startswith("peak unknown")
    assert len(peak["rows"]) == 4 and all(r["of_bf16_dense_peak"] is None and r["achieved_tflops"] > 0
                                          for r in peak["rows"])
    assert all(f"**({letter})" in rehearsal["markdown"] for letter in "abcd")


# --- the figures' arithmetic ----------------------------------------------------------------------


def test_bf16_dense_peak_is_the_datasheets_for_known_gpus_and_unknown_otherwise() -> None:
    assert bf16_dense_peak("NVIDIA H100 80GB HBM3")[0] == 989.5
    assert bf16_dense_peak("NVIDIA H100 PCIe")[0] == 756.5
    assert bf16_dense_peak("NVIDIA H100 NVL")[0] == 835.5
    assert bf16_dense_peak("NVIDIA H200")[0] == 989.5
    assert bf16_dense_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bf16_dense_peak("cpu") is None and bf16_dense_peak("NVIDIA L4") is None


def test_share_of_peak_is_examples_per_second_times_the_hand_counted_flops_over_the_peak() -> None:
    """Teacher 2 layers, student 1, width 8, FFN 16, 4 tokens, 2 labels. Per token and layer:
    4 projections 4*2*8*8 = 512, scores and their sum 2*2*4*8 = 128, FFN 2*2*8*16 = 512; the
    classifier 2*8*8 + 2*8*2 = 160 a row. Teacher 4*2*1152 + 160 = 9376, student forward
    4*1152 + 160 = 4768, with its backward 3 * 4768 = 14304: 23680 FLOPs an example."""
    teacher, student = Shape(2, 8, 16, 10), Shape(1, 8, 16, 10)
    assert flops_per_example(teacher, student, 4) == 23680
    throughput = {"setup": {"precision": {"ours": "bf16"}, "mean_padded_length": 4},
                  "medians": {"ours": {"steady": 1e9, "window": 5e8}}}
    packing = {"setup": {"precision": "bf16", "mean_padded_length": 4},
               "levels": [{"trials_per_gpu": 1, "examples_per_second": 2e9}]}
    rows = fractions({"peak_tflops": 989.5, "matmul": {"tflops": 800.0}}, throughput, packing, teacher, student)
    assert [(r["run"], r["achieved_tflops"], r["of_bf16_dense_peak"], r["of_measured_matmul"]) for r in rows] == [
        ("(b) ours, steady", 23.68, round(23.68 / 989.5, 4), round(23.68 / 800, 4)),
        ("(c) 1 per GPU", 47.36, round(47.36 / 989.5, 4), round(47.36 / 800, 4)),
    ]
    unknown = fractions({"peak_tflops": None, "matmul": {}}, throughput, {}, teacher, student)
    assert unknown[0]["of_bf16_dense_peak"] is None and unknown[0]["of_measured_matmul"] is None


def test_steady_throughput_leaves_out_the_steps_that_compile() -> None:
    """Steps 3..6 timed (after 2 warm-up steps); step 4 compiled for 10 s and is left out."""
    batches = [[0] * 32] * 6
    stamps = {2: 0.0, 3: 1.0, 4: 11.0, 5: 12.0, 6: 13.0}
    assert steady_examples_per_second(batches, stamps, 2, 6, {1, 4}) == 32 * 3 / 3.0
    assert steady_examples_per_second(batches, stamps, 2, 6, set()) == 32 * 4 / 13.0


def test_compile_gains_only_from_the_margin_on_steady_throughput() -> None:
    def samples(eager: float, compiled: float) -> dict:
        return {"ours": [{"steady": eager, "window": eager, "run_s": 20.0}],
                "ours_compiled": [{"steady": compiled, "window": compiled / 3, "run_s": 80.0}]}

    gained = compile_verdict(samples(100.0, 115.0), None)
    assert gained["gained"] is True and gained["steady_ratio"] == 1.15 and gained["compilation_s_per_run"] == 60.0
    assert compile_verdict(samples(100.0, 105.0), None)["gained"] is False
    assert compile_verdict({"ours": samples(1, 1)["ours"]}, None)["gained"] is None
    assert compile_verdict(samples(100.0, 200.0), "skipped: why")["why"] == "skipped: why"


def test_trials_per_gpu_hour_count_the_level_from_its_first_start_to_its_last_end() -> None:
    trials = [{"start": 100.0, "end": 118.0}, {"start": 100.0, "end": 120.0}]
    figures = level_figures(trials, examples_per_trial=960)
    assert figures == {"trials_per_gpu": 2, "wall_s": 20.0, "median_trial_s": 19.0, "examples_per_second": 96.0,
                       "trials_per_gpu_hour": 360.0}


def test_trials_at_once_is_the_most_overlapping_runs() -> None:
    assert at_once([(0, 10), (5, 15), (12, 20)]) == 2
    assert at_once([(0, 10), (10, 20)]) == 1  # one ends as the next starts
    assert at_once([(0, 30), (1, 2), (3, 4), (5, 6)]) == 2


def test_gpu_plan_parts_fit_in_eight_minutes_with_a_minute_for_install_and_set_up(tmp_path: Path) -> None:
    plan = gpu_plan(tmp_path, tmp_path / "cache", tmp_path / "teacher", "NVIDIA H100 80GB HBM3")
    assert list(plan.budgets) == PARTS and sum(plan.budgets.values()) <= 8 * 60 - 60
    assert plan.packing.levels == [1, 2, 4, 8] and plan.throughput.compile and plan.precision == "bf16"


def test_on_a_gpu_ray_knows_the_sweep_plans_with_the_tables_memory_and_is_told_none(tmp_path: Path) -> None:
    """As the sweep will: one H100 holds GPU_MEMORY_GIB['H100'] by the type Ray labels the node with;
    the rehearsal's fake GPUs are told their memory instead."""
    plan = gpu_plan(tmp_path, tmp_path / "cache", tmp_path / "teacher", "NVIDIA H100 80GB HBM3")
    assert gpu_memory(plan, largest_need=2**30) == (79.0, None, "Ray's accelerator type H100 "
                                                                  "(orchestrator.gpu_memory.GPU_MEMORY_GIB)")
    rehearsal = rehearsal_plan(tmp_path, tmp_path / "cache", tmp_path / "teacher", compile=False)
    assert gpu_memory(rehearsal, largest_need=2**30)[:2] == (2.5, 2.5)


def test_packing_levels_must_rise_from_one_trial() -> None:
    with pytest.raises(pydantic.ValidationError, match="must rise from 1"):
        PackingPart(levels=[2, 4], warmup=1, steps=1)


# --- the wheelhouse ---------------------------------------------------------------------------------


def tiny_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A real, installable pure-Python wheel."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    members = {**files, f"{info}/METADATA": metadata.encode(),
               f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{record_line(n, d)}\n" for n, d in members.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, data in members.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{info}/RECORD", record)
    return path


def test_the_wheelhouse_list_holds_every_dependency_its_packages_declare() -> None:
    """Each listed package's requirements, as this environment's copy of it declares them for the
    GPU machine's Python 3.12 on Linux, are listed too or held by the image (names; the versions are
    checked on the downloaded wheels by `python -m bench.gpu_wheelhouse check`)."""
    packages = [gpu_wheelhouse.installed_package(r) for r in listed_requirements()]
    assert unmet_requirements(packages, check_versions=False) == []
    assert "tune" in next(p for p in packages if p.name == "ray").extras


def test_a_requirement_neither_the_wheelhouse_nor_the_image_meets_is_named(tmp_path: Path) -> None:
    tiny_wheel(tmp_path, "probe", "1.0", {"probe/__init__.py": b""},
               ("helper>=2", "numpy>=99", "torch", "colorama; sys_platform == 'win32'", "extra-only; extra == 'x'"))
    tiny_wheel(tmp_path, "helper", "1.5", {"helper/__init__.py": b""})
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("probe==1.0\nhelper==1.5\n")
    problems = unmet_requirements(wheelhouse_packages(tmp_path, requirements))
    assert problems == ["probe 1.0 needs helper>=2: the wheelhouse has 1.5",
                        "probe 1.0 needs numpy>=99: the image has 2.5.2 and the wheelhouse none"]
    assert unmet_requirements([Package("probe", "1.0", ("nowhere",))]) == [
        "probe 1.0 needs nowhere: neither the wheelhouse nor the image has it"]


def test_a_wheelhouse_over_the_carry_limit_is_refused_naming_its_largest_wheels(tmp_path: Path) -> None:
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(b"\0" * 700_000)
    (tmp_path / "small-1.0-py3-none-any.whl").write_bytes(b"\0" * 200_000)
    assert size_problem(tmp_path, tree_bytes=100_000, limit=1_000_000) is None
    problem = size_problem(tmp_path, tree_bytes=100_001, limit=1_000_000)
    assert "weigh 1.0 MiB, over the 1 MiB a device call carries" in problem
    assert problem.index("big-1.0-py3-none-any.whl 0.7 MiB") < problem.index("small-1.0")


def test_install_step_installs_the_listed_wheels_from_the_folder_alone(tmp_path: Path, monkeypatch) -> None:
    """No index is asked (--no-index): the wheel comes from the wheelhouse, into the target, first on
    the path of this process and of the processes it starts."""
    wheelhouse, target = tmp_path / "wheelhouse", tmp_path / "site"
    wheelhouse.mkdir()
    tiny_wheel(wheelhouse, "gpucheckprobe", "1.0", {"gpucheckprobe/__init__.py": b"ANSWER = 42\n"})
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("gpucheckprobe==1.0\n")
    command = install_command(wheelhouse, target, requirements)
    assert command[command.index("--find-links") + 1] == str(wheelhouse) and "--no-index" in command
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    gpu_wheelhouse.install(wheelhouse, target, requirements)
    assert sys.path[0] == str(target) and os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(target)
    child = subprocess.run([sys.executable, "-c", "import gpucheckprobe; print(gpucheckprobe.ANSWER)"],
                           capture_output=True, text=True, env=dict(os.environ), cwd=tmp_path)
    assert child.stdout.strip() == "42", child.stderr


def test_install_step_without_wheels_says_how_to_build_them(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="holds no wheels: build it with bench/build_wheelhouse.sh"):
        gpu_wheelhouse.install(tmp_path, tmp_path / "site")


def test_repacked_wheel_drops_the_named_folders_and_still_installs(tmp_path: Path) -> None:
    """As Ray's wheel is repacked: its jars dropped, the rest LZMA-compressed, RECORD rewritten to match."""
    wheel = tiny_wheel(tmp_path, "repackprobe", "1.0", {"repackprobe/__init__.py": b"X = 1\n",
                                                         "repackprobe/jars/big.jar": b"\1" * 50_000})
    assert repack(wheel, ("repackprobe/jars/",)) > 0
    with zipfile.ZipFile(wheel) as repacked:
        names = repacked.namelist()
        record = repacked.read("repackprobe-1.0.dist-info/RECORD").decode()
        assert {info.compress_type for info in repacked.infolist()} == {zipfile.ZIP_LZMA}
    assert "repackprobe/jars/big.jar" not in names and "repackprobe/jars/big.jar" not in record
    assert record_line("repackprobe/__init__.py", b"X = 1\n") in record.splitlines()
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (target / "repackprobe" / "__init__.py").read_text() == "X = 1\n"
