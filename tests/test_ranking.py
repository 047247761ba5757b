"""One ranking of a study's trials: the console's table, the summary's best trial, the report page and
`ancra-tune best` sort alike (they used four keys with different tie-breaks)."""

from __future__ import annotations

from trainables.cli import format_summary
from trainables.ranking import rank_key, row_rank_key


def _row(tid: str, counter: int, *, status: str = "finished", value: float | None = None, clean: float | None = None,
         flagged: bool = False, val_robust: float = 0.0) -> dict:
    row = {"trial_id": tid, "status": status, "params": {}, "epochs_run": 4 if status == "finished" else 2,
           "trial_dir": f"/s/run_trial_{tid}_{counter}_x", "checkpoint": f"/s/{tid}", "val_robust_acc": val_robust}
    if value is not None:
        row.update({"robust_acc_worst": value, "objective.robust_acc_worst": value, "clean_acc": clean})
    if flagged:
        row["flags"] = {"robust_acc_worst": ["P' is beaten by an adaptive attack"]}
    return row


ROWS = [_row("aaaa", 1, value=0.50, clean=0.9, flagged=True),  # the highest number, but its checks fail
        _row("bbbb", 3, value=0.40, clean=0.80),
        _row("cccc", 5, value=0.40, clean=0.90),
        _row("dddd", 2, value=0.40, clean=0.90),  # ties cccc: the earlier trial first
        _row("eeee", 4, status="stopped", val_robust=0.7)]
EXPECTED = ["dddd", "cccc", "bbbb", "aaaa", "eeee"]


def test_the_ranking_and_its_tie_breaks() -> None:
    ranked = sorted(ROWS, key=lambda r: row_rank_key(r, "robust_acc_worst", "max"), reverse=True)
    assert [r["trial_id"] for r in ranked] == EXPECTED
    # MLflow's candidates (ancra-tune best) go through the same key with their start times.
    assert rank_key(finished=True, flagged=False, value=0.4, clean=0.9, order=10, mode="max") > \
        rank_key(finished=True, flagged=False, value=0.4, clean=0.9, order=20, mode="max")
    # "min" objectives rank the smaller value first; a missing value ranks last.
    assert rank_key(finished=True, flagged=False, value=0.1, clean=None, order=0, mode="min") > \
        rank_key(finished=True, flagged=False, value=0.2, clean=None, order=0, mode="min") > \
        rank_key(finished=True, flagged=False, value=None, clean=None, order=0, mode="min")


def test_the_console_table_lists_trials_in_that_order() -> None:
    summary = {"study": "s", "kind": "sweep", "n_trials": 5, "status_counts": {"finished": 4, "stopped": 1},
               "wall_time_s": 10.0, "trial_train_time_s": 5.0, "objective": {"robust_acc_worst": "max"},
               "trials": ROWS, "best": [ROWS[3]], "study_dir": "/s", "flagged_trials": {}}
    table = [line.split()[0] for line in format_summary(summary).splitlines()
             if line.startswith("  ") and line.split()[0] in {r["trial_id"] for r in ROWS}]
    assert table == EXPECTED
