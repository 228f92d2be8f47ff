"""Figure 1: training throughput of our run against torchdistill and against a plain PyTorch loop.

Every run trains the same student (copied from the same teacher, same seed) from the same teacher
on the same objective mix (0.5 CE + 0.5 KD at T=2 + hidden-state MSE over real tokens, skip
mapping + attention-map KL over real keys), with AdamW (decay / no-decay groups), a linear
warm-up schedule, gradient clipping, the same batch size, max_seq_length and the very same
sequence of batches (our epoch order), in one process, one after another, in rotating order,
`--repeats` times. Throughput is training examples per second over `steps` steps after `warmup`
steps, data loading and collation included, evaluation and checkpoints excluded.

- ours: `trainables.run.distill` end to end as a user gets it: the precision its `auto` default
  picks on this device (bf16 autocast on GPUs and on CPUs with AMX) and fused AdamW; the window
  is timed by its `on_step` callback, called after each optimiser step.
- ours_fp32: the same with `mixed_precision: no`.
- torchdistill: its `DistillationBox` (forward hooks declared in the config, `WeightedSumLoss`
  of its own `KDLoss` plus two mid-level losses registered through its registry for the masked
  hidden-state MSE and attention KL, its data loader, optimiser and scheduler registries, its
  `forward_process` / `post_forward_process` step), driven as its Hugging Face example does, in
  fp32 (1.1.5 has no mixed precision without an Accelerator, and cannot take one from accelerate
  1.x) with torch's AdamW as its YAML names it; torchdistill_fused adds `fused: true` to the
  optimiser's kwargs.
- plain: a hand-written PyTorch loop doing the same maths in fp32 with fused AdamW and nothing
  around it: ours_fp32 / plain is our overhead.

Before timing, the fp32 implementations' losses on the first batch (student without dropout) are
compared, so they are known to compute the same thing; our loss in its default precision is
reported beside them.
"""

from __future__ import annotations

from bench import common  # noqa: I001  (sets thread and offline environment before torch)

import copy
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.training import adamw_implementation, param_groups

NAME = "throughput"


def extra_args(parser) -> None:
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of the five runs (default 3 on CPU, 5 on GPU; 1 at smallest)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CPU, 30 on GPU; 3 at smallest)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CPU, 10 on GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="per_device_train_batch_size (default 32)")
    parser.add_argument("--compiled", action="store_true",
                        help="also ours_compiled: ours with training.compile true (compilation inside the timed steps)")
    common.add_teacher_args(parser)


# --- shared set-up ------------------------------------------------------------------------------


class Setup:
    """Teacher, base student, tokenised data and the batch sequence every implementation uses."""

    def __init__(self, cfg, warmup: int, steps: int) -> None:
        from transformers import AutoTokenizer

        from trainables.data import make_collator
        from trainables.mapping import layer_pairs
        from trainables.model_source import resolve_model_source
        from trainables.models import build_student, encoder_layers, load_teacher
        from trainables.data import load_task_data
        from trainables.tasks import resolve_task
        from trainables.training import epoch_batches

        self.cfg = cfg
        self.warmup, self.steps = warmup, steps
        source = resolve_model_source(cfg.teacher)
        self.spec = resolve_task(cfg.task)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.teacher = load_teacher(source, self.spec.num_labels).eval().requires_grad_(False)
        torch.manual_seed(cfg.training.seed)
        self.student = build_student(self.teacher, cfg.student, self.spec.num_labels).to(device())
        self.teacher.to(device())
        self.data = load_task_data(self.spec, self.tokenizer, cfg.training, cfg.cache_dir)
        self.collate = make_collator(self.tokenizer)
        lengths = [len(x) for x in self.data.train["input_ids"]]
        t = cfg.training
        self.batches: list[list[int]] = []
        for epoch in itertools.count():  # our loop's batches, epoch after epoch, as many as the steps need
            if len(self.batches) >= warmup + steps:
                break
            self.batches += epoch_batches(lengths, t.per_device_train_batch_size, t.seed, epoch, False)
        self.batches = self.batches[: warmup + steps]
        self.teacher_layers = len(encoder_layers(self.teacher))
        self.pairs = layer_pairs(cfg.mapping, self.teacher_layers, cfg.student.num_layers)
        self.total_steps = warmup + steps
        self.num_heads = self.teacher.config.num_attention_heads
        self.temperature = cfg.objectives[0].params.get("temperature", 2.0)
        self.mean_tokens = sum(
            max(lengths[i] for i in b) * len(b) for b in self.batches[warmup:]
        ) / sum(len(b) for b in self.batches[warmup:])

    def fresh_student(self) -> nn.Module:
        return copy.deepcopy(self.student)

    def optimizer(self, model: nn.Module):
        """AdamW with decay / no-decay groups and a linear warm-up schedule, as our loop builds them."""
        from transformers import get_scheduler

        t = self.cfg.training
        groups = param_groups(model, t.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                      **adamw_implementation([p for g in groups for p in g["params"]]))
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps),
                                  num_training_steps=self.total_steps)
        return optimizer, scheduler


# --- ours ---------------------------------------------------------------------------------------


def ours_examples_per_second(setup: Setup, out: Path, precision: str, compile: bool = False,
                             stamps: dict[int, float] | None = None) -> float:
    """`compile`: the compiled variant (`training.compile: true`, batches padded to length buckets).
    `stamps`, where given, receives the time after every step from the warm-up's last on, for
    per-step figures (bench.gpu_speed)."""
    from trainables.run import distill

    training = setup.cfg.training.model_copy(update={"mixed_precision": precision, "compile": compile})
    cfg = setup.cfg.model_copy(update={"output_dir": out, "training": training})
    every = stamps is not None
    stamps = {} if stamps is None else stamps

    def on_step(step: int, total: int) -> None:  # called right after each optimiser step
        if step in (setup.warmup, setup.total_steps) or (every and step > setup.warmup):
            sync()
            stamps[step] = time.perf_counter()

    with common.silence():
        distill(cfg, on_step=on_step)
    timed = setup.batches[setup.warmup:]
    return sum(len(b) for b in timed) / (stamps[setup.total_steps] - stamps[setup.warmup])


def ours_first_loss(setup: Setup, precision: str = "no") -> float:
    """Our loss on the first batch; `auto` runs it under the autocast our run would pick here."""
    from trainables.distiller import Distiller, Term, plan_stages
    from trainables.models import forward_view
    from trainables.objectives import REGISTRY
    from trainables.precision import precision_here

    cfg = setup.cfg
    terms = [Term(REGISTRY[o.name], o.weight, REGISTRY[o.name].parse_params(o.params)) for o in cfg.objectives]
    stage = plan_stages(terms, cfg.ce_weight, two_stage=False)[0]
    distiller = Distiller(setup.fresh_student().eval(), {}, setup.pairs, False, False)
    columns = setup.data.train[setup.batches[0]]
    batch = to_device(setup.collate([dict(zip(columns, values)) for values in zip(*columns.values())]))
    chosen = precision_here(cfg.training.model_copy(update={"mixed_precision": precision}))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(chosen)
    with torch.no_grad(), torch.autocast(device().type, dtype=dtype, enabled=dtype is not None):
        teacher_view = forward_view(setup.teacher, batch, need_qkv=stage.needs_qkv)
        loss, _ = distiller(batch, teacher_view, stage)
    return loss.float().item()


# --- plain PyTorch ------------------------------------------------------------------------------


class QK:
    """Forward hooks keeping the query and key projections of chosen layers as [B, H, T, d]."""

    def __init__(self, model: nn.Module, layers: list[int], heads: int) -> None:
        self.heads, self.q, self.k, self.handles = heads, {}, {}, []
        for i in layers:
            attention = model.base_model.encoder.layer[i].attention.self
            self.handles.append(attention.query.register_forward_hook(self._keep(self.q, i)))
            self.handles.append(attention.key.register_forward_hook(self._keep(self.k, i)))

    def _keep(self, store: dict, i: int):
        def hook(module, inputs, output):
            b, t, w = output.shape
            store[i] = output.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def plain_loss(setup: Setup, student, teacher_qk: QK, student_qk: QK, batch: dict, labels) -> torch.Tensor:
    """0.5 CE + 0.5 T^2 KL + sum of masked hidden MSEs + sum of attention KLs, written out."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        t_out = setup.teacher(**inputs, output_hidden_states=True)
    s_out = student(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].float()
    temp = setup.temperature
    loss = 0.5 * F.cross_entropy(s_out.logits, labels)
    loss = loss + 0.5 * temp * temp * F.kl_div(
        F.log_softmax(s_out.logits / temp, -1), F.log_softmax(t_out.logits / temp, -1), log_target=True,
        reduction="batchmean")
    width = s_out.hidden_states[0].shape[-1]
    for i, j in setup.pairs.hidden:
        sq = (s_out.hidden_states[i] - t_out.hidden_states[j]).pow(2)
        loss = loss + (sq * mask[..., None]).sum() / (mask.sum() * width)
    keys = inputs["attention_mask"].bool()[:, None, None, :]
    rows = mask[:, None, :]
    for i, j in setup.pairs.attention:
        d = student_qk.q[i].shape[-1]
        s_scores = student_qk.q[i] @ student_qk.k[i].transpose(-1, -2) / math.sqrt(d)
        t_scores = teacher_qk.q[j] @ teacher_qk.k[j].transpose(-1, -2) / math.sqrt(d)
        fill = torch.finfo(s_scores.dtype).min
        p_s = s_scores.masked_fill(~keys, fill).softmax(-1)
        p_t = t_scores.masked_fill(~keys, fill).softmax(-1)
        kl = F.kl_div(p_s.clamp(1e-7, 1.0).log(), p_t, reduction="none").sum(-1)
        loss = loss + (kl * rows).sum() / (rows.sum() * kl.shape[1])
    return loss


def plain_batch(setup: Setup, indices: list[int]):
    columns = setup.data.train[indices]
    features = {k: columns[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in columns}
    batch = setup.tokenizer.pad(features, return_tensors="pt")
    return to_device(dict(batch)), torch.tensor(columns["labels"], device=device())


def plain_hooks(setup: Setup, student) -> tuple[QK, QK]:
    teacher_qk = QK(setup.teacher, [j for _, j in setup.pairs.attention], setup.num_heads)
    student_qk = QK(student, [i for i, _ in setup.pairs.attention], setup.num_heads)
    return teacher_qk, student_qk


def plain_examples_per_second(setup: Setup) -> float:
    student = setup.fresh_student().train()
    optimizer, scheduler = setup.optimizer(student)
    teacher_qk, student_qk = plain_hooks(setup, student)
    examples, start = 0, 0.0
    try:
        for step, indices in enumerate(setup.batches):
            if step == setup.warmup:
                sync()
                start, examples = time.perf_counter(), 0
            batch, labels = plain_batch(setup, indices)
            loss = plain_loss(setup, student, teacher_qk, student_qk, batch, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), setup.cfg.training.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            examples += len(indices)
        sync()
        return examples / (time.perf_counter() - start)
    finally:
        teacher_qk.remove()
        student_qk.remove()


def plain_first_loss(setup: Setup) -> float:
    student = setup.fresh_student().eval()
    teacher_qk, student_qk = plain_hooks(setup, student)
    try:
        batch, labels = plain_batch(setup, setup.batches[0])
        with torch.no_grad():
            return plain_loss(setup, student, teacher_qk, student_qk, batch, labels).item()
    finally:
        teacher_qk.remove()
        student_qk.remove()


# --- torchdistill -------------------------------------------------------------------------------


def import_torchdistill():
    """torchdistill, with the torchvision shim on the path where the real torchvision cannot load."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, str(Path(__file__).resolve().parent / "_shims"))
        import torchvision  # noqa: F401  (the shim; torchdistill reads sys.modules["torchvision.datasets"])
    try:
        import torchdistill
    except ImportError as err:
        raise SystemExit(f"torchdistill is not installed: pip install --no-deps torchdistill==1.1.5 ({err})") from None
    register_torchdistill_extensions()
    return torchdistill


def padding_mask(io_dict: dict, path: str, pad_token_id: int) -> torch.Tensor:
    """[B, T] float mask of real tokens, from the input_ids a forward hook saw entering `path`."""
    return (io_dict[path]["input"] != pad_token_id).float()


class MaskedHiddenMSELoss(nn.Module):
    """Sum over (student module, teacher module) pairs of the MSE of their outputs over real tokens."""

    def __init__(self, pairs: list[list[str]], mask_module_path: str, pad_token_id: int, **kwargs) -> None:
        super().__init__()
        self.pairs, self.mask_module_path, self.pad_token_id = pairs, mask_module_path, pad_token_id

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        mask = padding_mask(student_io_dict, self.mask_module_path, self.pad_token_id)[..., None]
        total = 0.0
        for student_path, teacher_path in self.pairs:
            sq = (student_io_dict[student_path]["output"] - teacher_io_dict[teacher_path]["output"]).pow(2)
            total = total + (sq * mask).sum() / (mask.sum() * sq.shape[-1])
        return total


class AttentionKLLoss(nn.Module):
    """Sum over layer pairs of the mean KL(teacher || student) of attention rows over real keys and queries.

    Attention scores are rebuilt from the query and key projections captured by forward hooks
    (`<layer>.attention.self.query` / `.key`), as no attention implementation returns them.
    """

    def __init__(self, pairs: list[list[str]], num_heads: int, mask_module_path: str, pad_token_id: int,
                 **kwargs) -> None:
        super().__init__()
        self.pairs, self.heads = pairs, num_heads
        self.mask_module_path, self.pad_token_id = mask_module_path, pad_token_id

    def scores(self, io_dict, layer: str) -> torch.Tensor:
        q, k = io_dict[f"{layer}.attention.self.query"]["output"], io_dict[f"{layer}.attention.self.key"]["output"]
        b, t, w = q.shape
        q = q.view(b, t, self.heads, w // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, w // self.heads).transpose(1, 2)
        return q @ k.transpose(-1, -2) / math.sqrt(w // self.heads)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        mask = padding_mask(student_io_dict, self.mask_module_path, self.pad_token_id)
        keys, rows = mask.bool()[:, None, None, :], mask[:, None, :]
        total = 0.0
        for student_layer, teacher_layer in self.pairs:
            s, t = self.scores(student_io_dict, student_layer), self.scores(teacher_io_dict, teacher_layer)
            fill = torch.finfo(s.dtype).min
            p_s, p_t = s.masked_fill(~keys, fill).softmax(-1), t.masked_fill(~keys, fill).softmax(-1)
            kl = F.kl_div(p_s.clamp(1e-7, 1.0).log(), p_t, reduction="none").sum(-1)
            total = total + (kl * rows).sum() / (rows.sum() * kl.shape[1])
        return total


class FixedBatches:
    """A batch sampler replaying a given list of batches (so every implementation sees the same ones)."""

    def __init__(self, sampler, batches: list[list[int]], **kwargs) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def adamw_no_decay(params, lr: float, weight_decay: float, betas, eps: float, **kwargs):
    """AdamW with the decay / no-decay parameter groups of our loop; other kwargs (`fused`) go to AdamW."""
    modules = params if isinstance(params, nn.ModuleList) else nn.ModuleList([params])
    return torch.optim.AdamW(param_groups(modules, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def register_torchdistill_extensions() -> None:
    from torchdistill.datasets.registry import BATCH_SAMPLER_DICT, register_batch_sampler
    from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, register_mid_level_loss
    from torchdistill.optim.registry import OPTIM_DICT, SCHEDULER_DICT, register_optimizer, register_scheduler
    from transformers import get_linear_schedule_with_warmup

    if "MaskedHiddenMSELoss" not in MIDDLE_LEVEL_LOSS_DICT:
        register_mid_level_loss(MaskedHiddenMSELoss)
        register_mid_level_loss(AttentionKLLoss)
    if "FixedBatches" not in BATCH_SAMPLER_DICT:
        register_batch_sampler(FixedBatches)
    if "adamw_no_decay" not in OPTIM_DICT:
        register_optimizer(adamw_no_decay)
    if "get_linear_schedule_with_warmup" not in SCHEDULER_DICT:
        register_scheduler(get_linear_schedule_with_warmup)


def torchdistill_config(setup: Setup, fused_adamw: bool = False) -> dict[str, Any]:
    """The training configuration torchdistill reads (what its YAML files hold), for our mix.

    Its optimiser is torch's AdamW as a torchdistill YAML names it (`fused_adamw=False`), or
    with `fused: true` added to its kwargs, the implementation our loop picks.
    """
    t = setup.cfg.training
    student_layers = [f"bert.encoder.layer.{i}" for i in range(setup.cfg.student.num_layers)]
    teacher_layers = [f"bert.encoder.layer.{i}" for i in range(setup.teacher_layers)]

    def hidden_module(layers: list[str], index: int) -> str:
        return "bert.embeddings" if index == 0 else layers[index - 1]

    hidden_pairs = [[hidden_module(student_layers, i), hidden_module(teacher_layers, j)] for i, j in setup.pairs.hidden]
    attention_pairs = [[student_layers[i], teacher_layers[j]] for i, j in setup.pairs.attention]

    def hooks(side: int) -> dict[str, list[str]]:
        outputs = {"classifier"} | {p[side] for p in hidden_pairs}
        for pair in attention_pairs:
            outputs |= {f"{pair[side]}.attention.self.query", f"{pair[side]}.attention.self.key"}
        return {"input": ["bert"] if side == 0 else [], "output": sorted(outputs)}

    pad = setup.tokenizer.pad_token_id
    kd = setup.cfg.objectives[0]
    return {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": {}},
            "batch_sampler": {"key": "FixedBatches", "kwargs": {"batches": setup.batches}},
            "collate_fn": "DataCollatorWithPadding",
            "kwargs": {"num_workers": 0},
            "requires_supp": False,
        },
        "teacher": {"forward_proc": "forward_batch_only_as_kwargs", "forward_hook": hooks(1), "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only_as_kwargs", "forward_hook": hooks(0), "requires_grad": True},
        "optimizer": {
            "key": "adamw_no_decay", "filters_params": False, "max_grad_norm": t.max_grad_norm, "grad_accum_step": 1,
            "kwargs": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "betas": [t.adam_beta1, t.adam_beta2],
                       "eps": t.adam_epsilon, **({"fused": True} if fused_adamw else {})},
        },
        "scheduler": {
            "key": "get_linear_schedule_with_warmup", "scheduling_step": 1,
            "kwargs": {"num_warmup_steps": math.ceil(t.warmup_ratio * setup.total_steps),
                       "num_training_steps": setup.total_steps},
        },
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {
                "kd": {"weight": 1.0, "criterion": {"key": "KDLoss", "kwargs": {
                    "student_module_path": "classifier", "student_module_io": "output",
                    "teacher_module_path": "classifier", "teacher_module_io": "output",
                    "temperature": kd.params.get("temperature", 2.0), "alpha": setup.cfg.ce_weight,
                    "beta": kd.weight, "reduction": "batchmean"}}},
                "hidden": {"weight": 1.0, "criterion": {"key": "MaskedHiddenMSELoss", "kwargs": {
                    "pairs": hidden_pairs, "mask_module_path": "bert", "pad_token_id": pad}}},
                "attention": {"weight": 1.0, "criterion": {"key": "AttentionKLLoss", "kwargs": {
                    "pairs": attention_pairs, "num_heads": setup.num_heads, "mask_module_path": "bert",
                    "pad_token_id": pad}}},
            }},
        },
    }


def torchdistill_box(setup: Setup, student, fused_adamw: bool = False):
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.datasets.registry import register_collate_func
    from transformers import DataCollatorWithPadding

    register_collate_func(DataCollatorWithPadding(setup.tokenizer))
    dataset = setup.data.train.remove_columns(["example_id"])
    # No Accelerator: torchdistill 1.1.5 reads AcceleratorState.use_fp16, which accelerate >= 1.0 dropped;
    # without one it places models itself and steps with loss.backward(), as in its non-HF examples.
    with common.silence():
        return get_distillation_box(setup.teacher, student, {"train": dataset}, torchdistill_config(setup, fused_adamw),
                                    device(), None, False, 1, None)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def to_device(batch: dict) -> dict:
    return {k: v.to(device()) for k, v in batch.items()}


def torchdistill_examples_per_second(setup: Setup, fused_adamw: bool) -> float:
    box = torchdistill_box(setup, setup.fresh_student(), fused_adamw)
    try:
        box.pre_epoch_process(epoch=0)
        examples, start = 0, 0.0
        for step, sample_batch in enumerate(box.train_data_loader):
            if step == setup.warmup:
                sync()
                start, examples = time.perf_counter(), 0
            sample_batch = to_device(sample_batch)
            targets = sample_batch.pop("labels")
            loss = box.forward_process(sample_batch, targets, None)
            box.post_forward_process(loss=loss)
            examples += len(targets)
        assert step + 1 == setup.total_steps
        sync()
        return examples / (time.perf_counter() - start)
    finally:
        box.clean_modules()
        setup.teacher.requires_grad_(False)


def torchdistill_first_loss(setup: Setup) -> float:
    box = torchdistill_box(setup, setup.fresh_student())
    try:
        box.student_model.eval()
        sample_batch = to_device(next(iter(box.train_data_loader)))
        targets = sample_batch.pop("labels")
        with torch.no_grad():
            return box.forward_process(sample_batch, targets, None).item()
    finally:
        box.clean_modules()
        setup.teacher.requires_grad_(False)


# --- main ---------------------------------------------------------------------------------------


RUNS = ("ours", "ours_fp32", "torchdistill", "torchdistill_fused", "plain")


def main() -> None:
    from trainables.config import TrainingConfig
    from trainables.precision import precision_here

    args = common.parse_args(NAME, __doc__, extra_args)
    started = time.perf_counter()
    smallest = args.size == "smallest"
    on_gpu = torch.cuda.is_available()
    warmup, steps = (1, 3) if smallest else ((10, 30) if on_gpu else (3, 20))
    warmup, steps = args.warmup or warmup, args.steps or steps
    repeats = args.repeats or (1 if smallest else (5 if on_gpu else 3))
    import_torchdistill()
    teacher = common.teacher_for(args.size, random_weights=args.random_teacher)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = common.run_config(
            teacher, Path(tmp) / "ours", size=args.size,
            # fp32 unless a run says otherwise: only "ours" runs in the precision our default picks
            training={"max_steps": warmup + steps, "eval_steps": warmup + steps, "max_eval_samples": 64,
                      "mixed_precision": "no", "per_device_train_batch_size": args.batch_size or 32},
        )
        setup = Setup(cfg, warmup, steps)
        losses = {"ours_fp32": ours_first_loss(setup), "torchdistill": torchdistill_first_loss(setup),
                  "plain": plain_first_loss(setup)}
        default_loss = ours_first_loss(setup, "auto")
        common.log(f"first-batch loss: {losses}; in our default precision: {default_loss}")
        runners = {
            "ours": lambda r: ours_examples_per_second(setup, Path(tmp) / f"ours-{r}", "auto"),
            "ours_fp32": lambda r: ours_examples_per_second(setup, Path(tmp) / f"ours-fp32-{r}", "no"),
            "torchdistill": lambda r: torchdistill_examples_per_second(setup, fused_adamw=False),
            "torchdistill_fused": lambda r: torchdistill_examples_per_second(setup, fused_adamw=True),
            "plain": lambda r: plain_examples_per_second(setup),
            "ours_compiled": lambda r: ours_examples_per_second(setup, Path(tmp) / f"ours-compiled-{r}", "auto", True),
        }
        runs = RUNS + ("ours_compiled",) if args.compiled else RUNS
        samples: dict[str, list[float]] = {n: [] for n in runs}
        for r in range(repeats):
            shift = r % len(runs)
            for name in runs[shift:] + runs[:shift]:  # rotate the order: drift hits each one alike
                samples[name].append(runners[name](r))
                common.log(f"round {r}: {name} {samples[name][-1]:.1f} examples/s")
    med = {n: common.median(v) for n, v in samples.items()}
    ratios = {
        "ours_vs_torchdistill": med["ours"] / med["torchdistill"],
        "ours_fp32_vs_torchdistill": med["ours_fp32"] / med["torchdistill"],
        "ours_fp32_vs_torchdistill_fused": med["ours_fp32"] / med["torchdistill_fused"],
        "ours_fp32_vs_plain": med["ours_fp32"] / med["plain"],
        **({"ours_compiled_vs_ours": med["ours_compiled"] / med["ours"]} if args.compiled else {}),
    }
    figures = {
        "figure": "examples per second of training, same maths, same batches",
        "setup": {
            "teacher": Path(str(teacher)).name, "teacher_weights": "random" if args.random_teacher or args.size == "paper" else "fine-tuned",
            "teacher_layers": setup.teacher_layers, "hidden_size": setup.teacher.config.hidden_size,
            "student_layers": cfg.student.num_layers,
            "objectives": "0.5 ce + 0.5 kd(T=2) + hidden_mse(skip) + att_kl(skip)",
            "batch_size": cfg.training.per_device_train_batch_size, "max_seq_length": cfg.training.max_seq_length,
            "mean_padded_length": round(setup.mean_tokens, 1), "warmup_steps": warmup, "timed_steps": steps,
            "repeats": repeats, "torchdistill": import_torchdistill().__version__,
            "precision": {"ours": precision_here(TrainingConfig()), "others": "fp32"},
            "adamw": {"ours": "fused", "ours_fp32": "fused", "plain": "fused", "torchdistill": "torch default",
                      "torchdistill_fused": "fused"},
        },
        "first_batch_loss": {k: round(v, 6) for k, v in losses.items()},
        "first_batch_loss_max_rel_diff": max(abs(v - losses["ours_fp32"]) / abs(losses["ours_fp32"])
                                             for v in losses.values()),
        "first_batch_loss_ours_default_precision": round(default_loss, 6),
        "examples_per_second": {n: [round(x, 2) for x in v] for n, v in samples.items()},
        "median_examples_per_second": {n: round(v, 2) for n, v in med.items()},
        **{k: round(v, 3) for k, v in ratios.items()},
        "targets": {"ours_vs_torchdistill >= 1.3": ratios["ours_vs_torchdistill"] >= 1.3,
                    "ours_fp32_vs_plain >= 0.95": ratios["ours_fp32_vs_plain"] >= 0.95},
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
