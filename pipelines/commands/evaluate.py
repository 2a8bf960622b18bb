"""`segnext eval`: score a model on a shard split at each image's original resolution.

Every sample is predicted at its own size by `pipelines.inference.segmenter.Segmenter` (the
code the served model runs, so the score is the score of what is served) and counted in a
`segnext.metrics.ConfusionMatrix`. Small splits run in this process; large ones (auto: more
than `RAY_ABOVE` samples) run as Ray Data batch inference: `map_batches` over actors that each
hold the model and return one confusion matrix per batch, summed by the driver. Both paths
decode, validate and predict the samples with the same functions, so they give the same matrix.

Results (mIoU, aAcc, mAcc, per-class IoU, most confused pairs, confusion-matrix picture) are
printed and logged to MLflow (`pipelines.tracking.evaluation`): a new run by default, or the
model's own run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from data.manifest import load_manifest
from data.storage import endpoint_env
from pipelines.arg_types import decision_rule, positive_int
from pipelines.cluster import init_ray
from pipelines.tracking.registry import tracking_env, use_tracking_uri

if TYPE_CHECKING:
    from data.manifest import Manifest
    from data.samples import SamplePipeline
    from data.stream import OnError, SkipTally
    from pipelines.inference.segmenter import Segmenter

# Imported inside the functions below, not here: torch, Ray, MLflow and what imports them
# (pipelines.inference.scoring, pipelines.tracking.models / .evaluation, segnext.metrics),
# about 1.5-2 s each of CPU at import, measured after `segnext --help`'s own imports, which
# include this module (pipelines.cli.SUBCOMMAND_MODULES).

RAY_ABOVE = 500  # --distributed auto: Ray Data batch inference for splits larger than this
TOP_CONFUSED = 5


@dataclass(frozen=True)
class EvalOptions:
    """Test-time settings; None keeps what the training run recorded (see
    pipelines.inference.segmenter)."""

    mode: str | None = None
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    tta: bool = False
    batch_size: int | None = None
    decision: str | None = None  # an integrated head's prediction rule; None: the saved one

    def overrides(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "crop_size": self.crop_size,
            "stride": self.stride,
            "tta": self.tta,
            "batch_size": self.batch_size,
            "decision": self.decision,
        }


@dataclass
class EvalResult:
    matrix: np.ndarray  # (K, K) int64, rows = true class, columns = predicted
    scores: dict[str, Any]  # ConfusionMatrix.compute(): aAcc, mIoU, mAcc, per_class_iou, ...
    class_names: list[str]
    num_samples: int
    distributed: bool
    settings: dict[str, Any] = field(default_factory=dict)  # the Segmenter's, minus mean/std
    model_run_id: str | None = None  # the MLflow run that logged the model, if any
    skipped: dict[str, Any] = field(default_factory=lambda: {"count": 0, "examples": []})
    manifest: Manifest | None = None  # the shards' manifest (MLflow logs the split as a dataset)


def evaluate_local(
    segmenter: Segmenter,
    manifest: Manifest,
    split: str,
    *,
    on_error: OnError = "raise",
    progress: bool = True,
) -> tuple[np.ndarray, SkipTally]:
    """The split's confusion matrix computed in this process, and what was skipped."""
    from pipelines.inference.scoring import score_split  # Ray (data.stream): see above

    scored, skipped = score_split(segmenter, manifest, split, on_error=on_error,
                                  progress=progress)
    return scored.matrix, skipped


class BatchScorer:
    """Ray Data `map_batches` actor: holds one Segmenter, scores batches of raw samples."""

    def __init__(
        self, model: str, options: EvalOptions, pipeline: SamplePipeline, on_error: OnError
    ) -> None:
        from pipelines.tracking.models import load_segmenter  # torch, MLflow: see above

        self.segmenter = load_segmenter(model, **options.overrides())
        self.pipeline, self.on_error = pipeline, on_error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from data.stream import SkipTally
        from pipelines.inference.scoring import score_samples

        members = [name for name in batch if not name.startswith("__")]
        samples = [
            ({name: batch[name][i] for name in members}, str(url), str(key))
            for i, (url, key) in enumerate(zip(batch["__url__"], batch["__key__"], strict=True))
        ]
        skipped = SkipTally() if self.on_error == "skip" else None
        scored = score_samples(self.segmenter, self.pipeline, samples, skipped=skipped)
        return {
            "matrix": scored.matrix[None],
            "skipped": np.array([skipped.count if skipped else 0], dtype=np.int64),
        }


def evaluate_ray(
    model: str,
    manifest: Manifest,
    split: str,
    options: EvalOptions,
    *,
    workers: int | None = None,
    batch_size: int = 4,
    on_error: OnError = "raise",
) -> tuple[np.ndarray, SkipTally]:
    """The split's confusion matrix from Ray Data batch inference on `workers` actors (one GPU
    each when the cluster has GPUs, else one CPU), and the skipped samples; needs `ray.init`
    done by the caller."""
    import ray

    from data.sample_index import checked_shards
    from data.stream import SkipTally, configure_data_context
    from pipelines.inference.scoring import scoring_pipeline

    configure_data_context(progress_bars=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-10-s progress lines
    skipped = SkipTally()
    record = skipped.record if on_error == "skip" else None
    shards, filesystem = checked_shards(manifest, split, record=record)
    paths = [shard.path for shard in shards]
    pipeline = scoring_pipeline(manifest)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = workers or max(1, gpus or cpus - 1)
    raw = ray.data.read_webdataset(
        paths,
        filesystem=filesystem,
        decoder=None,
        fileselect=[f"*.{pipeline.image_member}", "*.mask.png"],
        num_cpus=0.25,
    )
    matrices = raw.map_batches(
        BatchScorer,
        fn_constructor_args=(model, options, pipeline, on_error),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
    )
    k = pipeline.num_classes
    total = np.zeros((k, k), dtype=np.int64)
    for row in matrices.iter_rows():
        total += np.asarray(row["matrix"], dtype=np.int64)
        skipped.count += int(row["skipped"])
    return total, skipped


def evaluate(
    model: str,
    data: str,
    *,
    split: str = "val",
    options: EvalOptions | None = None,
    distributed: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    on_error: OnError = "raise",
) -> EvalResult:
    """Score `model` (checkpoint or MLflow model reference) on `data` (shards root)."""
    import torch  # torch, MLflow: see above

    from pipelines.inference.segmenter import Segmenter
    from pipelines.tracking.models import load_source, resolve_model
    from segnext.metrics import ConfusionMatrix

    options = options or EvalOptions()
    manifest = load_manifest(data)
    num_samples = manifest.num_samples(split)
    use_ray = distributed == "on" or (distributed == "auto" and num_samples > RAY_ABOVE)
    source = resolve_model(model)
    segmenter = Segmenter.from_checkpoint(
        load_source(source),
        device="cpu" if use_ray else None,  # the driver only reads settings then
        **options.overrides(),
    )
    _check_classes(segmenter.class_names, manifest, model, data)
    settings = {
        key: value for key, value in vars(segmenter.settings).items() if key not in ("mean", "std")
    }
    decision = getattr(segmenter.model.decode_head.classifier, "decision", None)
    if decision is not None:  # the integrated head's rule: what the scores are of
        settings["decision"] = decision
    if use_ray:
        init_ray(None, env=_worker_env())
        matrix, skipped = evaluate_ray(
            model,
            manifest,
            split,
            options,
            workers=workers,
            batch_size=segmenter.settings.batch_size,
            on_error=on_error,
        )
    else:
        matrix, skipped = evaluate_local(
            segmenter, manifest, split, on_error=on_error, progress=progress
        )
    accumulator = ConfusionMatrix(len(manifest.classes), manifest.ignore_index)
    accumulator.matrix = torch.from_numpy(matrix)
    scores = accumulator.compute(class_names=manifest.classes, top_confused=TOP_CONFUSED)
    return EvalResult(
        matrix, scores, list(manifest.classes), num_samples, use_ray, settings, source.run_id,
        skipped=skipped.report(), manifest=manifest,
    )


def _worker_env() -> dict[str, str]:
    """Ray workers need this process's tracking store to resolve models:/ URIs, and its S3
    endpoint to read shards and checkpoints."""
    return {**tracking_env(), **endpoint_env()}


def _check_classes(names: list[str], manifest: Manifest, model: str, data: str) -> None:
    if len(names) != len(manifest.classes):
        raise ValueError(
            f"{model} predicts {len(names)} classes but {data} has {len(manifest.classes)} "
            f"({', '.join(manifest.classes)}); evaluate on shards of the dataset it was trained on"
        )


# ---------------------------------------------------------------------------------- report


def format_report(result: EvalResult, split: str) -> str:
    scores = result.scores
    path = "Ray Data" if result.distributed else "single process"
    decision = result.settings.get("decision")
    lines = [
        f"{split}: {result.num_samples} images ({path}), mode {result.settings.get('mode')}"
        f"{', TTA' if result.settings.get('flip') else ''}"
        f"{f', decision {decision}' if decision else ''}",
        f"  mIoU {100 * scores['mIoU']:.2f}   aAcc {100 * scores['aAcc']:.2f}   "
        f"mAcc {100 * scores['mAcc']:.2f}",
    ]
    skipped = result.skipped
    if skipped["count"]:
        lines.append(f"  skipped {skipped['count']} unreadable samples (--on-error skip):")
        lines.extend(
            f"    {entry['shard']} {entry['key']}: {entry['reason']}"
            for entry in skipped["examples"][:5]
        )
    else:
        lines.append("  skipped 0 samples")
    lines.append("  per-class IoU:")
    width = max(len(name) for name in result.class_names)
    for name, iou in zip(result.class_names, scores["per_class_iou"], strict=True):
        value = "   n/a" if math.isnan(iou) else f"{100 * iou:6.2f}"
        lines.append(f"    {name:<{width}}  {value}")
    if scores["confused_pairs"]:
        lines.append("  most confused (true -> predicted, share of the true class):")
        for pair in scores["confused_pairs"]:
            lines.append(
                f"    {pair['true']} -> {pair['pred']}: {100 * pair['fraction']:.1f}% "
                f"({pair['pixels']} px)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a model on a shard split (mIoU, per-class IoU, confusions) and log it",
        description="Evaluate a checkpoint or MLflow model (models:/segnext@champion) on a shard "
        "split at the original image resolution; log the scores to MLflow.",
    )
    parser.add_argument("--model", required=True, help="checkpoint path or MLflow model URI")
    parser.add_argument("--data", required=True, help="shards folder or URI (with dataset.json)")
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--mode",
        choices=("auto", "whole", "slide"),
        default=None,
        help="default: the training run's eval.mode, else auto (slide on large images)",
    )
    parser.add_argument("--crop", nargs=2, type=positive_int, metavar=("H", "W"), help="slide window")
    parser.add_argument("--stride", nargs=2, type=positive_int, metavar=("H", "W"), help="slide stride")
    parser.add_argument("--tta", action="store_true", help="multi-scale (0.5-1.75) + flip")
    parser.add_argument(
        "--decision", type=decision_rule, default=None, metavar="RULE",
        help="integrated head: predict with product, general or refine instead of the rule "
        "the model was saved with (the weights are the same; BENCHMARKS.md compares them)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per forward pass")
    parser.add_argument(
        "--distributed",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"Ray Data batch inference (auto: above {RAY_ABOVE} samples)",
    )
    parser.add_argument("--workers", type=positive_int, default=None, help="Ray inference actors")
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="an unreadable sample stops the command (raise) or is skipped and counted (skip)",
    )
    parser.add_argument(
        "--log-to",
        choices=("new", "model", "none"),
        default="new",
        help="MLflow: a new run (default), the model's run, or nothing",
    )
    parser.add_argument("--experiment", default="segnext", help="experiment of a new run")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    uri = use_tracking_uri(args.tracking_uri)  # for models:/ references
    options = EvalOptions(
        mode=args.mode,
        crop_size=tuple(args.crop) if args.crop else None,
        stride=tuple(args.stride) if args.stride else None,
        tta=args.tta,
        batch_size=args.batch_size,
        decision=args.decision,
    )
    result = evaluate(
        args.model,
        args.data,
        split=args.split,
        options=options,
        distributed=args.distributed,
        workers=args.workers,
        progress=sys.stderr.isatty(),
        on_error=args.on_error,
    )
    print(format_report(result, args.split))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"scores": result.scores, "matrix": result.matrix.tolist()}, handle)
    if args.log_to != "none":
        from pipelines.tracking.evaluation import log_evaluation  # MLflow: see above

        run_id = log_evaluation(
            result,
            model=args.model,
            data=args.data,
            split=args.split,
            target=args.log_to,
            experiment=args.experiment,
            tracking_uri=args.tracking_uri,
        )
        print(f"logged to MLflow run {run_id} (mlflow ui --backend-store-uri {uri})")
    print(f"next: segnext predict --model {args.model} --input IMAGES --out runs/predictions")
    return 0
