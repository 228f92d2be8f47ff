"""Shared fixtures: tiny real transformers models built from configs, offline hub settings.

A test that cannot run on this machine (no chromium, no torchdistill) skips with its reason; with
DISTILLSWEEP_REQUIRE_ALL=1 (as `.ci/run` sets) every skip is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Inductor compiles its C++ kernels in a pool of worker processes, one per core; each test process has
# one core to itself, and the pool's processes cost more than they overlap: test_compile's cold
# compilation took 153 CPU-s with the pool and 124 without, on a 2-core Xeon.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Every Ray cluster the tests start or join uses token auth, as the recipes do; Ray reads this once,
# at import, so it is set before any test imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification  # noqa: E402

torch.set_num_threads(1)

REQUIRE_ALL = "DISTILLSWEEP_REQUIRE_ALL"


def every_test_must_run() -> bool:
    return os.environ.get(REQUIRE_ALL, "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and every_test_must_run() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL}=1 makes every skip a failure; this test skipped: {reason}"


# Fixtures that train a model or start Ray: a test using one is slow, whatever its module says.
SLOW_FIXTURES = {"tiny_demo_teacher", "ray_cluster", "ray_address"}


# The longest modules, longest first (seconds of a whole two-process run on a 2-core Xeon, 2026-12-06):
# xdist hands each process the next module in collection order as it runs short of work, so these go
# out first and the short modules fill the end. Its own order (`--no-loadscope-reorder` in pyproject
# turns it off) is by test count, which left one process alone with a long module for the last
# 90 s. A module not listed runs after these, in file order.
LONGEST_MODULES_FIRST = (
    "test_faults.py",  # 287
    "test_sweep_e2e.py",  # 282
    "test_bench_smoke.py",  # 128
    "test_gpu_check.py",  # 65
    "test_bench_scale.py",  # 60
    "test_cluster_recipes.py",  # 58
    "test_run.py",  # 54
    "test_mlflow_browsing.py",  # 50
    "test_pretrain.py",  # 40
    "test_security_state.py",  # 40
    "test_gpu_packing.py",  # 31
    "test_disk.py",  # 31
    "test_study.py",  # 28
    "test_compile.py",  # 10 with inductor's cache warm, 40 on a fresh machine (it compiles cold)
)


def module_rank(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_MODULES_FIRST.index(name) if name in LONGEST_MODULES_FIRST else len(LONGEST_MODULES_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=module_rank)  # stable: each module's tests keep their order


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped and every_test_must_run():
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL}=1 makes every skip a failure; a module skipped: {report.longrepr}"


def tiny_bert_config(layers: int = 4, hidden: int = 32, heads: int = 4, labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=120,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        num_labels=labels,
    )


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=70, num_labels=3, pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


@pytest.fixture
def teacher_dir(tmp_path_factory, tiny_bert) -> str:
    """A local untrained 4-layer teacher directory: its config is all that checks before training read."""
    path = tmp_path_factory.mktemp("teacher")
    tiny_bert.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by the session, and by both xdist processes: tokenised demo data and tiny
    teachers, built once for the run. The product writes its caches under locks and atomic renames
    (trials of one sweep share a cache the same way), so two processes may fill it at once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # xdist gives each process a folder under one run folder
    path = root / "demo-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_demo_teacher(demo_cache) -> str:
    """A 4-layer, 64-wide BERT trained from scratch on the demo tweets by `finetune_teacher`.

    Uses the real MiniLM tokenizer; reaches about 0.78 validation accuracy in seconds. Trained by the
    first process to ask; the other waits on the lock and reuses it (the same request finds it).
    """
    from transformers import AutoTokenizer

    from trainables.config import TrainingConfig
    from trainables.demo import demo_teacher_base
    from trainables.teacher import TeacherRequest, finetune_teacher
    from trainables.teacher_cache import exclusive_lock

    base = demo_cache / "tiny-base"
    with exclusive_lock(demo_cache / "tiny-base.lock"):
        if not (base / "config.json").exists():
            torch.manual_seed(0)
            config = tiny_bert_config(layers=4, hidden=64, heads=4)
            config.vocab_size, config.max_position_embeddings = 30522, 128
            BertForSequenceClassification(config).save_pretrained(base)
            AutoTokenizer.from_pretrained(demo_teacher_base()).save_pretrained(base)
    request = TeacherRequest(
        base_model=str(base),
        task="demo",
        output_root=demo_cache / "teachers",
        cache_dir=demo_cache,
        training=TrainingConfig(
            learning_rate=1e-3, num_train_epochs=4, per_device_train_batch_size=32, max_seq_length=48,
            eval_steps=50, warmup_ratio=0.1,
        ),
    )
    path, _ = finetune_teacher(request)
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for every sweep test that leaves Ray alone (2 CPUs, token auth, started by
    cluster/local/start-cluster.sh); drills that kill Ray's own processes start their own."""
    from services import LocalCluster

    cluster = LocalCluster.start(head_cpus=2)
    try:
        assert cluster.started.returncode == 0, cluster.started.stderr[-4000:]
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


@pytest.fixture(autouse=True)
def no_mlflow_uri_left_behind():
    """Code run in the test process may set MLflow's process-wide tracking URI (registering students
    does): the next test in this process must find MLFLOW_TRACKING_URI in charge again."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store_template(tmp_path_factory) -> None:
    """One empty SQLite MLflow store, created and migrated once; `sqlite_store` copies it."""
    from mlflow import MlflowClient

    import sweep_helpers

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    sweep_helpers.STORE_TEMPLATE[:] = [path]
