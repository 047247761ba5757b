"""A study's sessions: its wall time over interruptions and killed drivers, and how it ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainables import sessions as S
from trainables.cli import study_exit_code


def test_wall_time_counts_every_session_and_a_killed_one_until_its_last_result() -> None:
    history = [S.Session(started=100.0, ended=130.0, outcome=S.INTERRUPTED),  # Ctrl+C: 30 s
               S.Session(started=200.0),  # driver killed: its trials reported until 245
               S.Session(started=300.0)]  # running now
    reported = [110.0, 125.0, 210.0, 245.0, 305.0]
    assert S.wall_time_s(history, reported, now=320.0) == pytest.approx(30 + 45 + 20)
    # A killed session that reported nothing counts nothing (never a negative or made-up time).
    assert S.wall_time_s([S.Session(started=0.0), S.Session(started=50.0, ended=60.0)], [], now=70.0) == 10.0


def test_sessions_are_kept_in_the_study_state_folder(tmp_path: Path) -> None:
    study = str(tmp_path / "s")
    h = S.begin(study, resume=False, command="ancra-tune sweep s.yaml", slots=2)
    S.end(study, h, S.INTERRUPTED)
    assert S.last_outcome(study) == S.INTERRUPTED
    h = S.begin(study, resume=True)
    assert len(h) == 2 and S.last_outcome(study) is None  # running (or its driver was killed)
    S.end(study, h, S.FINISHED)
    assert [s.outcome for s in S.load(study)] == [S.INTERRUPTED, S.FINISHED] and S.load(study)[0].slots == 2
    assert (tmp_path / "s" / "study_state" / "sessions.json").is_file()
    assert len(S.begin(study, resume=False)) == 1  # a new study of the same name starts afresh


@pytest.mark.parametrize(("summary", "outcome", "code"), [
    ({"status_counts": {"finished": 1, "error": 3}}, S.FINISHED, 0),
    ({"status_counts": {"finished": 0, "error": 4}}, S.FAILED, 1),
    ({"status_counts": {"finished": 0, "stopped": 2, "diverged": 1}}, S.FAILED, 1),
    ({"status_counts": {"finished": 2}, "interrupted": True, "interrupted_by": "SIGINT"}, S.INTERRUPTED, 130),
    ({"status_counts": {"finished": 2}, "interrupted": True, "interrupted_by": "disk full"}, S.DISK_FULL, 1),
])
def test_outcome_and_exit_code(summary: dict, outcome: str, code: int) -> None:
    assert S.outcome_of(summary) == outcome
    assert study_exit_code({**summary, "outcome": outcome}) == code
    assert study_exit_code(summary) == code  # summaries of older versions (no outcome)
