"""Smoke run of bench/camvid_accuracy.py: the four configurations, 2 iterations, 8 CamVid images.

Keeps the benchmark script from rotting: shards, `segnext train`'s path for each head,
`segnext eval` on the test split, diagnostics, the comparison report and its MLflow runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
SCRIPT = REPO / "bench" / "camvid_accuracy.py"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (CAMVID / "train.txt").is_file(), reason=f"no CamVid at {CAMVID}")
def test_camvid_accuracy_smoke(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(SCRIPT), "--camvid", str(CAMVID), "--shards", str(tmp_path / "shards"),
        "--limit", "8", "--out", str(out), "--iterations", "2", "--seeds", "0",
        "--configs", "standard", "standard-cb", "integrated", "integrated-novar",
        "--set", "data.crop_size=[60,80]", "data.scale=[80,60]",
        "train.global_batch_size=2", "ray.num_workers=1", "ray.cpus_per_worker=1",
        "eval.batch_size=4", "model.drop_path_rate=0.0",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert set(results) == {"standard-s0", "standard-cb-s0", "integrated-s0", "integrated-novar-s0"}
    for head, result in results.items():
        assert result["seed"] == 0 and result["commit"]
        scores = result["scores"]
        assert len(scores["per_class_iou"]) == 11, head
        assert 0.0 <= scores["mIoU"] <= 1.0 and 0.0 <= scores["aAcc"] <= 1.0
        assert sum(map(sum, result["matrix"])) > 0  # the 8 test images were scored
        assert result["iterations"] == 2 and result["images_per_s"] > 0
        assert 0.0 <= result["diag"]["top3_recall"] <= 1.0
    assert "loss.weights.variance=0" in results["integrated-novar-s0"]["overrides"]
    diag = results["integrated-s0"]["diag"]
    assert 0.0 <= diag["general_aAcc"] <= 1.0 and 0.0 <= diag["refine_aAcc"] <= 1.0
    decisions = results["integrated-s0"]["decisions"]
    assert set(decisions) == {"product", "general", "refine"}
    # the study's integrated runs predict with the product (pinned): the same matrix as the eval
    assert decisions["product"]["matrix"] == results["integrated-s0"]["matrix"]
    assert "decisions" not in results["standard-s0"]
    report = (out / "report-s0.md").read_text()
    assert "test mIoU" in report and "IoU Bicyclist" in report and "change (pp)" in report
    assert "refinement alone" in report

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("segnext-camvid-cpu").experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all("eval/test/mIoU" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "per_class_iou_heads.png" in artifacts

    # a rerun skips the runs whose JSON exists and trains nothing
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("exists, skipped") == 4 and "training" not in again.stdout

    # the seeds report builds its tables and picture from whatever run JSONs exist
    report_command = [sys.executable, str(REPO / "bench" / "camvid_seeds_report.py"),
                      "--results", str(out / "results"), "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]
    done = subprocess.run(report_command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "results" / "report.md").read_text()
    for needle in ("| mIoU |", "IoU Pedestrian/Bicyclist", "confusion Pole/SignSymbol/Fence",
                   "integrated - standard-cb", "integrated - integrated-novar",
                   "integrated-general - standard-cb",
                   "one seed: no verdict", "| general | integrated |", "| refine | integrated |"):
        assert needle in text, needle
    assert (out / "results" / "report.png").stat().st_size > 0
    reports = client.search_runs(runs[0].info.experiment_id, "attributes.run_name = 'camvid-seeds-report'")
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id)} >= {"seeds_report.png"}
