"""`resources.gpu: auto`: the memory estimate, the GPU share it gives each trial, and Ray placing
trials on a local cluster that declares fake GPUs as the plan says.

Run as a script (`python tests/test_gpu_packing.py FOLDER`), this file is the driver of the Ray
test: a private Ray with fake GPUs, a sweep state with gpu auto, and a Tune run whose trials record
where Ray put them.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from typer.testing import CliRunner

from orchestrator.cli import app, study_with_gpu_memory, sweep_with_gpu_memory
from orchestrator.config import Resources, SweepSpec, load_sweep_spec
from orchestrator.gpu_memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    GpuPacking,
    GpuTooSmall,
    MemoryNeed,
    ModelShape,
    NodeGpus,
    StageLoad,
    Workload,
    encoder_activations,
    estimate,
    gpu_memory_gib,
    gpu_share,
    model_shape,
    plan_lines,
    shapes_of,
    teacher_task_gpus,
    workload_of,
)
from orchestrator.messages import UserError, describe_error
from orchestrator.study import StudySpec
from orchestrator.trials import TrialTemplate
from services import kill_group
from sweep_helpers import distillsweep

TRIALS, FAKE_GPUS, FAKE_CPUS = 8, 2, 8  # 8 trial processes: enough to fill 2 GPUs 4 each
TINY_ROBERTA = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=70, num_labels=3, pad_token_id=1)
TINY_TEACHER = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, num_labels=2)


def tiny_shape(layers: int) -> ModelShape:
    return ModelShape(layers=layers, hidden=8, heads=2, intermediate=16, vocab=10, positions=12, type_vocab=2, labels=2)


# --- the estimate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    BertForSequenceClassification(TINY_TEACHER),
    BertForMaskedLM(TINY_TEACHER),
    RobertaForSequenceClassification(TINY_ROBERTA),
], ids=["bert-classifier", "bert-masked-lm", "roberta-classifier"])
def test_parameter_count_is_that_of_the_transformers_model(model: Any) -> None:
    shape = ModelShape.of_config(model.config, model.config.num_labels, masked_lm=isinstance(model, BertForMaskedLM))
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_memory_estimate_of_a_tiny_config_is_the_hand_computed_one() -> None:
    student, teacher = tiny_shape(2), tiny_shape(4)
    work = Workload(batch=2, length=4, half_precision=True, stages=(StageLoad(teacher_live=True, hidden_states=True),))
    # parameters: embeddings (10 + 12 + 2) * 8 + 2 * 8 = 208; a layer 4 * (64 + 8) + (128 + 16) + (128 + 8) + 32 = 600;
    # classifier head 64 + 8 + 16 + 2 = 90
    assert (student.parameters, teacher.parameters) == (208 + 2 * 600 + 90, 208 + 4 * 600 + 90) == (1498, 2698)
    need = estimate(student, teacher, work)
    assert need.student_state == 1498 * (16 + 2)  # fp32 weights, gradients, AdamW moments; bf16 weight copies
    # student, a = 2 bytes, B*T = 8, B*H*T^2 = 64: a layer 8 * ((64 + 32) * 2 + 16) + 64 * 5 = 1984;
    # embeddings 8 * 8 * 9 = 576; hidden-state objective 2 layers * 8 * 8 * 4 = 512
    student_activations = 2 * 1984 + 576 + 512
    # teacher forward: 5 hidden states 8 * 8 * 2 * 5 = 640; one layer at work 64 * 2 * 2 + 8 * (32 + 16) * 2 = 1024
    assert need.activations == student_activations + 640 + 1024 == 6720
    assert need.teacher_weights == 2698 * 4
    assert need.logit_cache == 0
    assert need.margin == math.ceil(0.2 * (26964 + 6720 + 10792)) == 8896
    assert need.total == 26964 + 6720 + 10792 + 8896 + CUDA_CONTEXT_BYTES


def test_a_cached_teacher_costs_its_logits_instead_of_its_forward() -> None:
    live = Workload(batch=2, length=4, half_precision=True, stages=(StageLoad(teacher_live=True),))
    cached = Workload(batch=2, length=4, half_precision=True, stages=(StageLoad(),), cache_rows=100)
    with_live, with_cache = estimate(tiny_shape(2), tiny_shape(4), live), estimate(tiny_shape(2), tiny_shape(4), cached)
    assert with_cache.logit_cache == 100 * 2 * 4  # rows x labels x fp32
    assert with_live.activations - with_cache.activations == 640 + 1024  # the teacher's forward, as above
    assert with_cache.teacher_weights == with_live.teacher_weights  # the teacher stays on the device either way


def test_layer_activations_are_what_autograd_keeps_for_a_tiny_bert() -> None:
    """On CPU, in fp32, with dropout: the formula with the CPU's 4-byte dropout masks against the
    tensors autograd really saves (the weights left out: they are the state's)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(TINY_TEACHER).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, length = 8, 48
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 120, (batch, length)),
              attention_mask=torch.ones(batch, length, dtype=torch.long))
    shape = ModelShape.of_config(TINY_TEACHER, 2)
    predicted = encoder_activations(shape, batch, length, a=4, mask_bytes=4)
    assert predicted == pytest.approx(sum(saved.values()), rel=0.02)  # LayerNorm statistics, ids, pooler: the rest


# --- shares ----------------------------------------------------------------------------------------


def need_of(total: int) -> MemoryNeed:
    return MemoryNeed(student_state=total - CUDA_CONTEXT_BYTES, activations=0, teacher_weights=0, logit_cache=0, margin=0)


@pytest.mark.parametrize(("gpus_worth", "k", "share"), [
    (4.5, 4, 0.25), (3.2, 3, 0.3333), (7.0, 7, 0.1428), (2.0, 2, 0.5), (1.3, 1, 1.0), (30.0, 8, 0.125),
])
def test_each_trial_asks_for_one_kth_of_a_gpu_when_k_fit(gpus_worth: float, k: int, share: float) -> None:
    """Rounded down at Ray's 1e-4, so that k shares still fit on one GPU; at most 8 per GPU."""
    assert gpu_share(need_of(GIB), int(gpus_worth * GIB), most=8) == share
    assert k * share <= 1.0


def test_a_trial_too_big_for_one_gpu_is_refused_naming_its_need_and_the_gpu() -> None:
    with pytest.raises(GpuTooSmall) as refused:
        gpu_share(need_of(30 * GIB), 24 * GIB, what="a trial (mnli)")
    message = str(refused.value)
    assert "a trial (mnli) needs about 30.0 GiB" in message and "one GPU holds 24.0 GiB" in message
    assert "per_device_train_batch_size" in message


def test_a_data_parallel_trial_asks_for_one_whole_gpu_per_process() -> None:
    assert gpu_share(need_of(10 * GIB), 79 * GIB, processes=4) == 4.0
    assert teacher_task_gpus(Resources(gpu=0.5)) == 1 and teacher_task_gpus(Resources(gpu=2)) == 2
    with pytest.raises(GpuTooSmall):
        gpu_share(need_of(90 * GIB), 79 * GIB, processes=4)


# --- the file's resources ------------------------------------------------------------------------


def test_gpu_auto_is_accepted_and_numbers_are_checked_as_before() -> None:
    assert Resources.model_validate({"gpu": "auto"}).gpu == "auto"
    assert Resources.model_validate({"gpu": 0.5}).gpu == 0.5
    for value, message in [("lots", "gpu: Input should be a valid number"), (-1, "gpu: Input should be greater than"),
                           (1.5, "a fractional GPU share must be at most 1")]:
        with pytest.raises(ValueError) as refused:
            Resources.model_validate({"gpu": value})
        assert message in describe_error(refused.value)
        assert "literal" not in describe_error(refused.value)  # one message, not one per member of float | auto
    with pytest.raises(ValueError) as refused:
        Resources.model_validate({"gpu": 1, "gpu_memory_gb": 80})
    assert "only gpu: auto does" in describe_error(refused.value)


# --- from trial configs -------------------------------------------------------------------------


@pytest.fixture
def auto_spec(teacher_dir: str) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "packing", "base": {"task": "demo", "teacher": teacher_dir, "student": {"num_layers": 2},
                                    "objectives": [{"name": "kd"}, {"name": "hidden_mse"}],
                                    "training": {"max_seq_length": 64}},
        "space": {"training.per_device_train_batch_size": {"grid": [8, 256]}},
        "resources": {"cpu": 1, "gpu": "auto", "gpu_memory_gb": 4},
    })


def test_trials_that_differ_in_batch_each_get_their_own_share(auto_spec: SweepSpec) -> None:
    packing = GpuPacking(auto_spec, TrialTemplate(auto_spec.base), auto_spec.resources.gpu_memory_gb)
    small, large = (packing.resources({"training.per_device_train_batch_size": b}) for b in (8, 256))
    assert small["GPU"] < large["GPU"] < 1
    for batch, asked in ((8, small), (256, large)):
        cfg = TrialTemplate(auto_spec.base).resolve({"training.per_device_train_batch_size": batch})
        need = estimate(*shapes_of(cfg, cfg.teacher), workload_of(cfg))
        assert asked == {"CPU": 1.0, "GPU": gpu_share(need, 4 * GIB)}


def test_the_student_is_the_teacher_cut_to_its_layers(auto_spec: SweepSpec) -> None:
    cfg = TrialTemplate(auto_spec.base).resolve({"training.per_device_train_batch_size": 8})
    student, teacher = shapes_of(cfg, cfg.teacher)
    assert (teacher.layers, teacher.hidden, teacher.heads, teacher.vocab) == (4, 32, 4, 120)
    assert (student.layers, student.hidden) == (2, 32)
    work = workload_of(cfg)
    assert (work.batch, work.length, work.half_precision) == (8, 64, True)
    assert work.stages[0].teacher_live and work.stages[0].hidden_states  # hidden_mse reads the live teacher


def test_a_sweep_whose_trial_outgrows_one_gpu_is_refused_naming_the_task_and_the_memory(auto_spec: SweepSpec) -> None:
    packing = GpuPacking(auto_spec, TrialTemplate(auto_spec.base), 0.5)
    configs = [TrialTemplate(auto_spec.base).resolve({"training.per_device_train_batch_size": b}) for b in (8, 256)]
    with pytest.raises(GpuTooSmall) as refused:
        packing.check(configs)
    assert "a trial ('demo') needs about" in str(refused.value) and "one GPU holds 0.5 GiB" in str(refused.value)


def test_without_gpus_in_the_cluster_trials_ask_for_none(auto_spec: SweepSpec) -> None:
    packing = GpuPacking(auto_spec, TrialTemplate(auto_spec.base), gpu_memory_gib([NodeGpus("cpu-node", 8, 0)], None))
    assert packing.resources({"training.per_device_train_batch_size": 8}) == {"CPU": 1.0, "GPU": 0.0}
    assert plan_lines(packing.fits.values(), [NodeGpus("cpu-node", 8, 0)], 1, None)[0].endswith("trials run on CPUs")


def test_a_two_stage_trial_runs_the_teacher_live_then_reads_its_logit_cache(auto_spec: SweepSpec) -> None:
    base = {**auto_spec.base, "stages": "two_stage", "training": {"max_train_samples": 1000}}
    work = workload_of(TrialTemplate(base).resolve({}))
    assert [(s.teacher_live, s.hidden_states) for s in work.stages] == [(True, True), (False, False)]
    assert work.cache_rows == 1000


def test_a_registered_student_is_sized_from_its_config_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study's stage-2 students are `models:/` URIs of MLflow transformers models (config.json under
    model/); a plain logged folder has it at the top."""
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from orchestrator.student_models import STUDENT_ARTIFACT, save_student_model
    from trainables.demo import demo_teacher_base

    student = tmp_path / "student"
    BertForSequenceClassification(TINY_TEACHER).save_pretrained(student)
    AutoTokenizer.from_pretrained(demo_teacher_base()).save_pretrained(student)
    save_student_model(student, tmp_path / "logged", "distill")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # restored after the test
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        run = client.create_run(client.create_experiment("sizes", artifact_location=str(tmp_path / "artifacts")))
        client.log_artifacts(run.info.run_id, str(tmp_path / "logged"), STUDENT_ARTIFACT)
        client.log_artifacts(run.info.run_id, str(student), "plain")
        version = mlflow.register_model(f"runs:/{run.info.run_id}/{STUDENT_ARTIFACT}", "sizes-kd").version
        registered = model_shape(f"models:/sizes-kd/{version}", 2)
        plain = model_shape(f"runs:/{run.info.run_id}/plain", 2)
    finally:
        mlflow.set_tracking_uri(None)
    assert registered == plain == ModelShape.of_config(TINY_TEACHER, 2)


def test_gpu_memory_is_the_option_else_the_smallest_gpu_type_ray_reports() -> None:
    nodes = [NodeGpus("10.0.0.1", 32, 8, "H100"), NodeGpus("10.0.0.2", 32, 4, "A100-80G"), NodeGpus("10.0.0.3", 8, 0)]
    assert gpu_memory_gib(nodes, None) == 79.0
    assert gpu_memory_gib(nodes + [NodeGpus("10.0.0.4", 8, 1, "A100")], None) == 39.0
    assert gpu_memory_gib(nodes, 141.0) == 141.0
    assert gpu_memory_gib([NodeGpus("10.0.0.3", 8, 0)], None) is None  # no GPU: trials run on CPUs
    with pytest.raises(UserError) as unknown:
        gpu_memory_gib([NodeGpus("10.0.0.5", 8, 2, None)], None)
    assert "--gpu-memory-gb" in str(unknown.value) and "10.0.0.5" in str(unknown.value)


def test_the_plan_gives_trials_per_gpu_and_per_node_bounded_by_cpus(auto_spec: SweepSpec) -> None:
    packing = GpuPacking(auto_spec, TrialTemplate(auto_spec.base), 4.0)
    fit = packing.fit(TrialTemplate(auto_spec.base).resolve({"training.per_device_train_batch_size": 8}))
    nodes = [NodeGpus("gpu-node", cpus=6, gpus=2), NodeGpus("cpu-node", cpus=64, gpus=0)]
    [head, row] = plan_lines([fit], nodes, cpu=1, memory_gib=4.0)
    assert head.startswith("resources.gpu auto: one GPU holds 4 GiB")
    assert f"{fit.per_gpu} per GPU" in row and fit.per_gpu > 3
    assert "at once: gpu-node: 6" in row and "cpu-node" not in row  # 2 GPUs hold more, its 6 CPUs run 6


# --- --gpu-memory-gb and the dry run's plan ---------------------------------------------------------


def auto_space(folder: Path, teacher: str, gpu: Any = "auto") -> dict[str, Any]:
    """Two batch sizes of a 2-layer student on a local task; trials size their GPU share by memory."""
    (folder / "train.csv").write_text("text,label\n" + "".join(f"w w w,{i % 2}\n" for i in range(8)))
    (folder / "validation.csv").write_text("text,label\nw w,0\nw,1\n")
    task = {"name": "local", "train_file": str(folder / "train.csv"), "validation_file": str(folder / "validation.csv")}
    return {"name": "packing", "storage": str(folder / "sweeps"),
            "base": {"task": task, "teacher": teacher, "student": {"num_layers": 2},
                     "objectives": [{"name": "kd"}, {"name": "hidden_mse"}], "training": {"max_seq_length": 64}},
            "space": {"training.per_device_train_batch_size": {"grid": [8, 256]}},
            "resources": {"cpu": 1, "gpu": gpu, "max_trials_per_gpu": 1000}}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_gpu_memory_option_becomes_the_sweeps_gpu_memory_and_needs_gpu_auto(tmp_path: Path, teacher_dir: str) -> None:
    spec = load_sweep_spec(write_yaml(tmp_path / "space.yaml", auto_space(tmp_path, teacher_dir)))
    assert spec.resources.gpu_memory_gb is None
    assert sweep_with_gpu_memory(spec, 80.0).resources.gpu_memory_gb == 80.0
    whole = load_sweep_spec(write_yaml(tmp_path / "whole.yaml", auto_space(tmp_path, teacher_dir, gpu=1)))
    with pytest.raises(UserError) as refused:
        sweep_with_gpu_memory(whole, 80.0)
    assert "only resources.gpu: auto does; sweep packing asks for gpu 1" in str(refused.value)


def test_gpu_memory_option_reaches_only_the_study_stages_that_use_gpu_auto() -> None:
    def study(distill_gpu: Any, finetune_gpu: Any) -> StudySpec:
        return StudySpec.model_validate({"name": "s", "distill": {"base": {}, "resources": {"gpu": distill_gpu}},
                                         "finetune": {"base": {}, "resources": {"gpu": finetune_gpu}}})

    given = study_with_gpu_memory(study("auto", 1), 80.0)
    assert (given.distill.resources.gpu_memory_gb, given.finetune.resources.gpu_memory_gb) == (80.0, None)
    assert given.stage("distill").resources.gpu_memory_gb == 80.0
    with pytest.raises(UserError) as refused:
        study_with_gpu_memory(study(1, 0.5), 80.0)
    assert "neither stage of study s uses it (distill.resources.gpu 1, finetune.resources.gpu 0.5)" in str(
        refused.value)


def test_dry_run_prints_the_gpu_plan_after_the_space_table_for_the_memory_given(tmp_path: Path,
                                                                               teacher_dir: str) -> None:
    """A real CLI process; the shares it prints are the ones GpuPacking gives each trial on an 80 GiB GPU."""
    space = auto_space(tmp_path, teacher_dir)
    path = write_yaml(tmp_path / "space.yaml", space)
    done = distillsweep(["sweep", str(path), "--dry-run", "--gpu-memory-gb", "80"], tmp_path / "cache", tmp_path,
                        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    spec = load_sweep_spec(path).model_copy(update={"resources": Resources(cpu=1, gpu="auto", gpu_memory_gb=80,
                                                                           max_trials_per_gpu=1000)})
    template = TrialTemplate(spec.base)
    fits = GpuPacking(spec, template, 80.0).check(template.resolve({"training.per_device_train_batch_size": b})
                                                   for b in (8, 256))
    assert len({fit.per_gpu for fit in fits}) == 2  # the two batch sizes share a GPU differently
    for fit in fits:
        assert f"batch {fit.work.batch} x 64 tokens" in out and f"GPU {fit.gpu:g}, {fit.per_gpu} per GPU" in out
    assert out.index("space entry") < out.index("resources.gpu auto: one GPU holds 80 GiB") < out.index("cost of sweep")


def test_dry_run_json_holds_the_gpu_plan_and_nothing_else_on_stdout(tmp_path: Path, teacher_dir: str) -> None:
    path = write_yaml(tmp_path / "space.yaml", auto_space(tmp_path, teacher_dir))
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--json", "--gpu-memory-gb", "80"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["gpu_plan"]
    assert plan["gpu_memory_gib"] == 80 and plan["note"] is None
    shares = sorted((row["gpu_per_trial"], row["trials_per_gpu"]) for row in plan["trials"])
    assert len(shares) == 2 and all(math.isclose(gpu, math.floor(1e4 / k) / 1e4) for gpu, k in shares)
    whole = write_yaml(tmp_path / "whole.yaml", auto_space(tmp_path, teacher_dir, gpu=1))
    result = CliRunner().invoke(app, ["sweep", str(whole), "--dry-run", "--json"])
    assert json.loads(result.stdout)["gpu_plan"] is None  # trials ask for a fixed share: no plan


# --- Ray places what the plan says ---------------------------------------------------------------


@pytest.mark.slow
def test_ray_places_as_many_trials_per_fake_gpu_as_the_plan_says(tmp_path: Path) -> None:
    """gpu auto with one GPU worth 4.5 trials: each asks for 0.25, and 8 trials run at once on 2
    fake GPUs (a barrier they all must reach), 4 to each GPU id, CUDA_VISIBLE_DEVICES set to it."""
    BertForSequenceClassification(TINY_TEACHER).save_pretrained(tmp_path / "teacher")
    ray_dir = tempfile.mkdtemp(prefix="dsgpu", dir="/tmp")  # Ray's socket paths must stay short
    driver = subprocess.Popen([sys.executable, __file__, str(tmp_path), ray_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = driver.communicate(timeout=600)
    finally:
        kill_group(driver)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert driver.returncode == 0, output[-4000:]
    assert "4 per GPU; at once: " in output and f": {TRIALS}" in output, output[-4000:]
    assert "teacher fine-tuning GPUs: 1" in output  # a teacher fine-tunes on a whole GPU where there are GPUs
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "placed").glob("*.json"))]
    assert len(records) == TRIALS
    assert all(r["assigned"]["GPU"] == 0.25 for r in records)
    assert all(r["cuda_visible_devices"] == r["gpu_ids"][0] and len(r["gpu_ids"]) == 1 for r in records)
    per_gpu = {gpu: sum(r["gpu_ids"] == [gpu] for r in records) for gpu in {r["gpu_ids"][0] for r in records}}
    assert per_gpu == {str(i): 4 for i in range(FAKE_GPUS)}


def record_placement(config: dict[str, Any], folder: str, barrier: Any) -> None:
    """A trial: write where Ray put it, then wait until every trial has arrived (so all ran at once)."""
    import os

    import ray
    from ray import tune

    trial = tune.get_context().get_trial_id()
    record = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
              "assigned": ray.get_runtime_context().get_assigned_resources()}
    Path(folder, f"{trial}.json").write_text(json.dumps(record))
    ray.get(barrier.arrive.remote())
    tune.report({"placed": 1})


def drive_placement(folder: Path, ray_dir: str) -> None:
    """The subprocess: a private Ray with fake GPUs, and the sweep's own resolution of gpu auto."""
    import asyncio

    import ray
    from ray import tune

    from orchestrator.state import SweepState
    from orchestrator.sweep import trial_resources

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self, parties: int) -> None:
            self.parties, self.arrived, self.all_here = parties, 0, asyncio.Event()

        async def arrive(self) -> None:
            self.arrived += 1
            if self.arrived == self.parties:
                self.all_here.set()
            await asyncio.wait_for(self.all_here.wait(), timeout=400)

    base = {"task": "demo", "teacher": str(folder / "teacher"), "student": {"num_layers": 2},
            "training": {"max_seq_length": 32, "per_device_train_batch_size": 4}}
    spec = SweepSpec.model_validate({"name": "packing", "base": base, "resources": {"cpu": 1, "gpu": "auto"}})
    cfg = TrialTemplate(base).resolve({})
    one_gpu = 4.5 * estimate(*shapes_of(cfg, cfg.teacher), workload_of(cfg)).total / GIB  # 4 trials fit
    spec = spec.model_copy(update={"resources": Resources(cpu=1, gpu="auto", gpu_memory_gb=one_gpu)})
    state = SweepState(spec=spec.model_dump(mode="json"), sweep_dir=str(folder / "sweep"), uri="", experiment_id="",
                       parent_run_id="", teachers={}, base=base)
    (folder / "placed").mkdir()
    ray.init(address="local", num_cpus=FAKE_CPUS, num_gpus=FAKE_GPUS, include_dashboard=False, _temp_dir=ray_dir,
             log_to_driver=False)
    try:
        print(f"teacher fine-tuning GPUs: {teacher_task_gpus(spec.resources)}")
        trainable = tune.with_parameters(record_placement, folder=str(folder / "placed"), barrier=Barrier.remote(TRIALS))
        tuner = tune.Tuner(
            tune.with_resources(trainable, trial_resources(state)),
            param_space={"training.seed": tune.grid_search(list(range(TRIALS)))},
            run_config=tune.RunConfig(name="packing", storage_path=str(folder / "tune"), verbose=0),
        )
        failed = [str(result.error) for result in tuner.fit() if result.error is not None]
        if failed:
            raise SystemExit(f"{len(failed)} trials failed: {failed[0]}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    drive_placement(Path(sys.argv[1]), sys.argv[2])
