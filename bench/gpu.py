"""The prepared GPU check: one command that measures, on a lent GPU, what the CPU cannot.

    bench/gpu_check.sh                       # on the GPU machine: install the carried wheelhouse, then the check
    python -m bench.gpu --cpu-rehearsal      # the same script on a CPU with tiny shapes (CI: tests/test_gpu_check.py)

Parts, each a process of its own under its own time budget (bench/gpu_plan.py); a part that fails or
runs out of time is recorded with its error and what it had measured, and the next part runs:
 (a) sweep       a real `distillsweep sweep` with resources.gpu auto (bench/gpu_sweep.py)
 (b) throughput  batch-32 examples/s: ours eager, ours compiled, torchdistill (bench/gpu_speed.py)
 (c) packing     trials per GPU-hour at 1, 2, 4, 8 trials per GPU (bench/gpu_speed.py)
 (d) peak        achieved FLOP/s as a share of the GPU's bf16 dense peak (bench/gpu_peak.py)
Everything goes into one JSON and a Markdown snippet for BENCHMARKS.md, in --out (default $OUT
where set, else bench/results), with the parts' output in a log beside them; the console says
whether compiling the step gained, which decides trainables.compile.COMPILE_GAINS_ON_CUDA.

The rehearsal runs every part on 2 CPU cores in about 2 minutes: the tiny random teacher, a few
steps, fp32, a private Ray declaring 2 fake GPUs. Only the compiled run is skipped there (with its
reason in the JSON), unless --rehearse-compile.

Nothing here reaches a network: --wheelhouse installs from a folder of wheels (bench/gpu_wheelhouse.py,
built by bench/build_wheelhouse.sh), and the tokenizer and demo data come from its assets/ folder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import gpu_wheelhouse

if TYPE_CHECKING:
    from bench.gpu_plan import GpuPlan

ROOT = Path(__file__).resolve().parents[1]
NAME = "gpu_check"
# Each part's function (plan, record), imported in the part's own process, after the install.
PART_FUNCTIONS = {"sweep": ("bench.gpu_sweep", "run_sweep"), "throughput": ("bench.gpu_speed", "run_throughput"),
                  "packing": ("bench.gpu_speed", "run_packing"), "peak": ("bench.gpu_peak", "run_peak")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-rehearsal", action="store_true", help="every part on the CPU with tiny shapes")
    parser.add_argument("--rehearse-compile", action="store_true",
                        help="with --cpu-rehearsal: run the compiled variant too (minutes of inductor on a CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_check[.rehearsal].json/.md/.log (default $OUT, else bench/results)")
    parser.add_argument("--wheelhouse", type=Path, default=None,
                        help="install these wheels first (no index) and read the tokenizer and demo data from its assets/")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the scratch folder (sweep, MLflow store, runs; its path is the JSON's `work`)")
    parser.add_argument("--part", choices=PART_FUNCTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rehearse_compile and not args.cpu_rehearsal:
        parser.error("--rehearse-compile goes with --cpu-rehearsal (on a GPU the compiled run always runs)")
    return args


# --- one part, in its own process -----------------------------------------------------------------


def part_main(name: str, plan_file: Path) -> None:
    """Run one part, recording its figures as they come and its error if it fails."""
    from bench import common  # first: the thread and offline environment, before torch
    from bench.gpu_plan import GpuPlan, PartRecord

    common.quiet_logs()
    plan = GpuPlan.model_validate_json(plan_file.read_text())
    record = PartRecord(plan.part_file(name))
    try:
        module, function = PART_FUNCTIONS[name]
        getattr(importlib.import_module(module), function)(plan, record)
    except Exception as err:
        record.update(error=f"{type(err).__name__}: {err}", traceback=clipped(traceback.format_exc()))
        raise SystemExit(f"part {name} failed: {type(err).__name__}: {err}") from None


def clipped(text: str, head: int = 2000, tail: int = 3000) -> str:
    """A long traceback's first frames (where the part called in) and its last (where it broke)."""
    return text if len(text) <= head + tail else f"{text[:head]}\n[...]\n{text[-tail:]}"


def run_part(plan: GpuPlan, name: str, plan_file: Path, log: Path) -> dict[str, Any]:
    """A part's process under its budget; its record, with status, seconds and any error."""
    budget = plan.budgets[name]
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n===== part {name} (budget {budget} s) =====\n")
        out.flush()
        process = subprocess.Popen([sys.executable, "-m", "bench.gpu", "--part", name, "--plan", str(plan_file)],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=budget)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timed out"
        finally:
            stop_group(process)
    path = plan.part_file(name)
    record = json.loads(path.read_text()) if path.is_file() else {}
    entry = {"status": status, "seconds": round(time.perf_counter() - start, 1), "budget_s": budget, **record}
    if status == "timed out":
        entry["error"] = f"stopped at its budget of {budget} s; the figures are those it had measured by then"
    elif status == "failed" and "error" not in entry:
        entry["error"] = f"the part's process exited with {code} before recording an error: see {log.name}"
    return entry


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a part's process group (its Ray, its trial processes), and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# --- the whole check ------------------------------------------------------------------------------


def output_folder(args: argparse.Namespace) -> Path:
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def install_step(wheelhouse: Path | None, work: Path) -> dict[str, Any]:
    """Install the wheelhouse (before anything imports what it holds) and point at its assets."""
    if wheelhouse is None:
        return {"summary": "none: this environment's packages"}
    start = time.perf_counter()
    # Named site-packages: dill (datasets' fingerprints, evaluate's metrics) pickles modules from any
    # other folder by value, which failed on pyarrow's types when pyarrow lay in such a folder.
    gpu_wheelhouse.install(wheelhouse.resolve(), work / "site-packages")
    assets = wheelhouse.resolve() / "assets"
    if (assets / "tokenizer").is_dir():
        os.environ["DISTILLSWEEP_BENCH_TOKENIZER"] = str(assets / "tokenizer")
    if (assets / "demo").is_dir():
        shutil.copytree(assets / "demo", work / "cache" / "demo", dirs_exist_ok=True)
    unmet = gpu_wheelhouse.environment_unmet()
    seconds = round(time.perf_counter() - start, 1)
    return {"wheelhouse": str(wheelhouse), "seconds": seconds, "unmet_requirements": unmet,
            "summary": f"{len(list(wheelhouse.glob('*.whl')))} wheels in {seconds:.0f} s, "
                       f"{len(unmet)} requirements unmet here" + (f" ({'; '.join(unmet)})" if unmet else "")}


def make_plan(args: argparse.Namespace, work: Path) -> GpuPlan:
    """The plan for this machine, with the random teacher saved and the demo data written."""
    import torch

    from bench import common
    from bench.gpu_plan import gpu_plan, rehearsal_plan
    from trainables.demo import ensure_demo_data

    if not args.cpu_rehearsal and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run the check on a GPU machine, or rehearse it with --cpu-rehearsal")
    cache = work / "cache"
    os.environ["DISTILLSWEEP_CACHE"] = str(cache)
    ensure_demo_data(cache / "demo")
    size = "smallest" if args.cpu_rehearsal else "paper"
    teacher = common.random_teacher(size, cache)
    if args.cpu_rehearsal:
        return rehearsal_plan(work, cache, teacher, args.rehearse_compile)
    return gpu_plan(work, cache, teacher, torch.cuda.get_device_name(0))


def run_check(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    """Install, plan, then each part in turn; the JSON and Markdown are rewritten after each part, so that a
    check stopped from outside (the device call's own limit) still returns what it measured."""
    started = time.perf_counter()
    install = install_step(args.wheelhouse, work)  # first: what follows imports the wheels it installs
    from bench import common

    common.quiet_logs()
    plan = make_plan(args, work)
    plan_file = work / "plan.json"
    plan_file.write_text(plan.model_dump_json(indent=1))
    log = out / f"{stem(args)}.log"
    log.write_text("")
    result = {
        "benchmark": NAME, "mode": "cpu rehearsal" if plan.rehearsal else "gpu",
        "command": "python -m bench.gpu" + (" --cpu-rehearsal" if args.cpu_rehearsal else "")
                   + (" --rehearse-compile" if args.rehearse_compile else "")
                   + (f" --wheelhouse {args.wheelhouse}" if args.wheelhouse else ""),
        "machine": common.machine(1), "install": install, "work": str(work),
        "plan": plan.model_dump(mode="json", exclude={"work", "cache", "teacher"}), "parts": {},
    }
    for name in PART_FUNCTIONS:
        part = result["parts"][name] = run_part(plan, name, plan_file, log)
        common.log(f"part {name}: {part['status']} in {part['seconds']} s"
                   + (f": {part['error'].strip().splitlines()[-1][:300]}" if part.get("error") else ""))
        result["compile"] = result["parts"].get("throughput", {}).get(
            "compile", {"gained": None, "why": "the throughput part recorded nothing"})
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(out, args, result)
    return result


def write_outputs(out: Path, args: argparse.Namespace, result: dict[str, Any]) -> None:
    from bench.gpu_report import markdown

    (out / f"{stem(args)}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{stem(args)}.md").write_text(markdown(result))


def stem(args: argparse.Namespace) -> str:
    return NAME + (".rehearsal" if args.cpu_rehearsal else "")


def main() -> None:
    args = parse_args()
    if args.part:
        part_main(args.part, args.plan)
        return
    from bench.gpu_report import compile_line

    out = output_folder(args)
    work = Path(tempfile.mkdtemp(prefix="dsgchk-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        result = run_check(args, out, work)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, part in result["parts"].items() if part["status"] != "ok"]
    print(f"[bench] {stem(args)}: {result['seconds']:.0f} s; parts failed: {', '.join(failed) or 'none'}")
    print(f"[bench] {compile_line(result['compile'])}")
    print(f"[bench] written: {out / stem(args)}.json, .md, .log")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
