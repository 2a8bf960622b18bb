"""`segnext train`: check everything in the driver, then launch Ray Train workers on Ray Data.

Order matters: the config, the shards' manifest, the model options and the MLflow store are
all checked (and the MLflow experiment and run created) before Ray starts a single worker, so a
typo costs seconds, not a cluster start-up, and the SQLite store is never created concurrently.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, ExperimentConfig, load_config, to_dict, to_yaml

SCORE = "val/mIoU"
# Ray Train V2 tees print() into its logger too, so every line would show twice on the driver.
WORKER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
CURVES = ("train/loss", "val/mIoU", "val/aAcc", "perf/images_per_s")


@dataclass
class TrainResult:
    run_name: str
    run_id: str
    path: str  # the Ray run folder (checkpoints live under it)
    best_checkpoint: str | None
    best_val_miou: float | None
    metrics: dict[str, Any] = field(default_factory=dict)  # last reported metrics
    iteration: int = 0
    start_iteration: int = 0  # > 0 when the last attempt resumed from a checkpoint
    registered_version: str | None = None  # model registry version of the best checkpoint


@dataclass
class Prepared:
    """What the driver resolved before starting workers."""

    cfg: ExperimentConfig  # with absolute local paths
    meta: dict[str, Any]  # checkpoint meta (classes, palette, normalisation, model)
    num_params: int
    train_samples: int


# ---------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train SegNeXt with Ray Train on Ray Data shards, tracked in MLflow",
        description="Train SegNeXt: TorchTrainer DDP workers fed by Ray Data, logged to MLflow. "
        "Overrides are dotted keys, e.g. optim.lr=1e-3 ray.num_workers=4 train.amp=false.",
    )
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("--resume", metavar="RUN_NAME",
                        help="continue an interrupted run from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, parsed as YAML values")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, config_name=Path(args.config).stem)
    except ConfigError as error:
        print(f"segnext train: configuration error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    miou = "n/a" if result.best_val_miou is None else f"{result.best_val_miou:.4f}"
    return (
        f"run {result.run_name} finished at iteration {result.iteration}\n"
        f"  best val mIoU    {miou}\n"
        f"  best checkpoint  {result.best_checkpoint}\n"
        f"  Ray run folder   {result.path}\n"
        f"  MLflow run id    {result.run_id}"
    )


# ---------------------------------------------------------------------------------- API


def train(cfg: ExperimentConfig, *, resume: str | None = None, config_name: str = "run") -> TrainResult:
    """`segnext train`: name the run (or pick the one to resume) and run it."""
    storage = _absolute(cfg.run.storage_path)
    if resume:
        run_name = resume
        if _is_local(storage) and not (Path(storage) / run_name).is_dir():
            raise ConfigError(
                f"--resume {run_name}: no run folder {Path(storage) / run_name}; pass a run name "
                f"that exists under run.storage_path ({storage})"
            )
    else:
        run_name = cfg.run.name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if _is_local(storage) and (Path(storage) / run_name).exists():
            raise ConfigError(
                f"run {run_name} already exists in {storage}; continue it with --resume "
                f"{run_name} or choose another run.name"
            )
    return run_training(cfg, run_name=run_name, storage_path=storage)


def run_training(
    cfg: ExperimentConfig,
    *,
    run_name: str,
    storage_path: str,
    callbacks: list | None = None,
    mlflow_parent_run_id: str | None = None,
    mlflow_run_tags: dict | None = None,
) -> TrainResult:
    """Build and fit the TorchTrainer for `cfg`; an existing run of that name is continued.

    `callbacks` go to `ray.train.RunConfig` (e.g. Tune's `TuneReportCallback`); with
    `mlflow_parent_run_id` the MLflow run is nested under that run.
    """
    storage_path = _absolute(storage_path)
    cfg = replace(cfg, run=replace(cfg.run, name=run_name, storage_path=storage_path))
    prepared = prepare(cfg)
    cfg = prepared.cfg
    print(f"[segnext] run {run_name}: resolved config\n{to_yaml(cfg)}", flush=True)

    from mlflow.tracking import MlflowClient

    from pipelines import tracking

    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.ensure_experiment(tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient(tracking_uri)
    run_id = _open_mlflow_run(client, experiment_id, cfg, prepared, run_name,
                              parent_run_id=mlflow_parent_run_id, tags=mlflow_run_tags or {})

    init_ray(cfg.ray.address)
    try:
        result = _fit(cfg, prepared, run_name, storage_path, callbacks,
                      tracking_uri=tracking_uri, run_id=run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return _finish(cfg, client, tracking_uri, run_id, run_name, result)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join (or start) Ray unless already connected; quiet worker logs, worker environment."""
    import ray

    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address=address,
        num_cpus=num_cpus,
        logging_level="WARNING",
        logging_config=ray.LoggingConfig(log_level="WARNING"),
        runtime_env={"env_vars": WORKER_ENV},
    )


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Resolve paths, read the manifest, dry-build the model: every error here is a ConfigError."""
    from data.shards import load_manifest
    from data.transforms import MEAN, STD
    from pipelines.checkpoint import build_meta
    from pipelines.train_loop import build_model

    root = cfg.data.root if not _is_local(cfg.data.root) else _absolute(cfg.data.root)
    if _is_local(root) and not Path(root).is_dir():
        raise ConfigError(
            f"data.root {root} does not exist; write shards there first (segnext shards ...) "
            "or point data.root at an existing shards folder"
        )
    try:
        manifest = load_manifest(root)
    except Exception as error:  # the reader's own message names the file
        raise ConfigError(f"data.root {root}: cannot read the shards' manifest: {error}") from error
    num_classes = len(manifest.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes = {cfg.model.num_classes} but {root} has {num_classes} classes; "
            "remove model.num_classes to take it from the manifest"
        )
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        if split not in manifest.splits:
            raise ConfigError(
                f"data.{key} = {split!r} is not in {root} (splits: {sorted(manifest.splits)})"
            )
    per_worker = manifest.num_samples(cfg.data.train_split) // cfg.ray.num_workers
    if per_worker < cfg.micro_batch_size:
        raise ConfigError(
            f"split {cfg.data.train_split!r} has {manifest.num_samples(cfg.data.train_split)} "
            f"samples: fewer than one batch of {cfg.micro_batch_size} per worker for "
            f"{cfg.ray.num_workers} workers; lower train.global_batch_size or ray.num_workers"
        )
    pretrained = cfg.model.pretrained
    if pretrained and _is_local(pretrained):
        pretrained = _absolute(pretrained)
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained {pretrained} does not exist; fix the path")
    if cfg.train.fail_at_iteration is not None and not _is_local(cfg.run.storage_path):
        raise ConfigError("train.fail_at_iteration (a test hook) needs a local run.storage_path")
    cfg = replace(
        cfg,
        data=replace(cfg.data, root=root),
        model=replace(cfg.model, pretrained=pretrained, num_classes=num_classes),
        run=replace(cfg.run, storage_path=_absolute(cfg.run.storage_path)),
    )
    try:
        model = build_model(cfg, num_classes)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model options rejected by create_model: {error}") from error
    meta = build_meta(
        variant=model.variant,
        num_classes=num_classes,
        classifier=cfg.model.classifier,
        classifier_kwargs=cfg.model.classifier_kwargs,
        nmf=cfg.model.nmf,
        class_names=list(manifest.classes),
        palette=[list(color) for color in manifest.palette],
        ignore_index=manifest.ignore_index,
        mean=list(MEAN),
        std=list(STD),
        crop_size=cfg.data.crop_size,
    )
    return Prepared(cfg=cfg, meta=meta, num_params=sum(p.numel() for p in model.parameters()),
                    train_samples=manifest.num_samples(cfg.data.train_split))


# ---------------------------------------------------------------------------------- pieces


def _open_mlflow_run(client, experiment_id, cfg, prepared, run_name, *, parent_run_id, tags):
    """Continue the MLflow run of this Ray run if there is one, else create it with params."""
    import ray
    import torch

    from pipelines import tracking
    from pipelines.config import to_flat_dict

    run_id = tracking.find_run(client, experiment_id, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        print(f"[segnext] continuing MLflow run {run_id}", flush=True)
        return run_id
    all_tags = {
        "mlflow.source.git.commit": tracking.git_commit(),
        "ray.version": ray.__version__,
        "torch.version": torch.__version__,
        "workers.count": str(cfg.ray.num_workers),
        "workers.kind": "GPU" if cfg.ray.use_gpu else "CPU",
        "model.params": str(prepared.num_params),
        **{k: str(v) for k, v in tags.items()},
    }
    run_id = tracking.start_run(client, experiment_id, ray_run_name=run_name, tags=all_tags,
                                parent_run_id=parent_run_id)
    tracking.log_params(client, run_id, to_flat_dict(cfg))
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    client.log_dict(run_id, prepared.meta, "dataset_meta.json")
    return run_id


def _fit(cfg, prepared, run_name, storage_path, callbacks, *, tracking_uri, run_id):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from data.stream import build_dataset, configure_data_context

    configure_data_context(progress_bars=False)  # the context travels with the datasets

    datasets = {
        "train": build_dataset(
            cfg.data.root, cfg.data.train_split, train=True,
            crop_size=tuple(cfg.data.crop_size),
            scale=tuple(cfg.data.scale) if cfg.data.scale else None,
            ratio_range=tuple(cfg.data.ratio_range), cat_max_ratio=cfg.data.cat_max_ratio,
            seed=cfg.train.seed, epochs=cfg.data.stream_epochs, on_error=cfg.data.on_error,
            read_cpus=cfg.data.read_cpus,
        ),
        "val": build_dataset(
            cfg.data.root, cfg.data.val_split, train=False,
            crop_size=tuple(cfg.data.val_size or cfg.data.crop_size),
            scale=tuple(cfg.data.scale) if cfg.data.scale else None,
            seed=cfg.train.seed, on_error=cfg.data.on_error, read_cpus=cfg.data.read_cpus,
        ),
    }
    loop_config = {
        "experiment": to_dict(cfg),
        "meta": prepared.meta,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "train_samples": prepared.train_samples,
        "fault_marker": str(Path(storage_path) / run_name / "fault-injected.marker"),
    }
    resources = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray 2.60 keeps the K best by score and never deletes the latest: best K + latest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_best,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": WORKER_ENV},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=_eval_split_data_config(("val",)),
    )
    return trainer.fit()


def _train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Imported lazily so the driver does not pay for the worker's imports at CLI start."""
    from pipelines.train_loop import train_loop_per_worker

    return train_loop_per_worker(config)


def _finish(cfg, client, tracking_uri, run_id, run_name, result) -> TrainResult:
    """Best checkpoint, curves, registry, end of the MLflow run."""
    from pipelines import tracking

    best_path, best_score = None, None
    for checkpoint, metrics in result.best_checkpoints or []:
        score = metrics.get(SCORE)
        if score is not None and (best_score is None or score > best_score):
            best_path, best_score = checkpoint.path, float(score)
    returned = result.return_value or {}
    if best_score is not None:
        client.log_metric(run_id, "best/val_mIoU", best_score)
        client.set_tag(run_id, "best_checkpoint", best_path)
    histories = tracking.metric_histories(client, run_id, CURVES)
    client.log_figure(run_id, tracking.curves_figure(histories), "curves.png")
    version = None
    if cfg.registry.register and best_path is not None:
        from pipelines.registry import register_checkpoint

        version = str(register_checkpoint(best_path, run_id=run_id, tracking_uri=tracking_uri,
                                          registry_name=cfg.registry.name).version)
        print(f"[segnext] registered {cfg.registry.name} version {version}", flush=True)
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(
        run_name=run_name,
        run_id=run_id,
        path=str(result.path),
        best_checkpoint=best_path,
        best_val_miou=best_score,
        metrics=dict(result.metrics or {}),
        iteration=int(returned.get("iteration", 0)),
        start_iteration=int(returned.get("start_iteration", 0)),
        registered_version=version,
    )


def _is_local(path: str) -> bool:
    return "://" not in path


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if _is_local(path) else path


def _eval_split_data_config(eval_datasets: tuple[str, ...]):
    """A DataConfig that splits training data equally (DDP needs equal step counts per worker)
    but evaluation data exactly: Ray splits every dataset with `equal=True`, which drops up to
    `workers - 1` rows, and a validation score must see every sample once (`equal=False`)."""
    from ray.train import DataConfig

    class EvalSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            train_sets = {k: v for k, v in datasets.items() if k not in eval_datasets}
            output = super().configure(train_sets, world_size, worker_handles, worker_node_ids,
                                       **kwargs)
            for name in eval_datasets:
                if name not in datasets:  # Ray 2.60 configures one dataset per call
                    continue
                dataset = datasets[name].copy(datasets[name])
                if dataset.name is None:
                    dataset.set_name(name)
                dataset.context.execution_options = self._resolve_execution_options(name)
                for rank, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                    output[rank][name] = split
            return output

    return EvalSplitDataConfig(datasets_to_split="all")
