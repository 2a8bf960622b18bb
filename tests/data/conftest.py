"""Data-only fixtures: the real CamVid folder and its shards, written once per session.

Other test modules (stream, transforms) use `camvid_shards` and `synthetic_shards` (from
tests/conftest.py, shared with the pipeline and tune tests) read-only; tests that modify shards
copy them first.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.manifest import load_manifest
from data.shard_writer import write_shards
from data.sources import CamVid

REPO = Path(__file__).resolve().parents[2]
CAMVID = REPO / ".." / "shared" / "datasets" / "camvid"


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The SegNet-layout CamVid folder beside the repository (`../shared/datasets/camvid`)."""
    root = CAMVID.resolve()
    if not (root / "train").is_dir():
        pytest.fail(f"CamVid not found at {root}; the tests need ../shared/datasets/camvid")
    return root


@pytest.fixture(scope="session")
def camvid_shards(camvid_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 train + 8 val real CamVid samples, JPEG q95, 8 samples per shard (3 + 1 shards)."""
    out = tmp_path_factory.mktemp("camvid_shards")
    write_shards(
        CamVid(camvid_root),
        out,
        splits=("train", "val"),
        limit={"train": 20, "val": 8},
        shard_size=8,
    )
    return out


def read_shard_samples(root: Path | str, split: str) -> dict[str, dict[str, object]]:
    """Decode every sample of a split: {key: {"image": (H,W,3) uint8, "mask": (H,W) uint8,
    "json": dict, "image_bytes": bytes}} (plain tarfile + PIL, independent of the writer)."""
    manifest = load_manifest(root)
    samples: dict[str, dict[str, object]] = {}
    for url in manifest.shard_urls(split):
        with tarfile.open(url) as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                data = tar.extractfile(info).read()
                entry = samples.setdefault(key, {})
                if suffix.startswith("image."):
                    entry["image"] = np.asarray(Image.open(io.BytesIO(data)))
                    entry["image_bytes"] = data
                elif suffix == "mask.png":
                    entry["mask"] = np.asarray(Image.open(io.BytesIO(data)))
                else:
                    entry["json"] = json.loads(data)
    return samples


@pytest.fixture(scope="session")
def read_samples() -> Callable[[Path | str, str], dict[str, dict[str, object]]]:
    """`read_samples(root, split)`: every sample of a written split, decoded."""
    return read_shard_samples
