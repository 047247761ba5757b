"""What stands between a study and the faults of a real machine: its storage checked before Ray
starts, one driver per study (a lock on its folder), interruptions (Ctrl+C, SIGTERM from
``ray job stop`` or a scheduler) turned into Tune's graceful stop and reported as such, and the
scratch folders of killed workers removed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".ancra-study.lock"
LOW_SPACE_BYTES = 1 << 30  # warn below 1 GiB free
RESERVE_ENV = "ANCRA_DISK_RESERVE_MB"
DEFAULT_RESERVE_MB = 256  # a study stops (to be resumed) before its storage has less free than this
DISK_FULL = "disk full"


class StorageError(RuntimeError):
    """The study's storage cannot be used; the message says why and what to do."""


class StudyLockedError(RuntimeError):
    """Another process runs this study in this storage folder."""


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------- the workers' scratch folders

RUN_DIR_GLOB = "ancra-*rank[0-9]*"  # ancra-<run>-rank<k> (older versions: ancra-rank<k>-<random>)
RUN_DIR_OWNER = ".owner.json"
RUN_DIR_FILES = ("checkpoint.pt", "metrics.jsonl", "config.yaml")  # what a worker's folder holds
ORPHAN_AGE_S = 24 * 3600  # a folder without an owner is left alone until nothing wrote to it for a day


def _process_started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), to tell a reused pid; None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim_run_dir(folder: Path) -> None:
    """Mark ``folder`` as this process's: once the process is gone, :func:`sweep_run_dirs` removes it."""
    me = {"pid": os.getpid(), "started": _process_started(os.getpid()), "host": socket.gethostname()}
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
    if not _pid_alive(owner["pid"]):
        return True
    started = owner.get("started")
    now_started = _process_started(owner["pid"])
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
            if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
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


class Interruption:
    """Ctrl+C and SIGTERM during a study: the first asks Tune to stop gracefully (it saves the
    experiment state, so ``--resume`` continues) and is remembered; a second stops at once.
    :meth:`stop` does the same for the platform's own reasons (a full disk)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.message: str | None = None

    def stop(self, reason: str, message: str) -> None:
        """Stop the running study as Ctrl+C does, for ``reason`` (recorded as ``signal``)."""
        if self.signal is not None:
            return
        self.signal, self.message = reason, message
        print(f"\n{message}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {name}")
        self.signal = name
        print(f"\n{name}: stopping the study after saving its state (send it again to stop at once)",
              file=sys.stderr, flush=True)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt(name)  # Tune is not running yet: nothing to save
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interruption]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # Tune would take over SIGINT for itself and then swallow it; it also listens on SIGUSR1.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


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
