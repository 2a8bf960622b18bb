"""onnxruntime CPU vs PyTorch CPU latency of the exported network, same machine, same run.

Builds SegNeXt (default T, 150 classes, official init: latency does not depend on the weights),
exports it with `pipelines.commands.export.export_onnx` (the verified export `segnext export` runs),
then times the bare network, batch 1 at 512x512 by default, alternating PyTorch and
onnxruntime call by call so both see the same load from other jobs. Prints wall and process-CPU
milliseconds per call (median, p10, p90) and the load average before and after, for each
thread count (torch intra-op threads = onnxruntime intra-op threads).

    python bench/onnx_latency.py                              # T, 150 classes, 512x512, 1 and 2 threads
    python bench/onnx_latency.py --variant s --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import segnext
from pipelines.checkpoint_io import build_meta, save_checkpoint
from pipelines.commands.export import export_onnx
from pipelines.inference.onnx_runtime import OnnxSegmenter

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "camvid" / "test"


def _checkpoint(folder: Path, variant: str, classes: int, size: tuple[int, int]) -> Path:
    torch.manual_seed(0)
    model = segnext.create_model(variant, classes)
    meta = build_meta(
        variant=model.variant,
        num_classes=classes,
        classifier="standard",
        classifier_kwargs={},
        nmf={},
        class_names=[f"class{i}" for i in range(classes)],
        palette=[[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(classes)],
        ignore_index=255,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        crop_size=list(size),
    )
    return save_checkpoint(folder, {"model": model.state_dict(), "iteration": 0, "meta": meta})


def _image(folder: Path) -> Path:
    found = sorted(CAMVID.glob("*.png"))[:1]
    if found:
        return found[0]
    from PIL import Image

    path = folder / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)).save(path)
    return path


def _timed(call: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)


def _summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    tenth = ordered[len(ordered) // 10]
    ninetieth = ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)]
    return f"{statistics.median(ordered):.0f} ({tenth:.0f}-{ninetieth:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch and onnxruntime intra-op threads (each value in turn)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = tuple(args.size)

    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as folder:
        folder = Path(folder)
        checkpoint = _checkpoint(folder / "ckpt", args.variant, args.classes, size)
        start = time.perf_counter()
        report = export_onnx(str(checkpoint), folder / "model.onnx", image=_image(folder))
        export_s = time.perf_counter() - start
        from pipelines.checkpoint_io import load_checkpoint, model_from_checkpoint

        network = model_from_checkpoint(load_checkpoint(checkpoint))
        x = np.random.default_rng(1).standard_normal((1, 3, *size)).astype(np.float32)
        tensor = torch.from_numpy(x)

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return network(tensor).numpy()

        rows, loads = [], [os.getloadavg()[0]]
        for threads in args.threads:
            torch.set_num_threads(threads)
            runtime = OnnxSegmenter(report.path, threads=threads,
                                    providers=["CPUExecutionProvider"])
            expected, got = run_torch(), runtime.network(x)
            agreement = float((expected.argmax(1) == got.argmax(1)).mean())
            for _ in range(args.warmup):
                run_torch(), runtime.network(x)
            times: dict[str, list[tuple[float, float]]] = {"torch": [], "onnx": []}
            run_onnx = functools.partial(runtime.network, x)
            for i in range(args.repeats):  # alternate the order so neither always goes first
                order = (("torch", run_torch), ("onnx", run_onnx))
                for name, call in order if i % 2 == 0 else order[::-1]:
                    times[name].append(_timed(call))
            loads.append(os.getloadavg()[0])
            rows.append((threads, times, float(np.abs(expected - got).max()), agreement))

    import onnxruntime

    print(f"# {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# SegNeXt-{args.variant} {args.classes} classes, batch 1 at {size[0]}x{size[1]}, "
          f"{args.repeats} alternating calls after {args.warmup} warm-up per thread count; "
          f"load average {' -> '.join(f'{load:.1f}' for load in loads)}")
    print(f"# export {export_s:.1f} s, {report.exported_mb:.1f} MB; {report.lines()[1]}")
    print("| threads | runtime | wall ms/call median (p10-p90) | process CPU ms/call median "
          "(p10-p90) | max abs score diff, argmax agreement |")
    print("|---|---|---|---|---|")
    for threads, times, diff, agreement in rows:
        for name, label in (("torch", "PyTorch (eager, inference_mode)"), ("onnx", "onnxruntime")):
            wall, cpu = zip(*times[name], strict=True)
            check = f"{diff:.2g}, {100 * agreement:.3f}%" if name == "onnx" else ""
            print(f"| {threads} | {label} | {_summary(list(wall))} | {_summary(list(cpu))} | {check} |")
        ratio = [statistics.median(v[i] for v in times["torch"]) /
                 statistics.median(v[i] for v in times["onnx"]) for i in (0, 1)]
        print(f"# {threads} threads: PyTorch / onnxruntime median wall {ratio[0]:.2f}x, "
              f"CPU {ratio[1]:.2f}x")


if __name__ == "__main__":
    main()
