"""``ancra-tune status`` read from a trial's folder: where it is, and what it has done."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs


def test_a_trial_being_evaluated_shows_its_training_done(tmp_path: Path) -> None:
    """Seen on table8_mnist: a trial whose evaluation had begun showed 4/5 epochs, its worker's
    progress file ahead of the last epoch's row Tune had yet to write."""
    from trainables.progress import ProgressFile
    from trainables.study_status import trial_status

    fs = pyarrow.fs.LocalFileSystem()
    trial = tmp_path / "run_trial_x"
    trial.mkdir()
    (trial / "params.json").write_text('{"seed": 0}')
    ProgressFile(fs, str(trial)).evaluating(batches=1, n_batches=7, examples=250, n_examples=1667, seconds=900.0)
    rows = [{"epoch": e, "epoch_time_s": 10.0, "trial_id": "x"} for e in (1, 2, 3, 4)]
    t = trial_status(fs, str(trial), 5, set(), rows)
    assert t.epochs == 5 and t.eval_examples == 250
    assert t.now.startswith("evaluation: 1 of 7 batches (250 of 1,667 examples)"), t.now


def test_a_damaged_carry_mark_is_named_by_status_and_refused_by_export(tmp_path: Path) -> None:
    """A trial's ``carried_from.json`` is written whole; one that is not JSON (hand edit, damaged
    disk) leaves status answering and saying what it could not count, and stops an export from
    carrying a trial without the checkpoint that mark pointed to."""
    import pytest

    from trainables.study_carry import TRIAL_MARK, read_mark, trial_state
    from trainables.study_export import ExportError
    from trainables.study_status import trial_status

    fs = pyarrow.fs.LocalFileSystem()
    trial = tmp_path / "run_trial_x"
    trial.mkdir()
    (trial / "params.json").write_text('{"seed": 0}')
    rows = [{"epoch": 1, "epoch_time_s": 10.0, "trial_id": "x"}]
    (trial / TRIAL_MARK).write_text('{"folder": "p00_anc=True", "epochs_run": 2, "train_time_s": 50.0}')
    good = trial_status(fs, str(trial), 5, set(), rows)
    assert (good.epochs, good.train_time_s) == (3, 60.0)  # two carried epochs and its own
    assert read_mark(fs, str(trial))["epochs_run"] == 2

    (trial / TRIAL_MARK).write_text('{"folder": "p00_an')  # torn
    bad = trial_status(fs, str(trial), 5, set(), rows)
    assert (bad.epochs, bad.train_time_s) == (1, 10.0)
    assert "its epochs before a carry are not counted" in bad.now and TRIAL_MARK in bad.now, bad.now
    with pytest.raises(ExportError, match="is not JSON"):
        trial_state(str(tmp_path), {"trial_dir": str(trial), "checkpoint": None, "trial_id": "x"})
    (trial / TRIAL_MARK).write_text('["p00"]')
    with pytest.raises(ExportError, match="is not a carried-state mark"):
        read_mark(fs, str(trial))
    (trial / TRIAL_MARK).write_text('{"epochs_run": 2}')
    with pytest.raises(ExportError, match="names no carried folder"):
        trial_state(str(tmp_path), {"trial_dir": str(trial), "checkpoint": None, "trial_id": "x"})
    (trial / TRIAL_MARK).unlink()
    assert read_mark(fs, str(trial)) is None
