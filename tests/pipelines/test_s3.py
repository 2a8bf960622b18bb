"""Cluster storage on a real S3 protocol endpoint: moto's server on 127.0.0.1, nothing else.

Shards are written locally and uploaded; a 2-worker CPU run reads them from s3:// and keeps its
checkpoints in s3://, survives an injected worker crash by restoring from the S3 checkpoint,
registers the best checkpoint in MLflow with no local copy of the run folder, is continued with
--resume, and the registered model and the S3 checkpoint are evaluated. Start-up errors
(endpoint, bucket, credentials) are checked before any Ray worker starts.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from data import storage
from data.storage import StorageError
from pipelines.checkpoint_io import (
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    local_checkpoint,
)
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.train import driver as train_module

BUCKET = "segnext-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _set_moto_auth(endpoint: str, enforce: bool) -> None:
    """Moto accepts any credentials unless told to check them (its /moto-api/reset-auth)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0" if enforce else b"inf",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port with one bucket; AWS_* variables point at it
    (static fake keys, no instance-metadata lookups, no proxy) and are restored afterwards."""
    from moto.server import ThreadedMotoServer

    endpoint = f"http://127.0.0.1:{_free_port()}"
    server = ThreadedMotoServer(
        ip_address="127.0.0.1", port=int(endpoint.rsplit(":", 1)[1]), verbose=False
    )
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # for commands without a config
        host = endpoint.removeprefix("http://")
        pafs.S3FileSystem(
            endpoint_override=host, scheme="http", region="us-east-1", allow_bucket_creation=True
        ).create_dir(BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module")
def workdir(
    s3: str, tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path, experiment_yaml
) -> Path:
    """The session's `tiny_shards` uploaded to s3://BUCKET/shards (no copy of them in this
    folder: the manifest names its shards relative to its own folder), and the tiny experiment
    reading them from there, its run folders in s3://BUCKET/runs, registering the best."""
    root = tmp_path_factory.mktemp("s3")
    storage.upload(tiny_shards, f"s3://{BUCKET}/shards")
    experiment_yaml(root, f"s3://{BUCKET}/shards", {
        "model.classifier": "standard", "mlflow.experiment": "s3", "registry.register": True,
        "registry.name": "segnext-s3", "run.storage_path": f"s3://{BUCKET}/runs",
        "storage.endpoint": s3,
    })
    return root


@pytest.fixture
def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started although the storage check should have failed")

    monkeypatch.setattr("ray.init", forbidden)
    monkeypatch.setattr(train_module, "_fit", forbidden)


def test_upload_and_fetch_roundtrip(workdir: Path) -> None:
    """The uploaded shards are on S3 with their manifest; a fetched copy is removed after use."""
    from data.manifest import load_manifest

    manifest = load_manifest(f"s3://{BUCKET}/shards")
    assert manifest.num_samples("train") == 32 and manifest.num_samples("val") == 6
    with local_checkpoint(f"s3://{BUCKET}/shards/dataset.json") as local:
        assert json.loads(local.read_text())["splits"].keys() == {"train", "val"}
    assert not local.exists()
    with pytest.raises(CheckpointError, match=f"no checkpoint at s3://{BUCKET}/nothing"):
        load_checkpoint(f"s3://{BUCKET}/nothing/checkpoint_0000001")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "run.storage_path=s3://no-such-bucket/runs",
            "run.storage_path: s3://no-such-bucket/runs: cannot write",
        ),
        ("data.root=s3://no-such-bucket/shards", "the bucket 'no-such-bucket' does not exist"),
        (
            f"data.root=s3://{BUCKET}/elsewhere",
            f"data.root: s3://{BUCKET}/elsewhere/dataset.json does not exist",
        ),
        ("storage.endpoint=http://127.0.0.1:PORT", "the storage endpoint cannot be reached"),
        ("data.cache_bytes=1000", "data.cache_bytes = 1000 cannot hold one shard"),
    ],
)
def test_unusable_storage_fails_before_workers(
    s3: str,
    workdir: Path,
    no_workers: None,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    override: str,
    needle: str,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)  # put back after storage.endpoint set it
    override = override.replace("PORT", str(_free_port()))
    code = main(["train", "--config", str(workdir / "exp.yaml"), override])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Fix:" in err


def test_bad_credentials_fail_before_workers(
    s3: str,
    workdir: Path,
    no_workers: None,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-known-key")
    _set_moto_auth(s3, enforce=True)
    try:
        code = main(["train", "--config", str(workdir / "exp.yaml")])
    finally:
        _set_moto_auth(s3, enforce=False)
    assert code == 2
    err = capsys.readouterr().err
    assert f"run.storage_path: s3://{BUCKET}/runs/exp-" in err and "cannot read" in err
    assert "access denied" in err and "AWS_ACCESS_KEY_ID" in err
    with pytest.raises(StorageError, match="data.root: .*dataset.json: cannot read.*access denied"):
        _set_moto_auth(s3, enforce=True)
        try:
            storage.check_readable(f"s3://{BUCKET}/shards/dataset.json", key="data.root")
        finally:
            _set_moto_auth(s3, enforce=False)


@pytest.fixture(scope="module")
def ray_session(s3: str, ray_session: None) -> None:
    """The shared private 2-CPU Ray (tests/conftest.py), started after the AWS_* variables are
    set (workers inherit them) and shut down before the S3 server stops."""
    return ray_session


@pytest.mark.slow
def test_train_crash_resume_register_eval_on_s3(
    s3: str,
    workdir: Path,
    ray_session: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow import MlflowClient

    from pipelines.tracking.registry import find_run_checkpoint

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # the run finds the endpoint in its config
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(
        workdir / "exp.yaml",
        ["train.fail_at_iteration=5", "train.max_failures=1", "run.name=s3run",
         f"data.cache_dir={workdir / 'shard-cache'}"],
    )
    with caplog.at_level(logging.INFO, logger="data.stream"):
        result = train_module.train(cfg)
    # the read tasks kept whole shards on this node's disk; the run removed them at the end
    assert f"removed the shard cache {workdir / 'shard-cache' / 's3run'} on 1 nodes" in caplog.text
    assert not (workdir / "shard-cache" / "s3run").exists()

    # the crash at iteration 5 restarted the workers from a checkpoint read back from S3
    marker = Path(train_module._fault_marker(f"s3://{BUCKET}/runs", "s3run", result.run_id))
    assert marker.is_file()
    marker.unlink()
    assert result.iteration == 6 and result.start_iteration in (2, 4)
    run_uri = f"s3://{BUCKET}/runs/s3run"
    assert result.path == run_uri
    assert result.best_checkpoint.startswith(f"{run_uri}/checkpoint_")
    files = checkpoint_files(run_uri)
    assert f"{run_uri}/checkpoint_0000006/checkpoint.pt" in files and len(files) <= 2
    assert not (Path.cwd() / "s3:").exists() and not (workdir / "runs").exists()

    # registered from S3 through a temporary copy: the model's artifact is the checkpoint
    assert result.registered_version == "1"
    client = MlflowClient(tracking)
    version = client.get_model_version("segnext-s3", "1")
    assert version.tags["iteration"] == str(load_checkpoint(result.best_checkpoint)["iteration"])
    assert client.get_run(result.run_id).data.tags["best_checkpoint"] == result.best_checkpoint

    # --resume finds the run folder on S3 and continues from its latest checkpoint
    resumed = train_module.train(
        load_config(workdir / "exp.yaml", ["schedule.iterations=8", "registry.register=false"]),
        resume="s3run",
    )
    assert resumed.run_id == result.run_id
    assert (resumed.start_iteration, resumed.iteration) == (6, 8)
    assert load_checkpoint(f"{run_uri}/checkpoint_0000008")["iteration"] == 8
    run = client.get_run(result.run_id)  # what `segnext register --run ID` looks up
    assert find_run_checkpoint(run, "latest") == f"{run_uri}/checkpoint_0000008/checkpoint.pt"
    assert find_run_checkpoint(run, "best") == resumed.best_checkpoint

    # eval of the registered model and of the S3 checkpoint itself, on the S3 shards
    for model in ("models:/segnext-s3/1", f"{run_uri}/checkpoint_0000008"):
        code = main(
            [
                "eval",
                "--model",
                model,
                "--data",
                f"s3://{BUCKET}/shards",
                "--distributed",
                "off",
                "--log-to",
                "none",
                "--tracking-uri",
                tracking,
            ]
        )
        assert code == 0
        assert "mIoU" in capsys.readouterr().out

    # predict straight from the S3 checkpoint
    image = workdir / "scene.png"
    Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8)).save(image)
    code = main(
        [
            "predict",
            "--model",
            f"{run_uri}/checkpoint_0000008",
            "--input",
            str(image),
            "--out",
            str(workdir / "pred"),
            "--tracking-uri",
            tracking,
        ]
    )
    assert code == 0 and (workdir / "pred" / "scene_mask.png").is_file()


def test_endpoint_must_be_a_url(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data.storage import s3_filesystem
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="storage.endpoint = 'minio:9000' must be a URL"):
        load_config(workdir / "exp.yaml", ["storage.endpoint=minio:9000"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "ftp://minio")
    with pytest.raises(ValueError, match="S3 endpoint 'ftp://minio'"):
        s3_filesystem()


def test_shards_written_straight_to_s3(s3: str, capsys) -> None:
    """`segnext shards ... --out s3://` writes locally, uploads, manifest last; a prefix that
    already holds a dataset is refused (no silent local folder named `s3:`)."""
    out = f"s3://{BUCKET}/written"
    command = ["shards", "synthetic", "--num-train", "8", "--num-val", "2", "--out", out]
    assert main(command) == 0
    assert f"-> {out} [train, val]" in capsys.readouterr().out
    assert storage.exists(f"{out}/dataset.json") and storage.exists(f"{out}/val-000000.tar")
    assert not Path("s3:").exists()
    assert main(command) == 1
    assert "already holds a dataset" in capsys.readouterr().err
