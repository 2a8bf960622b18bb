"""The seeds table of `bench/camvid_accuracy.py`: every configuration over every seed it has run.

Reads the per-run JSONs (`CONFIG-sSEED.json`) that exist, so a partial set of runs gives a
partial table, and writes a markdown report and a picture beside them (optionally logged to an
MLflow run). Per configuration: mean and standard deviation over seeds of test mIoU, aAcc, the
IoU of the confusing groups and their within-group confusion; per seed too; paired differences
(integrated minus each baseline, seed by seed), reported as "no difference" where the mean
difference is smaller than its spread; and the integrated head's decision rules.

    .venv/bin/python bench/camvid_seeds_report.py --results bench/results/camvid-seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# CamVid's confusing groups (issue 27): classes that look alike at this resolution.
GROUPS = {
    "Pedestrian/Bicyclist": ("Pedestrian", "Bicyclist"),
    "Pole/SignSymbol/Fence": ("Pole", "SignSymbol", "Fence"),
    "Building/Tree": ("Building", "Tree"),
    "Road/Pavement": ("Road", "Pavement"),
}
BASELINES = ("standard", "standard-cb")
INTEGRATED = ("integrated", "integrated-novar")
# Configurations read from another one's checkpoints under another decision rule (no training
# of their own): the integrated runs scored with the general classifier alone, the project's
# default rule since this study.
RESCORED = {"integrated-general": ("integrated", "general")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "bench/results/camvid-seeds"),
                        help="folder of CONFIG-sSEED.json files")
    parser.add_argument("--out", help="report path (default: RESULTS/report.md)")
    parser.add_argument("--tracking-uri", help="also log the report and picture to MLflow here")
    return parser.parse_args(argv)


def load_runs(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """config -> seed -> run JSON, for every JSON in `folder`."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["config"], {})[int(run["seed"])] = run
    return runs


# ---------------------------------------------------------------------------------- measures


def rescored(runs: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """`runs` plus each RESCORED configuration whose source runs scored its rule."""
    derived = {}
    for name, (source, rule) in RESCORED.items():
        seeds = {seed: {**run, "config": name, "scores": run["decisions"][rule]["scores"],
                        "matrix": run["decisions"][rule]["matrix"], "decisions": None}
                 for seed, run in runs.get(source, {}).items() if rule in run.get("decisions", {})}
        if seeds:
            derived[name] = seeds
    return {**runs, **derived}


def group_iou(run: dict[str, Any], classes: tuple[str, ...], scores: dict | None = None) -> float:
    """Mean test IoU of the group's classes."""
    scores = scores or run["scores"]
    names = run["class_names"]
    return float(np.nanmean([scores["per_class_iou"][names.index(c)] for c in classes]))


def group_confusion(run: dict[str, Any], classes: tuple[str, ...], matrix=None) -> float:
    """Share of the group's pixels predicted as another class of the same group."""
    matrix = np.asarray(run["matrix"] if matrix is None else matrix, dtype=np.float64)
    ids = [run["class_names"].index(c) for c in classes]
    inside = matrix[np.ix_(ids, ids)]
    total = matrix[ids].sum()
    return float((inside.sum() - np.trace(inside)) / total) if total else float("nan")


def measures(run: dict[str, Any], rule: str | None = None) -> dict[str, float]:
    """The report's numbers for one run (in %), under its own decision or `rule`."""
    scores, matrix = run["scores"], run["matrix"]
    if rule is not None:
        scores, matrix = run["decisions"][rule]["scores"], run["decisions"][rule]["matrix"]
    row = {"mIoU": 100 * scores["mIoU"], "aAcc": 100 * scores["aAcc"]}
    for group, classes in GROUPS.items():
        row[f"IoU {group}"] = 100 * group_iou(run, classes, scores)
        row[f"confusion {group}"] = 100 * group_confusion(run, classes, matrix)
    return row


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# ---------------------------------------------------------------------------------- report


def summary_table(runs: dict[str, dict[int, dict]]) -> list[str]:
    configs = list(runs)
    keys = list(measures(next(iter(runs[configs[0]].values()))))
    lines = ["| mean ± std over seeds | " + " | ".join(configs) + " |",
             "|---|" + "---|" * len(configs)]
    lines.append("| seeds | " + " | ".join(
        " ".join(str(s) for s in sorted(runs[c])) for c in configs) + " |")
    for key in keys:
        cells = [mean_std([measures(r)[key] for r in runs[c].values()]) for c in configs]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| train images/s (median) | " + " | ".join(
        mean_std([r["images_per_s"] for r in runs[c].values()]) for c in configs) + " |")
    return lines


def per_seed_table(runs: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| config | seed | mIoU | aAcc | " + " | ".join(f"IoU {g}" for g in GROUPS)
             + " | commit |", "|---|---|---|---|" + "---|" * len(GROUPS) + "---|"]
    for config, seeds in runs.items():
        for seed, run in sorted(seeds.items()):
            m = measures(run)
            groups = " | ".join(f"{m[f'IoU {g}']:.2f}" for g in GROUPS)
            lines.append(f"| {config} | {seed} | {m['mIoU']:.2f} | {m['aAcc']:.2f} | {groups} | "
                         f"{run['commit'][:8]} |")
    return lines


def paired_differences(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Integrated minus each baseline, seed by seed, where both ran that seed."""
    lines = ["| difference (pp) | seeds | mIoU | " + " | ".join(f"IoU {g}" for g in GROUPS)
             + " | verdict (mIoU) |", "|---|---|---|" + "---|" * len(GROUPS) + "---|"]
    for ours in (*INTEGRATED, *RESCORED):
        for base in (*BASELINES, *(c for c in INTEGRATED if c != ours)):
            if ours not in runs or base not in runs or (ours, base) == INTEGRATED[::-1]:
                continue
            seeds = sorted(set(runs[ours]) & set(runs[base]))
            if not seeds:
                continue
            diffs = {key: [measures(runs[ours][s])[key] - measures(runs[base][s])[key]
                           for s in seeds] for key in ("mIoU", *(f"IoU {g}" for g in GROUPS))}
            cells = [mean_std(diffs["mIoU"])] + [mean_std(diffs[f"IoU {g}"]) for g in GROUPS]
            lines.append(f"| {ours} - {base} | {' '.join(map(str, seeds))} | "
                         + " | ".join(cells) + f" | {verdict(diffs['mIoU'])} |")
    return lines


def verdict(diffs: list[float]) -> str:
    """A mean difference larger than its spread (std over seeds) counts; else none."""
    if len(diffs) < 2:
        return "one seed: no verdict"
    mean, spread = statistics.mean(diffs), statistics.stdev(diffs)
    if abs(mean) <= spread:
        return f"no difference ({mean:+.2f} within ±{spread:.2f})"
    return f"{'better' if mean > 0 else 'worse'} ({mean:+.2f}, spread {spread:.2f})"


def decision_table(runs: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| decision rule (test) | config | seeds | mIoU | aAcc | IoU Pedestrian/Bicyclist "
             "| IoU Pole/SignSymbol/Fence |", "|---|---|---|---|---|---|---|"]
    for config in INTEGRATED:
        seeds = {s: r for s, r in runs.get(config, {}).items() if r.get("decisions")}
        if not seeds:
            continue
        for rule in next(iter(seeds.values()))["decisions"]:
            rows = [measures(r, rule) for r in seeds.values()]
            cells = [mean_std([row[k] for row in rows]) for k in (
                "mIoU", "aAcc", "IoU Pedestrian/Bicyclist", "IoU Pole/SignSymbol/Fence")]
            lines.append(f"| {rule} | {config} | {' '.join(map(str, sorted(seeds)))} | "
                         + " | ".join(cells) + " |")
    return lines


def figure(runs: dict[str, dict[int, dict]]):
    """mIoU and each confusing group's IoU per configuration, one point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mIoU", *(f"IoU {g}" for g in GROUPS)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=False)
    configs = list(runs)
    for ax, key in zip(axes, panels, strict=True):
        for x, config in enumerate(configs):
            values = [measures(r)[key] for r in runs[config].values()]
            ax.scatter([x] * len(values), values, s=24)
            ax.hlines(statistics.mean(values), x - 0.25, x + 0.25, colors="black", linewidth=1)
        ax.set_xticks(range(len(configs)), configs, rotation=35, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test, % (one point per seed, bar = mean)")
    fig.tight_layout()
    return fig


def report(runs: dict[str, dict[int, dict]]) -> str:
    first = next(iter(next(iter(runs.values())).values()))
    header = (f"CamVid test ({first['test_images']} images), SegNeXt-T from scratch, "
              f"{first['iterations']} iterations per run; groups: "
              + ", ".join(GROUPS) + " (IoU = mean over the group's classes; confusion = share "
              "of the group's pixels predicted as another class of the group).")
    sections = [header, "", *summary_table(runs), "", "Per seed:", "", *per_seed_table(runs),
                "", "Paired differences (seed by seed):", "", *paired_differences(runs)]
    decisions = decision_table(runs)
    if len(decisions) > 2:
        sections += ["", "Decision rules of the integrated head (same checkpoints):", "",
                     *decisions]
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.results)
    runs = load_runs(folder)
    if not runs:
        sys.exit(f"camvid_seeds_report: no CONFIG-sSEED.json in {folder}; run "
                 "bench/camvid_accuracy.py --seeds ... first")
    runs = rescored(runs)
    known = (*BASELINES, *INTEGRATED, *RESCORED)
    order = [c for c in known if c in runs] + [c for c in runs if c not in known]
    runs = {c: runs[c] for c in order}
    text = report(runs)
    out = Path(args.out) if args.out else folder / "report.md"
    out.write_text(text)
    picture = figure(runs)
    picture.savefig(out.with_suffix(".png"), dpi=110)
    print(text)
    print(f"[camvid] report {out}, picture {out.with_suffix('.png')}")
    if args.tracking_uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(args.tracking_uri)
        experiment = client.get_experiment_by_name("segnext-camvid-cpu")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            "segnext-camvid-cpu")
        run_id = client.create_run(experiment_id, run_name="camvid-seeds-report",
                                   tags={"benchmark": "camvid_accuracy"}).info.run_id
        client.log_text(run_id, text, "seeds_report.md")
        client.log_figure(run_id, picture, "seeds_report.png")
        client.set_terminated(run_id)
        print(f"[camvid] logged to MLflow run {run_id} ({args.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
