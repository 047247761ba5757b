"""Ray Train and Ray Tune for real: a local multi-process Ray instance with 2 CPUs.

Marked ``ray``; CI runs these on its CPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def _study_file(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def _results(trial_dir: str | Path) -> list[dict]:
    p = Path(trial_dir) / "result.json"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


@pytest.mark.slow
@pytest.mark.ci
def test_quickstart_study_end_to_end(ray_local, tmp_path: Path, mlflow_server: str) -> None:
    """8 trials, two at a time; ASHA stops some; every sample respects the conditional space;
    MLflow (a real server) gets one parent and one child per trial; `best` registers the winner."""
    from trainables.study import load_study
    from trainables.study_run import run_study

    study = load_study(QUICKSTART)
    assert study.search.num_samples >= 6
    summary = run_study(study, storage=str(tmp_path / "studies"), tracking_uri=mlflow_server)
    trials = summary["trials"]
    assert len(trials) == study.search.num_samples
    assert summary["status_counts"]["stopped"] >= 1, summary["status_counts"]
    assert summary["status_counts"]["finished"] >= 1
    # Where the time went: training, validation every epoch, evaluation of finished trials only;
    # the rest of the two trial slots' time is the platform's own.
    assert summary["slots"] == 2 and 0 < summary["overhead_share"] < 1
    assert all(t["val_time_s"] > 0 and (t["eval_time_s"] > 0) == (t["status"] == "finished") for t in trials)
    assert summary["trial_eval_time_s"] == pytest.approx(sum(t["eval_time_s"] for t in trials))
    # Tune names trial folders run_trial_<id>_<counter>_...: the counter is the creation order.
    first = min(trials, key=lambda t: int(Path(t["trial_dir"]).name.split("_")[3]))
    for t in trials:
        params = {k: v for k, v in t["params"].items() if k != "seed"}
        assert study.is_valid_point(params), params
        results = _results(t["trial_dir"])
        epochs = [r["epoch"] for r in results if r.get("epoch") is not None and "final" not in r]
        assert epochs == list(range(1, len(epochs) + 1))  # each epoch reported once, in order
        if t["status"] == "finished":
            assert len(epochs) == 4 and sum(r.get("final") == 1 for r in results) == 1
            assert 0 <= t["robust_acc_worst"] <= t["clean_acc"] <= 1
            assert Path(t["checkpoint"], "checkpoint.pt").is_file()
            # Where its time went, in its own folder even when Tune reused another trial's actor.
            timing = json.loads(Path(t["trial_dir"], "timing.json").read_text())
            assert timing["trial_start"] <= timing["fit_start"] <= timing["fit_end"]
            assert timing["train_time_s"] == pytest.approx(t["train_time_s"])
        else:
            assert len(epochs) < 4
    # The paper's defaults went first.
    assert {k: v for k, v in first["params"].items() if k != "seed"} == study.default_point()
    best = summary["best"][0]
    assert best["status"] == "finished"
    # The best trial: the highest worst case among those whose checks pass on it (a flagged RA
    # trial with a higher number ranks after them).
    assert best["robust_acc_worst"] == max(t["robust_acc_worst"] for t in _trusted_finished(trials))
    assert Path(summary["study_dir"], "summary.json").is_file()
    _check_tracked_study(mlflow_server, study, summary)
    _check_best_is_registered(mlflow_server, summary, tmp_path)
    # The study's page: the best-so-far curve ends at the best trial's value, the plots exist.
    from trainables.cli import main

    assert main(["report", summary["study_dir"]]) == 0
    page_dir = Path(summary["study_dir"], "report")
    curve = json.loads((page_dir / "best_so_far.json").read_text())
    assert [c["trial"] for c in curve] == list(range(1, len(trials) + 1))
    assert [c["epochs"] for c in curve][-1] == sum(t["epochs_run"] for t in trials)
    trusted = [t["robust_acc_worst"] for t in trials if t["status"] == "finished" and not t.get("flags")]
    assert curve[-1]["best"] == (pytest.approx(max(trusted)) if trusted else None)
    assert all((page_dir / f).stat().st_size > 1000 for f in ("best_so_far.png", "pareto.png", "params.png"))
    assert f"| {best['trial_id']} |" in (page_dir / "report.md").read_text()


def _trusted_finished(trials: list[dict]) -> list[dict]:
    """Finished trials whose masking checks pass on the objective (all finished ones if none do)."""
    finished = [t for t in trials if t["status"] == "finished"]
    return [t for t in finished if not t.get("flags", {}).get("robust_acc_worst")] or finished


def _mlflow_runs(uri: str, experiment: str, study_path: Path) -> tuple[object, list]:
    """The one parent run of the study at ``study_path`` and its children; no trial run elsewhere."""
    from trainables.tracking import client

    mc = client(uri)
    exp = mc.get_experiment_by_name(experiment)
    assert exp is not None
    runs = mc.search_runs([exp.experiment_id], max_results=1000)
    studies = [r for r in runs if r.data.tags.get("ancra.role") == "study"]
    parents = [r for r in studies if r.data.tags.get("ancra.study_path") == str(study_path)]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    orphans = [r for r in runs if r.data.tags.get("ancra.role") == "trial" and
               r.data.tags.get("mlflow.parentRunId") not in {p.info.run_id for p in studies}]
    assert not orphans
    return parents[0], children


def _check_tracked_study(uri: str, study, summary: dict) -> None:
    from ancra_tune.config import flatten, inactive_keys
    from trainables.tracking import client

    mc = client(uri)
    parent, children = _mlflow_runs(uri, study.name, Path(summary["study_dir"]))
    assert parent.info.run_id == summary["mlflow"]["study_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["ancra.study_kind"] == "sweep"
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    assert parent.data.params["study.objective"] == "robust_acc_worst"
    assert {a.path for a in mc.list_artifacts(parent.info.run_id, "study")} == {
        "study/quickstart.yaml", "study/train_config.yaml"}
    assert parent.data.metrics["trials_finished"] == summary["status_counts"]["finished"]
    by_trial = {r.data.tags["ancra.trial_id"]: r for r in children}
    assert sorted(by_trial) == sorted(str(t["trial_id"]) for t in summary["trials"])
    for t in summary["trials"]:
        run = by_trial[str(t["trial_id"])]
        params = dict(t["params"])
        seed = params.pop("seed")
        cfg = study.train_config(params, seed)
        expected = {k: str(v) for k, v in flatten(cfg, resolved=True).items()}
        expected.update({k: "inactive" for k in inactive_keys(cfg)})
        got = {k: v for k, v in run.data.params.items() if k != "trial_id"}
        assert got == expected  # the whole trial configuration, unused settings marked inactive
        if not params.get("method.anc"):
            assert run.data.params["method.alpha"] == run.data.params["method.zeta"] == "inactive"
        for k, v in params.items():  # the sampled values themselves
            assert run.data.params[k] == str(v)
        assert run.data.tags["ancra.status"] == t["status"]
        assert run.info.status == {"finished": "FINISHED", "stopped": "KILLED"}[t["status"]]
        # One value per epoch trained, step = epoch, for every per-epoch metric. A one-worker trial
        # trains in the Tune trial, whose report waits for ASHA's decision: a stopped trial trains
        # no epoch beyond the one it was stopped at.
        trained = len(mc.get_metric_history(run.info.run_id, "epoch_time_s"))
        assert trained == t["epochs_run"] and (t["status"] == "finished" or trained < 4)
        for key in ("loss", "loss_at", "loss_aux_at", "val_clean_acc", "val_robust_acc", "val_pgd_acc_final",
                    "epoch_time_s", "train_images_per_s", "lr"):
            hist = mc.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in hist) == list(range(1, trained + 1)), (key, t["status"])
        if params.get("method.anc"):
            assert len(mc.get_metric_history(run.info.run_id, "neg_fallback_rate")) == trained
        results = {r["epoch"]: r for r in _results(t["trial_dir"]) if "epoch" in r and "final" not in r}
        assert len(results) == t["epochs_run"]
        for m in mc.get_metric_history(run.info.run_id, "val_robust_acc"):
            if m.step in results:
                assert m.value == pytest.approx(results[m.step]["val_robust_acc"])
        if t["status"] == "finished":
            assert run.data.metrics["robust_acc_worst"] == pytest.approx(t["robust_acc_worst"])
            assert run.data.metrics["clean_acc"] == pytest.approx(t["clean_acc"])
            assert run.data.tags["check.robust_le_clean"] in ("pass", "fail")
            if params.get("model.ra", True):  # RA's gate attacked through its surrogates
                assert run.data.tags["attack.apgd-t_softgate"] == "apgd-t on softgate"
            assert run.data.tags["ancra.model_uri"].startswith("models:/")
            arts = {a.path for a in mc.list_artifacts(run.info.run_id, "evaluation")}
            assert arts == {"evaluation/report.json", "evaluation/features_hist.png", "evaluation/embedding.png",
                            "evaluation/robustness_card.png"}
            assert [a.path for a in mc.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
            local = mc.download_artifacts(run.info.run_id, "evaluation/report.json", str(t["trial_dir"]))
            report = json.loads(Path(local).read_text())
            assert report["robust_acc_worst"] == pytest.approx(t["robust_acc_worst"])
        else:
            assert "robust_acc_worst" not in run.data.metrics and "ancra.model_uri" not in run.data.tags


def _check_best_is_registered(uri: str, summary: dict, tmp_path: Path) -> None:
    """`ancra-tune best` registers the best trial's model under @champion; it loads and predicts
    exactly as the trial's checkpoint does."""
    import mlflow
    import mlflow.pytorch

    from ancra_tune.checkpoint import load_model
    from ancra_tune.robustness import load_eval_data, seeded_subset
    from trainables.tracking import client, download_checkpoint

    out = subprocess.run([sys.executable, "-m", "trainables.cli", "best", "quickstart", "--tracking-uri", uri],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    finished = [t for t in summary["trials"] if t["status"] == "finished"]
    trusted = _trusted_finished(summary["trials"])
    top = max(t["robust_acc_worst"] for t in trusted)
    candidates = {str(t["trial_id"]) for t in trusted if t["robust_acc_worst"] == top}
    mc = client(uri)
    version = mc.get_model_version_by_alias("ancra-quickstart", "champion")
    run = mc.get_run(version.run_id)
    assert run.data.tags["ancra.trial_id"] in candidates
    assert f"ancra-quickstart version {version.version} with alias @champion" in out.stdout
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/ancra-quickstart@champion")
    trial = next(t for t in finished if str(t["trial_id"]) == run.data.tags["ancra.trial_id"])
    model, cfg, _ = load_model(Path(trial["checkpoint"], "checkpoint.pt"))
    x, y = load_eval_data(cfg, "val")
    with torch.no_grad():
        pred = loaded(x[:100])
        torch.testing.assert_close(pred, model(x[:100]).logits, rtol=1e-4, atol=1e-4)
    # `ancra-tune eval models:/...` evaluates the registered model's own training checkpoint.
    path, label = download_checkpoint(uri, "models:/ancra-quickstart@champion", tmp_path / "registered")
    assert label == f"ancra-quickstart v{version.version}"
    assert path.read_bytes() == Path(trial["checkpoint"], "checkpoint.pt").read_bytes()
    # Evaluated: its clean accuracy on the trial's evaluation examples is the logged one.
    idx = seeded_subset(x.shape[0], int(run.data.metrics["eval_n_examples"]), 0)
    with torch.no_grad():
        acc = (loaded(x[idx]).argmax(1) == y[idx]).float().mean().item()
    assert acc == pytest.approx(run.data.metrics["clean_acc"], abs=1e-6)


def test_two_workers_reproduce_one_workers_first_step(ray_local, tmp_path: Path) -> None:
    """DDP with half the batch each (and synchronised BatchNorm) = one worker with the whole batch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ancra_tune.checkpoint import load_checkpoint
    from ancra_tune.config import TrainConfig
    from ancra_tune.trainer import Trainer
    from trainables.worker import TrialPlan, train_loop_per_worker

    cfg = TrainConfig.from_dict({
        "data.dataset": "digits", "data.batch_size": 64, "data.train_limit": 64, "data.val_size": 0.1,
        "model.name": "small_cnn", "method.anc": False, "attack.init": "none", "attack.eps": 0.2,
        "attack.step_size": 0.05, "attack.steps": 3, "eval.pgd_steps": 0, "optim.epochs": 1, "optim.lr": 0.05,
        "progress": False, "out_dir": str(tmp_path / "single")})
    single = Trainer(cfg)
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    single_metrics = single.fit()

    results = {}
    for workers in (1, 2):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=TrialPlan(train=cfg, cpus_per_worker=0.5, sync_batchnorm=True).loop_config(),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(name=f"ddp{workers}", storage_path=str(tmp_path / "ray")))
        res = trainer.fit()
        with res.checkpoint.as_directory() as d:
            results[workers] = (res.metrics, load_checkpoint(Path(d) / "checkpoint.pt")["model"])
    for workers, (metrics, weights) in results.items():
        assert metrics["loss"] == pytest.approx(single_metrics["loss"], rel=1e-5), workers
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=f"{workers} workers: {k}")
    # And one step really moved the weights.
    assert not torch.equal(init["fc.weight"], results[2][1]["fc.weight"])


def test_a_local_instance_serves_its_metrics_on_loopback_only(ray_local) -> None:
    """Ray's Prometheus endpoints of a local sweep (each node's metrics export, the dashboard's,
    the autoscaler's) are not reachable from other machines."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    node = ray_local._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"
    ports = {node.metrics_export_port, DASHBOARD_METRIC_PORT, AUTOSCALER_METRIC_PORT}
    deadline = time.time() + 60
    while True:  # the agents bind their endpoints a few seconds after ray.init returns
        listening = [(ip, port) for ip, port in _listening_sockets(_descendants(os.getpid())) if port in ports]
        if node.metrics_export_port in {port for _, port in listening} or time.time() > deadline:
            break
        time.sleep(1)
    assert node.metrics_export_port in {port for _, port in listening}, listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening


def _descendants(pid: int) -> set[int]:
    """``pid``'s child processes, recursively (this instance's Ray processes; another may run)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo.extend(kids)
    return out


def _listening_sockets(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of the IPv4/IPv6 TCP sockets ``pids`` listen on, from /proc."""
    import ipaddress

    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            ip_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(ip_hex)
            if len(raw) == 4:
                ip = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = ipaddress.IPv6Address(words)
                ip = str(addr.ipv4_mapped or addr)
            out.append((ip, int(port_hex, 16)))
    return out


def test_infeasible_request_fails_fast(ray_local, tmp_path: Path) -> None:
    from trainables.ray_session import InfeasibleResourcesError
    from trainables.study import load_study
    from trainables.study_run import run_study

    f = _study_file(tmp_path, "base: quickstart\nresources: {workers: 2, cpus_per_worker: 4, trial_cpus: 1}\n")
    t = time.perf_counter()
    with pytest.raises(InfeasibleResourcesError) as e:
        run_study(load_study(f), storage=str(tmp_path / "s"))
    assert time.perf_counter() - t < 10
    assert "9 CPU" in str(e.value) and "2 CPU" in str(e.value)


def test_a_broken_tracking_store_stops_the_study_before_any_trial(ray_local, tmp_path: Path) -> None:
    """The store is opened while Ray starts; a file that is no MLflow store ends the study with a
    clear error before any trial runs (nothing under the study's storage but its lock's folder)."""
    from trainables.study import load_study
    from trainables.study_run import run_study
    from trainables.tracking import TrackingError

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrackingError) as e:
        run_study(load_study(QUICKSTART), storage=str(tmp_path / "s"), tracking_uri=f"sqlite:///{db}")
    assert f"cannot open the MLflow store sqlite:///{db}" in str(e.value)
    assert not list((tmp_path / "s").glob("quickstart/run_trial_*"))


ABLATION = """
name: lr_ablation
kind: ablation
base: quickstart
train: {optim.epochs: 2, data.train_limit: 256, attack.steps: 3, eval.pgd_steps: 3, eval.max_examples: 64,
        model.ra: false}
resources: {workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}
eval: {preset: quick, n_examples: 64, autoattack: null, square_queries: 20}
ablation:
  grid:
    optim.lr: [0.05, 1.0e+12]
seeds: [0, 1]
"""


@pytest.mark.slow
@pytest.mark.ci
def test_ablation_table_and_a_diverging_trial(ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lr = 1e12 diverges: reported as such with its epoch, while the other trials finish.
    With no tracking settings, MLflow runs land in mlflow.db in the working directory."""
    from trainables.study import load_study
    from trainables.study_run import run_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    study = load_study(_study_file(tmp_path, ABLATION))
    summary = run_study(study, storage=str(tmp_path / "studies"))
    trials = summary["trials"]
    assert len(trials) == 4
    for t in trials:
        if t["params"]["optim.lr"] > 1:
            assert t["status"] == "diverged" and t["diverged_epoch"] == 1
        else:
            assert t["status"] == "finished" and t["robust_acc_worst"] is not None
    out = Path(summary["study_dir"])
    csv = (out / "ablation.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert header[0] == "optim.lr" and {"clean_mean", "worst_mean", "worst_ci95_lo", "worst_ci95_hi", "worst_n",
                                        "worst_seeds", "autoattack_mean", "time_per_epoch_s"} <= set(header)
    assert len(csv) == 1 + 2  # header + one row per configuration
    md = (out / "ablation.md").read_text()
    assert "| configuration | seeds | n/seed | clean (%) |" in md and "**Power.**" in md
    assert "| optim.lr=0.05 | 2/2 |" in md and "| optim.lr=1000000000000.0 | 0/2 |" in md
    # Every finished trial's report (per-example outcomes included) is kept in the study folder.
    for t in trials:
        kept = out / "reports" / f"{t['trial_id']}.json"
        assert kept.is_file() == (t["status"] == "finished")
        if kept.is_file():
            assert t["report"] == f"reports/{t['trial_id']}.json"
            assert json.loads(kept.read_text()) == json.loads((Path(t["checkpoint"]) / "report.json").read_text())
    # The embedded default: a sqlite store and an artifact folder in the working directory.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert summary["mlflow"]["tracking_uri"] == uri and (tmp_path / "mlflow.db").is_file()
    from trainables.tracking import client

    mc = client(uri)
    parent, children = _mlflow_runs(uri, "lr_ablation", tmp_path / "studies" / "lr_ablation")
    assert parent.data.tags["ancra.study_kind"] == "ablation"
    assert {a.path for a in mc.list_artifacts(parent.info.run_id)} >= {"ablation.csv", "ablation.md",
                                                                       "summary.json", "study"}
    assert (tmp_path / "mlartifacts" / "lr_ablation").is_dir()
    assert len(children) == 4
    for run in children:
        lr, seed = float(run.data.params["optim.lr"]), int(run.data.params["seed"])
        assert seed in (0, 1)
        if lr > 1:
            assert run.info.status == "FAILED" and run.data.tags["ancra.status"] == "diverged"
            assert run.data.tags["ancra.diverged_epoch"] == "1"
        else:
            assert run.info.status == "FINISHED" and run.data.tags["ancra.status"] == "finished"
            assert "robust_acc_worst" in run.data.metrics and "ancra.model_uri" in run.data.tags
    _check_study_page(summary, parent.info.run_id, mc)


def _check_study_page(summary: dict, parent_run_id: str, mc) -> None:
    """`ancra-tune report` on the finished ablation: its numbers are the trials' own reports'."""
    import statistics

    from trainables.cli import main

    out = Path(summary["study_dir"])
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.md").read_text()
    assert "| configuration | seeds | n/seed | clean (%) | PGD-" in page and "## How this page was made" in page
    assert "asks for 2 configurations x 2 seeds = 4 runs; 2 finished, and only they are in the cells" in page
    table = json.loads((out / "report" / "table.json").read_text())
    rows = {r["config"]["optim.lr"]: r for r in table["rows"]}
    for lr, row in rows.items():
        group = sorted((t for t in summary["trials"] if t["params"]["optim.lr"] == lr),
                       key=lambda t: t["params"]["seed"])
        reports = [json.loads((Path(t["checkpoint"]) / "report.json").read_text())
                   for t in group if t["status"] == "finished"]
        assert row["trials"] == len(group) == 2 and row["finished"] == len(reports)
        if not reports:  # the diverged configuration
            assert row["worst"] is None and f"| optim.lr={lr} | 0/2 |" in page
            assert f"lr={lr:.3g} seed 0 (diverged); lr={lr:.3g} seed 1 (diverged)." in page
            continue
        worst = [r["robust_acc_worst"] for r in reports]
        cell = row["worst"]
        assert cell["mean"] == pytest.approx(statistics.fmean(worst)) and cell["per_seed"] == pytest.approx(worst)
        assert cell["std"] == pytest.approx(statistics.stdev(worst)) and cell["seeds"] == 2
        assert cell["n"] == reports[0]["n_examples"] and cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
        assert row["clean"]["mean"] == pytest.approx(statistics.fmean(r["clean_acc"] for r in reports))
        k = reports[0]["suite"]["pgd_steps"]  # PGD-k on P' as the paper measures (k = 40 there), not PGD-2k
        pgd = [next(a for a in r["attacks"] if a["name"] == f"pgd{k}_final")["accuracy"] for r in reports]
        assert row["pgd_final"]["mean"] == pytest.approx(statistics.fmean(pgd))
        assert f"{100 * cell['mean']:.1f} [{100 * cell['ci95'][0]:.1f}, {100 * cell['ci95'][1]:.1f}]" in page
    assert table["comparisons"] == []  # the only other configuration diverged: nothing to compare
    assert table["mde"] is not None and 0 < table["mde"] < 1
    logged = {a.path for a in mc.list_artifacts(parent_run_id, "report")}
    assert "report/report.md" in logged and "report/table.json" in logged
    # Exported (`ancra-tune export`: the summary, its reports/, the sessions and the study file in a
    # folder of their own, no checkpoint), the page is rebuilt from the export alone once the study
    # folder and the study file are gone (a lost machine): anyone reruns the tests.
    shipped = out.parent / "shipped"
    assert main(["export", str(out), "--to", str(shipped)]) == 0
    finished = [t for t in summary["trials"] if t["status"] == "finished"]
    manifest = json.loads((shipped / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"summary.json", "sessions.json", Path(summary["study_file"]).name,
                                      *(t["report"] for t in finished)} and manifest["evaluated"] == len(finished)
    assert not list(shipped.rglob("checkpoint*"))
    page_here = (out / "report" / "report.md").read_text()
    out.rename(out.parent / "moved")
    Path(summary["study_file"]).rename(Path(summary["study_file"]).with_suffix(".moved"))
    assert main(["export", "--check", str(shipped)]) == 0
    assert main(["report", str(shipped), "--no-mlflow"]) == 0
    assert json.loads((shipped / "report" / "table.json").read_text()) == table
    page = (shipped / "report" / "report.md").read_text()
    assert "<details><summary>study file</summary>" in page
    sessions_line = next(line for line in page_here.splitlines() if "session(s) ran" in line)
    assert sessions_line in page  # which code each session ran: from the exported sessions.json
    # A published table beside the rows (--beside): its row by the configuration it names.
    ref = shipped.parent / "ref.yaml"
    ref.write_text("title: a published table\nsetting: elsewhere\ncolumns: {Nat: clean accuracy}\n"
                   "measured_here: {Nat: [clean]}\n"
                   "rows: [{name: Theirs, when: {optim.lr: 0.05}, values: {Nat: 81.7}}]\n")
    assert main(["report", str(shipped), "--no-mlflow", "--beside", str(ref)]) == 0
    page = (shipped / "report" / "report.md").read_text()
    assert "## Beside: a published table" in page and "| optim.lr=0.05 | Theirs | 81.70 | " in page
    assert json.loads((shipped / "report" / "table.json").read_text()) == table  # the answer is unchanged


def _two_trial_cli(tmp_path: Path, name: str, *, epochs: int, storage: Path, tracking_uri: str,
                   train_limit: int = 256, workers: int = 1) -> tuple[Path, list[str]]:
    """ABLATION cut to two finishing trials (lr 0.05 and 0.02, seed 0) as a study file, and the
    `ancra-tune ablate` command that runs them one at a time (``workers``: Ray Train workers each)."""
    text = ABLATION.replace("lr_ablation", name).replace("optim.epochs: 2", f"optim.epochs: {epochs}")
    if workers > 1:
        text = text.replace("resources: {workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}",
                            f"resources: {{workers: {workers}, cpus_per_worker: {0.5 / workers}, trial_cpus: 0.5}}")
    text = text.replace("[0.05, 1.0e+12]", "[0.05, 0.02]").replace("seeds: [0, 1]", "seeds: [0]")
    text = text.replace("data.train_limit: 256", f"data.train_limit: {train_limit}")
    f = _study_file(tmp_path, text)
    return f, [sys.executable, "-m", "trainables.cli", "ablate", str(f), "--storage", str(storage),
               "--num-cpus", "1", "--tracking-uri", tracking_uri]  # one trial at a time


# CI runs test_study_end's Ctrl+C-then-resume study instead (the same path: test_guard checks that
# SIGTERM and SIGINT take it alike); ANCRA_RUN_SLOW=1 runs this one too.
@pytest.mark.slow
def test_interrupted_study_resumes_each_trial_once(ray_local, tmp_path: Path, mlflow_server: str) -> None:
    """Interrupt a study with SIGTERM (what `ray job stop` and schedulers send; Ctrl+C takes the same
    path) after its first trial ends: it is reported as interrupted (summary, parent run, the resume
    command, no run left RUNNING); --resume finishes the rest only, and MLflow ends with one parent
    run and one run per trial, each epoch and each summary metric logged once."""
    import ray

    ray.shutdown()  # the CLI process starts its own Ray
    try:
        storage = tmp_path / "studies"
        # Epochs long enough (~1.5 s here) that the second trial is seen running before it ends.
        f, cmd = _two_trial_cli(tmp_path, "resume_me", epochs=5, storage=storage, tracking_uri=mlflow_server,
                                train_limit=1024)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        study_dir = storage / "resume_me"
        deadline = time.time() + 400
        # Interrupt once one trial has finished and the next one is running: with one CPU the
        # next trial starts only after Tune has terminated the first, so the first is complete.
        finished_names: list[str] = []
        while time.time() < deadline and not finished_names:
            time.sleep(0.3)
            dirs = list(study_dir.glob("run_trial_*"))
            done = [td.name for td in dirs if any(r.get("final") == 1 for r in _results(td))]
            running = [td for td in dirs if td.name not in done and any("epoch" in r for r in _results(td))]
            if done and running:
                finished_names = done
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert finished_names, "no trial finished while another ran, in time"
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, stdout[-3000:]
        assert "interrupted (SIGTERM)" in stdout, stdout[-2000:]
        assert f"ancra-tune ablate {f} --storage {storage} --num-cpus 1 --tracking-uri {mlflow_server} --resume" \
            in stdout, stdout[-2000:]
        first = json.loads((study_dir / "summary.json").read_text())
        assert first["interrupted"] and first["interrupted_by"] == "SIGTERM"
        assert first["status_counts"]["interrupted"] == 1 and first["status_counts"]["stopped"] == 0
        from trainables.tracking import client

        mc = client(mlflow_server)
        parent, children = _mlflow_runs(mlflow_server, "resume_me", study_dir)
        assert parent.info.status == "KILLED" and parent.data.tags["ancra.status"] == "interrupted"
        assert "trials_finished" not in parent.data.metrics  # logged once, when the study ends
        assert all(r.info.status != "RUNNING" for r in children)
        assert {r.data.tags["ancra.status"] for r in children} <= {"finished", "interrupted"}
        done_before = {name: (study_dir / name / "result.json").read_text() for name in finished_names}
        assert 1 <= len(done_before) < 2
        out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        trial_dirs = sorted(study_dir.glob("run_trial_*"))
        assert len(trial_dirs) == 2
        for td in trial_dirs:
            rows = _results(td)
            # Each trial trained each epoch at most once and ended with its evaluation. A trial
            # stopped between its evaluation and its end is restarted by Tune with a fresh
            # result file: the Train run then only repeats its recorded evaluation.
            epochs = [r["epoch"] for r in rows if "epoch" in r and "final" not in r]
            assert epochs == sorted(set(epochs)), (td.name, epochs)  # no epoch twice
            finals = [r for r in rows if r.get("final") == 1]
            assert finals, (td.name, rows, out.stdout[-4000:])
            assert all(f["robust_acc_worst"] == finals[0]["robust_acc_worst"] for f in finals)
        for name, text in done_before.items():  # finished trials were not run again
            assert (study_dir / name / "result.json").read_text() == text
        summary = json.loads((study_dir / "summary.json").read_text())
        assert summary["status_counts"]["finished"] == 2 and not summary["interrupted"]
        parent, children = _mlflow_runs(mlflow_server, "resume_me", study_dir)
        assert parent.info.status == "FINISHED" and len(children) == 2
        assert parent.data.tags["ancra.status"] == "finished" and "ancra.resume" not in parent.data.tags
        for key in ("trials_finished", "wall_time_s", "best_robust_acc_worst"):
            assert len(mc.get_metric_history(parent.info.run_id, key)) == 1, key
        for run in children:
            steps = [m.step for m in mc.get_metric_history(run.info.run_id, "epoch_time_s")]
            assert sorted(steps) == [1, 2, 3, 4, 5], steps  # every epoch once, across the interruption
            assert run.info.status == "FINISHED" and run.data.tags["ancra.final_logged"] == "true"
            assert len(mc.get_metric_history(run.info.run_id, "robust_acc_worst")) == 1
    finally:
        from trainables.ray_session import init_ray

        init_ray(None, num_cpus=2)


@pytest.mark.slow
@pytest.mark.ci
def test_a_lost_study_goes_on_from_its_record(ray_local, tmp_path: Path, mlflow_server: str, capsys) -> None:
    """The study's folder is lost with its machine after a session in which one of its two trials was
    evaluated and the other stopped between its training and its evaluation: started again from its
    export (`--from-record`) and the state carried beside it (`--carry`), it brings the first trial and
    the session in, goes on with the other from its carried checkpoint (evaluated, never trained
    again), and ends with both in its summary, its status and its page."""
    import ray

    from trainables.cli import main

    ray.shutdown()  # the CLI process starts its own Ray
    try:
        storage = tmp_path / "studies"
        f, cmd = _two_trial_cli(tmp_path, "lost", epochs=1, storage=storage, tracking_uri=mlflow_server)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        study_dir = storage / "lost"
        summary = json.loads((study_dir / "summary.json").read_text())
        kept = next(t for t in summary["trials"] if t["params"]["optim.lr"] == 0.05)
        cut = next(t for t in summary["trials"] if t["params"]["optim.lr"] == 0.02)
        assert kept["status"] == cut["status"] == "finished"
        # As a session stopped while lr 0.02 was being evaluated leaves it: that trial interrupted, unreported,
        # its last checkpoint the one of its last epoch.
        from trainables.trial_rows import FINAL_NAME

        (study_dir / cut["report"]).unlink()
        trained = [c for c in sorted(Path(cut["trial_dir"]).glob("checkpoint_*")) if not (c / FINAL_NAME).exists()]
        assert trained, list(Path(cut["trial_dir"]).iterdir())
        cut_worst = cut["robust_acc_worst"]
        cut.update(status="interrupted", report=None, checkpoint=str(trained[-1]))
        (study_dir / "summary.json").write_text(json.dumps(summary))
        record, carry = tmp_path / "record", tmp_path / "carry"
        assert main(["export", str(study_dir), "--to", str(record), "--carry", str(carry)]) == 0
        assert "1 unfinished trial(s) carried" in capsys.readouterr().out
        shutil.rmtree(study_dir)  # the machine is lost

        changed = tmp_path / "changed.yaml"
        changed.write_text(f.read_text().replace("optim.epochs: 1", "optim.epochs: 2"))
        refused = subprocess.run([*cmd[:4], str(changed), *cmd[5:], "--from-record", str(record)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "is not the study file the record was made with" in refused.stderr
        assert not list(study_dir.glob("run_trial_*"))

        again = subprocess.run(cmd + ["--from-record", str(record), "--carry", str(carry)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "1 trial(s) and 1 session(s) from its record" in again.stderr and "; 1 to run, 1 of them going on " \
            "from the state carried" in again.stderr
        assert "finished*" in again.stdout and "* brought in from the study's record" in again.stdout
        trial_dirs = list(study_dir.glob("run_trial_*"))
        assert len(trial_dirs) == 1 and json.loads((trial_dirs[0] / "params.json").read_text())["optim.lr"] == 0.02
        final = json.loads((study_dir / "summary.json").read_text())
        assert final["status_counts"]["finished"] == 2 and final["n_trials"] == 2 and final["sessions"] == 2
        rows = {t["params"]["optim.lr"]: t for t in final["trials"]}
        assert rows[0.05]["imported"] and rows[0.05]["trial_id"] == kept["trial_id"]
        assert rows[0.05]["robust_acc_worst"] == kept["robust_acc_worst"]
        assert not rows[0.02].get("imported") and rows[0.02]["trial_id"] != cut["trial_id"]
        # It went on from its carried checkpoint: no epoch trained again, the same weights evaluated alike.
        assert rows[0.02]["carried_from"]["trial_id"] == cut["trial_id"]
        assert [r for r in _results(trial_dirs[0]) if "epoch" in r and "final" not in r] == []
        assert rows[0.02]["robust_acc_worst"] == cut_worst
        assert rows[0.02]["train_time_s"] >= cut["train_time_s"] > 0
        assert (study_dir / rows[0.05]["report"]).read_text() == (record / kept["report"]).read_text()
        assert (study_dir / rows[0.02]["report"]).is_file()
        assert final["wall_time_s"] > summary["wall_time_s"]  # the record's session counts
        capsys.readouterr()
        assert main(["status", str(f), "--storage", str(storage), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["counts"]["evaluated"] == 2 and status["counts"]["waiting"] == 0 and status["sessions"] == 2
        assert [t["now"] for t in status["trials"]].count("evaluated (from the study's record)") == 1
        assert main(["report", str(study_dir), "--no-mlflow"]) == 0
        table = json.loads((study_dir / "report" / "table.json").read_text())
        assert sorted((r["config"]["optim.lr"], r["finished"]) for r in table["rows"]) == [(0.02, 1), (0.05, 1)]
        # The folder is there now: going on is --resume's, not --from-record's.
        twice = subprocess.run(cmd + ["--from-record", str(record)], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
        assert twice.returncode == 2 and "holds a study already" in twice.stderr
    finally:
        from trainables.ray_session import init_ray

        init_ray(None, num_cpus=2)


def _crash_once_loop(config: dict, in_trial: bool = False) -> None:
    """The real worker loop (in a Train worker, or in the Tune trial itself), with one injected
    crash right after the first epoch's checkpoint."""
    from trainables import worker

    marker = Path(config["marker"])
    original = worker.RayReport.on_epoch_end

    def crashing(self, trainer, epoch, metrics, checkpoint):
        original(self, trainer, epoch, metrics, checkpoint)
        with Path(config["marker"] + ".epochs").open("a") as f:  # every epoch trained, in order
            f.write(f"{epoch + 1}\n")
        if epoch == 0 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected crash")

    worker.RayReport.on_epoch_end = crashing
    if in_trial:
        worker.run_worker(config[worker.TrialPlan.KEY], worker.TuneSession(use_gpu=False))
    else:
        worker.train_loop_per_worker(config)


def _two_epoch_reference(tmp_path: Path):
    """A tiny two-epoch config and its uninterrupted run, in this process."""
    from ancra_tune.config import TrainConfig
    from ancra_tune.trainer import Trainer

    cfg = TrainConfig.from_dict({
        "data.dataset": "digits", "data.batch_size": 64, "data.train_limit": 128, "data.val_size": 0.1,
        "model.name": "small_cnn", "attack.steps": 2, "attack.eps": 0.2, "attack.step_size": 0.1,
        "eval.pgd_steps": 0, "optim.epochs": 2, "optim.lr": 0.05, "progress": False,
        "out_dir": str(tmp_path / "single")})
    reference = Trainer(cfg)
    reference.fit()
    return cfg, reference


def _assert_same_weights(checkpoint, reference) -> None:
    from ancra_tune.checkpoint import load_checkpoint

    with checkpoint.as_directory() as d:
        weights = load_checkpoint(Path(d) / "checkpoint.pt")["model"]
    for k, v in reference.model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6, msg=k)


def test_crashed_worker_restarts_from_its_checkpoint(ray_local, tmp_path: Path) -> None:
    """FailureConfig restarts the worker group from the last checkpoint; the weights equal an
    uninterrupted run's."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainables.worker import TrialPlan

    # Ray workers cannot import this test module: ship the loop by value.
    _crash_once_loop.__module__ = "__main__"
    cfg, reference = _two_epoch_reference(tmp_path)
    trainer = TorchTrainer(
        _crash_once_loop,
        train_loop_config=TrialPlan(train=cfg, cpus_per_worker=1.0).loop_config(marker=str(tmp_path / "crashed")),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.0}),
        run_config=ray.train.RunConfig(name="crash", storage_path=str(tmp_path / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=1)))
    result = trainer.fit()
    assert (tmp_path / "crashed").exists()  # the crash happened
    assert result.metrics["epoch"] == 2
    assert _trained_epochs(tmp_path) == [1, 2]  # resumed from epoch 1's checkpoint, not retrained
    _assert_same_weights(result.checkpoint, reference)


@contextlib.contextmanager
def _small_disk(path: Path, mib: int):
    """A real filesystem of ``mib`` MiB at ``path`` (a tmpfs; needs root), unmounted afterwards."""
    path.mkdir(parents=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({out.stderr.decode().strip()[:200]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# 3-4 min here: ANCRA_RUN_SLOW=1. CI checks the same guard without Ray (test_guard: the study stops
# once, as a signal would, and does not start or resume below the reserve).
@pytest.mark.slow
def test_a_full_disk_stops_the_study_and_resume_finishes_it(ray_local, tmp_path: Path, mlflow_server: str) -> None:
    """The study's disk fills up mid-study (a real 96 MiB filesystem, filled by another file): the
    study stops with a clear message, its MLflow runs end FAILED (none RUNNING); resuming on the still
    full disk is refused at once; once space is back --resume finishes it, every epoch in MLflow once."""
    import ray

    ray.shutdown()  # the CLI process starts its own Ray
    try:
        with _small_disk(tmp_path / "disk", 96) as disk:
            storage = disk / "studies"
            f, cmd = _two_trial_cli(tmp_path, "full_disk", epochs=4, storage=storage, tracking_uri=mlflow_server,
                                    train_limit=1024)
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "ANCRA_DISK_RESERVE_MB": "32"}
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            study_dir = storage / "full_disk"
            deadline = time.time() + 300
            while time.time() < deadline and not list(study_dir.glob("run_trial_*/checkpoint_*")):
                time.sleep(0.2)
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            # Another program takes the disk: 24 MiB stay free, less than the 32 the study keeps.
            free = shutil.disk_usage(disk).free
            filler = disk / "filler.bin"
            with filler.open("wb") as fh:
                fh.truncate(free - 24 * 2**20)
                os.posix_fallocate(fh.fileno(), 0, free - 24 * 2**20)
            stdout, _ = proc.communicate(timeout=180)
            assert proc.returncode == 1, stdout[-3000:]
            assert "disk full" in stdout and "--resume" in stdout, stdout[-3000:]
            first = json.loads((study_dir / "summary.json").read_text())
            assert first["interrupted"] and first["interrupted_by"] == "disk full"
            assert first["status_counts"]["interrupted"] >= 1
            parent, children = _mlflow_runs(mlflow_server, "full_disk", study_dir)
            assert parent.info.status == "FAILED" and parent.data.tags["ancra.status"] == "disk_full"
            assert "full disk" in parent.data.tags["ancra.resume"]
            assert all(r.info.status != "RUNNING" for r in children)
            assert {r.info.status for r in children if r.data.tags["ancra.status"] == "interrupted"} == {"FAILED"}
            # Still full: refused before Ray starts, saying how much is free.
            out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and "MiB free" in out.stderr and "ANCRA_DISK_RESERVE_MB" in out.stderr, \
                out.stderr[-2000:]
            filler.unlink()  # space is back
            out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            summary = json.loads((study_dir / "summary.json").read_text())
            assert summary["status_counts"]["finished"] == 2 and not summary["interrupted"]
            from trainables.tracking import client

            mc = client(mlflow_server)
            parent, children = _mlflow_runs(mlflow_server, "full_disk", study_dir)
            assert parent.info.status == "FINISHED" and len(children) == 2
            for run in children:
                steps = [m.step for m in mc.get_metric_history(run.info.run_id, "epoch_time_s")]
                assert sorted(steps) == [1, 2, 3, 4], steps  # every epoch once, across the stop
                assert run.info.status == "FINISHED"
                assert len(mc.get_metric_history(run.info.run_id, "robust_acc_worst")) == 1
    finally:
        from trainables.ray_session import init_ray

        init_ray(None, num_cpus=2)


@pytest.mark.slow  # the mid-epoch crash test below restarts such a trial too, and runs everywhere
def test_crashed_in_process_trial_restarts_from_its_checkpoint(ray_local, tmp_path: Path) -> None:
    """Tune's FailureConfig restarts a trial that trains in its own process from its last epoch's
    checkpoint; the weights equal an uninterrupted run's, each epoch is reported once."""
    from ray import tune

    from trainables.worker import TrialPlan

    _crash_once_loop.__module__ = "__main__"
    cfg, reference = _two_epoch_reference(tmp_path)
    config = TrialPlan(train=cfg, cpus_per_worker=1.0).loop_config(marker=str(tmp_path / "crashed"))
    tuner = tune.Tuner(tune.with_resources(lambda c: _crash_once_loop(config, in_trial=True), {"CPU": 1}),
                       run_config=tune.RunConfig(name="crash", storage_path=str(tmp_path / "ray"), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=1)))
    result = tuner.fit()[0]
    assert result.error is None and (tmp_path / "crashed").exists()  # it crashed, and recovered
    assert result.metrics["epoch"] == 2
    # Resumed, not retrained: epoch 1 (before the crash) and epoch 2 (after it), each once. (Not
    # from Tune's result.json: a restarted trial's file may keep only the epochs since the restart.)
    assert _trained_epochs(tmp_path) == [1, 2]
    _assert_same_weights(result.checkpoint, reference)


def _crash_mid_epoch_loop(config: dict) -> None:
    """The real worker loop in a Tune trial, with its mid-epoch checkpoint in the trial's storage and
    one injected crash right after the second epoch's first mid-epoch checkpoint; what each start's
    ``resume_partial`` found is written beside the marker."""
    import dataclasses
    import io

    from trainables import worker

    marker = Path(config["marker"])
    write, resume = worker.StoragePartial.write, worker.Trainer.resume_partial

    def crashing(self, data):
        write(self, data)
        if torch.load(io.BytesIO(data), weights_only=True)["epoch"] == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected crash mid-epoch")

    def recording(self):
        found = resume(self)
        with Path(config["marker"] + ".resumed").open("a") as f:
            f.write(f"{self.start_epoch} {self._partial_state['step'] if found else -1}\n")
        return found

    worker.StoragePartial.write, worker.Trainer.resume_partial = crashing, recording
    plan = dataclasses.replace(config[worker.TrialPlan.KEY], folder=worker.trial_folder())
    worker.run_worker(plan, worker.TuneSession(use_gpu=False))


def test_a_trial_crashed_mid_epoch_restarts_at_its_step(ray_local, tmp_path: Path) -> None:
    """A trial's mid-epoch checkpoint lives in its folder of the study's storage: Tune restarts the
    crashed trial from its last epoch's checkpoint and the worker goes on from the step the mid-epoch
    one reached, ending with an uninterrupted run's weights; none is left behind."""
    from ray import tune

    from ancra_tune.robustness import SuiteConfig
    from trainables.worker import TrialPlan

    _crash_mid_epoch_loop.__module__ = "__main__"
    cfg, reference = _two_epoch_reference(tmp_path)
    cfg = cfg.replace(checkpoint_every_s=1e-9)  # due at once: after the first step of every epoch
    suite = SuiteConfig(eps=0.2, pgd_steps=2, cw_steps=2, mim_steps=2, sweep_steps=2, apgd_iters=2, square_queries=5,
                        autoattack=None, n_examples=32, batch_size=16, features=False)
    config = TrialPlan(train=cfg, suite=suite, objective=("robust_acc_worst",), modes=("max",),
                       cpus_per_worker=1.0).loop_config(marker=str(tmp_path / "crashed"))
    tuner = tune.Tuner(tune.with_resources(lambda c: _crash_mid_epoch_loop(config), {"CPU": 1}),
                       run_config=tune.RunConfig(name="crash", storage_path=str(tmp_path / "ray"), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=1)))
    result = tuner.fit()[0]
    assert result.error is None and (tmp_path / "crashed").exists()  # it crashed, and recovered
    assert result.metrics["eval_n_examples"] == 32 and result.metrics["train_time_s"] > 0  # trained, then evaluated
    assert result.metrics["timing.eval_batches_resumed"] == 0
    # The trial held one of the two CPUs: the other, free, took its evaluation's second batch.
    assert result.metrics["timing.eval_batches_helped"] == 1
    # First start: nothing to resume; the restart: epoch 2 (index 1) from its step 1.
    assert (tmp_path / "crashed.resumed").read_text().split("\n")[:2] == ["0 -1", "1 1"]
    _assert_same_weights(result.checkpoint, reference)
    assert not list((tmp_path / "ray").rglob("partial_epoch.pt*"))  # gone once epoch 2 was out
    assert not list((tmp_path / "ray").rglob("eval_batches"))  # gone once the evaluation was reported


def _trained_epochs(tmp_path: Path) -> list[int]:
    return [int(e) for e in (tmp_path / "crashed.epochs").read_text().split()]


CONCURRENT = """
name: {name}
base: quickstart
train: {{optim.epochs: 3, data.train_limit: 128, attack.steps: 2, eval.pgd_steps: 2, eval.max_examples: 32}}
resources: {{workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}}
eval: {{preset: quick, n_examples: 32, autoattack: null, square_queries: 10, apgd_iters: 2, apgd_targets: 1,
        adaptive_steps: 2, pgd_steps: 2, cw_steps: 2, mim_steps: 2, sweep_steps: 2, features: false}}
search:
  num_samples: 4
  space: {{optim.lr: {{low: 0.0001, high: 0.3, log: true}}}}
scheduler: {{type: asha, metric: val_clean_acc, grace_period: 1, reduction_factor: 2}}
"""


@pytest.mark.slow
def test_two_sweeps_at_once_on_one_machine_both_finish(tmp_path: Path) -> None:
    """Two local Ray instances side by side (two sweeps in two terminals): ASHA-stopped trials must
    release their workers in each, so both studies finish (each Ray instance uses its own API server)."""
    import ray

    ray.shutdown()  # the two CLI processes start their own instances
    try:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        procs = []
        for name in ("left", "right"):
            f = _study_file(tmp_path, CONCURRENT.format(name=name), f"{name}.yaml")
            cmd = [sys.executable, "-m", "trainables.cli", "sweep", str(f), "--storage", str(tmp_path / "studies"),
                   "--num-cpus", "1", "--no-mlflow"]
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for name, p, out in zip(("left", "right"), procs, outs, strict=True):
            assert p.returncode == 0, out[-3000:]
            summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
            assert summary["n_trials"] == 4 and summary["status_counts"]["error"] == 0, summary["status_counts"]
            assert summary["status_counts"]["stopped"] >= 1  # the case that used to hang
            assert summary["status_counts"]["finished"] >= 1
    finally:
        from trainables.ray_session import init_ray

        init_ray(None, num_cpus=2)


MULTI_WORKER = CONCURRENT.format(name="multi_worker").replace(
    "resources: {workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}",
    "resources: {workers: 2, cpus_per_worker: 0.25, trial_cpus: 0.25}")


@pytest.mark.slow  # 2.5 min (four two-worker trials): run with ANCRA_RUN_SLOW=1; CI runs the board's own test
def test_a_multi_worker_trial_asha_stops_trains_no_epoch_more(ray_local, tmp_path: Path, mlflow_server: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials of two Ray Train workers (DDP): their workers report through Train's controller and
    used to train (and log to MLflow) the epoch after the one ASHA stopped them at, while a busy
    driver (here: 2 s per epoch result) got round to stopping them. Now every worker waits for the
    decision: MLflow holds exactly the epochs Tune counts, stopped or not."""
    from trainables import console
    from trainables.study import load_study
    from trainables.study_run import run_study
    from trainables.tracking import client

    console_line = console.TrialLines.on_trial_result

    def busy_driver(self, *args, **kwargs):  # before the scheduler's decision reaches the trial
        time.sleep(2)
        return console_line(self, *args, **kwargs)

    monkeypatch.setattr(console.TrialLines, "on_trial_result", busy_driver)
    study = load_study(_study_file(tmp_path, MULTI_WORKER))
    assert study.resources.workers == 2 and not study.resources.train_in_trial
    summary = run_study(study, storage=str(tmp_path / "studies"), tracking_uri=mlflow_server)
    counts = summary["status_counts"]
    assert summary["n_trials"] == 4 and counts["error"] == 0, counts
    assert counts["stopped"] >= 1 and counts["finished"] >= 1, counts
    mc = client(mlflow_server)
    _, children = _mlflow_runs(mlflow_server, study.name, Path(summary["study_dir"]))
    by_trial = {r.data.tags["ancra.trial_id"]: r for r in children}
    for t in summary["trials"]:
        tune_epochs = [r["epoch"] for r in _results(t["trial_dir"]) if _is_epoch_row(r)]
        assert tune_epochs == list(range(1, t["epochs_run"] + 1))
        logged = sorted(m.step for m in mc.get_metric_history(by_trial[str(t["trial_id"])].info.run_id,
                                                               "epoch_time_s"))
        assert logged == tune_epochs, (t["status"], logged, tune_epochs)  # not one epoch more
        assert (t["epochs_run"] == 3) == (t["status"] == "finished"), t
    for t in summary["trials"]:
        if t["status"] == "finished":  # the workers' wait for decisions is accounted for
            timing = json.loads(Path(t["trial_dir"], "timing.json").read_text())
            assert 0 < timing["decision_wait_s"] < timing["fit_end"] - timing["fit_start"]


def test_the_decision_board_answers_waiting_workers(ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    """The board answers a decision posted before or after a worker asks; without an answer, or
    without a board, a worker goes on (a study can never hang on it)."""
    import threading

    from trainables.stop_relay import TIMEOUT_ENV, Waiter, start_board

    monkeypatch.setenv(TIMEOUT_ENV, "1")
    assert not Waiter("decisions-absent", "t0").stopped_at(1)  # no board: go on
    board = start_board("decisions-test")
    ray_local.get(board.decide.remote("t1", 1, False))
    ray_local.get(board.decide.remote("t1", 2, True))
    waiter = Waiter("decisions-test", "t1")
    assert waiter.stopped_at(1) is False and waiter.stopped_at(2) is True
    assert waiter.stopped_at(3) is False and waiter.waited_s >= 1  # no decision in time: go on
    later = threading.Timer(0.5, lambda: board.decide.remote("t2", 1, True))
    later.start()
    assert Waiter("decisions-test", "t2").stopped_at(1) is True  # woken by a decision that came later
    ray_local.kill(board)


def _is_epoch_row(row: dict) -> bool:
    from trainables.trial_rows import is_epoch

    return is_epoch(row) and row.get("epoch") is not None


@pytest.mark.slow
def test_a_sweep_runs_on_when_rays_dashboard_does_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capfd) -> None:
    """Ray's dashboard dies at start-up (here: every start with it fails): the local sweep starts
    Ray without it, says so, and finishes, ASHA-stopped trials included. (Slow: without the API
    server, Ray Train waits minutes before the next trials' workers start.)"""
    import ray

    from trainables.ray_session import API_SERVER_ENV, init_ray
    from trainables.study import load_study
    from trainables.study_run import run_study

    ray.shutdown()
    real_init = ray.init

    def dashboard_dies(*args, **kwargs):
        if kwargs.get("include_dashboard"):
            raise RuntimeError("the dashboard process exited at start-up")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", dashboard_dies)
    try:
        study = load_study(_study_file(tmp_path, CONCURRENT.format(name="no_dashboard")))
        summary = run_study(study, storage=str(tmp_path / "studies"), track=False, num_cpus=2)
        assert "the sweep runs without it" in capfd.readouterr().err
        assert API_SERVER_ENV not in os.environ
        assert summary["n_trials"] == 4 and summary["status_counts"]["error"] == 0, summary["status_counts"]
        assert summary["status_counts"]["stopped"] >= 1 and summary["status_counts"]["finished"] >= 1
    finally:
        monkeypatch.undo()
        ray.shutdown()
        init_ray(None, num_cpus=2)


@pytest.mark.slow
@pytest.mark.ci
def test_tracking_outage_costs_no_training(ray_local, tmp_path: Path) -> None:
    """The MLflow server dies after the first epoch is logged and stays down to the end: every trial
    still trains and is evaluated, the console says so, no tracking call stalls the study; once the
    server is back, --resume delivers what was held back: every epoch and evaluation exactly once, one
    run per trial."""
    _tracking_outage(tmp_path, workers=1)


@pytest.mark.slow  # minutes here (Ray Train worker groups): ANCRA_RUN_SLOW=1
def test_tracking_outage_with_two_worker_trials_leaves_one_run_per_trial(ray_local, tmp_path: Path) -> None:
    """The same with trials of two Ray Train workers each: where a second, empty run of a trial
    appeared (every rank and the trial process created runs)."""
    _tracking_outage(tmp_path, workers=2)


def _tracking_outage(tmp_path: Path, *, workers: int) -> None:
    import socket

    import ray

    from trainables.tracking import client, serve_ui

    ray.shutdown()  # the CLI process starts its own Ray
    root = tmp_path / "server"
    root.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = f"sqlite:///{root / 'mlflow.db'}"
    uri = f"http://127.0.0.1:{port}"
    storage = tmp_path / "studies"
    f, cmd = _two_trial_cli(tmp_path, "outage", epochs=4, storage=storage, tracking_uri=uri, workers=workers)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        with serve_ui(backend, port=port, timeout=120, log_file=root / "server1.log"):
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            deadline = time.time() + 300
            while time.time() < deadline:  # wait for the first epoch in MLflow
                exp = client(uri).get_experiment_by_name("outage")
                runs = client(uri).search_runs([exp.experiment_id]) if exp else []
                if any(client(uri).get_metric_history(r.info.run_id, "epoch_time_s") for r in runs):
                    break
                time.sleep(0.5)
            else:
                pytest.fail("no epoch reached MLflow in time")
        t_down = time.time()  # the server is down from here to the end of the study
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        assert time.time() - t_down < 300, "tracking calls stalled the study"
        assert "MLflow (" in out and "is unreachable" in out, out[-3000:]
        # At its end the driver probed the server (seconds) rather than wait out MLflow's retries of
        # each call (4 minutes measured before it did).
        assert "is unreachable (no answer to 3 probes 5 s apart)" in out and "Retrying (Retry(" not in out, out[-3000:]
        summary = json.loads((storage / "outage" / "summary.json").read_text())
        assert summary["status_counts"]["finished"] == 2 and summary["mlflow"].get("undelivered")
        with serve_ui(backend, port=port, timeout=120, log_file=root / "server2.log"):
            again = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
            assert "delivered the records of" in again.stderr, again.stderr[-2000:]
            mc = client(uri)
            parent, children = _mlflow_runs(uri, "outage", storage / "outage")
            assert parent.info.status == "FINISHED" and len(children) == 2
            assert len({r.data.tags["ancra.trial_id"] for r in children}) == 2  # one run per trial
            # Rank 0 tags where each process ran (the driver, creating a run an outage kept rank 0 from, cannot).
            nodes = {"ray.node.trial", *(f"ray.node.rank{k}" for k in range(workers))}
            assert any(nodes <= set(r.data.tags) for r in children), [r.data.tags for r in children]
            for run in children:
                steps = sorted(m.step for m in mc.get_metric_history(run.info.run_id, "epoch_time_s"))
                assert steps == [1, 2, 3, 4], steps  # every epoch, once
                assert len(mc.get_metric_history(run.info.run_id, "robust_acc_worst")) == 1
                assert run.data.tags["ancra.final_logged"] == "true" and run.info.status == "FINISHED"
                assert len(mc.search_logged_models([run.info.experiment_id],
                                                   filter_string=f"source_run_id = '{run.info.run_id}'")) == 1
    finally:
        from trainables.ray_session import init_ray

        init_ray(None, num_cpus=2)
