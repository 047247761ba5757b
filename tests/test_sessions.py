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


def test_a_killed_session_ends_at_its_trials_last_trace_not_their_last_result(tmp_path: Path) -> None:
    """An epoch or an evaluation can take hours: a killed driver's session lasted until its trials'
    last mid-epoch checkpoint, progress note or kept evaluation batch, not only their last result.
    Recorded when the next session begins (``--resume``); traces older than the session ignored."""
    import json
    import os

    from trainables.progress import ProgressFile
    from trainables.storage import filesystem
    from trainables.study_status import last_activity

    t0 = 1_700_000_000.0
    study = tmp_path / "s"
    a, b = (study / f"run_trial_ab123_0000{i}_{i}_x" for i in (0, 1))
    for f in (a, b):
        f.mkdir(parents=True)
    (a / "result.json").write_text(json.dumps({"epoch_time_s": 9.0, "reported_at": t0 + 45}) + "\n")
    (a / "partial_epoch.pt").write_bytes(b"x")
    os.utime(a / "partial_epoch.pt", (t0 + 200, t0 + 200))
    (b / "eval_batches").mkdir()
    (b / "eval_batches" / "batch_00000.pt").write_bytes(b"x")
    os.utime(b / "eval_batches" / "batch_00000.pt", (t0 + 300, t0 + 300))
    ProgressFile(*filesystem(str(a))).write(phase="training", epoch=1, epochs=2, step=3, steps=9)
    os.utime(a / "trial_progress.json", (t0 + 150, t0 + 150))  # the note's own time is inside it
    assert last_activity(str(study), since=t0) > t0 + 300  # the progress note was written just now
    (a / "trial_progress.json").unlink()
    assert last_activity(str(study), since=t0) == pytest.approx(t0 + 300)
    assert last_activity(str(study), since=t0 + 301) is None

    history = [S.Session(started=t0 - 10, ended=t0, outcome=S.INTERRUPTED), S.Session(started=t0)]
    S.save(str(study), history)
    S.close_killed(str(study), history, last_activity(str(study), since=t0))
    kept = S.load(str(study))
    assert (kept[1].ended, kept[1].outcome) == (pytest.approx(t0 + 300), S.INTERRUPTED)
    assert S.wall_time_s(kept, [t0 + 45], now=t0 + 10_000) == pytest.approx(10 + 300)  # not 10 + 45
    S.close_killed(str(study), [S.Session(started=t0)], None)  # no trace at all: it counts nothing
    assert S.load(str(study))[-1].ended == t0


def test_each_session_records_the_code_it_ran_and_the_page_says_which(tmp_path: Path) -> None:
    """A study run over sessions at several commits: each session records its code's commit (the
    repository its ``trainables`` was imported from, and whether it had uncommitted changes) and its
    driver's machine; the study's page says which sessions ran which code, not only which built it."""
    import os
    import socket
    import subprocess

    from trainables.study_page import provenance

    study = str(tmp_path / "s")
    h = S.begin(study, resume=False, command="ancra-tune ablate s.yaml")
    repo = Path(S.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                            text=True)
    if head.returncode == 0:
        assert h[0].code["commit"] == head.stdout.strip() and len(h[0].code["commit"]) == 40
        assert h[0].code["dirty"] == bool(status.stdout.strip())
    else:  # an installed copy outside Git
        assert h[0].code["commit"] is None and h[0].code["version"]
    assert h[0].machine["host"] == socket.gethostname() and h[0].machine["cpus"] == os.cpu_count()
    import torch

    assert h[0].machine["torch"] == torch.__version__
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        assert h[0].machine["cpu_model"] == model.split(":", 1)[1].strip()
    assert S.load(study)[0].code == h[0].code  # kept in sessions.json

    # Two sessions of a version that recorded nothing, two at one commit, one at another with changes.
    a, b = "a" * 40, "b" * 40
    here = {"host": "vm", "arch": "x86_64", "cpus": 2, "gpu": None}
    S.save(study, [S.Session(started=0.0, ended=1.0), S.Session(started=2.0, ended=3.0),
                   S.Session(started=4.0, ended=5.0, code={"commit": a, "dirty": False}, machine=here),
                   S.Session(started=6.0, ended=7.0, code={"commit": a, "dirty": False}, machine=here),
                   S.Session(started=8.0, code={"commit": b, "dirty": True}, machine={**here, "gpu": "NVIDIA H100"}),
                   # the same name and size, another CPU: it computes differently, and the page says so
                   S.Session(started=9.0, ended=9.5, code={"commit": b, "dirty": True},
                             machine={**here, "cpu_model": "AMD EPYC", "torch": "2.14.1"})])
    lines = provenance({"study": "s", "study_file": str(tmp_path / "s.yaml"), "study_dir": study})
    text = "\n".join(lines)
    assert ("- code each of its 6 session(s) ran: sessions 1-2: not recorded; sessions 3-4: `aaaaaaa`; "
            "sessions 5-6: `bbbbbbb` with uncommitted changes") in text
    assert ("- machine (each session's driver): sessions 1-2: not recorded; sessions 3-4: vm (x86_64, 2 CPUs, "
            "GPU none); session 5: vm (x86_64, 2 CPUs, GPU NVIDIA H100); session 6: vm (x86_64, 2 CPUs AMD EPYC, "
            "GPU none, torch 2.14.1)") in text
    assert "- page built by code at " in text
