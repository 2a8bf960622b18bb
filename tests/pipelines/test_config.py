"""Config loading: YAML + dotted overrides, typed, validated before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_override,
    to_flat_dict,
    to_yaml,
    with_overrides,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def config_file(tmp_path: Path, experiment_yaml) -> Path:
    """The tiny experiment (tests/conftest.py) with `lr: 6e-5` written as a person types it."""
    return experiment_yaml(tmp_path, "/some/shards", {"optim.lr": "6e-5"})


def test_yaml_values_and_defaults(config_file: Path) -> None:
    cfg = load_config(config_file)
    assert cfg.model.classifier == "integrated"
    assert cfg.data.crop_size == [64, 64]
    assert cfg.optim.lr == pytest.approx(6e-5)  # YAML 1.1 reads "6e-5" as a string
    assert isinstance(cfg.optim.lr, float)
    assert cfg.schedule.warmup_ratio == pytest.approx(1e-6)
    assert cfg.micro_batch_size == 4


def test_overrides_are_typed(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        [
            "optim.lr=1e-3",
            "schedule.iterations=2000",
            "train.amp=false",
            "data.crop_size=[32, 48]",
            "model.num_classes=null",
            "loss.weights.variance=0.5",
            "run.name=abc",
            "train.per_worker_batch_size=2",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.schedule.iterations == 2000
    assert cfg.train.amp is False
    assert cfg.data.crop_size == [32, 48]
    assert cfg.model.num_classes is None
    assert cfg.loss.weights["variance"] == 0.5 and cfg.loss.weights["general"] == 1.0
    assert cfg.run.name == "abc"
    assert cfg.micro_batch_size == 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1", "unknown config key optim.lrr; did you mean optim.lr?"),
        ("nosuch.key=1", "unknown config key nosuch"),
        ("schedule.iterations=abc", "schedule.iterations = 'abc' has type str, expected int"),
        ("schedule.iterations=1.5", "expected int"),
        ("train.amp=3", "expected bool"),
        ("model.classifier=fancy", "choose one of 'standard', 'integrated'"),
        ("data.crop_size=64", "expected list"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("train.global_batch_size=7", "must be a multiple of ray.num_workers"),
        ("loss.weights.typo=1", "keys must be general, refine, variance"),
        ("loss.warmup_iters=-1", "loss.warmup_iters must be >= 0"),
        ("loss.class_balance=2", "loss.class_balance must be in [0, 1]"),
        ("model.classifier_kwargs.decision=best",
         "decision = 'best' must be one of product, general, refine"),
        ("loss.class_frequencies=[0.5, 1.5]", "must list each class's pixel share in [0, 1]"),
        ("loss.resolution=half", "choose one of 'mask', 'logits'"),
        ("optim.lr", "not of the form section.key=value"),
        ("eval.mode=slide", "eval.stride must be set"),
    ],
)
def test_bad_values_raise_config_error(config_file: Path, override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    assert needle in str(info.value)


def test_a_decision_rule_for_the_standard_head_is_refused(config_file: Path) -> None:
    with pytest.raises(ConfigError, match="with model.classifier=integrated"):
        load_config(config_file, ["model.classifier=standard",
                                  "model.classifier_kwargs.decision=general"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model: {variant: tiny}\n")  # no data.root
    with pytest.raises(ConfigError, match="data.root is empty"):
        load_config(bad)


def test_flat_dict_and_yaml_round_trip(config_file: Path, tmp_path: Path) -> None:
    cfg = load_config(config_file, ["loss.weights.refine=2"])
    flat = to_flat_dict(cfg)
    assert flat["optim.lr"] == pytest.approx(6e-5)
    assert flat["loss.weights.refine"] == 2.0
    assert flat["data.crop_size"] == [64, 64]
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg
    assert with_overrides(cfg, {"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ConfigError):
        with_overrides(cfg, {"optim.nope": 1})


def test_parse_override_uses_yaml_scalars() -> None:
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("a.b=hello") == ("a.b", "hello")


@pytest.mark.parametrize("name", ["demo", "demo-tune", "camvid", "ade20k", "cityscapes"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.schedule.warmup_iters < cfg.schedule.iterations


def test_tune_section_is_a_typed_section_of_the_one_config() -> None:
    """`segnext train` loads a config with a tune: section (and ignores it); the section
    survives the dict round trip that trials and workers go through."""
    cfg = load_config(
        CONFIGS / "demo-tune.yaml",
        ["tune.trials=2", "tune.space.optim.lr={choice: [1.0e-3, 2.0e-3]}", "optim.lr=1e-3"],
    )
    assert cfg.tune.trials == 2 and cfg.optim.lr == 1e-3
    assert cfg.tune.space["optim.lr"].to_config() == {"choice": [1e-3, 2e-3]}
    assert cfg.tune.warm_start.source == "models:/segnext-demo@champion"
    assert cfg.tune.warm_start.scratch["schedule.iterations"] == 800
    assert with_overrides(cfg, {}) == cfg  # to_dict writes `from:` and distributions back
    assert "from: models:/segnext-demo@champion" in to_yaml(cfg)
    assert load_config(CONFIGS / "demo.yaml").tune is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("tune.space.optim.lr={uniform: [-1.0, 1.0]}", "tune.space.optim.lr = -1.0 is rejected"),
        ("tune.space.ray.num_workers={choice: [1, 2]}", "ray.* is shared by all trials"),
        ("tune.warm_start.scratch={schedule.itr: 9}", "unknown config key schedule.itr"),
        ("tune.warm_start.part=decoder", "choose one of 'encoder', 'model'"),
        ("tune.asha.grace_period=5", "5 validations is 500 iterations, beyond schedule"),
        (
            "tune.warm_start.scratch.train.val_every=900",  # one entry of the dotted mapping
            "is 900 iterations, beyond schedule.iterations (800) (with tune.warm_start.scratch)",
        ),
        ("tune.max_concurrent=0", "tune.max_concurrent = 0 must be >= 1"),
        ("tune.trials=two", "tune.trials = 'two' has type str, expected int"),
        ("tune.num_samples=2", "tune.num_samples is Ray Tune's name; here it is tune.trials"),
    ],
)
def test_tune_mistakes_fail_for_train_and_tune_alike(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "demo-tune.yaml", [override])
    assert needle in str(error.value) and "demo-tune.yaml" in str(error.value)


# Every value of the config that has a range, out of it: refused at load (before shards are
# read or Ray starts) with the key and what it must be. `test_every_ranged_key_has_a_row`
# keeps this table complete as keys are added.
OUT_OF_RANGE = [
    ("model.num_classes=1", "model.num_classes must be > 1"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate must be in [0, 1)"),
    ("model.classifier_kwargs={top_k: 0}", "model.classifier_kwargs.top_k = 0 must be a whole"),
    ("data.crop_size=[0, 64]", "data.crop_size must be positive"),
    ("data.crop_size=[64]", "data.crop_size must be [height, width]"),
    ("data.scale=[512, 0]", "data.scale must be [long, short], both > 0"),
    ("data.ratio_range=[2.0, 0.5]", "data.ratio_range must be [low, high] with 0 < low <= high"),
    ("data.ratio_range=[0, 1]", "data.ratio_range must be [low, high] with 0 < low <= high"),
    ("data.cat_max_ratio=1.5", "data.cat_max_ratio must be in (0, 1]"),
    ("data.read_cpus=0", "data.read_cpus must be > 0"),
    ("data.cache_bytes=-1", "data.cache_bytes must be a whole number of bytes >= 0"),
    ("data.val_split=''", "data.val_split is empty"),
    ("data.train_split=[]", "data.train_split must name at least one split"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must be [beta1, beta2], each in [0, 1)"),
    ("optim.decoder_lr_mult=0", "optim.decoder_lr_mult must be > 0"),
    ("schedule.iterations=-5", "schedule.iterations must be > 0"),
    ("schedule.warmup_iters=6", "schedule.warmup_iters must be in [0, schedule.iterations)"),
    ("schedule.warmup_ratio=0", "schedule.warmup_ratio must be in (0, 1]"),
    ("schedule.power=0", "schedule.power must be > 0"),
    ("loss.weights.refine=-1", "loss.weights.refine = -1.0 must be >= 0"),
    ("loss.variance_top_k=1", "loss.variance_top_k must be >= 2"),
    ("loss.warmup_iters=-1", "loss.warmup_iters must be >= 0"),
    ("loss.class_balance=-0.1", "loss.class_balance must be in [0, 1]"),
    ("loss.class_frequencies=[-0.1, 1.1]", "loss.class_frequencies must list each class's"),
    ("train.global_batch_size=0", "train.global_batch_size must be > 0"),
    ("train.per_worker_batch_size=0", "train.per_worker_batch_size must be > 0"),
    ("train.log_every=0", "train.log_every must be > 0"),
    ("train.val_every=-1", "train.val_every must be > 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be > 0"),
    ("train.keep_best=0", "train.keep_best must be > 0"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("train.max_failures=-2", "train.max_failures must be >= -1"),
    ("train.time_budget_s=0", "train.time_budget_s must be > 0 seconds"),
    ("train.fail_at_iteration=0", "train.fail_at_iteration must be an iteration > 0"),
    ("eval.batch_size=0", "eval.batch_size must be > 0"),
    ("eval.crop=[0, 64]", "eval.crop must be [height, width], both > 0"),
    ("eval.stride=[32]", "eval.stride must be [height, width], both > 0"),
    ("ray.num_workers=0", "ray.num_workers must be > 0"),
    ("ray.min_workers=3", "ray.min_workers must be between 1 and ray.num_workers (2)"),
    ("ray.cpus_per_worker=0", "ray.cpus_per_worker must be > 0"),
    ("ray.gpus_per_worker=0.5", "ray.gpus_per_worker needs ray.use_gpu=true"),
    ("ray.resources_per_worker={node: -1}", "ray.resources_per_worker.node = -1 must be > 0"),
    ("ray.resources_per_worker={CPU: 2}", "ray.resources_per_worker.CPU is ray.cpus_per_worker"),
    ("ray.resize_interval_s=-1", "ray.resize_interval_s must be >= 0"),
    ("ray.start_timeout_s=0", "ray.start_timeout_s must be > 0 seconds"),
    ("mlflow.experiment=' '", "mlflow.experiment is empty"),
    ("registry.name=a/b:1", "registry.name = 'a/b:1' is not a model registry name"),
    ("run.storage_path=''", "run.storage_path must not be empty"),
    ("storage.endpoint=minio:9000", "storage.endpoint = 'minio:9000' must be a URL"),
    ("tune.trials=0", "tune.trials = 0 must be a positive integer"),
    ("tune.max_concurrent=0", "tune.max_concurrent = 0 must be >= 1"),
    ("tune.seed=-1", "tune.seed must be >= 0"),
    ("tune.asha.grace_period=0", "tune.asha.grace_period must be >= 1"),
    ("tune.asha.reduction_factor=1", "tune.asha.reduction_factor must be a number > 1"),
    ("tune.capacity={GPU: -1}", "tune.capacity = {'GPU': -1.0} must map resource names to"),
]


@pytest.mark.parametrize(("override", "needle"), OUT_OF_RANGE)
def test_every_value_is_range_checked_at_load(config_file: Path, override: str,
                                              needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(config_file, ["registry.register=true", override])
    assert needle in str(error.value)


def _numeric_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of the schema whose values are numbers (or lists/maps of numbers)."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        nested = [a for a in args if dataclasses.is_dataclass(a)]
        if nested:
            keys += _numeric_keys(nested[0], f"{prefix}{f.name}.")
            continue
        leaves = {leaf for a in args for leaf in (typing.get_args(a) or (a,))}
        if leaves & {int, float}:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_ranged_key_has_a_row() -> None:
    """Each numeric key of the schema is in OUT_OF_RANGE, so a new one gets its check."""
    covered = {override.split("=")[0] for override, _ in OUT_OF_RANGE}
    missing = [key for key in _numeric_keys(ExperimentConfig)
               if not any(row == key or row.startswith(f"{key}.") for row in covered)]
    assert not missing, f"add out-of-range rows (and checks) for {missing}"
