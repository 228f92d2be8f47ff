"""Browsing a finished sweep as a researcher would: `distillsweep ui` serves the sweep's store, and
a real headless browser (Debian's `chromium`) renders the page it prints."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from services import answers, free_port, wait_for
from sweep_helpers import cli_env, distillsweep, sweep_runs, tiny_space, write_space
from trainables.model_source import resolve_model_source

pytestmark = pytest.mark.slow

GENAI_ONLY_TABS = ("Observability", "Judges", "Prompts &amp; versions")
TRAINING_TABS = ("Runs", "Models", "Model registry")


@pytest.fixture(scope="module")
def finished_sweep(tiny_demo_teacher, demo_cache, tmp_path_factory, ray_address) -> Path:
    """A tiny two-trial sweep, run through the CLI; returns its working folder."""
    work = tmp_path_factory.mktemp("browsed")
    spec = tiny_space(tiny_demo_teacher, work, log_students=True)
    done = distillsweep(["sweep", str(write_space(spec, work / "space.yaml"))], demo_cache, work,
                        ray_address=ray_address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "did not take" not in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def chromium() -> str:
    """Module-scoped so that it is set up (and skips) before the module's sweep runs for nothing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("no headless browser here: install chromium (Debian: apt-get install chromium), or run .ci/run")
    return browser


def rendered_text(browser: str, url: str) -> str:
    """The page's DOM after its scripts ran, as text lines."""
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    ).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return "\n".join(line.strip() for line in re.sub(r"<[^>]+>", "\n", text).splitlines() if line.strip())


def job_runners(session: int) -> list[str]:
    """Command lines of MLflow job-execution processes in the process session `session`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(process.pid) == session and "mlflow.server.jobs" in " ".join(process.info["cmdline"] or []):
                found.append(" ".join(process.info["cmdline"]))
        except OSError:
            continue
    return found


def test_ui_prints_the_sweeps_training_runs_page_with_every_run(chromium, finished_sweep, demo_cache):
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "ui", str(finished_sweep / "sweeps" / "tiny"), "--port", str(port)],
        cwd=finished_sweep, env=cli_env(demo_cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        printed = "".join(ui.stdout.readline() for _ in range(2))
        page = re.search(r"http://127\.0\.0\.1:\d+/#/experiments/\d+/runs\S*", printed)
        assert page, f"no runs-page URL in: {printed!r}"
        wait_for(lambda: ui.poll() is not None or answers(f"http://127.0.0.1:{port}/health"),
                 what="`distillsweep ui` to answer", timeout=180)
        assert ui.poll() is None, f"`distillsweep ui` exited with {ui.returncode}"
        # MLflow launches its GenAI job runner before the server answers, when job execution is on
        assert not job_runners(ui.pid), "`distillsweep ui` started MLflow's job runner"
        text = rendered_text(chromium, page.group(0))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)

    parent, children = sweep_runs(f"sqlite:///{finished_sweep / 'mlflow.db'}", "tests")
    shown = set(html.unescape(text).splitlines())
    names = [parent.info.run_name, *(child.info.run_name for child in children)]
    assert len(children) == 2 and all(name in shown for name in names), f"runs {names} not all on the page:\n{text[:3000]}"
    assert all(tab in text for tab in TRAINING_TABS), f"not the model-training view:\n{text[:2000]}"
    assert not any(tab in text for tab in GENAI_ONLY_TABS), f"the GenAI view:\n{text[:2000]}"
    experiment = MlflowClient(f"sqlite:///{finished_sweep / 'mlflow.db'}").get_experiment(parent.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"  # what older 3.x UIs read


def test_report_folder_holds_the_heatmap_the_learning_curves_and_one_html_page(finished_sweep, demo_cache):
    folder = finished_sweep / "sweeps" / "tiny"
    done = distillsweep(["report", str(folder)], demo_cache, finished_sweep)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = folder / "report"
    cells = pd.read_csv(report / "report.csv")
    assert len(cells) == 2 and set(cells["task"]) == {"demo"}  # kd and kd+hidden_mse, init lower

    heatmap = ElementTree.parse(report / "heatmap-demo.svg").getroot()  # parses: a valid SVG
    texts = " ".join(t.text or "" for t in heatmap.iter("{http://www.w3.org/2000/svg}text"))
    for row in cells.to_dict("records"):
        assert row["configuration"] in texts and row["init"] in texts
        assert f"{100 * row['mean']:.1f}" in texts, f"cell {row['configuration']} lacks its score: {texts}"

    curves = ElementTree.parse(report / "curves-demo.svg").getroot()
    panels = [g for g in curves.iter("{http://www.w3.org/2000/svg}g") if g.get("id", "").startswith("axes_")]
    assert len(panels) == cells["configuration"].nunique(), "one panel per configuration, inits as colours"

    page = (report / "report.html").read_text()
    assert '<img src="heatmap-demo.svg"' in page and '<img src="curves-demo.svg"' in page
    study, claims = page.split("Claims of the paper, checked on this sweep")
    assert study.count("<table") == 1 and "<table" in claims, "one study table per task, then the claims"

    parent, _ = sweep_runs(f"sqlite:///{finished_sweep / 'mlflow.db'}", "tests")
    logged = {a.path for a in MlflowClient(f"sqlite:///{finished_sweep / 'mlflow.db'}").list_artifacts(
        parent.info.run_id, "report")}
    assert {"report/report.html", "report/heatmap-demo.svg", "report/curves-demo.svg"} <= logged


def test_a_logged_student_loads_with_mlflow_and_predicts_as_the_trial_did(finished_sweep, demo_cache, monkeypatch):
    uri = f"sqlite:///{finished_sweep / 'mlflow.db'}"
    parent, children = sweep_runs(uri, "tests")
    child = children[0]
    assert child.data.tags.get("student_logged") == "true"
    assert any(key.startswith("system/cpu_utilization") for key in child.data.metrics), "no system metrics"

    monkeypatch.setenv("DISTILLSWEEP_CACHE", str(demo_cache))
    from trainables.demo import ensure_demo_data

    train_file, validation_file = ensure_demo_data()
    inputs = {i.dataset.name: i for i in MlflowClient(uri).get_run(child.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"demo-train", "demo-validation"}, "the Dataset column: what the student saw"
    assert json.loads(inputs["demo-train"].dataset.profile)["num_rows"] == len(pd.read_csv(train_file))
    assert json.loads(inputs["demo-validation"].dataset.source)["uri"] == str(validation_file)
    assert {t.value for t in inputs["demo-validation"].tags} == {"evaluation"}
    trial_dir = next((finished_sweep / "sweeps" / "tiny").glob(f"*{child.data.tags['ray_trial_id']}*"))
    student = next(trial_dir.glob("checkpoint_*/student"))  # the trial's own final student, kept by `keep: final`
    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)
    # Validation rows short enough that the trial's max_seq_length (48) cut nothing off.
    texts = [t for t in pd.read_csv(validation_file)["text"].astype(str) if len(tokenizer(t).input_ids) <= 48][:8]
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")).logits
    expected = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]

    mlflow.set_tracking_uri(uri)
    predicted = mlflow.pyfunc.load_model(f"runs:/{child.info.run_id}/student").predict(texts)
    assert predicted["label"].tolist() == expected
    pipeline = mlflow.transformers.load_model(f"runs:/{child.info.run_id}/student")
    assert [p["label"] for p in pipeline(texts)] == expected
    # distillsweep reads it too (a teacher, or a student's init.pretrained): weights and tokenizer in one folder
    local = resolve_model_source(f"runs:/{child.info.run_id}/student")
    assert AutoTokenizer.from_pretrained(local)(texts[0]).input_ids == tokenizer(texts[0]).input_ids
    reread = AutoModelForSequenceClassification.from_pretrained(local).eval()
    assert torch.equal(reread.classifier.weight, model.classifier.weight)

    done = distillsweep(["report", str(finished_sweep / "sweeps" / "tiny"), "--register", "tiny-student"],
                        demo_cache, finished_sweep)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "registered tiny-student-demo version 1" in done.stdout + done.stderr
    registered = mlflow.pyfunc.load_model("models:/tiny-student-demo/1").predict(texts)
    assert len(registered) == len(texts)
