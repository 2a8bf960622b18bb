"""Ctrl-C and SIGTERM to a running `segnext train`: exit 130 with one line naming the checkpoint
and the exact --resume command, no stack dump, the MLflow run KILLED, nothing left running, and
the resume starts from the latest checkpoint on storage.

The command runs in its own session (as in a terminal, where Ctrl-C reaches the whole
foreground process group) with SIGINT at its default: a shell's background job ignores it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STARTED_BY = [sys.executable, "-m", "pipelines.cli"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(config: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*STARTED_BY, "train", "--config", str(config), f"run.name={name}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_default_sigint,
    )


def _wait_for_checkpoint(folder: Path, iteration: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while not (folder / f"checkpoint_{iteration:07d}" / "checkpoint.pt").is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.5)


def _group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def _mlflow_status(workdir: Path, name: str) -> str:
    from mlflow import MlflowClient

    from pipelines.tracking.runs import RUN_NAME_TAG

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    return run.info.status


@pytest.mark.parametrize("stop", ["SIGINT-group", "SIGTERM-pid"])
def test_a_stopped_run_says_how_to_resume_and_resumes_from_its_latest_checkpoint(
    tmp_path: Path, tiny_shards: Path, experiment_yaml, stop: str
) -> None:
    config = experiment_yaml(tmp_path, tiny_shards, {
        "schedule.iterations": 400, "train.checkpoint_every": 3, "train.val_every": 3,
        "train.keep_best": 4, "model.classifier": "standard"})
    name = f"stopped-{stop.split('-')[0].lower()}"
    folder = tmp_path / "ray" / name
    process = _start(config, name)
    _wait_for_checkpoint(folder, 6, process)
    if stop == "SIGINT-group":
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    latest = sorted(folder.glob("checkpoint_*/checkpoint.pt"))[-1]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"segnext train: run {name} interrupted: latest checkpoint {latest}; "
                     f"continue it with: segnext train --config {config} --resume {name}"], err
    assert "*** SIGTERM received" not in err and "PC: @" not in err
    assert _group_gone(process.pid, 15), "processes of the stopped run are still alive"
    assert _mlflow_status(tmp_path, name) == "KILLED"

    if stop == "SIGINT-group":  # the resume continues from that checkpoint, not an older one
        iteration = int(latest.parent.name.removeprefix("checkpoint_"))
        resumed = subprocess.run(
            [*STARTED_BY, "train", "--config", str(config), "--resume", name,
             f"schedule.iterations={iteration + 1}"],
            capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert f"finished at iteration {iteration + 1}" in resumed.stdout
        log = resumed.stdout + resumed.stderr  # the worker's line, shown on the console
        assert f"restored checkpoint of iteration {iteration} " in log, log[-3000:]
