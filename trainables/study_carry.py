"""What a stopped ablation's unfinished trials go on from, carried off its machine: their last
epoch's checkpoint, their mid-epoch checkpoint and their evaluation's finished batches.

A record (:mod:`trainables.study_export`) keeps what finished; a machine that is lost between two
sessions takes the trials in progress along, and a trial longer than one session then never ends.
``ancra-tune export STUDY --to RECORD --carry DIR`` writes, beside the record, each unfinished trial's
state into ``DIR`` (a few MB a trial: the model and its optimizer, twice when it stopped mid-epoch)
with ``CARRY.json`` (each file's size and SHA-256, the study file's digest, the record it goes with).
``ancra-tune ablate STUDY --from-record RECORD --carry DIR`` on another machine brings them into the
new study folder (``study_state/carried/``); the trial of each carried (configuration, seed) pair
starts first and goes on from there exactly as ``--resume`` would: from the last epoch's
checkpoint, then from the step its mid-epoch checkpoint reached, then from its next unevaluated
batch (kept batches are used only for the same weights: their model digest is checked).

Carried state is scaffolding, not a result: keep it out of a published record and delete it once
the study has finished.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

from . import storage as storage_mod
from .study_export import DONE, ExportError, file_problems, point_key, read_json_manifest, sha256_of

CARRY_MANIFEST = "CARRY.json"
FORMAT = 1
CARRIED_DIR = "carried"  # under study_state/: the carried files, one folder per pair
CARRIED_INDEX = "carried.json"  # under study_state/: point key -> what was carried
TRIAL_MARK = "carried_from.json"  # in a trial's folder: its carried state was laid there (once)
CHECKPOINT_DIR, EVAL_DIR = "checkpoint", "eval_batches"


def _files_under(fs: Any, folder: str) -> dict[str, bytes]:
    """Every file below ``folder`` (path relative to it -> content); {} if there is no such folder.
    Temporary files of a write in progress (``*.tmp``) are left."""
    import pyarrow.fs

    if fs.get_file_info(folder).type != pyarrow.fs.FileType.Directory:
        return {}
    out = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True)):
        if info.type == pyarrow.fs.FileType.File and not info.path.endswith(".tmp"):
            out[info.path[len(folder):].lstrip("/")] = storage_mod.fs_read(fs, info.path) or b""
    return out


def _own_name(path: str | None) -> str | None:
    """The last part of a trial's or checkpoint's path (its folder in the study's)."""
    if not path:
        return None
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\\" in name:
        raise ExportError(f"{path!r}: not a trial's folder")
    return name


def read_mark(fs: Any, folder: str) -> dict[str, Any] | None:
    """The mark a trial's folder holds when carried state was laid into it (:func:`lay_out`): the
    carried folder, the earlier trial's epochs, training time, ...; None when there is none. A mark
    that is not such a dict raises ExportError naming the file (it is written whole, so only a hand
    edit or a damaged disk makes one)."""
    raw = storage_mod.fs_read(fs, f"{folder}/{TRIAL_MARK}")
    if raw is None:
        return None
    try:
        mark = json.loads(raw)
    except ValueError as e:
        raise ExportError(f"{folder}/{TRIAL_MARK} is not JSON ({e})") from None
    if not isinstance(mark, dict):
        raise ExportError(f"{folder}/{TRIAL_MARK} is not a carried-state mark")
    return mark


def slug(params: dict[str, Any], taken: Container[str] = ()) -> str:
    """A carried pair's folder: its values, readable (``anc=True_ra=False_seed=0``), so that a pair
    keeps its folder from one export to the next whatever order the summary lists it in (a carry
    named by position moved each pair's files whenever the order changed, and git stored them again);
    a name already in ``taken`` (two values that read alike) gets ``~2``, ``~3``... A carry written
    before (``p00_...``) is read by its manifest's names, so it still imports."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(params.items())]
    name = "_".join(parts).replace("/", "-").replace(" ", "") or "point"
    n, out = 1, name
    while out in taken:
        n += 1
        out = f"{name}~{n}"
    return out


def trial_state(study_dir: str, row: dict[str, Any]) -> dict[str, bytes]:
    """What an unfinished trial goes on from, read from its folder in ``study_dir`` (relative path in
    the carry -> content): its last reported checkpoint's files, its mid-epoch checkpoint, its kept
    evaluation batches. {} when it has none (it never got far)."""
    from ancra_tune.trainer import PARTIAL_NAME

    from .trial_eval import EVAL_BATCHES

    trial = _own_name(row.get("trial_dir"))
    if trial is None:
        return {}
    fs, base = storage_mod.filesystem(storage_mod.join(study_dir, trial))
    files: dict[str, bytes] = {}
    checkpoint = _own_name(row.get("checkpoint"))
    if checkpoint is not None:
        got = _files_under(fs, f"{base}/{checkpoint}")
        if not got:
            raise ExportError(f"trial {row.get('trial_id')}'s checkpoint {checkpoint} is not in {study_dir}/{trial}")
    else:
        # A trial that went on from carried state and stopped before an epoch of its own ended: its
        # last epoch's checkpoint is still the carried one.
        mark = read_mark(fs, base)
        got = {}
        if mark is not None:
            if not isinstance(mark.get("folder"), str):
                raise ExportError(f"{base}/{TRIAL_MARK} names no carried folder")
            cfs, cbase = storage_mod.filesystem(storage_mod.join(study_dir, storage_mod.STATE_DIR, CARRIED_DIR,
                                                     _own_name(mark["folder"]) or ""))
            got = _files_under(cfs, f"{cbase}/{CHECKPOINT_DIR}")
    files.update({f"{CHECKPOINT_DIR}/{k}": v for k, v in got.items()})
    partial = storage_mod.fs_read(fs, f"{base}/{PARTIAL_NAME}")
    if partial is not None:
        files[PARTIAL_NAME] = partial
    files.update({f"{EVAL_DIR}/{k}": v for k, v in _files_under(fs, f"{base}/{EVAL_BATCHES}").items()})
    return files


def export_carry(study_dir: str, summary: dict[str, Any], out: Path, *, command: str,
                 record_manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the state of ``summary``'s unfinished trials (read from ``study_dir``) into ``out``,
    replacing what an earlier carry held there; return the manifest written (``CARRY.json``). The
    caller holds the study's lock (no driver writes meanwhile)."""
    from ancra_tune.trainer import PARTIAL_NAME

    from .code_version import running_code, this_machine

    out = Path(out)
    check_target(out, summary.get("study"))
    rows = [t for t in summary.get("trials", []) if t.get("status") not in DONE and t.get("params")]
    points: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for t in rows:
        state = trial_state(study_dir, t)
        if not state:
            continue
        name = slug(t["params"], points)
        files.update({f"{name}/{k}": v for k, v in state.items()})
        points[name] = {
            "params": t["params"], "trial_id": t.get("trial_id"), "status": t.get("status"),
            "epochs_run": t.get("epochs_run"), "train_time_s": t.get("train_time_s"),
            "checkpoint": any(k.startswith(CHECKPOINT_DIR + "/") for k in state),
            "mid_epoch": PARTIAL_NAME in state,
            "eval_batches": sum(1 for k in state if k.startswith(EVAL_DIR + "/batch_")),
            "files": {k: {"bytes": len(v), "sha256": sha256_of(v)} for k, v in sorted(state.items())},
        }
    shutil.rmtree(out, ignore_errors=True)  # only an earlier carry of this study (checked above)
    out.mkdir(parents=True)
    for rel, data in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    study_file = next((n for n in record_manifest.get("files", {}) if n.endswith((".yaml", ".yml"))), None)
    manifest = {
        "format": FORMAT, "study": summary.get("study"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
        "code": running_code(), "machine": this_machine(), "study_dir": study_dir,
        # the record it goes with: carried state never stands for a trial the record holds as done
        "record": {"exported_at": record_manifest.get("exported_at"), "sessions": record_manifest.get("sessions"),
                   "summary_sha256": (record_manifest.get("files", {}).get("summary.json") or {}).get("sha256"),
                   "study_file_sha256": (record_manifest.get("files", {}).get(study_file) or {}).get("sha256")},
        "points": points,
    }
    (out / CARRY_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    manifest["_bytes"] = sum(len(v) for v in files.values())
    return manifest


def check_target(out: Path, study: str | None) -> None:
    """Refuse a folder to carry into that is not new, empty or an earlier carry of ``study`` (it is
    replaced whole)."""
    out = Path(out)
    old = read_carry(out) if out.exists() else None
    if old is not None and old.get("study") != study:
        raise ExportError(f"{out} carries study {old.get('study')!r}, not {study!r}")
    if old is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} is not empty and holds no {CARRY_MANIFEST}: carry into a new folder or an "
                          "earlier carry of the same study")


def read_carry(folder: Path) -> dict[str, Any] | None:
    data = read_json_manifest(Path(folder) / CARRY_MANIFEST, "a carry", "points")
    if data is not None and not isinstance(data["points"], dict):
        raise ExportError(f"{Path(folder) / CARRY_MANIFEST} is not a carry's manifest (no points)")
    return data


def check_carry(folder: Path) -> list[str]:
    """What is wrong with the carry in ``folder`` (nothing: an empty list)."""
    folder = Path(folder)
    manifest = read_carry(folder)
    if manifest is None:
        raise ExportError(f"{folder} holds no {CARRY_MANIFEST}: not a carry (ancra-tune export STUDY --to RECORD "
                          f"--carry {folder})")
    problems = []
    for name, point in manifest["points"].items():
        if _own_name(name) != name:
            problems.append(f"{name}: not a carried pair's folder")
            continue
        files = point.get("files", {})
        outside = [rel for rel in files if ".." in Path(rel).parts or Path(rel).is_absolute()]
        problems += [f"{name}/{rel}: a path out of the carry" for rel in outside]
        problems += file_problems(folder / name, {k: v for k, v in files.items() if k not in outside},
                                  "carried", prefix=f"{name}/")
    return problems


def describe_carry(manifest: dict[str, Any]) -> str:
    points = manifest["points"]
    size = sum(f["bytes"] for p in points.values() for f in p["files"].values())
    parts = []
    for p in points.values():
        where = f"{p.get('epochs_run') or 0} epoch(s) done"
        if p.get("mid_epoch"):
            where += " + part of the next"
        if p.get("eval_batches"):
            where += f", {p['eval_batches']} evaluation batch(es)"
        parts.append(f"{p.get('trial_id')} ({where})")
    return (f"{len(points)} unfinished trial(s) carried, {size / 1e6:.1f} MB"
            + (": " + "; ".join(parts) if parts else ""))


def import_carry(carry_dir: Path, study: Any, study_dir: str, record_manifest: dict[str, Any],
                 done: set[str]) -> dict[str, Any]:
    """Lay a carry's state into ``study_dir`` (``study_state/carried/``) for the pairs ``done`` (point
    keys the record holds as finished) does not hold; return the index written (point key -> its
    folder and what it holds). The carry must be intact, of the same study and study file, and of the
    record being imported."""
    carry_dir = Path(carry_dir)
    problems = check_carry(carry_dir)
    if problems:
        raise ExportError(f"{carry_dir} is not intact ({'; '.join(problems[:3])}): `ancra-tune export --check "
                          f"{carry_dir}` lists every problem")
    manifest = read_carry(carry_dir) or {}
    if manifest.get("study") != study.name:
        raise ExportError(f"{carry_dir} carries study {manifest.get('study')!r}, not {study.name!r}")
    rec = manifest.get("record") or {}
    if rec.get("study_file_sha256") != sha256_of(Path(study.path).read_bytes()):
        raise ExportError(f"{carry_dir} was carried from a study made with another study file than {study.path}")
    if rec.get("summary_sha256") != (record_manifest.get("files", {}).get("summary.json") or {}).get("sha256"):
        raise ExportError(f"{carry_dir} was carried beside another export of the record (exported "
                          f"{rec.get('exported_at')}, the record: {record_manifest.get('exported_at')}): export both "
                          "together (ancra-tune export ... --to RECORD --carry DIR)")
    index: dict[str, Any] = {}
    for name, point in manifest["points"].items():
        key = point_key(point["params"])
        if key in done:
            continue
        dest = storage_mod.join(study_dir, storage_mod.STATE_DIR, CARRIED_DIR, name)
        fs, base = storage_mod.filesystem(dest)
        for rel in point["files"]:
            fs.create_dir(f"{base}/{rel}".rsplit("/", 1)[0], recursive=True)
            storage_mod.fs_write(fs, f"{base}/{rel}", (carry_dir / name / rel).read_bytes())
        index[key] = {k: v for k, v in point.items() if k != "files"} | {"folder": name}
    storage_mod.write_json(storage_mod.state_path(study_dir, CARRIED_INDEX),
                           {"carry": str(carry_dir), "exported_at": manifest.get("exported_at"),
                            "code": manifest.get("code"), "machine": manifest.get("machine"), "points": index})
    return index


def carried(study_dir: str) -> dict[str, Any]:
    """The study folder's carried pairs (point key -> what was carried); {} if none."""
    raw = storage_mod.read_json(storage_mod.state_path(study_dir, CARRIED_INDEX))
    return dict(raw.get("points", {})) if isinstance(raw, dict) else {}


def lay_out(study_dir: str, params: dict[str, Any], trial: tuple[Any, str] | None) -> tuple[Any, str] | None:
    """Called as a trial of the pair ``params`` (grid keys and seed) starts: if state was carried for
    it, put the carried mid-epoch checkpoint and evaluation batches into the trial's folder ``trial``
    (once: a restarted trial keeps what it wrote since) and return (filesystem, folder) of the carried
    last-epoch checkpoint, the one to resume from while Tune has none of the trial's own (None when
    nothing was carried, or no epoch had ended)."""
    point = carried(study_dir).get(point_key(params))
    if point is None:
        return None
    from ancra_tune.trainer import PARTIAL_NAME

    from .trial_eval import EVAL_BATCHES

    fs, base = storage_mod.filesystem(storage_mod.join(study_dir, storage_mod.STATE_DIR, CARRIED_DIR, point["folder"]))
    if trial is not None:
        tfs, folder = trial
        if not storage_mod.fs_exists(tfs, f"{folder}/{TRIAL_MARK}"):
            partial = storage_mod.fs_read(fs, f"{base}/{PARTIAL_NAME}")
            if partial is not None:
                storage_mod.fs_write(tfs, f"{folder}/{PARTIAL_NAME}", partial)
            for rel, data in _files_under(fs, f"{base}/{EVAL_DIR}").items():
                tfs.create_dir(f"{folder}/{EVAL_BATCHES}", recursive=True)
                storage_mod.fs_write(tfs, f"{folder}/{EVAL_BATCHES}/{rel}", data)
            storage_mod.fs_write(tfs, f"{folder}/{TRIAL_MARK}",
                                 json.dumps({"folder": point["folder"], "trial_id": point.get("trial_id"),
                                             "epochs_run": point.get("epochs_run"),
                                             "train_time_s": point.get("train_time_s"),
                                             "mid_epoch": point.get("mid_epoch"),
                                             "eval_batches": point.get("eval_batches")}).encode())
    if not point.get("checkpoint"):
        return None
    return fs, f"{base}/{CHECKPOINT_DIR}"


__all__ = ["CARRY_MANIFEST", "carried", "check_carry", "describe_carry", "export_carry", "import_carry",
           "lay_out", "read_carry", "read_mark"]
