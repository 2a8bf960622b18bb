"""What every Ray Train worker runs: build, restore, train by iterations, validate, checkpoint.

Every rank executes the same sequence of collectives (DDP gradient sync, the metric
all-reduces, `ray.train.report`), at the same iterations, so no rank waits for another forever.
Rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
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
from data.samples import SampleReadError
from data.stream import iter_batches
from pipelines import tracking
from pipelines.checkpoint import load_checkpoint, model_overrides, save_checkpoint
from pipelines.config import ExperimentConfig, config_from_dict, to_flat_dict
from pipelines.optim import RecipeSchedule, build_optimizer
from segnext.fast import apply_fast_path

# Depth-wise conv weight gradients differ from their parameters only in the stride of a size-1
# dimension; DDP still flags it although the layouts are equivalent.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

PREVIEW_SAMPLES = 4  # validation images drawn in the prediction grid
TOP_CONFUSED = 5


@dataclass
class LoopState:
    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # full passes over the train split (images seen / train samples)
    start_iteration: int = 0  # where this attempt started (> 0 after a restore)
    last_val: dict[str, float] = field(default_factory=dict)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point given to `TorchTrainer`; `config` is built by `pipelines.train`."""
    cfg = config_from_dict(config["experiment"], source="train loop config")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    core = build_model(cfg, config["meta"]["num_classes"])
    optimizer = build_optimizer(core, cfg.optim)
    scheduler = RecipeSchedule(optimizer, cfg.schedule)
    state = LoopState()
    restored = _restore(core, optimizer, scheduler, state)
    if restored and rank == 0:
        print(f"[segnext] restored checkpoint of iteration {state.iteration}", flush=True)
    if not restored and cfg.model.pretrained:
        report = segnext.load_official_weights(core, cfg.model.pretrained)
        if rank == 0:
            print(f"[segnext] pretrained weights from {cfg.model.pretrained}: {report}")
    if not restored and cfg.model.init_from:  # resolved and checked by the driver
        from pipelines.warm_start import apply_source

        report = apply_source(core, cfg.model.init_from, cfg.model.init_part)
        if rank == 0:
            print(f"[segnext] initial weights: {report}", flush=True)
    torch.manual_seed(cfg.train.seed + 1009 * rank + state.iteration)  # distinct dropout per rank

    if world > 1 and device.type == "cuda":
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    if cfg.train.channels_last:
        core = core.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(core)  # moves to device, wraps DDP when world > 1
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    step_model = torch.compile(model) if cfg.train.compile else model
    _move_optimizer_state(optimizer, device)

    criterion = segnext.build_criterion(
        cfg.model.classifier,
        ignore_index=config["meta"]["ignore_index"],
        average=cfg.loss.average,
        weights=cfg.loss.weights,
        top_k=cfg.model.classifier_kwargs.get("top_k", 3),
        variance_top_k=cfg.loss.variance_top_k,
    )
    logger = tracking.RunLogger(config["tracking_uri"], config["run_id"], enabled=rank == 0)
    logger.tags({
        "workers.device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "workers.world_size": str(world),
    })
    runner = _Runner(cfg, config, state, model=step_model, core=core, optimizer=optimizer,
                     scheduler=scheduler, criterion=criterion, logger=logger, device=device,
                     rank=rank, world=world)
    outcome = {"start_iteration": state.start_iteration}
    try:
        runner.run()
    except ValidationFailed as error:  # every rank gets here together: return, do not crash
        outcome["fatal"] = f"validation at iteration {state.iteration} failed: {error}"
    return {**outcome, "iteration": state.iteration, "epoch": state.epoch,
            "metrics": dict(state.last_val)}


def build_model(cfg: ExperimentConfig, num_classes: int) -> segnext.SegNeXt:
    """A fresh SegNeXt as `cfg.model` describes it (the driver's dry build uses it too)."""
    overrides = model_overrides(cfg.model.classifier_kwargs, cfg.model.nmf)
    if cfg.model.drop_path_rate is not None:
        overrides["drop_path_rate"] = cfg.model.drop_path_rate
    model = segnext.create_model(
        cfg.model.variant, num_classes, classifier=cfg.model.classifier, **overrides
    )
    if cfg.train.fused_msca:  # same state_dict keys: checkpoints and official weights unaffected
        apply_fast_path(model, fused_msca=True)
    return model


def _restore(core, optimizer, scheduler, state: LoopState) -> bool:
    """Continue from Ray's latest checkpoint (a restart after a failure, or --resume)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    payload = _read_checkpoint(checkpoint)
    core.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    state.iteration = state.start_iteration = int(payload["iteration"])
    state.epoch = int(payload["epoch"])
    state.last_val = dict(payload.get("metrics", {}))
    return True


def _read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The payload of a Ray checkpoint, local or in object storage.

    A remote checkpoint is downloaded into a folder of this worker's own: with
    `as_directory()` the workers of one node share one temporary download folder, and a rank
    could read `checkpoint.pt` while another was still writing it (seen on S3: "truncated")."""
    from pyarrow import fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        with checkpoint.as_directory() as folder:
            return load_checkpoint(folder, map_location="cpu")
    with tempfile.TemporaryDirectory(prefix="segnext-restore-") as folder:
        checkpoint.to_directory(folder)
        return load_checkpoint(folder, map_location="cpu")


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            if torch.is_tensor(value) and key != "step":
                per_param[key] = value.to(device)


class Validator:
    """Scores this worker's share of the val split at original size with the code `segnext
    eval` runs (`pipelines.validation`), then sums the confusion matrices over all workers."""

    def __init__(self, cfg: ExperimentConfig, meta: dict[str, Any], core: nn.Module, *,
                 device: torch.device, rank: int, world: int) -> None:
        from data.shards import load_manifest
        from pipelines.serving import Segmenter, settings_from_checkpoint

        self.cfg, self.rank, self.world, self.core = cfg, rank, world, core
        self.manifest = load_manifest(cfg.data.root)
        # The settings `segnext eval` derives from this run's checkpoints: same meta, same config.
        settings = settings_from_checkpoint({"meta": meta, "config": to_flat_dict(cfg)})
        self.segmenter = Segmenter(
            core, settings, class_names=meta["class_names"], palette=meta["palette"],
            ignore_index=meta["ignore_index"], device=device,
        )
        core.train()  # Segmenter puts its model in eval mode; training goes on
        self.device = device
        self.preview: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def run(self) -> tuple[np.ndarray, int]:
        """(summed (K, K) confusion matrix, samples skipped on all workers)."""
        from pipelines.validation import score_split

        k = self.segmenter.num_classes
        problem = ""
        matrix, skipped = np.zeros((k, k), dtype=np.int64), 0
        self._use_rank0_buffers()
        self.core.eval()
        try:
            scored, tally = score_split(
                self.segmenter, self.manifest, self.cfg.data.val_split, rank=self.rank,
                world=self.world, on_error=self.cfg.data.on_error,
                preview=PREVIEW_SAMPLES if self.rank == 0 else 0,
            )
            matrix, skipped, self.preview = scored.matrix, tally.count, scored.preview
        except (SampleReadError, ValueError, OSError) as error:  # bad data or settings
            problem = str(error)
        finally:
            self.core.train()
        # One collective whatever happened, so a rank that failed never leaves others waiting.
        totals = torch.from_numpy(np.append(matrix.ravel(), [skipped, bool(problem)]))
        totals = totals.to(self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        totals = totals.cpu().numpy()
        if totals[-1]:
            raise ValidationFailed(self._first_problem(problem))
        return totals[:-2].reshape(k, k), int(totals[-2])

    def _use_rank0_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before scoring.

        Parameters are equal on all ranks after a DDP step, but each rank's last forward
        updated its own running statistics (DDP re-broadcasts rank 0's only at the next
        forward), so without this each rank would score its share with a slightly different
        model than the checkpoint that rank 0 saves, and `segnext eval` of that checkpoint
        would not reproduce the validation score."""
        if self.world > 1:
            for buffer in self.core.buffers():
                dist.broadcast(buffer.data, src=0)

    def _first_problem(self, problem: str) -> str:
        """The first rank's message (every rank takes part in the gather)."""
        messages = [problem]
        if self.world > 1:
            messages = [None] * self.world
            dist.all_gather_object(messages, problem)
        return next(message for message in messages if message)


class ValidationFailed(Exception):
    """Validation cannot run (unreadable val data, impossible settings): a configuration
    problem that a restart would only repeat, so the run ends at once (see train_loop_per_worker)."""


class _Runner:
    """The iteration loop and its periodic duties (log, validate, checkpoint, stop)."""

    def __init__(self, cfg: ExperimentConfig, config: dict[str, Any], state: LoopState, *,
                 model, core, optimizer, scheduler, criterion, logger, device, rank, world):
        self.cfg, self.config, self.state = cfg, config, state
        self.model, self.core = model, core
        self.optimizer, self.scheduler, self.criterion = optimizer, scheduler, criterion
        self.logger, self.device, self.rank, self.world = logger, device, rank, world
        self.meta = config["meta"]
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.train.amp and device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.started = time.monotonic()
        self.validator = Validator(cfg, self.meta, core, device=device, rank=rank, world=world)
        self._reset_window()

    # ---------------------------------------------------------------- main loop

    def run(self) -> None:
        cfg, state = self.cfg, self.state
        images_per_epoch = self.config["train_samples"]
        batches = self._train_batches()
        try:
            while state.iteration < cfg.schedule.iterations:
                self._step(batches)
                state.iteration += 1
                state.epoch = state.iteration * cfg.train.global_batch_size // images_per_epoch
                self._maybe_inject_failure()
                last = state.iteration == cfg.schedule.iterations or self._out_of_time()
                if state.iteration % cfg.train.log_every == 0 or last:
                    self._log_training()
                checkpoint = state.iteration % cfg.train.checkpoint_every == 0 or last
                if checkpoint or state.iteration % cfg.train.val_every == 0:
                    self._validate_and_report(checkpoint=checkpoint)
                if last:
                    break
        finally:
            batches.close()

    def _train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches forever, restarting the stream after each pass over the shard."""
        shard = ray.train.get_dataset_shard("train")
        while True:
            count = 0
            for batch in iter_batches(shard, self.cfg.micro_batch_size, device=self.device,
                                      drop_last=True):
                count += 1
                yield batch
            if count == 0:
                raise RuntimeError(
                    f"the train split gives worker {self.rank} no full batch of "
                    f"{self.cfg.micro_batch_size}; use more samples or a smaller "
                    "train.global_batch_size / train.per_worker_batch_size"
                )

    def _step(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """One optimizer step over `grad_accumulation` micro-batches (DDP syncs on the last)."""
        accumulation = self.cfg.grad_accumulation
        step_start = time.perf_counter()
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            batch = next(batches)
            self.window["wait"] += time.perf_counter() - wait_start
            images, masks = batch["images"], batch["masks"]
            if self.cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = micro == accumulation - 1 or not hasattr(self.model, "no_sync")
            with self.model.no_sync() if not sync else contextlib.nullcontext():
                with self.autocast:
                    outputs = self.model(images)
                loss, parts = self.criterion(outputs, masks)
                (loss / accumulation).backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at iteration {self.state.iteration + 1} on rank "
                    f"{self.rank}: the run diverged; lower optim.lr or check the data"
                )
            self.window["loss"] += value / accumulation
            for name, part in parts.items():
                self.window["parts"][name] = (
                    self.window["parts"].get(name, 0.0) + float(part) / accumulation
                )
            self.window["images"] += images.shape[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.window["steps"] += 1
        self.window["step_time"] += time.perf_counter() - step_start

    # ---------------------------------------------------------------- duties

    def _reset_window(self) -> None:
        self.window = {"loss": 0.0, "parts": {}, "wait": 0.0, "images": 0, "steps": 0,
                       "step_time": 0.0, "start": time.perf_counter()}

    def _log_training(self) -> None:
        """Losses averaged over ranks and steps since the last log; throughput of the window."""
        w = self.window
        names = sorted(w["parts"])
        local = [w["loss"], *(w["parts"][n] for n in names), w["wait"], w["step_time"],
                 float(w["images"])]
        totals = self._all_reduce(local) / self.world  # means over ranks
        steps = max(w["steps"], 1)
        elapsed = max(time.perf_counter() - w["start"], 1e-9)
        wait, step_time, images = totals[-3:]
        metrics = {"train/loss": totals[0] / steps}
        metrics.update({f"train/{n}": totals[1 + i] / steps for i, n in enumerate(names)})
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
        metrics.update({
            "perf/images_per_s": images * self.world / elapsed,
            "perf/step_time_s": step_time / steps,
            "perf/data_wait_fraction": wait / elapsed,
            "epoch": float(self.state.epoch),
        })
        self.logger.metrics(metrics, step=self.state.iteration)
        if self.rank == 0:
            done = self.state.iteration - self.state.start_iteration
            left = self.cfg.schedule.iterations - self.state.iteration
            eta = (time.monotonic() - self.started) / max(done, 1) * left
            last_val = self.state.last_val.get("val/mIoU")
            print(
                f"[segnext] it {self.state.iteration}/{self.cfg.schedule.iterations} "
                f"epoch {self.state.epoch} loss {metrics['train/loss']:.4f} "
                f"lr {self.optimizer.param_groups[0]['lr']:.2e} "
                f"{metrics['perf/images_per_s']:.1f} img/s "
                f"data-wait {100 * metrics['perf/data_wait_fraction']:.0f}% "
                f"eta {_duration(eta)}"
                + ("" if last_val is None else f" val mIoU {last_val:.4f}"),
                flush=True,
            )
        self._reset_window()

    def _validate_and_report(self, *, checkpoint: bool) -> None:
        val_start = time.perf_counter()
        matrix, skipped = self.validator.run()
        result = segnext.ConfusionMatrix(self.meta["num_classes"], self.meta["ignore_index"])
        result.matrix = torch.from_numpy(matrix)
        summary = result.compute(class_names=self.meta["class_names"], top_confused=TOP_CONFUSED)
        metrics = {
            "val/mIoU": float(summary["mIoU"]),
            "val/aAcc": float(summary["aAcc"]),
            "val/mAcc": float(summary["mAcc"]),
            "val/skipped_samples": float(skipped),
        }
        self.state.last_val = dict(metrics)
        if self.rank == 0:
            self._log_validation(metrics, summary, matrix, self.validator.preview)
            print(
                f"[segnext] validation at it {self.state.iteration}: mIoU {metrics['val/mIoU']:.4f} "
                f"aAcc {metrics['val/aAcc']:.4f} ({time.perf_counter() - val_start:.1f}s)",
                flush=True,
            )
        report = {**metrics, "iteration": self.state.iteration, "epoch": self.state.epoch}
        self._report(report, checkpoint=checkpoint)
        self.window["start"] += time.perf_counter() - val_start  # keep throughput honest

    def _log_validation(self, metrics, summary, matrix, preview) -> None:
        step = self.state.iteration
        names = self.meta["class_names"]
        per_class = {
            f"val/IoU/{tracking.metric_name(name)}": float(iou)
            for name, iou in zip(names, summary["per_class_iou"], strict=True)
        }
        self.logger.metrics({**metrics, **per_class}, step=step)
        folder = f"validation/step_{step:07d}"
        self.logger.dict(
            {
                "iteration": step,
                **{key: summary[key] for key in ("mIoU", "aAcc", "mAcc")},
                "per_class_iou": dict(zip(names, summary["per_class_iou"], strict=True)),
                "confused_pairs": summary["confused_pairs"],
            },
            f"{folder}/metrics.json",
        )
        self.logger.figure(tracking.confusion_matrix_figure(matrix, names),
                           f"{folder}/confusion_matrix.png")
        self.logger.figure(tracking.per_class_iou_figure(summary["per_class_iou"], names),
                           f"{folder}/per_class_iou.png")
        if preview:
            images, masks, preds = zip(*preview, strict=True)
            self.logger.figure(
                tracking.prediction_grid_figure(
                    images, masks, preds, self.meta["palette"], self.meta["ignore_index"]
                ),
                f"{folder}/predictions.png",
            )

    def _report(self, metrics: dict[str, Any], *, checkpoint: bool) -> None:
        """`ray.train.report` on every rank (a barrier); rank 0 attaches the checkpoint."""
        name = f"checkpoint_{self.state.iteration:07d}"
        if not checkpoint:
            ray.train.report(metrics)
            return
        attached = None
        if self.rank == 0:
            # Uploaded in a background thread (training goes on), then deleted by Ray. Ray
            # registers a checkpoint (for restore, best-K, the result) only once its upload is
            # complete; a crash mid-upload leaves it unregistered, never half-registered.
            folder = tempfile.mkdtemp(prefix="segnext-ckpt-")
            save_checkpoint(folder, self._payload(metrics))
            attached = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=attached, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    def _payload(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": self.state.iteration,
            "epoch": self.state.epoch,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "config": to_flat_dict(self.cfg),
            "meta": self.meta,
        }

    def _out_of_time(self) -> bool:
        """Stop early once `train.time_budget_s` is spent (agreed by all ranks)."""
        budget = self.cfg.train.time_budget_s
        if budget is None:
            return False
        over = float(time.monotonic() - self.started > budget)
        return bool(self._all_reduce([over], op=dist.ReduceOp.MAX)[0] > 0)

    def _maybe_inject_failure(self) -> None:
        """Test hook: crash rank 0 once at `train.fail_at_iteration` (a marker file makes it once)."""
        if self.cfg.train.fail_at_iteration != self.state.iteration or self.rank != 0:
            return
        marker = Path(self.config["fault_marker"])
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failure injected at iteration {self.state.iteration}\n")
        raise RuntimeError(
            f"injected failure at iteration {self.state.iteration} (train.fail_at_iteration)"
        )

    def _all_reduce(self, values: list[float], op=None) -> np.ndarray:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.cpu().numpy()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
