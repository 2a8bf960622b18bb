"""The sample index that travels with the shards, and the node-local shard cache.

The writer's index equals the one scanned from the tars; a manifest written before indexes is
scanned once and then read from its cache; an index that lies about an offset is refused by
shard and key (raise) or counted (skip); reads through the cache are byte-identical to direct
reads, and a cache at its byte bound evicts and keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from data import shard_index
from data.manifest import load_manifest
from data.sample_index import build_sample_index
from data.samples import SampleReadError, build_pipeline
from data.shard_cache import ShardCache
from data.shard_index import cache_file_name, index_table, load_split_index, scan_shard
from data.shard_verify import verify
from data.stream import ReadPlanned, SkipTally

CROP = (64, 64)  # the synthetic scenes' size: the eval pipeline reads them whole


def _copy(shards: Path, tmp_path: Path, name: str = "copy") -> Path:
    root = tmp_path / name
    shutil.copytree(shards, root)
    return root


def _drop_indexes(root: Path) -> None:
    """Make `root` a dataset written before indexes: no index in the manifest or on disk."""
    manifest = json.loads((root / "dataset.json").read_text())
    for info in manifest["splits"].values():
        (root / info.pop("index")["path"]).unlink()
    (root / "dataset.json").write_text(json.dumps(manifest))


def _rewrite_index(root: Path, split: str, change) -> None:
    """Apply `change(table) -> table` to the split's index file and re-sign it in the manifest
    (so that only the offsets lie, not the checksum)."""
    manifest = json.loads((root / "dataset.json").read_text())
    entry = manifest["splits"][split]["index"]
    table = pq.read_table(root / entry["path"])
    data = shard_index.table_bytes(change(table))
    (root / entry["path"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "dataset.json").write_text(json.dumps(manifest))


def _read_all(root: Path, *, cache: ShardCache | None = None, skip: bool = False):
    """Every training sample of `root` through the stream's reader, one batch, in index order."""
    manifest = load_manifest(root)
    index, filesystem = build_sample_index(manifest, "train")
    pipeline = build_pipeline(manifest, train=False, crop_size=CROP)
    rows = index.rows(np.arange(len(index)))
    rows["epoch"] = np.zeros(len(index), np.int64)
    rows["micro"] = np.zeros(len(index), np.int64)
    tally = SkipTally() if skip else None  # a ledger without Ray: records straight into it
    return ReadPlanned(pipeline, filesystem, tally, cache), rows, tally


def test_writer_index_equals_the_scan_of_the_tars(synthetic_shards: Path):
    manifest = load_manifest(synthetic_shards)
    filesystem, base = pafs.LocalFileSystem(), str(synthetic_shards)
    for split in ("train", "val"):
        shards = manifest.split(split)["shards"]
        assert "index" in manifest.split(split)
        written, problems = load_split_index(manifest, split, filesystem, base, "image.jpg")
        scanned = index_table([scan_shard(filesystem, f"{base}/{s['path']}", s["path"],
                                          "image.jpg") for s in shards], shards)
        assert not problems and written.equals(scanned, check_metadata=True)
        assert written.num_rows == manifest.num_samples(split)


def test_an_old_manifest_is_indexed_once_then_read_from_its_cache(
    synthetic_shards: Path, tmp_path: Path, monkeypatch, caplog
):
    root = _copy(synthetic_shards, tmp_path)
    expected, _ = build_sample_index(load_manifest(synthetic_shards), "train")
    _drop_indexes(root)
    with caplog.at_level(logging.WARNING, logger="data.shard_index"):
        first, _ = build_sample_index(load_manifest(root), "train")
    assert "indexed split 'train' (2 shards, 32 samples)" in caplog.text
    cache = root / cache_file_name("train", load_manifest(root).split("train")["shards"])
    assert cache.is_file() and f"cached at {cache}" in caplog.text

    def no_scan(*args, **kwargs):
        raise AssertionError("the second start scanned the shards again")

    monkeypatch.setattr(shard_index, "scan_shard", no_scan)
    second, _ = build_sample_index(load_manifest(root), "train")
    for column in ("keys", "shard", "image_at", "image_bytes", "mask_at", "mask_bytes"):
        assert np.array_equal(getattr(first, column), getattr(expected, column)), column
        assert np.array_equal(getattr(second, column), getattr(expected, column)), column


def test_an_unwritable_location_still_trains_and_says_it_scans_every_time(
    synthetic_shards: Path, tmp_path: Path, caplog
):
    root = _copy(synthetic_shards, tmp_path)
    _drop_indexes(root)

    root.chmod(0o555)  # as a read-only mount is (root ignores modes: a file is in the way)
    cache = root / cache_file_name("train", load_manifest(root).split("train")["shards"])
    cache.mkdir()
    try:
        with caplog.at_level(logging.WARNING, logger="data.shard_index"):
            index, _ = build_sample_index(load_manifest(root), "train")
    finally:
        root.chmod(0o755)
    assert len(index) == 32 and "every start scans again" in caplog.text


def test_a_wrong_offset_is_refused_by_shard_and_key_or_counted(
    synthetic_shards: Path, tmp_path: Path
):
    root = _copy(synthetic_shards, tmp_path)

    def shift_first_image(table: pa.Table) -> pa.Table:
        image_at = table.column("image_at").to_numpy().copy()
        image_at[0] += 512
        return table.set_column(table.schema.get_field_index("image_at"), "image_at",
                                pa.array(image_at))

    _rewrite_index(root, "train", shift_first_image)
    reader, rows, _ = _read_all(root)
    key = rows["key"][0]
    with pytest.raises(SampleReadError, match=rf"train-000000.tar: sample '{key}' cannot be read "
                                              r"\(.*the index puts"):
        reader(rows)
    reader, rows, tally = _read_all(root, skip=True)
    out = reader(rows)
    assert len(out["image"]) == 31 and tally.count == 1 and tally.examples[0]["key"] == key


def test_an_index_for_other_shards_is_refused_naming_it(synthetic_shards: Path, tmp_path: Path):
    root = _copy(synthetic_shards, tmp_path)
    _rewrite_index(root, "train", lambda t: t.filter(pc.not_equal(t.column("shard"), 1)))
    name = load_manifest(root).split("train")["index"]["path"]
    with pytest.raises(SampleReadError, match=rf"{name}: index lists 0 samples for train-000001"):
        build_sample_index(load_manifest(root), "train")
    report = verify(root)
    assert any(name in problem for problem in report.problems), report.problems


def test_verify_checks_the_index_against_the_tars(synthetic_shards: Path, tmp_path: Path):
    root = _copy(synthetic_shards, tmp_path)
    assert verify(root).ok

    def swap_masks(table: pa.Table) -> pa.Table:
        mask_at = table.column("mask_at").to_numpy().copy()
        mask_at[[0, 1]] = mask_at[[1, 0]]
        return table.set_column(table.schema.get_field_index("mask_at"), "mask_at",
                                pa.array(mask_at))

    _rewrite_index(root, "train", swap_masks)
    report = verify(root)
    assert not report.ok
    assert any("offsets of train-000000.tar differ" in problem for problem in report.problems)


def test_a_damaged_header_under_an_index_fails_where_it_is_read(
    synthetic_shards: Path, tmp_path: Path
):
    """Same size, so the stat passes and the index is trusted at start; the read checks the
    header before the image and names shard and key."""
    root = _copy(synthetic_shards, tmp_path)
    reader, rows, _ = _read_all(root)
    at = int(rows["image_at"][0]) - 512
    with open(root / "train-000000.tar", "r+b") as handle:
        handle.seek(at)
        handle.write(b"\x07" * 512)
    reader, rows, _ = _read_all(root)
    with pytest.raises(SampleReadError, match=rf"sample '{rows['key'][0]}' cannot be read"):
        reader(rows)


def test_cached_reads_equal_direct_reads_and_a_full_cache_evicts(
    synthetic_shards: Path, tmp_path: Path
):
    direct_reader, rows, _ = _read_all(synthetic_shards)
    direct = direct_reader(rows)
    shard_bytes = int(rows["shard_bytes"].max())
    small = ShardCache(str(tmp_path / "cache"), capacity=shard_bytes + shard_bytes // 2)
    cached_reader, rows, _ = _read_all(synthetic_shards, cache=small)
    for _ in range(2):  # the second pass evicts again: the two shards take turns
        cached = cached_reader(rows)
        for name in ("image", "mask"):
            assert np.array_equal(cached[name], direct[name])
        held = sorted((tmp_path / "cache").glob("*.tar"))
        assert len(held) == 1 and sum(p.stat().st_size for p in held) <= small.capacity
    too_small = ShardCache(str(tmp_path / "tiny"), capacity=shard_bytes - 1)
    reader, rows, _ = _read_all(synthetic_shards, cache=too_small)
    with pytest.raises(SampleReadError, match="does not fit data.cache_bytes"):
        reader(rows)
