"""`segnext eval`: scores checked against confusion matrices computed by hand from the shard
files, and the Ray Data path checked against the single-process path."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_registry import single_thread, sqlite_store, tiny_checkpoint  # noqa: F401

from data.shard_writer import write_shards
from data.sources.synthetic import Synthetic
from pipelines.commands.evaluate import EvalOptions, evaluate, format_report
from segnext.metrics import ConfusionMatrix

SOURCE = Synthetic(num_train=0, num_val=6, size=(64, 96), num_classes=6)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 synthetic 64x96 validation samples in two shards (PNG: lossless, known pixels)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(SOURCE, out, splits=["val"], shard_size=4, image_format="png")
    return out


def _checkpoint(folder: Path, **kwargs) -> Path:
    palette = [list(color) for color in SOURCE.palette]
    return tiny_checkpoint(folder, class_names=SOURCE.classes, palette=palette, **kwargs)


def _samples(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) pairs read straight from the tar files, without the data loaders."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                key, _, member = info.name.partition(".")
                members.setdefault(key, {})[member] = tar.extractfile(info).read()
    assert len(members) == SOURCE.num_val
    return [
        (
            np.asarray(Image.open(io.BytesIO(sample["image.png"])).convert("RGB")),
            np.asarray(Image.open(io.BytesIO(sample["mask.png"]))),
        )
        for _, sample in sorted(members.items())
    ]


def test_constant_model_scores_as_computed_by_hand(shards, tmp_path):
    predicted = 2
    result = evaluate(
        str(_checkpoint(tmp_path, constant_class=predicted)), str(shards), distributed="off"
    )
    k = len(SOURCE.classes)
    pixels = np.zeros(k, dtype=np.int64)  # valid pixels of each true class
    for _, mask in _samples(shards):
        valid = mask[mask != 255]
        pixels += np.bincount(valid, minlength=k)[:k]
    expected = np.zeros((k, k), dtype=np.int64)
    expected[:, predicted] = pixels
    np.testing.assert_array_equal(result.matrix, expected)

    # IoU: the predicted class scores its share of all pixels, every other present class 0
    total = pixels.sum()
    ious = [pixels[c] / total if c == predicted else 0.0 for c in range(k) if pixels[c] > 0]
    assert result.scores["mIoU"] == pytest.approx(sum(ious) / len(ious))
    assert result.scores["aAcc"] == pytest.approx(pixels[predicted] / total)
    assert not result.distributed and result.num_samples == SOURCE.num_val
    assert result.scores["confused_pairs"][0]["pred"] == SOURCE.classes[predicted]


def test_random_model_matches_a_direct_forward_pass(shards, tmp_path):
    checkpoint = _checkpoint(tmp_path, seed=3)
    result = evaluate(
        str(checkpoint),
        str(shards),
        options=EvalOptions(mode="whole", batch_size=1),
        distributed="off",
    )
    from pipelines.checkpoint_io import load_checkpoint, model_from_checkpoint

    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload)
    mean = torch.tensor(payload["meta"].mean).view(1, 3, 1, 1)
    std = torch.tensor(payload["meta"].std).view(1, 3, 1, 1)
    expected = ConfusionMatrix(len(SOURCE.classes))
    with torch.inference_mode():
        for image, mask in _samples(shards):  # 64x96: a multiple of 32, so no padding
            x = (torch.tensor(image).permute(2, 0, 1)[None].float() - mean) / std
            expected.update(model(x).argmax(dim=1)[0], torch.tensor(mask))
    np.testing.assert_array_equal(result.matrix, expected.matrix.numpy())
    assert result.scores["mIoU"] == pytest.approx(expected.compute()["mIoU"])


@pytest.mark.parametrize("rule", ["product", "general"])
def test_decision_scores_the_integrated_head_under_another_rule(shards, tmp_path, rule):
    """`--decision`: the saved weights predict with the rule asked for, and the report says
    which; the checkpoint keeps the rule it was saved with (refine)."""
    checkpoint = _checkpoint(tmp_path, seed=5, classifier="integrated",
                             classifier_kwargs={"decision": "refine"})
    result = evaluate(str(checkpoint), str(shards), distributed="off",
                      options=EvalOptions(mode="whole", batch_size=1, decision=rule))
    from pipelines.checkpoint_io import load_checkpoint, model_from_checkpoint

    payload = load_checkpoint(checkpoint)
    assert payload["meta"].classifier_kwargs.to_dict() == {"decision": "refine"}
    model = model_from_checkpoint(payload)
    model.decode_head.classifier.decision = rule
    mean = torch.tensor(payload["meta"].mean).view(1, 3, 1, 1)
    std = torch.tensor(payload["meta"].std).view(1, 3, 1, 1)
    expected = ConfusionMatrix(len(SOURCE.classes))
    with torch.inference_mode():
        for image, mask in _samples(shards):
            x = (torch.tensor(image).permute(2, 0, 1)[None].float() - mean) / std
            expected.update(model(x).argmax(dim=1)[0], torch.tensor(mask))
    np.testing.assert_array_equal(result.matrix, expected.matrix.numpy())
    assert result.settings["decision"] == rule
    assert f"decision {rule}" in format_report(result, "val")


def test_decision_refusals_name_the_rule_or_the_model(shards, tmp_path, capsys):
    from pipelines.cli import main

    argv = ["eval", "--model", str(_checkpoint(tmp_path)), "--data", str(shards),
            "--distributed", "off", "--log-to", "none"]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--decision", "best"])
    assert stopped.value.code == 2
    assert "'best' is not one of product, general, refine" in capsys.readouterr().err
    assert main([*argv, "--decision", "general"]) == 2
    assert "this model's head is standard" in capsys.readouterr().err


def test_eval_rejects_a_model_of_another_dataset(shards, tmp_path):
    with pytest.raises(ValueError, match="predicts 3 classes but .* has 6"):
        evaluate(str(tiny_checkpoint(tmp_path)), str(shards), distributed="off")


@pytest.fixture
def ray_cluster():
    import ray

    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_path_matches_single_process_and_logs_to_mlflow(shards, tmp_path, ray_cluster):
    from mlflow import MlflowClient

    from pipelines.cli import main

    checkpoint = str(_checkpoint(tmp_path, seed=5))
    local = evaluate(checkpoint, str(shards), distributed="off")
    uri, _ = sqlite_store(tmp_path)
    scores_file = tmp_path / "scores.json"
    argv = ["eval", "--model", checkpoint, "--data", str(shards), "--distributed", "on"]
    argv += ["--workers", "1", "--tracking-uri", uri, "--json", str(scores_file)]
    assert main(argv) == 0
    distributed = json.loads(scores_file.read_text())
    np.testing.assert_array_equal(np.asarray(distributed["matrix"]), local.matrix)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("segnext").experiment_id])
    metrics = run.data.metrics
    assert metrics["eval/val/mIoU"] == pytest.approx(local.scores["mIoU"])
    assert metrics["eval/val/aAcc"] == pytest.approx(local.scores["aAcc"])
    for name, iou in zip(SOURCE.classes, local.scores["per_class_iou"], strict=True):
        if not math.isnan(iou):
            assert metrics[f"eval/val/IoU/{name}"] == pytest.approx(iou)
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "eval/val")}
    assert {"eval/val/confusion_matrix.png", "eval/val/metrics.json"} <= logged
    assert run.data.tags["segnext.eval.model"] == checkpoint
