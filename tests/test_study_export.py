"""``ancra-tune export``: a stopped study's record (summary, per-example outcomes, sessions, study file)
in a folder of its own, brought up to date by exporting again, and verified by ``--check``.

The study folders here are written by hand in the layout a study leaves (test_ray exports a real one
and rebuilds its page from the export alone)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trainables import sessions
from trainables.cli import main
from trainables.study_export import ExportError, export, record
from trainables.study_lock import study_lock


def _study(tmp_path: Path, *, finished: int = 2, n_sessions: int = 1, summary_sessions: int | None = None,
           last_ended: bool = True) -> Path:
    """A study folder as a stopped ablation leaves it: ``finished`` evaluated trials of 3."""
    folder = tmp_path / "studies" / "demo"
    (folder / "reports").mkdir(parents=True)
    (folder / "run_trial_x" / "checkpoint_000001").mkdir(parents=True)
    (folder / "run_trial_x" / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"\0" * 4096)
    study_file = tmp_path / "demo.yaml"
    study_file.write_text("name: demo\nkind: ablation\n")
    trials = []
    for i in range(3):
        row = {"trial_id": f"t{i}", "status": "finished" if i < finished else "interrupted", "params": {"seed": i}}
        if i < finished:
            row["report"] = f"reports/t{i}.json"
            (folder / row["report"]).write_text(json.dumps({"per_example": [1, 0, 1, i]}))
        trials.append(row)
    summary = {"study": "demo", "kind": "ablation", "study_file": str(study_file), "study_dir": str(folder),
               "outcome": "interrupted", "sessions": summary_sessions or n_sessions, "wall_time_s": 7200.0,
               "status_counts": {"finished": finished, "interrupted": 3 - finished}, "trials": trials}
    (folder / "summary.json").write_text(json.dumps(summary))
    history = [sessions.Session(started=1000.0 * k, ended=1000.0 * k + 500, outcome="interrupted")
               for k in range(1, n_sessions + 1)]
    if not last_ended:
        history[-1].ended = history[-1].outcome = None
    sessions.save(str(folder), history)
    return folder


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_export_holds_the_record_and_no_checkpoint(tmp_path: Path, capsys) -> None:
    folder = _study(tmp_path)
    out = tmp_path / "export"
    assert main(["export", str(folder), "--to", str(out)]) == 0
    assert "2 evaluated trial(s) of 3" in capsys.readouterr().out
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["MANIFEST.json", "demo.yaml", "reports/t0.json", "reports/t1.json", "sessions.json",
                     "summary.json"]  # no checkpoint, no trial folder
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["study"] == "demo" and manifest["evaluated"] == 2 and manifest["sessions"] == 1
    assert manifest["command"].startswith("ancra-tune export") and manifest["code"]
    source = {"demo.yaml": tmp_path / "demo.yaml", "sessions.json": folder / "study_state" / "sessions.json"}
    for rel, f in manifest["files"].items():
        assert f["sha256"] == _sha(out / rel) == _sha(source.get(rel, folder / rel))
    assert main(["export", "--check", str(out)]) == 0


def test_exporting_again_adds_what_finished_since_and_touches_nothing_else(tmp_path: Path, capsys) -> None:
    folder = _study(tmp_path, finished=1)
    out = tmp_path / "export"
    export(str(folder), out, command="first")
    (out / "NOTES.md").write_text("mine")  # not the export's: left alone
    before = (out / "reports" / "t0.json").stat().st_mtime_ns
    # The next session evaluates t1 and stops: its summary names the new report.
    summary = json.loads((folder / "summary.json").read_text())
    summary["trials"][1].update(status="finished", report="reports/t1.json")
    summary["sessions"] = 2
    (folder / "reports" / "t1.json").write_text(json.dumps({"per_example": [0, 0]}))
    (folder / "summary.json").write_text(json.dumps(summary))
    history = sessions.load(str(folder)) + [sessions.Session(started=5000.0, ended=5100.0, outcome="interrupted")]
    sessions.save(str(folder), history)
    m = export(str(folder), out, command="second")
    assert m["_written"] == 3 and m["_changed"] == 2 and m["_removed"] == []  # t1, summary, sessions
    assert (out / "reports" / "t0.json").stat().st_mtime_ns == before  # unchanged: not rewritten
    assert json.loads((out / "MANIFEST.json").read_text())["evaluated"] == 2
    assert (out / "NOTES.md").read_text() == "mine"
    # A report that left the record (the trial was run again from scratch) leaves the export too.
    summary["trials"][0].pop("report")
    summary["trials"][0]["status"] = "interrupted"
    (folder / "summary.json").write_text(json.dumps(summary))
    m = export(str(folder), out, command="third")
    assert m["_removed"] == ["reports/t0.json"] and not (out / "reports" / "t0.json").exists()
    assert (out / "NOTES.md").is_file()


def test_check_names_each_file_that_changed_or_went(tmp_path: Path, capsys) -> None:
    folder = _study(tmp_path)
    out = tmp_path / "export"
    export(str(folder), out, command="x")
    (out / "reports" / "t0.json").write_text("{}")
    (out / "reports" / "t1.json").unlink()
    assert main(["export", "--check", str(out)]) == 1
    err = capsys.readouterr().err
    assert "reports/t0.json: changed since it was exported" in err and "reports/t1.json: missing" in err
    assert "2 problem(s)" in err
    (out / "summary.json").write_text("{not json")
    assert main(["export", "--check", str(out)]) == 1
    assert "summary.json: changed" in capsys.readouterr().err


def test_export_refuses_what_would_be_an_untrue_record(tmp_path: Path, capsys) -> None:
    # A killed driver's session wrote no summary: trials it finished would be missing.
    folder = _study(tmp_path, n_sessions=2, summary_sessions=1, last_ended=False)
    with pytest.raises(ExportError, match="ended without writing its summary"):
        record(str(folder))
    folder2 = _study(tmp_path / "b")
    (folder2 / "reports" / "t1.json").unlink()
    with pytest.raises(ExportError, match=r"1 report\(s\) the summary names are not in"):
        record(str(folder2))
    # A summary whose report path leads out of the folder is not followed.
    folder4 = _study(tmp_path / "d")
    summary = json.loads((folder4 / "summary.json").read_text())
    summary["trials"][0]["report"] = "../../../etc/passwd"
    (folder4 / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ExportError, match="is not a report's path"):
        record(str(folder4))
    # Another study's export, or a folder that is not an export, is not overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "MANIFEST.json").write_text(json.dumps({"study": "else", "files": {}}))
    folder3 = _study(tmp_path / "c")
    assert main(["export", str(folder3), "--to", str(other)]) == 2
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    assert main(["export", str(folder3), "--to", str(full)]) == 2
    err = capsys.readouterr().err
    assert "holds the export of study 'else'" in err and "holds no MANIFEST.json" in err
    assert main(["export", str(tmp_path / "nowhere"), "--to", str(tmp_path / "e")]) == 2


def test_a_running_study_is_not_exported(tmp_path: Path, capsys) -> None:
    folder = _study(tmp_path)
    with study_lock(str(folder)):  # what its driver holds while it runs
        assert main(["export", str(folder), "--to", str(tmp_path / "export")]) == 2
    assert "is in use by process" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    assert main(["export", str(folder), "--to", str(tmp_path / "export")]) == 0  # once it stopped


ABLATION = """name: demo
kind: ablation
base: quickstart
train: {optim.epochs: 1}
ablation:
  grid:
    optim.lr: [0.05, 0.02]
seeds: [0, 1]
"""


def test_a_record_starts_a_lost_folder_with_what_finished(tmp_path: Path) -> None:
    from trainables.study import load_study
    from trainables.study_export import import_record, imported_rows, points_left

    folder = _study(tmp_path)  # t0, t1 evaluated; t2 interrupted
    (tmp_path / "demo.yaml").write_text(ABLATION)
    summary = json.loads((folder / "summary.json").read_text())
    for t, (lr, seed) in zip(summary["trials"], [(0.05, 0), (0.02, 0), (0.05, 1)], strict=True):
        t["params"] = {"optim.lr": lr, "seed": seed}
    summary["trials"][1]["status"] = "diverged"  # a diverged trial is a result too: not run again
    (folder / "summary.json").write_text(json.dumps(summary))
    record = tmp_path / "record"
    export(str(folder), record, command="x")
    study = load_study(tmp_path / "demo.yaml")
    lost = str(tmp_path / "new" / "demo")
    imported = import_record(record, study, lost)
    assert [t["trial_id"] for t in imported["rows"]] == ["t0", "t1"] and imported["sessions"] == 1
    assert [t["trial_id"] for t in imported_rows(lost)] == ["t0", "t1"]
    # Their checkpoints went with the lost folder: none is named as if it were there.
    assert all(t["checkpoint"] is None for t in imported_rows(lost))
    assert (Path(lost) / "reports" / "t0.json").read_text() == (folder / "reports" / "t0.json").read_text()
    assert len(sessions.load(lost)) == 1
    # What is left runs, in the grid's order (the seed slowest): t2's pair again, and the fourth.
    assert points_left(study, imported["rows"]) == [{"optim.lr": 0.05, "seed": 1}, {"optim.lr": 0.02, "seed": 1}]
    assert len(points_left(study, [])) == 4

    with pytest.raises(ExportError, match="holds a study already"):
        import_record(record, study, lost)
    (tmp_path / "demo.yaml").write_text(ABLATION.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    with pytest.raises(ExportError, match="is not the study file the record was made with"):
        import_record(record, load_study(tmp_path / "demo.yaml"), str(tmp_path / "other" / "demo"))
    (tmp_path / "demo.yaml").write_text(ABLATION)
    (record / "reports" / "t0.json").write_text("{}")
    with pytest.raises(ExportError, match="is not intact"):
        import_record(record, study, str(tmp_path / "third" / "demo"))
    with pytest.raises(ExportError, match="goes on with an ablation"):
        import_record(record, load_study("quickstart"), str(tmp_path / "fourth" / "demo"))
    assert not (tmp_path / "other").exists() and not (tmp_path / "third").exists()


def test_trial_ids_are_shortened_only_where_that_stays_unambiguous() -> None:
    from trainables.trial_rows import short_ids

    assert short_ids(["9f600_00000", "9f600_00001"]) == {"9f600_00000": "00000", "9f600_00001": "00001"}
    # A study that went on from its record runs a second experiment: its numbers start again at 00000.
    assert short_ids(["b2e8a_00000", "e2956_00000", "e2956_00001"]) == {
        "b2e8a_00000": "b2e8a_00000", "e2956_00000": "e2956_00000", "e2956_00001": "00001"}
