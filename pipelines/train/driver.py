"""The Ray Train job of a resolved run: TorchTrainer DDP workers fed by Ray Data.

Order matters: `resolve` (pipelines.train.resolve) has checked the config, the shards'
manifest, the model options and the storage, and the MLflow run is opened, all before Ray
starts a single worker, so a typo costs seconds, not a cluster start-up, and the SQLite store
is never created concurrently. After the fit: the best checkpoint, the registry, the outcome.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from data.sample_index import split_label
from data.storage import is_remote, uri_of
from data.storage import resolve as resolve_storage
from data.stream import configure_data_context, skipped_samples
from pipelines.checkpoint_io import checkpoint_files
from pipelines.cluster import check_fits, init_ray
from pipelines.config import ConfigError, ExperimentConfig, to_dict, to_yaml
from pipelines.console import current_log, log_only
from pipelines.metric_names import SCORE
from pipelines.tracking import registry
from pipelines.tracking import training as tracking
from pipelines.train.loop import WorkerArgs, train_loop_per_worker
from pipelines.train.read_workers import prestart_train_read_workers, worker_env_vars
from pipelines.train.resolve import ResolvedRun, release_unused_claim, resolve
from pipelines.train.resume import describe_changes
from pipelines.train.start_wait import bounded_start


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


def train(
    cfg: ExperimentConfig,
    *,
    resume: str | None = None,
    config_name: str = "run",
    config_path: str | None = None,
) -> TrainResult:
    """`segnext train`: a new run (its name must be free) or `--resume NAME` (it must exist).
    Interrupted (Ctrl-C, SIGTERM), it says which checkpoint a resume starts from, and how."""
    run = resolve(cfg, run_name=resume, exists_already=bool(resume), default_name=config_name)
    try:
        return run_training(run)
    except KeyboardInterrupt:  # the one line the command ends with (pipelines.cli, exit 130)
        text = _how_to_resume(run, config_path or f"configs/{config_name}.yaml")
        raise KeyboardInterrupt(text) from None
    except BaseException:
        if not resume:
            release_unused_claim(run)  # a run that never started leaves its name free
        raise
    finally:
        run.stream.remove_cache()


def _how_to_resume(run: ResolvedRun, config_path: str) -> str:
    saved = checkpoint_files(run.run_uri)
    where = f"latest checkpoint {saved[-1]}" if saved else "no checkpoint yet (resume restarts it)"
    return (f"run {run.run_name} interrupted: {where}; continue it with: segnext train --config "
            f"{config_path} --resume {run.run_name}")


def run_training(
    run: ResolvedRun,
    *,
    callbacks: list | None = None,
    mlflow_parent_run_id: str | None = None,
    mlflow_run_tags: dict | None = None,
) -> TrainResult:
    """Build and fit the TorchTrainer for `run`; an existing run of that name is continued.

    `callbacks` go to `ray.train.RunConfig` (e.g. Tune's `TuneReportCallback`); with
    `mlflow_parent_run_id` the MLflow run is nested under that run.
    """
    cfg = run.cfg
    print(f"[segnext] run {run.run_name}: {cfg.model.variant} {cfg.model.classifier}, "
          f"{run.train_samples} training images, {cfg.schedule.iterations} iterations, "
          f"{cfg.ray.num_workers} {'GPU' if cfg.ray.use_gpu else 'CPU'} workers", flush=True)
    log_only(f"[segnext] resolved config\n{to_yaml(cfg)}")
    record = tracking.open_training_run(
        cfg, num_params=run.num_params, train_samples=run.train_samples,
        meta=run.meta.to_dict(), parent_run_id=mlflow_parent_run_id, tags=mlflow_run_tags,
        manifest=run.manifest,
    )
    try:
        if run.resume_changes:
            changes = describe_changes(run.resume_changes)
            print(f"[segnext] resumed with changes: {changes}", flush=True)
            tracking.record_resume_changes(record, cfg, changes)
        init_ray(cfg.ray.address)  # a refused or timed-out start ends the MLflow run FAILED too
        check_fits(worker_resources(cfg), cfg.ray.min_workers or cfg.ray.num_workers,
                   key="ray.num_workers / ray.cpus_per_worker / ray.use_gpu")
        result = _fit(run, callbacks, record)
    except KeyboardInterrupt:
        tracking.fail_training_run(record, "interrupted (Ctrl-C or SIGTERM)", status="KILLED")
        raise
    except BaseException as error:
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        tracking.fail_training_run(record, reason)
        raise
    return _finish(run, record, result)


def _fit(run: ResolvedRun, callbacks: list | None, record: tracking.TrainingRecord) -> Any:
    cfg, run_name = run.cfg, run.run_name
    configure_data_context(progress_bars=False)
    stream = run.stream.with_skip_ledger()  # skip mode: counts kept by the driver
    # Each worker streams its own share of the batch plan (data.stream.TrainStream), and
    # validation reads its split on the workers (pipelines.inference.scoring), at original size.
    args = WorkerArgs(
        experiment=to_dict(cfg), meta=run.meta, stream=stream,
        tracking_uri=record.tracking_uri, run_id=record.run_id,
        fault_marker=_fault_marker(run.storage_path, run_name, record.run_id),
    )
    storage_fs, storage_fs_path = resolve_storage(run.storage_path)
    worker_env = worker_env_vars(run.storage_env)
    if cfg.data.prestart_workers:  # the read tasks' processes start beside Train's
        prestart_train_read_workers(stream, cfg.ray.num_workers, cfg.ray.cpus_per_worker,
                                    worker_env)
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=_scaling_workers(cfg), use_gpu=cfg.ray.use_gpu,
            resources_per_worker=worker_resources(cfg),
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
            worker_runtime_env={"env_vars": worker_env},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    with bounded_start(cfg.ray.min_workers or cfg.ray.num_workers, worker_resources(cfg),
                       cfg.ray.start_timeout_s):
        return trainer.fit()


class _Trainer(TorchTrainer):
    """TorchTrainer whose `fit` leaves Ctrl-C to the command: Ray Train's own SIGINT handler
    aborts the run and exits 1 (or 0) without a word, the MLflow run then FAILED; without it
    SIGINT is a KeyboardInterrupt here, like SIGTERM (pipelines.cli): one line naming the
    checkpoint and the --resume command, exit 130, the MLflow run KILLED. A private hook of
    Ray Train: tests/test_canaries.py checks it still exists."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None


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


def _finish(run: ResolvedRun, record: tracking.TrainingRecord, result: Any) -> TrainResult:
    """Best checkpoint, curves, registry, end of the MLflow run."""
    cfg = run.cfg
    best_path, best_score = None, None
    for checkpoint, metrics in result.best_checkpoints or []:
        score = metrics.get(SCORE)
        if score is not None and (best_score is None or score > best_score):
            best_path, best_score = uri_of(checkpoint.filesystem, checkpoint.path), float(score)
    returned = result.return_value or {}
    if returned.get("fatal"):  # ended by the workers without a retry: a configuration problem
        tracking.fail_training_run(record, returned["fatal"])
        raise ConfigError(f"run {run.run_name}: {returned['fatal']}")
    skipped = _skipped_counts(cfg, returned)
    tracking.log_skipped(record, skipped)
    tracking.log_outcome(record, best_checkpoint=best_path, best_score=best_score,
                         log_file=current_log())
    version = None
    if cfg.registry.register and best_path is not None:
        version = str(registry.register_checkpoint(best_path, run_id=record.run_id,
                                          tracking_uri=record.tracking_uri,
                                          registry_name=cfg.registry.name).version)
        print(f"[segnext] registered {cfg.registry.name} version {version}", flush=True)
    model_uri = f"models:/{cfg.registry.name}/{version}" if version else None
    iteration = int(returned.get("iteration", 0))
    tracking.finish_training_run(record, cfg, iteration=iteration, best_checkpoint=best_path,
                                 best_score=best_score, model_uri=model_uri)
    return TrainResult(
        run_name=run.run_name,
        run_id=record.run_id,
        path=uri_of(result.filesystem, result.path),
        best_checkpoint=best_path,
        best_val_miou=best_score,
        metrics=dict(result.metrics or {}),
        iteration=iteration,
        start_iteration=int(returned.get("start_iteration", 0)),
        world_size=int(returned.get("world_size", 0)),
        registered_version=version,
        skipped=skipped,
        tracking_uri=record.tracking_uri,
        model_uri=model_uri,
        data_root=cfg.data.root,
        val_split=cfg.data.val_split,
    )


def _skipped_counts(cfg: ExperimentConfig, returned: dict[str, Any]) -> dict[str, int]:
    """Samples left out under `data.on_error: skip`, per split (a metric, a tag, the summary).

    The train count comes from the stream's ledger (every pass counts again, so it is the sum
    over the passes streamed); the val count is that of the last validation."""
    return {
        split_label(cfg.data.train_splits): int(
            skipped_samples(cfg.data.root, cfg.data.train_splits)["count"]
        ),
        cfg.data.val_split: int(returned.get("metrics", {}).get("val/skipped_samples", 0)),
    }


def _fault_marker(storage_path: str, run_name: str, run_id: str) -> str:
    """Where the fault-injection test hook records that it fired: in the run folder when that
    is local, else in this machine's temp folder (the hook is for single-machine tests), keyed
    by the MLflow run, which --resume continues and a new run of the same name does not."""
    if not is_remote(storage_path):
        return str(Path(storage_path) / run_name / "fault-injected.marker")
    digest = hashlib.sha1(f"{storage_path}/{run_name}/{run_id}".encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / "segnext-faults" / f"{digest}.marker")
