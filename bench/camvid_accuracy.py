"""CamVid from scratch on the CPU: the classifier configurations side by side, over seeds.

Builds CamVid shards (train, val, test) if absent, trains SegNeXt-T once per configuration and
seed through
`segnext train`'s own code path (`pipelines.train.driver.run_training`: Ray Data -> Ray Train CPU
workers, MLflow) on identical settings, seed and iterations (configs/camvid-cpu.yaml: images at
half size, crop 180x240), then scores each final model on the 233 test images with
`segnext eval`'s code (`pipelines.commands.evaluate.evaluate`, predicted at 240x180, scored against the
full-size masks). Printed and logged to MLflow (one run per head under a parent comparison
run): test mIoU, aAcc, per-class IoU, the five most confused pairs of each head and how each
pair changed, images/s and CPU-s per image, a per-class IoU bar picture of both heads, and
per-part diagnostics (accuracy of the integrated head's general classifier alone, top-k recall
of each head's scores, accuracy of the final decision where the true class is a candidate).

Each (configuration, seed) writes `OUT/results/CONFIG-sSEED.json` as it finishes (config,
overrides, seed, commit, per-class IoU, confusion matrix, img/s, and for the integrated head the
test scores of every decision rule); a rerun skips the runs whose JSON exists, so a session that
stops mid-way loses one run at most. `bench/camvid_seeds_report.py` builds the table from
whatever JSONs exist.

    .venv/bin/python bench/camvid_accuracy.py --iterations 1200 --seeds 0 1 2   # issue 27
    .venv/bin/python bench/camvid_accuracy.py --iterations 300          # the quick look
    .venv/bin/python bench/camvid_accuracy.py --iterations 2 --limit 8 \\
        --shards /tmp/s --out /tmp/o --set data.crop_size=[60,80] ...   # smoke (tests/bench)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cpu_meter import CpuMeter  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The configurations compared (issue 27): the overrides that make each one, on top of the
# config file; everything else (seed, batch plan, iterations) is shared.
CONFIGS: dict[str, tuple[str, ...]] = {
    "standard": ("model.classifier=standard", "loss.class_balance=0"),  # the paper's baseline
    "standard-cb": ("model.classifier=standard", "loss.class_balance=0.5"),  # the fair baseline
    # The integrated runs predict with the spec's rule, as they did when the study ran; the
    # decision table scores every rule from the same checkpoints (training is the same for all).
    "integrated": ("model.classifier=integrated", "model.classifier_kwargs.decision=product"),
    "integrated-novar": ("model.classifier=integrated", "model.classifier_kwargs.decision=product",
                         "loss.weights.variance=0"),
}
DEFAULT_CONFIGS = ("standard", "integrated")
TOP_K = 3  # the integrated head's default candidates; the recall of both heads is measured at it
TOP_PAIRS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--camvid",
        default=str(REPO.parent / "shared/datasets/camvid"),
        help="CamVid in the SegNet layout (train/ trainannot/ ...)",
    )
    parser.add_argument(
        "--shards",
        default=str(REPO / "runs/shards/camvid"),
        help="shards folder; built from --camvid when it has no dataset.json",
    )
    parser.add_argument("--limit", type=int, help="first N samples per split (smoke runs only)")
    parser.add_argument(
        "--out",
        default=str(REPO / "runs/camvid-cpu"),
        help="results, MLflow store and Ray runs go here",
    )
    parser.add_argument("--config", default=str(REPO / "configs/camvid-cpu.yaml"))
    parser.add_argument("--iterations", type=int, default=300, help="optimizer steps per head")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS),
        help="configurations to run (see CONFIGS); runs go seed by seed, configs in this order",
    )  # fmt: skip
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="key=value",
        help="extra config overrides for every configuration (segnext train syntax)",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- steps


def ensure_shards(args: argparse.Namespace) -> Path:
    """`segnext shards camvid` into --shards unless a manifest is already there."""
    shards = Path(args.shards).resolve()
    if (shards / "dataset.json").is_file():
        return shards
    if not (Path(args.camvid) / "train.txt").is_file():
        sys.exit(f"camvid_accuracy: no CamVid at {args.camvid} (train.txt missing); pass --camvid")
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "shards",
        "camvid",
        "--root",
        args.camvid,
        "--out",
        str(shards),
        "--splits",
        "train,val,test",
        "--workers",
        "1",
    ]
    if args.limit:
        command += ["--limit", str(args.limit)]
    print("[camvid] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return shards


def run_config(args: argparse.Namespace, config: str, seed: int, shards: Path, out: Path):
    """The config file plus the overrides every run shares and the configuration's own."""
    from pipelines.config import load_config

    iterations = args.iterations
    base = load_config(args.config, [f"data.root={shards}", *args.set])
    overrides = [
        *CONFIGS[config],
        f"data.root={shards}",
        f"schedule.iterations={iterations}",
        f"schedule.warmup_iters={iterations // 20}",
        # the integrated loss's refinement and variance terms ramp in over the first 10%
        # (the general classifier picks the candidates first); the standard loss has neither
        f"loss.warmup_iters={iterations // 10}",
        f"train.seed={seed}",
        # four validations: the learning curves of both heads, not only where they end
        f"train.val_every={max(1, iterations // 4)}",
        f"train.checkpoint_every={iterations}",
        f"train.log_every={max(1, min(base.train.log_every, iterations // 2))}",
        "registry.register=false",
        f"mlflow.tracking_uri={tracking_uri(out)}",
        f"run.storage_path={out / 'ray'}",
        *args.set,
    ]
    return load_config(args.config, overrides)


def tracking_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def train_head(cfg, run_name: str, out: Path, parent_run_id: str) -> dict[str, Any]:
    """`segnext train` for one head; wall time, CPU time and the run's own throughput."""
    from mlflow.tracking import MlflowClient

    from pipelines.metric_names import SCORE
    from pipelines.train.driver import run_training
    from pipelines.train.resolve import resolve

    meter = CpuMeter().start()
    start = time.perf_counter()
    result = run_training(
        resolve(cfg, run_name=run_name, storage_path=str(out / "ray")),
        mlflow_parent_run_id=parent_run_id,
        mlflow_run_tags={"benchmark": "camvid_accuracy"},
    )
    wall = time.perf_counter() - start
    cpu = meter.stop()
    if result.best_checkpoint is None:
        raise RuntimeError(f"run {run_name} reported no checkpoint; see {result.path}")
    client = MlflowClient(cfg.mlflow.tracking_uri)

    def points(key: str) -> list:
        return sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)

    def history(key: str) -> list[float]:
        steady = [m.value for m in points(key) if m.step > cfg.train.log_every]  # start-up excluded
        return steady or [m.value for m in points(key)]

    images = cfg.schedule.iterations * cfg.train.global_batch_size
    return {
        "run_id": result.run_id,
        "checkpoint": result.best_checkpoint,
        "iterations": result.iteration,
        "val_mIoU": result.best_val_miou,
        "val_curve": [(m.step, m.value) for m in points(SCORE)],
        "train_wall_s": wall,
        "images_per_s": statistics.median(history("perf/images_per_s")),
        "step_s": statistics.median(history("perf/step_time_s")),
        "cpu_s_per_image": cpu / images,
        "final_train_loss": history("train/loss")[-1],
    }


def evaluate_head(checkpoint: str, shards: Path) -> Any:
    """`segnext eval --split test --distributed off` on the head's final checkpoint."""
    from pipelines.commands.evaluate import evaluate

    return evaluate(checkpoint, str(shards), split="test", distributed="off", progress=False)


@torch.no_grad()
def diagnose(checkpoint: str, shards: Path, cfg) -> dict[str, float]:
    """Per-part accuracy on the test split at the training resolution (masks resized nearest).

    For both heads: top-k recall of the scores the head ranks classes by (softmax logits /
    the integrated head's general logits). For the integrated head also: pixel accuracy of the
    general classifier alone, of the refinement alone (argmax of r over the head's top-k
    candidates) and of the final (integrated) decision, and the final decision's accuracy on
    pixels whose true class is among the candidates (the refinement's own job).
    """
    from data.loader import build_torch_loader
    from pipelines.checkpoint_io import load_checkpoint, model_from_checkpoint
    from segnext.classifier import MASKED_LOGIT, candidate_mask
    from segnext.metrics import ConfusionMatrix

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    head = model.decode_head.classifier
    integrated = cfg.model.classifier == "integrated"
    loader = build_torch_loader(
        str(shards),
        "test",
        train=False,
        crop_size=tuple(cfg.data.crop_size),
        batch_size=8,
        num_workers=0,
        scale=tuple(cfg.data.scale) if cfg.data.scale else None,
        drop_last=False,
    )
    k = model.num_classes
    general_cm, refine_cm, final_cm = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    counts = {"valid": 0, "in_top_k": 0, "final_right_in_top_k": 0}
    class_valid, class_hits = torch.zeros(k), torch.zeros(k)
    for batch in loader:
        images, masks = batch["images"], batch["masks"]
        outputs = model.decode_head(model.backbone(images)[1:])
        size = tuple(masks.shape[-2:])
        final = head.resize_logits(outputs, size)
        ranking = final
        if integrated:  # the general logits, resized the way the head resizes them
            ranking = F.interpolate(
                outputs["general_logits"], size=size, mode="bilinear", align_corners=False
            )
            refine = F.interpolate(
                outputs["refine_logits"], size=size, mode="bilinear", align_corners=False
            )
            candidates = candidate_mask(ranking, head.top_k)
            if candidates is not None:
                refine = refine.masked_fill(~candidates, MASKED_LOGIT)
            refine_cm.update(refine.argmax(1), masks)
        valid = masks != 255
        target = masks.masked_fill(~valid, 0)
        hit = candidate_mask(ranking, TOP_K).gather(1, target.unsqueeze(1)).squeeze(1) & valid
        right = final.argmax(1) == masks
        counts["valid"] += int(valid.sum())
        counts["in_top_k"] += int(hit.sum())
        counts["final_right_in_top_k"] += int((right & hit).sum())
        class_valid += torch.bincount(target[valid], minlength=k).float()
        class_hits += torch.bincount(target[hit], minlength=k).float()
        general_cm.update(ranking.argmax(1), masks)
        final_cm.update(final.argmax(1), masks)
    general, final = general_cm.compute(), final_cm.compute()
    result = {
        f"top{TOP_K}_recall": counts["in_top_k"] / max(counts["valid"], 1),
        f"final_acc_given_top{TOP_K}": counts["final_right_in_top_k"] / max(counts["in_top_k"], 1),
        "final_aAcc_train_res": final["aAcc"],
        # which classes the ranking leaves out of the candidates (a rare class never chosen)
        f"class_top{TOP_K}_recall": (class_hits / class_valid.clamp(min=1)).tolist(),
    }
    if integrated:
        refine = refine_cm.compute()
        result.update({
            "general_aAcc": general["aAcc"],
            "general_mIoU": general["mIoU"],
            "refine_aAcc": refine["aAcc"],
            "refine_mIoU": refine["mIoU"],
        })
    return result


# ---------------------------------------------------------------------------------- report


def pair_fraction(matrix: np.ndarray, true_id: int, pred_id: int) -> float:
    total = matrix[true_id].sum()
    return float(matrix[true_id, pred_id] / total) if total else float("nan")


def confusion_changes(results: dict[str, dict], names: list[str]) -> list[dict[str, Any]]:
    """Every head's top pairs, with the share of the true class each head sends there."""
    heads = list(results)
    seen, rows = set(), []
    for head in heads:
        for pair in results[head]["scores"]["confused_pairs"][:TOP_PAIRS]:
            key = (pair["true_id"], pair["pred_id"])
            if key in seen:
                continue
            seen.add(key)
            shares = {h: pair_fraction(np.asarray(results[h]["matrix"]), *key) for h in heads}
            rows.append({"true": names[key[0]], "pred": names[key[1]], "top_of": head, **shares})
    return rows


def comparison_figure(results: dict[str, dict], names: list[str]):
    """Per-class IoU bars, one colour per head, with each head's mIoU in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 3.8))
    width = 0.8 / len(results)
    x = np.arange(len(names))
    for i, (head, result) in enumerate(results.items()):
        ious = np.nan_to_num(np.asarray(result["scores"]["per_class_iou"], dtype=float))
        ax.bar(
            x + (i - (len(results) - 1) / 2) * width,
            ious,
            width,
            label=f"{head} (mIoU {100 * result['scores']['mIoU']:.1f})",
        )
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test IoU")
    ax.set_title("CamVid test per-class IoU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown(results: dict[str, dict], names: list[str], changes: list[dict]) -> str:
    heads = list(results)
    pct = "{:.2f}".format
    lines = ["| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("test mIoU", [pct(100 * results[h]["scores"]["mIoU"]) for h in heads])
    row("test aAcc", [pct(100 * results[h]["scores"]["aAcc"]) for h in heads])
    row("test mAcc", [pct(100 * results[h]["scores"]["mAcc"]) for h in heads])
    steps = [step for step, _ in results[heads[0]]["val_curve"]]
    row(
        "val mIoU at iteration " + " / ".join(str(step) for step in steps),
        [" / ".join(pct(100 * v) for _, v in results[h]["val_curve"]) for h in heads],
    )
    for i, name in enumerate(names):
        row(f"IoU {name}", [pct(100 * results[h]["scores"]["per_class_iou"][i]) for h in heads])
    row("train images/s (median window)", [f"{results[h]['images_per_s']:.2f}" for h in heads])
    row("train step (s, median)", [f"{results[h]['step_s']:.2f}" for h in heads])
    row("train CPU-s / image (whole run)", [f"{results[h]['cpu_s_per_image']:.2f}" for h in heads])
    row(
        "train wall (s, incl. start-up + val)", [f"{results[h]['train_wall_s']:.0f}" for h in heads]
    )
    row(
        f"top-{TOP_K} recall (test)",
        [pct(100 * results[h]["diag"][f"top{TOP_K}_recall"]) for h in heads],
    )
    row(
        f"final acc. where true class in top-{TOP_K}",
        [pct(100 * results[h]["diag"][f"final_acc_given_top{TOP_K}"]) for h in heads],
    )
    for i, name in enumerate(names):
        recall = f"class_top{TOP_K}_recall"
        row(f"top-{TOP_K} recall {name}",
            [pct(100 * results[h]["diag"][recall][i]) for h in heads])
    if any("general_aAcc" in results[h]["diag"] for h in heads):
        for label, part in (("general classifier", "general"), ("refinement", "refine")):
            cells = []
            for h in heads:
                diag = results[h]["diag"]
                cells.append(
                    f"{100 * diag[f'{part}_aAcc']:.2f} / {100 * diag[f'{part}_mIoU']:.2f}"
                    if f"{part}_aAcc" in diag
                    else "-"
                )
            row(f"{label} alone (train res.): aAcc / mIoU", cells)
    lines += [
        "",
        "Most confused pairs (share of the true class's pixels predicted as the other):",
        "",
        "| true -> predicted | top-5 of | " + " | ".join(heads) + " | change (pp) |",
        "|---|---|" + "---|" * len(heads) + "---|",
    ]
    for c in changes:
        shares = [f"{100 * c[h]:.1f}%" for h in heads]
        delta = f"{100 * (c[heads[-1]] - c[heads[0]]):+.1f}" if len(heads) > 1 else "-"
        lines.append(
            f"| {c['true']} -> {c['pred']} | {c['top_of']} | "
            + " | ".join(shares)
            + f" | {delta} |"
        )
    return "\n".join(lines)


def log_comparison(client, parent_run_id: str, results: dict, names: list[str], text: str) -> None:
    from mlflow.entities import Metric

    from pipelines.metric_names import metric_name

    metrics = []
    for head, result in results.items():
        metrics += [
            Metric(f"{head}/test_mIoU", result["scores"]["mIoU"], 0, 0),
            Metric(f"{head}/test_aAcc", result["scores"]["aAcc"], 0, 0),
            Metric(f"{head}/images_per_s", result["images_per_s"], 0, 0),
        ]
        for name, iou in zip(names, result["scores"]["per_class_iou"], strict=True):
            if not math.isnan(iou):
                metrics.append(Metric(metric_name(f"{head}/test_IoU/{name}"), iou, 0, 0))
    client.log_batch(parent_run_id, metrics=metrics)
    client.log_figure(parent_run_id, comparison_figure(results, names), "per_class_iou_heads.png")
    client.log_text(parent_run_id, text, "comparison.md")
    client.log_dict(parent_run_id, results, "results.json")


# ---------------------------------------------------------------------------------- main


def git_commit() -> str:
    """HEAD of the tree the script runs from, with "+dirty" when it has uncommitted changes."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def score_decisions(checkpoint: str, shards: Path) -> dict[str, dict[str, Any]]:
    """Test scores of the integrated head under each decision rule, from one checkpoint.

    The rules differ only at prediction time (segnext.classifier.DECISIONS), so one trained
    model is scored three times with `segnext eval`'s local path; nothing is trained again.
    """
    from data.manifest import load_manifest
    from pipelines.commands.evaluate import TOP_CONFUSED, evaluate_local
    from pipelines.inference.segmenter import Segmenter
    from pipelines.tracking.models import load_source, resolve_model
    from segnext.classifier import DECISIONS
    from segnext.metrics import ConfusionMatrix

    manifest = load_manifest(str(shards))
    payload = load_source(resolve_model(checkpoint))
    scored = {}
    for rule in DECISIONS:  # as `segnext eval --decision RULE` scores it
        segmenter = Segmenter.from_checkpoint(payload, source=checkpoint, decision=rule)
        matrix, _ = evaluate_local(segmenter, manifest, "test", progress=False)
        accumulator = ConfusionMatrix(len(manifest.classes), manifest.ignore_index)
        accumulator.matrix = torch.from_numpy(matrix)
        scores = accumulator.compute(class_names=manifest.classes, top_confused=TOP_CONFUSED)
        scored[rule] = {"scores": scores, "matrix": matrix.tolist()}
    return scored


def run_one(
    args: argparse.Namespace, config: str, seed: int, shards: Path, out: Path, parent: str
) -> dict[str, Any]:
    """Train, evaluate and diagnose one (configuration, seed); the JSON-able result."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.evaluation import log_evaluation

    cfg = run_config(args, config, seed, shards, out)
    uri = tracking_uri(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"[camvid] training {config} seed {seed}: {args.iterations} iterations", flush=True)
    result = train_head(cfg, f"camvid-cpu-{config}-s{seed}-{stamp}", out, parent)
    print(f"[camvid] evaluating {config} seed {seed} on test", flush=True)
    start = time.perf_counter()
    evaluation = evaluate_head(result["checkpoint"], shards)
    result["eval_wall_s"] = time.perf_counter() - start
    result["test_images"] = evaluation.num_samples
    evaluation.model_run_id = result["run_id"]
    log_evaluation(
        evaluation,
        model=result["checkpoint"],
        data=str(shards),
        split="test",
        target="model",
        experiment=cfg.mlflow.experiment,
        tracking_uri=uri,
    )
    result.update(
        config=config,
        overrides=list(CONFIGS[config]) + list(args.set),
        seed=seed,
        commit=git_commit(),
        class_names=evaluation.class_names,
        scores=evaluation.scores,
        matrix=evaluation.matrix.tolist(),
        diag=diagnose(result["checkpoint"], shards, cfg),
        finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    if cfg.model.classifier == "integrated":
        print(f"[camvid] scoring the decision rules of {config} seed {seed}", flush=True)
        result["decisions"] = score_decisions(result["checkpoint"], shards)
    MlflowClient(uri).log_batch(
        result["run_id"],
        metrics=[Metric(f"diag/{k}", float(v), 0, 0) for k, v in result["diag"].items()
                 if not isinstance(v, list)],
    )
    return result


def run_path(out: Path, config: str, seed: int) -> Path:
    return out / "results" / f"{config}-s{seed}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a run killed while writing leaves no half JSON that a rerun would skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=1, default=str))
    partial.replace(path)


def seed_report(out: Path, seed: int, configs: list[str], args: argparse.Namespace) -> str:
    """The side-by-side report of one seed's runs that exist, from their JSONs."""
    results = {
        c: json.loads(run_path(out, c, seed).read_text())
        for c in configs
        if run_path(out, c, seed).is_file()
    }
    names = next(iter(results.values()))["class_names"]
    header = (
        f"CamVid test ({next(iter(results.values()))['test_images']} images), SegNeXt-T from "
        f"scratch, {args.iterations} iterations, seed {seed}, config {Path(args.config).name}"
        + (f" + {' '.join(args.set)}" if args.set else "")
    )
    return header + "\n\n" + markdown(results, names, confusion_changes(results, names))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(args)
    for config in args.configs:  # every configuration's config is refused now, not hours later
        run_config(args, config, args.seeds[0], shards, out)
    todo = [(s, c) for s in args.seeds for c in args.configs if not run_path(out, c, s).is_file()]
    for seed, config in [(s, c) for s in args.seeds for c in args.configs]:
        if (seed, config) not in todo:
            print(f"[camvid] {config} seed {seed}: {run_path(out, config, seed)} exists, skipped")

    from mlflow.tracking import MlflowClient

    from pipelines.cluster import init_ray
    from pipelines.tracking import runs as tracking

    uri = tracking_uri(out)
    client = MlflowClient(uri)
    if todo:
        experiment = run_config(args, args.configs[0], args.seeds[0], shards, out).mlflow.experiment
        experiment_id = tracking.ensure_experiment(uri, experiment)
        parent = client.create_run(
            experiment_id,
            run_name=f"camvid-cpu-compare-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"benchmark": "camvid_accuracy"},
        ).info.run_id
        client.log_param(parent, "iterations", args.iterations)
        client.log_param(parent, "seeds", " ".join(map(str, args.seeds)))
        client.log_param(parent, "configs", " ".join(args.configs))
        client.log_param(parent, "overrides", " ".join(args.set) or "-")
        init_ray("local", num_cpus=None)
        try:
            for seed, config in todo:
                result = run_one(args, config, seed, shards, out, parent)
                write_json(run_path(out, config, seed), result)
                print(
                    f"[camvid] {config} seed {seed}: test mIoU {100 * result['scores']['mIoU']:.2f}"
                    f" -> {run_path(out, config, seed)}",
                    flush=True,
                )
        except BaseException:
            client.set_terminated(parent, status="FAILED")
            raise
    for seed in args.seeds:
        if not any(run_path(out, c, seed).is_file() for c in args.configs):
            continue
        text = seed_report(out, seed, args.configs, args)
        print(text, flush=True)
        (out / f"report-s{seed}.md").write_text(text + "\n")
    if todo:  # the parent run gets the comparison of the last seed this invocation ran
        seed = todo[-1][0]
        results = {
            c: json.loads(run_path(out, c, seed).read_text())
            for c in args.configs
            if run_path(out, c, seed).is_file()
        }
        names = next(iter(results.values()))["class_names"]
        log_comparison(client, parent, results, names, seed_report(out, seed, args.configs, args))
        client.set_terminated(parent)
        print(f"[camvid] results in {out}/results, MLflow parent run {parent} ({uri})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
