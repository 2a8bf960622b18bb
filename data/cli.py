"""`segnext shards`: turn a dataset folder into WebDataset shards, or verify written shards.

segnext shards camvid --root ../shared/datasets/camvid --out shards/camvid --workers 2
segnext shards folder --root my_data --classes classes.txt --mask-threshold 127 --out shards/mine
segnext shards verify shards/camvid

A run into a folder that already holds shards of the same dataset replaces the splits it writes
and keeps the others; a different dataset there is refused (--overwrite replaces it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from data.sources import ADE20K, VOC, CamVid, Cityscapes, DataError, Folder, Source, Synthetic
from data.sources.base import SourceError
from data.sources.folder import discover_splits

MAX_LISTED = 20  # skipped samples / problems printed in full
BYTE_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9}


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="dataset folder (see the layout above)")


def _add_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="folder whose sub-folders are splits: ROOT/<split>/images, "
                        "ROOT/<split>/masks")  # fmt: skip
    parser.add_argument("--images-dir", default="images", help="images sub-folder name (--root)")
    parser.add_argument("--masks-dir", default="masks", help="masks sub-folder name (--root)")
    parser.add_argument("--split", action="append", default=[], metavar="NAME=IMAGES:MASKS",
                        help="a split from two folders (repeatable); a bare NAME names the "
                        "split of --images/--masks (default train)")  # fmt: skip
    parser.add_argument("--images", help="folder of images (one split, see --split)")
    parser.add_argument("--masks", help="folder of 8-bit id masks, same stems as --images")
    parser.add_argument("--classes", required=True, help="text file, one class name per line")
    parser.add_argument("--ignore-index", type=int, help="the dataset's ignore id (-> 255)")
    parser.add_argument("--label-map", help='JSON file {"src_id": dst_id} applied to mask ids')
    parser.add_argument("--mask-threshold", type=int, metavar="T",
                        help="binary masks (2 classes): value > T -> class 1, else 0; for 0/255 "
                        "or JPEG masks, e.g. 127")  # fmt: skip


def _add_synthetic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=7, help="6..8")


def _folder(args: argparse.Namespace) -> Source:
    return Folder.from_files(
        args.classes,
        _folder_layout(args),
        ignore_index=args.ignore_index,
        label_map_file=args.label_map,
        mask_threshold=args.mask_threshold,
    )


def _folder_layout(args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """split -> (images, masks) from --root, --split NAME=IMAGES:MASKS and --images/--masks."""
    specs = [s for s in args.split if "=" in s]
    names = [s for s in args.split if "=" not in s]
    layout: dict[str, tuple[Path, Path]] = {}

    def add(name: str, images: Path, masks: Path, origin: str) -> None:
        if name in layout:
            raise SourceError(
                f"split '{name}' is given twice ({origin} and before). Fix: name each split once."
            )
        layout[name] = (Path(images), Path(masks))

    if len(names) > 1 or (names and not (args.images or args.masks)):
        raise SourceError(
            f"--split {' '.join(names)}: a bare split name names the split of --images/--masks "
            f"(one only). Fix: pass --images and --masks, or --split NAME=IMAGES:MASKS."
        )
    if bool(args.images) != bool(args.masks):
        raise SourceError("--images and --masks go together. Fix: pass both, or use --root.")
    if args.root:
        for name, (images, masks) in discover_splits(
            Path(args.root), args.images_dir, args.masks_dir
        ).items():
            add(name, images, masks, f"--root {args.root}")
    for spec in specs:
        name, _, folders = spec.partition("=")
        images, colon, masks = folders.partition(":")
        if not (name and colon and images and masks):
            raise SourceError(
                f"--split {spec}: expected NAME=IMAGES:MASKS (e.g. val=data/val/img:data/val/gt)."
            )
        add(name, Path(images), Path(masks), f"--split {spec}")
    if args.images:
        add(names[0] if names else "train", args.images, args.masks, "--images/--masks")
    if not layout:
        raise SourceError(
            "folder: no images given. Fix: pass --root DIR (DIR/<split>/images + masks), "
            "--split NAME=IMAGES:MASKS, or --images and --masks."
        )
    return layout


def _synthetic(args: argparse.Namespace) -> Source:
    return Synthetic(
        num_train=args.num_train,
        num_val=args.num_val,
        size=tuple(args.size),
        seed=args.seed,
        num_classes=args.num_classes,
    )


# name -> (help, add source arguments, build the source from parsed arguments)
SOURCES: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], Source]]] = {
    "folder": ("images + masks folders paired by file stem", _add_folder, _folder),
    "camvid": ("CamVid, SegNet layout (train/ trainannot/ ...)", _add_root,
               lambda args: CamVid(args.root)),
    "ade20k": ("ADE20K ADEChallengeData2016 (150 classes)", _add_root,
               lambda args: ADE20K(args.root)),
    "cityscapes": ("Cityscapes leftImg8bit/ + gtFine/ (19 classes)", _add_root,
                   lambda args: Cityscapes(args.root)),
    "voc": ("PASCAL VOC 2012 (21 classes)", _add_root, lambda args: VOC(args.root)),
    "synthetic": ("generated shapes scenes for quick end-to-end checks", _add_synthetic,
                  _synthetic),
}  # fmt: skip


def _byte_size(text: str) -> int:
    """'268435456', '256M', '1G' -> bytes."""
    unit = BYTE_UNITS.get(text[-1:].lower(), 1)
    number = text[:-1] if unit > 1 else text
    try:
        return int(float(number) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M)") from None


def _write_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", required=True, help="output folder for shards + dataset.json")
    parser.add_argument("--splits", help="comma-separated splits (default: the source's usual)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    size.add_argument("--shard-bytes", type=_byte_size, help="target shard size, e.g. 256M")
    parser.add_argument("--lossless", action="store_true", help="store images as PNG")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="bad samples: stop (default) or leave them out and list them")  # fmt: skip
    parser.add_argument("--limit", type=int, help="first N samples per split (for tests)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset (all its splits) in --out")  # fmt: skip
    parser.add_argument("--allow-empty", action="store_true",
                        help="write splits without samples instead of failing")  # fmt: skip
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `segnext shards <source> ...` and `segnext shards verify OUT`."""
    parser = subparsers.add_parser(
        "shards", help="build or verify WebDataset shards", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="shards_command", required=True)
    common = _write_options()
    for name, (help_text, add_arguments, build) in SOURCES.items():
        command = commands.add_parser(name, parents=[common], help=help_text)
        add_arguments(command)
        command.set_defaults(func=_write, build_source=build)
    verify = commands.add_parser(
        "verify", help="re-read shards and check them against dataset.json"
    )
    verify.add_argument("out", help="shard folder or s3:// / gs:// URI")
    verify.add_argument("--max-problems", type=int, default=MAX_LISTED)
    verify.set_defaults(func=_verify)


def _write(args: argparse.Namespace) -> int:
    from data.shard_writer import Interrupted
    from data.storage import StorageError

    try:
        summary = _write_to(args.out, args)
    except (DataError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        signum = error.signum if isinstance(error, Interrupted) else 2
        print(
            f"interrupted: nothing written, {args.out} keeps what it held before.",
            file=sys.stderr,
        )
        return 128 + signum
    for item in summary.skipped[:MAX_LISTED]:
        print(f"skipped: {item['reason']}", file=sys.stderr)
    print(summary.line())
    return 0


def _write_to(out: str, args: argparse.Namespace):
    """Shards into a local folder, or into a remote one (s3://, gs://) by way of a local
    temporary folder uploaded once complete: the writer's atomic renames and lock need a local
    disk, and a half-uploaded dataset never carries a manifest (uploaded last)."""
    import dataclasses
    import tempfile

    from data import storage

    if not storage.is_remote(out):
        return _write_local(out, args)
    if storage.exists(f"{out.rstrip('/')}/dataset.json"):
        raise DataError(
            f"{out} already holds a dataset (dataset.json): remote shards are written to an "
            "empty prefix only. Fix: choose a new prefix, or write into a local folder (which "
            "keeps the splits you do not rewrite) and upload it"
        )
    with tempfile.TemporaryDirectory(prefix="segnext-shards-") as local:
        summary = _write_local(local, args)
        manifest = Path(local) / "dataset.json"
        staged = manifest.rename(Path(local).parent / f"{Path(local).name}.dataset.json")
        try:
            storage.upload(local, out)
            storage.upload(staged, f"{out.rstrip('/')}/dataset.json")
        finally:
            staged.unlink(missing_ok=True)
    return dataclasses.replace(summary, out=out)


def _write_local(out: str, args: argparse.Namespace):
    from data.shard_writer import write_shards

    return write_shards(
        args.build_source(args),
        out,
        splits=[s.strip() for s in args.splits.split(",")] if args.splits else None,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        image_format="png" if args.lossless else "jpg",
        jpeg_quality=args.jpeg_quality,
        on_error=args.on_error,
        workers=args.workers,
        limit=args.limit,
        progress=True,
        overwrite=args.overwrite,
        allow_empty=args.allow_empty,
    )


def _verify(args: argparse.Namespace) -> int:
    from data.shard_verify import verify

    try:
        report = verify(args.out, max_problems=args.max_problems, progress=True)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: verification stopped (nothing was changed).", file=sys.stderr)
        return 130
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(report.line())
    return 0 if report.ok else 1
