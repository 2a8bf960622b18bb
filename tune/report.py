"""What a search shows of its trials: the results table (CSV and markdown), the picture of val
mIoU and the confusing classes' IoU against each searched value, the parent run's Description
text and the summary `segnext tune` prints.

Pure rendering of `TrialOutcome`s: no Ray, no MLflow client (the text and the figure are handed
to `pipelines.tracking.search`, which logs them).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # pictures are only saved, never shown

import matplotlib.pyplot as plt  # noqa: E402

from pipelines.config import ExperimentConfig, TuneConfig  # noqa: E402
from pipelines.tracking.runs import next_commands  # noqa: E402
from pipelines.tracking.search import (  # noqa: E402
    COMPLETED,
    FAILED,
    INTERRUPTED,
    STOPPED,
    SearchSummary,
    TrialOutcome,
)

# ---------------------------------------------------------------------------------- columns


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


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------- tables


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


# ---------------------------------------------------------------------------------- picture


def params_figure(outcomes: list[TrialOutcome], settings: TuneConfig):
    """Which weights help the confusing classes: one column per searched key, one row for the
    best val mIoU and one per confusing class (its IoU at the trial's best validation), each
    point a trial against its value, coloured by status (failed trials sit at 0 as crosses)."""
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


def close_figure(figure) -> None:
    """Free a figure of `params_figure` once it is saved (pyplot keeps every figure open)."""
    plt.close(figure)


# ---------------------------------------------------------------------------------- text


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


def search_result_description(
    opening: str, summary: SearchSummary, cfg: ExperimentConfig, *, tracking_uri: str
) -> str:
    """`opening` plus the trials' outcome, the best trial and the commands that use it
    (`tracking_uri`: the store a registered model is in)."""
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
    lines += next_commands(
        model, data_root=cfg.data.root, val_split=cfg.data.val_split, tracking_uri=tracking_uri)
    return "\n".join(lines)


def format_summary(summary: SearchSummary, settings: TuneConfig, *, resume_command: str) -> str:
    """What `segnext tune` prints at the end: notes, the table, the best trial, where it is."""
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
