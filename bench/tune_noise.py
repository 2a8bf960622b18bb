"""Seed noise against trial spread: does a finished search's ranking mean something?

    .venv/bin/python bench/tune_noise.py --config configs/demo-tune.yaml --search NAME \\
        [--seeds 1 2] [key=value ...]

Reads search NAME (under `run.storage_path`), takes its best and its worst finished trial, and
trains each of the two configurations again, to the full `schedule.iterations`, once per seed
(`train.seed`: data order and augmentation; a warm start fixes the initial weights), from the
same warm start as the search (`tune.warm_start`). The ranking means something when the gap
between the two configurations' mean scores (the spread) is larger than the gap between the
seeds of one configuration (the noise). The search's own scores are shown beside them: the
worst trial was usually stopped early by ASHA, so its search score is from fewer iterations.

Runs are sequential (2 cores), logged to the MLflow experiment `<mlflow.experiment>-noise`,
not registered. Prints a markdown table for BENCHMARKS.md and writes OUT/tune_noise.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the search's YAML config")
    parser.add_argument("--search", required=True, help="the search's name (its Tune folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tune-noise")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from pipelines.cluster import init_ray
    from pipelines.config import with_overrides
    from pipelines.train.driver import run_training
    from pipelines.train.resolve import resolve
    from tune.run import best_trial, collect_outcomes, resolve_warm_start
    from tune.space import load_search_config

    started = time.perf_counter()
    cfg, settings = load_search_config(args.config, args.overrides)
    notes: list[str] = []
    base = resolve_warm_start(cfg, settings, notes).cfg
    searched_from = _search_init_from(base, args.search)
    if searched_from and searched_from != base.model.init_from:  # the champion moved since
        base = with_overrides(base, {"model.init_from": searched_from})
        notes.append(f"warm start: the search's own initial weights {searched_from}")
    path = f"{base.run.storage_path}/{args.search}"
    outcomes = collect_outcomes(path, name=args.search, iterations=base.schedule.iterations)
    scored = [o for o in outcomes if o.best_val_miou is not None]
    if len(scored) < 2:
        parser.error(f"{path}: fewer than two trials with a score")
    best, worst = best_trial(outcomes), min(scored, key=lambda o: o.best_val_miou)
    init_ray(base.ray.address)
    rows = []
    for label, outcome in (("best", best), ("worst", worst)):
        for seed in args.seeds:
            run_cfg = with_overrides(
                base,
                {
                    **outcome.params,
                    "train.seed": seed,
                    "registry.register": False,
                    "mlflow.experiment": f"{base.mlflow.experiment}-noise",
                },
            )
            name = f"{args.search}-noise-{outcome.trial_id}-seed{seed}-{time.strftime('%H%M%S')}"
            t0 = time.perf_counter()
            run = resolve(run_cfg, run_name=name, storage_path=str(args.out / "ray"))
            result = run_training(run)
            rows.append(
                {
                    "config": label,
                    "trial": outcome.trial_id,
                    "status_in_search": outcome.status,
                    "search_val_mIoU": outcome.best_val_miou,
                    "search_iteration": outcome.iteration,
                    "seed": seed,
                    "val_mIoU": result.best_val_miou,
                    "iteration": result.iteration,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "params": outcome.params,
                }
            )
            print(f"[tune_noise] {label} {outcome.trial_id} seed {seed}: val mIoU "
                  f"{result.best_val_miou:.4f} at iteration {result.iteration}", flush=True)
    summary = _summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"search": args.search, "notes": notes, "rows": rows, **summary,
              "wall_s": round(time.perf_counter() - started, 1)}
    (args.out / "tune_noise.json").write_text(json.dumps(report, indent=1) + "\n")
    print(_markdown(rows, summary, notes))
    print(f"wall time {report['wall_s']:.0f}s; written to {args.out / 'tune_noise.json'}")
    return 0


def _search_init_from(cfg, search: str) -> str | None:
    """`model.init_from` as the search's parent MLflow run recorded it (the resolved file), so
    the reruns start from the search's weights even if the champion moved since."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import runs as tracking

    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    run_id = experiment and tracking.find_run(client, experiment.experiment_id, search)
    if not run_id:
        return None
    value = client.get_run(run_id).data.params.get("model.init_from")
    return None if value in (None, "None") else value


def _summary(rows: list[dict]) -> dict:
    """Spread: the gap between the configurations' mean scores; noise: the largest gap between
    the seeds of one configuration."""
    by_config = {
        label: [r["val_mIoU"] for r in rows if r["config"] == label] for label in ("best", "worst")
    }
    means = {label: statistics.mean(values) for label, values in by_config.items()}
    noise = max(max(values) - min(values) for values in by_config.values())
    spread = means["best"] - means["worst"]
    return {"mean_best": means["best"], "mean_worst": means["worst"], "spread": spread,
            "noise": noise, "spread_exceeds_noise": spread > noise}


def _markdown(rows: list[dict], summary: dict, notes: list[str]) -> str:
    keys = list(rows[0]["params"])
    header = ["config", "trial", *keys, "in the search", "seed", "val mIoU", "iteration", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        search = (f"{r['search_val_mIoU']:.4f} ({r['status_in_search']}, "
                  f"it {r['search_iteration']})")
        values = [f"{r['params'][k]:.4g}" if isinstance(r["params"][k], float)
                  else str(r["params"][k]) for k in keys]
        lines.append("| " + " | ".join([r["config"], r["trial"], *values, search, str(r["seed"]),
                                        f"{r['val_mIoU']:.4f}", str(r["iteration"]),
                                        f"{r['wall_s']:.0f}"]) + " |")
    verdict = "larger" if summary["spread_exceeds_noise"] else "NOT larger"
    lines += [
        "",
        f"spread (mean best - mean worst) {summary['spread']:.4f}; seed noise (largest gap "
        f"between seeds of one configuration) {summary['noise']:.4f}: the spread is {verdict} "
        "than the noise",
        *notes,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
