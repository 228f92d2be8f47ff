"""`RunConfig`: the validated description of one distillation run.

Everything a trial receives passes through here, so every mistake a user can make in a file or a
search space is caught with the field named. Checks that need the teacher's architecture (layer
indices, head counts) live in `check_against_teacher`, which callers run before training starts.
The objective registry (trainables.objectives, which brings PyTorch) is imported by the checks that
read it, so that importing this module (`distillsweep --help`, `status`) costs no PyTorch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

InitPreset = Literal["random", "lower", "upper", "skip"]
MetricName = Literal["accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"]
MappingPreset = Literal["skip", "last", "combine"]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config file must not be silently ignored.

    Infinities and NaN are refused too: YAML reads `.inf` as a number that would pass every lower bound.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A name that becomes part of a folder's name (a task's teacher cache, a sweep's or study's folder):
# no separators, no leading dot, so never `.`, `..` or a path.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class LocalTask(StrictModel):
    """A classification or regression task read from local CSV / JSON / Parquet files."""

    NAME_MAX_CHARS: ClassVar[int] = 100

    name: str = "local"
    train_file: Path
    validation_file: Path
    text_columns: tuple[str] | tuple[str, str] = ("text",)
    label_column: str = "label"
    num_labels: int | None = Field(
        default=None, ge=1, description="1 means regression; None infers from the training file"
    )

    @field_validator("name")
    @classmethod
    def _usable_in_paths(cls, name: str) -> str:
        if len(name) > cls.NAME_MAX_CHARS or not FOLDER_NAME.fullmatch(name):
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise ValueError(
                f"task.name {shown!r}: a task name becomes part of folder names; use at most "
                f"{cls.NAME_MAX_CHARS} letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        return name


def task_name_of(task: Any) -> str:
    """The name `per_task`, teachers, tags and tables know a task by: a GLUE name as written, or a
    local task's `name` (also for a task still written as a mapping in a file)."""
    if isinstance(task, str):
        return task
    if isinstance(task, dict):
        task = LocalTask.model_validate(task)
    if not isinstance(task, LocalTask):
        raise ValueError(f"task {task!r}: expected a task name or a local task mapping")
    return task.name


class PretrainedInit(StrictModel):
    """Initialise the student from a small pretrained model instead of teacher layers."""

    pretrained: str


class StudentConfig(StrictModel):
    num_layers: int = Field(default=3, ge=1, description="the study's task-specific student has 3")
    hidden_size: int | None = Field(default=None, ge=8, description="None keeps the teacher's width")
    num_attention_heads: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=8)
    init: InitPreset | list[Annotated[int, Field(ge=0)]] | PretrainedInit = "skip"

    @model_validator(mode="after")
    def _init_matches_depth(self) -> StudentConfig:
        if isinstance(self.init, list):
            if len(self.init) != self.num_layers:
                raise ValueError(
                    f"student.init lists {len(self.init)} teacher layers {self.init} but "
                    f"student.num_layers is {self.num_layers}: give one teacher layer per student layer"
                )
        if self.hidden_size is not None and self.init not in ("random",) and not isinstance(
            self.init, PretrainedInit
        ):
            raise ValueError(
                f"student.init {self.init!r}: a student of hidden_size {self.hidden_size} cannot copy "
                "teacher layers of another width; use init 'random' or {pretrained: PATH}"
            )
        return self

    @property
    def init_name(self) -> str:
        """A short label for tables and tags: `skip`, `layers_0_1_2`, `pretrained`."""
        if isinstance(self.init, list):
            return "layers_" + "_".join(str(i) for i in self.init)
        if isinstance(self.init, PretrainedInit):
            return "pretrained"
        return self.init


class ObjectiveSpec(BaseModel):
    """One term of the loss: a registered objective, its weight and its own parameters."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    name: str
    weight: float = Field(default=1.0, ge=0.0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from trainables.objectives import REGISTRY

        if name not in REGISTRY:
            raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(REGISTRY))}")
        return name

    @model_validator(mode="after")
    def _params_valid(self) -> ObjectiveSpec:
        from trainables.objectives import REGISTRY

        REGISTRY[self.name].parse_params(self.params)
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainingConfig(StrictModel):
    """Hyperparameters, named as in Hugging Face `TrainingArguments`."""

    learning_rate: float = Field(default=5e-5, gt=0.0)
    per_device_train_batch_size: int = Field(default=32, ge=1)
    per_device_eval_batch_size: int = Field(default=64, ge=1)
    num_train_epochs: float = Field(default=3.0, gt=0.0)
    max_steps: int = Field(default=-1, ge=-1, description="> 0 overrides num_train_epochs")
    warmup_ratio: float = Field(default=0.06, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.98, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(default=1e-6, gt=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="0 disables clipping")
    lr_scheduler_type: Literal["linear", "constant_with_warmup", "cosine", "polynomial"] = "linear"
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    eval_strategy: Literal["steps", "epoch"] = Field(
        default="steps",
        description="steps: evaluate every eval_steps optimiser steps; epoch: at the end of each epoch of each "
        "stage (eval_steps is not read)",
    )
    eval_steps: int = Field(default=100, ge=1)
    save_steps: int | None = Field(default=None, ge=1, description="None saves at every evaluation")
    metric_for_best_model: MetricName | None = Field(
        default=None,
        description="the task metric that is the run's score and picks its best evaluation; None: the task's main metric",
    )
    load_best_model_at_end: bool = Field(
        default=False,
        description="the student the run saves at its end is the one of its best prediction-stage evaluation "
        "(its weights travel in every checkpoint), not the last one",
    )
    max_seq_length: int = Field(default=128, ge=8)
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    mixed_precision: Literal["auto", "no"] = Field(
        default="auto",
        description="with bf16 and fp16 both false: auto uses bf16 where the device multiplies bf16 "
        "natively (Ampere+ GPUs, CPUs with AMX), else fp16 on GPUs and fp32 on CPUs; no trains in fp32",
    )
    max_train_samples: int | None = Field(default=None, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)
    group_by_length: bool = False
    dataloader_num_workers: int = Field(default=0, ge=0)
    teacher_logits_cache: bool = Field(
        default=True,
        description="when a stage needs only the teacher's logits, compute them once per teacher and data "
        "and share them across the sweep's trials",
    )
    num_processes: int = Field(
        default=1, ge=1, description="data-parallel processes in one run: one per GPU, or CPU processes (gloo)"
    )
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description="torch.compile the student's training step and the live teacher's forward, padding training "
        "batches to length buckets (trainables/compile.py); auto: only on a GPU where bench/gpu_check.sh measured a "
        "gain, which no GPU has yet, so off everywhere for now",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` as false.
        return "no" if value is False else value

    @model_validator(mode="after")
    def _one_precision(self) -> TrainingConfig:
        if self.bf16 and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are both true: choose one")
        return self


FidelityName = Literal["authors", "clean"]


class FidelityConfig(StrictModel):
    """Switches that reproduce behaviours of the study's released code (shared/paper_spec.md).

    Written `fidelity: clean` (the default: every switch false), `fidelity: authors` (every switch
    true), or as a mapping whose `defaults` (clean or authors) sets the switches it does not name:
    `{defaults: authors, teacher_dropout: false}`. The study's plain errors are never switches
    (README, "Fidelity to the study").
    """

    AUTHORS: ClassVar[frozenset[str]] = frozenset({
        "ild_scale_by_batch", "count_padding", "teacher_dropout", "crd_without_replacement",
        "mapping_floor", "minilm_v2_last_pair",
    })

    defaults: FidelityName = Field(
        default="clean", description="the value of every switch not set: clean (false) or authors (true)"
    )
    ild_scale_by_batch: bool = Field(
        default=False,
        description="scale intermediate-layer terms by 1/batch size against CE/KD, as fairseq did (3.10)",
    )
    count_padding: bool = Field(
        default=False,
        description="average hidden MSE, value relations, attention MSE and pear_col over padded positions too",
    )
    teacher_dropout: bool = Field(
        default=False, description="keep the teacher's dropout active while distilling (7.1)"
    )
    crd_without_replacement: bool = Field(
        default=False,
        description="draw each anchor's CRD negatives without replacement (with replacement where nce_k reaches "
        "the smallest pool of negatives), as the study's sampler (3.5)",
    )
    mapping_floor: bool = Field(
        default=False,
        description="layer pairs j * floor(L_T / L_S), as the study, which leaves the top teacher layers out "
        "when L_S does not divide L_T (5); false spreads the pairs up to the top layer",
    )
    minilm_v2_last_pair: bool = Field(
        default=False, description="minilm_v2 on the last layer pair only, as the study (4); false sums every pair"
    )

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value
        named = "defaults " if isinstance(value, dict) else ""  # the field's name is the message's prefix
        value = value if isinstance(value, dict) else {"defaults": value}
        defaults = value.get("defaults", "clean")
        if defaults not in get_args(FidelityName):
            raise ValueError(
                f"{named}{str(defaults)[:40]!r} is not known: choose authors (every behaviour of the study's "
                "released code that distillsweep reproduces) or clean (the default), or give a mapping of switches"
            )
        return {**{name: defaults == "authors" for name in cls.AUTHORS}, **value}


class PretrainFidelity(FidelityConfig):
    """FidelityConfig for task-agnostic runs: `authors` leaves ild_scale_by_batch off, since the
    study's task-agnostic code (DeepSpeed) does not divide its losses by the batch size."""

    AUTHORS: ClassVar[frozenset[str]] = FidelityConfig.AUTHORS - {"ild_scale_by_batch"}


class RunSettings(StrictModel):
    """What every run shares, whatever it trains on: teacher, student, loss terms, layer mapping,
    training, fidelity switches and folders. Paths are kept as given; the run resolves them against
    its cwd."""

    # Loss label of a run with no objective: its own loss alone.
    OWN_LOSS: ClassVar[str] = "ce"

    teacher: str | None = Field(
        default=None,
        description="local directory, hub id, or MLflow model URI (models:/, runs:/); "
        "None fine-tunes a pretrained student with no teacher",
    )
    student: StudentConfig = StudentConfig()
    objectives: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec(name="kd", weight=0.5)])
    mapping: MappingPreset | list[Annotated[int, Field(ge=0)]] = "skip"
    training: TrainingConfig = TrainingConfig()
    fidelity: FidelityConfig = Field(
        default=FidelityConfig(), description="clean (default), authors, or a mapping of switches (FidelityConfig)"
    )
    output_dir: Path = Field(
        default=Path("runs/default"),
        description="unset, `distillsweep run` makes a new folder runs/<UTC time>-<objective mix>-<random> "
        "(trials of a sweep write to private scratch folders)",
    )
    cache_dir: Path | None = Field(default=None, description="tokenisation cache; None uses ~/.cache/distillsweep")

    @model_validator(mode="after")
    def _mapping_fits_student(self) -> RunSettings:
        if isinstance(self.mapping, list) and len(self.mapping) > self.student.num_layers:
            raise ValueError(
                f"mapping lists {len(self.mapping)} teacher layers {self.mapping} but the student has "
                f"{self.student.num_layers} layers: give at most one teacher layer per student layer"
            )
        return self

    @property
    def objective_mix(self) -> str:
        """A stable label of the loss terms, e.g. `att_mse+hidden_mse`."""
        return "+".join(sorted(o.name for o in self.objectives)) or self.OWN_LOSS


class RunConfig(RunSettings):
    """One task-specific distillation run (or, with no teacher, the fine-tuning of a student)."""

    task: str | LocalTask = Field(
        description="a GLUE task (sst2, mnli, ...), demo, or a local task {train_file, validation_file, ...}"
    )
    ce_weight: float = Field(default=0.5, ge=0.0, description="weight of cross-entropy on gold labels")
    stages: Literal["one_stage", "two_stage", "auto"] = Field(
        default="one_stage",
        description="auto: two_stage when the mix has an intermediate-layer objective, as the study's launcher did",
    )

    @model_validator(mode="after")
    def _coherent(self) -> RunConfig:
        from trainables.objectives import REGISTRY, Stage

        names = [o.name for o in self.objectives]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"objectives: {duplicates} listed more than once; give each objective once")
        if not self.objectives and self.ce_weight == 0:
            raise ValueError("objectives is empty and ce_weight is 0: the run would have no loss")
        if self.teacher is None:
            if self.objectives:
                raise ValueError(
                    f"teacher is missing but objectives {names} need one: give a teacher, or `objectives: []` "
                    "to fine-tune a pretrained student"
                )
            if not isinstance(self.student.init, PretrainedInit):
                raise ValueError("teacher is missing: a run without a teacher fine-tunes student.init {pretrained: ...}")
        stateful = [i for i, n in enumerate(names) if REGISTRY[n].keeps_state]
        if stateful and self.training.num_processes > 1:
            name = names[stateful[0]]
            raise ValueError(
                f"objectives.{stateful[0]}.name {name!r} updates per-example memory banks that data-parallel "
                f"processes would not share, but training.num_processes is {self.training.num_processes}: "
                f"set training.num_processes to 1, or drop {name!r}"
            )
        first_mlm = [i for i, n in enumerate(names) if REGISTRY[n].own_loss_first]
        if first_mlm:
            i = first_mlm[0]
            raise ValueError(
                f"objectives.{i}.name {names[i]!r} is a pre-training method (MLM alone for half the budget, "
                "then attention and value relations): use it in a pre-training run, or minilm (the same loss) here"
            )
        if self.stages == "two_stage":
            if not any(REGISTRY[n].stage is Stage.INTERMEDIATE for n in names):
                raise ValueError(
                    "stages two_stage: objectives hold no intermediate-layer objective for stage 1; "
                    f"add one of {sorted(n for n, o in REGISTRY.items() if o.stage is Stage.INTERMEDIATE)}"
                )
        return self

    @property
    def task_name(self) -> str:
        return task_name_of(self.task)

    @property
    def two_stage(self) -> bool:
        from trainables.objectives import REGISTRY, Stage

        if self.stages == "auto":
            return any(REGISTRY[o.name].stage is Stage.INTERMEDIATE for o in self.objectives)
        return self.stages == "two_stage"


class CorpusConfig(StrictModel):
    """Unlabelled text for pre-training distillation: a hub dataset or local files."""

    dataset: str | None = Field(default=None, description="hub dataset, e.g. wikimedia/wikipedia")
    dataset_config: str | None = Field(default=None, description="e.g. 20231101.en")
    split: str = "train"
    files: list[Path] = Field(default_factory=list, description="local .txt (one document per line), .jsonl, .parquet")
    text_column: str = "text"
    block_size: int = Field(default=128, ge=8)
    validation_fraction: float = Field(default=0.01, gt=0.0, lt=0.5)
    max_train_blocks: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> CorpusConfig:
        if bool(self.dataset) == bool(self.files):
            raise ValueError("corpus: give either dataset (a hub name) or files (local text), not both or neither")
        return self


class PretrainConfig(RunSettings):
    """Task-agnostic distillation: a student distilled on unlabelled text with label-free objectives.

    The budget is counted in optimiser steps (`training.max_steps`), not wall-clock time, so
    results do not depend on the hardware; students are kept at `save_fractions` of the budget.
    """

    OWN_LOSS: ClassVar[str] = "mlm"

    corpus: CorpusConfig
    teacher: str = Field(description="a BERT-family encoder (a masked-LM checkpoint such as bert-base-uncased)")
    student: StudentConfig = StudentConfig(num_layers=6)
    objectives: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec(name="hidden_mse")])
    fidelity: PretrainFidelity = Field(
        default=PretrainFidelity(), description="clean (default), authors, or a mapping of switches (PretrainFidelity)"
    )
    mlm_weight: float = Field(default=0.0, ge=0.0, description="weight of the student's own MLM loss")
    mlm_probability: float = Field(default=0.15, ge=0.0, lt=1.0, description="inputs masked as the study's shards")
    save_fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    training: TrainingConfig = TrainingConfig(max_steps=1000, learning_rate=5e-4, weight_decay=0.01)
    output_dir: Path = Path("runs/pretrain")

    @model_validator(mode="after")
    def _label_free(self) -> PretrainConfig:
        from trainables.objectives import REGISTRY, Reads

        task_reads = {Reads.LOGITS, Reads.LABELS}  # what unlabelled pre-training text cannot give an objective
        for index, spec in enumerate(self.objectives):
            if REGISTRY[spec.name].reads & task_reads:
                free = sorted(n for n, o in REGISTRY.items() if not o.reads & task_reads)
                raise ValueError(
                    f"objectives.{index}.name {spec.name!r} needs gold labels or a task head, which pre-training "
                    f"text has not; label-free objectives: {', '.join(free)}"
                )
        if not self.objectives and self.mlm_weight == 0:
            raise ValueError("objectives is empty and mlm_weight is 0: the run would have no loss")
        if self.training.max_steps <= 0:
            raise ValueError("training.max_steps: a pre-training budget is a number of optimiser steps; set it above 0")
        if self.training.metric_for_best_model is not None:
            raise ValueError("training.metric_for_best_model: pre-training is scored by its loss on held-out text; leave it unset")
        if self.mlm_weight > 0 and self.mlm_probability == 0:
            raise ValueError("mlm_weight > 0 needs mlm_probability > 0: no token would be masked to predict")
        for index, spec in enumerate(self.objectives):
            if REGISTRY[spec.name].own_loss_first:
                if self.mlm_probability == 0:
                    raise ValueError(f"objectives.{index}.name {spec.name!r} trains the MLM loss alone for half the "
                                     "budget: set mlm_probability above 0 so that tokens are masked to predict")
                if self.training.max_steps < 2:
                    raise ValueError(f"objectives.{index}.name {spec.name!r} splits training.max_steps into two "
                                     "halves: set it to 2 or more")
        return self

    @property
    def task(self) -> str:
        """Pre-training has no task; tables and tags show the corpus."""
        return self.corpus.dataset or "corpus"

    @property
    def task_name(self) -> str:
        return self.task

    def save_steps(self) -> set[int]:
        return {max(1, round(f * self.training.max_steps)) for f in self.save_fractions}


RUN_CONFIG = "run_config"  # where a trial's config holds its resolved RunConfig, as JSON
CONFIG_OF_RUN: dict[str, type[RunConfig] | type[PretrainConfig]] = {"distill": RunConfig, "pretrain": PretrainConfig}


def check_against_teacher(
    cfg: RunSettings, teacher_layers: int, teacher_heads: int, teacher_width: int = 0
) -> None:
    """Reject settings that the teacher's architecture makes impossible, naming the field.

    A width of 0 means not known yet (a teacher from an MLflow URI): its checks wait for the run.
    """
    from trainables.objectives import REGISTRY

    last = teacher_layers - 1
    init = cfg.student.init
    if cfg.student.num_layers > teacher_layers and not isinstance(init, PretrainedInit) and init != "random":
        raise ValueError(
            f"student.num_layers {cfg.student.num_layers}: teacher has only {teacher_layers} layers to copy from"
        )
    if isinstance(init, list) and any(i > last for i in init):
        raise ValueError(f"student.init {init}: teacher has {teacher_layers} layers (0-{last})")
    if isinstance(cfg.mapping, list) and any(i > last for i in cfg.mapping):
        raise ValueError(f"mapping {cfg.mapping}: teacher has {teacher_layers} layers (0-{last})")
    student_heads = cfg.student.num_attention_heads or teacher_heads
    student_width = cfg.student.hidden_size or teacher_width
    if student_width and student_width % student_heads:
        raise ValueError(
            f"student.hidden_size {student_width} is not a multiple of student.num_attention_heads "
            f"{student_heads}: each head takes an equal slice of the width"
        )
    for spec in cfg.objectives:
        if REGISTRY[spec.name].matches_heads and student_heads != teacher_heads:
            raise ValueError(
                f"objectives {spec.name!r} matches attention heads one to one, but the student has "
                f"{student_heads} heads and the teacher {teacher_heads}: set student.num_attention_heads "
                f"to {teacher_heads} or choose another objective"
            )
        if spec.name == "minilm_v2" and teacher_width:
            relation_heads = spec.params.get("relation_heads") or teacher_heads
            widths = {"teacher": teacher_width, "student": cfg.student.hidden_size or teacher_width}
            for side, width in widths.items():
                if width % relation_heads:
                    raise ValueError(
                        f"objectives minilm_v2 relation_heads {relation_heads}: must divide the {side}'s "
                        f"width {width}; choose a common divisor of {widths['teacher']} and {widths['student']}"
                    )


MAX_YAML_BYTES = 1 << 20  # sweep, study, run and task files are a few KiB
MAX_YAML_DEPTH = 64  # deeper nesting would only exhaust the composer's recursion
MAX_YAML_VALUES = 100_000  # values a file's aliases may copy; our files hold hundreds in all


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that this project does not read: aliases that copy more than MAX_YAML_VALUES, a
    recursive alias, or nesting past MAX_YAML_DEPTH."""


class PlainLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with aliases counted as the copies they become. A few hundred bytes of
    nested aliases parse cheaply into shared objects but expand to gigabytes wherever the values
    are copied, printed or saved; anchors for defaults (`<<: *base`) and PyYAML's own dumps of
    shared lists stay readable. Nesting is capped so a deep file is refused, not a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliased = 0  # values the aliases so far copy
        self.sizes: dict[int, int] = {}  # id(node) -> its values, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:
                if id(anchored) not in self.sizes:
                    raise RefusedYAML(problem=f"alias *{event.anchor[:40]} refers to the value that holds it: "
                                      "a value without end is refused", problem_mark=event.start_mark)
                self._count(self.sizes[id(anchored)], event)
            return super().compose_node(parent, index)  # an unknown anchor: PyYAML's own error
        if self.depth >= MAX_YAML_DEPTH:
            raise RefusedYAML(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=event.start_mark)
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
        self.sizes[id(node)] = 1 + sum(self.sizes.get(id(child), 1) for child in children)
        return node

    def _count(self, values: int, event: yaml.Event) -> None:
        self.aliased += values
        if self.aliased > MAX_YAML_VALUES:
            raise RefusedYAML(problem=f"aliases copy more than {MAX_YAML_VALUES} values (a small file that expands "
                              "to gigabytes): write the values out", problem_mark=event.start_mark)


def load_yaml(text: str) -> Any:
    """YAML text as plain data (`PlainLoader`); raises yaml.YAMLError (RefusedYAML past its limits)."""
    return yaml.load(text, Loader=PlainLoader)


def yaml_problem(err: yaml.YAMLError, where: str) -> str:
    """One line naming `where`, the line and the column: never a parser traceback."""
    mark = getattr(err, "problem_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{at}: {problem}" if isinstance(err, RefusedYAML) else f"{at}: not valid YAML: {problem}"


def read_yaml(path: Path) -> Any:
    """A YAML file's content (space, study, run and local-task files). A file over MAX_YAML_BYTES is
    refused before parsing; a syntax error (a tab, an unclosed bracket) or an alias bomb is one line."""
    try:
        return load_yaml(read_capped_text(Path(path)))
    except yaml.YAMLError as err:
        raise ValueError(yaml_problem(err, str(path))) from None


def read_capped_text(path: Path) -> str:
    """A config file's UTF-8 text; at most MAX_YAML_BYTES are read, whatever the file is."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ValueError(f"{path}: larger than {MAX_YAML_BYTES >> 10} KiB, refused unparsed; sweep, study, "
                         "run and task files are a few KiB: check that this is the file you meant")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); "
                         "re-save the file as UTF-8") from None


def load_run_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides (`training.learning_rate=1e-4`), validate."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return RunConfig.model_validate(raw)


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `tree['a']['b'] = value` for key `a.b`, creating intermediate mappings."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted_key}: {part!r} holds {child!r}, not a mapping")
        node = child
    node[leaf] = value

