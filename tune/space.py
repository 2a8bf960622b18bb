"""The search space and search settings, read from the `tune:` section of an experiment YAML.

```yaml
tune:
  trials: 4                 # samples drawn from the space (x the size of any grid)
  max_concurrent: 2         # optional; capped to what the cluster fits
  search: random            # random | optuna
  seed: 0
  asha: {grace_period: 1, reduction_factor: 2}   # in validations
  capacity: {GPU: 8, CPU: 64}   # optional: what an autoscaling cluster grows to
  space:                    # dotted config key -> one distribution
    optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    loss.weights.variance: {uniform: [0.0, 0.5]}
    loss.weights.refine: {choice: [0.5, 1.0, 2.0]}
    train.seed: {randint: [0, 100]}              # high bound excluded
    optim.weight_decay: {grid: [0.0, 0.01]}      # every value, for each sample (random only)
```

Everything is checked in the driver before Ray starts: each searched key must exist in the
config and accept every value the distribution can produce (its bounds or its choices), so a
typo fails with the key's name instead of a crashed trial minutes later.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    with_overrides,
)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")
# Trials share one cluster plan, one tracking store and one registry: these stay fixed.
FIXED_SECTIONS = ("ray", "run", "mlflow", "registry")
# YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Dimension:
    """One searched config key and its distribution."""

    key: str
    kind: str
    values: tuple[Any, ...]  # (low, high) for ranges, the options for choice/grid

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def to_tune(self) -> Any:
        """The `ray.tune` domain (imported here: reading a config must not need Ray)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def extremes(self) -> list[Any]:
        """Values covering what the distribution can produce, to check against the config."""
        if self.kind in ("loguniform", "uniform"):
            return list(self.values)
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def describe(self) -> str:
        return f"{self.kind}({', '.join(repr(v) for v in self.values)})"


@dataclass(frozen=True)
class AshaSettings:
    grace_period: int = 1  # validations a trial runs before it can be stopped
    reduction_factor: float = 2.0  # keep the top 1/reduction_factor at each rung


@dataclass(frozen=True)
class WarmStart:
    """`tune.warm_start`: every trial starts from these weights (`model.init_from`)."""

    source: str  # checkpoint path/folder, s3:// URI or models:/NAME@ALIAS
    part: Literal["encoder", "model"] = "model"
    if_missing: Literal["fail", "scratch"] = "fail"
    scratch: dict[str, Any] = field(default_factory=dict)  # overrides when from scratch


@dataclass(frozen=True)
class SearchSettings:
    space: dict[str, Dimension]
    trials: int = 4
    max_concurrent: int | None = None
    search: Literal["random", "optuna"] = "random"
    seed: int = 0
    asha: AshaSettings = field(default_factory=AshaSettings)
    # Resources an autoscaling cluster can grow to (it reports only the nodes already up);
    # None: plan with what `ray.cluster_resources()` reports at start.
    capacity: dict[str, float] | None = None
    warm_start: WarmStart | None = None
    # classes whose IoU the results picture plots (None: the best trial's most confused pairs)
    classes: list[str] | None = None

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values() if d.kind == "grid")

    @property
    def total_trials(self) -> int:
        return self.trials * self.grid_size

    def param_space(self) -> dict[str, Any]:
        return {key: dim.to_tune() for key, dim in self.space.items()}


def load_search_config(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[ExperimentConfig, SearchSettings]:
    """Read an experiment YAML with a `tune:` section; `tune.*` overrides go to the section.

    `tune.space.optim.lr={choice: [1e-3]}` replaces one dimension; other overrides are ordinary
    config overrides (`schedule.iterations=100`).
    """
    raw = read_yaml_mapping(path)
    section = raw.pop("tune", None)
    if section is None:
        raise ConfigError(f"{path}: no `tune:` section; add one with a `space:` to search")
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: `tune:` must be a mapping (trials, space, ...)")
    section = {**section, "space": dict(section.get("space") or {})}
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith("space."):
            raise ConfigError(f"override {item!r}: search settings start with tune., not space.")
        if key.startswith("tune.space."):
            section["space"][key.removeprefix("tune.space.")] = value
        elif key.startswith("tune."):
            set_dotted(section, key.removeprefix("tune."), value)
        else:
            set_dotted(raw, key, value)
    cfg = config_from_dict(raw, source=str(path))
    return cfg, parse_search_settings(section, cfg, source=str(path))


def parse_search_settings(
    section: dict[str, Any], cfg: ExperimentConfig, *, source: str
) -> SearchSettings:
    """Validate the `tune:` mapping against the experiment config it searches."""
    names = [f.name for f in dataclasses.fields(SearchSettings)]
    for key in section:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean tune.{close[0]}?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key tune.{key}; {hint}")

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: tune.{key} {message}")

    trials = section.get("trials", 4)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise fail("trials", f"= {trials!r} must be a positive integer")
    max_concurrent = section.get("max_concurrent")
    if max_concurrent is not None and (
        isinstance(max_concurrent, bool)
        or not isinstance(max_concurrent, int)
        or max_concurrent < 1
    ):
        raise fail("max_concurrent", f"= {max_concurrent!r} must be a positive integer or null")
    search = section.get("search", "random")
    if search not in ("random", "optuna"):
        raise fail("search", f"= {search!r} must be random or optuna")
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("seed", f"= {seed!r} must be an integer")
    asha = _parse_asha(section.get("asha") or {}, fail)
    capacity = section.get("capacity")
    if capacity is not None:
        if not isinstance(capacity, dict) or not all(
            _number(v) is not None and _number(v) > 0 for v in capacity.values()
        ):
            raise fail(
                "capacity",
                f"= {capacity!r} must map resource names to positive "
                "numbers, e.g. {GPU: 8, CPU: 64}",
            )
        capacity = {str(key): float(_number(value)) for key, value in capacity.items()}

    warm_start = _parse_warm_start(section.get("warm_start"), cfg, fail)
    classes = section.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
    ):
        raise fail("classes", f"= {classes!r} must be a list of class names, e.g. [car, truck]")

    space_raw = section.get("space") or {}
    if not isinstance(space_raw, dict) or not space_raw:
        raise fail(
            "space",
            "is empty; map dotted config keys to distributions, e.g. "
            "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}",
        )
    space = {str(key): _parse_dimension(str(key), spec, fail) for key, spec in space_raw.items()}
    for dim in space.values():
        _check_against_config(dim, cfg, fail)
    if search == "optuna" and any(dim.kind == "grid" for dim in space.values()):
        raise fail("search", "= optuna cannot take grid dimensions; use choice, or search=random")
    return SearchSettings(
        space=space,
        trials=trials,
        max_concurrent=max_concurrent,
        search=search,
        seed=seed,
        asha=asha,
        capacity=capacity,
        warm_start=warm_start,
        classes=classes,
    )


def _parse_warm_start(raw: Any, cfg: ExperimentConfig, fail) -> WarmStart | None:
    """The schema only; whether the source exists and fits the shards is checked by the
    search's driver (`pipelines.warm_start`), still before Ray starts."""
    if raw is None:
        return None
    example = "e.g. {from: models:/segnext-demo@champion, part: model}"
    if isinstance(raw, str):
        raw = {"from": raw}
    if not isinstance(raw, dict):
        raise fail("warm_start", f"must be a checkpoint path or URI, or a mapping, {example}")
    unknown = set(raw) - {"from", "part", "if_missing", "scratch"}
    if unknown:
        raise fail(
            f"warm_start.{sorted(unknown)[0]}", "is unknown; use from, part, if_missing, scratch"
        )
    source = raw.get("from")
    if not isinstance(source, str) or not source:
        raise fail("warm_start.from", f"= {source!r} must be a checkpoint path or URI, {example}")
    part = raw.get("part", "model")
    if part not in ("encoder", "model"):
        raise fail(
            "warm_start.part",
            f"= {part!r} must be model (every weight, same classes) or encoder (any classes)",
        )
    if_missing = raw.get("if_missing", "fail")
    if if_missing not in ("fail", "scratch"):
        raise fail("warm_start.if_missing", f"= {if_missing!r} must be fail or scratch")
    scratch = raw.get("scratch") or {}
    if not isinstance(scratch, dict) or (scratch and if_missing != "scratch"):
        raise fail(
            "warm_start.scratch",
            "must be a mapping of config overrides, used only with if_missing: scratch",
        )
    if cfg.model.init_from or cfg.model.pretrained:
        raise fail("warm_start", "and model.init_from/model.pretrained both set the weights")
    try:
        with_overrides(cfg, {**scratch, "model.init_from": source, "model.init_part": part})
    except ConfigError as error:
        raise fail("warm_start", f"is rejected by the config: {error}") from None
    return WarmStart(source=source, part=part, if_missing=if_missing, scratch=dict(scratch))


def _parse_asha(raw: Any, fail) -> AshaSettings:
    if not isinstance(raw, dict):
        raise fail("asha", "must be a mapping {grace_period, reduction_factor}")
    unknown = set(raw) - {"grace_period", "reduction_factor"}
    if unknown:
        raise fail(f"asha.{sorted(unknown)[0]}", "is unknown; use grace_period, reduction_factor")
    grace = raw.get("grace_period", 1)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        raise fail("asha.grace_period", f"= {grace!r} must be an integer >= 1 (validations)")
    factor = _number(raw.get("reduction_factor", 2.0))
    if factor is None or factor <= 1:
        raise fail("asha.reduction_factor", "must be a number > 1")
    return AshaSettings(grace_period=grace, reduction_factor=float(factor))


def _parse_dimension(key: str, spec: Any, fail) -> Dimension:
    where = f"space.{key}"
    example = "e.g. {loguniform: [1.0e-4, 1.0e-2]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(where, f"must be one distribution ({', '.join(DISTRIBUTIONS)}), {example}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(DISTRIBUTIONS)}"
        raise fail(where, f"has unknown distribution {kind!r}; {hint}")
    if not isinstance(args, list) or not args:
        raise fail(where, f"{kind} needs a non-empty list, {example}")
    if kind in ("choice", "grid"):
        return Dimension(key, kind, tuple(_yaml_float(value) for value in args))
    if len(args) != 2:
        raise fail(where, f"{kind} needs [low, high], got {args!r}")
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
            raise fail(where, f"randint bounds must be integers, got {args!r}")
        low, high = args
        if low >= high:
            raise fail(where, f"randint needs low < high (high is excluded), got {args!r}")
        return Dimension(key, kind, (low, high))
    low, high = (_number(v) for v in args)
    if low is None or high is None or not low < high:
        raise fail(where, f"{kind} needs numbers low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise fail(where, f"loguniform needs 0 < low, got {args!r}")
    return Dimension(key, kind, (float(low), float(high)))


def _check_against_config(dim: Dimension, cfg: ExperimentConfig, fail) -> None:
    """Every value the dimension can produce must make a valid config."""
    section = dim.key.split(".", 1)[0]
    if section in FIXED_SECTIONS:
        raise fail(f"space.{dim.key}", f"cannot be searched: {section}.* is shared by all trials")
    for value in dim.extremes():
        try:
            with_overrides(cfg, {dim.key: value})
        except ConfigError as error:
            raise fail(
                f"space.{dim.key}", f"= {value!r} is rejected by the config: {error}"
            ) from None


def _number(value: Any) -> float | int | None:
    value = _yaml_float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _yaml_float(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.match(value) else value
