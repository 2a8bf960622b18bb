"""`segnext predict`: segment image files and write the masks as pictures.

For every input image `NAME.ext`, `--out` receives:
- `NAME_mask.png`: the class-id mask as a palette PNG: pixel values are class ids, and the
  model's palette colours them in any image viewer;
- `NAME_overlay.png`: the image blended with the coloured mask.
plus `classes.json` (names and colours, the legend). The model is a checkpoint or a registered
MLflow model (`models:/segnext@champion`): class names and palette come with it.

An image that cannot be read (corrupt, truncated, unsupported pixel format) is reported on one
line and skipped; the others are still written, and the command ends with a summary and exit
code 2. 16-bit, palette, grayscale, RGBA and CMYK images are converted by
`pipelines.inference.images`. Torch (or onnxruntime) runs with as many threads as the process has
cores (`pipelines.inference.threads`). Model references are resolved by `pipelines.tracking`
(`models:/...` needs MLflow; a `.onnx` file, local or an artifact URI, loads no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.transforms import rescaled_size  # numpy + PIL only: the ONNX path imports no torch
from pipelines.arg_types import fraction, positive_int
from pipelines.inference.images import UnsupportedImageError, picture_to_rgb
from pipelines.inference.threads import inference_threads, set_torch_threads
from pipelines.tracking.registry import fetch_onnx, use_tracking_uri  # MLflow: on use only

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PALETTE_CLASSES = 256
LARGE_IMAGE_CROPS = 4  # images above this many training crops get a "may take long" note


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the given folders."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                )
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


class ImageReadError(ValueError):
    """One input image that cannot be used; `segnext predict` reports it and goes on."""


# What Pillow raises for a truncated, corrupt or hostile file: OSError (UnidentifiedImageError),
# SyntaxError and EOFError from some format plugins, DecompressionBombError above its limit.
_READ_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


def read_image(path: Path) -> tuple[np.ndarray, str | None]:
    """The file as uint8 (H, W, 3) RGB and a note when its values were rescaled (16-bit);
    `ImageReadError` naming the file when it cannot be read or converted."""
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture_to_rgb(picture, str(path))
    except UnsupportedImageError as error:
        raise ImageReadError(str(error)) from None
    except _READ_ERRORS as error:
        raise ImageReadError(f"{path}: not a readable image ({error})") from None


def read_rgb(path: Path) -> np.ndarray:
    """`read_image` without the note."""
    return read_image(path)[0]


def mask_picture(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """Palette PNG: values are class ids, colours from `palette`."""
    picture = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [int(c) for color in palette for c in color]
    picture.putpalette(flat + [0] * (3 * 256 - len(flat)))
    return picture


def overlay(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float
) -> np.ndarray:
    """`image` blended with the mask's colours (alpha = weight of the colours)."""
    colors = np.asarray(palette, dtype=np.float32)[mask]
    return ((1 - alpha) * image.astype(np.float32) + alpha * colors).round().astype(np.uint8)


def _output_stems(files: Sequence[Path]) -> Iterator[str]:
    """File stems, made unique (`a`, `a_1`, ...) when two inputs share a name."""
    used: set[str] = set()
    for file in files:
        stem, n = file.stem, 0
        while stem in used:
            n += 1
            stem = f"{file.stem}_{n}"
        used.add(stem)
        yield stem


@dataclass
class PredictReport:
    """What `predict_files` did: the files it wrote, and the inputs it skipped with why."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _large_image_note(settings: Any, path: Path, height: int, width: int) -> str | None:
    """A warning for images above LARGE_IMAGE_CROPS training crops: on a CPU they can take
    minutes, with no other output than a progress bar that has not moved yet."""
    size = rescaled_size(height, width, settings.scale)  # the test resize, if the run had one
    (crop_h, crop_w), (stride_h, stride_w) = settings.crop_size, settings.stride
    crops = size[0] * size[1] / (crop_h * crop_w)
    if crops <= LARGE_IMAGE_CROPS:
        return None
    how = "whole-image inference"
    if settings.mode_for(*size) == "slide":
        rows = max(0, math.ceil((size[0] - crop_h) / stride_h)) + 1
        cols = max(0, math.ceil((size[1] - crop_w) / stride_w)) + 1
        how = f"sliding-window inference over {rows * cols} windows"
    views = len(settings.scales) * (2 if settings.flip else 1)
    if views > 1:
        how += f" x {views} test-time views"
    return (
        f"{path}: {width}x{height} px, {crops:.0f}x the {crop_w}x{crop_h} training crop area: "
        f"{how}, this may take a while"
    )


def predict_files(
    model: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    alpha: float = 0.5,
    progress: bool = True,
    threads: int | None = None,
    **overrides,
) -> PredictReport:
    """Segment every input image, write its mask and overlay to `out`. An image that cannot
    be read is reported on stderr and skipped; the others are still written. `threads`: CPU
    threads (default: the cores this process may use, see `pipelines.inference.threads`)."""
    files = list_images(inputs)
    threads = inference_threads(threads)
    # The runtimes are imported here, not at module level: `segnext --help` imports this module
    # (pipelines.cli.SUBCOMMAND_MODULES), and torch + MLflow cost about 3 s of CPU at import,
    # onnxruntime 0.05 s (measured after `segnext --help`'s own imports).
    if str(model).lower().endswith(".onnx"):  # numpy + onnxruntime only: no torch import
        from pipelines.inference.onnx_runtime import OnnxSegmenter

        segmenter = OnnxSegmenter(fetch_onnx(model), threads=threads, **overrides)
    else:
        from pipelines.tracking.models import load_segmenter

        set_torch_threads(threads)
        segmenter = load_segmenter(model, **overrides)
    if segmenter.num_classes > MAX_PALETTE_CLASSES:
        raise ValueError(
            f"{model} has {segmenter.num_classes} classes; palette PNGs hold at most "
            f"{MAX_PALETTE_CLASSES}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    legend = [
        {"id": i, "name": name, "color": color}
        for i, (name, color) in enumerate(
            zip(segmenter.class_names, segmenter.palette, strict=True)
        )
    ]
    (out / "classes.json").write_text(json.dumps(legend, indent=1))
    report = PredictReport()
    step = segmenter.settings.batch_size
    stems = list(_output_stems(files))
    bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, disable=not progress)
    with bar:
        for start in range(0, len(files), step):
            chunk = list(zip(files[start : start + step], stems[start : start + step], strict=True))
            images, kept = [], []
            for file, stem in chunk:
                try:
                    image, note = read_image(file)
                except ImageReadError as error:
                    report.failed.append((file, str(error)))
                    bar.write(f"segnext predict: skipped {error}", file=sys.stderr)
                    bar.update(1)
                    continue
                for line in (note, _large_image_note(segmenter.settings, file, *image.shape[:2])):
                    if line:
                        bar.write(f"segnext predict: note: {line}", file=sys.stderr)
                images.append(image)
                kept.append(stem)
            for image, mask, stem in zip(images, segmenter.predict(images), kept, strict=True):
                mask_file, overlay_file = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
                mask_picture(mask, segmenter.palette).save(mask_file)
                Image.fromarray(overlay(image, mask, segmenter.palette, alpha)).save(overlay_file)
                report.written += [mask_file, overlay_file]
                bar.update(1)
    return report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images; write palette masks and overlays as PNG",
        description="Segment image files (or folders of them) with a checkpoint or an MLflow "
        "model (models:/segnext@champion); write NAME_mask.png and NAME_overlay.png.",
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint path, MLflow model URI, or FILE.onnx"
    )
    parser.add_argument("--input", required=True, nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", choices=("auto", "whole", "slide"), default=None)
    parser.add_argument("--tta", action="store_true", help="multi-scale (0.5-1.75) + flip")
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--alpha", type=fraction, default=0.5, help="overlay colour weight")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: $SEGNEXT_THREADS, $OMP_NUM_THREADS, else the cores this "
        "process may use, cgroup quota included)",
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    use_tracking_uri(args.tracking_uri)  # for models:/ references
    report = predict_files(
        args.model,
        args.input,
        args.out,
        alpha=args.alpha,
        progress=sys.stderr.isatty(),
        threads=args.threads,
        mode=args.mode,
        tta=args.tta,
        batch_size=args.batch_size,
    )
    print(f"wrote {len(report.written) // 2} masks and overlays to {args.out}")
    if report.failed:
        names = ", ".join(str(path) for path, _ in report.failed)
        print(
            f"segnext predict: error: {len(report.failed)} of "
            f"{len(report.failed) + len(report.written) // 2} images failed: {names}",
            file=sys.stderr,
        )
        return 2
    return 0
