"""Running a search: an ASHA hyper-parameter search in which every trial is a Ray Train run.

How a search runs (`run_search`):
- `resolve_search` settles the config before Ray starts: it validates the search space, reads
  the shards' manifest and dry-builds the model (`pipelines.train.resolve.resolve`), resolves
  `tune.warm_start` (the weights every trial starts from, or training from scratch when it is
  missing and allowed) and checks the search folder. Then the resource plan (`tune.plan`): a
  search that cannot place one trial fails here, and `max_concurrent` is capped to what the
  cluster holds at once. Only then is the MLflow parent run created (and the store, before any
  worker; `pipelines.tracking.search` keeps all MLflow bookkeeping).
- Each trial is a function trainable holding 0.01 CPU that calls `run_training` with Tune's
  `TuneReportCallback`: the Train workers (placed by Ray Train, on GPUs when `ray.use_gpu`)
  report `val/mIoU` and `iteration` at each validation, which Tune forwards to ASHA. Trials
  run in parallel across the cluster's workers, up to the planned concurrency.
- ASHA stops trials below the rung cutoff after `tune.asha.grace_period` validations. A trial
  whose training raises (divergence, a crashed worker beyond `train.max_failures`) is marked
  failed and the search goes on.
- Afterwards each trial's nested MLflow run gets its status tag (completed, stopped early,
  failed) and the parent run the results table (CSV + markdown) and a picture of val mIoU
  and the IoU of the confusing classes against each searched value (`tune.report`). The best
  trial's best checkpoint is registered; the champion alias moves only when it beats the
  current champion.
- `--resume NAME` continues an interrupted search (`Tuner.restore`): finished trials are kept,
  unfinished ones continue from their last Train checkpoint, missing ones are started. ASHA's
  rung records start afresh after a restore (Tune does not save the scheduler's state).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from data import storage
from pipelines.checkpoint_io import load_checkpoint
from pipelines.cluster import init_ray
from pipelines.config import ConfigError, ExperimentConfig, TuneConfig, with_overrides
from pipelines.console import ray_output_on_main_thread
from pipelines.metric_names import SCORE
from pipelines.tracking.search import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    PENDING,
    ROLE_TAG,
    SEARCH_TAG,
    STOPPED,
    TRIAL_TAG,
    SearchSummary,
    TrialOutcome,
    connect,
    fail_parent_run,
    open_parent_run,
    record_class_iou,
    record_parent,
    record_trials,
    register_best,
)
from pipelines.train import driver
from pipelines.train.initial_weights import WarmStartMissing
from pipelines.train.resolve import ResolvedRun, check_run_name, resolve
from pipelines.train.start_wait import bounded_start
from tune.plan import TRIAL_DRIVER_CPU, _plan
from tune.report import (
    close_figure,
    params_figure,
    results_csv,
    results_markdown,
    search_description,
    search_result_description,
)
from tune.space import param_space

TIME_ATTR = "iteration"  # the train iteration reported with each validation
MAX_ERROR_CHARS = 200
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)(\(\w+\))?: ")


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
    start = time.perf_counter()
    notes: list[str] = []
    prepared, path = resolve_search(cfg, settings, name=name, resume=resume, notes=notes)
    cfg = prepared.cfg

    init_ray(cfg.ray.address)
    concurrency = _plan(cfg, settings, notes)  # a search that cannot run ends here
    client, tracking_uri, experiment_id = connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    parent_run_id = _open_parent_run(client, experiment_id, cfg, settings, name, resume=resume)
    try:
        tuner = _build_tuner(
            prepared,
            settings,
            name=name,
            parent_run_id=parent_run_id,
            concurrency=concurrency,
            resume=resume,
            retry_failed=retry_failed,
            callbacks=[search_progress(cfg.schedule.iterations, settings.total_trials),
                       *(callbacks or [])],
        )
        # Tune's trial table: to the log, not the terminal. On a cluster that can grow
        # (tune.capacity) trials may wait for nodes: announced, and bounded by
        # ray.start_timeout_s until the first trial's workers are up.
        with ray_output_on_main_thread(), bounded_start(
                cfg.ray.min_workers or cfg.ray.num_workers, driver.worker_resources(cfg),
                cfg.ray.start_timeout_s):
            tuner.fit()
        outcomes = collect_outcomes(path, name=name, iterations=cfg.schedule.iterations)
    except BaseException:
        fail_parent_run(client, parent_run_id)
        raise
    finally:
        prepared.stream.remove_cache()  # the trials' shared shard cache
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
    record_trials(client, experiment_id, summary)
    summary.best = best_trial(outcomes)
    record_class_iou(client, summary, settings)
    if not interrupted and summary.best is not None and cfg.registry.register:
        register_best(summary, registry_name=cfg.registry.name, tracking_uri=tracking_uri)
    summary.wall_s = time.perf_counter() - start
    _record_parent(client, summary, settings, cfg=cfg)
    return summary


# ---------------------------------------------------------------------------------- config


def resolve_search(
    cfg: ExperimentConfig, settings: TuneConfig, *, name: str, resume: bool, notes: list[str]
) -> tuple[ResolvedRun, str]:
    """(the resolved run every trial starts from, the search's Tune folder): everything
    the search settles about its config before Ray starts, so every config, data and model
    error stops it here. This is the one place where the search resolves its config:

    - `resolve_warm_start`: `pipelines.train.resolve.resolve` (absolute paths, the storage
      endpoint, the shards' manifest, splits, class frequencies, a dry build, the ModelMeta)
      and `tune.warm_start`'s source (`model.init_from`, registered models fetched);
    - `tune.classes` against the shards' classes;
    - the search folder `run.storage_path/NAME`: it must hold a search for `--resume`, and
      must not exist otherwise.

    (Each trial then derives its own run from it with its params, `_run_trial`: the manifest
    and the sample index are not read again.)
    """
    check_run_name(name)  # `--resume ../x` too: a search is one folder under run.storage_path
    prepared = resolve_warm_start(cfg, settings, notes)
    _check_classes(settings, prepared.meta.class_names)
    storage_path = prepared.cfg.run.storage_path
    path = f"{storage_path}/{name}"
    if resume and not tune.Tuner.can_restore(path):
        raise ConfigError(
            f"--resume {name}: no search state in {path}; pass the name of a "
            f"search under run.storage_path ({storage_path})"
        )
    if not resume and Path(path).exists():
        raise ConfigError(
            f"search {name} already exists in {storage_path}; continue it with "
            f"--resume {name} or choose another run.name"
        )
    return prepared, path


def resolve_warm_start(
    cfg: ExperimentConfig, settings: TuneConfig, notes: list[str]
) -> ResolvedRun:
    """The resolved run every trial starts from (absolute paths, `model.init_from` resolved):
    `tune.warm_start`'s weights when its source exists; with `if_missing: scratch` a missing
    source means training from scratch with the `scratch` overrides. The choice is printed."""
    cfg = dataclasses.replace(cfg, tune=None)  # trials run the config without the search
    warm = settings.warm_start
    if warm is None:
        return resolve(cfg)
    try:
        chosen = resolve(
            with_overrides(cfg, {"model.init_from": warm.source, "model.init_part": warm.part})
        )
        line = f"warm start: every trial starts from the {warm.part} of {warm.source}"
        line += _checkpoint_summary(chosen.cfg.model.init_from)
    except WarmStartMissing as error:
        if warm.if_missing == "fail":
            raise ConfigError(
                f"tune.warm_start: {error} (or set tune.warm_start.if_missing: scratch)"
            ) from None
        chosen = resolve(with_overrides(cfg, warm.scratch))
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


# ---------------------------------------------------------------------------------- trials


def trial_run_name(search: str, trial_id: str) -> str:
    """The Ray Train run (and MLflow run) name of one trial."""
    return f"{search}-{trial_id}"


def _run_trial(
    params: dict[str, Any],
    *,
    base: ResolvedRun,
    search: str,
    storage_path: str,
    parent_run_id: str,
) -> None:
    """The function trainable: one Ray Train run whose reports Tune forwards to ASHA.

    `base` is the search's resolved run: a trial re-derives only what its params touch
    (`ResolvedRun.with_overrides`), never re-reads the manifest or re-indexes the shards."""
    trial_id = tune.get_context().get_trial_id()
    # The search registers its best checkpoint once; trials must not register their own.
    overrides = {**params, "registry.register": False, "run.storage_path": storage_path}
    driver.run_training(
        base.with_overrides(overrides, run_name=trial_run_name(search, trial_id)),
        callbacks=[TuneReportCallback()],
        mlflow_parent_run_id=parent_run_id,
        mlflow_run_tags={SEARCH_TAG: search, TRIAL_TAG: trial_id, ROLE_TAG: "trial"},
    )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


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


def search_progress(iterations: int, total: int = 0) -> SearchProgress:
    """The progress callback of a search of `iterations` per trial. `total`: the trials the
    search will run (Tune creates them as slots free up)."""
    return SearchProgress(iterations, total)


def _build_tuner(
    base: ResolvedRun,
    settings: TuneConfig,
    *,
    name: str,
    parent_run_id: str,
    concurrency: int,
    resume: bool,
    retry_failed: bool,
    callbacks: list,
):
    cfg = base.cfg
    storage_path = cfg.run.storage_path
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            base=base,
            search=name,
            storage_path=f"{storage_path}/{name}/train",
            parent_run_id=parent_run_id,
        ),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    if resume:
        return tune.Tuner.restore(
            f"{storage_path}/{name}", trainable, resume_errored=retry_failed, restart_errored=False
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
            storage_path=storage_path,
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
        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency)


# ---------------------------------------------------------------------------------- outcomes


def collect_outcomes(path: str, *, name: str, iterations: int) -> list[TrialOutcome]:
    """Every trial of the search at `path`, with its status, best score and best checkpoint."""
    analysis = ExperimentAnalysis(path)
    filesystem, _ = storage.resolve(path)  # the rows' checkpoint paths are on it
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
        checkpoint, checkpoint_miou = _best_checkpoint(rows, filesystem)
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


def _best_checkpoint(rows: list[dict[str, Any]],
                     filesystem: pafs.FileSystem) -> tuple[str | None, float | None]:
    """Train keeps the best checkpoints by val mIoU; pick the best one still on disk.

    The rows hold `Checkpoint.path`, a path on the storage's `filesystem`: on object storage
    it lacks the scheme (`bucket/search/trial/checkpoint_...`), so it is made a URI."""
    saved = [
        {**row, "checkpoint_path": storage.uri_of(filesystem, row["checkpoint_path"])}
        for row in rows
        if isinstance(row.get("checkpoint_path"), str) and _finite(row.get(SCORE))
    ]
    saved = [row for row in saved if _may_exist(row["checkpoint_path"])]
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


# ---------------------------------------------------------------------------------- recording


def _open_parent_run(client, experiment_id, cfg, settings, name: str, *, resume: bool) -> str:
    """The search's parent run (`pipelines.tracking.search.open_parent_run`) with the
    Description of what is searched."""
    return open_parent_run(
        client,
        experiment_id,
        cfg,
        settings,
        name,
        resume=resume,
        description=search_description(cfg, settings, name),
    )


def _record_parent(client, summary: SearchSummary, settings: TuneConfig, *,
                   cfg: ExperimentConfig) -> None:
    """The search's results on its parent run: the tables, the picture, the Description."""
    figure = params_figure(summary.outcomes, settings)
    try:
        record_parent(
            client,
            summary,
            describe=lambda opening: search_result_description(
                opening, summary, cfg, tracking_uri=client.tracking_uri
            ),
            results_csv=results_csv(summary.outcomes, settings),
            results_markdown=results_markdown(summary.outcomes, settings),
            figure=figure,
        )
    finally:
        close_figure(figure)
