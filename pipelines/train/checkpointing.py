"""What a training checkpoint holds and how a worker gets back to it.

A checkpoint is enough to continue the run exactly: weights, optimizer and schedule state, the
data position (epoch, samples of that epoch consumed, the plan's size and seed) and the RNG
scheme. No RNG state has to be carried: the batch plan, the augmentation and the forward
pass's random ops draw from generators seeded by position (`data.plan`), so the next step after
a restore is the step the uninterrupted run took.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray.train
import torch
from pyarrow import fs as pafs
from torch import nn

from data.plan import PLAN_VERSION, BatchPlan
from data.storage import join
from pipelines.checkpoint_io import (
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
)
from pipelines.train.checkpoint_staging import discard_folder, stage_folder

RNG_SCHEME = {
    "plan": f"data.plan v{PLAN_VERSION}: per-epoch permutation seeded by (seed, epoch)",
    "augmentation": "numpy generator per (seed, epoch, sample key)",
    "forward": "torch seeded per micro-batch by data.plan.micro_seed(iteration, micro)",
}


@dataclass
class Restored:
    iteration: int
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # why the continuation may not be exact


class Checkpointer:
    """Saves (rank 0) and restores (every rank) the training state through Ray Train."""

    def __init__(self, core: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 plan: BatchPlan, config: dict[str, Any], meta: dict[str, Any], rank: int) -> None:
        self.core, self.optimizer, self.scheduler = core, optimizer, scheduler
        self.plan, self.config, self.meta, self.rank = plan, config, meta, rank

    def payload(self, iteration: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": iteration,
            "epoch": self.plan.position(iteration).epoch,
            "data_position": self.plan.position(iteration).to_dict(),
            "rng": dict(RNG_SCHEME),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "config": self.config,
            "meta": self.meta,
        }

    def report(self, iteration: int, metrics: dict[str, Any], *, checkpoint: bool) -> None:
        """`ray.train.report` on every rank (a barrier); rank 0 attaches the checkpoint.

        Uploaded in a background thread (training goes on), then deleted by Ray. Ray registers
        a checkpoint (for restore, best-K, the result) only once its upload is complete; a crash
        mid-upload leaves it unregistered, never half-registered."""
        if not checkpoint:
            ray.train.report(metrics)
            return
        folder = stage_folder() if self.rank == 0 else None
        try:
            attached = None
            if folder is not None:
                save_checkpoint(folder, self.payload(iteration, metrics))
                attached = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=attached,
                             checkpoint_dir_name=f"checkpoint_{iteration:07d}",
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        except BaseException:
            # Ray raises before it hands the folder to its upload thread (its last step), so
            # nothing reads the folder: remove it. Once handed over, Ray deletes it after the
            # upload, so it must not be removed here when report returns.
            if folder is not None:
                discard_folder(folder)
            raise

    def restore(self) -> Restored | None:
        """Load the latest checkpoint (a restart after a failure or a resize, or --resume):
        Ray's registered one, or a newer one on storage that loads (a stop can come after an
        upload completed and before Ray recorded it: that checkpoint is not lost)."""
        checkpoint = ray.train.get_checkpoint()
        payload = self._newer_on_storage(_iteration_of(checkpoint.path) if checkpoint else -1)
        if payload is None and checkpoint is None:
            return None
        if payload is None:
            payload = read_checkpoint(checkpoint)
        self.core.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        restored = Restored(iteration=int(payload["iteration"]),
                            metrics=dict(payload.get("metrics", {})))
        restored.warnings = self._position_warnings(payload.get("data_position"), restored.iteration)
        return restored

    def _newer_on_storage(self, registered: int) -> dict[str, Any] | None:
        """The payload of the newest checkpoint in the run folder past iteration `registered`
        that loads completely (a copy cut short is passed over, with a warning)."""
        folder = join(self.config["run.storage_path"], self.config["run.name"])  # flat keys
        for file in reversed(checkpoint_files(folder)):
            if _iteration_of(file.rsplit("/", 2)[-2]) <= registered:
                return None
            try:
                return load_checkpoint(file, map_location="cpu")
            except CheckpointError as error:
                warnings.warn(f"passing over an incomplete checkpoint: {error}", stacklevel=2)
        return None

    def _position_warnings(self, saved: dict | None, iteration: int) -> list[str]:
        if saved is None:
            return ["the checkpoint predates data positions: the data order after it differs "
                    "from an uninterrupted run"]
        now = self.plan.position(iteration).to_dict()
        changed = [f"{key} {saved.get(key)} -> {now[key]}" for key in
                   ("num_samples", "global_batch_size", "seed", "version") if saved.get(key) != now[key]]
        if not changed:
            return []
        return ["the data plan changed since the checkpoint (" + ", ".join(changed) + "): "
                "training continues at the same iteration, but not with the batches the "
                "interrupted run would have seen"]


def _iteration_of(path: str) -> int:
    """The iteration in a checkpoint folder name (`.../checkpoint_0000020`), -1 if none."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("checkpoint_")
    return int(digits) if digits.isdigit() else -1


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The payload of a Ray checkpoint, local or in object storage.

    A remote checkpoint is downloaded into a folder of this worker's own: with
    `as_directory()` the workers of one node share one temporary download folder, and a rank
    could read `checkpoint.pt` while another was still writing it (seen on S3: "truncated")."""

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        with checkpoint.as_directory() as folder:
            return load_checkpoint(folder, map_location="cpu")
    with tempfile.TemporaryDirectory(prefix="segnext-restore-") as folder:
        checkpoint.to_directory(folder)
        return load_checkpoint(folder, map_location="cpu")
