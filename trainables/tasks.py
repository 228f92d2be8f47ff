"""What a task is: its columns, label count, metrics and where its data lives.

A `TaskSpec` is plain data, so the data loader, the metrics and the tokenisation cache key all read
the same description. GLUE tasks come from the hub; the `demo` task and `LocalTask`s from local
files, whose label column is read here to settle the label count.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from trainables.config import LocalTask, MetricName
from trainables.demo import DEMO_LABELS, ensure_demo_data

log = logging.getLogger(__name__)

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SCAN_CHUNK = 1 << 20


@dataclass(frozen=True)
class TaskSpec:
    """One task. `num_labels == 1` means regression.

    Data comes either from the GLUE subset `glue_subset` on the hub or from `train_file` and
    `validation_file` (absolute paths). `label_names` is set when the files hold string labels:
    id i stands for `label_names[i]`.
    """

    name: str
    text_columns: tuple[str] | tuple[str, str]
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    glue_subset: str | None = None
    train_file: Path | None = None
    validation_file: Path | None = None
    label_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"task {self.name}: text_columns {self.text_columns} must name 1 or 2 columns")
        if self.num_labels < 1:
            raise ValueError(f"task {self.name}: num_labels {self.num_labels} must be >= 1 (1 = regression)")
        known = get_args(MetricName)
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            raise ValueError(f"task {self.name}: metrics {unknown} unknown; known: {', '.join(known)}")
        if self.main_metric not in self.metrics:
            raise ValueError(
                f"task {self.name}: main_metric {self.main_metric!r} not in metrics {self.metrics}"
            )
        if (self.glue_subset is None) == (self.train_file is None or self.validation_file is None):
            raise ValueError(
                f"task {self.name}: give either glue_subset or both train_file and validation_file"
            )

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def _glue(
    name: str,
    text_columns: tuple[str] | tuple[str, str],
    num_labels: int = 2,
    metrics: tuple[str, ...] = ("accuracy",),
    eval_split: str = "validation",
) -> TaskSpec:
    """GLUE's official metrics; the main one is the first GLUE lists (F1 of F1/acc, Pearson of P/S)."""
    return TaskSpec(
        name=name,
        text_columns=text_columns,
        num_labels=num_labels,
        metrics=metrics,
        main_metric=metrics[0],
        eval_split=eval_split,
        glue_subset=name,
    )


GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("cola", ("sentence",), metrics=("matthews_correlation",)),
        _glue("sst2", ("sentence",)),
        _glue("mrpc", ("sentence1", "sentence2"), metrics=("f1", "accuracy")),
        _glue("qqp", ("question1", "question2"), metrics=("f1", "accuracy")),
        _glue("stsb", ("sentence1", "sentence2"), num_labels=1, metrics=("pearson", "spearmanr")),
        _glue("mnli", ("premise", "hypothesis"), num_labels=3, eval_split="validation_matched"),
        _glue("qnli", ("question", "sentence")),
        _glue("rte", ("sentence1", "sentence2")),
    )
}

KNOWN_TASKS = (*GLUE_TASKS, "demo")


def _normalise(name: str) -> str:
    """`SST-2`, `sst_2` and `sst2` are one task; so are `STS-B` and `stsb`."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_task(task: str | LocalTask) -> TaskSpec:
    """Turn a config's `task` (GLUE name, `demo`, or a `LocalTask`) into a `TaskSpec`."""
    if isinstance(task, LocalTask):
        return local_task_spec(task)
    key = _normalise(task)
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    if key == "demo":
        return demo_task_spec()
    raise ValueError(
        f"task {task!r} unknown; known: {', '.join(KNOWN_TASKS)}, or a local task with train_file"
    )


def selection_metric(spec: TaskSpec, metric_for_best_model: str | None) -> str:
    """The metric a run on `spec` is scored and selected by: the one asked for, else the task's main one."""
    if metric_for_best_model is None:
        return spec.main_metric
    if metric_for_best_model not in spec.metrics:
        raise ValueError(
            f"training.metric_for_best_model {metric_for_best_model!r}: task {spec.name} reports "
            f"{', '.join(spec.metrics)}"
        )
    return metric_for_best_model


def demo_task_spec(root: Path | None = None) -> TaskSpec:
    """The demo tweets (trainables.demo), written under `root` (default <cache root>/demo) once."""
    train_file, validation_file = ensure_demo_data(root)
    return TaskSpec(
        name="demo",
        text_columns=("text",),
        num_labels=len(DEMO_LABELS),
        metrics=("accuracy",),
        main_metric="accuracy",
        train_file=train_file,
        validation_file=validation_file,
    )


def local_task_spec(task: LocalTask) -> TaskSpec:
    """Read the label column once to settle num_labels and string label ids before any trial runs.

    Paths become absolute here, against the current directory, because Ray trials run elsewhere.
    """
    train_file = Path(task.train_file).expanduser().resolve()
    validation_file = Path(task.validation_file).expanduser().resolve()
    for field, path in (("task.train_file", train_file), ("task.validation_file", validation_file)):
        if not path.is_file():
            raise FileNotFoundError(f"{field} {path}: no such file")
    num_labels, label_names = infer_labels(train_file, task.label_column, task.num_labels)
    if num_labels == 1:
        metrics: tuple[str, ...] = ("pearson", "spearmanr")
    elif num_labels == 2:
        metrics = ("accuracy", "f1")
    else:
        metrics = ("accuracy",)
    return TaskSpec(
        name=task.name,
        text_columns=task.text_columns,
        label_column=task.label_column,
        num_labels=num_labels,
        metrics=metrics,
        main_metric=metrics[0],
        train_file=train_file,
        validation_file=validation_file,
        label_names=label_names,
    )


# --- local files ---------------------------------------------------------------------------------


def read_local_file(path: Path) -> Dataset:
    """Read one CSV / JSON / JSONL / Parquet file, choosing the `datasets` builder by suffix.

    A file the builder cannot read is a ValueError of one line naming it (for bytes that are not
    UTF-8, where and how to fix them), not the builder's page-long traceback.
    """
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"data file {path}: suffix {path.suffix!r} unsupported; use one of {', '.join(BUILDERS)}"
        )
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except DatasetGenerationError as err:
        raise ValueError(not_utf8(path) or f"data file {path}: cannot be read as {builder} ({root_cause(err)})") from None


def not_utf8(path: Path) -> str | None:
    """Where a text file first stops being UTF-8, and how to fix it; None for valid UTF-8 (a BOM
    included). Read in chunks: the file can be large."""
    if BUILDERS.get(path.suffix.lower()) == "parquet":
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_CHUNK):
            held = len(decoder.getstate()[0])  # a character cut by the previous chunk's end
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                lines += chunk[:max(0, err.start - held)].count(b"\n")
                return (f"data file {path}: not UTF-8 (byte {err.object[err.start]:#04x} on line {lines}, e.g. "
                        f"Latin-1 or Windows-1252 text); re-save it as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`")
            lines += chunk.count(b"\n")
    return None


def root_cause(err: BaseException) -> str:
    """The first line of the innermost exception `datasets` wrapped."""
    for _ in range(10):  # a chain is a few links; a cycle must not loop
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_columns(ds: Dataset, columns: list[str], where: str) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"{where}: column {column!r} not found; columns present: {ds.column_names}")


def infer_labels(
    train_file: Path, label_column: str, num_labels: int | None
) -> tuple[int, tuple[str, ...] | None]:
    """Settle (num_labels, string label names) from the training file's label column.

    Strings become ids by their sorted order, so train and validation agree; floats mean
    regression; integers must be ids 0..K-1 and K defaults to the largest id + 1.
    """
    ds = read_local_file(train_file)
    require_columns(ds, [label_column], f"task.train_file {train_file}")
    kind = ds.data.schema.field(label_column).type
    values = ds.unique(label_column)
    if None in values:
        raise ValueError(f"task.train_file {train_file}: column {label_column!r} has missing labels")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        names = tuple(sorted(values))
        if num_labels is not None and num_labels != len(names):
            raise ValueError(
                f"task.num_labels {num_labels}: column {label_column!r} of {train_file} holds "
                f"{len(names)} distinct string labels {some(names)}"
            )
        log.info("task labels %s map to ids 0..%d in this order", list(names), len(names) - 1)
        return len(names), names
    if num_labels == 1 or (num_labels is None and pa.types.is_floating(kind)):
        return 1, None
    if not all(float(v).is_integer() for v in values):
        raise ValueError(
            f"task.num_labels {num_labels}: column {label_column!r} of {train_file} holds non-integer "
            "labels; set num_labels 1 for regression"
        )
    inferred = int(max(values)) + 1
    check_label_ids(values, num_labels or inferred, f"task.train_file {train_file}", label_column)
    return num_labels or inferred, None


def check_label_ids(values: list[Any], num_labels: int, where: str, label_column: str) -> None:
    bad = sorted((v for v in values if v is None or not 0 <= v < num_labels), key=str)
    if bad:
        raise ValueError(f"{where}: column {label_column!r} holds labels {some(bad)}; allowed: ids 0..{num_labels - 1}")


def some(values: Any, shown: int = 10) -> str:
    """A list of values for a message: the first few, and how many there are when that is not all."""
    values = list(values)
    head = [v if not isinstance(v, str) or len(v) <= 40 else v[:37] + "..." for v in values[:shown]]
    return str(head) if len(values) <= shown else f"{str(head)[:-1]}, ... ({len(values)} in all)]"
