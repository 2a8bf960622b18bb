"""`segnext train` end to end on tiny synthetic shards: 2 CPU workers, MLflow in a temp store."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import train as train_module
from pipelines.checkpoint import load_checkpoint
from pipelines.cli import main
from pipelines.config import ConfigError, load_config

CONFIG = """
model: {variant: tiny, classifier: integrated, drop_path_rate: 0.0}
data: {root: ROOT, crop_size: [64, 64], ratio_range: [0.75, 1.25], read_cpus: 0.25}
optim: {lr: 2.0e-3}
schedule: {iterations: 6, warmup_iters: 1}
train: {global_batch_size: 8, log_every: 2, val_every: 2, checkpoint_every: 2, keep_best: 1}
eval: {batch_size: 8}
ray: {num_workers: 2, cpus_per_worker: 0.5}
mlflow: {tracking_uri: MLFLOW, experiment: test}
registry: {register: false}
run: {storage_path: STORAGE}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards (64x64 synthetic scenes), an MLflow store and a Ray storage folder."""
    from data.shards import write_shards
    from data.sources import Synthetic

    root = tmp_path_factory.mktemp("train")
    write_shards(Synthetic(num_train=32, num_val=6, size=(64, 64)), root / "shards")
    text = (
        CONFIG.replace("ROOT", str(root / "shards"))
        .replace("MLFLOW", f"sqlite:///{root / 'mlflow.db'}")
        .replace("STORAGE", str(root / "ray"))
    )
    (root / "exp.yaml").write_text(text)
    return root


class _Version:
    version = "1"


@pytest.fixture
def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything gets as far as starting Ray or building the trainer."""

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started although the configuration is invalid")

    monkeypatch.setattr("ray.init", forbidden)
    monkeypatch.setattr(train_module, "_fit", forbidden)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.nope=1", "unknown config key train.nope"),
        ("schedule.iterations=many", "schedule.iterations = 'many' has type str, expected int"),
        ("data.root=/does/not/exist", "data.root /does/not/exist does not exist"),
        ("model.num_classes=3", "remove model.num_classes"),
        ("data.val_split=test", "data.val_split = 'test' is not in"),
        ("model.nmf={bogus: 1}", "model options rejected by create_model"),
    ],
)
def test_bad_config_fails_before_workers(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture, override: str, needle: str
) -> None:
    code = main(["train", "--config", str(workdir / "exp.yaml"), override])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_resume_needs_an_existing_run(workdir: Path, no_workers: None) -> None:
    with pytest.raises(ConfigError, match="--resume nosuchrun: no run folder"):
        train_module.train(load_config(workdir / "exp.yaml"), resume="nosuchrun")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    train_module.init_ray("local", num_cpus=2)  # a private cluster, even if another one runs
    yield
    ray.shutdown()


@pytest.mark.slow
def test_train_survives_a_worker_failure_then_resumes(
    workdir: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run: trains, validates, checkpoints, logs; a crash at iteration 3 restarts the workers
    from the checkpoint of iteration 2. Then --resume continues the finished run to 8 and
    registers its best checkpoint."""
    from mlflow.tracking import MlflowClient

    cfg = load_config(workdir / "exp.yaml",
                      ["train.fail_at_iteration=3", "train.max_failures=1", "run.name=e2e"])
    result = train_module.train(cfg)
    run_dir = workdir / "ray" / "e2e"
    assert (run_dir / "fault-injected.marker").is_file()
    assert result.iteration == 6 and result.start_iteration == 2
    assert 0.0 <= result.best_val_miou <= 1.0

    # keep_best=1: the best checkpoint plus the latest one survive
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if (p / "checkpoint.pt").exists())
    assert "checkpoint_0000006" in kept and len(kept) <= 2
    assert Path(result.best_checkpoint).name in kept
    latest = load_checkpoint(run_dir / "checkpoint_0000006")
    assert latest["iteration"] == 6 and latest["meta"]["num_classes"] == 7
    assert latest["config"]["train.fail_at_iteration"] == 3

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.002"
    assert run.data.params["model.classifier"] == "integrated"
    assert run.data.tags["workers.count"] == "2" and run.data.tags["ray.version"]
    for key in ("train/loss", "train/general", "train/refine", "train/variance", "lr/decoder",
                "perf/images_per_s", "perf/data_wait_fraction", "val/mIoU", "val/IoU/background",
                "best/val_mIoU"):
        assert key in run.data.metrics, key
    steps = {m.step for m in client.get_metric_history(result.run_id, "val/mIoU")}
    assert steps == {2, 4, 6}
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "curves.png", "validation"} <= artifacts
    pictures = {a.path for a in client.list_artifacts(result.run_id, "validation/step_0000006")}
    assert {f"validation/step_0000006/{name}" for name in (
        "confusion_matrix.png", "per_class_iou.png", "predictions.png", "metrics.json")} <= pictures

    registered = []
    monkeypatch.setattr("pipelines.registry.register_checkpoint",
                        lambda path, **kwargs: registered.append((path, kwargs)) or _Version())
    resumed = train_module.train(
        load_config(workdir / "exp.yaml", ["schedule.iterations=8", "registry.register=true"]),
        resume="e2e",
    )
    assert resumed.run_id == result.run_id and resumed.registered_version == "1"
    assert registered == [(resumed.best_checkpoint, {
        "run_id": result.run_id, "registry_name": "segnext",
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"})]
    assert resumed.start_iteration == 6 and resumed.iteration == 8
    assert (run_dir / "checkpoint_0000008" / "checkpoint.pt").is_file()
    assert client.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("fused", [False, True])
def test_fused_msca_switch_keeps_checkpoint_keys(workdir: Path, fused: bool) -> None:
    """train.fused_msca swaps MSCA for FusedMSCA without changing the state_dict layout."""
    from pipelines.train_loop import build_model
    from segnext.fast import FusedMSCA

    cfg = load_config(workdir / "exp.yaml", [f"train.fused_msca={str(fused).lower()}"])
    model = build_model(cfg, num_classes=7)
    reference = build_model(load_config(workdir / "exp.yaml"), num_classes=7)
    assert any(isinstance(m, FusedMSCA) for m in model.modules()) is fused
    assert list(model.state_dict()) == list(reference.state_dict())
