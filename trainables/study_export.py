"""A study's record in a folder of its own: what outlives the machine the study ran on, and what a
published answer ships so that anyone reruns its tests.

``ancra-tune export STUDY --to DIR`` copies, at a stop or at the end (no driver may be running it):

- ``summary.json``: the study's summary as of its last session's end (every trial's row);
- ``reports/``: each evaluated trial's report with its per-example outcomes (what the tests read);
- ``sessions.json``: each session: when it ran, its end, the command, the commit and machine;
- the study file the summary names;
- ``MANIFEST.json``: when, by which command and code, and each file's size and SHA-256.

A study folder lives on its machine's disk (or a bucket); a machine that is lost takes it along,
checkpoints, kept evaluation batches and results together. An export holds no checkpoint (2 MB and
more each, the trials in progress need them to go on): it is the record of what finished, small
enough to keep beside the code (a few tens of kB a trial). The trials in progress go on from what
``--carry DIR`` writes beside it (:mod:`trainables.study_carry`), never into it.
``ancra-tune report DIR`` rebuilds the study's page from it alone, and ``ancra-tune export --check
DIR`` says whether every file is still the one exported.

Exporting again into the same folder brings it up to date: new and changed files are written (each
replaced whole), and a file an earlier export wrote that is no longer part of the record is removed;
a file the manifest did not write is never touched, and a folder that is not this study's export
is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from . import sessions
from . import storage as storage_mod
from .study_lock import study_lock

MANIFEST = "MANIFEST.json"
SUMMARY = "summary.json"
SESSIONS = "sessions.json"
FORMAT = 1


class ExportError(ValueError):
    """The study cannot be exported (yet), or the folder is not its export; the message says why."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read(study_dir: str, rel: str) -> bytes | None:
    text = storage_mod.read_text(storage_mod.join(study_dir, *rel.split("/")))
    return None if text is None else text.encode()


def _report_path(rel: str) -> str:
    """A report's path inside a study folder or a record (``reports/<trial>.json``); anything else (a
    path out of the folder) is refused."""
    parts = str(rel).split("/")
    if len(parts) != 2 or parts[0] != "reports" or parts[1] in ("", ".", "..") or not parts[1].endswith(".json"):
        raise ExportError(f"{rel!r} is not a report's path (reports/<trial>.json)")
    return str(rel)


def read_json_manifest(p: Path, what: str, key: str) -> dict[str, Any] | None:
    """The manifest at ``p`` (None if there is none); one that is not JSON, or lacks ``key``, is
    refused as not ``what``'s."""
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise ExportError(f"{p} is not {what}'s manifest ({e})") from None
    if not isinstance(data, dict) or key not in data:
        raise ExportError(f"{p} is not {what}'s manifest (no {key})")
    return data


def read_manifest(folder: Path) -> dict[str, Any] | None:
    return read_json_manifest(Path(folder) / MANIFEST, "an export", "files")


def file_problems(folder: Path, files: dict[str, Any], verb: str, prefix: str = "") -> list[str]:
    """Each file of ``files`` (path under ``folder`` -> its ``bytes`` and ``sha256``) that is missing
    or differs, named with ``prefix``; ``verb``: how it was written (exported, carried)."""
    problems = []
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{prefix}{rel}: missing")
        elif sha256_of(p.read_bytes()) != want["sha256"]:
            problems.append(f"{prefix}{rel}: changed since it was {verb} ({p.stat().st_size} bytes, "
                            f"{want['bytes']} {verb})")
    return problems


def record(study_dir: str, study_file: Path | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The study's summary and the files of its record (path in the export -> content), read from
    ``study_dir``; ``study_file``: the study file to ship (default: the one the summary names, a path
    relative to wherever its driver ran). Raises :class:`ExportError` when the folder holds no summary, or when its last
    session ended without writing one (a killed driver: the summary is older than the trials)."""
    raw = _read(study_dir, SUMMARY)
    if raw is None:
        raise ExportError(f"{study_dir} holds no summary.json: a study is exported once a session of it has "
                          "stopped (Ctrl+C) or ended; a killed driver writes none (run --resume, then stop it)")
    summary = json.loads(raw)
    history = sessions.load(study_dir)
    if history and (history[-1].ended is None or summary.get("sessions") != len(history)):
        raise ExportError(f"the last of study {summary.get('study')}'s {len(history)} sessions ended without "
                          f"writing its summary (the summary is from session {summary.get('sessions')}): trials "
                          "that finished since would be missing; run it with --resume, stop it with Ctrl+C, "
                          "then export")
    files = {SUMMARY: raw}
    if history:
        files[SESSIONS] = (storage_mod.read_text(sessions.path(study_dir)) or "").encode()
    missing = []
    for t in summary.get("trials", []):
        rel = t.get("report")
        if not rel:
            continue
        data = _read(study_dir, _report_path(rel))
        if data is None:
            missing.append(rel)
        else:
            files[rel] = data
    if missing:
        raise ExportError(f"{len(missing)} report(s) the summary names are not in {study_dir}: "
                          + ", ".join(missing[:5]))
    study_file = Path(study_file or summary.get("study_file", ""))
    if study_file.is_file():
        files[study_file.name] = study_file.read_bytes()
    return summary, files


def export(study_dir: str, out: Path, *, command: str, study_file: Path | None = None,
           carry: Path | None = None) -> dict[str, Any]:
    """Write ``study_dir``'s record into ``out`` (see the module); return the manifest written. The
    study's lock is held meanwhile: a running driver makes it refuse (StudyLockedError). ``carry``: a
    folder (not inside ``out``) to write the unfinished trials' state into as well
    (:mod:`trainables.study_carry`); the manifest's ``_carry`` is the carry's."""
    out = Path(out)
    if not storage_mod.is_uri(study_dir) and not Path(study_dir).is_dir():
        raise ExportError(f"no study folder {study_dir}")
    if carry is not None and (Path(carry).resolve() == out.resolve() or out.resolve() in Path(carry).resolve().parents
                              or Path(carry).resolve() in out.resolve().parents):
        raise ExportError(f"--carry {carry}: a folder of its own, beside the record {out} (not in it): the "
                          "record is published, the carried checkpoints are not")
    with study_lock(study_dir):
        summary, files = record(study_dir, study_file)
        if carry is not None:  # before anything is written
            from .study_carry import check_target

            check_target(Path(carry), summary.get("study"))
        manifest = _write_record(study_dir, out, summary, files, command)
        if carry is not None:
            from .study_carry import export_carry

            manifest["_carry"] = export_carry(study_dir, summary, Path(carry), command=command,
                                              record_manifest=manifest)
    return manifest


def _write_record(study_dir: str, out: Path, summary: dict[str, Any], files: dict[str, bytes],
                  command: str) -> dict[str, Any]:
    from .code_version import running_code, this_machine

    old = read_manifest(out) if out.exists() else None
    if old is not None and old.get("study") != summary.get("study"):
        raise ExportError(f"{out} holds the export of study {old.get('study')!r}, not {summary.get('study')!r}: "
                          "give each study a folder of its own")
    if old is None and out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty and holds no {MANIFEST}: export into a new folder or an "
                          "earlier export of the same study")
    if not any(n for n in files if n.endswith((".yaml", ".yml"))):
        print(f"warning: the study file {summary.get('study_file')} is gone: the export has none "
              "(the page rebuilt from it shows the grid in the trials' order)")
    written = changed = 0
    for rel, data in files.items():
        target = out / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        changed += target.exists()
        _write(target, data)
        written += 1
    removed = []
    for rel in sorted(set((old or {}).get("files", {})) - set(files)):
        p = out / rel
        if p.is_file():
            p.unlink()
            removed.append(rel)
    counts = summary.get("status_counts", {})
    manifest = {
        "format": FORMAT, "study": summary.get("study"), "kind": summary.get("kind"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
        "code": running_code(), "machine": this_machine(), "study_dir": study_dir,
        "outcome": summary.get("outcome"), "sessions": summary.get("sessions"),
        "wall_time_s": summary.get("wall_time_s"), "trials": counts,
        "evaluated": sum(1 for t in summary.get("trials", []) if t.get("report")),
        "files": {rel: {"bytes": len(data), "sha256": sha256_of(data)} for rel, data in sorted(files.items())},
    }
    _write(out / MANIFEST, (json.dumps(manifest, indent=1, default=str) + "\n").encode())
    manifest["_written"], manifest["_changed"], manifest["_removed"] = written, changed, removed
    return manifest


def check(folder: Path) -> list[str]:
    """What is wrong with the export in ``folder`` (nothing: an empty list): a file the manifest
    lists that is missing or differs, a report its summary names that the export lacks."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ExportError(f"{folder} holds no {MANIFEST}: not an export (ancra-tune export STUDY --to {folder})")
    problems = file_problems(folder, manifest["files"], "exported")
    try:
        summary = json.loads((folder / SUMMARY).read_text()) if (folder / SUMMARY).is_file() else {}
    except ValueError:
        summary = {}  # changed: said above
    if isinstance(summary, dict):
        for t in summary.get("trials", []):
            if t.get("report") and t["report"] not in manifest["files"]:
                problems.append(f"{t['report']}: named by the summary, not exported")
    return problems


def describe(manifest: dict[str, Any]) -> str:
    """One line for the console: what the export holds."""
    size = sum(f["bytes"] for f in manifest["files"].values())
    wall = manifest.get("wall_time_s") or 0
    return (f"study {manifest['study']} ({manifest.get('outcome')}, {manifest.get('sessions')} session(s), "
            f"{wall / 3600:.2f} h of wall time): {manifest['evaluated']} evaluated trial(s) of "
            f"{sum((manifest.get('trials') or {}).values())}, {len(manifest['files'])} files, {size / 1e3:.0f} kB")


# --------------------------------------------------------------------------- going on from a record

IMPORTED = "imported.json"  # in the study folder's study_state/: the rows a record brought in
#: statuses a record brings in as done: the rest (interrupted, error, stopped) run again
DONE = ("finished", "diverged")


def point_key(params: dict[str, Any]) -> str:
    """A (configuration, seed) pair as one comparable string."""
    return json.dumps(params, sort_keys=True, default=str)


def trial_points(study: Any) -> list[dict[str, Any]]:
    """Every (configuration, seed) pair of an ablation, in the order Tune starts a grid (the seed
    slowest, the grid's first key fastest)."""
    from .trial import SEED_KEY

    grid = study.ablation.grid
    points = [{**p, SEED_KEY: s} for p in study.grid_points() for s in study.seeds]
    points.sort(key=lambda q: (list(study.seeds).index(q[SEED_KEY]),
                               *(list(grid[k]).index(q[k]) for k in reversed(list(grid)))))
    return points


def import_record(record_dir: Path, study: Any, study_dir: str, carry: Path | None = None) -> dict[str, Any]:
    """Start ``study``'s folder ``study_dir`` (which must hold no session) from its export in
    ``record_dir`` after the folder it was exported from was lost: its evaluated (and diverged)
    trials' rows and reports, and its sessions, are brought in; the study then runs only the
    (configuration, seed) pairs the record does not hold. Only an ablation (a fixed grid), only an
    intact record, and only of the same study file, word for word: the design is not changed on the
    way. ``carry``: the unfinished trials' state exported with the record (``export --carry``): their
    pairs go on from it (:mod:`trainables.study_carry`). Returns what was imported (``rows``,
    ``record``, ``carried``)."""
    record_dir = Path(record_dir)
    if study.kind != "ablation":
        raise ExportError("--from-record goes on with an ablation (its grid is fixed); a sweep's search is not "
                          "in its record")
    problems = check(record_dir)
    if problems:
        raise ExportError(f"{record_dir} is not intact ({'; '.join(problems[:3])}): `ancra-tune export --check "
                          f"{record_dir}` lists every problem")
    manifest = read_manifest(record_dir) or {}
    if manifest.get("study") != study.name:
        raise ExportError(f"{record_dir} is the record of study {manifest.get('study')!r}, not {study.name!r}")
    mine = Path(study.path).read_bytes()
    shipped = [n for n in manifest["files"] if n.endswith((".yaml", ".yml"))]
    if not shipped or (record_dir / shipped[0]).read_bytes() != mine:
        raise ExportError(f"{study.path} is not the study file the record was made with ({record_dir}/"
                          f"{shipped[0] if shipped else '?'}): a study goes on from its record only unchanged")
    if sessions.load(study_dir):
        raise ExportError(f"{study_dir} holds a study already: --from-record starts a folder that was lost "
                          "(--resume goes on with one that is there)")
    summary = json.loads((record_dir / SUMMARY).read_text())
    done_keys = {point_key(t["params"]) for t in summary.get("trials", []) if t.get("status") in DONE}
    carried: dict[str, Any] = {}
    if carry is not None:  # checked (and laid out) before anything of the record is written
        from .study_carry import import_carry

        carried = import_carry(Path(carry), study, study_dir, manifest, done_keys)
    # Their checkpoints went with the lost folder: named as lost, never as if there.
    rows = [{**t, "checkpoint": None, "lost_checkpoint": t.get("checkpoint")}
            for t in summary.get("trials", []) if t.get("status") in DONE]
    reports = [_report_path(t["report"]) for t in rows if t.get("report")]  # every one checked before a write
    for rel in reports:
        storage_mod.write_text(storage_mod.join(study_dir, *rel.split("/")), (record_dir / rel).read_text())
    history = sessions.parse(json.loads((record_dir / SESSIONS).read_text())) if (record_dir / SESSIONS).is_file() \
        else []
    sessions.save(study_dir, history)
    imported = {"record": str(record_dir), "exported_at": manifest.get("exported_at"),
                "code": manifest.get("code"), "sessions": len(history), "rows": rows}
    storage_mod.write_json(storage_mod.state_path(study_dir, IMPORTED), imported)
    return {**imported, "carried": carried}


def was_imported(study_dir: str) -> bool:
    """Whether the study's folder was started from a record (its sessions then go on from the
    record's, even when no trial of it had finished)."""
    return isinstance(storage_mod.read_json(storage_mod.state_path(study_dir, IMPORTED)), dict)


def imported_rows(study_dir: str) -> list[dict[str, Any]]:
    """The trials' rows the study's folder was started with (:func:`import_record`); [] if none."""
    raw = storage_mod.read_json(storage_mod.state_path(study_dir, IMPORTED))
    return list(raw.get("rows", [])) if isinstance(raw, dict) else []


def points_left(study: Any, rows: list[dict[str, Any]], first: set[str] | frozenset[str] = frozenset()
                ) -> list[dict[str, Any]]:
    """The study's (configuration, seed) pairs no imported row holds, in :func:`trial_points`' order,
    the pairs keyed in ``first`` (carried: trials half done) before the rest."""
    from .trial import SEED_KEY

    done = {point_key({k: t["params"].get(k) for k in (*study.ablation.grid, SEED_KEY)}) for t in rows}
    left = [q for q in trial_points(study) if point_key(q) not in done]
    return sorted(left, key=lambda q: point_key(q) not in first)
