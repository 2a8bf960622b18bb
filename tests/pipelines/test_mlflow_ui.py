"""The MLflow UI serves what a training run records: `mlflow server` on loopback, read through
the REST API its pages use (params, metric histories, the validation pictures, the run's
Description, the registered model's aliases and description; the Description of a search's
parent run)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_registry import CLASSES, single_thread, sqlite_store, tiny_checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = (2, 4, 6)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
TUNE_CONFIG = CONFIG.with_name("demo-tune.yaml")
PICTURES = ("confusion_matrix.png", "per_class_iou.png", "predictions.png")
START_TIMEOUT_S = 120


def _record_run(uri: str, experiment: str, folder: Path) -> str:
    """A run as `segnext train` leaves it: opened by train's own `open_training_run` (params,
    Description), per-step metrics, per-validation pictures (the figures of pipelines.tracking.runs
    under the train loop's folder names), a registered model with @champion and its
    description, and the Description's outcome as `_finish` writes it."""
    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.tracking import runs as tracking
    from pipelines.tracking.registry import register_checkpoint
    from pipelines.tracking.training import open_training_run

    client = MlflowClient(uri)
    cfg = load_config(CONFIG, [f"data.root={folder / 'shards'}", "model.num_classes=3",
                               "model.classifier=standard", "mlflow.tracking_uri=" + uri,
                               "run.name=ui-run",
                               f"mlflow.experiment={client.get_experiment(experiment).name}"])
    run_id = open_training_run(cfg, num_params=4_261_000, train_samples=512,
                               meta={"class_names": list(CLASSES)}, tags={"kind": "cpu"}).run_id
    logger = tracking.RunLogger(uri, run_id, enabled=True)
    rng = np.random.default_rng(0)
    k = len(CLASSES)
    for step in STEPS:
        logger.metrics({"train/loss": 2.0 / step, "val/mIoU": 0.1 * step}, step=step)
        folder_name = f"validation/step_{step:07d}"
        matrix = rng.integers(0, 50, (k, k))
        logger.figure(tracking.confusion_matrix_figure(matrix, CLASSES),
                      f"{folder_name}/confusion_matrix.png")
        logger.figure(tracking.per_class_iou_figure(rng.random(k), CLASSES),
                      f"{folder_name}/per_class_iou.png")
        images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        masks = rng.integers(0, k, (2, 32, 32))
        logger.figure(
            tracking.prediction_grid_figure(images, masks, masks[::-1], [[0, 0, 0]] * k, 255),
            f"{folder_name}/predictions.png",
        )
    checkpoint = tiny_checkpoint(folder / "ckpt", val_miou=0.6)
    version = register_checkpoint(checkpoint, run_id=run_id, tracking_uri=uri).version
    tracking.set_description(client, run_id, tracking.finished_description(
        tracking.description(client, run_id), iteration=STEPS[-1], best_val_miou=0.6,
        best_checkpoint=str(checkpoint), model_uri=f"models:/segnext/{version}",
        data_root=cfg.data.root, val_split=cfg.data.val_split, tracking_uri=uri))
    client.set_terminated(run_id)
    return run_id


def _record_search(uri: str, experiment: str, folder: Path) -> str:
    """A search's parent run as `segnext tune` leaves it, by its own two functions."""
    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.tracking.search import COMPLETED, STOPPED, SearchSummary, TrialOutcome
    from tune.run import _open_parent_run, _record_parent

    client = MlflowClient(uri)
    cfg = load_config(TUNE_CONFIG, [f"data.root={folder / 'shards'}", "mlflow.tracking_uri=" + uri])
    run_id = _open_parent_run(client, experiment, cfg, cfg.tune, "ui-search", resume=False)
    outcomes = [
        TrialOutcome("t1", "ui-search-t1", COMPLETED, {"optim.lr": 0.001, "loss.weights.general": 1.5},
                     best_val_miou=0.7, iteration=150, checkpoint="/ckpt/t1", checkpoint_miou=0.7),
        TrialOutcome("t2", "ui-search-t2", STOPPED, {"optim.lr": 0.004, "loss.weights.general": 0.6},
                     best_val_miou=0.2, iteration=50, checkpoint="/ckpt/t2", checkpoint_miou=0.2),
    ]
    summary = SearchSummary("ui-search", str(folder / "search"), run_id, outcomes,
                            interrupted=False, best=outcomes[0], registered_version="3", wall_s=90)
    _record_parent(client, summary, cfg.tune, cfg=cfg)
    return run_id


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, route: str, **query: str) -> bytes:
        url = f"{self.base}{route}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200, url
            return response.read()

    def api(self, route: str, **query: str) -> dict:
        return json.loads(self.get(f"/api/2.0/mlflow/{route}", **query))


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory):
    """(server, run id, search run id): `mlflow server` on a free loopback port over a store
    holding one training run and one search's parent run."""
    folder = tmp_path_factory.mktemp("ui")
    uri, experiment = sqlite_store(folder)
    run_id = _record_run(uri, experiment, folder)
    search_run_id = _record_search(uri, experiment, folder)
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = (folder / "server.log").open("w")
    # no background job runners (seven huey consumers): the pages read here do not use them
    env = {**os.environ, "NO_COLOR": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    server = Server(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                if server.get("/health") == b"OK":
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield server, run_id, search_run_id
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its worker: our own group
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is still there
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


def _description(server: Server, run_id: str) -> str:
    tags = {t["key"]: t["value"] for t in server.api("runs/get", run_id=run_id)["run"]["data"]["tags"]}
    return tags["mlflow.note.content"]  # what the run page shows as its Description


def test_run_page_data(ui):
    server, run_id, _ = ui
    page = server.get("/").decode()  # the UI's single page and the script that draws it
    assert "<title>MLflow</title>" in page
    script = re.search(r'src="(static-files/static/js/main\.[0-9a-f]+\.js)"', page)
    assert script is not None and len(server.get(f"/{script[1]}")) > 100_000
    run = server.api("runs/get", run_id=run_id)["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.variant"] == "tiny" and params["optim.lr"] == "0.002"
    assert params["schedule.iterations"] == "800" and params["ray.num_workers"] == "2"
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert latest["val/mIoU"] == pytest.approx(0.6)
    for key, expected in (("val/mIoU", [0.2, 0.4, 0.6]), ("train/loss", [1.0, 0.5, 1 / 3])):
        history = server.api("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        points = sorted((m["step"], m["value"]) for m in history)
        assert [s for s, _ in points] == list(STEPS)
        assert [v for _, v in points] == pytest.approx(expected)

    listed = server.api("artifacts/list", run_id=run_id, path="validation")["files"]
    assert [f["path"] for f in listed] == [f"validation/step_{s:07d}" for s in STEPS]
    for step in STEPS:
        folder = f"validation/step_{step:07d}"
        files = server.api("artifacts/list", run_id=run_id, path=folder)["files"]
        assert sorted(Path(f["path"]).name for f in files) == sorted(PICTURES)
    picture = server.get("/get-artifact", path=f"validation/step_{STEPS[-1]:07d}/predictions.png",
                         run_uuid=run_id)
    assert picture.startswith(b"\x89PNG\r\n\x1a\n") and len(picture) > 5000


def test_run_page_description(ui):
    server, run_id, _ = ui
    text = _description(server, run_id)
    head, result = text.split("### Result (iteration 6)")
    assert head.startswith("**SegNeXt-tiny, standard classifier**: 3 classes, 4.26 M parameters.")
    assert "shards`; trained on `train` (512 images), validated on `val`" in head
    assert "800 iterations, global batch 16" in head and "2 CPU worker(s); run `ui-run`" in head
    assert "Best val mIoU: **0.6000** (`val`)" in result
    assert "Registered model: `models:/segnext/1`" in result
    data = head.split("- Data: `")[1].split("`")[0]
    assert f"`segnext eval --model models:/segnext/1 --data {data} --split val --tracking-uri " in result
    assert "`segnext predict --model models:/segnext/1 --input IMAGES --out OUT_DIR" in result


def test_search_run_page_description(ui):
    server, _, search_run_id = ui
    text = _description(server, search_run_id)
    assert text.startswith("**Hyper-parameter search `ui-search`**: 4 trials (random sampling, "
                           "ASHA: grace period 1 validation(s), reduction factor 3), at most 2")
    assert "- `optim.lr`: loguniform(0.0003, 0.006)" in text
    assert "SegNeXt-tiny, integrated classifier, 400 iterations" in text
    result = text.split("### Result")[1]
    assert "finished in 1.5 min: 1 completed, 1 stopped early, 0 failed" in result
    assert ("Best trial `t1`: val mIoU **0.7000** with `optim.lr`=0.001, "
            "`loss.weights.general`=1.5; checkpoint `/ckpt/t1`") in result
    assert "Registered model: `models:/segnext-demo/3`" in result
    assert "`segnext eval --model models:/segnext-demo/3 --data " in result


def test_model_page_data(ui):
    server, run_id, _ = ui
    model = server.api("registered-models/get", name="segnext")["registered_model"]
    assert [a["alias"] for a in model.get("aliases", [])] == ["champion"]
    assert model["description"].startswith("SegNeXt semantic segmentation, 3 classes (sky, road")
    version = server.api("model-versions/get", name="segnext", version="1")["model_version"]
    assert version["run_id"] == run_id
    assert "no champion yet: promoted to @champion" in version["description"]
    assert version["aliases"] == ["champion"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert json.loads(tags["classes"]) == list(CLASSES) and float(tags["val_mIoU"]) == 0.6
