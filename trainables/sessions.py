"""A study's driver sessions and how each ended: what makes ``--resume`` and the exit code tell the truth.

A study may take several sessions (Ctrl+C, a killed driver, a full disk, then ``--resume``). Each
session is one entry of ``study_state/sessions.json`` in the study folder: when it started, when
it ended and its outcome. The study's wall time is the sum of its sessions' (a killed session's
end is the last trace its trials left, a result, a mid-epoch checkpoint or a kept evaluation batch,
recorded when the next session begins; older ones without it end at the last result), so shares
of it stay between 0 and 1, and a study whose last session finished is not run again by ``--resume``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import disk, storage

SESSIONS_NAME = "sessions.json"

# A study's (and a session's) outcome; the CLI's exit code follows from it (README: "Exit codes").
FINISHED = "finished"  # ran to its end and at least one trial finished
FAILED = "failed"  # ran to its end but no trial finished (every one errored, diverged or was stopped)
INTERRUPTED = "interrupted"  # Ctrl+C / SIGTERM: --resume continues
DISK_FULL = "disk_full"  # stopped by the disk guard: --resume continues once space is back
OUTCOMES = (FINISHED, FAILED, INTERRUPTED, DISK_FULL)


@dataclass
class Session:
    started: float
    ended: float | None = None  # None: still running, or its driver was killed
    outcome: str | None = None
    command: str | None = None
    slots: int = 1  # trials it ran at once
    experiment: str | None = None  # the Tune experiment it ran: None the study's own, "more-<k>" an extension
    added: int | None = None  # an extension's trials (`--more N`)
    code: dict[str, Any] | None = None  # the code it ran (code_version.running_code); None: not recorded
    machine: dict[str, Any] | None = None  # its driver's machine (code_version.this_machine)


def path(study_dir: str) -> str:
    return storage.state_path(study_dir, SESSIONS_NAME)


def load(study_dir: str) -> list[Session]:
    return parse(storage.read_json(path(study_dir)))


def parse(raw: Any) -> list[Session]:
    """The sessions of a sessions.json's content (a study folder's, or an export's copy)."""
    if not isinstance(raw, list):
        return []
    fields = set(Session.__dataclass_fields__)
    return [Session(**{k: v for k, v in s.items() if k in fields}) for s in raw if isinstance(s, Mapping)]


def save(study_dir: str, sessions: Iterable[Session]) -> None:
    storage.write_json(path(study_dir), [asdict(s) for s in sessions])


def begin(study_dir: str, *, resume: bool, command: str | None = None, slots: int = 1,
          experiment: str | None = None, added: int | None = None) -> list[Session]:
    """Record a new session (a fresh study forgets the sessions of an earlier study of that name; an
    extension, ``--more``, keeps them)."""
    sessions = load(study_dir) if resume or experiment is not None else []
    from .code_version import running_code, this_machine

    sessions.append(Session(started=time.time(), command=command, slots=slots, experiment=experiment, added=added,
                            code=running_code(), machine=this_machine()))
    save(study_dir, sessions)
    return sessions


def close_killed(study_dir: str, sessions: list[Session], last_seen: float | None) -> None:
    """The last session had no end (its driver was killed): it ended when its trials last left a
    trace (``last_seen``; its start when they left none), interrupted."""
    if sessions and sessions[-1].ended is None:
        sessions[-1].ended = max(sessions[-1].started, last_seen or 0.0)
        sessions[-1].outcome = INTERRUPTED
        save(study_dir, sessions)


def end(study_dir: str, sessions: list[Session], outcome: str) -> None:
    sessions[-1].ended, sessions[-1].outcome = time.time(), outcome
    save(study_dir, sessions)


def last_outcome(study_dir: str) -> str | None:
    sessions = load(study_dir)
    return sessions[-1].outcome if sessions else None


def wall_time_s(sessions: list[Session], reported_at: Iterable[float], now: float | None = None) -> float:
    """The study's wall time over all its sessions. A session without an end (its driver was killed)
    lasted until the last result its trials reported before the next session began; the session
    running now lasts until ``now``."""
    now = time.time() if now is None else now
    times = sorted(t for t in reported_at if isinstance(t, (int, float)))
    total = 0.0
    for i, s in enumerate(sessions):
        if s.ended is not None:
            end_t = s.ended
        elif i == len(sessions) - 1:
            end_t = now
        else:
            nxt = sessions[i + 1].started
            end_t = max([s.started] + [t for t in times if s.started <= t <= nxt])
        total += max(0.0, end_t - s.started)
    return total


def outcome_of(summary: Mapping[str, Any]) -> str:
    """How a study (its summary) ended."""
    if summary.get("interrupted_by") == disk.DISK_FULL:
        return DISK_FULL
    if summary.get("interrupted"):
        return INTERRUPTED
    return FINISHED if summary["status_counts"].get("finished", 0) > 0 else FAILED


def extensions(sessions: list[Session]) -> dict[str, int]:
    """The study's extensions (``--more``) in order: Tune experiment name -> trials it adds."""
    out: dict[str, int] = {}
    for s in sessions:
        if s.experiment is not None and s.added is not None:
            out.setdefault(s.experiment, s.added)
    return out
