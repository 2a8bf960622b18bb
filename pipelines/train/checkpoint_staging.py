"""Local folders that hold a checkpoint between rank 0's save and Ray Train's upload.

Ray Train (ASYNC upload mode) copies the folder to the run's storage after `report` returns and
then deletes it, so the folder outlives the save call. What would be left behind: a save that
fails (the caller discards the folder) and a process killed mid-save (SIGKILL: no `finally`
runs). Each folder is locked (flock on the folder itself) while its process lives, so a
leftover is recognised by its free lock and removed at the next save.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

try:
    import fcntl
except ImportError:  # not POSIX: no lock, so leftovers of killed processes are not collected
    fcntl = None

STAGING_PREFIX = "segnext-ckpt-"  # rank 0's local checkpoint folders, in tempfile's folder
STAGING_GRACE_S = 60.0  # a younger folder may be between its mkdtemp and its lock: left alone
_held: dict[str, int] = {}  # this process's staging folders -> the descriptor holding the lock


def stage_folder() -> str:
    """A new local folder for a checkpoint before Ray Train uploads it (then deletes it).

    The folder stays locked (flock on the folder itself) while this process lives and the folder
    exists, so a folder left by a process killed mid-save (SIGKILL: no `finally` runs) or before
    its upload is recognised by its free lock: such leftovers are removed here first."""
    _release_gone()
    remove_abandoned(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=STAGING_PREFIX)
    if fcntl is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _held[folder] = fd
    return folder


def discard_folder(folder: str) -> None:
    """Remove a staging folder of this process (its checkpoint was not handed to Ray)."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _release_gone() -> None:
    """Drop the locks of this process's staging folders that Ray has deleted after upload."""
    for folder, fd in list(_held.items()):
        try:
            present = os.path.samestat(os.fstat(fd), os.stat(folder))
        except OSError:
            present = False
        if not present:
            os.close(fd)
            del _held[folder]


def remove_abandoned(parent: str) -> None:
    """Remove the staging folders under `parent` whose owner is gone: ours (STAGING_PREFIX, a
    real folder of this user) and unlocked. A locked one (a live process saving, or waiting
    for its upload), one younger than STAGING_GRACE_S (maybe not locked yet), one of another
    user or anything else is left alone; errors only leave a folder in place."""
    if fcntl is None:
        return
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX) or entry.path in _held:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if (not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid()
                    or time.time() - info.st_mtime < STAGING_GRACE_S):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its owner lives
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)
