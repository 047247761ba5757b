"""The workers' scratch folders (``ancra-<run>-rank<k>`` in the temporary directory): each worker
claims its own, and the folders of workers that are gone (killed) are removed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path


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



RUN_DIR_GLOB = "ancra-*rank[0-9]*"  # ancra-<run>-rank<k> (older versions: ancra-rank<k>-<random>)
RUN_DIR_OWNER = ".owner.json"
RUN_DIR_FILES = ("checkpoint.pt", "metrics.jsonl", "config.yaml")  # what a worker's folder holds
ORPHAN_AGE_S = 24 * 3600  # a folder without an owner is left alone until nothing wrote to it for a day


def claim_run_dir(folder: Path) -> None:
    """Mark ``folder`` as this process's: once the process is gone, :func:`sweep_run_dirs` removes it."""
    me = {"pid": os.getpid(), "started": process_started(os.getpid()), "host": socket.gethostname()}
    (folder / RUN_DIR_OWNER).write_text(json.dumps(me))


def _run_dir_stale(folder: Path, now: float) -> bool:
    try:
        owner = json.loads((folder / RUN_DIR_OWNER).read_text())
    except FileNotFoundError:  # an older version's folder, or one whose worker died before claiming it
        try:
            entries = [folder, *folder.iterdir()]
            newest = max(p.stat().st_mtime for p in entries)
        except OSError:
            return False
        ours = any(p.name in RUN_DIR_FILES for p in entries)
        return ours and now - newest > ORPHAN_AGE_S
    except (OSError, ValueError):
        return False
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname() or \
            not isinstance(owner.get("pid"), int):
        return False  # another machine's (a shared /tmp) or unreadable: never ours to judge
    if not pid_alive(owner["pid"]):
        return True
    started = owner.get("started")
    now_started = process_started(owner["pid"])
    return started is not None and now_started is not None and now_started != started  # the pid was reused


def sweep_run_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders (``ancra-<run>-rank<k>`` in the temporary directory) of workers that
    are gone: a worker that ends removes its own, but one that is killed (a trial stopped by killing
    its actor, a lost node's restart, Ctrl+C twice, the OOM killer) cannot, and each holds its run's
    last checkpoint (a large model's weights and optimizer state). Folders of live processes and of
    other machines are kept. Returns the folders removed."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    now, removed = time.time(), []
    try:
        candidates = [d for d in root.glob(RUN_DIR_GLOB) if d.is_dir() and not d.is_symlink()]
    except OSError:
        return removed
    for d in candidates:
        if _run_dir_stale(d, now):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed
