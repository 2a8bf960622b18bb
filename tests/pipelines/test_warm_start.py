"""`model.init_from` / `model.init_part`: start a run from a checkpoint's weights.

Fast tests: what is taken (encoder or whole model) and every refusal before Ray starts.
Slow: one real `segnext train` at a vanishing learning rate, whose checkpoint after two steps
still holds the source's encoder (and a fresh decoder); a `models:/` reference resolved through
the registry to a copy under run.storage_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segnext
from pipelines.checkpoint_io import build_meta, load_checkpoint, save_checkpoint
from pipelines.config import load_config
from pipelines.train import driver as train_module
from pipelines.train import initial_weights as warm_start
from pipelines.train.resolve import resolve

SHARD_CLASSES = 6


def source_checkpoint(folder: Path, *, num_classes: int, classifier: str = "integrated",
                      seed: int = 7) -> Path:
    """A checkpoint whose weights differ from any seed-0 initialisation."""
    torch.manual_seed(seed)
    model = segnext.create_model("tiny", num_classes, classifier=classifier, drop_path_rate=0.0)
    meta = build_meta(
        variant="tiny", num_classes=num_classes, classifier=classifier, classifier_kwargs={},
        nmf={}, class_names=[f"c{i}" for i in range(num_classes)],
        palette=[[i, i, i] for i in range(num_classes)], ignore_index=255,
        mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], crop_size=[64, 64],
    )
    payload = {"model": model.state_dict(), "iteration": 10, "epoch": 1,
               "metrics": {"val/mIoU": 0.5}, "config": {}, "meta": meta}
    return save_checkpoint(folder, payload)


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    """16 train + 4 val synthetic 64x64 scenes of SHARD_CLASSES classes (shared: read only)."""
    return make_shards(16, 4, num_classes=SHARD_CLASSES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, shards: Path, experiment_yaml) -> Path:
    """The tiny experiment at a vanishing learning rate: 2 steps on 1 worker, no warm-up."""
    root = tmp_path_factory.mktemp("warm")
    experiment_yaml(root, shards, {
        "optim.lr": 1.0e-12, "optim.weight_decay": 0.0, "schedule.iterations": 2,
        "schedule.warmup_iters": 0, "train.log_every": 1, "ray.num_workers": 1,
        "mlflow.experiment": "warm",
    })
    source_checkpoint(root / "same", num_classes=SHARD_CLASSES)
    source_checkpoint(root / "other", num_classes=SHARD_CLASSES + 2)
    return root


@pytest.fixture
def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started although the configuration is invalid")

    monkeypatch.setattr("ray.init", forbidden)
    monkeypatch.setattr(train_module, "_fit", forbidden)


def _model(num_classes: int = SHARD_CLASSES, seed: int = 0) -> segnext.SegNeXt:
    torch.manual_seed(seed)
    return segnext.create_model("tiny", num_classes, classifier="integrated", drop_path_rate=0.0)


def test_whole_model_and_encoder_only_take_the_right_tensors(workdir: Path) -> None:
    source = load_checkpoint(workdir / "other")["model"]  # 8 classes, the run has 6
    model = _model()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatch"):
        warm_start.apply_weights(model, source, "model")
    count = warm_start.apply_weights(model, source, "encoder")
    state = model.state_dict()
    assert count == sum(k.startswith("backbone.") for k in state) > 0
    for key, tensor in state.items():
        expected = source[key] if key.startswith("backbone.") else fresh[key]
        assert torch.equal(tensor, expected), key

    same = load_checkpoint(workdir / "same")["model"]
    model = _model()
    assert warm_start.apply_weights(model, same, "model") == len(same)
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.init_from=nope/checkpoint.pt"], "does not exist"),
        (["model.init_from=OTHER"], "num_classes 8, this run 6: the whole model cannot be taken"),
        (["model.init_from=STANDARD"], "classifier 'standard', this run 'integrated'"),
        (["model.init_from=SHARDS/dataset.json"], "not a torch checkpoint"),
        (["model.init_from=SAME", "model.init_part=decoder"], "model.init_part = 'decoder'"),
        (["model.init_from=SAME", "model.pretrained=SAME"], "both set the initial weights"),
        (["model.init_from=OTHER", "model.init_part=encoder", "model.variant=small"],
         "is SegNeXt-tiny, this run SegNeXt-small"),
    ],
)
def test_bad_init_from_is_refused_before_ray_starts(
    workdir: Path, shards: Path, no_workers: None, capsys: pytest.CaptureFixture, overrides,
    needle,
) -> None:
    from pipelines.cli import main

    source_checkpoint(workdir / "standard", num_classes=SHARD_CLASSES, classifier="standard")
    paths = {"OTHER": workdir / "other", "SAME": workdir / "same",
             "STANDARD": workdir / "standard", "SHARDS": shards}
    for name, path in paths.items():
        overrides = [item.replace(name, str(path)) for item in overrides]
    code = main(["train", "--config", str(workdir / "exp.yaml"), *overrides])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_prepare_resolves_a_relative_path_and_accepts_encoder_of_other_classes(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    cfg = load_config(workdir / "exp.yaml", ["model.init_from=other", "model.init_part=encoder"])
    prepared = resolve(cfg)
    assert prepared.cfg.model.init_from == str(workdir / "other")


@pytest.mark.slow
def test_train_starts_from_the_source_encoder(workdir: Path, ray_session: None) -> None:
    """lr 1e-12: after two steps the parameters are still the initial ones, so the checkpoint
    shows where training started: the source's encoder, a fresh (seed 0) decoder."""
    cfg = load_config(workdir / "exp.yaml", [
        f"model.init_from={workdir / 'other'}", "model.init_part=encoder", "run.name=enc",
    ])
    result = train_module.train(cfg)
    assert result.iteration == 2
    trained = load_checkpoint(result.best_checkpoint)["model"]
    source = load_checkpoint(workdir / "other")["model"]
    fresh = _model().state_dict()
    params = {name for name, _ in _model().named_parameters()}  # BN buffers move in training
    backbone = [k for k in params if k.startswith("backbone.")]
    head = [k for k in params if k.startswith("decode_head.") and k in source
            and source[k].shape == fresh[k].shape]
    assert backbone and head
    for key in backbone:
        assert torch.allclose(trained[key], source[key], atol=1e-6), key
    assert all(torch.allclose(trained[k], fresh[k], atol=1e-6) for k in head)
    random = [k for k in backbone if source[k].ndim > 1]  # conv weights: seed 7 vs seed 0
    assert random and not any(torch.allclose(source[k], fresh[k]) for k in random)


@pytest.mark.slow
def test_a_registered_model_is_copied_under_the_storage_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from pipelines.tracking.registry import register_checkpoint
    from pipelines.tracking.runs import ensure_experiment, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = start_run(client, ensure_experiment(uri, "warm"), ray_run_name="src", tags={})
    checkpoint = source_checkpoint(tmp_path / "src", num_classes=SHARD_CLASSES)
    register_checkpoint(checkpoint, run_id=run_id, registry_name="warm", tracking_uri=uri)

    local = warm_start.resolve_source(
        "models:/warm@champion", tracking_uri=uri, storage_path=str(tmp_path / "ray")
    )
    assert Path(local).parent.parent == tmp_path / "ray" / warm_start.FOLDER
    assert Path(local).read_bytes() == checkpoint.read_bytes()
    warm_start.check_source(local, "model", _model())
    for missing in ("models:/warm@nope", "models:/warm/7", "models:/nope@champion"):
        with pytest.raises(warm_start.WarmStartMissing, match="not in the registry"):
            warm_start.resolve_source(missing, tracking_uri=uri, storage_path=str(tmp_path))
