"""The local folder rank 0 writes a checkpoint to before Ray Train uploads it (`segnext-ckpt-*`
in tempfile's folder): never left behind by a failed or interrupted save, and the leftover of a
worker killed mid-save (SIGKILL: no cleanup runs) is removed at the next save, while the
folders of live processes and anything not made by the Checkpointer stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray.train
import torch

from data.plan import BatchPlan
from pipelines.checkpoint_io import CHECKPOINT_FILE, build_meta, load_checkpoint
from pipelines.train import checkpoint_staging
from pipelines.train.checkpointing import Checkpointer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _checkpointer(rank: int = 0) -> Checkpointer:
    """A Checkpointer over a tiny model; its payload is a real, loadable checkpoint."""
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    meta = build_meta(variant="tiny", num_classes=3, classifier="integrated",
                      classifier_kwargs={}, nmf={}, class_names=["a", "b", "c"],
                      palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]], ignore_index=255,
                      mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], crop_size=[64, 64])
    plan = BatchPlan(num_samples=8, global_batch_size=4, micro_batch_size=2, seed=0)
    return Checkpointer(model, optimizer, scheduler, plan=plan, config={"optim.lr": 0.1},
                        meta=meta.to_dict(), rank=rank)


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tempfile's folder, where checkpoints are staged, moved into the test's own folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    held: dict[str, int] = {}
    monkeypatch.setattr(checkpoint_staging, "_held", held, raising=False)  # this test's folders only
    yield folder
    for fd in held.values():
        os.close(fd)


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """`ray.train.report` calls, recorded with what the checkpoint folder held at the call."""
    calls: list[dict] = []

    def report(metrics, checkpoint=None, **kwargs):
        held = None
        if checkpoint is not None:
            held = load_checkpoint(checkpoint.path)["iteration"]  # weights only
        calls.append({"metrics": metrics, "checkpoint": checkpoint, "held": held, **kwargs})

    monkeypatch.setattr(ray.train, "report", report)
    return calls


def _staged(folder: Path) -> list[Path]:
    """The staging folders in `folder` (real folders named as the Checkpointer names them)."""
    return sorted(path for path in folder.glob("segnext-ckpt-*")
                  if path.is_dir() and not path.is_symlink())


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def _report_fails(*args, **kwargs):
    raise RuntimeError("the synchronization barrier failed")


@pytest.mark.parametrize(("target", "failure", "error"), [
    ("torch.save", _disk_full, OSError),
    ("torch.save", _interrupted, KeyboardInterrupt),
    ("ray.train.report", _report_fails, RuntimeError),
], ids=["save-raises", "save-interrupted", "report-raises"])
def test_a_failed_checkpoint_leaves_no_staging_folder(
    staging: Path, monkeypatch: pytest.MonkeyPatch, target: str, failure, error: type
) -> None:
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(torch if module == "torch" else ray.train, name, failure)
    with pytest.raises(error):
        _checkpointer().report(2, {"val/mIoU": 0.5}, checkpoint=True)
    assert _staged(staging) == []


def test_a_saved_checkpoint_is_handed_to_ray_which_deletes_it_after_upload(
    staging: Path, reports: list[dict]
) -> None:
    """Ray uploads in a background thread after report returns (ASYNC) and deletes the folder
    itself: the folder holds the complete checkpoint at the call and is still there after it."""
    _checkpointer(rank=1).report(2, {"val/mIoU": 0.5}, checkpoint=True)  # attaches none
    assert reports[-1]["checkpoint"] is None and _staged(staging) == []

    _checkpointer().report(2, {"val/mIoU": 0.5}, checkpoint=True)
    call = reports[-1]
    assert call["held"] == 2 and call["checkpoint_dir_name"] == "checkpoint_0000002"
    assert call["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
    assert "delete_local_checkpoint_after_upload" not in call  # Ray's default: delete (ASYNC)
    folder = Path(call["checkpoint"].path)
    assert _staged(staging) == [folder]
    assert os.listdir(folder) == [CHECKPOINT_FILE]


# A worker killed (SIGKILL) while torch.save writes the checkpoint: no cleanup can run.
KILLED_MID_SAVE = f"""
import os, signal, sys
import torch
sys.path.insert(0, {str(HERE)!r})
from test_checkpoint_staging import _checkpointer

def killed(payload, handle, *args, **kwargs):
    handle.write(b"half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed
_checkpointer().report(2, {{}}, checkpoint=True)
"""

# A live worker whose checkpoint is staged (its upload pending): it waits for stdin to close.
STAGED_AND_WAITING = f"""
import sys
import ray.train
sys.path.insert(0, {str(HERE)!r})
from test_checkpoint_staging import _checkpointer

ray.train.report = lambda *args, **kwargs: None
_checkpointer().report(2, {{}}, checkpoint=True)
print("staged", flush=True)
sys.stdin.read()
"""


def test_the_leftover_of_a_killed_worker_goes_at_the_next_save(
    staging: Path, reports: list[dict]
) -> None:
    env = {**os.environ, "TMPDIR": str(staging)}
    live = subprocess.Popen([sys.executable, "-c", STAGED_AND_WAITING], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert live.stdout.readline() == "staged\n"
        leftovers = _staged(staging)
        assert len(leftovers) == 2  # the killed worker's and the live one's
        partial = [folder for folder in leftovers if any(folder.glob(".checkpoint-*.tmp"))]
        assert len(partial) == 1  # as the killed worker left it: a part-written temporary file
        ours = _foreign_entries(staging)
        old = time.time() - 3600
        for path in [*leftovers, *ours]:
            os.utime(path, (old, old), follow_symlinks=False)
        young = Path(tempfile.mkdtemp(prefix="segnext-ckpt-"))  # maybe not locked yet

        _checkpointer().report(4, {}, checkpoint=True)
        saved = Path(reports[-1]["checkpoint"].path)
        assert reports[-1]["held"] == 4
        assert _staged(staging) == sorted({*leftovers, saved, young} - {partial[0]})
        assert all(path.exists() or path.is_symlink() for path in ours)
    finally:
        live.communicate("", timeout=60)


def _foreign_entries(folder: Path) -> list[Path]:
    """Things in the temp folder the Checkpointer did not make: all of them must stay."""
    other = folder / "segnext-restore-abc"  # another prefix
    other.mkdir()
    named = folder / "segnext-ckpt-notes.txt"  # the prefix, but a file
    named.write_text("keep")
    target = folder / "elsewhere"
    target.mkdir()
    (target / "data").write_text("keep")
    link = folder / "segnext-ckpt-link"  # the prefix, but a link to a folder
    link.symlink_to(target, target_is_directory=True)
    return [other, named, target, link]
