"""`segnext export` + the torch-free ONNX runtime: same masks as the registered model, both
classifiers, dynamic and fixed sizes, the registry artifact, and refusals that leave no file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_registry import CLASSES, PALETTE, single_thread, sqlite_store, tiny_checkpoint  # noqa: F401

import segnext
from pipelines.checkpoint_io import build_meta, load_checkpoint, save_checkpoint
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

CAMVID = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "camvid" / "test"
AGREEMENT = 0.999


def _write_image(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _real_image(folder: Path) -> Path:
    """A CamVid street scene where the shared datasets are present, else a generated picture."""
    found = sorted(CAMVID.glob("*.png"))[:1]
    return found[0] if found else _write_image(folder / "scene.png", 90, 120, 7)


def _checkpoint(
    folder: Path, classifier: str, nmf: dict | None = None, classifier_kwargs: dict | None = None
) -> Path:
    torch.manual_seed(1)
    kwargs = dict(classifier_kwargs or {})
    model = segnext.create_model("tiny", len(CLASSES), classifier=classifier,
                                 classifier_kwargs=kwargs)
    meta = build_meta(
        variant="tiny",
        num_classes=len(CLASSES),
        classifier=classifier,
        classifier_kwargs=kwargs,
        nmf=dict(nmf or {}),
        class_names=list(CLASSES),
        palette=[list(color) for color in PALETTE],
        ignore_index=255,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        crop_size=[64, 64],
    )
    payload = {"model": model.state_dict(), "iteration": 3, "metrics": {}, "meta": meta}
    return save_checkpoint(folder, payload)


def _agreement(first: Path, second: Path, stems: list[str]) -> list[float]:
    return [
        float((np.asarray(Image.open(first / f"{s}_mask.png")) == np.asarray(
            Image.open(second / f"{s}_mask.png"))).mean())
        for s in stems
    ]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model registered as segnext v1, exported with --register; (uri, folder, onnx)."""
    from mlflow import MlflowClient

    from pipelines.tracking.registry import register_checkpoint

    folder = tmp_path_factory.mktemp("export")
    uri, experiment = sqlite_store(folder)
    run_id = MlflowClient(uri).create_run(experiment).info.run_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_checkpoint(tiny_checkpoint(folder / "ckpt"), run_id=run_id, tracking_uri=uri)
    onnx_file = folder / "segnext.onnx"
    argv = ["export", "--model", "models:/segnext/1", "--out", str(onnx_file), "--register"]
    code = main([*argv, "--image", str(_real_image(folder)), "--tracking-uri", uri])
    torch.set_num_threads(threads)
    assert code == 0
    return uri, folder, onnx_file


def test_onnx_predict_writes_the_registered_models_masks(registered):
    import mlflow
    from mlflow import MlflowClient

    uri, folder, onnx_file = registered
    version = MlflowClient(uri).get_model_version("segnext", "1")
    assert version.tags["onnx"] == "models:/segnext/1/model.onnx"
    assert len(version.tags["onnx_sha256"]) == 64
    mlflow.set_tracking_uri(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/segnext/1"))
    assert {"MLmodel", "model.onnx"} <= {p.name for p in model_dir.iterdir()}  # both flavours
    assert (model_dir / "model.onnx").read_bytes() == onnx_file.read_bytes()

    images = folder / "images"
    images.mkdir()
    _write_image(images / "small.png", 40, 60, 0)  # whole image, padded to 64x64
    _write_image(images / "wide.png", 100, 200, 1)  # above 4 crops: sliding windows
    stems = ["small", "wide"]
    common = ["--input", str(images), "--tracking-uri", uri]
    assert main(["predict", "--model", "models:/segnext/1", *common, "--out", str(folder / "a")]) == 0
    # the registered version's ONNX artifact, fetched by its URI (the `onnx` tag)
    onnx_uri = version.tags["onnx"]
    assert main(["predict", "--model", onnx_uri, *common, "--out", str(folder / "b")]) == 0
    assert min(_agreement(folder / "a", folder / "b", stems)) >= AGREEMENT
    legend = json.loads((folder / "b" / "classes.json").read_text())
    assert legend == json.loads((folder / "a" / "classes.json").read_text())
    mask = Image.open(folder / "b" / "wide_mask.png")
    assert mask.mode == "P" and mask.size == (200, 100)
    assert mask.getpalette()[: 3 * len(PALETTE)] == [c for color in PALETTE for c in color]

    # forced modes and test-time augmentation follow the same rules as the PyTorch model
    tiny = folder / "tiny"
    tiny.mkdir()
    _write_image(tiny / "t.png", 36, 44, 2)
    for flags, name in ((["--mode", "slide"], "s"), (["--tta"], "tta")):
        args = ["--input", str(tiny), "--tracking-uri", uri, *flags]
        assert main(["predict", "--model", "models:/segnext/1", *args, "--out", str(folder / name)]) == 0
        assert main(["predict", "--model", str(onnx_file), *args, "--out", str(folder / f"{name}x")]) == 0
        assert min(_agreement(folder / name, folder / f"{name}x", ["t"])) >= AGREEMENT


def test_onnx_path_imports_no_torch(registered, tmp_path):
    _, _, onnx_file = registered
    image = _write_image(tmp_path / "x.png", 30, 50, 3)
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        f"assert main(['predict', '--model', {str(onnx_file)!r}, '--input', {str(image)!r},"
        f" '--out', {str(tmp_path / 'out')!r}]) == 0\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "x_mask.png").is_file()


def test_integrated_classifier_dynamic_and_fixed_size(tmp_path):
    import onnxruntime as ort

    from pipelines.inference.onnx_runtime import OnnxSegmenter
    from pipelines.tracking.models import load_segmenter

    # top_k < K: the refinement decides among each pixel's 2 best general candidates (topk +
    # scatter in the graph)
    checkpoint = _checkpoint(tmp_path / "ckpt", "integrated", classifier_kwargs={"top_k": 2})
    image = _real_image(tmp_path)
    dynamic, fixed = tmp_path / "dynamic.onnx", tmp_path / "fixed.onnx"
    base = ["export", "--model", str(checkpoint), "--image", str(image)]
    assert main([*base, "--out", str(dynamic), "--dynamic"]) == 0
    assert main([*base, "--out", str(fixed), "--height", "64", "--width", "64"]) == 0

    shapes = {
        path.name: ort.InferenceSession(str(path)).get_inputs()[0].shape
        for path in (dynamic, fixed)
    }
    assert shapes == {"dynamic.onnx": ["batch", 3, "height", "width"],
                      "fixed.onnx": ["batch", 3, 64, 64]}
    runtime = OnnxSegmenter(dynamic)
    assert runtime.meta == load_checkpoint(checkpoint)["meta"]  # the whole ModelMeta travels
    assert runtime.meta.classifier == runtime.metadata["classifier"] == "integrated"
    assert runtime.class_names == list(CLASSES) and runtime.palette == [list(c) for c in PALETTE]

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(2)]  # one batch
    torch_masks = load_segmenter(checkpoint, device="cpu").predict(images)
    for mask, expected in zip(runtime.predict(images), torch_masks, strict=True):
        assert mask.shape == (48, 80) and (mask == expected).mean() >= AGREEMENT
    # a fixed-size file runs windows of its size; so does the PyTorch model told to slide them
    windows = load_segmenter(checkpoint, device="cpu", mode="slide", crop_size=(64, 64))
    for mask, expected in zip(
        OnnxSegmenter(fixed).predict(images), windows.predict(images), strict=True
    ):
        assert (mask == expected).mean() >= AGREEMENT
    with pytest.raises(ValueError, match="exported for 64x64 inputs only"):
        OnnxSegmenter(fixed, mode="whole")


def test_the_default_decision_rule_travels_into_the_onnx_file(tmp_path):
    """A training run writes decision "general" into an integrated head's meta (issue 27): the
    exported graph predicts with that rule, as the PyTorch model does."""
    from pipelines.inference.onnx_runtime import OnnxSegmenter
    from pipelines.tracking.models import load_segmenter

    checkpoint = _checkpoint(tmp_path / "ckpt", "integrated",
                             classifier_kwargs={"decision": "general"})
    out = tmp_path / "general.onnx"
    image = _real_image(tmp_path)
    assert main(["export", "--model", str(checkpoint), "--image", str(image), "--out", str(out),
                 "--dynamic"]) == 0
    runtime = OnnxSegmenter(out)
    assert runtime.meta.classifier_kwargs.to_dict() == {"decision": "general"}
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)]
    segmenter = load_segmenter(checkpoint, device="cpu")
    assert segmenter.model.decode_head.classifier.decision == "general"
    mask, expected = runtime.predict(images)[0], segmenter.predict(images)[0]
    assert (mask == expected).mean() >= AGREEMENT


def test_disagreement_is_refused_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    from pipelines.inference.onnx_runtime import OnnxSegmenter

    real = OnnxSegmenter.network
    monkeypatch.setattr(  # a broken export: the classes come out in the wrong order
        OnnxSegmenter, "network", lambda self, x: np.roll(real(self, x), 1, axis=1)
    )
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "models" / "bad.onnx"
    image = _write_image(tmp_path / "x.png", 64, 96, 5)
    argv = ["export", "--model", str(checkpoint), "--out", str(out), "--image", str(image)]
    assert main(argv) == 2
    assert "onnxruntime and PyTorch disagree" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary one


def test_refusals_name_the_problem(tmp_path, capsys):
    random_bases = _checkpoint(tmp_path / "random", "standard", nmf={"random_eval_bases": True})
    argv = ["export", "--model", str(random_bases), "--out", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    assert "nmf.random_eval_bases=true" in capsys.readouterr().err
    plain = tiny_checkpoint(tmp_path / "plain")  # no training shards recorded, no --image
    assert main(["export", "--model", str(plain), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pass --image FILE" in capsys.readouterr().err
    assert main(["export", "--model", str(plain), "--out", str(tmp_path / "m.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx*"))


def test_an_opset_that_cannot_export_gives_one_line_not_the_graph(tmp_path, capfd):
    """Opset 7 is one torch exports, but not this model's bilinear resize: the error is one
    line, without the 340 KB Torch IR graph the exporter's C++ log writes to descriptor 1 or
    its old-opset warnings (issue 29, finding 9)."""
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    image = _write_image(tmp_path / "x.png", 64, 64, 3)
    argv = ["export", "--model", str(checkpoint), "--out", str(tmp_path / "m.onnx"),
            "--image", str(image), "--opset", "7"]
    assert main(argv) == 2
    out, err = capfd.readouterr()
    assert "segnext export: error: torch.onnx.export failed at opset 7" in err
    assert len(out) + len(err) < 1000, (out[:300], err[:300])
    assert not list(tmp_path.glob("*.onnx*"))


def test_runtime_refuses_foreign_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from pipelines.inference.onnx_runtime import OnnxModelError, OnnxSegmenter

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(OnnxModelError, match="without 'segnext' metadata"):
        OnnxSegmenter(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="cannot load it as an ONNX model"):
        OnnxSegmenter(garbage)
    with pytest.raises(OnnxModelError, match="no such ONNX file"):
        OnnxSegmenter(tmp_path / "missing.onnx")


@pytest.mark.parametrize(("source", "target"), [((7, 9), (16, 20)), ((33, 40), (8, 13))])
def test_numpy_resize_is_torch_bilinear(source, target):
    import torch.nn.functional as F

    from pipelines.inference.onnx_runtime import resize_bilinear

    x = np.random.default_rng(0).standard_normal((2, 3, *source)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=target, mode="bilinear",
                             align_corners=False).numpy()
    assert np.abs(resize_bilinear(x, target) - expected).max() < 1e-5


def test_verification_image_defaults_to_the_training_shards(tmp_path):
    from data.shard_writer import write_shards
    from data.sources import Synthetic
    from pipelines.commands.export import export_onnx

    write_shards(Synthetic(num_train=2, num_val=2, size=(64, 64)), tmp_path / "shards")
    config = {"data.root": str(tmp_path / "shards"), "data.val_split": "val"}
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", config=config)
    report = export_onnx(str(checkpoint), tmp_path / "m.onnx")
    assert report.image.startswith(str(tmp_path / "shards" / "val-")) and ".image." in report.image
    assert report.input_shape == (1, 3, 64, 64) and report.agreement >= AGREEMENT
