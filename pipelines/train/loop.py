"""What every Ray Train worker runs: set up, restore, then step through its share of the plan.

The pieces live in their own modules: the batch plan and the stream (`data.plan`,
`data.stream`), one optimizer step (`pipelines.train.step`), validation (`pipelines.train.periodic_validation`),
checkpoints (`pipelines.train.checkpointing`), the metrics window (`pipelines.train.metrics_window`). Every
rank executes the same sequence of collectives (DDP gradient sync, the metric all-reduces,
`ray.train.report`) at the same iterations, so no rank waits for another forever. Rank 0 alone
writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

import segnext
from data.stream import TrainStream
from pipelines.checkpoint_io import model_overrides
from pipelines.config import ExperimentConfig, config_from_dict, to_flat_dict
from pipelines.meta import ModelMeta
from pipelines.metric_names import SCORE
from pipelines.tracking import runs as tracking
from pipelines.train.checkpointing import Checkpointer
from pipelines.train.initial_weights import apply_initial_weights
from pipelines.train.metrics_window import MetricsWindow
from pipelines.train.optim import RecipeSchedule, build_optimizer
from pipelines.train.periodic_validation import (
    ValidationFailed,
    Validator,
    log_validation,
    summarize,
)
from pipelines.train.step import train_step
from segnext.fast import apply_fast_path
from segnext.losses import class_balance_weights

# Depth-wise conv weight gradients differ from their parameters only in the stride of a size-1
# dimension; DDP still flags it although the layouts are equivalent.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (re-validated there: `config_from_dict`)."""

    experiment: dict[str, Any]  # pipelines.config.to_dict(cfg)
    meta: ModelMeta  # classes, palette, normalisation, model: saved in every checkpoint
    stream: TrainStream  # the indexed training samples and their batch plan
    tracking_uri: str
    run_id: str
    fault_marker: str  # where the fault-injection test hook records that it fired


@dataclass
class LoopState:
    iteration: int = 0  # optimizer steps done
    start_iteration: int = 0  # where this attempt started (> 0 after a restore)
    last_val: dict[str, float] = field(default_factory=dict)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point given to `TorchTrainer`: config = {"args": WorkerArgs}."""
    args: WorkerArgs = config["args"]
    cfg = config_from_dict(args.experiment, source="train loop config")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plan = args.stream.plan

    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    core = build_model(cfg, args.meta.num_classes)
    optimizer = build_optimizer(core, cfg.optim)
    scheduler = RecipeSchedule(optimizer, cfg.schedule)
    checkpointer = Checkpointer(core, optimizer, scheduler, plan=plan,
                                config=to_flat_dict(cfg), meta=args.meta.to_dict(), rank=rank)
    state = LoopState()
    restored = checkpointer.restore()
    if restored is not None:
        state.iteration = state.start_iteration = restored.iteration
        state.last_val = restored.metrics
        if rank == 0:
            position = plan.position(state.iteration)
            print(f"[segnext] restored checkpoint of iteration {state.iteration} (epoch "
                  f"{position.epoch}, sample {position.sample}), {world} workers", flush=True)
            for warning in restored.warnings:
                print(f"[segnext] warning: {warning}", flush=True)
    else:
        apply_initial_weights(cfg.model, core, log=rank == 0)

    if world > 1 and device.type == "cuda":
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    if cfg.train.channels_last:
        core = core.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(core)  # moves to device, wraps DDP when world > 1
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    step_model = torch.compile(model) if cfg.train.compile else model
    _move_optimizer_state(optimizer, device)

    logger = tracking.RunLogger(args.tracking_uri, args.run_id, enabled=rank == 0)
    logger.tags({
        "workers.device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "workers.world_size": str(world),
    })
    loop = TrainLoop(
        cfg, args, state, model=step_model, core=core, optimizer=optimizer, scheduler=scheduler,
        criterion=build_criterion(cfg, args.meta), checkpointer=checkpointer, logger=logger,
        device=device, rank=rank, world=world,
    )
    if cfg.train.fail_at_iteration is not None:
        loop.hooks.append(FailureInjector(cfg.train.fail_at_iteration, Path(args.fault_marker), rank))
    outcome = {"start_iteration": state.start_iteration, "world_size": world}
    try:
        loop.run()
    except ValidationFailed as error:  # every rank gets here together: return, do not crash
        outcome["fatal"] = f"validation at iteration {state.iteration} failed: {error}"
    return {**outcome, "iteration": state.iteration,
            "epoch": plan.position(state.iteration).epoch, "metrics": dict(state.last_val)}


def build_model(cfg: ExperimentConfig, num_classes: int) -> segnext.SegNeXt:
    """A fresh SegNeXt as `cfg.model` describes it (the driver's dry build uses it too)."""
    overrides = model_overrides(cfg.model.classifier_options(), cfg.model.nmf)
    if cfg.model.drop_path_rate is not None:
        overrides["drop_path_rate"] = cfg.model.drop_path_rate
    model = segnext.create_model(
        cfg.model.variant, num_classes, classifier=cfg.model.classifier, **overrides
    )
    if cfg.train.fused_msca:  # same state_dict keys: checkpoints and official weights unaffected
        apply_fast_path(model, fused_msca=True)
    return model


def build_criterion(cfg: ExperimentConfig, meta: ModelMeta) -> nn.Module:
    """The loss `cfg` describes; `cfg.loss.class_frequencies` was filled in by the driver."""
    class_weights = None
    balance = cfg.loss.class_balance_for(cfg.model.classifier)
    if balance > 0:
        class_weights = class_balance_weights(cfg.loss.class_frequencies, balance)
    return segnext.build_criterion(
        cfg.model.classifier,
        ignore_index=meta.ignore_index,
        average=cfg.loss.average,
        weights=cfg.loss.weights,
        top_k=cfg.model.classifier_kwargs.get("top_k", 3),
        variance_top_k=cfg.loss.variance_top_k,
        resolution=cfg.loss.resolution,
        warmup_iters=cfg.loss.warmup_iters,
        class_weights=class_weights,
    )


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            if torch.is_tensor(value) and key != "step":
                per_param[key] = value.to(device)



class TrainLoop:
    """Steps through this worker's micro-batches; logs, validates, checkpoints on schedule."""

    def __init__(self, cfg: ExperimentConfig, args: WorkerArgs, state: LoopState, *, model,
                 core, optimizer, scheduler, criterion, checkpointer, logger, device, rank, world):
        self.cfg, self.args, self.state = cfg, args, state
        self.model, self.core = model, core
        self.optimizer, self.scheduler, self.criterion = optimizer, scheduler, criterion
        self.checkpointer, self.logger = checkpointer, logger
        self.device, self.rank, self.world = device, rank, world
        self.plan = args.stream.plan
        self.accumulation = self.plan.accumulation(world)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.train.amp and device.type == "cuda" else contextlib.nullcontext())
        self.validator = Validator(cfg, args.meta, core, device=device, rank=rank, world=world)
        self.window = MetricsWindow()
        self.hooks: list[Callable[[int], None]] = []  # called after every step (test hooks)
        self.started = time.monotonic()

    def run(self) -> None:
        cfg, state, plan = self.cfg, self.state, self.plan
        total = cfg.schedule.iterations
        stream = self.args.stream.micro_batches(world=self.world, rank=self.rank,
                                                start=state.iteration, stop=total,
                                                device=self.device)
        batches = (batch for _, batch in stream)
        micro_batches = plan.worker_micro_batches(self.world, self.rank)
        try:
            while state.iteration < total:
                seeds = [plan.micro_seed(state.iteration, micro) for micro in micro_batches]
                self.criterion.set_progress(state.iteration)  # loss warm-up: by position only
                try:
                    result = train_step(self.model, batches, self.criterion, self.optimizer,
                                        accumulation=self.accumulation, scheduler=self.scheduler,
                                        seeds=seeds, autocast=self.autocast,
                                        channels_last=cfg.train.channels_last)
                except FloatingPointError as error:
                    raise FloatingPointError(
                        f"{error} at iteration {state.iteration + 1} on rank {self.rank}: the "
                        "run diverged; lower optim.lr or check the data") from None
                self.window.add(result)
                state.iteration += 1
                for hook in self.hooks:
                    hook(state.iteration)
                last = state.iteration == total or self._out_of_time()
                if state.iteration % cfg.train.log_every == 0 or last:
                    self._log_training()
                checkpoint = state.iteration % cfg.train.checkpoint_every == 0 or last
                if checkpoint or state.iteration % cfg.train.val_every == 0:
                    self._validate_and_report(checkpoint=checkpoint)
                if last:
                    break
        finally:
            stream.close()

    def _log_training(self) -> None:
        metrics = self.window.metrics(self._all_reduce, self.world)
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
        epoch = self.plan.position(self.state.iteration).epoch
        metrics["epoch"] = float(epoch)
        self.logger.metrics(metrics, step=self.state.iteration)
        if self.rank == 0:
            done = self.state.iteration - self.state.start_iteration
            left = self.cfg.schedule.iterations - self.state.iteration
            eta = (time.monotonic() - self.started) / max(done, 1) * left
            last_val = self.state.last_val.get(SCORE)
            print(
                f"[segnext] it {self.state.iteration}/{self.cfg.schedule.iterations} "
                f"epoch {epoch} loss {metrics['train/loss']:.4f} "
                f"lr {self.optimizer.param_groups[0]['lr']:.2e} "
                f"{metrics['perf/images_per_s']:.1f} img/s "
                f"data-wait {100 * metrics['perf/data_wait_fraction']:.0f}% "
                f"eta {_duration(eta)}"
                + ("" if last_val is None else f" val mIoU {last_val:.4f}"),
                flush=True,
            )
        self.window.reset()

    def _validate_and_report(self, *, checkpoint: bool) -> None:
        started = time.perf_counter()
        matrix, skipped = self.validator.run()
        metrics, summary = summarize(matrix, skipped, self.args.meta)
        self.state.last_val = dict(metrics)
        iteration = self.state.iteration
        if self.rank == 0:
            log_validation(self.logger, iteration, metrics, summary, matrix,
                           self.validator.preview, self.args.meta)
            print(f"[segnext] validation at it {iteration}: mIoU {metrics[SCORE]:.4f} "
                  f"aAcc {metrics['val/aAcc']:.4f} ({time.perf_counter() - started:.1f}s)",
                  flush=True)
        report = {**metrics, "iteration": iteration,
                  "epoch": self.plan.position(iteration).epoch}
        self.checkpointer.report(iteration, report, checkpoint=checkpoint)
        self.window.exclude(time.perf_counter() - started)  # keep throughput honest

    def _out_of_time(self) -> bool:
        """Stop early once `train.time_budget_s` is spent (agreed by all ranks)."""
        budget = self.cfg.train.time_budget_s
        if budget is None:
            return False
        over = float(time.monotonic() - self.started > budget)
        return bool(self._all_reduce([over], op=dist.ReduceOp.MAX)[0] > 0)

    def _all_reduce(self, values: list[float], op=None) -> np.ndarray:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.cpu().numpy()


@dataclass
class FailureInjector:
    """Test hook: crash rank 0 once at `train.fail_at_iteration` (a marker file makes it once)."""

    iteration: int
    marker: Path
    rank: int

    def __call__(self, iteration: int) -> None:
        if iteration != self.iteration or self.rank != 0 or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"failure injected at iteration {iteration}\n")
        raise RuntimeError(f"injected failure at iteration {iteration} (train.fail_at_iteration)")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
