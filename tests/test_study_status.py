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
