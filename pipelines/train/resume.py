"""`--resume NAME` continues a run with the config it was started with, not today's.

A new run saves its config in its run folder (`SAVED_CONFIG`, written when the name is
claimed). A resume reads it back and compares it with the command line's (config file and
overrides): a value that differs is refused, naming each key with the saved and the given
value, unless the key is one a resumed run may change (`RESUMABLE`: its length, cadences,
fault handling, resources, where it registers). Those are applied, saved, and recorded on the
MLflow run (`pipelines.tracking.training.record_resume_changes`). So a default that changed
since the run started (e.g. `loss.class_balance` of a head) cannot change a resumed run:
keys whose null means "the default" are saved with the value the run used (`_pinned`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from data.storage import exists, join, read_text, write_text
from pipelines.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    set_dotted,
    to_dict,
    to_flat_dict,
    to_yaml,
)

SAVED_CONFIG = ".segnext-config.yaml"  # in the run folder, beside the name's claim

# Keys (or sections) a resume may change: none of them changes the loss, the model, the
# optimizer or the batches. schedule.iterations extends (or shortens) the run, the poly decay
# following the new length from the resumed iteration on. Worker counts are free because the
# micro-batch is saved (train.per_worker_batch_size): a count that cannot split a step is
# refused by the config's own check.
RESUMABLE = (
    "schedule.iterations",
    "train.log_every", "train.val_every", "train.checkpoint_every", "train.keep_best",
    "train.max_failures", "train.time_budget_s", "train.fail_at_iteration",
    "train.channels_last", "train.compile", "train.fused_msca",  # speed switches, same maths
    "eval.batch_size",
    "data.read_cpus", "data.cache_dir", "data.cache_bytes", "data.prestart_workers",
    "ray.num_workers", "ray.min_workers", "ray.cpus_per_worker", "ray.gpus_per_worker",
    "ray.resources_per_worker", "ray.address", "ray.resize_interval_s", "ray.start_timeout_s",
    "registry", "storage",
)
# Not compared: run.* is the run --resume names and where it is found; tune: is not read by
# `segnext train`.
NOT_COMPARED = ("run", "tune")
# Keys whose null means "the default": saved as the value the run used; null on the command
# line keeps the saved value.
PINNED = ("loss.class_balance", "train.per_worker_batch_size")


def save_config(cfg: ExperimentConfig, run_folder: str) -> None:
    """Save `cfg` (as given, before the manifest fills it in) as the run's config."""
    write_text(join(run_folder, SAVED_CONFIG), to_yaml(_pinned(cfg)))


def continue_config(
    given: ExperimentConfig, run_folder: str
) -> tuple[ExperimentConfig, dict[str, tuple[Any, Any]]]:
    """The config a resume of the run in `run_folder` trains with, and what it changes
    ({key: (saved, given)}); a ConfigError naming every key the command line may not change.

    A run saved before configs were saved (no `SAVED_CONFIG`) resumes with `given`, as it
    did then, which is saved from now on; the console says so."""
    path = join(run_folder, SAVED_CONFIG)
    if not exists(path, key="run.storage_path"):
        print(f"[segnext] run {given.run.name} has no saved config (it started before runs "
              "saved theirs): resuming with this command line's config, unchecked; it is "
              f"saved as the run's config now ({path})", flush=True)
        save_config(given, run_folder)
        return given, {}
    saved = config_from_dict(_yaml(read_text(path), path), source=path)
    old, new = to_flat_dict(saved), to_flat_dict(given)
    differing = {key: (old.get(key, "<unset>"), new.get(key, "<unset>"))
                 for key in sorted(old.keys() | new.keys())
                 if not _under(key, NOT_COMPARED) and old.get(key) != new.get(key)
                 and not (key in PINNED and new.get(key) is None)}
    refused = {key: values for key, values in differing.items() if not _under(key, RESUMABLE)}
    if refused:
        listed = "; ".join(f"{key}: saved {a!r}, given {b!r}" for key, (a, b) in refused.items())
        raise ConfigError(
            f"--resume {given.run.name}: the command line changes what the run was started "
            f"with ({path}): {listed}. Fix: give the saved values (or drop the overrides), or "
            "start a new run from its checkpoint (model.init_from=...). A resume may change "
            f"only {', '.join(RESUMABLE)}")
    changed = [prefix for prefix in RESUMABLE if any(_under(key, (prefix,)) for key in differing)]
    merged = _merge(saved, given, [*changed, *NOT_COMPARED])
    if differing:
        save_config(merged, run_folder)
    return merged, differing


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`schedule.iterations: 6 -> 8; ...`: the console's and the MLflow tag's text."""
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def _merge(saved: ExperimentConfig, given: ExperimentConfig, keys: list[str]) -> ExperimentConfig:
    """`saved` with the values of `keys` (fields or sections) taken from `given`."""
    raw, source = to_dict(saved), to_dict(given)
    for key in keys:
        node: Any = source
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        set_dotted(raw, key, node)
    return config_from_dict(raw, source="--resume")


def _pinned(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with the value each PINNED key has in this run."""
    return dataclasses.replace(
        cfg,
        loss=dataclasses.replace(
            cfg.loss, class_balance=cfg.loss.class_balance_for(cfg.model.classifier)),
        train=dataclasses.replace(cfg.train, per_worker_batch_size=cfg.micro_batch_size),
    )


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def _yaml(text: str, path: str) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a saved config (not a YAML mapping); restore it from "
                          "the run's MLflow artifact config.yaml, or delete it to resume unchecked")
    return raw
