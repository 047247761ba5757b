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


class StudyLockedError(RuntimeError):
    """Another process runs this study in this storage folder."""



def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



def process_started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), to tell a reused pid; None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None



@contextlib.contextmanager
def study_lock(study_dir: str) -> Iterator[Path | None]:
    """Hold ``<study_dir>/.ancra-study.lock`` while the study runs: a second driver of the same study
    in the same folder is refused, naming the process that holds it. A lock left by a process that
    is gone (killed driver) is taken over. Remote storage (URIs) cannot be locked atomically: None."""
    if "://" in study_dir:
        yield None
        return
    folder = Path(study_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
                path.unlink(missing_ok=True)  # stale: the driver that held it is gone
                continue
            where = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                     f"({holder.get('command', '?')})") if holder else "another process"
            hint = "" if same_host else f"; if that process is gone, delete {path}"
            raise StudyLockedError(f"study folder {folder} is in use by {where}: one study runs once at a time. "
                                   f"Wait for it, stop it, or use another --storage{hint}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
