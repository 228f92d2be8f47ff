"""The GPU check's result as a Markdown snippet for BENCHMARKS.md: one table per part."""

from __future__ import annotations

from typing import Any

TITLES = {"sweep": "(a) sweep with resources.gpu auto", "throughput": "(b) throughput, batch 32",
          "packing": "(c) trials per GPU-hour", "peak": "(d) share of the bf16 dense peak"}


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows)]


def percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def sweep_lines(part: dict[str, Any]) -> list[str]:
    plan = part.get("plan", {})
    rows = [[t["mix"], t["seed"], t["status"], t["peak_memory_mib"], t["estimate_mib"], t["peak_over_estimate_tensors"]]
            for t in part.get("trials", [])]
    shares = "; ".join(f"{fit['mix']}: GPU {fit['gpu_share']:g} ({fit['trials_per_gpu']} per GPU, "
                       f"{fit['estimate_mib']} MiB)" for fit in plan.get("fits", {}).values())
    return [f"{part.get('child_runs_finished', 0)} of {part.get('trials_planned', '?')} trials FINISHED in MLflow, "
            f"{part.get('trials_at_once', '?')} at once; one GPU {plan.get('gpu_memory_gib', '?')} GiB "
            f"({plan.get('gpu_memory_from', '?')}); plan: {shares}; peak memory: {part.get('memory_measure', '?')}", "",
            *table(["mix", "seed", "MLflow", "peak MiB", "estimate MiB", "peak / estimate less margin and context"], rows)]


def throughput_lines(part: dict[str, Any]) -> list[str]:
    setup, medians = part.get("setup", {}), part.get("medians", {})
    base = medians.get("torchdistill", {}).get("window")
    rows = [[name, setup.get("precision", {}).get(name), m.get("window"), m.get("steady"),
             round(m["window"] / base, 3) if base else None] for name, m in medians.items()]
    verdict = part.get("compile", {})
    return [f"teacher {setup.get('teacher_layers')} x {setup.get('hidden_size')}, student {setup.get('student_layers')} "
            f"layers, batch {setup.get('batch_size')}, max_seq_length {setup.get('max_seq_length')} (mean padded "
            f"{setup.get('mean_padded_length')}), {setup.get('warmup_steps')} + {setup.get('timed_steps')} steps x "
            f"{setup.get('repeats')} rounds; examples/s, medians", "",
            *table(["run", "precision", "window", "steady", "window / torchdistill"], rows), "", compile_line(verdict)]


def compile_line(verdict: dict[str, Any]) -> str:
    """Whether compiling gained, and what it means for trainables.compile.COMPILE_GAINS_ON_CUDA."""
    gained = verdict.get("gained")
    if gained is None:
        return f"compile gained: not measured ({verdict.get('why')})"
    flip = ("set trainables.compile.COMPILE_GAINS_ON_CUDA = True" if gained
            else "keep trainables.compile.COMPILE_GAINS_ON_CUDA = False")
    return f"compile gained: {'yes' if gained else 'no'} ({verdict.get('why')}): {flip}"


def packing_lines(part: dict[str, Any]) -> list[str]:
    setup = part.get("setup", {})
    rows = [[lv["trials_per_gpu"], lv["examples_per_second"], lv["trials_per_gpu_hour"], lv.get("vs_one_trial")]
            for lv in part.get("levels", [])]
    return [f"trials of {setup.get('timed_steps')} timed steps (after {setup.get('warmup_steps')} untimed), batch "
            f"{setup.get('batch_size')}, {setup.get('precision')}, start-up not counted", "",
            *table(["trials per GPU", "examples/s, all trials", "trials per GPU-hour", "vs one trial"], rows)]


def peak_lines(part: dict[str, Any]) -> list[str]:
    matmul = part.get("matmul", {})
    rows = [[r["run"], r["precision"], r["examples_per_second"], r["achieved_tflops"], percent(r["of_bf16_dense_peak"]),
             percent(r["of_measured_matmul"])] for r in part.get("rows", [])]
    peak = (f"bf16 dense peak {part['peak_tflops']} TFLOP/s ({part.get('peak_source')})" if part.get("peak_tflops")
            else part.get("peak_source"))
    return [f"{part.get('device')}: {peak}; one {matmul.get('size')}^3 {matmul.get('dtype')} matmul "
            f"{matmul.get('tflops')} TFLOP/s", "",
            *table(["run", "precision", "examples/s", "achieved TFLOP/s", "of bf16 dense peak", "of measured matmul"],
                   rows)]


PART_LINES = {"sweep": sweep_lines, "throughput": throughput_lines, "packing": packing_lines, "peak": peak_lines}


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [f"### GPU check ({result['mode']}): {machine['device']}, {machine['date']}, commit {machine['git_commit']}",
             "", f"`{result['command']}`: {result['seconds']:.0f} s; torch {machine['torch']}, "
             f"transformers {machine['transformers']}; install: {result['install'].get('summary')}"]
    for name, part in result["parts"].items():
        lines += ["", f"**{TITLES[name]}**: {part['status']} in {part['seconds']:.0f} s (budget {part['budget_s']} s)"]
        if part.get("error"):
            lines.append(f"error: {part['error'].strip().splitlines()[-1][:300]}")
        try:
            lines += ["", *PART_LINES[name](part)]
        except (KeyError, TypeError, ZeroDivisionError) as err:  # a part stopped before its figures were complete
            lines.append(f"(incomplete: {type(err).__name__} {err})")
    return "\n".join(lines) + "\n"
