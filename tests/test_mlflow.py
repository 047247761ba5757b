"""MLflow tracking against a real `mlflow server` process and the embedded sqlite store.

The study-level tests (a quickstart study, a resumed study, the sqlite default) run through
Ray in ``test_ray.py``; these check the tracking layer's own promises directly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ancra_tune.robustness import EvalReport
from trainables import tracking as tr

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_default_store_is_sqlite_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tr.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # Relative sqlite paths become absolute: Ray workers run elsewhere.
    assert tr.resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve() / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1234")
    assert tr.resolve_tracking_uri() == "http://127.0.0.1:1234"
    assert tr.resolve_tracking_uri("http://h:1") == "http://h:1"  # the flag wins over the variable
    with pytest.raises(tr.TrackingError, match="not supported"):
        tr.resolve_tracking_uri("mlruns")


def test_unreachable_server_fails_fast_before_ray_starts(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    t = time.perf_counter()
    with pytest.raises(tr.TrackingError, match="unreachable"):
        tr.check_tracking(uri)
    assert time.perf_counter() - t < 10
    # Through the command line: exit code 2, a clear message, no study folder, no Ray.
    storage = tmp_path / "studies"
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "trainables.cli", "sweep", str(ROOT / "search_spaces/quickstart.yaml"),
                          "--storage", str(storage), "--tracking-uri", uri], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"the MLflow tracking server {uri} is unreachable" in out.stderr
    assert time.perf_counter() - t < 60
    assert not (storage / "quickstart").exists()
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_epoch_logger_logs_each_epoch_once_across_restarts(mlflow_server: str) -> None:
    mc = tr.client(mlflow_server)
    exp = tr.ensure_experiment(mc, "epoch_logger", mlflow_server)
    run_id = mc.create_run(exp).info.run_id
    history = [{"epoch": 0.0, "loss": 2.0, "epoch_time_s": 1.0, "val_robust_acc": 0.1}]
    logger = tr.EpochLogger(mlflow_server, run_id)
    logger.sync(history)
    history.append({"epoch": 1.0, "loss": 1.5, "epoch_time_s": 1.1, "val_robust_acc": 0.2})
    logger.sync(history)
    logger.sync(history)  # nothing new
    # A restarted worker group: a new logger, the history from the checkpoint plus a new epoch.
    history.append({"epoch": 2.0, "loss": 1.2, "epoch_time_s": 0.9, "val_robust_acc": 0.3})
    tr.EpochLogger(mlflow_server, run_id).sync(history)
    for key, values in (("loss", [2.0, 1.5, 1.2]), ("val_robust_acc", [0.1, 0.2, 0.3])):
        hist = sorted(mc.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == list(zip([1, 2, 3], values, strict=True))
    assert "epoch" not in mc.get_run(run_id).data.metrics


def test_trial_run_is_created_once_per_trial(mlflow_server: str) -> None:
    mc = tr.client(mlflow_server)
    exp = tr.ensure_experiment(mc, "trial_runs", mlflow_server)
    parent = mc.create_run(exp, tags={tr.ROLE: "study"}).info.run_id
    tracking = tr.StudyTracking(mlflow_server, exp, parent)
    a = tr.trial_run(tracking, "t1", name="trial 1", params={"method.alpha": 0.5})
    mc.set_terminated(a, status="KILLED")
    assert tr.trial_run(tracking, "t1", name="trial 1", params={"method.alpha": 0.5}) == a
    assert mc.get_run(a).info.status == "RUNNING"  # a restarted trial reopens its run
    b = tr.trial_run(tracking, "t2", name="trial 2", params={"method.alpha": 0.7})
    assert b != a
    children = mc.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted([a, b])
    assert mc.get_run(b).data.params == {"method.alpha": "0.7"}


def test_params_another_process_logged_at_the_same_moment_are_not_an_error(mlflow_server: str,
                                                                          monkeypatch) -> None:
    """Two processes adopting one trial's new run both log its params; the second insert fails on the
    unique key (seen in CI). The same values there: the call goes on; other values: it fails."""
    from mlflow.exceptions import MlflowException

    import trainables.tracking.runs as runs_mod

    mc = tr.client(mlflow_server)
    exp = tr.ensure_experiment(mc, "param_race", mlflow_server)
    tracking = tr.StudyTracking(mlflow_server, exp, mc.create_run(exp, tags={tr.ROLE: "study"}).info.run_id)
    real = runs_mod.log_params

    def raced(value: str):
        def log(mc, run_id, params):
            real(mc, run_id, {k: value for k in params})  # the other process, first
            raise MlflowException("UNIQUE constraint failed: params.key, params.run_uuid")
        return log

    monkeypatch.setattr(runs_mod, "log_params", raced("0.7"))
    rid = tr.trial_run(tracking, "t1", name="trial 1", params={"method.alpha": 0.7})
    assert mc.get_run(rid).data.params == {"method.alpha": "0.7"}
    monkeypatch.setattr(runs_mod, "log_params", raced("0.9"))
    with pytest.raises(MlflowException, match="UNIQUE"):
        tr.trial_run(tracking, "t2", name="trial 2", params={"method.alpha": 0.7})


def test_a_studys_run_names_the_code_each_session_ran(mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    """The study's run carries the commit of the code that runs it (not of the study file's
    repository), the study file's own commit where that differs, and each session's code in order: a
    resume at another commit adds it, one at the same commit adds nothing."""
    from types import SimpleNamespace

    import trainables.tracking.runs as runs_mod
    from trainables.code_version import running_code

    code = running_code()
    here = code["commit"][:7] + ("+dirty" if code["dirty"] else "") if code["commit"] else \
        f"ancra-tune {code['version']}"
    repo = tmp_path / "elsewhere"  # a study file in a repository of its own
    repo.mkdir()
    (repo / "s.yaml").write_text("name: x\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "s.yaml"], ["commit", "-qm", "s"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    theirs = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    study = SimpleNamespace(name="code_commits", kind="sweep", path=repo / "s.yaml")
    mc = tr.client(mlflow_server)

    def start(resume: bool) -> dict[str, str]:
        t = runs_mod.start_study_run(mlflow_server, study, study_path=str(tmp_path / "st"), resume=resume,
                                     params={}, train_config={})
        return mc.get_run(t.parent_run_id).data.tags

    tags = start(False)
    assert tags["ancra.code_commits"] == here and tags["ancra.study_file_commit"] == theirs
    assert tags.get("mlflow.source.git.commit") == code["commit"] != theirs
    assert start(True)["ancra.code_commits"] == here  # the same code: nothing added
    monkeypatch.setattr(runs_mod, "running_code", lambda: {"commit": "b" * 40, "dirty": True, "version": "0"})
    assert start(True)["ancra.code_commits"] == f"{here},bbbbbbb+dirty"
    assert start(True)["ancra.code_commits"] == f"{here},bbbbbbb+dirty"
    assert start(True)["mlflow.source.git.commit"] == code["commit"]  # the first session's, as MLflow shows it


def test_a_trial_ends_with_one_run_whatever_creates_reached_mlflow(mlflow_server: str) -> None:
    """A create whose answer was lost (a timeout, a retried request) leaves a run the caller never saw:
    the next call adopts it (params filled in); a second run of the same trial, the newer one, is never
    used, and the study's end deletes it, keeping the run with the epochs."""
    from concurrent.futures import ThreadPoolExecutor

    mc = tr.client(mlflow_server)
    exp = tr.ensure_experiment(mc, "lost_answers", mlflow_server)
    parent = mc.create_run(exp, tags={tr.ROLE: "study"}).info.run_id
    tracking = tr.StudyTracking(mlflow_server, exp, parent)
    tags = {tr.PARENT: parent, tr.TRIAL_ID: "t1", tr.ROLE: "trial"}
    lost = mc.create_run(exp, tags=tags).info.run_id  # MLflow made it; its caller timed out
    got = tr.trial_run(tracking, "t1", name="trial 1", params={"method.alpha": 0.5}, tags={"ray.node.rank0": "n0"})
    assert got == lost and mc.get_run(lost).data.params == {"method.alpha": "0.5"}
    assert mc.get_run(lost).data.tags["ray.node.rank0"] == "n0"
    phantom = mc.create_run(exp, tags=tags).info.run_id  # a retried create, answered
    assert tr.trial_run(tracking, "t1", name="trial 1", params={"method.alpha": 0.5}) == lost  # the oldest
    tr.EpochLogger(mlflow_server, lost).sync([{"epoch": 0, "epoch_time_s": 1.0}])
    assert tr.merge_trial_runs(mc, tracking, "t1").info.run_id == lost
    assert mc.get_run(phantom).info.lifecycle_stage == "deleted"
    # Several processes creating at once (what ranks and the trial process did): one run is left once
    # the study ends, the one that holds the epochs.
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: tr.trial_run(tracking, "t2", name="trial 2", params={"method.alpha": 0.7}),
                            range(4)))
    tr.EpochLogger(mlflow_server, ids[-1]).sync([{"epoch": 0, "epoch_time_s": 1.0}])
    kept = tr.merge_trial_runs(mc, tracking, "t2")
    assert kept.info.run_id == ids[-1]
    live = mc.search_runs([exp], filter_string=f"tags.`{tr.PARENT}` = '{parent}'")
    assert sorted(r.data.tags[tr.TRIAL_ID] for r in live) == ["t1", "t2"]


def test_logged_model_has_a_dynamic_batch_and_matches_the_final_output(mlflow_server: str) -> None:
    import mlflow.pytorch

    from ancra_tune.models import create_model

    model = create_model("small_cnn", num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,), ra=True).eval()
    mc = tr.client(mlflow_server)
    exp = tr.ensure_experiment(mc, "models", mlflow_server)
    run_id = mc.create_run(exp).info.run_id
    uri = tr.log_model(mlflow_server, run_id, model, (1, 8, 8))
    assert uri.startswith("models:/")
    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pytorch.load_model(uri)
    for n in (1, 5, 33):  # exported with a dynamic batch dimension
        x = torch.rand(n, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x).logits, rtol=1e-5, atol=1e-5)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 8, 8)
    assert np.dtype(info.signature.inputs.inputs[0].type) == np.float32
    assert info.saved_input_example_info is not None  # the example is kept (only MLflow's serving check is off)


def _report(pgd_final: float, worst: float, clean: float, failing: dict[str, str] = ()) -> EvalReport:
    """A small evaluation report: PGD on P', an adaptive attack, and checks (name -> scope) that fail."""
    from ancra_tune.robustness import AttackResult, Check, SuiteConfig

    attacks = (AttackResult("pgd10_final", "pgd", "final", 10, 0.3, True, pgd_final),
               AttackResult("apgd-ce_softgate", "apgd-ce", "softgate", 20, 0.3, True, worst))
    checks = [Check("robust_le_clean", True, "..."), Check("gradient_sanity", True, "...")]
    checks += [Check(name, False, "...", scope=scope) for name, scope in dict(failing).items()]
    return EvalReport(suite=SuiteConfig.preset_config("quick", eps=0.3), n_examples=100, ra=True, n_classes=10,
                      clean_acc=clean, robust_acc_worst=worst, attacks=attacks, checks=tuple(checks))


def _child(mc, exp: str, parent: str, trial: str, report: EvalReport, tmp_path: Path, status: str = "finished") -> str:
    run_id = mc.create_run(exp, tags={tr.PARENT: parent, tr.TRIAL_ID: trial, tr.STATUS: status,
                                      tr.MODEL_URI: f"models:/m-{trial}", **report.tags()}).info.run_id
    tr.log_metrics(mc, run_id, report.metrics(), step=1)
    mc.log_artifact(run_id, str(report.save(tmp_path / trial / "report.json")), artifact_path="evaluation")
    return run_id


def test_best_ranks_flagged_trials_last_and_refuses_a_flagged_winner(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tr.check_tracking(uri)
    mc = tr.client(uri)
    exp = tr.ensure_experiment(mc, "picky", uri)
    parent = mc.create_run(exp, tags={tr.ROLE: "study"}).info.run_id
    # a: best under PGD on P' alone, but adaptive attacks show P' masked (scope final).
    _child(mc, exp, parent, "a", _report(0.9, 0.3, 0.9, {"final_output_not_masked": "final"}), tmp_path)
    # b: honest, every check passes.
    _child(mc, exp, parent, "b", _report(0.6, 0.5, 0.8), tmp_path)
    # d: the highest worst case, but its gradients are broken (scope all): not credible at all.
    _child(mc, exp, parent, "d", _report(0.8, 0.7, 0.9, {"gradient_sanity": "all"}), tmp_path)
    _child(mc, exp, parent, "c", _report(0.95, 0.9, 0.95), tmp_path, status="stopped")  # ASHA stopped it
    _, _, children = tr.study_runs(uri, "picky")

    def best(metric: str, **kw) -> tuple[str, list[str]]:
        cand, warnings = tr.pick_best(mc, children, metric, **kw)
        return cand.run.data.tags[tr.TRIAL_ID], warnings

    winner, warnings = best("robust_acc_worst")
    assert winner == "b" and any("ranked below" in w and "d" in w for w in warnings)
    winner, _ = best("acc_pgd10_final")  # a's 0.9 is masked, d is not credible: b again
    assert winner == "b"
    ranked = tr.rank_candidates(mc, children, "acc_pgd10_final")
    assert [c.run.data.tags[tr.TRIAL_ID] for c in ranked] == ["b", "d", "a"]
    assert ranked[2].credible == 0.3  # a's lowest credible value: its worst case, not 0.9
    assert best("robust_acc_worst", mode="min")[0] == "a"  # a's worst case is credible (not d's)
    with pytest.raises(tr.TrackingError, match="no finished trial"):
        tr.pick_best(mc, children, "nonexistent")
    with pytest.raises(tr.TrackingError, match="no MLflow experiment"):
        tr.study_runs(uri, "nope")
    # Only flagged trials on this metric: refused unless --force, which warns.
    flagged_only = [r for r in children if r.data.tags[tr.TRIAL_ID] in ("a", "d")]
    with pytest.raises(tr.TrackingError, match="gradient_sanity"):
        tr.pick_best(mc, flagged_only, "acc_pgd10_final")
    cand, warnings = tr.pick_best(mc, flagged_only, "acc_pgd10_final", force=True)
    assert cand.run.data.tags[tr.TRIAL_ID] == "d" and warnings[0].startswith("--force")


def test_best_says_plainly_when_the_winner_means_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tr.check_tracking(uri)
    mc = tr.client(uri)
    exp = tr.ensure_experiment(mc, "hollow", uri)
    parent = mc.create_run(exp, tags={tr.ROLE: "study"}).info.run_id
    _child(mc, exp, parent, "only", _report(0.2, 0.0, 0.6), tmp_path)
    _, _, children = tr.study_runs(uri, "hollow")
    _, warnings = tr.pick_best(mc, children, "robust_acc_worst")
    assert any("only one trial finished" in w for w in warnings)
    assert any("no example survives" in w for w in warnings)
    _child(mc, exp, parent, "chance", _report(0.2, 0.11, 0.6), tmp_path)
    _, _, children = tr.study_runs(uri, "hollow")
    cand, warnings = tr.pick_best(mc, children, "robust_acc_worst")
    assert cand.run.data.tags[tr.TRIAL_ID] == "chance" and any("at chance" in w for w in warnings)


def test_trial_result_is_logged_once_even_when_interrupted_midway(mlflow_server: str, tmp_path: Path) -> None:
    """A worker stopped after logging the model but before marking the run complete repeats the
    logging on restart: still one value per metric and one model."""
    from ancra_tune.models import create_model

    model = create_model("small_cnn", num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,), ra=False).eval()
    mc = tr.client(mlflow_server)
    exp = tr.ensure_experiment(mc, "once", mlflow_server)
    run_id = mc.create_run(exp).info.run_id
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"weights")
    png = tmp_path / "features_hist.png"
    png.write_bytes(b"png")
    from ancra_tune.robustness import Check

    base = _report(0.9, 0.4, 0.9, {"final_output_not_masked": "final"})
    report = EvalReport(**{**base.__dict__, "checks": base.checks + (Check("whitebox_beats_transfer", None, "..."),)})
    kw = dict(metrics={"clean_acc": 0.9, "robust_acc_worst": 0.4}, report=report, files=[png], model=model,
              input_shape=(1, 8, 8), checkpoint=ckpt, step=3)
    tr.log_trial_result(mlflow_server, run_id, **kw)
    first = mc.get_run(run_id).data.tags[tr.MODEL_URI]
    mc.delete_tag(run_id, tr.FINAL_LOGGED)  # as if the worker died before its last call
    mc.delete_tag(run_id, tr.MODEL_URI)
    tr.log_trial_result(mlflow_server, run_id, **kw)
    tags = mc.get_run(run_id).data.tags
    assert tags[tr.MODEL_URI] == first and tags[tr.FINAL_LOGGED] == "true"
    assert len(mc.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")) == 1
    assert [(m.step, m.value) for m in mc.get_metric_history(run_id, "robust_acc_worst")] == [(3, 0.4)]
    assert tags["check.final_output_not_masked"] == "fail" and tags["check.whitebox_beats_transfer"] == "n/a"
    assert tags["ancra.masked_metrics"] == "none" and tags["attack.apgd-ce_softgate"] == "apgd-ce on softgate"
    assert tags["ancra.flagged"] == "none"  # the worst case stands: only P'-only metrics are flagged
    assert {a.path for a in mc.list_artifacts(run_id, "evaluation")} == {"evaluation/report.json",
                                                                        "evaluation/features_hist.png"}


def test_ui_serves_the_local_store_on_loopback_only(tmp_path: Path) -> None:
    import signal
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    empty = subprocess.run([sys.executable, "-m", "trainables.cli", "ui"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no MLflow store" in empty.stderr
    uri = tr.default_tracking_uri(tmp_path)
    tr.check_tracking(uri)
    exp = tr.ensure_experiment(tr.client(uri), "seen_in_ui", uri)
    tr.client(uri).create_run(exp, tags={tr.ROLE: "study"})
    # Ctrl+C in a terminal, `kill -INT` of a job started in the background (it inherits SIGINT ignored,
    # as `cmd &` in a script, nohup and CI runners start it: the command takes SIGINT back itself), and
    # `kill PID`: each stops the server too, whether this test itself runs in a terminal or not.
    for stop, inherited in ((signal.SIGINT, signal.SIG_DFL), (signal.SIGINT, signal.SIG_IGN),
                            (signal.SIGTERM, signal.SIG_DFL)):
        port = _closed_port()
        proc = subprocess.Popen([sys.executable, "-m", "trainables.cli", "ui", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda inherited=inherited: signal.signal(signal.SIGINT, inherited))
        try:
            tr.wait_for_server(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
            api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=seen_in_ui"
            with urllib.request.urlopen(api, timeout=10) as r:
                assert b"seen_in_ui" in r.read()
            # It opens on the study's runs list (not MLflow's home page) in the view it saved: sorted by
            # the worst case, robust metrics and flags as columns.
            lines = [proc.stdout.readline() for _ in range(2)]
            assert f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?viewStateShareKey=ancra" in "".join(lines), lines
            view = json.loads(tr.client(uri).get_experiment(exp).tags["mlflow.sharedViewState.ancra"])
            assert view["orderByKey"] == "metrics.`robust_acc_worst`" and view["orderByAsc"] is False
            assert {"metrics.`robust_acc_worst`", "tags.`ancra.flagged`"} <= set(view["selectedColumns"])
            host_ip = socket.gethostbyname(socket.gethostname())
            if not host_ip.startswith("127."):  # bound to loopback: another interface is refused
                with socket.socket() as s:
                    s.settimeout(3)
                    assert s.connect_ex((host_ip, port)) != 0
        finally:
            proc.send_signal(stop)
            proc.wait(timeout=30)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{stop.name} ({inherited!r}) left the MLflow server running"
