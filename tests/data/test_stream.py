"""The training stream and the plain torch loader: shapes and dtypes, the same samples in both,
the batch plan whatever the worker count, fresh augmentation per epoch, errors that name shard
and key, skip mode that counts."""

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
from data.manifest import load_manifest
from data.samples import SamplePipeline, SampleReadError, build_pipeline
from data.transforms import MEAN, STD, normalize_batch

CROP = (40, 48)  # synthetic scenes are 64x64: random resize 0.5-2.0 then crop


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


def torch_samples(root: Path, *, epoch: int = 0) -> list[dict]:
    manifest = load_manifest(root)
    pipeline = build_pipeline(manifest, train=True, crop_size=CROP, seed=5)
    samples = ShardSamples(manifest.shard_urls("train"), pipeline, shuffle=True)
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
    from pipelines.cluster import init_ray

    started = not ray.is_initialized()
    if started:  # a private cluster: never one a `ray start` elsewhere left in the address file
        init_ray("local", num_cpus=2)
    configure_data_context()
    yield ray
    if started:
        ray.shutdown()


def _stream(root: Path, **kwargs):
    from data.stream import build_train_stream

    options = {"crop_size": CROP, "global_batch_size": 8, "micro_batch_size": 4, "seed": 5}
    return build_train_stream(root, "train", **{**options, **kwargs})


def _rows(stream, *, world: int = 1, rank: int = 0, start: int = 0, stop: int = 4) -> list[dict]:
    return stream.dataset(world=world, rank=rank, start=start, stop=stop).take_all()


@pytest.mark.slow
def test_stream_batches_are_the_plan_and_the_torch_loaders_samples(ray_cluster, synthetic_shards):
    stream = _stream(synthetic_shards)
    assert len(stream.index) == 32 and stream.plan.steps_per_epoch == 4
    batches = list(stream.micro_batches(world=1, rank=0, start=0, stop=4))
    assert [micro for micro, _ in batches] == list(range(8))  # 2 micro-batches per step
    for _, batch in batches:
        assert set(batch) == {"images", "masks"}
        assert batch["images"].shape == (4, 3, *CROP) and batch["images"].dtype == torch.float32
        assert batch["masks"].shape == (4, *CROP) and batch["masks"].dtype == torch.int64
        assert set(batch["masks"].unique().tolist()) <= set(range(7)) | {255}
    # One epoch: every sample once, augmented as the torch loader augments it in epoch 0.
    rows = _rows(stream)
    keys = [str(k) for k in stream.index.rows(stream.plan.epoch_order(0)[:32])["key"]]
    assert len(set(keys)) == 32
    ray_digests = {sample_digest(row["image"], row["mask"]) for row in rows}
    assert ray_digests == {sample_digest(s["image"], s["mask"]) for s in torch_samples(synthetic_shards)}
    # Normalisation happened on the uint8 rows that were shipped.
    uint8 = torch.from_numpy(np.stack([row["image"] for row in rows[:2]]))
    manual = (uint8.permute(0, 3, 1, 2).float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(STD).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(normalize_batch(uint8), manual)
    first = torch.from_numpy(np.stack([row["image"] for row in rows[:4]]))
    torch.testing.assert_close(batches[0][1]["images"], normalize_batch(first))


@pytest.mark.slow
def test_workers_share_the_global_batches_whatever_their_number(ray_cluster, synthetic_shards):
    stream = _stream(synthetic_shards, micro_batch_size=2)  # 4 micro-batches per step
    one = dict(stream.micro_batches(world=1, rank=0, start=1, stop=3))
    assert sorted(one) == list(range(4, 12))
    for world in (2, 4):
        seen = {}
        for rank in range(world):
            for micro, batch in stream.micro_batches(world=world, rank=rank, start=1, stop=3):
                assert micro // 4 * 4 + rank * (4 // world) <= micro  # its own slice of the step
                seen[micro] = batch
        assert sorted(seen) == sorted(one)
        for micro, batch in seen.items():
            assert torch.equal(batch["images"], one[micro]["images"])
            assert torch.equal(batch["masks"], one[micro]["masks"])


@pytest.mark.slow
def test_later_epochs_draw_fresh_order_and_augmentation(ray_cluster, synthetic_shards):
    stream = _stream(synthetic_shards)
    rows = _rows(stream, stop=8)  # two epochs
    assert len(rows) == 64
    assert len({sample_digest(row["image"], row["mask"]) for row in rows}) == 64
    assert not np.array_equal(stream.plan.epoch_order(0), stream.plan.epoch_order(1))


@pytest.mark.slow
def test_stream_corrupt_member_raises_with_shard_and_key(ray_cluster, broken_shards: Path):
    from ray.data import DataContext

    shard = broken_shards / "train-000000.tar"
    key = first_key(shard)
    with pytest.raises(SampleReadError, match=rf"{shard}: sample '{key}': cannot decode"):
        _rows(_stream(broken_shards))
    assert not DataContext.get_current().raise_original_map_exception  # set per dataset only


def damage_header(shard: Path, member_index: int) -> None:
    """Overwrite one tar header in place: same size, and tar readers then take it for the end
    of the archive."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member_index].offset
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x07" * 512)


def test_short_shard_fails_while_indexing_naming_it(synthetic_shards: Path, tmp_path):
    """A dataset written before indexes is indexed from its tar headers: a damaged one fails
    there (with an index, the read of the damaged sample fails: tests/data/test_shard_index)."""
    import json

    root = tmp_path / "short"
    shutil.copytree(synthetic_shards, root)
    manifest = json.loads((root / "dataset.json").read_text())
    for info in manifest["splits"].values():
        del info["index"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    shard = root / "train-000001.tar"
    damage_header(shard, 9)  # members: 3 per sample -> samples 0..2 survive
    with pytest.raises(SampleReadError, match=rf"{shard}: shard holds 3 samples, manifest says 16"):
        _stream(root)
    skipping = _stream(root, on_error="skip")
    assert len(skipping.index) == 16 and skipping.index.skipped == 16


def test_truncated_shard_fails_before_reading(truncated_shards: Path):
    shard = truncated_shards / "train-000001.tar"
    with pytest.raises(SampleReadError, match=rf"{shard}: shard \d+ bytes, manifest says"):
        _stream(truncated_shards)
    stream = _stream(truncated_shards, on_error="skip")
    assert len(stream.index) == 16 and stream.index.skipped == 16


@pytest.mark.slow
def test_stream_skip_mode_counts_what_it_leaves_out(ray_cluster, broken_shards: Path, tmp_path):
    from data.stream import skipped_samples

    stream = _stream(broken_shards, on_error="skip")
    batches = list(stream.micro_batches(world=1, rank=0, start=0, stop=4))
    assert sorted(len(batch["images"]) for _, batch in batches) == [3] + [4] * 7
    report = skipped_samples(broken_shards, "train")
    assert report["count"] == 1
    assert [entry["key"] for entry in report["examples"]] == [
        first_key(broken_shards / "train-000000.tar")]
    assert skipped_samples(tmp_path, "train") == {"count": 0, "examples": []}


def test_stream_rejects_bad_arguments(synthetic_shards: Path):
    from data.manifest import ManifestError
    from data.stream import build_train_stream

    with pytest.raises(ValueError, match="on_error"):
        _stream(synthetic_shards, on_error="ignore")
    with pytest.raises(ManifestError, match="no split 'test'"):
        build_train_stream(synthetic_shards, "test", crop_size=CROP, global_batch_size=8,
                           micro_batch_size=4)
    with pytest.raises(ValueError, match="cannot fill one global batch of 64"):
        _stream(synthetic_shards, global_batch_size=64)


@pytest.mark.slow
def test_stream_on_real_camvid(ray_cluster, camvid_shards: Path):
    from data.stream import build_train_stream

    stream = build_train_stream(camvid_shards, "train", crop_size=(360, 480),
                                global_batch_size=4, micro_batch_size=4)
    micro, batch = next(stream.micro_batches(world=1, rank=0, start=0, stop=1))
    assert micro == 0
    assert batch["images"].shape == (4, 3, 360, 480) and batch["masks"].shape == (4, 360, 480)
    assert set(batch["masks"].unique().tolist()) <= set(range(11)) | {255}
