"""A tracking store that outlives the machine it runs on: consistent snapshots of a sqlite MLflow
store to the study storage (a bucket), and their restore.

On a cluster the MLflow server runs on the head node. With a PostgreSQL backend (the documented
choice in ``cluster.yaml``: a managed database, or one on a persistent volume) the store is already
durable. With the sqlite default the database file lives on the head's disk, which a spot reclaim
or ``ray down`` takes away with every run, metric and registered model; so the head snapshots it
every few minutes to the shared storage (``ancra-tune store snapshot --every 300 --to URI``) and a
new head restores the newest snapshot before its server starts (``ancra-tune store restore``).

A snapshot is taken with sqlite's online backup API while the server keeps writing: a consistent
database as of one moment, never a file copied halfway through a write. It is checked
(``PRAGMA integrity_check``) before it is uploaded and again after it is restored. Artifacts are
not in the database: on a cluster they go to the bucket already (``--artifacts-destination``).
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import storage

MANIFEST_SUFFIX = ".json"  # beside the snapshot: when it was taken, its size and checksum


class SnapshotError(RuntimeError):
    """A snapshot cannot be taken or restored; the message says why."""


def _check(db: Path) -> None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        result = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    if result != "ok":
        raise SnapshotError(f"{db} is not a sound sqlite database: {result}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(db: Path, dest: str) -> dict[str, Any]:
    """Copy the sqlite database ``db`` (in use or not) to ``dest`` (a path or a URI) as one consistent
    state, with a manifest beside it (``dest`` + ``.json``); returns the manifest."""
    if not db.is_file():
        raise SnapshotError(f"no MLflow store at {db}")
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d, "snapshot.db")
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        dst = sqlite3.connect(copy)
        try:
            with dst:
                src.backup(dst)  # pages copied under sqlite's locks: one moment's state
        finally:
            dst.close()
            src.close()
        _check(copy)
        manifest = {"taken_at": time.time(), "taken": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "source": str(db),
                    "bytes": copy.stat().st_size, "sha256": _sha256(copy)}
        storage.upload(copy, dest)
    storage.write_json(dest + MANIFEST_SUFFIX, manifest)  # after the data: a manifest names a whole snapshot
    return manifest


def restore(src: str, db: Path, *, force: bool = False) -> dict[str, Any] | None:
    """Put the snapshot at ``src`` in place as the database ``db``. An existing ``db`` is newer than
    any snapshot of it (this machine kept its disk) and is left alone unless ``force``. Returns the
    snapshot's manifest, or None when nothing was restored (no snapshot yet: a new store starts)."""
    if db.exists() and not force:
        return None
    db.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=db.parent) as d:
        got = Path(d, db.name)
        if not storage.download(src, got):
            return None
        manifest = storage.read_json(src + MANIFEST_SUFFIX) or {}
        if manifest.get("sha256") and manifest["sha256"] != _sha256(got):
            raise SnapshotError(f"the snapshot at {src} does not match its manifest (checksum): not restored")
        _check(got)
        for extra in ("-wal", "-shm", "-journal"):  # an old store's leftovers must not be replayed
            Path(str(db) + extra).unlink(missing_ok=True)
        got.replace(db)
    return manifest


def snapshot_every(db: Path, dest: str, *, every_s: float, stop: threading.Event | None = None,
                   log: Any = None) -> int:
    """Snapshot ``db`` to ``dest`` every ``every_s`` seconds until ``stop`` is set or SIGTERM/SIGINT
    arrives, then once more (a head going down keeps its last minutes). Only a store that changed
    since the last snapshot is copied again. Returns how many snapshots were taken."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: stop.set())
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    taken, last = 0, None
    while True:
        try:
            stamp = _stamp(db)
            if stamp is not None and stamp != last:
                m = snapshot(db, dest)
                taken, last = taken + 1, stamp
                say(f"snapshot of {db} to {dest}: {m['bytes']} bytes")
        except Exception as e:  # noqa: BLE001 (a failed snapshot is retried at the next turn)
            say(f"warning: snapshot of {db} to {dest} failed: {e}")
        if stop.is_set():
            return taken
        stop.wait(every_s)


def _stamp(db: Path) -> tuple[float, ...] | None:
    """What changes when the store is written (the database and its write-ahead log)."""
    parts = [Path(str(db) + s) for s in ("", "-wal")]
    stats = [(p.stat().st_mtime_ns, p.stat().st_size) for p in parts if p.exists()]
    return tuple(x for st in stats for x in st) if stats else None
