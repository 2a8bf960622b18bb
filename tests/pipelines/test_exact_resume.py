"""Exact resume and worker-count independence, end to end through `segnext train`.

One uninterrupted 2-worker run is the reference. A run whose worker crashes at iteration 3
(restarted by Ray from the checkpoint of iteration 2), a run that crashes at 5 and is continued
with --resume, and a 1-worker run (gradient accumulation over 4 micro-batches instead of 2)
must all produce the reference's loss at every step and its final weights. Drop path is on, so
the per-micro-batch seeding is tested too; DDP's `no_sync` path runs in every 2-worker step.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint_io import load_checkpoint
from pipelines.config import load_config
from pipelines.train import driver as train_module

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, make_shards, experiment_yaml) -> Path:
    """The tiny experiment with drop path on and 2 micro-batches per worker, logging every step."""
    root = tmp_path_factory.mktemp("exact")
    # 36 samples: 4 global batches per epoch, so 6 steps cross an epoch boundary
    shards = make_shards(36, 6, shard_size=10)
    experiment_yaml(root, shards, {
        "model.drop_path_rate": 0.1, "train.per_worker_batch_size": 2, "train.log_every": 1,
        "mlflow.experiment": "exact",
    })
    return root


def _train(workdir: Path, name: str, *overrides: str, resume: bool = False):
    cfg = load_config(workdir / "exp.yaml", [f"run.name={name}", *overrides])
    return train_module.train(cfg, resume=name if resume else None)


def _losses(workdir: Path, run_id: str) -> dict[int, float]:
    """train/loss per step; a step logged twice (before and after a restore) keeps its last."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def _parameters(workdir: Path, name: str) -> dict[str, torch.Tensor]:
    """Final weights, without BatchNorm running statistics (rank 0's own; see README)."""
    payload = load_checkpoint(workdir / "ray" / name / "checkpoint_0000006")
    return {key: value for key, value in payload["model"].items()
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.fixture(scope="module")
def reference(workdir: Path, ray_session: None):
    result = _train(workdir, "reference")
    assert result.iteration == 6 and result.start_iteration == 0
    return result


# Conv biases feeding straight into BatchNorm (the MSCAN stem and patch embeddings, as in the
# official model): BN removes them, so their true gradient is zero and what reaches them is
# float noise, which AdamW's normalisation turns into steps of up to lr. Summing the same
# micro-batch gradients in another order (1 worker vs a DDP all-reduce) changes that noise.
NOISE_ONLY = re.compile(r"backbone\.stages\.\d+\.embed\.(conv1|conv2|proj)\.bias")
LR, STEPS = 2.0e-3, 6


def _assert_same_run(workdir: Path, name: str, run_id: str, reference, *, atol: float) -> None:
    expected, got = _losses(workdir, reference.run_id), _losses(workdir, run_id)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    want, have = _parameters(workdir, "reference"), _parameters(workdir, name)
    assert want.keys() == have.keys()
    differences = {key: float((want[key] - have[key]).abs().max()) for key in want}
    worst = max(value for key, value in differences.items() if not NOISE_ONLY.fullmatch(key))
    assert worst <= atol, f"largest weight difference {worst}"
    noise = max(value for key, value in differences.items() if NOISE_ONLY.fullmatch(key))
    assert noise <= LR * STEPS


def test_restart_after_a_worker_crash_continues_exactly(workdir: Path, reference) -> None:
    from mlflow.tracking import MlflowClient

    result = _train(workdir, "crashed", "train.fail_at_iteration=3", "train.max_failures=1")
    run_dir = workdir / "ray" / "crashed"
    assert (run_dir / "fault-injected.marker").is_file()
    assert result.iteration == 6 and result.start_iteration == 2
    _assert_same_run(workdir, "crashed", result.run_id, reference, atol=1e-6)

    latest = load_checkpoint(run_dir / "checkpoint_0000006")
    assert latest["data_position"] == {"iteration": 6, "epoch": 1, "sample": 16,
                                       "num_samples": 36, "global_batch_size": 8, "seed": 0,
                                       "version": 1}
    assert latest["meta"].num_classes == 7 and set(latest["rng"]) == {
        "plan", "augmentation", "forward"}
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if (p / "checkpoint.pt").exists())
    assert "checkpoint_0000006" in kept and len(kept) <= 2  # keep_best=1: best + latest

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/general", "train/refine", "train/variance", "lr/decoder",
                "perf/images_per_s", "val/mIoU", "val/IoU/background", "best/val_mIoU"):
        assert key in run.data.metrics, key
    assert {m.step for m in client.get_metric_history(result.run_id, "val/mIoU")} == {2, 4, 6}
    pictures = {a.path for a in client.list_artifacts(result.run_id, "validation/step_0000006")}
    assert {f"validation/step_0000006/{name}" for name in (
        "confusion_matrix.png", "per_class_iou.png", "predictions.png", "metrics.json")} <= pictures


class _Version:
    version = "1"


def test_resume_after_a_crash_continues_exactly(workdir: Path, reference, monkeypatch) -> None:
    """--resume continues the same MLflow run from the last checkpoint, then registers."""
    with pytest.raises(Exception, match="injected failure at iteration 5"):
        _train(workdir, "resumed", "train.fail_at_iteration=5", "train.max_failures=0")
    registered = []
    monkeypatch.setattr("pipelines.tracking.registry.register_checkpoint",
                        lambda path, **kwargs: registered.append((path, kwargs)) or _Version())
    result = _train(workdir, "resumed", "train.fail_at_iteration=5", "registry.register=true",
                    resume=True)
    assert result.iteration == 6 and result.start_iteration == 4
    _assert_same_run(workdir, "resumed", result.run_id, reference, atol=1e-6)
    assert result.registered_version == "1"
    assert registered == [(result.best_checkpoint, {
        "run_id": result.run_id, "registry_name": "segnext",
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"})]


def test_one_worker_trains_the_same_global_batches_as_two(workdir: Path, reference) -> None:
    """1 worker x 4 micro-batches == 2 workers x 2 micro-batches (DDP averages the rest)."""
    result = _train(workdir, "one-worker", "ray.num_workers=1", "ray.cpus_per_worker=1")
    assert result.iteration == 6
    _assert_same_run(workdir, "one-worker", result.run_id, reference, atol=2e-5)
