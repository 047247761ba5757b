"""Faults before and around a study, without Ray: storage checks, the study lock, ASHA's memory
across --resume, and the command line's answers to them (exit code 2, nothing left behind)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainables.disk import StorageError, check_storage
from trainables.interruption import Interruption
from trainables.study_lock import StudyLockedError, study_lock

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def _cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "trainables.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_storage_under_a_file_fails_before_ray_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="afile is a file"):
        check_storage(str(blocker / "studies"))
    info = check_storage(str(tmp_path / "ok"))
    assert info["free_bytes"] > 0 and (tmp_path / "ok").is_dir()
    db = tmp_path / "mlflow.db"
    out = _cli("sweep", str(QUICKSTART), "--storage", str(blocker / "studies"), "--tracking-uri", f"sqlite:///{db}",
               cwd=tmp_path)
    assert out.returncode == 2 and "is a file" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stdout + out.stderr
    assert not db.exists()  # nothing in MLflow: the check runs before the tracking store is touched


def test_resume_of_a_study_that_never_ran_leaves_nothing(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    out = _cli("sweep", str(QUICKSTART), "--resume", "--storage", str(tmp_path / "studies"),
               "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path)
    assert out.returncode == 2 and "no study to resume" in out.stderr, out.stderr[-2000:]
    assert not db.exists()


def test_one_study_runs_once_at_a_time(tmp_path: Path) -> None:
    folder = tmp_path / "studies" / "s"
    with study_lock(str(folder)) as holder:
        assert holder is not None and json.loads(holder.read_text())["pid"] == os.getpid()
        with pytest.raises(StudyLockedError, match=f"process {os.getpid()}"):
            with study_lock(str(folder)):
                pass
    assert not (folder / ".ancra-study.lock.json").exists()  # released
    # Another process holds it: refused, naming that process.
    code = ("import sys, time; from trainables.study_lock import study_lock\n"
            f"with study_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        with pytest.raises(StudyLockedError, match=f"process {other.pid}"):
            with study_lock(str(folder)):
                pass
    finally:
        other.kill()  # a killed driver: the operating system releases its lock
        other.wait()
    with study_lock(str(folder)) as holder:  # --resume after the kill takes it at once
        assert json.loads(holder.read_text())["pid"] == os.getpid()


def test_a_second_driver_of_the_same_study_is_refused_by_the_cli(tmp_path: Path) -> None:
    folder = tmp_path / "studies" / "quickstart"
    with study_lock(str(folder)):
        out = _cli("sweep", str(QUICKSTART), "--storage", str(tmp_path / "studies"), "--no-mlflow", cwd=tmp_path)
    assert out.returncode == 2 and "is in use by process" in out.stderr and str(os.getpid()) in out.stderr


def test_first_signal_asks_tune_to_stop_the_second_stops_at_once() -> None:
    interruption = Interruption()
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))  # stands for Tune's handler
    try:
        with interruption.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            assert interruption.signal == "SIGTERM" and seen == [signal.SIGUSR1]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is not interruption._handler  # restored
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_low_disk_space_stops_the_study_once_as_a_signal_would(tmp_path: Path, monkeypatch, capsys) -> None:
    from trainables import disk as guard

    monkeypatch.setenv("ANCRA_DISK_RESERVE_MB", "100")
    free = {"bytes": 500 * 2**20}
    monkeypatch.setattr(guard, "free_bytes", lambda p: free["bytes"])
    interruption = Interruption()
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))  # stands for Tune's handler
    try:
        g = guard.DiskGuard(str(tmp_path), interruption, every_s=0)
        assert not g.check() and interruption.signal is None and not seen  # room enough
        free["bytes"] = 99 * 2**20
        assert g.check() and interruption.signal == guard.DISK_FULL and seen == [signal.SIGUSR1]
        assert not g.check() and seen == [signal.SIGUSR1]  # asked once
    finally:
        signal.signal(signal.SIGUSR1, previous)
    err = capsys.readouterr().err
    assert "disk full: 99 MiB free" in err and "100 MiB" in err and "--resume" in err
    # A study does not start (or resume) on a disk already below the reserve.
    monkeypatch.setattr(guard.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(StorageError, match="10 MiB free.*ANCRA_DISK_RESERVE_MB"):
        check_storage(str(tmp_path / "s"))


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_asha_makes_the_same_decisions_after_resume(tmp_path: Path) -> None:
    """Tune restores the scheduler by unpickling it as it was created; ours reads back its rung
    records and the trials it stopped, so the resumed study stops exactly what an uninterrupted one
    does (a plain ASHA would compare the remaining trials with empty rungs and stop none)."""
    from ray.tune.schedulers import ASHAScheduler

    from trainables.scheduler import PersistentASHA

    kw = dict(metric="val_robust_acc", mode="max", time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2,
              stop_last_trials=False)
    # Trials run one after another; each reports up to 4 epochs until stopped.
    curves = {"t0": [0.5, 0.6, 0.7, 0.8], "t1": [0.6, 0.7, 0.8, 0.9], "t2": [0.2, 0.3, 0.4, 0.5],
              "t3": [0.1, 0.2, 0.3, 0.4], "t4": [0.55, 0.65, 0.75, 0.85]}

    def run(scheduler, trials):
        decisions = {}
        for tid in trials:
            t = _Trial(tid)
            scheduler.on_trial_add(None, t)
            for epoch, value in enumerate(curves[tid], start=1):
                action = scheduler.on_trial_result(None, t, {"epoch": epoch, "val_robust_acc": value})
                if action == "STOP":
                    break
            decisions[tid] = epoch
        return decisions

    reference = PersistentASHA(study_dir=str(tmp_path / "a"), **kw)
    straight = run(reference, list(curves))
    assert any(e < 4 for e in straight.values())  # ASHA did stop something

    first = PersistentASHA(study_dir=str(tmp_path / "b"), **kw)
    blob = pickle.dumps(first)  # what tuner.pkl holds: the scheduler as created
    part = run(first, ["t0", "t1", "t2"])
    resumed = pickle.loads(blob)  # --resume
    rest = run(resumed, ["t3", "t4"])
    assert {**part, **rest} == straight
    assert sorted(resumed.stopped) == sorted(reference.stopped) and "t2" in resumed.stopped
    # A plain ASHA restored the same way forgets: it would let the weak t3 run to the end.
    plain = ASHAScheduler(**kw)
    run(plain, ["t0", "t1", "t2"])
    fresh = run(ASHAScheduler(**kw), ["t3", "t4"])
    assert fresh != {k: straight[k] for k in ("t3", "t4")}
    # Its state lives in the study's study_state/ folder, never beside Tune's own .json files (Tune's
    # resume copies those to its staging folder and uploads them back over newer content).
    assert (tmp_path / "b" / "study_state" / "scheduler.json").is_file()
    assert not list((tmp_path / "b").glob("*.json"))


def test_a_study_interrupted_by_an_older_version_resumes_with_its_decisions(tmp_path: Path) -> None:
    """tuner.pkl of an older version holds a scheduler that kept its state beside Tune's files
    (scheduler_state.json): it is read once, and the decisions go on in study_state/."""
    import json

    from trainables.scheduler import PersistentASHA, read_state

    kw = dict(metric="val_robust_acc", mode="max", time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2,
              stop_last_trials=False)
    study = tmp_path / "old"
    first = PersistentASHA(study_dir=str(study), **kw)
    state = first.__dict__.copy()
    del state["study_dir"]
    state["state_path"] = str(study / "scheduler_state.json")  # what the older version pickled
    (study / "scheduler_state.json").write_text(json.dumps(
        {"brackets": [[{"milestone": 4, "recorded": {}}, {"milestone": 2, "recorded": {}},
                       {"milestone": 1, "recorded": {"t0": 0.5, "t2": 0.1}}]], "stopped": ["t2"]}))
    (study / "study_state" / "scheduler.json").unlink()
    old = PersistentASHA.__new__(PersistentASHA)
    old.__setstate__(state)
    assert old.study_dir == str(study) and old.stopped == ["t2"]
    t = _Trial("t3")
    old.on_trial_add(None, t)
    assert old.on_trial_result(None, t, {"epoch": 1, "val_robust_acc": 0.05}) == "STOP"
    assert read_state(str(study))["stopped"] == ["t2", "t3"]
    assert (study / "study_state" / "scheduler.json").is_file()


def test_asha_never_stops_a_trial_at_its_last_epoch(tmp_path: Path) -> None:
    """Ray's ASHA has a rung at max_t and would stop a weak trial there, after all its training and
    before its evaluation; ours lets it finish, records its last epoch, and still stops weak trials
    at the earlier rungs."""
    from ray.tune.schedulers import ASHAScheduler

    from trainables.scheduler import LastEpochASHA, PersistentASHA

    kw = dict(metric="val_robust_acc", mode="max", time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2,
              stop_last_trials=False)
    # t1 passes rungs 1 and 2 (it beats t0 there) but ends below t0 at epoch 4.
    curves = {"t0": [0.5, 0.6, 0.7, 0.9], "t1": [0.6, 0.7, 0.8, 0.3], "t2": [0.1, 0.2, 0.3, 0.4]}

    def last_action(scheduler) -> dict[str, tuple[int, str]]:
        out = {}
        for tid, curve in curves.items():
            t = _Trial(tid)
            scheduler.on_trial_add(None, t)
            for epoch, value in enumerate(curve, start=1):
                action = scheduler.on_trial_result(None, t, {"epoch": epoch, "val_robust_acc": value})
                if action == "STOP":
                    break
            out[tid] = (epoch, action)
        return out

    assert last_action(ASHAScheduler(**kw))["t1"] == (4, "STOP")  # Ray's: trained, then thrown away
    for scheduler in (LastEpochASHA(**kw), PersistentASHA(study_dir=str(tmp_path / "s"), **kw)):
        got = last_action(scheduler)
        assert got["t1"] == (4, "CONTINUE") and got["t2"] == (1, "STOP"), got
        assert scheduler._num_stopped == 1
        assert [tid for tid in getattr(scheduler, "stopped", ["t2"])] == ["t2"]


def test_scratch_folders_of_workers_that_are_gone_are_removed(tmp_path: Path) -> None:
    """A killed worker cannot remove its scratch folder (its run's last checkpoint); the next worker
    or study on the machine does. A live owner's folder, another machine's, a stranger's and an
    unclaimed folder still being written are kept; an unclaimed one untouched for a day goes."""
    import socket

    from trainables.scratch_dirs import ORPHAN_AGE_S, RUN_DIR_OWNER, claim_run_dir, sweep_run_dirs

    def run_dir(name: str, owner: dict | None = None, *, age_s: float = 0.0) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "checkpoint.pt").write_bytes(b"\0" * 1024)
        if owner is not None:
            (d / RUN_DIR_OWNER).write_text(json.dumps(owner))
        if age_s:
            old = time.time() - age_s
            for p in (*d.iterdir(), d):
                os.utime(p, (old, old))
        return d

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # exited: its pid is free
    host = socket.gethostname()
    dead = run_dir("ancra-trial-a_00001-rank0", {"pid": dead_pid, "started": "1", "host": host})
    reused = run_dir("ancra-train-b-rank1", {"pid": os.getpid(), "started": "not-my-start-time", "host": host})
    mine = tmp_path / "ancra-train-c-rank0"
    mine.mkdir()
    claim_run_dir(mine)
    elsewhere = run_dir("ancra-train-d-rank0", {"pid": dead_pid, "started": "1", "host": host + "-other"})
    old_unclaimed = run_dir("ancra-rank0-k3j2h1", age_s=ORPHAN_AGE_S + 60)  # an older version's folder
    new_unclaimed = run_dir("ancra-train-e-rank0")  # a worker between its mkdir and its claim
    stranger = tmp_path / "ancra-notes-rank1"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a run")
    os.utime(stranger, (time.time() - 2 * ORPHAN_AGE_S,) * 2)

    removed = sweep_run_dirs(tmp_path)
    assert sorted(removed) == sorted([dead, reused, old_unclaimed])
    assert not dead.exists() and not reused.exists() and not old_unclaimed.exists()
    for kept in (mine, elsewhere, new_unclaimed, stranger):
        assert kept.is_dir(), kept
    assert json.loads((mine / RUN_DIR_OWNER).read_text())["pid"] == os.getpid()
    assert sweep_run_dirs(tmp_path) == []  # nothing more to do
