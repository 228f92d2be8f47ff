"""The GPU memory a trial needs, and how many trials share one GPU (`resources.gpu: auto`).

A trial's peak memory is estimated from the shapes of its models and its training settings,
before anything loads (bytes; B batch, T max_seq_length or block_size, L layers, h width,
H heads, f FFN width, V vocabulary, C labels, N parameters; a = 2 under bf16/fp16 autocast, else 4):

    student state      N_s * (4 weights + 4 gradients + 8 AdamW moments) [+ 2 autocast's bf16/fp16
                       copies of the weights] [+ 4 DDP gradient buckets with several processes]
    student activations, per layer (Korthikanti et al. 2022, eq. 1, for any f and a):
                       B*T*((8h + 2f)*a + 2h)     inputs of the QKV, output and FFN products, Q, K, V,
                                                  the GELU's input and output, two 1-byte dropout masks
                       + B*H*T^2*(2a + 1)         softmax output, dropout output and its mask
                     + embeddings B*T*h*9 (fp32 sum, its LayerNorm, a dropout mask)
                     + a masked-LM head B*T*(h*(a + 4) + V*a) [+ B*T*V*8 with the MLM loss: fp32
                       logits and their log-softmax]
                     + objectives: per student layer, 3 fp32 [B,H,T,T] maps for each of attention
                       and Q/K/V relations read, B*T*h*4 for hidden states read; CRD's two memory
                       banks rows*feat_dim*4 each
    teacher            N_t * 4 (fp32 weights, on the device even where its logits are cached)
                     + forward without gradient, where a stage runs it live: every hidden state
                       B*T*h*a*(L+1) [+ Q/K/V B*T*h*a*3L for attention objectives] + one layer at
                       work B*H*T^2*2a + B*T*(4h + f)*a [+ masked-LM logits B*T*V*a]
    logit cache        rows * C * 4, where a stage reads only the teacher's logits and the cache is on
    total              (state + teacher weights + cache + the largest stage's activations) * 1.2
                       + 0.5 GiB of CUDA context

Activations are the larger of the stages (two-stage runs: intermediate layers, then the prediction
layer). T is the longest a batch can be: dynamic padding makes most batches shorter, but the longest
sets the peak. Attention counts [B,H,T,T] as eager attention keeps it; fused kernels keep less, so the
estimate is an upper one there. Evaluation runs at other batch sizes but without gradients and
after the step's activations are freed, so the training step is the peak.

A GPU of M bytes holds k = floor(M / need) trials, at most `max_trials_per_gpu`; each asks Ray for
1/k of it (rounded down at Ray's 1e-4 resolution, so that k fit). A trial of `num_processes` n asks
for n whole GPUs, one per process. A trial that needs more than one GPU holds is refused before the
sweep starts. M comes from `resources.gpu_memory_gb`, else from the GPU type Ray reports per node.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from orchestrator.config import GPU_AUTO
from orchestrator.cost_stages import cached_stages, precision, run_stages
from orchestrator.messages import UserError, brief
from orchestrator.model_shapes import Architecture, UnknownShape, read_architecture, student_architecture
from trainables.config import LocalTask, PretrainConfig, PretrainedInit, RunConfig

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2
MARGIN = 0.2
RAY_RESOLUTION = 10_000  # Ray keeps resource amounts to 1e-4
UNKNOWN_TRAIN_ROWS = 400_000  # the largest GLUE training split (MNLI, 392,702), where the size is not known
GLUE_MOST_LABELS = 3  # labels count in the head and the logit cache only (a few MB): GLUE's most, unless given

# Total memory (GiB, as nvidia-smi reports it, rounded down) of the accelerator types Ray labels nodes
# with. Where one name covers several sizes (A100, V100, H100 NVL), the smaller: set
# resources.gpu_memory_gb for the larger card.
GPU_MEMORY_GIB = {
    "T4": 14.5, "P4": 7.4, "P100": 15.8, "V100": 15.7, "K80": 11.1, "A10G": 22.0, "A10": 22.0, "L4": 22.0,
    "L40": 44.0, "L40S": 44.0, "A40": 44.0, "RTX-A6000": 47.0, "A100": 39.0, "A100-40G": 39.0, "A100-80G": 79.0,
    "H100": 79.0, "H200": 139.0, "H20": 95.0, "B200": 178.0, "GB200": 184.0, "RTX-PRO-6000": 94.0,
}

# --- the estimate: pure functions of shapes and settings ------------------------------------------


@dataclass(frozen=True)
class ModelShape(Architecture):
    """A BERT-family encoder with a sequence-classification or masked-LM head."""

    labels: int = 2
    masked_lm: bool = False

    @classmethod
    def of(cls, architecture: Architecture, labels: int, masked_lm: bool = False) -> ModelShape:
        return cls(*(getattr(architecture, f.name) for f in fields(Architecture)), labels, masked_lm)

    @classmethod
    def of_config(cls, config: Any, labels: int, masked_lm: bool = False) -> ModelShape:
        """From a transformers config (BERT, RoBERTa, ELECTRA... field names)."""
        return cls.of(Architecture.of_config(config), labels, masked_lm)

    @property
    def parameters(self) -> int:
        """Embeddings (word, position, token type, LayerNorm), layers, and the head (pooler and
        classifier; or the masked-LM transform and bias, its decoder tied to the word embeddings)."""
        h, f = self.hidden, self.intermediate
        embeddings = (self.vocab + self.positions + self.type_vocab) * h + 2 * h
        layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        head = h * h + 3 * h + self.vocab if self.masked_lm else h * h + h + h * self.labels + self.labels
        return embeddings + self.layers * layer + head


@dataclass(frozen=True)
class StageLoad:
    """What one training stage keeps besides the student's own activations."""

    teacher_live: bool = False  # the teacher runs forward (else its logits come from the cache, or no teacher)
    teacher_qkv: bool = False  # hooks keep every teacher layer's Q/K/V
    relation_kinds: int = 0  # attention maps and Q/K/V relations read (0-2): 3 fp32 [B,H,T,T] maps each
    hidden_states: bool = False
    lm_loss: bool = False


@dataclass(frozen=True)
class Workload:
    batch: int
    length: int
    half_precision: bool
    stages: tuple[StageLoad, ...] = (StageLoad(),)
    processes: int = 1
    cache_rows: int = 0  # rows of the teacher-logit cache on the device; 0 without it
    bank_floats: int = 0  # floats of objectives' per-example memory banks (CRD)


@dataclass(frozen=True)
class MemoryNeed:
    """A trial's estimated peak, in bytes, by part."""

    student_state: int
    activations: int  # the largest stage: the student's, its objectives' and the live teacher's forward
    teacher_weights: int
    logit_cache: int
    margin: int
    context: int = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        return (self.student_state + self.activations + self.teacher_weights + self.logit_cache + self.margin
                + self.context)


def activation_bytes(half_precision: bool) -> int:
    return 2 if half_precision else 4


def encoder_activations(s: ModelShape, batch: int, length: int, a: int, mask_bytes: int = 1) -> int:
    """What autograd keeps of the embeddings and layers: see the module's formula. CUDA's dropout
    keeps 1-byte masks; the CPU's keeps them in the activations' dtype."""
    bt, scores = batch * length, batch * s.heads * length**2
    layer = bt * ((8 * s.hidden + 2 * s.intermediate) * a + 2 * s.hidden * mask_bytes) + scores * (2 * a + mask_bytes)
    return s.layers * layer + bt * s.hidden * (8 + mask_bytes)


def student_activations(s: ModelShape, w: Workload, stage: StageLoad) -> int:
    a, bt, scores = activation_bytes(w.half_precision), w.batch * w.length, w.batch * s.heads * w.length**2
    head = bt * (s.hidden * (a + 4) + s.vocab * a) + (bt * s.vocab * 8 if stage.lm_loss else 0) if s.masked_lm else 0
    objectives = s.layers * (3 * stage.relation_kinds * scores * 4 + (bt * s.hidden * 4 if stage.hidden_states else 0))
    return encoder_activations(s, w.batch, w.length, a) + head + objectives


def teacher_forward(t: ModelShape, w: Workload, stage: StageLoad) -> int:
    if not stage.teacher_live:
        return 0
    a, bt = activation_bytes(w.half_precision), w.batch * w.length
    kept = bt * t.hidden * a * (t.layers + 1) + (bt * t.hidden * a * 3 * t.layers if stage.teacher_qkv else 0)
    working = w.batch * t.heads * w.length**2 * 2 * a + bt * (4 * t.hidden + t.intermediate) * a
    return kept + working + (bt * t.vocab * a if t.masked_lm else 0)


def estimate(student: ModelShape, teacher: ModelShape | None, work: Workload) -> MemoryNeed:
    """The peak memory of one training process of a trial (see the module's formula)."""
    per_parameter = 16 + (2 if work.half_precision else 0) + (4 if work.processes > 1 else 0)
    state = student.parameters * per_parameter + work.bank_floats * 4
    activations = max(
        student_activations(student, work, stage) + (teacher_forward(teacher, work, stage) if teacher else 0)
        for stage in work.stages
    )
    weights = teacher.parameters * 4 if teacher else 0
    cache = work.cache_rows * student.labels * 4
    margin = math.ceil(MARGIN * (state + activations + weights + cache))
    return MemoryNeed(state, activations, weights, cache, margin)


class GpuTooSmall(UserError):
    """One trial needs more memory than one GPU has."""


def trials_per_gpu(need: int, gpu_bytes: int, most: int) -> int:
    """How many trials of `need` bytes fit on one GPU, at most `most`; 0 when not one."""
    return min(gpu_bytes // need, most)


def gpu_share(need: MemoryNeed, gpu_bytes: int, processes: int = 1, most: int = 8, what: str = "a trial") -> float:
    """The GPUs to ask Ray for: 1/k of one (k trials fit), or one whole GPU per process."""
    fit = trials_per_gpu(need.total, gpu_bytes, most)
    if fit < 1:
        raise GpuTooSmall(
            f"resources.gpu auto: {what} needs about {need.total / GIB:.1f} GiB per process "
            f"({describe_need(need)}), but one GPU holds {gpu_bytes / GIB:.1f} GiB: lower "
            "training.per_device_train_batch_size or max_seq_length, or use larger GPUs"
        )
    if processes > 1:
        return float(processes)
    return math.floor(RAY_RESOLUTION / fit) / RAY_RESOLUTION


def describe_need(need: MemoryNeed) -> str:
    parts = {"student state": need.student_state, "activations": need.activations,
             "teacher weights": need.teacher_weights, "logit cache": need.logit_cache,
             "margin": need.margin, "CUDA context": need.context}
    return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts.items() if value)


# --- from a trial's config -----------------------------------------------------------------------


@functools.cache
def model_shape(source: str, labels: int, masked_lm: bool = False) -> ModelShape:
    """The shape of a model directory, hub id or MLflow URI (orchestrator.model_shapes)."""
    try:
        return ModelShape.of(read_architecture(source), labels, masked_lm)
    except UnknownShape as err:
        raise unreadable(err) from None


def unreadable(err: UnknownShape) -> UserError:
    return UserError(f"resources.gpu auto: {err}: give resources.gpu as a number")


def task_labels(cfg: RunConfig | PretrainConfig) -> int:
    task = getattr(cfg, "task", None)
    return (task.num_labels if isinstance(task, LocalTask) else None) or GLUE_MOST_LABELS


def stage_loads(cfg: RunConfig | PretrainConfig) -> tuple[tuple[StageLoad, ...], bool, int]:
    """Each stage's load, whether some stage reads the logit cache, and the CRD bank width."""
    from trainables.distiller import make_terms
    from trainables.objectives import Reads

    stages, own_loss = run_stages(cfg), isinstance(cfg, PretrainConfig)
    cached = cached_stages(cfg, stages)
    loads = tuple(
        StageLoad(teacher_live=stage.needs_teacher and not from_cache, teacher_qkv=stage.needs_qkv,
                  relation_kinds=(Reads.ATTENTION in stage.reads) + (Reads.QKV in stage.reads),
                  hidden_states=Reads.HIDDEN_STATES in stage.reads, lm_loss=own_loss and stage.ce_weight > 0)
        for stage, from_cache in zip(stages, cached)
    )
    banks = [t for t in make_terms(cfg.objectives) if t.objective.keeps_state]
    bank_width = sum(2 * getattr(t.params, "feat_dim", 0) for t in banks)
    return loads, any(cached), bank_width


def workload_of(cfg: RunConfig | PretrainConfig) -> Workload:
    training = cfg.training
    length = cfg.corpus.block_size if isinstance(cfg, PretrainConfig) else training.max_seq_length
    rows = min(training.max_train_samples or UNKNOWN_TRAIN_ROWS, UNKNOWN_TRAIN_ROWS)
    loads, cached, bank_width = stage_loads(cfg)
    half = precision(training, auto="bf16") != "fp32"  # auto is bf16 or fp16 on every GPU
    return Workload(training.per_device_train_batch_size, length, half, loads, training.num_processes,
                    cache_rows=rows if cached else 0, bank_floats=rows * bank_width)


def shapes_of(cfg: RunConfig | PretrainConfig, teacher_source: str | None,
              known: dict[str, Architecture] | None = None) -> tuple[ModelShape, ModelShape | None]:
    """(student, teacher) of a trial; `teacher_source` is where the teacher's architecture can be read,
    `known` the shapes of students no file describes yet (a study's stage-1 students, in its dry run)."""
    labels, masked_lm = task_labels(cfg), isinstance(cfg, PretrainConfig)
    teacher = model_shape(teacher_source, labels, masked_lm) if teacher_source else None
    try:
        student = student_architecture(cfg.student, teacher, known)
    except UnknownShape as err:
        raise unreadable(err) from None
    return ModelShape.of(student, labels, masked_lm), teacher


# --- the cluster ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeGpus:
    """One Ray node as placement sees it."""

    name: str
    cpus: float
    gpus: float
    accelerator: str | None = None


def cluster_nodes() -> list[NodeGpus]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        types = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
        nodes.append(NodeGpus(node.get("NodeManagerAddress", "?"), resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                              types[0] if types else None))
    return nodes


def gpu_memory_gib(nodes: Iterable[NodeGpus] | None, given: float | None) -> float | None:
    """One GPU's memory: `given` (also for GPU nodes an autoscaler has not started yet), else the
    smallest of the GPU nodes' types; None without GPUs."""
    if given is not None:
        return given
    gpu_nodes = [node for node in nodes or [] if node.gpus > 0]
    for node in gpu_nodes:
        if node.accelerator not in GPU_MEMORY_GIB:
            kind = f"of type {node.accelerator}" if node.accelerator else "whose type Ray does not report"
            raise UserError(f"resources.gpu auto: node {node.name} has {node.gpus:g} GPUs {kind}, whose memory is "
                            "not known here: give it with --gpu-memory-gb (or resources.gpu_memory_gb, in GiB)")
    return min((GPU_MEMORY_GIB[node.accelerator] for node in gpu_nodes), default=None)


# --- the plan and what Tune asks Ray for -----------------------------------------------------------


@dataclass(frozen=True)
class TrialFit:
    """The memory and GPU share of the trials that share one shape and workload."""

    student: ModelShape
    teacher: ModelShape | None
    work: Workload
    need: MemoryNeed
    gpu: float  # what each trial asks Ray for
    per_gpu: int  # trials sharing one GPU; 0 for whole GPUs, or when GPU memory is unknown
    tasks: tuple[str, ...] = ()
    mixes: tuple[str, ...] = ()  # the objective mixes of its trials, `att_kl+kd`

    @property
    def label(self) -> str:
        """What sets the need: e.g. `student 3x768, teacher 12x768 (live: hidden, Q/K/V), batch 32 x 512, bf16`."""
        s, w = self.student, self.work
        processes = f", {w.processes} processes" if w.processes > 1 else ""
        return (f"student {s.layers}x{s.hidden}, {self.teacher_label}, batch {w.batch} x {w.length} tokens, "
                f"{'bf16/fp16' if w.half_precision else 'fp32'}{processes}")

    @property
    def teacher_label(self) -> str:
        if self.teacher is None:
            return "no teacher"
        stages = self.work.stages
        reads = [name for name, read in (("hidden", any(s.hidden_states for s in stages)),
                                         ("attention", any(s.relation_kinds for s in stages)),
                                         ("Q/K/V", any(s.teacher_qkv for s in stages))) if read]
        live = any(s.teacher_live for s in stages)
        how = f"live: {', '.join(reads) or 'logits'}" if live else "logit cache"
        if live and self.work.cache_rows:
            how += "; then logit cache"
        return f"teacher {self.teacher.layers}x{self.teacher.hidden} ({how})"

    def as_json(self) -> dict[str, Any]:
        return {"trials": self.label, "tasks": list(self.tasks), "mixes": list(self.mixes),
                "gib_per_trial": self.need.total / GIB, "gpu_per_trial": self.gpu or None,
                "trials_per_gpu": self.per_gpu or None}


@dataclass
class GpuPacking:
    """Sizes each trial's GPU share from its config: Tune calls it as each trial is added
    (`tune.with_resources(trainable, packing)`); `fits` are the shapes seen so far."""

    spec: Any  # SweepSpec
    template: Any  # TrialTemplate
    gpu_memory_gib: float | None
    fits: dict[tuple, TrialFit] = field(default_factory=dict)
    known: dict[str, Architecture] = field(default_factory=dict)  # students no file describes yet (shapes_of)

    def fit(self, cfg: RunConfig | PretrainConfig) -> TrialFit:
        """The trial's fit; GpuTooSmall when one GPU cannot hold it."""
        from orchestrator.teachers import teacher_source

        source = teacher_source(self.spec, cfg) if cfg.teacher is not None else None
        student, teacher = shapes_of(cfg, source, self.known)
        work = workload_of(cfg)
        key = (student, teacher, work)
        if key not in self.fits:
            need = estimate(student, teacher, work)
            gpu, per_gpu = 0.0, 0
            if self.gpu_memory_gib:
                gpu_bytes, most = int(self.gpu_memory_gib * GIB), self.spec.resources.max_trials_per_gpu
                gpu = gpu_share(need, gpu_bytes, work.processes, most, f"a trial ({brief(cfg.task_name)})")
                per_gpu = 0 if work.processes > 1 else trials_per_gpu(need.total, gpu_bytes, most)
            self.fits[key] = TrialFit(student, teacher, work, need, gpu, per_gpu)
        fit = self.fits[key]
        mix = "+".join(o.name for o in cfg.objectives)
        tasks = tuple(dict.fromkeys((*fit.tasks, cfg.task_name)))
        mixes = tuple(dict.fromkeys((*fit.mixes, mix) if mix else fit.mixes))
        if (tasks, mixes) != (fit.tasks, fit.mixes):
            fit = self.fits[key] = replace(fit, tasks=tasks, mixes=mixes)
        return fit

    def check(self, configs: Iterable[RunConfig | PretrainConfig]) -> list[TrialFit]:
        """The fits of the sweep's representative configs (both bounds of every range: memory grows with
        batch and length); GpuTooSmall names the first that one GPU cannot hold."""
        for cfg in configs:
            self.fit(cfg)
        return list(self.fits.values())

    def resources(self, trial_config: dict[str, Any]) -> dict[str, float]:
        """What one trial asks for. A trial that cannot be sized (a draw that is no valid config fails
        in its trial anyway) asks for a whole GPU where there are GPUs."""
        try:
            gpu = self.fit(self.template.resolve(trial_config)).gpu
        except (ValueError, UserError):
            gpu = 1.0 if self.gpu_memory_gib else 0.0
        return {"CPU": self.spec.resources.cpu, "GPU": gpu}

    def __call__(self, trial_config: dict[str, Any]) -> Any:
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([self.resources(trial_config)])


def plan_rows(fits: Iterable[TrialFit], nodes: list[NodeGpus] | None, cpu: float) -> list[dict[str, str]]:
    """One row per trial shape: need, GPU share, trials per GPU and at once per GPU node (its CPUs
    bound that too); `nodes` None where no cluster is known (a dry run without --address)."""
    rows = []
    for fit in fits:
        per_node = [f"{node.name}: {trials_at_once(fit, node, cpu)}" for node in nodes or [] if node.gpus > 0 and fit.gpu]
        rows.append({
            "trials": fit.label, "of": "; ".join(", ".join(names) for names in (fit.tasks, fit.mixes) if names),
            "GiB per trial": f"{fit.need.total / GIB:.1f}",
            "share": f"GPU {fit.gpu:g}, {fit.per_gpu} per GPU" if fit.per_gpu else f"{fit.gpu:g} GPUs, one per process",
            "trials per node": "; ".join(per_node) or "-",
        })
    return rows


def trials_at_once(fit: TrialFit, node: NodeGpus, cpu: float) -> int:
    by_cpu = int(node.cpus // cpu)
    by_gpu = int(node.gpus // fit.gpu) if fit.gpu >= 1 else int(node.gpus) * fit.per_gpu
    return min(by_cpu, by_gpu)


def plan_lines(fits: Iterable[TrialFit], nodes: list[NodeGpus] | None, cpu: float, memory_gib: float | None) -> list[str]:
    """The plan as printed lines (the sweep's start and `--dry-run`): shares where the GPU's memory is
    known, trials at once where the cluster's nodes are."""
    if memory_gib is None:
        head = ("GPU memory unknown: give --gpu-memory-gb (resources.gpu_memory_gb) for trials per GPU"
                if nodes is None else "no GPU in the Ray cluster: trials run on CPUs")
    else:
        head = f"one GPU holds {memory_gib:g} GiB; 20% margin and 0.5 GiB CUDA context per trial included"
    lines = [f"resources.gpu auto: {head}"]
    for row in plan_rows(fits, nodes, cpu):
        share = f", {row['share']}" if memory_gib is not None else ""
        at_once = f"; at once: {row['trials per node']}" if nodes is not None else ""
        lines.append(f"  {row['trials']} [{row['of']}]: {row['GiB per trial']} GiB{share}{at_once}")
    return lines


def teacher_task_gpus(resources: Any) -> int:
    """Whole GPUs for a teacher fine-tuning task: the trials' count rounded up; with gpu auto, one
    where the cluster has GPUs (a teacher fine-tunes alone on its GPU)."""
    if resources.gpu != GPU_AUTO:
        return math.ceil(resources.gpu)
    return int(any(node.gpus > 0 for node in cluster_nodes()))


def representative_configs(spec: Any, template: Any = None) -> list[RunConfig | PretrainConfig]:
    """The configs `validate` checked (every grid/choice value, both bounds of every range), resolved
    as trials get them (by `template`, else the spec's own); draws that are no valid config are left
    to fail in their trials."""
    from orchestrator.preflight import representative_assignments
    from orchestrator.trials import TrialTemplate

    template = template or TrialTemplate(spec.base, spec.per_task, kind=spec.run)
    configs = []
    for assignment in representative_assignments(spec):
        try:
            configs.append(template.resolve(assignment))
        except ValueError:
            continue
    return configs


@dataclass(frozen=True)
class DryRunPlan:
    """What `--dry-run` shows of gpu auto: each trial shape's need and share, and trials per GPU."""

    memory_gib: float | None  # one GPU's; None: not given, so no shares
    cpu: float
    fits: tuple[TrialFit, ...] = ()
    note: str | None = None  # why no shape is planned

    def lines(self) -> list[str]:
        if self.note is not None:
            return [f"resources.gpu auto: {self.note}"]
        return plan_lines(self.fits, None, self.cpu, self.memory_gib)

    def as_json(self) -> dict[str, Any]:
        return {"gpu_memory_gib": self.memory_gib, "note": self.note, "trials": [fit.as_json() for fit in self.fits]}


def dry_run_plan(spec: Any, configs: list[RunConfig | PretrainConfig],
                 known: dict[str, Architecture] | None = None) -> DryRunPlan:
    """The plan of a sweep with gpu auto, on GPUs of `resources.gpu_memory_gb` (--gpu-memory-gb).
    Students in MLflow are read when their stage starts, unless `known` has their shape (a study's
    stage-1 students). GpuTooSmall and unreadable shapes are raised."""
    known = known or {}
    memory, cpu = spec.resources.gpu_memory_gb, spec.resources.cpu
    if students_in_mlflow(configs, known):
        return DryRunPlan(memory, cpu,
                          note="the students are models in MLflow, whose shapes are read when the stage starts")
    return DryRunPlan(memory, cpu, tuple(GpuPacking(spec, None, memory, known=known).check(configs)))


def students_in_mlflow(configs: list[RunConfig | PretrainConfig], known: dict[str, Architecture]) -> bool:
    """Whether a trial fine-tunes a student from MLflow whose shape is not `known` (trainables.models,
    and the transformers it brings, imported only where some student is pretrained)."""
    pretrained = {cfg.student.init.pretrained for cfg in configs if isinstance(cfg.student.init, PretrainedInit)}
    if not pretrained - known.keys():
        return False
    from trainables.model_source import MLFLOW_URI_PREFIXES

    return any(source.startswith(MLFLOW_URI_PREFIXES) for source in pretrained - known.keys())
