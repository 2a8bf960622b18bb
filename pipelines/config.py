"""Experiment configuration: the typed sections (`pipelines.config_schema`, re-exported here)
loaded from YAML plus dotted `key=value` overrides, checked, and written back.

Every check that can fail happens here, in the driver, before Ray starts a single worker: an
unknown key, a value of the wrong type or out of range, a batch size that does not split over
the workers. Errors are `ConfigError`s that name the key, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.arg_types import REGISTRY_NAME_RULE, is_registry_name
from pipelines.config_schema import (  # the schema; re-exported: import it from here
    DEFAULT_CLASS_BALANCE,
    DEFAULT_DECISION,
    DISTRIBUTIONS,
    DOTTED_KEY_MAPPINGS,
    OTHER_NAMES,
    REMOVED_KEYS,
    UNSEARCHABLE_SECTIONS,
    AshaConfig,
    ConfigError,
    DataConfig,
    Dimension,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    RegistryConfig,
    RunSection,
    ScheduleConfig,
    StorageConfig,
    TrainConfig,
    TuneConfig,
    WarmStartConfig,
)

__all__ = [
    "ConfigError",
    "REMOVED_KEYS",
    "OTHER_NAMES",
    "DOTTED_KEY_MAPPINGS",
    "UNSEARCHABLE_SECTIONS",
    "DISTRIBUTIONS",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "DEFAULT_CLASS_BALANCE",
    "DEFAULT_DECISION",
    "LossConfig",
    "TrainConfig",
    "EvalConfig",
    "RayConfig",
    "MlflowConfig",
    "RegistryConfig",
    "RunSection",
    "StorageConfig",
    "Dimension",
    "AshaConfig",
    "WarmStartConfig",
    "TuneConfig",
    "ExperimentConfig",
]


# ---------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply `section.key=value` overrides, and validate the result."""
    raw = read_yaml_mapping(path)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return config_from_dict(raw, source=str(path))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=1e-3` -> ("optim.lr", 0.001); the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from error
    return key.strip(), value


def with_overrides(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `cfg` with dotted keys replaced (used by search spaces)."""
    raw = to_dict(cfg)
    for key, value in values.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, source="overrides")


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> ExperimentConfig:
    """Build and validate an `ExperimentConfig` from nested plain data."""
    cfg = _build(ExperimentConfig, raw, prefix="", source=source)
    _validate(cfg, source)
    return cfg


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`raw[a][b][c] = value` for key `a.b.c`; under a DOTTED_KEY_MAPPINGS mapping the rest of
    the key is one entry (`tune.space.optim.lr` -> `raw["tune"]["space"]["optim.lr"]`)."""
    mapping = next((m for m in DOTTED_KEY_MAPPINGS if key.startswith(f"{m}.")), None)
    parts = key.split(".") if mapping is None else [*mapping.split("."), key[len(mapping) + 1 :]]
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, *, prefix: str, source: str) -> Any:
    """Instantiate dataclass `cls` from `raw`, rejecting unknown keys and mistyped values."""
    if raw is None:
        raw = {}
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand is not None and isinstance(raw, str):
        raw = {_yaml_key(_field(cls, shorthand)): raw}
    if not isinstance(raw, dict):
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{source}: {section} must be a mapping, not {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f): f.name for f in dataclasses.fields(cls)}
    names = list(fields)
    unknown = [key for key in raw if key not in names]
    if unknown:
        key = unknown[0]
        known = {**REMOVED_KEYS, **OTHER_NAMES}.get(f"{prefix}{key}")
        if known:
            raise ConfigError(f"{source}: {prefix}{key} {known}")
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(names)}"
        raise ConfigError(f"{source}: unknown config key {prefix}{key}; {hint}")
    values = {}
    defaults = cls()
    for key, name in fields.items():
        if key not in raw:
            continue
        hint, optional = _section_type(hints[name])
        if hint is not None:
            if optional and raw[key] is None:
                values[name] = None  # an optional section left empty: absent
            else:
                values[name] = _build(hint, raw[key], prefix=f"{prefix}{key}.", source=source)
            continue
        value = _coerce(raw[key], hints[name], f"{prefix}{key}", source)
        default = getattr(defaults, name)
        if isinstance(default, dict) and isinstance(value, dict):
            value = {**default, **value}  # `loss.weights.variance=0.5` keeps the other weights
        values[name] = value
    return cls(**values)


def _section_type(hint: Any) -> tuple[type | None, bool]:
    """(the dataclass of a section field, whether it may be None), or (None, False)."""
    if dataclasses.is_dataclass(hint):
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0], True
    return None, False


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _yaml_key(f: dataclasses.Field) -> str:
    """The key of a field in YAML (`from` cannot be a Python name)."""
    return f.metadata.get("key", f.name)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against the type hint, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: {key} = {value!r} is not allowed; choose one of "
                + ", ".join(repr(a) for a in args)
            )
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _type_error(value, hint, key, source)
        return [_coerce(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, hint, key, source)
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if hint is Any:
        return value
    if isinstance(hint, type) and hasattr(hint, "from_config"):  # e.g. a Dimension
        return hint.from_config(value, key, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(value, hint, key, source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, hint, key, source)
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `6e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise _type_error(value, hint, key, source) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(value, hint, key, source)
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key} = {value} is not a finite number; set a real value")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(value, hint, key, source)
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint}")


def _type_error(value: Any, hint: Any, key: str, source: str) -> ConfigError:
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return ConfigError(
        f"{source}: {key} = {value!r} has type {type(value).__name__}, expected {name}; "
        f"fix it in the YAML or override it as {key}=<{name}>"
    )


def _validate(cfg: ExperimentConfig, source: str) -> None:
    """Value checks that types alone cannot express."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} {message}")

    require(bool(cfg.data.root), "data.root", "is empty; set it to a shards folder or URI")
    require(len(cfg.data.crop_size) == 2, "data.crop_size", "must be [height, width]")
    require(min(cfg.data.crop_size) > 0, "data.crop_size", "must be positive")
    require(
        cfg.data.scale is None or (len(cfg.data.scale) == 2 and min(cfg.data.scale) > 0),
        "data.scale", "must be [long, short], both > 0 (or null: no base scale)"
    )
    require(bool(cfg.data.val_split), "data.val_split", "is empty; name the split to validate on")
    splits = cfg.data.train_splits
    require(bool(splits) and all(splits), "data.train_split", "must name at least one split")
    require(len(set(splits)) == len(splits), "data.train_split", f"= {splits} repeats a split")
    require(
        len(cfg.data.ratio_range) == 2 and 0 < cfg.data.ratio_range[0] <= cfg.data.ratio_range[1],
        "data.ratio_range",
        "must be [low, high] with 0 < low <= high",
    )
    require(cfg.data.read_cpus > 0, "data.read_cpus", "must be > 0 (Ray rejects 0-CPU reads)")
    require(isinstance(cfg.data.cache_bytes, int) and cfg.data.cache_bytes >= 0,
            "data.cache_bytes", "must be a whole number of bytes >= 0 (0: no shard cache)")
    require(cfg.model.num_classes is None or cfg.model.num_classes > 1, "model.num_classes",
            "must be > 1, or null to take it from the shards' manifest")
    top_k = cfg.model.classifier_kwargs.get("top_k")
    require(top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool)
                              and top_k >= 1),
            "model.classifier_kwargs.top_k", f"= {top_k!r} must be a whole number >= 1")
    decision = cfg.model.classifier_kwargs.get("decision")
    if decision is not None:
        from segnext.classifier import DECISIONS  # imports torch: only where a rule is given

        require(cfg.model.classifier == "integrated" and decision in DECISIONS,
                "model.classifier_kwargs.decision",
                f"= {decision!r} must be one of {', '.join(DECISIONS)}, with model.classifier="
                f"integrated (unset: {DEFAULT_DECISION['integrated']}, the rule the CamVid "
                "study chose)")
    require(
        cfg.model.drop_path_rate is None or 0 <= cfg.model.drop_path_rate < 1,
        "model.drop_path_rate",
        "must be in [0, 1)",
    )
    require(
        not (cfg.model.init_from and cfg.model.pretrained),
        "model.init_from",
        "and model.pretrained both set the initial weights; keep one",
    )
    require(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    require(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
            "optim.betas", "must be [beta1, beta2], each in [0, 1) (AdamW's are 0.9, 0.999)")
    require(cfg.optim.decoder_lr_mult > 0, "optim.decoder_lr_mult", "must be > 0")
    require(cfg.schedule.iterations > 0, "schedule.iterations", "must be > 0")
    require(
        0 <= cfg.schedule.warmup_iters < cfg.schedule.iterations,
        "schedule.warmup_iters",
        "must be in [0, schedule.iterations)",
    )
    require(0 < cfg.schedule.warmup_ratio <= 1, "schedule.warmup_ratio", "must be in (0, 1]")
    require(cfg.schedule.power > 0, "schedule.power", "must be > 0 (1.0: the official poly)")
    require(0 < cfg.data.cat_max_ratio <= 1, "data.cat_max_ratio",
            "must be in (0, 1] (1: no limit on one class's share of a crop)")
    unknown_weights = set(cfg.loss.weights) - {"general", "refine", "variance"}
    require(not unknown_weights, "loss.weights", "keys must be general, refine, variance")
    for name, weight in cfg.loss.weights.items():
        require(weight >= 0, f"loss.weights.{name}", f"= {weight} must be >= 0 (0: term off)")
    require(cfg.loss.variance_top_k >= 2, "loss.variance_top_k", "must be >= 2")
    require(cfg.loss.warmup_iters >= 0, "loss.warmup_iters", "must be >= 0 (0: no warm-up)")
    require(
        cfg.loss.class_balance is None or 0 <= cfg.loss.class_balance <= 1,
        "loss.class_balance",
        "must be in [0, 1] (0: unweighted) or unset (the head's default)",
    )
    require(
        cfg.loss.class_frequencies is None
        or all(0 <= f <= 1 for f in cfg.loss.class_frequencies),
        "loss.class_frequencies",
        "must list each class's pixel share in [0, 1] (or be unset: read from the manifest)",
    )
    for key in ("log_every", "val_every", "checkpoint_every", "keep_best", "global_batch_size"):
        require(getattr(cfg.train, key) > 0, f"train.{key}", "must be > 0")
    require(cfg.train.per_worker_batch_size is None or cfg.train.per_worker_batch_size > 0,
            "train.per_worker_batch_size",
            "must be > 0, or null for train.global_batch_size / ray.num_workers")
    require(cfg.train.seed >= 0, "train.seed", "must be >= 0 (numpy seeds are unsigned)")
    require(cfg.train.max_failures >= -1, "train.max_failures", "must be >= -1 (-1: forever)")
    require(cfg.train.time_budget_s is None or cfg.train.time_budget_s > 0,
            "train.time_budget_s", "must be > 0 seconds, or null for no limit")
    require(cfg.train.fail_at_iteration is None or cfg.train.fail_at_iteration > 0,
            "train.fail_at_iteration", "must be an iteration > 0, or null (the test hook off)")
    require(cfg.ray.num_workers > 0, "ray.num_workers", "must be > 0")
    require(cfg.ray.min_workers is None or 0 < cfg.ray.min_workers <= cfg.ray.num_workers,
            "ray.min_workers", f"must be between 1 and ray.num_workers ({cfg.ray.num_workers})")
    require(cfg.ray.resize_interval_s >= 0, "ray.resize_interval_s", "must be >= 0")
    require(cfg.ray.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
    require(cfg.ray.start_timeout_s > 0, "ray.start_timeout_s",
            "must be > 0 seconds (how long a run waits for its workers' resources)")
    for name, amount in cfg.ray.resources_per_worker.items():
        require(name != "CPU", "ray.resources_per_worker.CPU", "is ray.cpus_per_worker; set that")
        require(amount > 0, f"ray.resources_per_worker.{name}", f"= {amount:g} must be > 0")
    gpus = cfg.ray.gpus_per_worker
    if gpus is not None:
        require(cfg.ray.use_gpu, "ray.gpus_per_worker", "needs ray.use_gpu=true")
        require(
            gpus > 0 and (gpus <= 1 or float(gpus).is_integer()),
            "ray.gpus_per_worker",
            f"= {gpus} must be a fraction in (0, 1] or a whole number (Ray splits one card only)",
        )
        require(
            "GPU" not in cfg.ray.resources_per_worker,
            "ray.gpus_per_worker",
            "and ray.resources_per_worker.GPU both set the GPUs; keep ray.gpus_per_worker",
        )
        require(
            gpus >= 1 or cfg.ray.num_workers == 1,
            "ray.gpus_per_worker",
            f"= {gpus} with ray.num_workers = {cfg.ray.num_workers}: two ranks of one run could "
            "share a card, which NCCL refuses; use ray.num_workers=1 with a GPU fraction",
        )
    per_step = cfg.ray.num_workers * cfg.micro_batch_size
    require(
        cfg.micro_batch_size > 0 and cfg.train.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"= {cfg.train.global_batch_size} must be a multiple of ray.num_workers "
        f"({cfg.ray.num_workers}) x per-worker batch ({cfg.micro_batch_size}); "
        "change train.global_batch_size or train.per_worker_batch_size",
    )
    for key in ("crop", "stride"):
        window = getattr(cfg.eval, key)
        require(window is None or (len(window) == 2 and min(window) > 0), f"eval.{key}",
                "must be [height, width], both > 0 (or null)")
    if cfg.eval.mode == "slide":
        require(
            cfg.eval.crop is not None and cfg.eval.stride is not None,
            "eval.crop",
            "and eval.stride must be set for eval.mode=slide",
        )
    require(cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    require(bool(cfg.run.storage_path), "run.storage_path", "must not be empty")
    require(bool(cfg.mlflow.experiment.strip()), "mlflow.experiment", "is empty; name one")
    require(not cfg.registry.register or is_registry_name(cfg.registry.name), "registry.name",
            f"= {cfg.registry.name!r} is not a model registry name ({REGISTRY_NAME_RULE})")
    require(
        cfg.storage.endpoint is None or cfg.storage.endpoint.startswith(("http://", "https://")),
        "storage.endpoint",
        f"= {cfg.storage.endpoint!r} must be a URL such as http://127.0.0.1:9000",
    )
    if cfg.tune is not None:
        _validate_tune(cfg, cfg.tune, source, require)


def _validate_tune(cfg: ExperimentConfig, tune: TuneConfig, source: str, require) -> None:
    """The search settings, and every config a trial can get: each searched value and the
    warm start are applied to the config (without its tune section) and validated."""
    require(tune.trials >= 1, "tune.trials", f"= {tune.trials} must be a positive integer")
    require(tune.seed >= 0, "tune.seed", "must be >= 0")
    require(
        tune.max_concurrent is None or tune.max_concurrent >= 1,
        "tune.max_concurrent",
        f"= {tune.max_concurrent} must be >= 1, or null for what the cluster fits",
    )
    require(tune.asha.grace_period >= 1, "tune.asha.grace_period", "must be >= 1 (validations)")
    require(tune.asha.reduction_factor > 1, "tune.asha.reduction_factor", "must be a number > 1")
    require(
        tune.capacity is None or all(value > 0 for value in tune.capacity.values()),
        "tune.capacity",
        f"= {tune.capacity} must map resource names to positive numbers, e.g. {{GPU: 8, CPU: 64}}",
    )
    require(
        tune.classes is None or (bool(tune.classes) and all(tune.classes)),
        "tune.classes",
        "must name at least one class, e.g. [car, truck], or be removed",
    )
    require(
        bool(tune.space),
        "tune.space",
        "is empty; map dotted config keys to distributions, e.g. "
        "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}",
    )
    require(
        tune.search != "optuna" or all(dim.kind != "grid" for dim in tune.space.values()),
        "tune.search",
        "= optuna cannot take grid dimensions; use choice, or tune.search=random",
    )
    base = dataclasses.replace(cfg, tune=None)
    for key, dim in tune.space.items():
        section = key.split(".", 1)[0]
        require(
            section not in UNSEARCHABLE_SECTIONS,
            f"tune.space.{key}",
            f"cannot be searched: {section}.* is shared by all trials",
        )
        for value in dim.extremes():
            _trial_config(base, {key: value}, f"tune.space.{key} = {value!r}", source)
    _check_grace(cfg, tune, source)
    warm = tune.warm_start
    if warm is None:
        return
    require(
        bool(warm.source),
        "tune.warm_start.from",
        "is empty; set a checkpoint path or URI, e.g. models:/segnext-demo@champion",
    )
    require(
        not warm.scratch or warm.if_missing == "scratch",
        "tune.warm_start.scratch",
        "holds overrides used only with tune.warm_start.if_missing: scratch; set it or remove them",
    )
    require(
        not (cfg.model.init_from or cfg.model.pretrained),
        "tune.warm_start",
        "and model.init_from/model.pretrained both set the weights; keep one",
    )
    weights = {"model.init_from": warm.source, "model.init_part": warm.part}
    _trial_config(base, weights, "tune.warm_start", source)
    if warm.if_missing == "scratch":
        scratch = _trial_config(base, warm.scratch, "tune.warm_start.scratch", source)
        _check_grace(scratch, tune, source, where=" (with tune.warm_start.scratch)")


def _trial_config(
    base: ExperimentConfig, values: dict[str, Any], what: str, source: str
) -> ExperimentConfig:
    try:
        return with_overrides(base, values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {what} is rejected by the config: {error}") from None


def _check_grace(cfg: ExperimentConfig, tune: TuneConfig, source: str, where: str = "") -> None:
    """ASHA must be able to compare trials before they end."""
    grace = tune.asha.grace_period * cfg.train.val_every
    if grace > cfg.schedule.iterations:
        raise ConfigError(
            f"{source}: tune.asha.grace_period = {tune.asha.grace_period} validations is "
            f"{grace} iterations, beyond schedule.iterations ({cfg.schedule.iterations}){where}; "
            "lower it or train.val_every so ASHA can compare trials before they end"
        )


# ---------------------------------------------------------------------------------- output


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain data (YAML/JSON/torch.save-safe) that `config_from_dict` reads back."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_config"):
        return value.to_config()
    if dataclasses.is_dataclass(value):
        return {_yaml_key(f): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def to_flat_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """`{"optim.lr": 6e-05, "loss.weights.general": 1.0, ...}`: MLflow params, checkpoint meta."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(to_dict(cfg), "")
    return flat


class _Dumper(yaml.SafeDumper):
    """Block-style sections with one-line lists (`crop_size: [512, 512]`)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
