"""`resolve(cfg) -> ResolvedRun`: the one place where the driver turns a user's config into a run.

Everything a run needs that depends on the outside world is settled here, once, before Ray
starts: absolute paths and URIs, the storage endpoint (exported to this process and recorded
for the workers), the run's name and folder, the shards' manifest and the training/validation
splits in it, the class frequencies, the indexed training samples and their batch plan, the
initial weights (`model.pretrained`, `model.init_from` with registered models fetched), a dry
build of the model and the checkpoint meta. Every problem is a `ConfigError` naming the key and
the fix. `segnext train`, every `segnext tune` trial and the benchmarks consume the result;
nothing downstream re-reads the manifest or re-absolutises a path.

A Tune trial changes a few keys of the search's base run: `ResolvedRun.with_overrides` re-derives
only what those keys touch (the model and meta always; the training stream only when a data or
batch key changed), so trials share the manifest and the sample index.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data.manifest import Manifest, load_manifest
from data.sample_index import checked_shards
from data.samples import SampleReadError
from data.shard_cache import ShardCache
from data.storage import configure_endpoint, exists, is_remote, join, preflight, write_text
from data.stream import TrainStream, build_train_stream
from data.transforms import MEAN, STD
from pipelines.checkpoint_io import build_meta
from pipelines.config import ConfigError, ExperimentConfig, to_flat_dict, with_overrides
from pipelines.meta import EvalMeta, ModelMeta
from pipelines.tracking.training import existing_run_id
from pipelines.train import initial_weights, resume
from pipelines.train.loop import build_model

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CLAIM_FILE = ".segnext-run.json"  # who claimed a run name (host, pid, time)


@dataclass(frozen=True)
class ResolvedRun:
    """A config with everything resolved: what `run_training` and the workers read."""

    cfg: ExperimentConfig  # absolute paths, num_classes, class_frequencies, init_from resolved
    manifest: Manifest
    meta: ModelMeta  # checkpoint meta (classes, palette, normalisation, model, eval settings)
    num_params: int
    stream: TrainStream  # the indexed training samples and their batch plan
    storage_env: dict[str, str]  # the storage endpoint's variables, for the Ray workers
    # --resume: the keys changed from the run's saved config, {key: (saved, given)}
    resume_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.cfg.run.name

    @property
    def storage_path(self) -> str:
        return self.cfg.run.storage_path

    @property
    def run_uri(self) -> str:
        """The run's folder under `run.storage_path` (where Ray Train writes its checkpoints)."""
        return join(self.storage_path, self.run_name)

    @property
    def train_samples(self) -> int:
        return len(self.stream.index)

    def with_overrides(self, values: dict[str, Any], *, run_name: str) -> ResolvedRun:
        """This run with `values` (dotted keys, e.g. a Tune trial's) applied under `run_name`.

        The manifest, storage and initial weights stay; the training stream is re-planned only
        when a key it depends on changed (re-indexing the shards is the expensive part).
        """
        cfg = with_overrides(self.cfg, values)
        cfg = replace(cfg, run=replace(cfg.run, name=run_name))
        stream = self.stream
        if _stream_key(cfg) != _stream_key(self.cfg):  # one shard cache for all the variants
            stream = replace(_train_stream(cfg), cache=self.stream.cache)
        return _derive(cfg, self.manifest, stream, self.storage_env)


def resolve(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    exists_already: bool | None = None,
    default_name: str = "run",
) -> ResolvedRun:
    """Resolve `cfg` for a run named `run_name` (else `run.name`, else `default_name-<time>`).

    `storage_path` overrides `run.storage_path`. `exists_already`: True for `--resume` (the
    run's folder must exist), False for a new run (it must not), None to continue a run of that
    name if there is one (Tune restarting a trial, benchmarks).
    """
    storage = _absolute(storage_path or cfg.run.storage_path)
    name = run_name or cfg.run.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = replace(cfg, run=replace(cfg.run, name=name, storage_path=storage),
                  data=replace(cfg.data, root=_absolute(cfg.data.root)))
    storage_env = configure_endpoint(cfg.storage.endpoint)
    check_run_name(name)
    _check_run_folder(cfg, exists_already)
    changes: dict[str, tuple[Any, Any]] = {}
    if exists_already:  # --resume: the run's saved config, with the changes it allows
        cfg, changes = resume.continue_config(cfg, join(storage, name))
    given = cfg  # what a new run saves: the config before the manifest fills it in
    root = cfg.data.root
    preflight(root, storage)  # endpoint, bucket, credentials: before any worker starts
    manifest = _read_manifest(root)
    _check_splits(cfg, manifest)
    _check_shards_present(manifest, [cfg.data.val_split], cfg.data.on_error)
    num_classes = len(manifest.classes)
    top_k = cfg.model.classifier_kwargs.get("top_k")  # >= 1 is checked at load
    if top_k is not None and top_k > num_classes:
        raise ConfigError(f"model.classifier_kwargs.top_k = {top_k!r} must be a whole number "
                          f"in 1..{num_classes} (the classes of {root})")
    cfg = replace(
        cfg,
        loss=replace(cfg.loss, class_frequencies=_class_frequencies(cfg, manifest)),
        model=replace(cfg.model, num_classes=num_classes, pretrained=_pretrained(cfg)),
    )
    if cfg.model.init_from:
        source = initial_weights.resolve_source(
            cfg.model.init_from, tracking_uri=cfg.mlflow.tracking_uri, storage_path=storage
        )
        cfg = replace(cfg, model=replace(cfg.model, init_from=source))
    run = _derive(cfg, manifest, _train_stream(cfg), storage_env)
    if exists_already is False:  # last: a run refused above leaves its name free
        _claim_run_name(cfg)
        resume.save_config(given, run.run_uri)
    return replace(run, resume_changes=changes)


# ---------------------------------------------------------------------------------- pieces


def _derive(
    cfg: ExperimentConfig, manifest: Manifest, stream: TrainStream, storage_env: dict[str, str]
) -> ResolvedRun:
    """The dry-built model and the meta for a resolved `cfg` (wrong model options stop here)."""
    try:
        model = build_model(cfg, len(manifest.classes))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model options rejected by create_model: {error}") from error
    if cfg.model.init_from:
        initial_weights.check_source(cfg.model.init_from, cfg.model.init_part, model)
    meta = build_meta(
        variant=model.variant,
        num_classes=len(manifest.classes),
        classifier=cfg.model.classifier,
        classifier_kwargs=cfg.model.classifier_options(),
        nmf=cfg.model.nmf,
        class_names=list(manifest.classes),
        palette=[list(color) for color in manifest.palette],
        ignore_index=manifest.ignore_index,
        mean=list(MEAN),
        std=list(STD),
        crop_size=cfg.data.crop_size,
        eval=EvalMeta.from_flat_config(to_flat_dict(cfg)),
    )
    num_params = sum(p.numel() for p in model.parameters())
    return ResolvedRun(cfg, manifest, meta, num_params, stream, storage_env)


def check_run_name(name: str) -> None:
    """A run name is one folder under run.storage_path: no separators, no `..`, no hidden name."""
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"run.name {name!r} must be one folder name under run.storage_path (letters, "
            "digits, '.', '_', '-'; starting with a letter or digit; no '/' or '..')"
        )


def _check_run_folder(cfg: ExperimentConfig, exists_already: bool | None) -> None:
    """`--resume NAME`: its folder must exist; a new run: it must not."""
    if exists_already is None:
        return
    folder = join(cfg.run.storage_path, cfg.run.name)
    found = exists(folder, key="run.storage_path")
    if exists_already and not found:
        raise ConfigError(
            f"--resume {cfg.run.name}: no run folder {folder}; pass a run name that exists "
            f"under run.storage_path ({cfg.run.storage_path})"
        )
    if found and not exists_already:
        raise ConfigError(
            f"run {cfg.run.name} already exists in {cfg.run.storage_path}; continue it with "
            f"--resume {cfg.run.name} or choose another run.name"
        )


def _claim_run_name(cfg: ExperimentConfig) -> None:
    """A new run's name must be free of an MLflow run too, and is claimed by creating the run
    folder: atomic on a local or shared filesystem (of two racing runs, one starts, the other
    stops here, naming the first); on object storage the claim is a marker object, written
    right after the check (not atomic: S3 has no create-if-absent through pyarrow)."""
    folder = join(cfg.run.storage_path, cfg.run.name)
    mlflow_run = existing_run_id(cfg)
    if mlflow_run is not None:
        raise ConfigError(
            f"run {cfg.run.name} already has MLflow run {mlflow_run} in experiment "
            f"{cfg.mlflow.experiment!r} (its folder is not in {cfg.run.storage_path}); "
            f"choose another run.name, or --resume it from where its folder is")
    claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if is_remote(folder):
        write_text(join(folder, CLAIM_FILE), claim)
        return
    Path(cfg.run.storage_path).mkdir(parents=True, exist_ok=True)
    try:
        Path(folder).mkdir()
    except FileExistsError:
        holder = Path(folder, CLAIM_FILE)
        owner = holder.read_text() if holder.is_file() else "another process"
        raise ConfigError(f"run {cfg.run.name} already exists in {cfg.run.storage_path}: "
                          f"another run claimed the name just now ({owner}); choose another "
                          "run.name") from None
    Path(folder, CLAIM_FILE).write_text(claim)


def release_unused_claim(run: ResolvedRun) -> None:
    """Give the run's name back when the run never wrote anything (Ray refused to start, say):
    its local folder holds the claim and the saved config only. Anything else: it stays."""
    folder = Path(run.storage_path, run.run_name)
    if is_remote(run.storage_path) or not folder.is_dir():
        return
    entries = list(folder.iterdir())
    if {entry.name for entry in entries} <= {CLAIM_FILE, resume.SAVED_CONFIG}:
        for entry in entries:
            entry.unlink()
        folder.rmdir()


def _read_manifest(root: str) -> Manifest:
    if not is_remote(root) and not Path(root).is_dir():
        raise ConfigError(
            f"data.root {root} does not exist; write shards there first (segnext shards ...) "
            "or point data.root at an existing shards folder"
        )
    try:
        return load_manifest(root)
    except Exception as error:  # the reader's own message names the file
        raise ConfigError(f"data.root {root}: cannot read the shards' manifest: {error}") from error


def _check_splits(cfg: ExperimentConfig, manifest: Manifest) -> None:
    num_classes = len(manifest.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes = {cfg.model.num_classes} but {cfg.data.root} has {num_classes} "
            "classes; remove model.num_classes to take it from the manifest"
        )
    for key, splits in (("train_split", cfg.data.train_splits), ("val_split", [cfg.data.val_split])):
        if any(split not in manifest.splits for split in splits):
            raise ConfigError(
                f"data.{key} = {getattr(cfg.data, key)!r} is not in {cfg.data.root} "
                f"(splits: {sorted(manifest.splits)})"
            )


def _check_shards_present(manifest: Manifest, splits: list[str], on_error: str) -> None:
    """Every shard the run will read exists with its manifest size (a stat each, local or
    object store): a missing shard stops the run here, not in a read task hours later. Under
    `data.on_error: skip` the run may start with shards missing; they are counted then."""
    try:
        checked_shards(manifest, splits, record=(lambda entries: None) if on_error == "skip" else None)
    except SampleReadError as error:
        raise ConfigError(str(error)) from error


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


def _pretrained(cfg: ExperimentConfig) -> str | None:
    """`model.pretrained` as an absolute path (official weights are read by every worker)."""
    pretrained = cfg.model.pretrained
    if pretrained and not is_remote(pretrained):
        pretrained = _absolute(pretrained)
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained {pretrained} does not exist; fix the path")
    return pretrained


def _stream_key(cfg: ExperimentConfig) -> tuple:
    """The settings the training stream depends on (a trial that changes none reuses it)."""
    d, t = cfg.data, cfg.train
    return (d.root, tuple(d.train_splits), tuple(d.crop_size), d.scale and tuple(d.scale),
            tuple(d.ratio_range), d.cat_max_ratio, d.on_error, d.read_cpus, t.seed,
            t.global_batch_size, cfg.micro_batch_size, cfg.ray.num_workers, cfg.ray.min_workers)


def _train_stream(cfg: ExperimentConfig) -> TrainStream:
    """Index the training samples (the splits' index files and a stat per shard) and plan the
    global batches; refuse worker counts that cannot share a step evenly."""
    cache = _shard_cache(cfg)
    try:
        stream = build_train_stream(
            cfg.data.root, cfg.data.train_splits, crop_size=tuple(cfg.data.crop_size),
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            scale=tuple(cfg.data.scale) if cfg.data.scale else None,
            ratio_range=tuple(cfg.data.ratio_range), cat_max_ratio=cfg.data.cat_max_ratio,
            seed=cfg.train.seed, on_error=cfg.data.on_error, read_cpus=cfg.data.read_cpus,
            cache=cache,
        )
    except SampleReadError as error:
        raise ConfigError(str(error)) from error
    except ValueError as error:  # the plan: too few samples for one global batch
        raise ConfigError(
            f"data.train_split {cfg.data.train_split!r}: {error}; lower "
            "train.global_batch_size or add samples"
        ) from error
    largest = int(stream.index.shard_bytes.max())
    if cache is not None and largest > cache.capacity:
        raise ConfigError(
            f"data.cache_bytes = {cache.capacity} cannot hold one shard of {cfg.data.root} "
            f"({largest} bytes). Fix: raise it above the largest shard (best: the training "
            f"split, {int(stream.index.shard_bytes.sum())} bytes), or 0 to read samples in place")
    for world in worker_counts(cfg):
        try:
            stream.plan.accumulation(world)
        except ValueError as error:
            raise ConfigError(
                f"ray.num_workers / ray.min_workers: {error} (train.global_batch_size "
                f"{cfg.train.global_batch_size}, micro-batch {cfg.micro_batch_size})"
            ) from error
    return stream


def _shard_cache(cfg: ExperimentConfig) -> ShardCache | None:
    """The run's node-local shard cache: for remote roots only (local shards are read in place,
    the page cache serves them), one folder per run name."""
    if not is_remote(cfg.data.root) or cfg.data.cache_bytes == 0:
        return None
    base = cfg.data.cache_dir or os.path.join(tempfile.gettempdir(), "segnext-shard-cache")
    return ShardCache(os.path.join(os.path.expanduser(base), cfg.run.name), cfg.data.cache_bytes)


def worker_counts(cfg: ExperimentConfig) -> range:
    """Every worker count the run may have: one, or min..max for an elastic run."""
    low = cfg.ray.num_workers if cfg.ray.min_workers is None else cfg.ray.min_workers
    return range(low, cfg.ray.num_workers + 1)


def _absolute(path: str) -> str:
    return path if is_remote(path) else str(Path(path).expanduser().resolve())
