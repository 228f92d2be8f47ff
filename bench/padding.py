"""Figure 3: dynamic padding and length-grouped batches against fixed max-length padding.

Two GLUE-like length distributions, each with a teacher fine-tuned on it:
- single: the demo task's tweets, one short sentence each (SST-2-like);
- pairs: two demo tweets of the same sentiment per example, labelled with it (a sentence-pair task
  with MRPC/RTE-like lengths, built once from the demo data under the cache; a "same sentiment?"
  label was tried first and left the teacher at chance after fine-tuning).
Three ways to batch the same examples, each a full `distill` run with the same seed, objective mix
(0.5 CE + 0.5 KD + hidden-state MSE + attention KL) and max_seq_length 128 (the GLUE recipes' length):
- fixed: every batch padded to max_seq_length (what `pad_to_max_length` does);
- dynamic: each batch padded to its longest row (our collator, the default);
- grouped: dynamic, plus `training.group_by_length` (batches of similar length, order still random).
Throughput is training examples per second from the loop's `on_step` timestamps (evaluation
excluded, first step excluded); the metric is validation accuracy after training.

Padding does not change the maths (every objective and the attention mask padded positions):
this is checked on the first batches, with dropout off, as the loss under fixed padding against
dynamic padding. Trained metrics still differ a little between modes because dropout draws its
random masks over the padded shape, so fixed and dynamic consume the random stream differently
even on identical batches, and grouped also changes which examples share a batch: training noise,
which the same run under two more seeds (dynamic padding) measures for comparison.
"""

from __future__ import annotations

from bench import common  # noqa: I001

import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "padding"
MODES = ("fixed", "dynamic", "grouped")


def pair_task(cache_dir: Path | None = None):
    """Each demo tweet paired with another of the same sentiment: (sentence1, sentence2, label), written once."""
    import numpy as np
    import pandas as pd

    from trainables.config import LocalTask
    from trainables.cache import cache_root
    from trainables.demo import ensure_demo_data

    root = cache_root(cache_dir) / "bench" / "demo_pairs.v2"
    files = {"train": root / "train.csv", "validation": root / "validation.csv"}
    if not all(f.exists() for f in files.values()):
        root.mkdir(parents=True, exist_ok=True)
        for (split, path), source in zip(files.items(), ensure_demo_data()):
            frame = pd.read_csv(source)
            rng = np.random.default_rng(0 if split == "train" else 1)
            partner = frame["text"].copy()
            for label in frame["label"].unique():  # a random other tweet of the same label
                rows = np.flatnonzero(frame["label"].to_numpy() == label)
                order = rng.permutation(len(rows))  # a cycle through the label's rows: never itself
                partner.iloc[rows[order]] = frame["text"].iloc[rows[np.roll(order, 1)]].to_numpy()
            pairs = pd.DataFrame({"sentence1": frame["text"], "sentence2": partner, "label": frame["label"]})
            tmp = path.with_name(f"{path.name}.tmp")
            pairs.to_csv(tmp, index=False)
            tmp.replace(path)
    return LocalTask(name="demo_pairs", train_file=files["train"], validation_file=files["validation"],
                     text_columns=("sentence1", "sentence2"), label_column="label", num_labels=2)


def train_once(cfg, mode: str) -> dict[str, Any]:
    """One distill run batching as `mode` says; returns throughput, padding and metrics."""
    import trainables.data as data_module
    import trainables.run as run_module
    from transformers import DataCollatorWithPadding

    length = cfg.training.max_seq_length
    original = data_module.make_collator
    if mode == "fixed":
        data_module.make_collator = lambda tokenizer: DataCollatorWithPadding(
            tokenizer, padding="max_length", max_length=length)
    stamps: dict[int, float] = {}
    try:
        with common.silence():
            metrics = run_module.distill(cfg, on_step=lambda step, total: stamps.setdefault(step, time.perf_counter()))
    finally:
        data_module.make_collator = original
    steps = sorted(stamps)
    return {"stamps": stamps, "metrics": metrics, "first": steps[0], "last": steps[-1]}


def loss_check(cfg, batches: int = 3) -> float:
    """Max relative difference of the loss on the same batches, fixed vs dynamic padding, no dropout."""
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from trainables.distiller import Distiller, plan_stages
    from trainables.mapping import layer_pairs
    from trainables.models import build_student, encoder_layers, forward_view, load_teacher
    from trainables.objectives import REGISTRY
    from trainables.data import load_task_data
    from trainables.tasks import resolve_task

    try:
        from trainables.distiller import make_terms
        terms = make_terms(cfg.objectives)
    except ImportError:
        from trainables.distiller import Term
        terms = [Term(REGISTRY[o.name], o.weight, REGISTRY[o.name].parse_params(o.params)) for o in cfg.objectives]
    spec = resolve_task(cfg.task)
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    teacher = load_teacher(str(cfg.teacher), spec.num_labels).eval()
    torch.manual_seed(0)
    student = build_student(teacher, cfg.student, spec.num_labels).eval()
    pairs = layer_pairs(cfg.mapping, len(encoder_layers(teacher)), cfg.student.num_layers)
    distiller = Distiller(student, {}, pairs, False, False)
    stage = plan_stages(terms, cfg.ce_weight, two_stage=False)[0]
    train = load_task_data(spec, tokenizer, cfg.training, cfg.cache_dir).train
    collators = {"dynamic": DataCollatorWithPadding(tokenizer),
                 "fixed": DataCollatorWithPadding(tokenizer, padding="max_length", max_length=cfg.training.max_seq_length)}
    worst = 0.0
    for start in range(0, batches * 32, 32):
        columns = train[list(range(start, start + 32))]
        features = [dict(zip(columns, values)) for values in zip(*columns.values())]
        losses = {}
        with torch.no_grad():
            for name, collate in collators.items():
                batch = collate(features)
                losses[name] = distiller(batch, forward_view(teacher, batch, stage.needs_qkv), stage)[0].item()
        worst = max(worst, abs(losses["fixed"] - losses["dynamic"]) / abs(losses["dynamic"]))
    return worst


def padded_tokens(cfg, mode: str) -> tuple[float, float, list[list[int]]]:
    """(mean padded length per example, mean real length, the batches) the run trains on."""
    from transformers import AutoTokenizer

    from trainables.data import load_task_data
    from trainables.tasks import resolve_task
    from trainables.training import epoch_batches

    t = cfg.training
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    data = load_task_data(resolve_task(cfg.task), tokenizer, t, cfg.cache_dir)
    lengths = [len(x) for x in data.train["input_ids"]]
    batches, epoch = [], 0
    while len(batches) < t.max_steps:
        batches += epoch_batches(lengths, t.per_device_train_batch_size, t.seed, epoch, mode == "grouped")
        epoch += 1
    batches = batches[: t.max_steps]
    rows = sum(len(b) for b in batches)
    if mode == "fixed":
        padded = float(t.max_seq_length)
    else:
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches) / rows
    return padded, sum(lengths[i] for b in batches for i in b) / rows, batches


def main() -> None:
    args = common.parse_args(NAME, __doc__)
    started = time.perf_counter()
    smallest = args.size == "smallest"
    length = 48 if smallest else 128
    steps = 4 if smallest else 37  # 37 full batches of 32: one epoch of the 1200 training examples
    tasks = {"single": "demo", "pairs": pair_task()}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, task in tasks.items():
            teacher = common.finetuned_teacher(args.size, task, length)
            per_mode: dict[str, Any] = {}
            for mode in MODES:
                cfg = common.run_config(
                    teacher, Path(tmp) / f"{dataset}-{mode}", size=args.size, task=task,
                    training={"max_seq_length": length, "max_steps": steps, "eval_steps": steps,
                              "group_by_length": mode == "grouped", **({"max_eval_samples": 64} if smallest else {})},
                )
                run = train_once(cfg, mode)
                padded, real, batches = padded_tokens(cfg, mode)
                # on_step(k) comes after the step on batches[k - 1]: time steps first+1 .. last
                examples = sum(len(b) for b in batches[run["first"]: run["last"]])
                seconds = run["stamps"][run["last"]] - run["stamps"][run["first"]]
                per_mode[mode] = {
                    "examples_per_second": round(examples / seconds, 2),
                    "mean_padded_length": round(padded, 1), "mean_real_length": round(real, 1),
                    "eval_accuracy": round(run["metrics"]["eval_accuracy"], 4),
                    "eval_loss": round(run["metrics"]["eval_loss"], 5),
                    "train_loss": round(run["metrics"]["train_loss"], 5),
                }
                common.log(f"{dataset} {mode}: {per_mode[mode]}")
            seed_accuracy = [per_mode["dynamic"]["eval_accuracy"]]
            for seed in ([] if smallest else [2, 3]):
                cfg = common.run_config(
                    teacher, Path(tmp) / f"{dataset}-seed{seed}", size=args.size, task=task,
                    training={"max_seq_length": length, "max_steps": steps, "eval_steps": steps, "seed": seed},
                )
                seed_accuracy.append(round(train_once(cfg, "dynamic")["metrics"]["eval_accuracy"], 4))
                common.log(f"{dataset} dynamic seed {seed}: {seed_accuracy[-1]}")
            fixed = per_mode["fixed"]
            results[dataset] = {
                "loss_max_rel_diff_fixed_vs_dynamic_no_dropout": loss_check(cfg),
                "dynamic_accuracy_by_seed": seed_accuracy,
                "seed_spread_accuracy": round(max(seed_accuracy) - min(seed_accuracy), 4),
                "teacher": Path(str(teacher)).name,
                "modes": per_mode,
                "speedup_dynamic_vs_fixed": round(per_mode["dynamic"]["examples_per_second"] / fixed["examples_per_second"], 3),
                "speedup_grouped_vs_fixed": round(per_mode["grouped"]["examples_per_second"] / fixed["examples_per_second"], 3),
                "accuracy_change_dynamic_vs_fixed": round(per_mode["dynamic"]["eval_accuracy"] - fixed["eval_accuracy"], 4),
                "accuracy_change_grouped_vs_fixed": round(per_mode["grouped"]["eval_accuracy"] - fixed["eval_accuracy"], 4),
            }
    figures = {
        "figure": "examples/s and validation accuracy by batching mode",
        "setup": {"max_seq_length": length, "steps": steps, "batch_size": 32,
                  "objectives": "0.5 ce + 0.5 kd(T=2) + hidden_mse(skip) + att_kl(skip)",
                  "student_layers": 2 if smallest else 3},
        **results,
    }
    common.write_result(NAME, args, figures, started)


if __name__ == "__main__":
    main()
