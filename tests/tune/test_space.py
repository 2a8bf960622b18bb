"""Search-space parsing: every mistake is caught in the driver and names the tune.* key."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.tune.search.sample import Categorical, Float, Integer

from pipelines.config import ConfigError
from tune.space import load_search_config, param_space

BASE = (
    "model: {variant: tiny, classifier: integrated}\n"
    "data: {root: /some/shards, crop_size: [64, 64]}\n"
    "ray: {num_workers: 1}\n"
    "train: {global_batch_size: 4}\n"
)


def write(tmp_path: Path, tune_section: str) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(BASE + tune_section)
    return path


def test_all_distributions_parse_and_build_tune_domains(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        (
            "tune:\n"
            "  trials: 3\n"
            "  max_concurrent: 2\n"
            "  asha: {grace_period: 2, reduction_factor: 3}\n"
            "  capacity: {GPU: 8, CPU: 6.4e+1}\n"
            "  space:\n"
            "    optim.lr: {loguniform: [1e-4, 1e-2]}\n"  # YAML 1.1 reads these as strings
            "    loss.weights.variance: {uniform: [0, 0.5]}\n"
            "    model.classifier_kwargs.top_k: {choice: [2, 3]}\n"
            "    train.seed: {randint: [0, 10]}\n"
            "    optim.weight_decay: {grid: [0.0, 1e-2]}\n"
        ),
    )
    cfg, settings = load_search_config(path)
    assert cfg.model.classifier == "integrated"
    space = settings.space
    assert space["optim.lr"].values == (1e-4, 1e-2) and space["optim.lr"].log_scale
    assert space["optim.weight_decay"].values == (0.0, 0.01)
    domains = param_space(settings)
    assert isinstance(domains["optim.lr"], Float)
    assert isinstance(domains["model.classifier_kwargs.top_k"], Categorical)
    assert isinstance(domains["train.seed"], Integer)
    assert domains["optim.weight_decay"] == {"grid_search": [0.0, 0.01]}
    assert (settings.trials, settings.max_concurrent, settings.asha.grace_period) == (3, 2, 2)
    assert settings.asha.reduction_factor == 3.0
    assert settings.capacity == {"GPU": 8.0, "CPU": 64.0}
    assert settings.total_trials == 6  # 3 samples x a grid of 2


def test_overrides_reach_the_config_and_the_tune_section(tmp_path: Path) -> None:
    path = write(tmp_path, "tune:\n  space:\n    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    cfg, settings = load_search_config(
        path,
        [
            "schedule.iterations=5000",
            "tune.trials=7",
            "tune.search=optuna",
            "tune.space.loss.weights.refine={uniform: [0.5, 2.0]}",
        ],
    )
    assert cfg.schedule.iterations == 5000
    assert settings.trials == 7 and settings.search == "optuna"
    assert list(settings.space) == ["optim.lr", "loss.weights.refine"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "tune:\n  space:\n    optim.lr: {logunifrom: [1.0e-4, 1.0e-2]}\n",
            "tune.space.optim.lr has unknown distribution 'logunifrom'; did you mean loguniform?",
        ),
        ("tune:\n  space:\n    optim.lrr: {uniform: [0.1, 0.2]}\n", "tune.space.optim.lrr"),
        ("tune:\n  space:\n    optim.lr: {uniform: [-1.0, 1.0]}\n", "optim.lr must be > 0"),
        ("tune:\n  space:\n    optim.lr: {loguniform: [0.0, 1.0]}\n", "loguniform needs 0 < low"),
        (
            "tune:\n  space:\n    optim.lr: {uniform: [0.2, 0.1]}\n",
            "uniform needs numbers low < high",
        ),
        (
            "tune:\n  space:\n    train.seed: {randint: [0, 2.5]}\n",
            "randint bounds must be integers",
        ),
        (
            "tune:\n  space:\n    model.classifier: {choice: [integrated, softmax]}\n",
            "tune.space.model.classifier = 'softmax' is rejected by the config",
        ),
        (
            "tune:\n  space:\n    ray.num_workers: {choice: [1, 2]}\n",
            "ray.* is shared by all trials",
        ),
        ("tune:\n  space:\n    optim.lr: [1.0e-4, 1.0e-2]\n", "must be one distribution"),
        ("tune:\n  space: {}\n", "tune.space is empty"),
        (
            "tune:\n  trails: 3\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "unknown config key tune.trails; did you mean tune.trials?",
        ),
        (
            "tune:\n  trials: 0\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.trials = 0 must be a positive integer",
        ),
        (
            "tune:\n  search: optuna\n  space:\n    optim.lr: {grid: [0.1, 0.2]}\n",
            "optuna cannot take grid dimensions",
        ),
        (
            "tune:\n  asha: {reduction_factor: 1}\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.asha.reduction_factor must be a number > 1",
        ),
        (
            "tune:\n  capacity: {GPU: -1}\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.capacity = {'GPU': -1.0} must map resource names to positive numbers",
        ),
        ("", "no `tune:` section"),
        (
            "tune:\n  warm_start: {from: c.pt, part: decoder}\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.warm_start.part = 'decoder' is not allowed; choose one of 'encoder', 'model'",
        ),
        (
            "tune:\n  warm_start: {part: model}\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.warm_start.from is empty; set a checkpoint path or URI",
        ),
        (
            "tune:\n  warm_start: {from: c.pt, form: x}\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "unknown config key tune.warm_start.form; did you mean tune.warm_start.from?",
        ),
        (
            "tune:\n  warm_start: {from: c.pt, scratch: {schedule.iterations: 9}}\n"
            "  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.warm_start.scratch holds overrides used only with tune.warm_start.if_missing: scratch",
        ),
        (
            "tune:\n  warm_start: {from: c.pt, if_missing: scratch, scratch: {schedule.itr: 9}}\n"
            "  space:\n    optim.lr: {choice: [0.1]}\n",
            "unknown config key schedule.itr",
        ),
        (
            "tune:\n  warm_start: {from: c.pt, if_missing: ignore}\n"
            "  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.warm_start.if_missing = 'ignore' is not allowed; choose one of 'fail', 'scratch'",
        ),
        (
            "tune:\n  classes: car\n  space:\n    optim.lr: {choice: [0.1]}\n",
            "tune.classes = 'car' has type str, expected list",
        ),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, section: str, message: str) -> None:
    path = write(tmp_path, section)
    with pytest.raises(ConfigError) as error:
        load_search_config(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_config_overrides_are_applied_before_validation(tmp_path: Path) -> None:
    """A value only given on the command line (here data.root) must not fail the YAML alone."""
    path = tmp_path / "search.yaml"
    path.write_text(
        BASE.replace("root: /some/shards, ", "")
        + "tune:\n  space:\n    optim.lr: {choice: [0.1]}\n"
    )
    with pytest.raises(ConfigError, match="data.root"):
        load_search_config(path)
    cfg, _ = load_search_config(path, ["data.root=/other/shards"])
    assert cfg.data.root == "/other/shards"


def test_warm_start_reads_a_bare_source_or_a_mapping(tmp_path: Path) -> None:
    space = "  space:\n    optim.lr: {choice: [0.1]}\n"
    _, settings = load_search_config(write(tmp_path, "tune:\n  warm_start: c.pt\n" + space))
    assert (settings.warm_start.source, settings.warm_start.part) == ("c.pt", "model")
    _, settings = load_search_config(
        write(
            tmp_path,
            "tune:\n  warm_start: {from: 'models:/m@champion', part: encoder, "
            "if_missing: scratch, scratch: {schedule.iterations: 9000}}\n" + space,
        )
    )
    warm = settings.warm_start
    assert (warm.source, warm.part, warm.if_missing) == ("models:/m@champion", "encoder", "scratch")
    assert warm.scratch == {"schedule.iterations": 9000}
    with pytest.raises(ConfigError, match="both set the weights"):
        load_search_config(
            write(tmp_path, "tune:\n  warm_start: c.pt\n" + space), ["model.init_from=d.pt"]
        )
