"""Smoke run of bench/camvid_accuracy.py: both heads, 2 iterations, 8 CamVid images per split.

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
        "--limit", "8", "--out", str(out), "--iterations", "2",
        "--set", "data.crop_size=[60,80]", "data.scale=[80,60]",
        "train.global_batch_size=2", "ray.num_workers=1", "ray.cpus_per_worker=1",
        "eval.batch_size=4", "model.drop_path_rate=0.0",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"standard", "integrated"}
    for head, result in results.items():
        scores = result["scores"]
        assert len(scores["per_class_iou"]) == 11, head
        assert 0.0 <= scores["mIoU"] <= 1.0 and 0.0 <= scores["aAcc"] <= 1.0
        assert sum(map(sum, result["matrix"])) > 0  # the 8 test images were scored
        assert result["iterations"] == 2 and result["images_per_s"] > 0
        assert 0.0 <= result["diag"]["top3_recall"] <= 1.0
    diag = results["integrated"]["diag"]
    assert 0.0 <= diag["general_aAcc"] <= 1.0 and 0.0 <= diag["refine_aAcc"] <= 1.0
    report = (out / "report.md").read_text()
    assert "test mIoU" in report and "IoU Bicyclist" in report and "change (pp)" in report
    assert "refinement alone" in report

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("segnext-camvid-cpu").experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all("eval/test/mIoU" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "per_class_iou_heads.png" in artifacts
