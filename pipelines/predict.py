"""`segnext predict`: segment image files and write the masks as pictures.

For every input image `NAME.ext`, `--out` receives:
- `NAME_mask.png`: the class-id mask as a palette PNG: pixel values are class ids, and the
  model's palette colours them in any image viewer;
- `NAME_overlay.png`: the image blended with the coloured mask.
plus `classes.json` (names and colours, the legend). The model is a checkpoint or a registered
MLflow model (`models:/segnext@champion`): class names and palette come with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PALETTE_CLASSES = 256


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


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            return np.asarray(ImageOps.exif_transpose(picture).convert("RGB"))
    except OSError as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None


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


def predict_files(
    model: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    alpha: float = 0.5,
    progress: bool = True,
    **overrides,
) -> list[Path]:
    """Segment every input image, write its mask and overlay to `out`; returns the files."""
    from tqdm import tqdm

    if str(model).lower().endswith(".onnx"):  # numpy + onnxruntime only: no torch import
        from pipelines.onnx_runtime import load_onnx_segmenter as load_segmenter
    else:
        from pipelines.serving import load_segmenter

    files = list_images(inputs)
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
    written = []
    step = segmenter.settings.batch_size
    stems = list(_output_stems(files))
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        for start in range(0, len(files), step):
            chunk = files[start : start + step]
            images = [read_rgb(file) for file in chunk]
            for image, mask, stem in zip(
                images, segmenter.predict(images), stems[start : start + step], strict=True
            ):
                mask_file, overlay_file = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
                mask_picture(mask, segmenter.palette).save(mask_file)
                Image.fromarray(overlay(image, mask, segmenter.palette, alpha)).save(overlay_file)
                written += [mask_file, overlay_file]
            bar.update(len(chunk))
    return written


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
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight")
    parser.add_argument("--tracking-uri", default=None)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))  # for models:/ references
    written = predict_files(
        args.model,
        args.input,
        args.out,
        alpha=args.alpha,
        progress=sys.stderr.isatty(),
        mode=args.mode,
        tta=args.tta,
        batch_size=args.batch_size,
    )
    print(f"wrote {len(written) // 2} masks and overlays to {args.out}")
    return 0
