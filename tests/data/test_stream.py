"""The Ray Data stream and the plain torch loader: shapes and dtypes, the same samples in both,
fresh augmentation per epoch, errors that name shard and key, skip mode that counts."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.loader import ShardSamples, build_torch_loader, read_shard
from data.samples import SamplePipeline, SampleReadError, build_pipeline
from data.shards import load_manifest
from data.transforms import MEAN, STD, normalize_batch

CROP = (40, 48)  # synthetic scenes are 64x64: random resize 0.5-2.0 then crop
VAL_PAD = (72, 80)


def member_offset(shard: Path, member: str) -> int:
    with tarfile.open(shard) as tar:
        return tar.getmember(member).offset_data


def first_key(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        return tar.getnames()[0].split(".")[0]


@pytest.fixture
def broken_shards(synthetic_shards: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic shards whose first train sample has a corrupt image (same size,
    so only decoding can tell)."""
    root = tmp_path / "broken"
    shutil.copytree(synthetic_shards, root)
    shard = root / "train-000000.tar"
    offset = member_offset(shard, f"{first_key(shard)}.image.jpg")
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * 64)
    return root


@pytest.fixture
def truncated_shards(synthetic_shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "truncated"
    shutil.copytree(synthetic_shards, root)
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return root


def sample_digest(image: np.ndarray, mask: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + mask.tobytes()).hexdigest()


def torch_samples(root: Path, *, epoch: int = 0, train: bool = True) -> list[dict]:
    manifest = load_manifest(root)
    crop = CROP if train else VAL_PAD
    pipeline = build_pipeline(manifest, train=train, crop_size=crop, seed=5)
    samples = ShardSamples(
        manifest.shard_urls("train" if train else "val"), pipeline, shuffle=train
    )
    samples.set_epoch(epoch)
    return list(samples)


# ----------------------------------------------------------------------------- without Ray


def test_pipeline_names_shard_and_key_for_bad_members(synthetic_shards: Path) -> None:
    manifest = load_manifest(synthetic_shards)
    pipeline = build_pipeline(manifest, train=True, crop_size=CROP)
    url = manifest.shard_urls("train")[0]
    sample = next(read_shard(url))
    key = sample["__key__"]
    assert set(pipeline(sample, shard=url, key=key)) == {"image", "mask"}
    with pytest.raises(SampleReadError, match=rf"{url}: sample '{key}': cannot decode"):
        pipeline({**sample, "image.jpg": b"not a jpeg"}, shard=url, key=key)
    with pytest.raises(SampleReadError, match="no 'mask.png' member"):
        pipeline({"image.jpg": sample["image.jpg"]}, shard=url, key=key)
    bad_ids = io.BytesIO()
    Image.fromarray(np.full((64, 64), 9, dtype=np.uint8)).save(bad_ids, "PNG")
    with pytest.raises(SampleReadError, match="mask holds id 9, outside 0..6"):
        pipeline({**sample, "mask.png": bad_ids.getvalue()}, shard=url, key=key)
    small = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(small, "PNG")
    with pytest.raises(SampleReadError, match="differ in size"):
        pipeline({**sample, "mask.png": small.getvalue()}, shard=url, key=key)


def test_torch_loader_batches(synthetic_shards: Path) -> None:
    loader = build_torch_loader(
        synthetic_shards, "train", train=True, crop_size=CROP, batch_size=8, num_workers=0
    )
    batches = list(loader)
    assert len(batches) == 4  # 32 samples
    assert batches[0]["images"].shape == (8, 3, *CROP)
    assert batches[0]["images"].dtype == torch.float32
    assert batches[0]["masks"].shape == (8, *CROP) and batches[0]["masks"].dtype == torch.int64


def test_torch_loader_names_a_truncated_shard(truncated_shards: Path) -> None:
    url = str(truncated_shards / "train-000001.tar")
    with pytest.raises(SampleReadError, match=f"{url}: unreadable shard"):
        list(read_shard(url))


def test_samples_are_seeded_per_epoch_and_key(synthetic_shards: Path) -> None:
    first = {sample_digest(s["image"], s["mask"]) for s in torch_samples(synthetic_shards)}
    again = {sample_digest(s["image"], s["mask"]) for s in torch_samples(synthetic_shards)}
    later = {sample_digest(s["image"], s["mask"]) for s in torch_samples(synthetic_shards, epoch=1)}
    assert first == again and len(first) == 32
    assert not first & later


def test_sample_pipeline_survives_pickling(synthetic_shards: Path) -> None:
    manifest = load_manifest(synthetic_shards)
    pipeline = build_pipeline(manifest, train=True, crop_size=CROP, seed=3)
    url = manifest.shard_urls("train")[0]
    sample = next(read_shard(url))
    copy = pickle.loads(pickle.dumps(pipeline))
    assert isinstance(copy, SamplePipeline)
    ours, theirs = (p(sample, shard=url, key=sample["__key__"], epoch=2) for p in (pipeline, copy))
    np.testing.assert_array_equal(ours["image"], theirs["image"])


# ----------------------------------------------------------------------------- Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from data.stream import configure_data_context

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    configure_data_context()
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_stream_train_batches_and_same_samples_as_torch(ray_cluster, synthetic_shards: Path):
    from data.stream import build_dataset, iter_batches

    dataset = build_dataset(synthetic_shards, "train", train=True, crop_size=CROP, seed=5)
    batches = list(iter_batches(dataset, 8))
    assert len(batches) == 4
    for batch in batches:
        assert set(batch) == {"images", "masks"}
        assert batch["images"].shape == (8, 3, *CROP) and batch["images"].dtype == torch.float32
        assert batch["masks"].shape == (8, *CROP) and batch["masks"].dtype == torch.int64
        assert set(batch["masks"].unique().tolist()) <= set(range(7)) | {255}
    # The same per-sample seeds: the Ray stream's second pass is the torch loader's epoch 1.
    rows = dataset.take_all()
    ray_digests = {sample_digest(row["image"], row["mask"]) for row in rows}
    torch_digests = {
        sample_digest(s["image"], s["mask"]) for s in torch_samples(synthetic_shards, epoch=1)
    }
    assert ray_digests == torch_digests
    # Normalisation happened on the uint8 rows that were shipped.
    uint8 = torch.from_numpy(np.stack([row["image"] for row in rows[:2]]))
    manual = (uint8.permute(0, 3, 1, 2).float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(STD).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(normalize_batch(uint8), manual)


@pytest.mark.slow
def test_stream_epochs_chain_with_fresh_augmentation(ray_cluster, synthetic_shards: Path):
    from data.stream import build_dataset

    dataset = build_dataset(synthetic_shards, "train", train=True, crop_size=CROP, epochs=2)
    rows = dataset.take_all()
    assert len(rows) == 64
    assert len({sample_digest(row["image"], row["mask"]) for row in rows}) == 64


@pytest.mark.slow
def test_stream_val_pads_and_keeps_original_size(ray_cluster, synthetic_shards: Path):
    from data.stream import build_dataset, iter_batches

    dataset = build_dataset(synthetic_shards, "val", train=False, crop_size=VAL_PAD)
    batches = list(iter_batches(dataset, 3, drop_last=False))
    # Ray formats batches in prefetch threads, so the short last batch may come out before a
    # full one: the sizes are exact, their order is not.
    assert sorted(len(b["images"]) for b in batches) == [2, 3, 3]
    batch = next(b for b in batches if len(b["images"]) == 3)
    assert batch["images"].shape == (3, 3, *VAL_PAD)
    assert batch["height"].tolist() == [64] * 3 and batch["width"].tolist() == [64] * 3
    assert (batch["masks"][:, 64:] == 255).all() and (batch["masks"][:, :, 64:] == 255).all()
    assert (batch["masks"][:, :64, :64] != 255).any()
    expected = {
        sample_digest(s["image"], s["mask"]) for s in torch_samples(synthetic_shards, train=False)
    }
    assert {sample_digest(r["image"], r["mask"]) for r in dataset.take_all()} == expected


@pytest.mark.slow
def test_stream_corrupt_member_raises_with_shard_and_key(ray_cluster, broken_shards: Path):
    from ray.data import DataContext

    from data.stream import build_dataset

    shard = broken_shards / "train-000000.tar"
    key = first_key(shard)
    dataset = build_dataset(broken_shards, "train", train=True, crop_size=CROP, epochs=2)
    with pytest.raises(SampleReadError, match=rf"{shard}: sample '{key}': cannot decode"):
        dataset.take_all()
    assert not DataContext.get_current().raise_original_map_exception  # set per dataset only


def damage_header(shard: Path, member_index: int) -> None:
    """Overwrite one tar header in place: same size, and tarfile's stream mode then takes it
    for the end of the archive."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member_index].offset
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x07" * 512)


@pytest.mark.slow
def test_stream_short_shard_raises_naming_it(ray_cluster, synthetic_shards: Path, tmp_path):
    from data.stream import build_dataset

    root = tmp_path / "short"
    shutil.copytree(synthetic_shards, root)
    shard = root / "train-000001.tar"
    damage_header(shard, 9)  # members: 3 per sample -> samples 0..2 survive
    dataset = build_dataset(root, "train", train=True, crop_size=CROP)
    with pytest.raises(SampleReadError, match=rf"{shard}: shard holds 3 samples, manifest says 16"):
        dataset.take_all()


@pytest.mark.slow
def test_stream_truncated_shard_fails_before_reading(ray_cluster, truncated_shards: Path):
    from data.stream import build_dataset, skipped_samples

    shard = truncated_shards / "train-000001.tar"
    with pytest.raises(SampleReadError, match=rf"{shard}: shard \d+ bytes, manifest says"):
        build_dataset(truncated_shards, "train", train=True, crop_size=CROP)
    dataset = build_dataset(truncated_shards, "train", train=True, crop_size=CROP, on_error="skip")
    assert dataset.count() == 16
    assert skipped_samples(truncated_shards, "train")["count"] == 16


@pytest.mark.slow
def test_stream_skip_mode_counts_what_it_leaves_out(ray_cluster, broken_shards: Path, tmp_path):
    from data.stream import build_dataset, skipped_samples

    damage_header(broken_shards / "train-000001.tar", 9)
    dataset = build_dataset(broken_shards, "train", train=True, crop_size=CROP, on_error="skip")
    assert dataset.count() == 15 + 3  # shard 0 minus its corrupt sample, 3 before the damage
    report = skipped_samples(broken_shards, "train")
    assert report["count"] == 1 + 13
    keys = sorted(entry["key"] for entry in report["examples"])
    assert keys == sorted(["*", first_key(broken_shards / "train-000000.tar")])
    assert skipped_samples(tmp_path, "train") == {"count": 0, "examples": []}


@pytest.mark.slow
def test_stream_rejects_bad_arguments(ray_cluster, synthetic_shards: Path):
    from data.shards import ManifestError
    from data.stream import build_dataset

    with pytest.raises(ValueError, match="only train streams repeat"):
        build_dataset(synthetic_shards, "val", train=False, crop_size=VAL_PAD, epochs=2)
    with pytest.raises(ValueError, match="on_error"):
        build_dataset(synthetic_shards, "train", train=True, crop_size=CROP, on_error="ignore")
    with pytest.raises(ManifestError, match="no split 'test'"):
        build_dataset(synthetic_shards, "test", train=False, crop_size=VAL_PAD)


@pytest.mark.slow
def test_stream_on_real_camvid(ray_cluster, camvid_shards: Path):
    from data.stream import build_dataset, iter_batches

    train = build_dataset(camvid_shards, "train", train=True, crop_size=(360, 480))
    batch = next(iter_batches(train, 4))
    assert batch["images"].shape == (4, 3, 360, 480) and batch["masks"].shape == (4, 360, 480)
    assert set(batch["masks"].unique().tolist()) <= set(range(11)) | {255}
    val = build_dataset(camvid_shards, "val", train=False, crop_size=(368, 480))
    batches = list(iter_batches(val, 4, drop_last=False))
    assert sum(len(b["images"]) for b in batches) == 8
    assert batches[0]["height"].tolist() == [360] * 4 and batches[0]["width"].tolist() == [480] * 4
    assert (batches[0]["masks"][:, 360:] == 255).all()
