"""A study's storage and its free space: checked before Ray starts (a file in the way, no write
permission, less free than the reserve) and watched while it runs (:class:`DiskGuard` stops the study
gracefully below the reserve, so a checkpoint or Tune's state is never cut short)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .interruption import Interruption

LOW_SPACE_BYTES = 1 << 30  # warn below 1 GiB free
RESERVE_ENV = "ANCRA_DISK_RESERVE_MB"
DEFAULT_RESERVE_MB = 256  # a study stops (to be resumed) before its storage has less free than this
DISK_FULL = "disk full"


class StorageError(RuntimeError):
    """The study's storage cannot be used; the message says why and what to do."""



def check_storage(storage: str) -> dict[str, Any]:
    """Fail before Ray starts when a local storage path cannot hold a study (it is a file or under
    one, or not writable); return its free space (a warning under 1 GiB). URIs are checked by Ray."""
    if "://" in storage:
        return {"storage": storage, "free_bytes": None}
    p = Path(storage)
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            raise StorageError(f"storage {storage} cannot be a folder: {parent} is a file. Pass --storage with a "
                               "folder path (or set ANCRA_STORAGE)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".ancra-write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"storage {storage} is not writable ({e.strerror or e}). Pass --storage with a folder "
                           "you can write, or fix its permissions") from None
    free = shutil.disk_usage(p).free
    reserve = disk_reserve_bytes()
    if free < reserve:
        raise StorageError(f"storage {storage} has {free / 2**20:.0f} MiB free, less than the "
                           f"{reserve / 2**20:.0f} MiB a study keeps for its checkpoints and state ({RESERVE_ENV}): "
                           "free some space (a stopped study then continues with --resume) or pass another --storage")
    out: dict[str, Any] = {"storage": str(p.resolve()), "free_bytes": free}
    if free < LOW_SPACE_BYTES:
        out["warning"] = (f"only {free / 2**20:.0f} MiB free under {storage}: checkpoints of every trial go there; "
                          "a full disk stops the study (resume it with --resume once space is back)")
    return out


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(path).free


def disk_reserve_bytes() -> int:
    """Free space a study keeps on its storage (``ANCRA_DISK_RESERVE_MB``, default 256 MiB): room for
    the experiment state and the checkpoints in flight when it stops."""
    raw = os.environ.get(RESERVE_ENV, str(DEFAULT_RESERVE_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise StorageError(f"{RESERVE_ENV}={raw!r} is not a number of MiB") from None
    return int(mb * 2**20)


def below_reserve(folder: str | Path) -> bool:
    """True when ``folder``'s disk has less free space than a study keeps (False if unknown)."""
    try:
        return free_bytes(folder) < disk_reserve_bytes()
    except OSError:
        return False


class DiskGuard:
    """Watches the free space of a local study folder: below the reserve it stops the study
    gracefully (state saved, runs marked failed, ``--resume`` continues once space is back) instead
    of letting a checkpoint or Tune's state file be cut short by a full disk. Tune calls
    :meth:`check` at every step of its loop (``trainables.study_run.DiskWatch``)."""

    def __init__(self, folder: str, interruption: Interruption, *, every_s: float = 2.0) -> None:
        self.folder, self.interruption, self.every_s = folder, interruption, every_s
        self.reserve = disk_reserve_bytes()
        self._last = float("-inf")

    def check(self) -> bool:
        """True when the study must stop (and asks it to, once)."""
        now = time.monotonic()
        if now - self._last < self.every_s or self.interruption.signal is not None:
            return False
        self._last = now
        try:
            free = free_bytes(self.folder)
        except OSError:
            return False
        if free >= self.reserve:
            return False
        self.interruption.stop(DISK_FULL, (
            f"disk full: {free / 2**20:.0f} MiB free under {self.folder}, below the {self.reserve / 2**20:.0f} MiB "
            f"the study keeps ({RESERVE_ENV}); stopping it after saving its state. Free some space, then resume it "
            "with --resume"))
        return True
