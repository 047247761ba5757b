"""One driver per study: a lock on its folder, naming the process that holds it; a lock left by a
process that is gone is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".ancra-study.lock"
HOLDER_NAME = ".ancra-study.lock.json"  # who holds the lock, for the message to a second driver


class StudyLockedError(RuntimeError):
    """Another process runs this study in this storage folder."""



@contextlib.contextmanager
def study_lock(study_dir: str) -> Iterator[Path | None]:
    """Hold ``<study_dir>/.ancra-study.lock`` (a ``filelock`` lock: the operating system releases it
    when its process dies, a killed driver included) while the study runs: a second driver of the same
    study in the same folder is refused, naming the process that holds it (``.ancra-study.lock.json``).
    Remote storage (URIs) cannot be locked: None."""
    from filelock import FileLock, Timeout

    if "://" in study_dir:
        yield None
        return
    folder = Path(study_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path, holder_path = folder / LOCK_NAME, folder / HOLDER_NAME
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads(holder_path.read_text())
        except (OSError, ValueError):
            holder = {}
        where = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                 f"({holder.get('command', '?')})") if holder else "another process"
        raise StudyLockedError(f"study folder {folder} is in use by {where}: one study runs once at a time. "
                               "Wait for it, stop it, or use another --storage") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    try:
        holder_path.write_text(json.dumps(me))
        yield holder_path
    finally:
        with contextlib.suppress(OSError):
            holder_path.unlink()
        lock.release()
