"""`segnext tune`: an ASHA hyper-parameter search in which every trial is a Ray Train run.

How a search runs:
- The driver validates the config and the search space, reads the shards' manifest and
  dry-builds the model (`pipelines.train.driver.prepare`), resolves `tune.warm_start` (the weights
  every trial starts from, or training from scratch when it is missing and allowed), then
  checks the resource plan: one trial needs `ray.num_workers` workers (`ray.gpus_per_worker`
  may be a fraction, so trials share a card) plus a read task and a tiny trial driver; a
  search that cannot place one trial fails here, and `max_concurrent` is capped to what the
  cluster holds at once. Only then does it create the MLflow parent run (and the store, before any worker).
- Each trial is a function trainable holding 0.01 CPU that calls `run_training` with Tune's
  `TuneReportCallback`: the Train workers (placed by Ray Train, on GPUs when `ray.use_gpu`)
  report `val/mIoU` and `iteration` at each validation, which Tune forwards to ASHA. Trials
  run in parallel across the cluster's workers, up to the planned concurrency.
- ASHA stops trials below the rung cutoff after `tune.asha.grace_period` validations. A trial
  whose training raises (divergence, a crashed worker beyond `train.max_failures`) is marked
  failed and the search goes on.
- Afterwards each trial's nested MLflow run gets its status tag (completed, stopped early,
  failed) and the parent run the results table (CSV + markdown) and a picture of val mIoU
  and the IoU of the confusing classes against each searched value. The best trial's best checkpoint is registered; the champion
  alias moves only when it beats the current champion.
- `--resume NAME` continues an interrupted search (`Tuner.restore`): finished trials are kept,
  unfinished ones continue from their last Train checkpoint, missing ones are started. ASHA's
  rung records start afresh after a restore (Tune does not save the scheduler's state).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.cluster import init_ray
from pipelines.config import ConfigError, ExperimentConfig, TuneConfig, to_flat_dict, with_overrides
from pipelines.metric_names import SCORE, class_iou_metric
from tune.space import load_search_config, param_space

TIME_ATTR = "iteration"  # the train iteration reported with each validation
TRIAL_DRIVER_CPU = 0.01  # the trial only waits on its Train run; 0 is rejected by Tune
MAX_ERROR_CHARS = 200
CONFUSED_PAIRS = 2  # the best trial's most confused pairs whose classes the picture plots
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)(\(\w+\))?: ")

COMPLETED, STOPPED, FAILED = "completed", "stopped early", "failed"
INTERRUPTED, PENDING = "interrupted", "not started"
MLFLOW_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED", INTERRUPTED: "KILLED"}

SEARCH_TAG = "segnext.tune.search"
TRIAL_TAG = "segnext.tune.trial_id"
STATUS_TAG = "segnext.tune.status"
ROLE_TAG = "segnext.tune.role"


class ResourcePlanError(ConfigError):
    """The cluster cannot hold even one trial."""


@dataclass
class TrialOutcome:
    trial_id: str
    run_name: str
    status: str
    params: dict[str, Any]
    best_val_miou: float | None = None
    iteration: int = 0  # last reported train iteration
    checkpoint: str | None = None  # the trial's best checkpoint still on disk
    checkpoint_miou: float | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    class_iou: dict[str, float] = field(default_factory=dict)  # at its best validation


@dataclass
class SearchSummary:
    name: str
    path: str  # the Tune experiment folder
    parent_run_id: str
    outcomes: list[TrialOutcome]
    interrupted: bool
    best: TrialOutcome | None = None
    registered_version: str | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="hyper-parameter search (Ray Tune + ASHA) over Ray Train runs, tracked in MLflow",
        description="Search the `tune.space` of a config with ASHA: each trial is a Ray Train "
        "run, a nested MLflow run under one parent run; the best checkpoint is registered. "
        "Overrides are dotted keys; tune.* keys change the search (tune.asha.grace_period=2).",
    )
    parser.add_argument("--config", required=True, help="YAML config with a tune: section")
    parser.add_argument("--trials", type=int, help="samples to draw (default: tune.trials)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="trials at once (default: tune.max_concurrent, else what fits)",
    )
    parser.add_argument("--search", choices=("random", "optuna"), help="default: tune.search")
    parser.add_argument("--resume", metavar="NAME", help="continue the interrupted search NAME")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: run failed trials again from their last checkpoint",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, parsed as YAML values"
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag, key in (
        ("trials", "trials"),
        ("max_concurrent", "max_concurrent"),
        ("search", "search"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"tune.{key}={getattr(args, flag)}")
    try:
        if args.retry_failed and not args.resume:
            raise ConfigError("--retry-failed only applies with --resume NAME")
        cfg, settings = load_search_config(args.config, overrides)
        name = (
            args.resume
            or cfg.run.name
            or (f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        )
        summary = run_search(
            cfg, settings, name=name, resume=bool(args.resume), retry_failed=args.retry_failed
        )
    except ConfigError as error:
        print(f"segnext tune: configuration error: {error}", file=sys.stderr)
        return 2
    finally:
        _shutdown_ray()  # workers' late log lines would otherwise interleave with the table
    resume = shlex.join(
        ["segnext", "tune", "--config", args.config, "--resume", name, *args.overrides]
    )
    print(format_summary(summary, settings, resume_command=resume))
    if summary.interrupted:
        return 130
    return 0 if summary.best is not None else 1


# ---------------------------------------------------------------------------------- API


def run_search(
    cfg: ExperimentConfig,
    settings: TuneConfig,
    *,
    name: str,
    resume: bool = False,
    retry_failed: bool = False,
    callbacks: list | None = None,
) -> SearchSummary:
    """Run (or continue) search `name`; `callbacks` are extra `ray.tune.Callback`s."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from pipelines.tracking import runs as tracking

    start = time.perf_counter()
    notes: list[str] = []
    prepared = resolve_warm_start(cfg, settings, notes)  # every config/data/model error now
    cfg = prepared.cfg
    _check_classes(settings, prepared.meta.class_names)
    storage = cfg.run.storage_path
    path = f"{storage}/{name}"
    if resume and not tune.Tuner.can_restore(path):
        raise ConfigError(
            f"--resume {name}: no search state in {path}; pass the name of a "
            f"search under run.storage_path ({storage})"
        )
    if not resume and Path(path).exists():
        raise ConfigError(
            f"search {name} already exists in {storage}; continue it with "
            f"--resume {name} or choose another run.name"
        )

    init_ray(cfg.ray.address)
    concurrency = _plan(cfg, settings, notes)  # a search that cannot run ends here
    # The MLflow store and experiment are created here, in the driver, before any worker.
    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.ensure_experiment(tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient(tracking_uri)
    parent_run_id = _open_parent_run(client, experiment_id, cfg, settings, name, resume=resume)
    try:
        tuner = _build_tuner(
            cfg,
            settings,
            name=name,
            parent_run_id=parent_run_id,
            concurrency=concurrency,
            resume=resume,
            retry_failed=retry_failed,
            callbacks=[search_progress(cfg.schedule.iterations, settings.total_trials),
                       *(callbacks or [])],
        )
        tuner.fit()
        outcomes = collect_outcomes(path, name=name, iterations=cfg.schedule.iterations)
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    interrupted = len(outcomes) < settings.total_trials or any(
        o.status in (INTERRUPTED, PENDING) for o in outcomes
    )
    summary = SearchSummary(
        name=name,
        path=path,
        parent_run_id=parent_run_id,
        outcomes=outcomes,
        interrupted=interrupted,
        notes=notes,
    )
    _record_trials(client, experiment_id, summary)
    summary.best = best_trial(outcomes)
    _record_class_iou(client, summary, settings)
    if not interrupted and summary.best is not None and cfg.registry.register:
        _register_best(summary, cfg, tracking_uri)
    summary.wall_s = time.perf_counter() - start
    _record_parent(client, summary, settings, cfg=cfg)
    return summary


def _register_best(summary: SearchSummary, cfg: ExperimentConfig, tracking_uri: str) -> None:
    """Register the best checkpoint; a registry failure is reported, not fatal: the search's
    results stay recorded and the checkpoint can be registered later (`segnext register`)."""
    from pipelines.tracking.registry import register_checkpoint

    best = summary.best
    try:
        version = register_checkpoint(
            best.checkpoint,
            run_id=best.mlflow_run_id,
            registry_name=cfg.registry.name,
            tracking_uri=tracking_uri,
        )
    except Exception as error:  # any registry error: keep the search results
        summary.notes.append(f"registering {best.checkpoint} failed: {error}")
        return
    summary.registered_version = str(version.version)


def trial_run_name(search: str, trial_id: str) -> str:
    """The Ray Train run (and MLflow run) name of one trial."""
    return f"{search}-{trial_id}"


def _run_trial(
    params: dict[str, Any],
    *,
    base: ExperimentConfig,
    search: str,
    storage_path: str,
    parent_run_id: str,
) -> None:
    """The function trainable: one Ray Train run whose reports Tune forwards to ASHA."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    # The search registers its best checkpoint once; trials must not register their own.
    cfg = with_overrides(base, {**params, "registry.register": False})
    run_training(
        cfg,
        run_name=trial_run_name(search, trial_id),
        storage_path=storage_path,
        callbacks=[TuneReportCallback()],
        mlflow_parent_run_id=parent_run_id,
        mlflow_run_tags={SEARCH_TAG: search, TRIAL_TAG: trial_id, ROLE_TAG: "trial"},
    )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------- planning


def resolve_warm_start(cfg: ExperimentConfig, settings: TuneConfig, notes: list[str]):
    """The `Prepared` config every trial starts from (absolute paths, `model.init_from` resolved):
    `tune.warm_start`'s weights when its source exists; with `if_missing: scratch` a missing
    source means training from scratch with the `scratch` overrides. The choice is printed."""
    from pipelines.train.driver import prepare
    from pipelines.train.initial_weights import WarmStartMissing

    cfg = dataclasses.replace(cfg, tune=None)  # trials run the config without the search
    warm = settings.warm_start
    if warm is None:
        return prepare(cfg)
    try:
        chosen = prepare(
            with_overrides(cfg, {"model.init_from": warm.source, "model.init_part": warm.part})
        )
        line = f"warm start: every trial starts from the {warm.part} of {warm.source}"
        line += _checkpoint_summary(chosen.cfg.model.init_from)
    except WarmStartMissing as error:
        if warm.if_missing == "fail":
            raise ConfigError(
                f"tune.warm_start: {error} (or set tune.warm_start.if_missing: scratch)"
            ) from None
        chosen = prepare(with_overrides(cfg, warm.scratch))
        extra = ", ".join(f"{key}={value}" for key, value in warm.scratch.items())
        line = f"warm start: {warm.source} not found; training from scratch" + (
            f" ({extra})" if extra else ""
        )
    print(f"[segnext tune] {line}", flush=True)
    notes.append(line)
    return chosen


def _checkpoint_summary(path: str) -> str:
    """` (iteration 800, val/mIoU 0.8123)` of a local checkpoint: which model the trials start
    from, so a stale champion shows; empty for a remote one (not downloaded twice)."""
    from pipelines import storage
    from pipelines.checkpoint_io import load_checkpoint

    if storage.is_remote(path):
        return ""
    payload = load_checkpoint(path)
    score = (payload.get("metrics") or {}).get(SCORE)
    scored = "" if score is None else f", {SCORE} {float(score):.4f}"
    return f" (iteration {payload.get('iteration', '?')}{scored})"


def _check_classes(settings: TuneConfig, names: Sequence[str]) -> None:
    names = list(names)
    unknown = [name for name in settings.classes or [] if name not in names]
    if unknown:
        raise ConfigError(
            f"tune.classes: {unknown} are not classes of the shards; choose from {names}"
        )


def trial_demand(cfg: ExperimentConfig) -> dict[str, float]:
    """Resources one trial holds: its Train workers, one data read task, the trial driver."""
    from pipelines.train.driver import worker_resources

    worker = worker_resources(cfg)
    demand = {key: value * cfg.ray.num_workers for key, value in worker.items() if value > 0}
    demand["CPU"] = demand.get("CPU", 0.0) + cfg.data.read_cpus + TRIAL_DRIVER_CPU
    return demand


def plan_concurrency(
    demand: dict[str, float],
    cluster: dict[str, float],
    requested: int | None,
    total: int,
    *,
    worker: tuple[int, dict[str, float]] | None = None,
    nodes: list[dict[str, float]] | None = None,
) -> int:
    """Trials that fit at once (<= requested and total); ResourcePlanError when none does.

    `worker` = (workers per trial, one worker's resources): Ray places each worker's bundle on
    one node and never splits its GPU fraction across cards, so the workers that fit are
    counted node by node (`nodes`, each node's resources; None: the cluster as one node): a card
    holds floor(1 / fraction) fractional workers (two cards hold four 0.4-GPU workers, not
    five, although 5 x 0.4 = 2), and a 2-GPU worker needs a node with 2 GPUs.
    """
    fits = min(math.floor(cluster.get(key, 0.0) / need + 1e-9) for key, need in demand.items())
    packing = ""
    if worker is not None:
        count, resources = worker
        slots = worker_slots(resources, nodes if nodes is not None else [cluster])
        fits = min(fits, slots // count)
        where = f"{len(nodes)} node(s)" if nodes is not None else "the cluster"
        packing = (
            f"; one worker needs {_format_resources(resources)} on one node"
            + (", its GPU fraction on one card" if 0 < resources.get("GPU", 1.0) < 1 else "")
            + f": {where} hold {slots} such worker(s), a trial needs {count}"
        )
    if fits < 1:
        short = ", ".join(
            f"{key} {need:g} (cluster: {cluster.get(key, 0.0):g})"
            for key, need in demand.items()
            if cluster.get(key, 0.0) < need
        )
        raise ResourcePlanError(
            f"one trial needs {_format_resources(demand)} but the cluster cannot hold it: "
            f"short of {short or 'room on a single node or card'}{packing}. Lower "
            "ray.num_workers, ray.cpus_per_worker, ray.gpus_per_worker or "
            "ray.resources_per_worker, set ray.use_gpu=false, add nodes, or (autoscaling "
            "cluster) set tune.capacity to what it grows to"
        )
    return min(fits, requested or fits, total)


def worker_slots(worker: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers of `worker` resources Ray can place at once on `nodes`."""
    slots = 0
    for node in nodes:
        counts = []
        for key, need in worker.items():
            if need <= 0:
                continue
            have = node.get(key, 0.0)
            if key == "GPU" and need < 1:  # a fraction lives on one card
                counts.append(math.floor(have + 1e-9) * math.floor(1 / need + 1e-9))
            else:
                counts.append(math.floor(have / need + 1e-9))
        slots += min(counts, default=0)
    return slots


def plan_search(
    cfg: ExperimentConfig,
    settings: TuneConfig,
    cluster: dict[str, float],
    nodes: list[dict[str, float]] | None = None,
) -> tuple[int, list[str]]:
    """(trials at once, the plan's lines) for a cluster of `cluster` resources in all and, when
    known, `nodes` (each node's resources). With `tune.capacity` the nodes to come are unknown:
    the cluster is planned as one node of that size."""
    from pipelines.train.driver import worker_resources

    demand = trial_demand(cfg)
    cluster = dict(cluster)
    for key, value in (settings.capacity or {}).items():
        cluster[key] = max(cluster.get(key, 0.0), value)
    if settings.capacity:
        nodes = None
    worker = worker_resources(cfg)
    concurrency = plan_concurrency(
        demand,
        cluster,
        settings.max_concurrent,
        settings.total_trials,
        worker=(cfg.ray.num_workers, worker),
        nodes=nodes,
    )
    plan = [
        f"plan: {settings.total_trials} trials, each {cfg.ray.num_workers} worker(s), "
        f"{_format_resources(demand)} per trial; cluster {_format_resources(cluster, demand)}"
        + (f" on {len(nodes)} node(s)" if nodes is not None else "")
        + f"; {concurrency} at once"
    ]
    fraction = worker.get("GPU", 1.0) if cfg.ray.use_gpu else 1.0
    if fraction < 1:
        plan.append(
            f"{fraction:g} GPU per worker: up to {math.floor(1 / fraction + 1e-9)} "
            "trials' workers share each GPU"
        )
    if settings.max_concurrent and concurrency < settings.max_concurrent:
        plan.append(
            f"max_concurrent {settings.max_concurrent} capped to {concurrency}: "
            "the cluster holds no more trials at once"
        )
    return concurrency, plan


def _plan(cfg: ExperimentConfig, settings: TuneConfig, notes: list[str]) -> int:
    import ray

    cluster = {key: float(value) for key, value in ray.cluster_resources().items()}
    nodes = [
        {key: float(value) for key, value in node["Resources"].items()}
        for node in ray.nodes()
        if node["Alive"]
    ]
    concurrency, plan = plan_search(cfg, settings, cluster, nodes)
    for line in plan:
        print(f"[segnext tune] {line}", flush=True)
    notes.extend(plan)
    return concurrency


def _format_resources(resources: dict[str, float], keys: dict | None = None) -> str:
    shown = keys if keys is not None else resources
    return "{" + ", ".join(f"{key}: {resources.get(key, 0.0):g}" for key in shown) + "}"


def _shutdown_ray() -> None:
    """Disconnect (and stop a cluster this process started); a no-op without Ray."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def search_progress(iterations: int, total: int = 0):
    """A `SearchProgress` Tune callback (defined here so that importing this module needs no
    Ray). `total`: the trials the search will run (Tune creates them as slots free up)."""
    from ray import tune

    class SearchProgress(tune.Callback):
        """One status line as trials start, report and end: how many run, finished, were
        stopped early by the scheduler or failed, and the best score so far (on a terminal
        the console shows it as a live line, see pipelines.console)."""

        def __init__(self, iterations: int, total: int) -> None:
            self.iterations = iterations
            self.total = total
            self.best: tuple[float, str] | None = None
            self.last_line = ""

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            score = result.get(SCORE)
            if score is not None and (self.best is None or score > self.best[0]):
                self.best = (float(score), trial.trial_id)
            self._show(trials)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._show(trials)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._show(trials)

        def _show(self, trials) -> None:
            line = self.line(trials)
            if line != self.last_line:
                print(line, flush=True)
                self.last_line = line

        def line(self, trials) -> str:
            running = sum(t.status == "RUNNING" for t in trials)
            failed = sum(t.status == "ERROR" for t in trials)
            ended = [t for t in trials if t.status == "TERMINATED"]
            stopped = sum(
                int((t.last_result or {}).get("iteration", 0)) < self.iterations for t in ended
            )
            best = "n/a" if self.best is None else f"{self.best[0]:.4f} ({self.best[1]})"
            return (
                f"[segnext tune] trials: {running} running, {len(ended) - stopped} done, "
                f"{stopped} stopped early, {failed} failed of {max(self.total, len(trials))}; best {SCORE} {best}"
            )

    return SearchProgress(iterations, total)


def _build_tuner(
    cfg: ExperimentConfig,
    settings: TuneConfig,
    *,
    name: str,
    parent_run_id: str,
    concurrency: int,
    resume: bool,
    retry_failed: bool,
    callbacks: list,
):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    storage = cfg.run.storage_path
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            base=cfg,
            search=name,
            storage_path=f"{storage}/{name}/train",
            parent_run_id=parent_run_id,
        ),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    if resume:
        return tune.Tuner.restore(
            f"{storage}/{name}", trainable, resume_errored=retry_failed, restart_errored=False
        )
    scheduler = ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=cfg.schedule.iterations,
        grace_period=settings.asha.grace_period * cfg.train.val_every,
        reduction_factor=settings.asha.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(settings),
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode="max",
            num_samples=settings.trials,
            search_alg=_search_algorithm(settings, concurrency),
            scheduler=scheduler,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=0),  # a failed trial stays failed
            callbacks=callbacks,
            verbose=1,
        ),
    )


def _search_algorithm(settings: TuneConfig, concurrency: int):
    """Random or Optuna search, limited to `concurrency` live trials.

    (`TuneConfig.max_concurrent_trials` is ignored for the random generator, so each search
    algorithm gets its own limit here.)
    """
    if settings.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency)


# ---------------------------------------------------------------------------------- outcomes


def collect_outcomes(path: str, *, name: str, iterations: int) -> list[TrialOutcome]:
    """Every trial of the search at `path`, with its status, best score and best checkpoint."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    analysis = ExperimentAnalysis(path)
    outcomes = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = analysis.trial_dataframes.get(trial.trial_id)
        rows = [] if frame is None or SCORE not in frame else frame.to_dict("records")
        scores = [row[SCORE] for row in rows if _finite(row.get(SCORE))]
        iteration = max(
            (int(row[TIME_ATTR]) for row in rows if _finite(row.get(TIME_ATTR))), default=0
        )
        if trial.status == Trial.ERROR:
            status = FAILED
        elif trial.status == Trial.TERMINATED:
            status = COMPLETED if iteration >= iterations else STOPPED
        else:
            status = INTERRUPTED if rows else PENDING
        checkpoint, checkpoint_miou = _best_checkpoint(rows)
        outcomes.append(
            TrialOutcome(
                trial_id=trial.trial_id,
                run_name=trial_run_name(name, trial.trial_id),
                status=status,
                params=dict(trial.config),
                best_val_miou=max(scores) if scores else None,
                iteration=iteration,
                checkpoint=checkpoint,
                checkpoint_miou=checkpoint_miou,
                error=_error_line(trial) if status == FAILED else None,
            )
        )
    return outcomes


def best_trial(outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    """The finished (completed or stopped) trial with the best checkpointed val mIoU."""
    candidates = [o for o in outcomes if o.status in (COMPLETED, STOPPED) and o.checkpoint]
    return max(candidates, key=lambda o: o.checkpoint_miou, default=None)


def _best_checkpoint(rows: list[dict[str, Any]]) -> tuple[str | None, float | None]:
    """Train keeps the best checkpoints by val mIoU; pick the best one still on disk."""
    saved = [
        row
        for row in rows
        if isinstance(row.get("checkpoint_path"), str)
        and _finite(row.get(SCORE))
        and _may_exist(row["checkpoint_path"])
    ]
    if not saved:
        return None, None
    row = max(saved, key=lambda r: r[SCORE])
    return row["checkpoint_path"], float(row[SCORE])


def _may_exist(path: str) -> bool:
    """Local checkpoints are checked (Train deletes all but the best K); remote ones trusted."""
    return "://" in path or Path(path).is_dir()


def _error_line(trial: Any) -> str:
    """The root exception line of a failed trial, e.g. `FloatingPointError: loss is nan`.

    Tune wraps the Train error (`WorkerGroupError` holds each rank's exception) in Ray task
    errors; the user's exception is the last line naming an exception outside `ray.*`.
    """
    error = trial.get_pickled_error() or trial.get_error()
    if error is None:
        return "unknown error"
    failures = getattr(getattr(error, "cause", error), "worker_failures", None)
    root = failures[min(failures)] if failures else error
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    own = [line for line in raised if not line.startswith("ray.")]
    if own:
        line = own[-1]
    elif not type(root).__module__.startswith("ray."):  # the user's exception itself
        line = f"{type(root).__name__}: {lines[0] if lines else ''}"
    else:
        line = (raised or [type(root).__name__])[-1]
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# ---------------------------------------------------------------------------------- MLflow


def _open_parent_run(client, experiment_id, cfg, settings, name: str, *, resume: bool) -> str:
    """The search's parent run: found again on --resume, else created with the search params."""
    from pipelines.tracking import runs as tracking

    opening = search_description(cfg, settings, name)
    if resume:
        run_id = tracking.find_run(client, experiment_id, name)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            tracking.set_description(client, run_id, opening + "\n\nResumed (`--resume`).")
            return run_id
    run_id = tracking.start_run(
        client,
        experiment_id,
        ray_run_name=name,
        tags={
            SEARCH_TAG: name,
            ROLE_TAG: "search",
            "mlflow.source.git.commit": tracking.git_commit(),
            tracking.DESCRIPTION_TAG: opening,
        },
    )
    searched = set(settings.space)
    params = {
        key: value
        for key, value in to_flat_dict(cfg).items()
        if key not in searched and key != "tune"  # the search's settings are logged below
    }
    params.update(
        {
            "tune.trials": settings.trials,
            "tune.search": settings.search,
            "tune.seed": settings.seed,
            "tune.max_concurrent": settings.max_concurrent,
            "tune.asha.grace_period": settings.asha.grace_period,
            "tune.asha.reduction_factor": settings.asha.reduction_factor,
            **{f"tune.space.{key}": dim.describe() for key, dim in settings.space.items()},
        }
    )
    tracking.log_params(client, run_id, params)
    return run_id


def _record_trials(client, experiment_id: str, summary: SearchSummary) -> None:
    """Status tag and end state on each trial's nested run (created here if the trial died
    before opening one)."""
    from pipelines.tracking import runs as tracking

    for outcome in summary.outcomes:
        if outcome.status == PENDING:
            continue
        run_id = tracking.find_run(client, experiment_id, outcome.run_name)
        if run_id is None:
            run_id = tracking.start_run(
                client,
                experiment_id,
                ray_run_name=outcome.run_name,
                tags={SEARCH_TAG: summary.name, TRIAL_TAG: outcome.trial_id, ROLE_TAG: "trial"},
                parent_run_id=summary.parent_run_id,
            )
            tracking.log_params(client, run_id, outcome.params)
        tags = {STATUS_TAG: outcome.status}
        if outcome.error:
            tags["segnext.tune.error"] = outcome.error
        tracking.set_tags(client, run_id, tags)
        if outcome.best_val_miou is not None:
            client.log_metric(run_id, "tune/best_val_mIoU", outcome.best_val_miou)
        client.set_terminated(run_id, status=MLFLOW_STATUS[outcome.status])
        outcome.mlflow_run_id = run_id


def _record_class_iou(client, summary: SearchSummary, settings: TuneConfig) -> None:
    """Each trial's IoU of the confusing classes at its best validation, read from its MLflow
    run: `tune.classes`, else the classes of the best trial's most confused pairs."""
    import json

    best_steps = {}
    for outcome in summary.outcomes:
        history = (
            []
            if outcome.mlflow_run_id is None
            else client.get_metric_history(outcome.mlflow_run_id, SCORE)
        )
        scored = [m for m in history if math.isfinite(m.value)]
        if scored:
            best_steps[outcome.trial_id] = max(scored, key=lambda m: m.value).step
    classes = list(settings.classes or [])
    best = summary.best
    if not classes and best is not None and best.trial_id in best_steps:
        artifact = f"validation/step_{best_steps[best.trial_id]:07d}/metrics.json"
        try:
            local = client.download_artifacts(best.mlflow_run_id, artifact)
            pairs = json.loads(Path(local).read_text())["confused_pairs"][:CONFUSED_PAIRS]
        except Exception as error:  # no artifact store reachable: the picture shows mIoU only
            summary.notes.append(f"confusing pairs unavailable ({artifact}: {error})")
            pairs = []
        for pair in pairs:
            classes += [name for name in (pair["true"], pair["pred"]) if name not in classes]
        if pairs:
            summary.notes.append(
                f"confusing pairs of the best trial {best.trial_id} (true -> predicted): "
                + ", ".join(
                    f"{p['true']} -> {p['pred']} ({100 * p['fraction']:.1f}% of {p['true']})"
                    for p in pairs
                )
            )
    for outcome in summary.outcomes:
        step = best_steps.get(outcome.trial_id)
        if step is None:
            continue
        for name in classes:
            history = client.get_metric_history(
                outcome.mlflow_run_id, class_iou_metric(name)
            )
            values = [m.value for m in history if m.step == step]
            if values and math.isfinite(values[-1]):
                outcome.class_iou[name] = values[-1]


def search_description(cfg: ExperimentConfig, settings: TuneConfig, name: str) -> str:
    """The parent run's Description while the search runs: what is searched, over what."""
    at_once = "" if settings.max_concurrent is None else f", at most {settings.max_concurrent} at once"
    lines = [
        f"**Hyper-parameter search `{name}`**: {settings.total_trials} trials ({settings.search} "
        f"sampling, ASHA: grace period {settings.asha.grace_period} validation(s), reduction "
        f"factor {settings.asha.reduction_factor:g}){at_once}. Each trial is a Ray Train run "
        "nested under this run.",
        "",
        "Searched:",
        *(f"- `{key}`: {dim.describe()}" for key, dim in settings.space.items()),
        "",
        f"Every trial: SegNeXt-{cfg.model.variant}, {cfg.model.classifier} classifier, "
        f"{cfg.schedule.iterations} iterations on `{cfg.data.root}` "
        f"({', '.join(cfg.data.train_splits)} -> {cfg.data.val_split}), "
        f"{cfg.ray.num_workers} {'GPU' if cfg.ray.use_gpu else 'CPU'} worker(s)"
        + (f", starting from `{cfg.model.init_from}`." if cfg.model.init_from else "."),
    ]
    return "\n".join(lines)


def search_result_description(opening: str, summary: SearchSummary, cfg: ExperimentConfig) -> str:
    """`opening` plus the trials' outcome, the best trial and the commands that use it."""
    from pipelines.tracking import runs as tracking

    counts = ", ".join(
        f"{sum(o.status == status for o in summary.outcomes)} {status}"
        for status in (COMPLETED, STOPPED, FAILED)
    )
    state = "interrupted" if summary.interrupted else "finished"
    lines = [opening.split("\n### ")[0].rstrip(), "", "### Result", "",
             f"- {state} in {summary.wall_s / 60:.1f} min: {counts} (table: `tune/results.md`)"]
    best = summary.best
    if best is None:
        lines.append("- No completed or stopped trial left a scored checkpoint: nothing to register.")
        return "\n".join(lines)
    values = ", ".join(f"`{key}`={_cell(value)}" for key, value in best.params.items())
    lines.append(f"- Best trial `{best.trial_id}`: val mIoU **{best.checkpoint_miou:.4f}** "
                 f"with {values}; checkpoint `{best.checkpoint}`")
    model = best.checkpoint
    if summary.registered_version is not None:
        model = f"models:/{cfg.registry.name}/{summary.registered_version}"
        lines.append(f"- Registered model: `{model}`")
    lines += tracking.next_commands(
        model, data_root=cfg.data.root, val_split=cfg.data.val_split,
        tracking_uri=tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    return "\n".join(lines)


def _record_parent(client, summary: SearchSummary, settings: TuneConfig, *,
                   cfg: ExperimentConfig) -> None:
    from pipelines.tracking import runs as tracking

    run_id = summary.parent_run_id
    counts = {
        status: sum(o.status == status for o in summary.outcomes)
        for status in (COMPLETED, STOPPED, FAILED)
    }
    for status, count in counts.items():
        client.log_metric(run_id, f"trials/{status.replace(' ', '_')}", count)
    client.log_metric(run_id, "search/wall_s", summary.wall_s)
    tags = {STATUS_TAG: INTERRUPTED if summary.interrupted else COMPLETED}
    if summary.best is not None:
        client.log_metric(run_id, "best/val_mIoU", summary.best.checkpoint_miou)
        tags.update(
            {"best_trial": summary.best.trial_id, "best_checkpoint": summary.best.checkpoint}
        )
    if summary.registered_version is not None:
        tags["registered_version"] = summary.registered_version
    tracking.set_tags(client, run_id, tags)
    tracking.set_description(client, run_id, search_result_description(
        tracking.description(client, run_id), summary, cfg))
    client.log_text(run_id, results_csv(summary.outcomes, settings), "tune/results.csv")
    client.log_text(run_id, results_markdown(summary.outcomes, settings), "tune/results.md")
    figure = params_figure(summary.outcomes, settings)
    client.log_figure(run_id, figure, "tune/val_mIoU_vs_params.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    client.set_terminated(run_id, status="KILLED" if summary.interrupted else "FINISHED")


# ---------------------------------------------------------------------------------- reports


def _columns(settings: TuneConfig, outcomes: list[TrialOutcome]) -> list[str]:
    keys = list(settings.space)
    for outcome in outcomes:  # a resumed search may carry keys the YAML no longer has
        keys += [key for key in outcome.params if key not in keys]
    return keys


def _ranked(outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    return sorted(
        outcomes,
        key=lambda o: -math.inf if o.best_val_miou is None else o.best_val_miou,
        reverse=True,
    )


def _class_names(outcomes: list[TrialOutcome]) -> list[str]:
    names: list[str] = []
    for outcome in outcomes:
        names += [name for name in outcome.class_iou if name not in names]
    return names


def results_csv(outcomes: list[TrialOutcome], settings: TuneConfig) -> str:
    keys, classes = _columns(settings, outcomes), _class_names(outcomes)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "trial",
            "status",
            *keys,
            "best_val_mIoU",
            *(f"IoU_{c}" for c in classes),
            "iteration",
            "checkpoint",
            "error",
        ]
    )
    for o in _ranked(outcomes):
        writer.writerow(
            [
                o.trial_id,
                o.status,
                *(o.params.get(k, "") for k in keys),
                "" if o.best_val_miou is None else f"{o.best_val_miou:.6f}",
                *(f"{o.class_iou[c]:.6f}" if c in o.class_iou else "" for c in classes),
                o.iteration,
                o.checkpoint or "",
                o.error or "",
            ]
        )
    return buffer.getvalue()


def results_markdown(outcomes: list[TrialOutcome], settings: TuneConfig) -> str:
    keys, classes = _columns(settings, outcomes), _class_names(outcomes)
    header = [
        "trial",
        "status",
        *keys,
        "best val mIoU",
        *(f"IoU {c}" for c in classes),
        "iteration",
        "error",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for o in _ranked(outcomes):
        cells = [
            o.trial_id,
            o.status,
            *(_cell(o.params.get(k, "")) for k in keys),
            "-" if o.best_val_miou is None else f"{o.best_val_miou:.4f}",
            *(f"{o.class_iou[c]:.4f}" if c in o.class_iou else "-" for c in classes),
            str(o.iteration),
            (o.error or "").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_figure(outcomes: list[TrialOutcome], settings: TuneConfig):
    """Which weights help the confusing classes: one column per searched key, one row for the
    best val mIoU and one per confusing class (its IoU at the trial's best validation), each
    point a trial against its value, coloured by status (failed trials sit at 0 as crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, classes = _columns(settings, outcomes), _class_names(outcomes)
    rows: list[tuple[str, Any]] = [("best val mIoU", lambda o: o.best_val_miou)]
    rows += [(f"IoU {name}", lambda o, name=name: o.class_iou.get(name)) for name in classes]
    colors = {
        COMPLETED: "tab:green",
        STOPPED: "tab:orange",
        FAILED: "tab:red",
        INTERRUPTED: "tab:gray",
    }
    fig, axes = plt.subplots(
        len(rows), len(keys), figsize=(4 * len(keys), 3.0 * len(rows)), squeeze=False
    )
    for column, key in enumerate(keys):
        shown = [o for o in outcomes if key in o.params and o.status in colors]
        values = [o.params[key] for o in shown]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        dim = settings.space.get(key)
        for row, (label, score) in enumerate(rows):
            ax = axes[row][column]
            for status, color in colors.items():
                points = [
                    (
                        o.params[key] if numeric else labels.index(str(o.params[key])),
                        score(o) if score(o) is not None else 0.0,
                    )
                    for o in shown
                    if o.status == status and (row == 0 or score(o) is not None)
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    marker = "x" if status == FAILED else "o"
                    ax.scatter(xs, ys, c=color, label=status, marker=marker)
            if numeric and dim is not None and dim.log_scale:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            ax.set_xlabel(key)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = "val mIoU per trial against each searched value"
    if classes:
        title = f"val mIoU and the IoU of the confusing classes ({', '.join(classes)}) per trial"
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def format_summary(summary: SearchSummary, settings: TuneConfig, *, resume_command: str) -> str:
    lines = [
        f"search {summary.name}: {len(summary.outcomes)} trial(s) in {summary.wall_s:.0f}s",
        *summary.notes,
        "",
        results_markdown(summary.outcomes, settings),
    ]
    if summary.best is not None:
        lines.append(
            f"best trial   {summary.best.trial_id}: val mIoU "
            f"{summary.best.checkpoint_miou:.4f} ({summary.best.checkpoint})"
        )
    if summary.registered_version is not None:
        lines.append(f"registered   version {summary.registered_version}")
    lines += [f"Tune folder  {summary.path}", f"MLflow run   {summary.parent_run_id} (parent)"]
    if summary.interrupted:
        lines.append(f"interrupted; continue with:  {resume_command}")
    elif summary.best is None:
        lines.append("no trial finished: see the error column")
    return "\n".join(lines)
