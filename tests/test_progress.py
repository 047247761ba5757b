"""Where a running trial is between its results: the progress file its rank 0 keeps, the console line
the driver prints when it changes, and ``ancra-tune status`` (a study's standing from its folder)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainables.progress import ProgressFile, describe


def _fs():
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_adds_rays_tables_to_the_progress_lines(tmp_path: Path, verbose: bool) -> None:
    """``--verbose`` shows Ray's own status tables beside the trials' progress lines, not instead of them."""
    from trainables.console import TrialLines
    from trainables.study import load_study
    from trainables.study_run import build_tuner

    tuner = build_tuner(load_study("quickstart"), storage=str(tmp_path), max_concurrent=1, verbose=verbose)
    run_config = tuner._local_tuner._run_config  # what Tune will run with (no Ray needed to build it)
    assert sum(isinstance(c, TrialLines) for c in run_config.callbacks) == 1
    assert run_config.verbose == (1 if verbose else 0)


def test_progress_lines_say_what_changed_in_this_session_once(tmp_path: Path, capsys) -> None:
    from trainables.console import TrialLines
    from trainables.study import load_study

    folders = {i: tmp_path / f"trial{i}" for i in (1, 2)}
    for f in folders.values():
        f.mkdir()
    trials = [SimpleNamespace(status=status, trial_id=f"9f600_0000{i}", config={"method.anc": True, "seed": 0},
                              storage=SimpleNamespace(storage_filesystem=_fs(), trial_fs_path=str(folders[i])))
              for i, status in ((1, "RUNNING"), (2, "PAUSED"))]
    files = {i: ProgressFile(_fs(), str(f)) for i, f in folders.items()}
    files[1].training(epoch=4, epochs=5, step=300, steps=453)  # an earlier session's: not news
    files[2].training(epoch=1, epochs=5, step=10, steps=453)
    time.sleep(0.01)
    lines = TrialLines(load_study("quickstart"), epochs=5)

    def step() -> None:  # a look is due (20 s apart in a study)
        lines._next_look = 0.0
        lines.on_step_end(0, trials)

    lines.on_step_end(0, trials)
    assert capsys.readouterr().out == ""

    files[1].training(epoch=4, epochs=5, step=120, steps=453)
    files[2].training(epoch=1, epochs=5, step=20, steps=453)  # not running: not looked at
    step()
    step()  # unchanged: said once
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("  trial 00001 anc=True: epoch 4/5: step 120 of 453 (26%)"), out

    files[1].evaluating(batches=3, n_batches=7, examples=750, n_examples=1667, seconds=3720.0, resumed=1)
    step()
    out = capsys.readouterr().out
    assert "evaluation: 3 of 7 batches (750 of 1,667 examples) in 62 min, about 76 min left" in out, out
    files[1].evaluating(batches=3, n_batches=7, examples=750, n_examples=1667, seconds=1200.0, resumed=3, timed=250)
    step()  # two of its batches were kept by d923040, without their time
    out = capsys.readouterr().out
    assert "(750 of 1,667 examples), 20 min for the 250 timed, about 73 min left" in out, out

    files[1].evaluating(batches=4, n_batches=7, examples=1000, n_examples=1667, seconds=4960.0)
    lines.on_step_end(0, trials)  # the next look is 20 s after the last one
    assert capsys.readouterr().out == ""
    assert lines._next_look >= time.monotonic() + lines.PROGRESS_EVERY_S - 5


def test_progress_file_is_replaced_whole_and_a_torn_one_reads_as_none(tmp_path: Path) -> None:
    p = ProgressFile(_fs(), str(tmp_path))
    assert p.read() is None
    p.evaluating(batches=7, n_batches=7, examples=1667, n_examples=1667, seconds=7200.0)
    got = p.read()
    assert got is not None and got["batches"] == 7 and abs(got["at"] - time.time()) < 60
    assert describe(got).startswith("evaluation: 7 of 7 batches (1,667 of 1,667 examples) in 2.0 h (at ")
    assert not list(tmp_path.glob("*.tmp"))
    p.evaluating(batches=0, n_batches=7, examples=0, n_examples=1667, seconds=0.0)
    assert describe(p.read()).startswith("evaluation begun: 7 batches, 1,667 examples (at ")
    (tmp_path / "trial_progress.json").write_text('{"phase": "evaluating", "batc')
    assert p.read() is None
    (tmp_path / "trial_progress.json").write_text('{"phase": "something else"}')
    assert p.read() is None
    p.remove()
    assert not (tmp_path / "trial_progress.json").exists()


def test_an_evaluation_s_time_left_counts_the_batch_running_since_the_last_kept_one(tmp_path: Path) -> None:
    """Seen on table8_mnist: status said "about 34 min left (at 14:13)" until the next batch was
    kept, 40 min later. While a driver runs it, the time its next batch has run comes off; once that
    is more than its rate left, status says so rather than a negative time."""
    p = ProgressFile(_fs(), str(tmp_path))
    p.evaluating(batches=6, n_batches=7, examples=1500, n_examples=1667, seconds=18000.0)
    got = p.read()
    at = float(got["at"])  # 12 s an example: 167 examples left are 2,004 s (33 min)
    assert ", about 33 min left (at " in describe(got)
    assert describe(got, running_since=at, now=at + 30) == describe(got)  # under a minute: as it was
    mid = describe(got, running_since=at, now=at + 1200)
    assert ", about 13 min left (33 min at " in mid and "less the 20 min it has run since " in mid, mid
    late = describe(got, running_since=at + 600, now=at + 600 + 2400)  # the driver started 10 min later
    assert ", longer than its rate says: 33 min left at " in late and "it has run 40 min since " in late, late
    assert "left (" not in late


ABLATION = """
name: st
kind: ablation
base: quickstart
train: {{optim.epochs: 3}}
evaluation: {{preset: quick, n_examples: 64, batch_size: 16}}
ablation: {{grid: {{method.anc: [false, true], model.ra: [false, true]}}}}
seeds: [0, 1]
"""


def _trial_folder(study_dir: Path, counter: int, params: dict, rows: list[dict]) -> Path:
    """A trial folder as Tune and the worker leave it (params.json, result.json's rows)."""
    f = study_dir / f"run_trial_ab123_{counter:05d}_{counter}_x_2026-12-06_07-35-34"
    f.mkdir(parents=True)
    (f / "params.json").write_text(json.dumps(params))
    (f / "result.json").write_text("".join(json.dumps({**r, "trial_id": f"ab123_{counter:05d}"}) + "\n"
                                           for r in rows))
    return f


def test_status_of_an_ablation_from_its_folder(tmp_path: Path) -> None:
    """Every trial of the grid once: evaluated, in its evaluation (from its progress file, or from the
    batches a version without one kept), mid-epoch, diverged, failed, waiting (in Tune's order); the
    wall time over its sessions; whether a driver runs it now."""
    import subprocess
    import sys

    from trainables import sessions
    from trainables.study import load_study
    from trainables.study_lock import HOLDER_NAME
    from trainables.study_status import format_status, study_status
    from trainables.trial_eval import EvalBatches

    (tmp_path / "st.yaml").write_text(ABLATION.format())
    study = load_study(tmp_path / "st.yaml")
    storage = tmp_path / "studies"
    sd = storage / "st"
    t0 = 1_700_000_000.0
    epoch = {"epoch_time_s": 100.0, "diverged": 0}
    grid = [{"method.anc": a, "model.ra": r, "seed": 0} for r in (False, True) for a in (False, True)]
    # 0: evaluated; 1: evaluating (progress file); 2: trained, 2 of 4 batches kept by an older version;
    # 3: in epoch 2 (progress file of its mid-epoch checkpoint); 4 (seed 1): diverged; 5 (seed 1): failed.
    _trial_folder(sd, 0, grid[0], [{**epoch, "reported_at": t0 + 100 * k} for k in (1, 2, 3)]
                  + [{"final": 1, "diverged": 0, "reported_at": t0 + 400, "timing.eval_s": 96.0,
                      "eval_n_examples": 64, "timing.eval_untimed_batches": 1}])  # its first 16, no time
    f1 = _trial_folder(sd, 1, grid[1], [{**epoch, "reported_at": t0 + 100 * k} for k in (1, 2, 3)])
    ProgressFile(_fs(), str(f1)).evaluating(batches=1, n_batches=4, examples=16, n_examples=64, seconds=60.0)
    f2 = _trial_folder(sd, 2, grid[2], [{**epoch, "reported_at": t0 + 100 * k} for k in (1, 2, 3)])
    store = EvalBatches(_fs(), str(f2 / "eval_batches"))
    store.open({"model": "x", "suite": {"batch_size": 16}, "examples": list(range(50))}, 4)
    for b in (0, 1):
        (f2 / "eval_batches" / f"batch_0000{b}.pt").write_bytes(b"kept")
    f3 = _trial_folder(sd, 3, grid[3], [{**epoch, "reported_at": t0 + 500}])
    ProgressFile(_fs(), str(f3)).training(epoch=1, epochs=3, step=90, steps=100)  # stale: epoch 1 is done
    assert study_status(study, str(storage)).trials[3].now == "1 of 3 epochs done"
    ProgressFile(_fs(), str(f3)).training(epoch=2, epochs=3, step=40, steps=100)
    _trial_folder(sd, 4, {**grid[0], "seed": 1}, [{**epoch, "reported_at": t0 + 100},
                                                   {"diverged": 1, "diverged_epoch": 2, "reported_at": t0 + 200}])
    f5 = _trial_folder(sd, 5, {**grid[1], "seed": 1}, [])
    (f5 / "error.txt").write_text("Traceback ...")
    # Two sessions: one ended (1,000 s), one whose driver was killed after its last result (t0 + 2,500).
    sessions.save(str(sd), [sessions.Session(started=t0 - 500, ended=t0 + 500, outcome="interrupted"),
                            sessions.Session(started=t0 + 2000)])
    _trial_folder(sd, 6, {**grid[2], "seed": 1}, [{**epoch, "reported_at": t0 + 2500}])

    st = study_status(study, str(storage))
    assert st.driver is None and st.sessions == 2 and st.planned == 8
    assert st.wall_time_s == pytest.approx(1000 + 500)
    assert st.counts() == {"evaluated": 1, "unfinished": 4, "waiting": 1, "stopped": 0, "diverged": 1,
                           "failed": 1}
    now = [t.now for t in st.trials]
    assert now[0] == "evaluated"
    assert now[1].startswith("evaluation: 1 of 4 batches (16 of 64 examples) in 60 s, about 3 min left")
    assert now[2].startswith("trained; evaluation: 2 of 4 batches kept (32 of 50 examples; the last at ")
    assert now[3].startswith("epoch 2/3: step 40 of 100 (40%)") and st.trials[3].epochs == 1
    assert now[4] == "diverged at epoch 2" and now[5].endswith("it failed (error.txt in its folder)")
    assert [t.epochs for t in st.trials[:7]] == [3, 3, 3, 1, 1, 0, 1]
    assert st.trials[0].train_time_s == 300.0
    # Its first batch was kept by d923040, untimed: its 96 s timed the other 48 examples.
    assert (st.trials[0].eval_s, st.trials[0].eval_examples, st.trials[0].eval_timed) == (96.0, 64, 48)
    # Waiting: the grid's one point not started, in Tune's order (the seed slowest, the first key fastest).
    assert [(t.trial_id, t.params) for t in st.trials[7:]] == [(None, {**grid[3], "seed": 1})]
    # Left, at each row's measured rates (100 s an epoch; 2 (96 s for the 48 timed) and 3.75 s an
    # example for the first two rows, the RA rows' evaluation not measured yet): 48 examples of
    # trial 1, 1.6 epochs of trial 3, 2 of trial 6, 3 of the waiting one; the failed trial is not run again by anyone.
    assert st.left_s == pytest.approx(48 * 3.75 + 160 + 200 + 300) and st.slots == 1
    assert st.not_counted == ["the evaluation of anc=False ra=True", "the evaluation of anc=True ra=True"]
    assert "left at the rates its trials measured: at least 14 min of wall time" in format_status(st)
    # Before any trial has measured anything, the time left is not known: no "at least 0 min".
    from dataclasses import replace

    fresh = replace(st, left_s=0.0)
    assert "left: not known yet (no trial has finished an epoch" in format_status(fresh)
    assert "at least 0 min" not in format_status(fresh)
    # The rates by configuration, beside which the plan's prediction is read.
    r = st.rates["anc=False ra=False"]
    assert (r.epochs, r.per_epoch, r.examples, r.per_example) == (4, 100.0, 48, 2.0)
    assert (st.rates["anc=True ra=False"].examples, st.rates["anc=True ra=False"].per_example) == (16, 3.75)
    assert st.rates["anc=False ra=True"].per_example is None
    shown = format_status(st)
    assert "  anc=False ra=False           100 s per epoch (4 epochs); 2.00 s per evaluated example (48 examples " \
        "timed)" in shown
    assert "  anc=False ra=True            100 s per epoch (4 epochs); no evaluation timed yet" in shown
    # Not running: the command its last stopped session printed, with the flags it ran with.
    assert st.resume_command is None
    assert "not running: `ancra-tune x --resume`" in format_status(st, "ancra-tune x --resume")
    said = "ancra-tune ablate st.yaml --storage s --tracking-uri sqlite:///m.db --resume"
    (sd / "summary.json").write_text(json.dumps({"outcome": "interrupted", "resume_command": said}))
    st = study_status(study, str(storage))
    assert st.resume_command == said and f"not running: `{said}` goes on with it" in format_status(st, "ancra-tune x")

    # A driver alive on this host: the failed trial is Tune's to retry, the session runs until now.
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": "then", "command": "ancra-tune ablate"}
    (sd / HOLDER_NAME).write_text(json.dumps(holder))
    st = study_status(study, str(storage))
    assert st.driver == holder and st.trials[5].state == "unfinished"
    assert st.left_s == pytest.approx(840 + 3 * 100 + 64 * 3.75)  # the failed trial, run again
    assert st.wall_time_s == pytest.approx(1000 + time.time() - (t0 + 2000), abs=60)
    # Its evaluation's file was written when its last batch was kept: 20 min ago, 3 min left then.
    kept = json.loads((f1 / "trial_progress.json").read_text())
    (f1 / "trial_progress.json").write_text(json.dumps({**kept, "at": time.time() - 1200}))
    now1 = study_status(study, str(storage)).trials[1].now
    assert ", longer than its rate says: 3 min left at " in now1 and "it has run 20 min since " in now1, now1
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (sd / HOLDER_NAME).write_text(json.dumps({**holder, "pid": int(gone.stdout)}))  # a killed driver's note
    assert study_status(study, str(storage)).driver is None


def test_status_of_a_study_that_never_ran_exits_2(tmp_path: Path, capsys) -> None:
    from trainables.cli.app import main

    assert main(["status", "quickstart", "--storage", str(tmp_path)]) == 2
    assert "has not run in" in capsys.readouterr().err


def test_status_read_by_a_reader_that_goes_away_ends_quietly(tmp_path: Path) -> None:
    """`ancra-tune status ... | head -1`: the pipe closed before the output is written ends the
    command as SIGPIPE ends a program (141), without a traceback."""
    import subprocess
    import sys

    from trainables import sessions

    (tmp_path / "st.yaml").write_text(ABLATION.format())
    sessions.save(str(tmp_path / "studies" / "st"), [sessions.Session(started=1_700_000_000.0)])
    cmd = [sys.executable, "-m", "trainables.cli", "status", str(tmp_path / "st.yaml"), "--storage",
           str(tmp_path / "studies"), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone before a line is written (imports take seconds)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err[-2000:]
    assert "Traceback" not in err and "study st (ablation)" in err  # what was said on stderr still is
