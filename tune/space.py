"""Ray Tune's view of the `tune:` section of an experiment config.

The section itself is `pipelines.config.TuneConfig`: it is read, overridden (`tune.trials=8`,
`tune.space.optim.lr={choice: [1e-3]}`) and validated with the rest of the config by
`pipelines.config`, so a searched key that does not exist or a distribution that can produce a
rejected value fails there, before Ray starts. This module only turns the section into Ray
Tune's domains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, Dimension, ExperimentConfig, TuneConfig, load_config


def load_search_config(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[ExperimentConfig, TuneConfig]:
    """The experiment config and its `tune:` section, which a search needs."""
    cfg = load_config(path, overrides)
    if cfg.tune is None:
        raise ConfigError(
            f"{path}: no `tune:` section; add one with a `space:` to search, e.g. "
            "tune: {space: {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}}"
        )
    return cfg, cfg.tune


def to_tune(dim: Dimension) -> Any:
    """The `ray.tune` domain of one dimension."""
    from ray import tune

    if dim.kind == "loguniform":
        return tune.loguniform(*dim.values)
    if dim.kind == "uniform":
        return tune.uniform(*dim.values)
    if dim.kind == "randint":
        return tune.randint(*dim.values)
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    return tune.grid_search(list(dim.values))


def param_space(settings: TuneConfig) -> dict[str, Any]:
    """`Tuner(param_space=...)`: dotted config key -> domain."""
    return {key: to_tune(dim) for key, dim in settings.space.items()}
