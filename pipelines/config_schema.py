"""The experiment config's schema: the typed sections a YAML config fills in, and ConfigError.

Reading and checking a config (YAML, dotted overrides, value ranges) is `pipelines.config`,
which re-exports these names: import them from there.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message says how to fix it."""


# Keys that configs of earlier versions may still hold: why they went, and what to do.
REMOVED_KEYS = {
    "data.val_size": "is gone: validation scores every image at its original size, as "
    "`segnext eval` does; delete the key",
    "data.stream_epochs": "is gone: each worker streams its share of the whole run's batch "
    "plan (data.plan), epochs included; delete the key",
}
# Keys users bring from elsewhere (Ray Tune's own names): what they are called here.
OTHER_NAMES = {
    "tune.num_samples": "is Ray Tune's name; here it is tune.trials (or --trials)",
    "tune.max_concurrent_trials": "is Ray Tune's name; here it is tune.max_concurrent",
    "tune.scheduler": "is not configurable: the search uses ASHA; set tune.asha instead",
}
# Mappings whose keys are themselves dotted config keys: `tune.space.optim.lr=...` sets the
# dimension "optim.lr", not a section "optim".
DOTTED_KEY_MAPPINGS = ("tune.space", "tune.warm_start.scratch")
# Sections every trial of a search shares (one cluster plan, tracking store, registry).
UNSEARCHABLE_SECTIONS = ("ray", "run", "mlflow", "registry", "storage", "tune")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # YAML 1.1 reads 1e-4 as text


# How the integrated head predicts where model.classifier_kwargs.decision is unset: "general"
# (its K sigmoids alone) beat the spec's "product" on every seed of the CamVid study, 40.97 ±
# 0.46 against 39.94 ± 0.87 test mIoU (BENCHMARKS.md, issue 27). The model library keeps the
# spec's "product", so a checkpoint saved without a decision predicts as it always did.
DEFAULT_DECISION = {"integrated": "general"}


@dataclass
class ModelConfig:
    variant: str = "tiny"
    num_classes: int | None = None  # None: taken from the shards' manifest
    classifier: Literal["standard", "integrated"] = "standard"
    classifier_kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float | None = None  # None: the variant's default
    nmf: dict[str, Any] = field(default_factory=dict)  # NMF options passed to create_model
    pretrained: str | None = None  # official SegNeXt / MSCAN checkpoint to start from
    # a checkpoint of this project to start from (path, s3:// URI, models:/NAME@ALIAS): its
    # encoder only, or the whole model (same classes); a restored run resumes its own instead
    init_from: str | None = None
    init_part: Literal["encoder", "model"] = "model"

    def classifier_options(self) -> dict[str, Any]:
        """`classifier_kwargs`, with the head's default decision rule where it is unset."""
        options = dict(self.classifier_kwargs)
        if self.classifier in DEFAULT_DECISION:
            options.setdefault("decision", DEFAULT_DECISION[self.classifier])
        return options


@dataclass
class DataConfig:
    root: str = ""  # shards folder or URI (s3://, gs://) holding dataset.json
    train_split: str | list[str] = "train"  # one split or several trained on as one
    val_split: str = "val"
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (height, width)
    scale: list[int] | None = None  # (long, short) base scale before the random ratio
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    read_cpus: float = 0.25
    on_error: Literal["raise", "skip"] = "raise"
    # Remote roots (s3://, gs://): whole shards are kept on each node's disk, at most
    # cache_bytes per node, under cache_dir/<run name> ("" = the system temp folder), removed at
    # the end of the run; cache_bytes 0 reads each sample in place (one ranged GET per sample).
    cache_dir: str = ""
    cache_bytes: int = 8 << 30
    # Start the read tasks' Ray worker processes while the Train workers start, so the first
    # batches do not wait for them (data/worker_prestart.py); false: started at the first read.
    prestart_workers: bool = True

    @property
    def train_splits(self) -> list[str]:
        return [self.train_split] if isinstance(self.train_split, str) else list(self.train_split)


@dataclass
class OptimConfig:
    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    decoder_lr_mult: float = 10.0


@dataclass
class ScheduleConfig:
    iterations: int = 160_000
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0


# Both heads weigh the true class's term by the class's rarity (0.5). The integrated head's
# one-vs-rest BCE is ruled by the negatives of a rare class, which then drops out of the top-k
# candidates: 0.5 took CamVid from 37.64 to 40.82 test mIoU (issue 18). The standard head's CE
# gained as much: 37.98 ± 1.25 -> 40.77 ± 0.08 over three seeds, for 4.5 points of aAcc (issue
# 27). The official recipe, which the paper's numbers are for, is 0 (configs/ade20k.yaml).
DEFAULT_CLASS_BALANCE = {"standard": 0.5, "integrated": 0.5}


@dataclass
class LossConfig:
    average: Literal["valid", "all"] = "valid"
    weights: dict[str, float] = field(
        default_factory=lambda: {"general": 1.0, "refine": 1.0, "variance": 0.1}
    )
    variance_top_k: int = 3
    # Where the loss is computed: "mask" (logits resized to the mask, official) or "logits"
    # (the mask sampled down to the stride-8 logits: cheaper, thin objects less supervised).
    resolution: Literal["mask", "logits"] = "mask"
    # Integrated loss: w_ref and w_var ramp linearly from 0 over this many iterations (0: off).
    warmup_iters: int = 0
    # The true class's loss term (standard: the CE; integrated: the general BCE's positive
    # term; the refinement CE stays unweighted) weighs ((1 - f_c) / f_c) ** class_balance,
    # f_c the class's pixel share in the training split(s): 0 unweighted, 1 the prior odds
    # cancelled. None: the head's default, DEFAULT_CLASS_BALANCE. class_frequencies: None =
    # read from the shards' manifest.
    class_balance: float | None = None
    class_frequencies: list[float] | None = None

    def class_balance_for(self, classifier: str) -> float:
        """`class_balance`, or the head's default where it is unset."""
        if self.class_balance is not None:
            return self.class_balance
        return DEFAULT_CLASS_BALANCE[classifier]


@dataclass
class TrainConfig:
    global_batch_size: int = 16
    per_worker_batch_size: int | None = None  # micro-batch; None: global / workers
    amp: bool = True  # bf16 autocast, on GPU only
    channels_last: bool = False
    compile: bool = False
    fused_msca: bool = False  # fused Triton MSCA strip convs (segnext.fast); GPU speed unmeasured
    log_every: int = 50
    val_every: int = 2000
    checkpoint_every: int = 2000
    keep_best: int = 3
    seed: int = 0
    max_failures: int = 0
    time_budget_s: float | None = None
    fail_at_iteration: int | None = None  # test hook: one injected worker crash at this step


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop: list[int] | None = None  # slide window (height, width)
    stride: list[int] | None = None
    batch_size: int = 2  # per worker


@dataclass
class RayConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # GPUs each worker holds with use_gpu (None: 1); a fraction lets trials share a card
    gpus_per_worker: float | None = None
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    address: str | None = None  # None: join a running cluster if any, else start one
    # Elastic run: Ray Train may run with min_workers..num_workers workers, shrinking when one
    # is lost and growing back when resources return (checked every resize_interval_s); the
    # global batch and the batch plan stay the same (data.plan). None: fixed num_workers.
    min_workers: int | None = None
    resize_interval_s: float = 60.0
    # How long the run waits for its workers' resources before it gives up, saying what it
    # waited for (pipelines.train.start_wait): a cluster that can grow may still place them.
    start_timeout_s: float = 600.0


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite under runs/
    experiment: str = "segnext"


@dataclass
class RegistryConfig:
    name: str = "segnext"
    register: bool = True


@dataclass
class RunSection:
    name: str | None = None  # None: <config stem>-<timestamp>
    storage_path: str = "runs/ray"


@dataclass
class StorageConfig:
    # S3-compatible endpoint for s3:// data.root / run.storage_path (MinIO, moto, Ceph), e.g.
    # http://127.0.0.1:9000; None: $AWS_ENDPOINT_URL_S3 if set, else AWS S3 itself
    endpoint: str | None = None


@dataclass(frozen=True)
class Dimension:
    """One searched key's distribution, `{loguniform: [1.0e-4, 1.0e-2]}` in YAML; Ray Tune's
    domain is built from it in `tune.space` (reading a config must not need Ray)."""

    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # (low, high) for ranges, the options for choice/grid

    @classmethod
    def from_config(cls, raw: Any, key: str, source: str) -> Dimension:
        def fail(message: str) -> ConfigError:
            return ConfigError(f"{source}: {key} {message}")

        example = "e.g. {loguniform: [1.0e-4, 1.0e-2]}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise fail(f"must be one distribution ({', '.join(DISTRIBUTIONS)}), {example}")
        kind, args = next(iter(raw.items()))
        if kind not in DISTRIBUTIONS:
            close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(DISTRIBUTIONS)}"
            raise fail(f"has unknown distribution {kind!r}; {hint}")
        if not isinstance(args, list | tuple) or not args:
            raise fail(f"{kind} needs a non-empty list, {example}")
        if kind in ("choice", "grid"):
            return cls(kind, tuple(_yaml_float(value) for value in args))
        if len(args) != 2:
            raise fail(f"{kind} needs [low, high], got {list(args)!r}")
        if kind == "randint":
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
                raise fail(f"randint bounds must be integers, got {list(args)!r}")
            if args[0] >= args[1]:
                raise fail(f"randint needs low < high (high is excluded), got {list(args)!r}")
            return cls(kind, tuple(args))
        low, high = (_number(v) for v in args)
        if low is None or high is None or not low < high:
            raise fail(f"{kind} needs numbers low < high, got {list(args)!r}")
        if kind == "loguniform" and low <= 0:
            raise fail(f"loguniform needs 0 < low, got {list(args)!r}")
        return cls(kind, (float(low), float(high)))

    def to_config(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.values)}

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def extremes(self) -> list[Any]:
        """Values covering what the distribution can produce, to check against the config."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def describe(self) -> str:
        return f"{self.kind}({', '.join(repr(v) for v in self.values)})"


@dataclass
class AshaConfig:
    grace_period: int = 1  # validations a trial runs before it can be stopped
    reduction_factor: float = 2.0  # keep the top 1/reduction_factor at each rung


@dataclass
class WarmStartConfig:
    """`tune.warm_start`: every trial starts from these weights (as `model.init_from`)."""

    SHORTHAND: ClassVar[str] = "source"  # `warm_start: c.pt` means `warm_start: {from: c.pt}`
    # checkpoint path/folder, s3:// URI or models:/NAME@ALIAS; `from:` in YAML
    source: str = field(default="", metadata={"key": "from"})
    part: Literal["encoder", "model"] = "model"  # model: same classes; encoder: any classes
    if_missing: Literal["fail", "scratch"] = "fail"
    scratch: dict[str, Any] = field(default_factory=dict)  # overrides used only from scratch


@dataclass
class TuneConfig:
    """The `tune:` section, read by `segnext tune` only (`segnext train` ignores it):

    ```yaml
    tune:
      trials: 4                 # samples drawn from the space (x the size of any grid)
      max_concurrent: 2         # optional; capped to what the cluster fits
      search: random            # random | optuna
      asha: {grace_period: 1, reduction_factor: 2}   # in validations
      capacity: {GPU: 8, CPU: 64}   # optional: what an autoscaling cluster grows to
      warm_start: {from: models:/segnext-demo@champion, part: model}
      space:                    # dotted config key -> one distribution
        optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
        loss.weights.refine: {choice: [0.5, 1.0, 2.0]}
        train.seed: {randint: [0, 100]}              # high bound excluded
        optim.weight_decay: {grid: [0.0, 0.01]}      # every value, for each sample (random only)
    ```
    Each searched key must exist and accept every value its distribution can produce, so a
    typo fails here with the key's name instead of as a crashed trial minutes later.
    """

    space: dict[str, Dimension] = field(default_factory=dict)
    trials: int = 4
    max_concurrent: int | None = None
    search: Literal["random", "optuna"] = "random"
    seed: int = 0
    asha: AshaConfig = field(default_factory=AshaConfig)
    # Resources an autoscaling cluster can grow to (it reports only the nodes already up);
    # None: plan with what `ray.cluster_resources()` reports at start.
    capacity: dict[str, float] | None = None
    warm_start: WarmStartConfig | None = None
    # classes whose IoU the results picture plots (None: the best trial's most confused pairs)
    classes: list[str] | None = None

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values() if d.kind == "grid")

    @property
    def total_trials(self) -> int:
        return self.trials * self.grid_size


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tune: TuneConfig | None = None  # the search (`segnext tune`); None: no tune: section

    @property
    def micro_batch_size(self) -> int:
        """Images per worker per forward pass (the batch plan's micro-batch: `data.plan`)."""
        return self.train.per_worker_batch_size or (
            self.train.global_batch_size // self.ray.num_workers
        )


# ---------------------------------------------------------------------------------- numbers


def _number(value: Any) -> float | int | None:
    value = _yaml_float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _yaml_float(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.match(value) else value
