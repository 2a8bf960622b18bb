"""`segnext train`: check everything in the driver, then launch Ray Train workers on Ray Data.

Order matters: the config, the shards' manifest, the model options and the MLflow store are
all checked (and the MLflow experiment and run created) before Ray starts a single worker, so a
typo costs seconds, not a cluster start-up, and the SQLite store is never created concurrently.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.cluster import WORKER_ENV, init_ray
from pipelines.config import ConfigError, ExperimentConfig, load_config, to_dict, to_yaml
from pipelines.metric_names import SCORE

if TYPE_CHECKING:
    from data.shards import Manifest
    from data.stream import TrainStream
    from pipelines.meta import ModelMeta

CURVES = ("train/loss", SCORE, "val/aAcc", "perf/images_per_s")


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
    world_size: int = 0  # workers of the last attempt (an elastic run may end with fewer)
    registered_version: str | None = None  # model registry version of the best checkpoint
    skipped: dict[str, int] = field(default_factory=dict)  # split -> samples left out (on_error)
    tracking_uri: str = ""
    model_uri: str | None = None  # models:/NAME/VERSION of the registered best checkpoint
    data_root: str = ""
    val_split: str = "val"


@dataclass
class Prepared:
    """What the driver resolved before starting workers."""

    cfg: ExperimentConfig  # with absolute local paths
    meta: ModelMeta  # checkpoint meta (classes, palette, normalisation, model, eval settings)
    num_params: int
    train_samples: int
    stream: TrainStream  # the indexed training samples and their batch plan


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
    """Where the results are and what to run next."""
    miou = "n/a" if result.best_val_miou is None else f"{result.best_val_miou:.4f}"
    skipped = ", ".join(f"{split} {count}" for split, count in result.skipped.items()) or "none"
    lines = [
        f"run {result.run_name} finished at iteration {result.iteration}",
        f"  best val mIoU    {miou}",
        f"  best checkpoint  {result.best_checkpoint}",
        f"  Ray run folder   {result.path}",
        f"  MLflow run id    {result.run_id}",
        f"  skipped samples  {skipped}",
    ]
    if result.model_uri:
        lines.append(f"  registered model {result.model_uri}")
    if result.tracking_uri:
        lines.append(f"  MLflow UI        mlflow ui --backend-store-uri {result.tracking_uri}")
    model = result.model_uri or result.best_checkpoint
    if model and result.data_root:
        lines.append(f"next: segnext eval --model {model} --data {result.data_root} "
                     f"--split {result.val_split}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- API


def train(cfg: ExperimentConfig, *, resume: str | None = None, config_name: str = "run") -> TrainResult:
    """`segnext train`: name the run (or pick the one to resume) and run it."""
    from pipelines import storage as run_storage

    storage = _absolute(cfg.run.storage_path)
    run_storage.configure_endpoint(cfg.storage.endpoint)
    if resume:
        run_name = resume
        if not run_storage.exists(run_storage.join(storage, run_name), key="run.storage_path"):
            raise ConfigError(
                f"--resume {run_name}: no run folder {run_storage.join(storage, run_name)}; pass "
                f"a run name that exists under run.storage_path ({storage})"
            )
    else:
        run_name = cfg.run.name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_storage.exists(run_storage.join(storage, run_name), key="run.storage_path"):
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
    from pipelines.console import log_only

    print(f"[segnext] run {run_name}: {cfg.model.variant} {cfg.model.classifier}, "
          f"{prepared.train_samples} training images, {cfg.schedule.iterations} iterations, "
          f"{cfg.ray.num_workers} {'GPU' if cfg.ray.use_gpu else 'CPU'} workers", flush=True)
    log_only(f"[segnext] resolved config\n{to_yaml(cfg)}")

    from mlflow.tracking import MlflowClient

    from pipelines.tracking import runs as tracking

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


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Resolve paths, read the manifest, dry-build the model: every error here is a ConfigError."""
    from data.shards import load_manifest
    from data.transforms import MEAN, STD
    from pipelines import storage
    from pipelines.checkpoint_io import build_meta
    from pipelines.config import to_flat_dict
    from pipelines.meta import EvalMeta
    from pipelines.train.loop import build_model

    storage.configure_endpoint(cfg.storage.endpoint)
    storage.preflight(cfg)  # endpoint, bucket, credentials: before any worker starts
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
    for key, splits in (("train_split", cfg.data.train_splits), ("val_split", [cfg.data.val_split])):
        missing = [split for split in splits if split not in manifest.splits]
        if missing:
            value = getattr(cfg.data, key)
            raise ConfigError(
                f"data.{key} = {value!r} is not in {root} (splits: {sorted(manifest.splits)})"
            )
    _check_shards_present(manifest, [cfg.data.val_split], cfg.data.on_error)
    cfg = replace(cfg, loss=replace(cfg.loss, class_frequencies=_class_frequencies(cfg, manifest)))
    stream = _train_stream(cfg, root)
    pretrained = cfg.model.pretrained
    if pretrained and _is_local(pretrained):
        pretrained = _absolute(pretrained)
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained {pretrained} does not exist; fix the path")
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
    if cfg.model.init_from:
        from pipelines.train import initial_weights as warm_start

        cfg = replace(cfg, model=replace(cfg.model, init_from=warm_start.resolve_source(
            cfg.model.init_from, tracking_uri=cfg.mlflow.tracking_uri,
            storage_path=cfg.run.storage_path)))
        warm_start.check_source(cfg.model.init_from, cfg.model.init_part, model)
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
        eval=EvalMeta.from_flat_config(to_flat_dict(cfg)),
    )
    return Prepared(cfg=cfg, meta=meta, num_params=sum(p.numel() for p in model.parameters()),
                    train_samples=len(stream.index), stream=stream)


def _class_frequencies(cfg: ExperimentConfig, manifest: Manifest) -> list[float] | None:
    """The training split(s)' class pixel shares (given or from the manifest's counts).

    Read even where `loss.class_balance` is 0, so that a search trial that raises it finds
    them; missing counts are an error only where the balance needs them.
    """
    num_classes = len(manifest.classes)
    given = cfg.loss.class_frequencies
    if given is not None:
        if len(given) != num_classes:
            raise ConfigError(
                f"loss.class_frequencies lists {len(given)} values for {num_classes} classes; "
                "give one pixel share per class or unset it to read the manifest's counts"
            )
        return list(given)
    counts = [0] * num_classes
    for split in cfg.data.train_splits:
        for c, n in enumerate(manifest.class_pixel_counts.get(split, [])):
            counts[c] += n
    total = sum(counts)
    if total > 0:
        return [n / total for n in counts]
    balance = cfg.loss.class_balance_for(cfg.model.classifier)
    if balance > 0:
        raise ConfigError(
            f"loss.class_balance = {balance} ({cfg.model.classifier} head) needs class pixel "
            f"counts, but the manifest of {cfg.data.root} has none for {cfg.data.train_splits}; "
            "set loss.class_frequencies, or loss.class_balance=0"
        )
    return None


def _train_stream(cfg: ExperimentConfig, root: str) -> TrainStream:
    """Index the training samples (every shard opened, every sample located) and plan the
    global batches; refuse worker counts that cannot share a step evenly."""
    from data.samples import SampleReadError
    from data.stream import build_train_stream

    try:
        stream = build_train_stream(
            root, cfg.data.train_splits, crop_size=tuple(cfg.data.crop_size),
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            scale=tuple(cfg.data.scale) if cfg.data.scale else None,
            ratio_range=tuple(cfg.data.ratio_range), cat_max_ratio=cfg.data.cat_max_ratio,
            seed=cfg.train.seed, on_error=cfg.data.on_error, read_cpus=cfg.data.read_cpus,
        )
    except SampleReadError as error:
        raise ConfigError(str(error)) from error
    except ValueError as error:  # the plan: too few samples for one global batch
        raise ConfigError(
            f"data.train_split {cfg.data.train_split!r}: {error}; lower "
            "train.global_batch_size or add samples"
        ) from error
    for world in worker_counts(cfg):
        try:
            stream.plan.accumulation(world)
        except ValueError as error:
            raise ConfigError(
                f"ray.num_workers / ray.min_workers: {error} (train.global_batch_size "
                f"{cfg.train.global_batch_size}, micro-batch {cfg.micro_batch_size})"
            ) from error
    return stream


def worker_counts(cfg: ExperimentConfig) -> range:
    """Every worker count the run may have: one, or min..max for an elastic run."""
    low = cfg.ray.num_workers if cfg.ray.min_workers is None else cfg.ray.min_workers
    return range(low, cfg.ray.num_workers + 1)


def _check_shards_present(manifest, splits: list[str], on_error: str) -> None:
    """Every shard the run will read exists with its manifest size (a stat each, local or
    object store): a missing shard stops the run here, not in a read task hours later. Under
    `data.on_error: skip` the run may start with shards missing; they are counted then."""
    from data.sample_index import checked_shards
    from data.samples import SampleReadError

    try:
        checked_shards(manifest, splits, record=(lambda entries: None) if on_error == "skip" else None)
    except SampleReadError as error:
        raise ConfigError(str(error)) from error


# ---------------------------------------------------------------------------------- pieces


def _open_mlflow_run(client, experiment_id, cfg, prepared, run_name, *, parent_run_id, tags):
    """Continue the MLflow run of this Ray run if there is one, else create it with params;
    either way its Description says what this attempt trains (`_finish` adds the outcome)."""
    import ray
    import torch

    from pipelines.config import to_flat_dict
    from pipelines.tracking import runs as tracking

    opening = tracking.training_description(cfg, run_name=run_name, num_params=prepared.num_params,
                                            train_samples=prepared.train_samples)
    if parent_run_id:
        opening += f"\n- Nested under MLflow run `{parent_run_id}`"
    run_id = tracking.find_run(client, experiment_id, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        tracking.set_description(client, run_id, opening + "\n- Resumed from its latest checkpoint")
        print(f"[segnext] continuing MLflow run {run_id}", flush=True)
        return run_id
    all_tags = {
        tracking.DESCRIPTION_TAG: opening,
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
    client.log_dict(run_id, prepared.meta.to_dict(), "dataset_meta.json")
    return run_id


def _fit(cfg, prepared, run_name, storage_path, callbacks, *, tracking_uri, run_id):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from data.stream import configure_data_context
    from pipelines import storage as run_storage
    from pipelines.train.loop import WorkerArgs

    configure_data_context(progress_bars=False)
    stream = prepared.stream.with_skip_ledger()  # skip mode: counts kept by the driver
    # Each worker streams its own share of the batch plan (data.stream.TrainStream), and
    # validation reads its split on the workers (pipelines.inference.scoring), at original size.
    args = WorkerArgs(
        experiment=to_dict(cfg), meta=prepared.meta, stream=stream,
        tracking_uri=tracking_uri, run_id=run_id,
        fault_marker=_fault_marker(storage_path, run_name, run_id),
    )
    resources = worker_resources(cfg)
    storage_fs, storage_fs_path = run_storage.resolve(storage_path)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"args": args},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=_scaling_workers(cfg), use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.ray.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            # through the project's filesystem (S3 endpoint and region), path without scheme
            storage_path=storage_fs_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray 2.60 keeps the K best by score and never deletes the latest: best K + latest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_best,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            worker_runtime_env={
                "env_vars": {**WORKER_ENV, **run_storage.configure_endpoint(cfg.storage.endpoint)}
            },
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def _scaling_workers(cfg: ExperimentConfig) -> int | tuple[int, int]:
    """Ray Train V2's worker count: fixed, or (min, max) for an elastic run."""
    if cfg.ray.min_workers is None:
        return cfg.ray.num_workers
    return (cfg.ray.min_workers, cfg.ray.num_workers)


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one Train worker asks Ray for (the ScalingConfig's and the tune plan's view)."""
    resources = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}
    if cfg.ray.use_gpu:
        gpus = cfg.ray.gpus_per_worker
        resources["GPU"] = resources.get("GPU", 1.0) if gpus is None else gpus
    return resources


def _train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Imported lazily so the driver does not pay for the worker's imports at CLI start."""
    from pipelines.train.loop import train_loop_per_worker

    return train_loop_per_worker(config)


def _finish(cfg, client, tracking_uri, run_id, run_name, result) -> TrainResult:
    """Best checkpoint, curves, registry, end of the MLflow run."""
    from pipelines.storage import uri_of
    from pipelines.tracking import runs as tracking

    best_path, best_score = None, None
    for checkpoint, metrics in result.best_checkpoints or []:
        score = metrics.get(SCORE)
        if score is not None and (best_score is None or score > best_score):
            best_path, best_score = uri_of(checkpoint.filesystem, checkpoint.path), float(score)
    returned = result.return_value or {}
    if returned.get("fatal"):  # ended by the workers without a retry: a configuration problem
        tracking.set_description(client, run_id, tracking.failed_description(
            tracking.description(client, run_id), returned["fatal"]))
        client.set_terminated(run_id, status="FAILED")
        raise ConfigError(f"run {run_name}: {returned['fatal']}")
    skipped = _log_skipped(cfg, client, run_id, returned)
    if best_score is not None:
        client.log_metric(run_id, "best/val_mIoU", best_score)
        client.set_tag(run_id, "best_checkpoint", best_path)
    from pipelines.console import current_log

    if current_log() is not None:  # the console's full log, as far as it goes
        client.log_artifact(run_id, str(current_log()), "logs")
    histories = tracking.metric_histories(client, run_id, CURVES)
    client.log_figure(run_id, tracking.curves_figure(histories), "curves.png")
    version = None
    if cfg.registry.register and best_path is not None:
        from pipelines.tracking.registry import register_checkpoint

        version = str(register_checkpoint(best_path, run_id=run_id, tracking_uri=tracking_uri,
                                          registry_name=cfg.registry.name).version)
        print(f"[segnext] registered {cfg.registry.name} version {version}", flush=True)
    model_uri = f"models:/{cfg.registry.name}/{version}" if version else None
    iteration = int(returned.get("iteration", 0))
    tracking.set_description(client, run_id, tracking.finished_description(
        tracking.description(client, run_id), iteration=iteration, best_val_miou=best_score,
        best_checkpoint=best_path, model_uri=model_uri, data_root=cfg.data.root,
        val_split=cfg.data.val_split, tracking_uri=tracking_uri))
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(
        run_name=run_name,
        run_id=run_id,
        path=uri_of(result.filesystem, result.path),
        best_checkpoint=best_path,
        best_val_miou=best_score,
        metrics=dict(result.metrics or {}),
        iteration=iteration,
        start_iteration=int(returned.get("start_iteration", 0)),
        world_size=int(returned.get("world_size", 0)),
        registered_version=version,
        skipped=skipped,
        tracking_uri=tracking_uri,
        model_uri=model_uri,
        data_root=cfg.data.root,
        val_split=cfg.data.val_split,
    )


def _log_skipped(cfg, client, run_id: str, returned: dict[str, Any]) -> dict[str, int]:
    """Samples left out under `data.on_error: skip`, per split: a metric, a tag, the summary.

    The train count comes from the stream's ledger (every pass counts again, so it is the sum
    over the passes streamed); the val count is that of the last validation."""
    from data.sample_index import split_label
    from data.stream import skipped_samples
    from pipelines.tracking.runs import metric_name

    train = split_label(cfg.data.train_splits)
    counts = {
        train: int(skipped_samples(cfg.data.root, cfg.data.train_splits)["count"]),
        cfg.data.val_split: int(returned.get("metrics", {}).get("val/skipped_samples", 0)),
    }
    for split, count in counts.items():
        client.log_metric(run_id, metric_name(f"data/skipped/{split}"), count)
        client.set_tag(run_id, metric_name(f"data.skipped.{split}"), str(count))
    return counts


def _fault_marker(storage_path: str, run_name: str, run_id: str) -> str:
    """Where the fault-injection test hook records that it fired: in the run folder when that
    is local, else in this machine's temp folder (the hook is for single-machine tests), keyed
    by the MLflow run, which --resume continues and a new run of the same name does not."""
    if _is_local(storage_path):
        return str(Path(storage_path) / run_name / "fault-injected.marker")
    digest = hashlib.sha1(f"{storage_path}/{run_name}/{run_id}".encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / "segnext-faults" / f"{digest}.marker")


def _is_local(path: str) -> bool:
    return "://" not in path


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if _is_local(path) else path
