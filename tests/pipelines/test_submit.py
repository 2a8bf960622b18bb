"""`segnext submit`: what cannot work on a multi-node cluster is refused before anything is sent
(no job client is even created), and an accepted command becomes the job README documents.
The job really running on `ray start` nodes is tests/pipelines/test_local_cluster.py."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.commands.submit import plan_job
from pipelines.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/camvid-cpu.yaml"
SHARED = ["data.root=s3://bucket/shards", "run.storage_path=s3://bucket/ray"]


@pytest.fixture
def tracking_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTP server answering MLflow's /health, named by MLFLOW_TRACKING_URI."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(REPO)
    yield uri
    server.shutdown()


@pytest.fixture
def no_job_client(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a job client was created although the command was refused")

    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", forbidden)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_train_becomes_a_job_joining_its_cluster(tracking_server: str) -> None:
    plan = plan_job(["--", "train", "--config", CONFIG, *SHARED,
                     "storage.endpoint=http://127.0.0.1:9000"])
    assert plan.entrypoint[:4] == ["python", "-m", "pipelines.cli", "train"]
    assert plan.entrypoint[-1] == "ray.address=auto"
    env = plan.runtime_env()
    assert env["working_dir"] == str(REPO)
    assert "/runs/" in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == tracking_server
    assert env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"


@pytest.mark.parametrize(("overrides", "refused"), [
    (["run.storage_path=s3://bucket/ray"], "data.root = 'runs/shards/camvid' is a local path"),
    (["data.root=s3://bucket/shards"], "run.storage_path = 'runs/ray' is a local path"),
])
def test_local_paths_are_refused(tracking_server: str, overrides: list[str], refused: str) -> None:
    with pytest.raises(ConfigError, match="--allow-local") as error:
        plan_job(["train", "--config", CONFIG, *overrides])
    assert refused in str(error.value)


def test_allow_local_takes_shared_absolute_paths_only(tracking_server: str, tmp_path) -> None:
    plan = plan_job(["train", "--config", CONFIG, f"data.root={tmp_path}",
                     f"run.storage_path={tmp_path}"], allow_local=True)
    assert f"data.root={tmp_path}" in plan.entrypoint
    with pytest.raises(ConfigError, match="must be absolute"):
        plan_job(["train", "--config", CONFIG], allow_local=True)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_local_tracking_stores_are_refused(tracking_server: str, monkeypatch, uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError, match="local to this machine"):
        plan_job(["train", "--config", CONFIG, *SHARED])


def test_an_unset_tracking_uri_is_refused(tracking_server: str, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="unset: a SQLite file"):
        plan_job(["tune", "--config", "configs/demo-tune.yaml", *SHARED])


def test_an_unreachable_tracking_server_is_refused(tracking_server: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ConfigError, match="does not answer"):
        plan_job(["train", "--config", CONFIG, *SHARED])


def test_eval_needs_shared_data_and_model(tracking_server: str) -> None:
    with pytest.raises(ConfigError, match="--data = 'shards/camvid' is a local path"):
        plan_job(["eval", "--model", "models:/segnext@champion", "--data", "shards/camvid"])
    with pytest.raises(ConfigError, match="--model = 'best.pt' is a local path"):
        plan_job(["eval", "--model", "best.pt", "--data", "s3://bucket/shards"])
    plan = plan_job(["eval", "--model", "models:/segnext@champion", "--data", "s3://b/shards"])
    assert "ray.address=auto" not in plan.entrypoint  # eval has no config overrides


def test_a_config_outside_the_working_dir_is_refused(tracking_server: str, tmp_path) -> None:
    outside = tmp_path / "exp.yaml"
    outside.write_text((REPO / CONFIG).read_text())
    with pytest.raises(ConfigError, match="outside the working directory"):
        plan_job(["train", "--config", str(outside), *SHARED])


def test_refused_submits_exit_2_before_any_job_client(
    tracking_server: str, no_job_client: None, monkeypatch, capsys
) -> None:
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "train", "--config",
                 CONFIG]) == 2
    assert "data.root" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "train", "--config",
                 CONFIG, *SHARED]) == 2
    assert "local to this machine" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "predict"]) == 2
    assert "runs one of train, tune, eval" in capsys.readouterr().err
