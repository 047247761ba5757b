"""``ancra-tune export --carry`` and ``ablate --from-record --carry``: an unfinished trial's state
(last epoch's checkpoint, mid-epoch checkpoint, kept evaluation batches) carried off a machine that
is lost between sessions, laid into the new folder, and into the trial that goes on from it once.

The study folders are written by hand in the layout a stopped ablation leaves (test_ray carries a
real one through a new Ray instance and checks the trial goes on instead of starting again)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from trainables import sessions
from trainables.cli import main
from trainables.study_carry import TRIAL_MARK, carried, check_carry, lay_out, read_carry
from trainables.study_export import ExportError, import_record, points_left

CKPT = b"epoch-2 checkpoint " + bytes(range(256)) * 8
PARTIAL = b"epoch-3 step 40 " + bytes(range(255, -1, -1)) * 8
BATCH = b"batch 0 outcomes"


def _study(tmp_path: Path) -> tuple[Path, Path]:
    """A stopped ablation of 3 (seed) pairs: seed 0 evaluated, seed 1 in its third epoch (a last
    epoch's checkpoint, a mid-epoch one, one kept evaluation batch of an earlier try), seed 2 never
    started. Returns (study folder, study file)."""
    folder = tmp_path / "studies" / "demo"
    (folder / "reports").mkdir(parents=True)
    study_file = tmp_path / "demo.yaml"
    study_file.write_text("name: demo\nkind: ablation\n")
    t1 = folder / "run_trial_t1"
    (t1 / "checkpoint_000001").mkdir(parents=True)
    (t1 / "checkpoint_000001" / "checkpoint.pt").write_bytes(CKPT)
    (t1 / "checkpoint_000000").mkdir()
    (t1 / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"an older epoch: not carried")
    (t1 / "partial_epoch.pt").write_bytes(PARTIAL)
    (t1 / "partial_epoch.pt.tmp").write_bytes(b"a write cut short")
    (t1 / "eval_batches").mkdir()
    (t1 / "eval_batches" / "meta.json").write_text('{"model": "abc"}')
    (t1 / "eval_batches" / "batch_00000.pt").write_bytes(BATCH)
    (folder / "reports" / "t0.json").write_text(json.dumps({"per_example": [1, 0, 1]}))
    trials = [
        {"trial_id": "t0", "status": "finished", "params": {"seed": 0}, "report": "reports/t0.json",
         "trial_dir": str(folder / "run_trial_t0"), "checkpoint": str(folder / "run_trial_t0" / "checkpoint_000002")},
        {"trial_id": "t1", "status": "interrupted", "params": {"seed": 1}, "epochs_run": 2, "train_time_s": 100.0,
         "trial_dir": str(t1), "checkpoint": str(t1 / "checkpoint_000001")},
        {"trial_id": "t2", "status": "interrupted", "params": {"seed": 2}, "trial_dir": None, "checkpoint": None},
    ]
    summary = {"study": "demo", "kind": "ablation", "study_file": str(study_file), "study_dir": str(folder),
               "outcome": "interrupted", "sessions": 1, "wall_time_s": 3600.0,
               "status_counts": {"finished": 1, "interrupted": 2}, "trials": trials}
    (folder / "summary.json").write_text(json.dumps(summary))
    sessions.save(str(folder), [sessions.Session(started=1000.0, ended=1500.0, outcome="interrupted")])
    return folder, study_file


def _demo(study_file: Path) -> SimpleNamespace:
    return SimpleNamespace(name="demo", kind="ablation", path=study_file, seeds=[0, 1, 2],
                           ablation=SimpleNamespace(grid={}), grid_points=lambda: [{}])


def _export(folder: Path, tmp_path: Path, capsys) -> tuple[Path, Path]:
    record, carry = tmp_path / "record", tmp_path / "carry"
    assert main(["export", str(folder), "--to", str(record), "--carry", str(carry)]) == 0
    out = capsys.readouterr().out
    assert "1 unfinished trial(s) carried" in out and "t1 (2 epoch(s) done + part of the next, 1 evaluation" in out
    return record, carry


def test_carry_holds_each_unfinished_trials_state_and_the_record_none(tmp_path: Path, capsys) -> None:
    folder, _ = _study(tmp_path)
    record, carry = _export(folder, tmp_path, capsys)
    assert not [p for p in record.rglob("*.pt")]  # the published record stays free of checkpoints
    files = sorted(str(p.relative_to(carry)) for p in carry.rglob("*") if p.is_file())
    assert files == ["CARRY.json", "seed=1/checkpoint/checkpoint.pt", "seed=1/eval_batches/batch_00000.pt",
                     "seed=1/eval_batches/meta.json", "seed=1/partial_epoch.pt"]
    assert (carry / "seed=1/checkpoint/checkpoint.pt").read_bytes() == CKPT
    assert (carry / "seed=1/partial_epoch.pt").read_bytes() == PARTIAL
    manifest = read_carry(carry)
    point = manifest["points"]["seed=1"]
    assert point["params"] == {"seed": 1} and point["epochs_run"] == 2 and point["mid_epoch"] and \
        point["eval_batches"] == 1
    record_manifest = json.loads((record / "MANIFEST.json").read_text())
    assert manifest["record"]["summary_sha256"] == record_manifest["files"]["summary.json"]["sha256"]
    assert main(["export", "--check", str(carry)]) == 0
    (carry / "seed=1/partial_epoch.pt").write_bytes(PARTIAL[:-1] + b"!")
    assert main(["export", "--check", str(carry)]) == 1
    assert "seed=1/partial_epoch.pt: changed since it was carried" in capsys.readouterr().err
    # Never inside the record (it is published), and never over a folder that is not a carry.
    assert main(["export", str(folder), "--to", str(record), "--carry", str(record / "carry")]) == 2
    assert "beside the record" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(folder), "--to", str(record), "--carry", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "mine"
    # Carrying again replaces the carry whole: a trial that finished since leaves it.
    summary = json.loads((folder / "summary.json").read_text())
    summary["trials"][1].update(status="finished", report="reports/t0.json")
    (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(folder), "--to", str(record), "--carry", str(carry)]) == 0
    assert read_carry(carry)["points"] == {} and not (carry / "seed=1").exists()


def test_a_lost_folder_goes_on_from_the_carried_state_laid_into_its_trial_once(tmp_path: Path, capsys) -> None:
    folder, study_file = _study(tmp_path)
    record, carry = _export(folder, tmp_path, capsys)
    shutil.rmtree(folder)  # the machine is lost
    demo = _demo(study_file)
    new = tmp_path / "new" / "demo"
    imported = import_record(record, demo, str(new), carry=carry)
    assert [r["trial_id"] for r in imported["rows"]] == ["t0"] and list(imported["carried"]) == ['{"seed": 1}']
    assert set(carried(str(new))) == {'{"seed": 1}'}
    # The half-done pair runs first, then the one never started.
    assert points_left(demo, imported["rows"], first=set(carried(str(new)))) == [{"seed": 1}, {"seed": 2}]
    fs = pyarrow.fs.LocalFileSystem()
    trial = new / "run_trial_new1"
    trial.mkdir(parents=True)
    got = lay_out(str(new), {"seed": 1}, (fs, str(trial)))
    assert got is not None and Path(got[1], "checkpoint.pt").read_bytes() == CKPT
    assert (trial / "partial_epoch.pt").read_bytes() == PARTIAL
    assert (trial / "eval_batches" / "batch_00000.pt").read_bytes() == BATCH
    assert json.loads((trial / TRIAL_MARK).read_text())["trial_id"] == "t1"
    # Restarted (Tune's retry, --resume): what the trial wrote since is never replaced by the carry.
    (trial / "partial_epoch.pt").write_bytes(b"step 80")
    (trial / "eval_batches" / "batch_00000.pt").unlink()
    assert lay_out(str(new), {"seed": 1}, (fs, str(trial))) == got
    assert (trial / "partial_epoch.pt").read_bytes() == b"step 80"
    assert not (trial / "eval_batches" / "batch_00000.pt").exists()
    assert lay_out(str(new), {"seed": 2}, (fs, str(tmp_path / "elsewhere"))) is None
    assert not (tmp_path / "elsewhere").exists()

    # Stopped again before an epoch of its own ended: carried on once more, from the same checkpoint.
    sessions.save(str(new), [*sessions.load(str(new)),
                             sessions.Session(started=2000.0, ended=2500.0, outcome="interrupted")])
    summary = {"study": "demo", "kind": "ablation", "study_file": str(study_file), "study_dir": str(new),
               "outcome": "interrupted", "sessions": 2, "wall_time_s": 4000.0, "status_counts": {"interrupted": 2},
               "trials": [{"trial_id": "new1", "status": "interrupted", "params": {"seed": 1}, "epochs_run": 0,
                           "trial_dir": str(trial), "checkpoint": None}]}
    (new / "summary.json").write_text(json.dumps(summary))
    record2, carry2 = tmp_path / "record2", tmp_path / "carry2"
    assert main(["export", str(new), "--to", str(record2), "--carry", str(carry2)]) == 0
    # The pair is the first row of this summary and was the second of the first: its folder is the
    # same (named by its point, not its place), so git does not store its files again.
    assert (carry2 / "seed=1/checkpoint/checkpoint.pt").read_bytes() == CKPT
    assert (carry2 / "seed=1/partial_epoch.pt").read_bytes() == b"step 80"
    assert check_carry(carry2) == []


def test_a_carry_that_does_not_match_its_record_or_study_is_refused(tmp_path: Path, capsys) -> None:
    folder, study_file = _study(tmp_path)
    record, carry = _export(folder, tmp_path, capsys)
    demo = _demo(study_file)
    # The record exported again later (a trial finished since): the old carry is not its companion.
    old_carry = tmp_path / "old_carry"
    shutil.copytree(carry, old_carry)
    summary = json.loads((folder / "summary.json").read_text())
    summary["wall_time_s"] = 3700.0
    (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(folder), "--to", str(record)]) == 0
    with pytest.raises(ExportError, match="carried beside another export of the record"):
        import_record(record, demo, str(tmp_path / "a" / "demo"), carry=old_carry)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    other_file = tmp_path / "other.yaml"
    other_file.write_text("name: demo\nkind: ablation\n# changed\n")
    with pytest.raises(ExportError, match="another study file"):
        from trainables.study_carry import import_carry

        import_carry(carry, _demo(other_file), str(tmp_path / "b" / "demo"), {}, set())
    (old_carry / "seed=1" / "checkpoint" / "checkpoint.pt").write_bytes(b"swapped")
    with pytest.raises(ExportError, match="not intact"):
        import_record(record, demo, str(tmp_path / "c" / "demo"), carry=old_carry)


def test_status_counts_the_carried_epochs_of_a_waiting_or_running_trial(tmp_path: Path) -> None:
    from trainables.study_status import WAITING, RowRates, _waiting, time_left, trial_status

    point = {"trial_id": "t1", "epochs_run": 2, "train_time_s": 100.0, "mid_epoch": True, "eval_batches": 0}
    waiting = _waiting({"seed": 1}, point)
    assert waiting.state == WAITING and waiting.epochs == 2 and waiting.train_time_s == 100.0
    assert waiting.now == "waiting; goes on from the state carried from trial t1 (2 epoch(s) done + part of the next)"
    assert _waiting({"seed": 2}, None).epochs == 0
    trial = tmp_path / "run_trial_new1"
    trial.mkdir()
    (trial / "params.json").write_text('{"seed": 1}')
    (trial / TRIAL_MARK).write_text(json.dumps(point))
    rows = [{"epoch": 3, "epoch_time_s": 60.0, "trial_id": "new1"}]
    t = trial_status(pyarrow.fs.LocalFileSystem(), str(trial), 5, set(), rows)
    assert t.epochs == 3 and t.train_time_s == 160.0 and t.now == "3 of 5 epochs done"
    # What is left counts only the epochs not trained anywhere: 2 here, 3 for the waiting one.
    left, missing = time_left([t, waiting], {"": RowRates(epochs=4, train_s=400.0)}, 5, None)
    assert not missing and left == (2 + 3) * 100.0


def test_a_record_of_no_finished_trial_still_brings_its_sessions_in(tmp_path: Path, capsys) -> None:
    """Found on table8_mnist: a record whose trials were all in progress brought its session in, and the
    next session's start forgot it (its wall time lost from the study's)."""
    from trainables.study_export import was_imported

    folder, study_file = _study(tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    summary["trials"] = summary["trials"][1:]
    (folder / "summary.json").write_text(json.dumps(summary))
    record, carry = _export(folder, tmp_path, capsys)
    new = str(tmp_path / "new" / "demo")
    assert not was_imported(new)
    imported = import_record(record, _demo(study_file), new, carry=carry)
    assert imported["rows"] == [] and imported["sessions"] == 1 and was_imported(new)
    history = sessions.begin(new, resume=was_imported(new))  # what the study's next session does
    assert len(history) == 2 and history[0].started == 1000.0 and history[0].ended == 1500.0



def test_a_carry_named_by_position_still_imports_and_alike_names_do_not_collide(tmp_path: Path, capsys) -> None:
    from trainables.study_carry import slug

    folder, study_file = _study(tmp_path)
    record, carry = _export(folder, tmp_path, capsys)
    # A carry written before folders were named by point (p01_seed=1): its manifest names the folder.
    (carry / "seed=1").rename(carry / "p01_seed=1")
    manifest = json.loads((carry / "CARRY.json").read_text())
    manifest["points"] = {"p01_seed=1": manifest["points"]["seed=1"]}
    (carry / "CARRY.json").write_text(json.dumps(manifest))
    assert check_carry(carry) == []
    new = tmp_path / "new" / "demo"
    imported = import_record(record, _demo(study_file), str(new), carry=carry)
    assert list(imported["carried"]) == ['{"seed": 1}']
    trial = new / "run_trial_new1"
    trial.mkdir(parents=True)
    got = lay_out(str(new), {"seed": 1}, (pyarrow.fs.LocalFileSystem(), str(trial)))
    assert got is not None and Path(got[1], "checkpoint.pt").read_bytes() == CKPT
    assert json.loads((trial / TRIAL_MARK).read_text())["folder"] == "p01_seed=1"
    # Two points whose values read alike get two folders.
    a = slug({"data.name": "a b"})
    assert a == "name=ab" and slug({"data.name": "ab"}, {a}) == "name=ab~2"
    assert slug({"method.anc": True, "seed": 0}) == "anc=True_seed=0"
