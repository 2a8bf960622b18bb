"""`segnext export`: a trained SegNeXt as an ONNX file, verified by onnxruntime before it is kept.

The graph is the eval-mode network (normalised float32 images in, scores at the input size out)
with dynamic batch and, by default, dynamic height and width; `--height/--width` fixes the size
instead (the runtime then slides windows of that size). The NMF's deterministic eval bases are
buffers, so they land in the graph as constants; a model built with `nmf_random_eval_bases` is
refused (fresh random bases at every forward cannot be expressed).

Exporter: torch's TorchScript-based `torch.onnx.export(dynamo=False)`. The torch.export-based
exporter also exports this model (with `Dim.AUTO` shapes), but takes about 18 s for SegNeXt-T
on the 2-core dev box against about 1.5 s, for the same graph numerics; the legacy one needs a
symbolic for `aten::mT` (the NMF's batched transpose), registered here while exporting.

Before the file is moved into place, onnxruntime runs it on a real image (`--image`, else the
first validation image of the run's shards) next to PyTorch; the max abs score difference and
the argmax agreement are printed, and below `--min-agreement` (99.9%) nothing is written.
Everything the runtime needs (class names, palette, normalisation, eval settings) goes into the
file's metadata (`pipelines.inference.onnx_runtime.METADATA_KEY`). With `--register` the file is added
to the registered model version it came from (`pipelines.tracking.registry.attach_onnx`); MLflow
is reached through `pipelines.tracking` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tarfile
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from data.manifest import load_manifest
from data.storage import resolve_filesystem
from data.transforms import rescaled_size
from pipelines.arg_types import fraction, onnx_opset, positive_int
from pipelines.commands.predict import read_rgb
from pipelines.meta import payload_meta
from pipelines.metric_names import SCORE
from pipelines.tracking.registry import attach_onnx, registered_version, use_tracking_uri

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

# Imported inside the functions below, not here: torch, onnx and onnxruntime and what imports
# them (pipelines.checkpoint_io, pipelines.inference.*, pipelines.tracking.models): 0.05-2 s
# each of CPU at import, measured after `segnext --help`'s own imports, which include this
# module (pipelines.cli.SUBCOMMAND_MODULES).

DEFAULT_OPSET = 17
MIN_AGREEMENT = 0.999
INPUT_NAME, OUTPUT_NAME = "image", "scores"


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported file disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    image: str  # the verification image
    input_shape: tuple[int, ...]  # what the verification fed the network
    max_abs_diff: float  # onnxruntime vs PyTorch scores
    agreement: float  # fraction of pixels with the same argmax
    exported_mb: float

    def lines(self) -> list[str]:
        return [
            f"wrote {self.path} ({self.exported_mb:.1f} MB)",
            f"verified on {self.image}, input {'x'.join(map(str, self.input_shape))}: max abs "
            f"score difference {self.max_abs_diff:.3g}, argmax agreement "
            f"{100 * self.agreement:.4f}%",
        ]


def export_onnx(
    model: str,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    size: tuple[int, int] | None = None,
    image: str | Path | None = None,
    min_agreement: float = MIN_AGREEMENT,
) -> ExportReport:
    """Export `model` (checkpoint, MLflow model folder or URI) to `out`; see module docstring.

    size: fixed (height, width) input, or None for dynamic height and width.
    """
    import onnx
    import torch

    from pipelines.checkpoint_io import model_from_checkpoint
    from pipelines.inference.onnx_runtime import METADATA_KEY, OnnxSegmenter
    from pipelines.inference.segmenter import SIZE_DIVISOR, SLIDE_ABOVE_CROPS
    from pipelines.tracking.models import load_source, resolve_model

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: the file name must end in .onnx")
    if size is not None and min(size) < SIZE_DIVISOR:
        raise ExportError(f"--height/--width {size}: each must be at least {SIZE_DIVISOR}")
    source = resolve_model(model)
    payload = load_source(source)
    model_meta = payload["meta"]  # a ModelMeta, checked by load_checkpoint
    if model_meta.nmf.get("random_eval_bases"):
        raise ExportError(
            f"{model} draws random NMF bases at every forward (nmf.random_eval_bases=true), "
            "which ONNX cannot express; retrain or rebuild it with deterministic eval bases"
        )
    network = model_from_checkpoint(payload, str(model))
    picture, image_name = _verification_image(image, payload)
    metadata = _metadata(payload, source.reference, size, opset, SIZE_DIVISOR, SLIDE_ABOVE_CROPS)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".onnx.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _trace(network, tmp, size or model_meta.crop_size, dynamic_size=size is None, opset=opset)
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(metadata)})
        graph.doc_string = f"SegNeXt-{model_meta.variant} exported from {source.reference}"
        onnx.save(graph, str(tmp))
        runtime = OnnxSegmenter(tmp)
        x = _network_input(runtime, picture, size)
        with torch.inference_mode():
            expected = network(torch.from_numpy(x)).numpy()
        got = runtime.network(x)
        diff = float(np.abs(got - expected).max())
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        if not agreement >= min_agreement:  # also catches NaN
            raise ExportError(
                f"onnxruntime and PyTorch disagree on {image_name}: argmax agreement "
                f"{100 * agreement:.4f}% < {100 * min_agreement:.2f}% (max abs score difference "
                f"{diff:.3g}); nothing written. Try another --opset or report the model's config"
            )
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the file private
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(
        out, image_name, tuple(x.shape), diff, agreement, out.stat().st_size / 2**20
    )


@contextmanager
def _mt_symbolic(opset: int) -> Iterator[None]:
    """ONNX for `aten::mT` (the batched transpose in segnext.ham.NMF) during one export."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    def batched_transpose(g: Any, x: Any) -> Any:
        return g.op("Transpose", x, perm_i=[0, 2, 1])  # the NMF's tensors are all 3-d

    register_custom_op_symbolic("aten::mT", batched_transpose, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::mT", opset)


@contextmanager
def _exporter_log_discarded() -> Iterator[None]:
    """The TorchScript exporter's log, sent to nowhere: torch 2.x turns its ONNX log on for
    every export (`setup_onnx_logging` tests `_C._jit_is_onnx_log_enabled` without calling
    it) and, when a conversion fails, C++ writes the whole Torch IR graph (340 KB for
    SegNeXt-T) to file descriptor 1 before our one-line error. `redirect_stdout` cannot catch
    a C++ write, so descriptor 1 itself points at /dev/null meanwhile."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _trace(
    network: torch.nn.Module,
    path: Path,
    size: tuple[int, int],
    *,
    dynamic_size: bool,
    opset: int,
) -> None:
    import torch

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    example = torch.zeros(1, 3, *size)
    with warnings.catch_warnings(), _mt_symbolic(opset), _exporter_log_discarded():
        # the legacy exporter's deprecation notice, tracer notes about shape checks that are
        # constant for this model (the size comparisons in segnext.classifier._resize), and
        # old opsets' "Upsample may not match PyTorch" notes: the onnxruntime check below
        # measures the agreement itself
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            torch.onnx.export(
                network,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                do_constant_folding=True,
            )
        except Exception as error:  # the exporter raises several unrelated types
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {first}") from error


def _metadata(
    payload: dict[str, Any],
    reference: str,
    size: tuple[int, int] | None,
    opset: int,
    size_divisor: int,
    slide_above_crops: int,
) -> dict[str, Any]:
    """The runtime's settings: the registered model's (pipelines.inference.segmenter), as JSON."""
    import torch

    from pipelines.inference.onnx_runtime import FORMAT
    from pipelines.inference.segmenter import settings_from_checkpoint

    settings = dataclasses.asdict(settings_from_checkpoint(payload))
    settings.update(size_divisor=size_divisor, slide_above_crops=slide_above_crops)
    metrics = payload.get("metrics") or {}
    meta = payload_meta(payload)
    return {
        "format": FORMAT,
        **meta.describe(),  # flat, for readers of the JSON; the runtime reads "meta"
        "meta": meta.to_dict(),
        "settings": settings,
        "input_size": None if size is None else list(size),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "source": reference,
        "iteration": int(payload.get("iteration", 0)),
        "val_mIoU": metrics.get(SCORE),
        "opset": opset,
        "torch": torch.__version__,
    }


def _network_input(runtime: Any, picture: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """The verification image as the network sees it: normalised, at the export size (fixed)
    or at the runtime's test size padded to the encoder stride (dynamic)."""
    from pipelines.inference.onnx_runtime import resize_bilinear

    x = runtime.normalise(picture[None])
    if size is not None:
        return resize_bilinear(x, size)
    target = rescaled_size(*picture.shape[:2], runtime.settings.scale)
    x = resize_bilinear(x, target)
    divisor = runtime.settings.size_divisor
    pad = ((0, 0), (0, 0), (0, (-target[0]) % divisor), (0, (-target[1]) % divisor))
    return np.ascontiguousarray(np.pad(x, pad))


def _verification_image(image: str | Path | None, payload: dict[str, Any]) -> tuple[Any, str]:
    """(RGB uint8 array, its name): `image`, else the first validation image of the shards."""
    if image is not None:
        path = Path(image)
        if not path.is_file():
            raise ExportError(f"--image {path}: no such file")
        return read_rgb(path), str(path)
    config = payload.get("config") or {}
    root = config.get("data.root")
    found = _first_shard_image(str(root), str(config.get("data.val_split") or "val")) if root else None
    if found is None:
        raise ExportError(
            "no image to verify the export with: the checkpoint's training shards "
            f"({root or 'not recorded'}) are not readable here; pass --image FILE"
        )
    return found


def _first_shard_image(root: str, split: str) -> tuple[np.ndarray, str] | None:
    try:
        urls = load_manifest(root).shard_urls(split)
        filesystem, path = resolve_filesystem(urls[0])
        with filesystem.open_input_stream(path) as stream, tarfile.open(
            fileobj=stream, mode="r|*"
        ) as tar:
            for info in tar:
                if info.isfile() and ".image." in info.name:
                    data = tar.extractfile(info).read()
                    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                    return rgb, f"{urls[0]}:{info.name}"
    except Exception:  # unreadable here (moved, remote without credentials): caller says so
        return None
    return None


# ---------------------------------------------------------------------------------- command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX, verified with onnxruntime",
        description="Export a checkpoint or registered model (models:/segnext@champion) to "
        "ONNX: eval-mode network, dynamic batch and size; onnxruntime must agree with PyTorch "
        "on a real image or nothing is written. Run it with `segnext predict --model FILE.onnx`.",
    )
    parser.add_argument("--model", required=True, help="checkpoint path or MLflow model URI")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=onnx_opset, default=DEFAULT_OPSET, help="ONNX opset (17)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--dynamic", action="store_true", help="dynamic height/width (default)")
    size.add_argument("--height", type=positive_int, default=None, help="fixed input height (with --width)")
    parser.add_argument("--width", type=positive_int, default=None, help="fixed input width")
    parser.add_argument(
        "--image", default=None, help="verification image (default: first val image of the shards)"
    )
    parser.add_argument(
        "--min-agreement", type=fraction, default=MIN_AGREEMENT, help="argmax agreement needed"
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="add the file to the registered version --model names (models:/NAME/VERSION)",
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if (args.height is None) != (args.width is None) or (args.dynamic and args.width):
        raise ExportError("pass --height H --width W together (a fixed size), or --dynamic")
    uri = use_tracking_uri(args.tracking_uri)  # for models:/ references
    target = registered_version(args.model, tracking_uri=uri) if args.register else None
    size = None if args.height is None else (args.height, args.width)
    report = export_onnx(  # an ExportError becomes `segnext export: error: ...` (pipelines.cli)
        args.model,
        args.out,
        opset=args.opset,
        size=size,
        image=args.image,
        min_agreement=args.min_agreement,
    )
    print("\n".join(report.lines()))
    if target is not None:
        version = attach_onnx(report.path, registry_name=target[0], version=target[1],
                              tracking_uri=uri)
        print(f"added to {target[0]} v{target[1]}: {version.tags['onnx']}")
    print(f"run it: segnext predict --model {report.path} --input IMAGES --out OUT_DIR")
    return 0
