"""A Tune worker reused for the next trial (`reuse_actors`, the default) holds nothing of the trials
before it: their teacher and student are gone, so their GPU memory is free for the next one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sweep_helpers import ROOT, tiny_space
from orchestrator.trials import TrialTemplate
from trainables.config import StudentConfig
from trainables.models import build_student, live_models
from trainables.config import RUN_CONFIG

pytestmark = pytest.mark.slow


def probed_trial(config: dict[str, Any], probe: str) -> None:
    """`distillation_trial`, after writing down which models of earlier trials this process still holds."""
    import os

    from ray import tune

    from trainables.tune_trainable import distillation_trial

    left = sorted(f"{type(m).__name__} {m.config.num_hidden_layers} layers" for m in live_models())
    record = {"trial": tune.get_context().get_trial_id(), "pid": os.getpid(), "left": left}
    with open(probe, "a") as stream:
        stream.write(json.dumps(record) + "\n")
    distillation_trial(config)


def test_registry_sees_the_models_a_run_builds(tiny_bert):
    student = build_student(tiny_bert, StudentConfig(num_layers=2, init="lower"), num_labels=2)
    assert any(m is student for m in live_models())


def test_reused_worker_holds_no_model_of_completed_or_stopped_trials(tiny_demo_teacher, demo_cache, tmp_path,
                                                                     ray_address):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = tiny_space(tiny_demo_teacher, tmp_path)
    base = {**spec["base"], "cache_dir": str(demo_cache)}
    template = TrialTemplate(base)
    probe = tmp_path / "probe.jsonl"
    # One worker, trials in order: a good trial completes (its function returns: max_t is beyond
    # its 12 steps), a hopeless one (learning rate 1e-12) is stopped by ASHA at its first rung
    # (SystemExit inside `tune.report`), then a third trial starts in the same process.
    ray.init(address=ray_address, runtime_env={"env_vars": {
        "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",  # workers import probed_trial from here
    }})
    try:
        tuner = tune.Tuner(
            tune.with_parameters(probed_trial, probe=str(probe)),
            param_space={RUN_CONFIG: tune.grid_search([  # as the driver resolves them
                template.with_run_config({"training.learning_rate": lr})[RUN_CONFIG] for lr in (1e-3, 1e-12, 1e-3)
            ])},
            tune_config=tune.TuneConfig(
                metric="score", mode="max", max_concurrent_trials=1, reuse_actors=True,
                scheduler=ASHAScheduler(time_attr="prediction_step", max_t=100, grace_period=8, reduction_factor=2),
            ),
            run_config=tune.RunConfig(name="memory", storage_path=str(tmp_path / "sweeps"), verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    steps = sorted(r.metrics["step"] for r in results)
    assert steps == [8, 12, 12], f"ASHA should stop the trial with learning rate 1e-12 at step 8: {steps}"
    records = [json.loads(line) for line in probe.read_text().splitlines()]
    assert len(records) == 3 and len({r["pid"] for r in records}) == 1, records
    for record in records:
        assert record["left"] == [], f"trial {record['trial']} started beside models of earlier trials: {record['left']}"
