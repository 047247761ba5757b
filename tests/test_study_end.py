"""Every study reaches an end: the end state after Ctrl+C + --resume and after a killed driver +
--resume is the one an uninterrupted study has (exit code, each trial's status, the parent run and
its children, the summary), a finished study is not run again, and the exit code tells the truth.

Each test runs the ``ancra-tune`` program as a user does, in its own process with its own Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]

# Six short trials one at a time (--num-cpus 1), ASHA deciding after every epoch: the trials after an
# interruption meet ASHA's rungs in the resumed session, where its decisions used to be lost.
SWEEP = """
name: {name}
kind: sweep
base: quickstart
train: {{optim.epochs: 3, data.train_limit: 256, attack.steps: 2, eval.pgd_steps: 2, eval.max_examples: 64,
        model.ra: false}}
resources: {{workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}}
eval: {{preset: quick, n_examples: 64, autoattack: null, square_queries: 10, apgd_iters: 5}}
search:
  sampler: random
  num_samples: 6
  space:
    optim.lr: {{low: 1.0e-4, high: 0.1, log: true}}
scheduler: {{type: asha, metric: val_robust_acc, grace_period: 1, reduction_factor: 2}}
max_failures: 0
"""


def _cli(study: Path, storage: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainables.cli", "sweep", str(study), "--storage", str(storage),
            "--num-cpus", "1", "--tracking-uri", uri, *extra]


def _sweep(tmp_path: Path, name: str, uri: str) -> tuple[Path, list[str]]:
    """The SWEEP study as a file, its folder and the command that runs it."""
    study = tmp_path / "study.yaml"
    study.write_text(SWEEP.format(name=name))
    return tmp_path / "studies" / name, _cli(study, tmp_path / "studies", uri)


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _default_sigint() -> None:
    # The signal this test sends must arrive, even when the test itself runs as a background job
    # (which inherits SIGINT ignored): the child starts with Python's default handling.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _rows(trial_dir: Path) -> list[dict]:
    """A trial's results (its ``result.json``), read while Tune may be writing it: an empty file or
    a line being written is left out."""
    p = trial_dir / "result.json"
    out = []
    for line in (p.read_text().splitlines() if p.exists() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _epochs_reported(study_dir: Path) -> dict[str, int]:
    return {td.name: sum("epoch_time_s" in r for r in _rows(td)) for td in study_dir.glob("run_trial_*")}


def _evaluated(study_dir: Path) -> int:
    """Trials whose evaluation has been reported (their result's ``final`` row)."""
    return sum(any(r.get("final") == 1 for r in _rows(td)) for td in study_dir.glob("run_trial_*"))


def _start_and_stop(cmd: list[str], study_dir: Path, how: signal.Signals,
                    evaluated: int = 0) -> subprocess.CompletedProcess:
    """Run the study until its second trial has reported an epoch and ``evaluated`` trials have been
    evaluated, then send ``how`` to the driver."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.3)
        if sum(n > 0 for n in _epochs_reported(study_dir).values()) >= 2 and _evaluated(study_dir) >= evaluated:
            break
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    else:
        proc.kill()
        pytest.fail("the second trial did not start in time")
    proc.send_signal(how)
    out, _ = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _status(tmp_path: Path, name: str = "study.yaml") -> dict:
    """``ancra-tune status`` of the study file ``tmp_path / name`` (--json)."""
    study = tmp_path / name
    out = subprocess.run([sys.executable, "-m", "trainables.cli", "status", str(study), "--storage",
                          str(tmp_path / "studies"), "--json"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _assert_ended_as_uninterrupted(study_dir: Path, uri: str, name: str, summary: dict) -> None:
    """The end state of a study that ran to its end: exit code 0 was checked by the caller."""
    from trainables.scheduler import read_state
    from trainables.tracking import client

    counts = summary["status_counts"]
    assert summary["outcome"] == "finished" and not summary["interrupted"], counts
    assert summary["n_trials"] == 6 and counts["interrupted"] == 0 and counts["error"] == 0, counts
    assert counts["finished"] >= 1 and counts["stopped"] >= 1, counts
    assert 0 <= summary["overhead_share"] <= 1 and summary["wall_time_s"] > 0
    stopped = set(read_state(str(study_dir))["stopped"])
    for t in summary["trials"]:
        assert (t["status"] == "stopped") == (t["trial_id"] in stopped), t
        assert t["status"] in ("finished", "stopped"), t
        assert t["epochs_run"] == 3 if t["status"] == "finished" else t["epochs_run"] < 3, t
    mc = client(uri)
    exp = mc.get_experiment_by_name(name)
    runs = mc.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ancra.role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["ancra.status"] == "finished"
    assert "ancra.resume" not in parent.data.tags
    assert len(mc.get_metric_history(parent.info.run_id, "trials_finished")) == 1
    assert parent.data.metrics["trials_stopped"] == counts["stopped"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_trial: dict[str, list] = {}
    for r in children:
        by_trial.setdefault(r.data.tags["ancra.trial_id"], []).append(r)
    assert sorted(by_trial) == sorted(str(t["trial_id"]) for t in summary["trials"])  # one run per trial
    assert all(len(v) == 1 for v in by_trial.values()), {k: len(v) for k, v in by_trial.items()}
    for t in summary["trials"]:
        run = by_trial[str(t["trial_id"])][0]
        assert run.data.tags["ancra.status"] == t["status"]
        assert run.info.status == {"finished": "FINISHED", "stopped": "KILLED"}[t["status"]]
        steps = sorted(m.step for m in mc.get_metric_history(run.info.run_id, "epoch_time_s"))
        assert steps == list(range(1, t["epochs_run"] + 1)), (t["trial_id"], steps)  # each epoch once


@pytest.mark.slow
@pytest.mark.ci
def test_ctrl_c_then_resume_ends_as_an_uninterrupted_study(tmp_path: Path, mlflow_server: str) -> None:
    name = "ctrl_c"
    study_dir, cmd = _sweep(tmp_path, name, mlflow_server)
    first = _start_and_stop(cmd, study_dir, signal.SIGINT, evaluated=1)
    assert first.returncode == 130, first.stdout[-3000:]
    assert "interrupted (SIGINT)" in first.stdout and "--resume" in first.stdout
    stopped = json.loads((study_dir / "summary.json").read_text())
    assert stopped["outcome"] == "interrupted"
    # What had ended before the stop (finished, or stopped by ASHA) is not run again by --resume.
    ended = {t["trial_dir"]: Path(t["trial_dir"], "result.json").read_text() for t in stopped["trials"]
             if t["status"] in ("finished", "stopped")}
    assert ended, stopped["status_counts"]
    # Between the sessions `ancra-tune status` tells the same story from the folder alone.
    status = _status(tmp_path)
    assert status["driver"] is None and status["sessions"] == 1 and status["planned"] == 6
    assert status["wall_time_s"] == pytest.approx(stopped["wall_time_s"], abs=15)
    assert status["resume_command"] == stopped["resume_command"] and "--tracking-uri" in status["resume_command"]
    by_id = {t["trial_id"]: t for t in status["trials"]}
    unstarted = 0  # a trial Tune had made but not started has no folder yet: waiting
    for t in stopped["trials"]:
        mine = by_id.get(t["trial_id"])
        if mine is None:
            assert t["status"] == "interrupted" and t["epochs_run"] == 0, t
            unstarted += 1
            continue
        want = {"finished": "evaluated", "stopped": "stopped", "interrupted": "unfinished"}[t["status"]]
        assert (mine["state"], mine["epochs"]) == (want, t["epochs_run"]), (t, mine)
    assert stopped["n_trials"] - unstarted >= 2 and status["counts"]["waiting"] == 6 - stopped["n_trials"] + unstarted

    # --json: stdout is the summary alone, as JSON; the lines for people went to stderr.
    again = subprocess.run(cmd + ["--resume", "--json"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary == json.loads((study_dir / "summary.json").read_text())
    assert "epoch" in again.stderr and summary["sessions"] == 2
    _assert_ended_as_uninterrupted(study_dir, mlflow_server, name, summary)
    assert {d: Path(d, "result.json").read_text() for d in ended} == ended
    status = _status(tmp_path)
    assert status["counts"]["waiting"] == status["counts"]["unfinished"] == 0 and status["sessions"] == 2
    assert status["counts"]["evaluated"] == summary["status_counts"]["finished"]
    assert not list(study_dir.glob("run_trial_*/trial_progress.json"))  # gone with the evaluation

    # --resume of a finished study: nothing trained, the same answer, exit 0.
    third = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "is finished" in third.stderr and ": epoch" not in third.stdout
    last = json.loads((study_dir / "summary.json").read_text())
    assert last["status_counts"] == summary["status_counts"] and last["sessions"] == 2
    assert last["wall_time_s"] == pytest.approx(summary["wall_time_s"], abs=1.0)
    _assert_ended_as_uninterrupted(study_dir, mlflow_server, name, last)


@pytest.mark.slow
def test_a_killed_driver_then_resume_ends_as_an_uninterrupted_study(tmp_path: Path, mlflow_server: str) -> None:
    name = "killed"
    study_dir, cmd = _sweep(tmp_path, name, mlflow_server)
    first = _start_and_stop(cmd, study_dir, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    assert not (study_dir / "summary.json").exists()
    time.sleep(3)  # Ray's reaper ends the killed driver's local instance
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["sessions"] == 2
    _assert_ended_as_uninterrupted(study_dir, mlflow_server, name, summary)
    # The killed session was closed when the next began: at its trials' last trace, after its start.
    killed = json.loads((study_dir / "study_state" / "sessions.json").read_text())[0]
    assert killed["outcome"] == "interrupted" and killed["started"] < killed["ended"] < time.time()


def test_a_study_whose_every_trial_fails_exits_1(tmp_path: Path) -> None:
    """Every trial errors (its data file is missing): the study ran to its end without a finished
    trial; exit code 1, the summary and the parent run say failed."""
    text = SWEEP.format(name="broken").replace(
        "train: {optim.epochs: 3,", f"train: {{data.dataset: npz, data.train_file: {tmp_path / 'missing.npz'}, "
        "optim.epochs: 3,").replace("num_samples: 6", "num_samples: 2")
    study = tmp_path / "study.yaml"
    study.write_text(text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run(_cli(study, tmp_path / "studies", uri, "--json"), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["outcome"] == "failed" and summary["status_counts"]["error"] == 2
    assert "2 trial(s) failed with an error" in out.stderr
    from trainables.tracking import client

    mc = client(uri)
    parent = mc.get_run(summary["mlflow"]["study_run_id"])
    assert parent.info.status == "FAILED" and parent.data.tags["ancra.status"] == "failed"


# One trial of one long epoch, a mid-epoch checkpoint every second: Ctrl+C lands mid-epoch.
MID_EPOCH = """
name: {name}
kind: ablation
base: quickstart
train: {{optim.epochs: 1, data.batch_size: 8, data.train_limit: 1280, attack.steps: 3, eval.pgd_steps: 0,
        model.ra: false, checkpoint_every_s: {every}}}
resources: {{workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}}
eval: {{preset: quick, n_examples: 32, autoattack: null, square_queries: 10, apgd_iters: 2}}
ablation: {{grid: {{method.anc: [true]}}}}
"""


def _weights(study_dir: Path) -> dict:
    from ancra_tune.checkpoint import find_checkpoint, load_checkpoint

    (trial_dir,) = study_dir.glob("run_trial_*")
    return load_checkpoint(find_checkpoint(trial_dir))["model"]  # the finished run's


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_resume_goes_on_from_that_step(tmp_path: Path) -> None:
    """A study stopped mid-epoch loses at most ``checkpoint_every_s`` of training: --resume takes the
    trial's epoch up at the step its mid-epoch checkpoint reached (the epoch says so), and the trained
    model is the one of the same study never stopped, bit for bit."""
    import torch

    cmds = {}
    for name, every in (("straight", 0), ("stopped", 1)):
        f = tmp_path / f"{name}.yaml"
        f.write_text(MID_EPOCH.format(name=name, every=every))
        cmds[name] = [sys.executable, "-m", "trainables.cli", "ablate", str(f), "--storage", str(tmp_path / "studies"),
                      "--num-cpus", "1", "--no-mlflow"]
    study_dir = tmp_path / "studies" / "stopped"
    proc = subprocess.Popen(cmds["stopped"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while time.time() < deadline and not list(study_dir.glob("run_trial_*/partial_epoch.pt")):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    proc.send_signal(signal.SIGINT)  # right after the first mid-epoch checkpoint: well before the epoch's end
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    (partial,) = study_dir.glob("run_trial_*/partial_epoch.pt")
    saved = torch.load(partial, weights_only=True)
    assert saved["epoch"] == 0 and 0 < saved["step"] < 160, saved["step"]
    (trial,) = [t for t in _status(tmp_path, "stopped.yaml")["trials"] if t["trial_id"]]
    assert trial["state"] == "unfinished" and trial["now"].startswith(f"epoch 1/1: step {saved['step']} of ")
    again = subprocess.run(cmds["stopped"] + ["--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["outcome"] == "finished" and summary["sessions"] == 2, summary["status_counts"]
    assert summary["status_counts"]["finished"] == 1 and summary["status_counts"]["interrupted"] == 0
    rows = [json.loads(line) for td in study_dir.glob("run_trial_*")
            for line in (td / "result.json").read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if "epoch_time_s" in r]
    assert [r.get("resumed_at_step") for r in epochs] == [saved["step"]], epochs  # one epoch, taken up there
    assert "epoch 1/1" in again.stdout and f"taken up at step {saved['step']})" in again.stdout, \
        again.stdout[-2000:]
    assert not list(study_dir.glob("run_trial_*/partial_epoch.pt*"))
    assert not list(study_dir.glob("run_trial_*/eval_batches"))  # the evaluation's kept batches went too
    assert not list(study_dir.glob("run_trial_*/trial_progress.json"))
    straight = subprocess.run(cmds["straight"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    reference = _weights(tmp_path / "studies" / "straight")
    for k, v in _weights(study_dir).items():
        assert torch.equal(v, reference[k]), k
