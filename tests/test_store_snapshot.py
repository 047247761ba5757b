"""The tracking store outlives the machine it runs on: a snapshot of a sqlite MLflow store taken
while a real MLflow server writes to it, restored into a fresh location, serves the same runs,
metrics, tags, registered model and alias (what a new cluster head does after a spot reclaim)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trainables import store_snapshot as snap
from trainables import tracking as tr

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(db: Path, artifacts: Path, log: Path):
    """`mlflow server` on ``db`` with artifacts in ``artifacts`` (the bucket, which outlives the head)."""
    import contextlib

    @contextlib.contextmanager
    def run():
        port = _port()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}", "--host",
               "127.0.0.1", "--port", str(port), "--workers", "1", "--artifacts-destination", artifacts.as_uri()]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                tr.wait_for_server(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
                yield f"http://127.0.0.1:{port}"
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
    return run()


def _store(*args: str, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainables.cli", "store", *args, "--tracking-uri", uri], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _state(uri: str, exp_name: str) -> dict:
    """Everything a user sees of the experiment: runs with status, params, tags, metric histories."""
    mc = tr.client(uri)
    exp = mc.get_experiment_by_name(exp_name)
    out = {}
    for r in mc.search_runs([exp.experiment_id], max_results=1000):
        hist = {k: [(m.step, m.value) for m in sorted(mc.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                for k in r.data.metrics}
        tags = {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.log-model")}
        out[r.info.run_id] = {"status": r.info.status, "params": r.data.params, "tags": tags, "metrics": hist}
    return out


def test_a_snapshot_taken_while_the_server_writes_restores_runs_metrics_tags_and_aliases(tmp_path: Path) -> None:
    head, bucket = tmp_path / "head", tmp_path / "bucket"
    head.mkdir()
    (bucket / "artifacts").mkdir(parents=True)
    db = head / "mlflow.db"
    local_uri = f"sqlite:///{db}"
    with _serve(db, bucket / "artifacts", tmp_path / "server1.log") as url:
        mc = tr.client(url)
        exp = tr.ensure_experiment(mc, "durable", url)
        parent = mc.create_run(exp, tags={tr.ROLE: "study", tr.STATUS: "finished"}, run_name="durable").info.run_id
        children = []
        for i in range(3):
            rid = mc.create_run(exp, tags={tr.PARENT: parent, tr.TRIAL_ID: f"t{i}", tr.ROLE: "trial"}).info.run_id
            tr.log_params(mc, rid, {"method.alpha": i / 2, "model.ra": i % 2 == 0})
            for epoch in range(1, 4):
                tr.log_metrics(mc, rid, {"val_robust_acc": 0.1 * epoch + i, "loss": 2.0 / epoch}, step=epoch)
            mc.set_tag(rid, "check.robust_not_above_clean", "pass")
            mc.set_terminated(rid, status="FINISHED" if i else "KILLED")
            children.append(rid)
        mc.set_terminated(parent)
        artifact = tmp_path / "report.json"
        artifact.write_text(json.dumps({"robust_acc_worst": 0.25}))
        mc.log_artifact(children[1], str(artifact), artifact_path="evaluation")
        mc.create_registered_model("ancra-durable")
        version = mc.create_model_version("ancra-durable", source=f"runs:/{children[1]}/evaluation",
                                          run_id=children[1])
        mc.set_registered_model_alias("ancra-durable", tr.CHAMPION, version.version)
        before = _state(url, "durable")

        # The server goes on writing while the snapshot is taken: the snapshot holds one moment.
        stop = threading.Event()

        def writer() -> None:
            rid = mc.create_run(exp, tags={tr.PARENT: parent, tr.TRIAL_ID: "busy", tr.ROLE: "trial"}).info.run_id
            step = 0
            while not stop.is_set():
                step += 1
                tr.log_metrics(mc, rid, {"epoch_time_s": float(step)}, step=step)

        busy = threading.Thread(target=writer)
        busy.start()
        try:
            out = _store("snapshot", "--to", str(bucket / "mlflow" / "mlflow.db"), uri=local_uri)
        finally:
            stop.set()
            busy.join()
        assert out.returncode == 0, out.stderr
        assert "snapshot of" in out.stdout
    # The head is gone with its disk.
    for p in head.iterdir():
        p.unlink()
    fresh = tmp_path / "new_head" / "mlflow.db"
    out = _store("restore", "--from", str(bucket / "mlflow" / "mlflow.db"), uri=f"sqlite:///{fresh}")
    assert out.returncode == 0 and "restored" in out.stdout, out.stdout + out.stderr
    manifest = json.loads((bucket / "mlflow" / "mlflow.db.json").read_text())
    assert manifest["bytes"] == fresh.stat().st_size
    with _serve(fresh, bucket / "artifacts", tmp_path / "server2.log") as url:
        after = _state(url, "durable")
        busy_runs = [rid for rid, r in after.items() if r["tags"].get(tr.TRIAL_ID) == "busy"]
        assert {rid: r for rid, r in after.items() if rid not in busy_runs} == before
        if busy_runs:  # caught mid-write: a consistent prefix of its epochs, each once
            steps = [s for s, _ in after[busy_runs[0]]["metrics"].get("epoch_time_s", [])]
            assert steps == list(range(1, len(steps) + 1))
        mc = tr.client(url)
        champion = mc.get_model_version_by_alias("ancra-durable", tr.CHAMPION)
        assert champion.version == version.version and champion.run_id == children[1]
        got = mc.download_artifacts(children[1], "evaluation/report.json", str(tmp_path))
        assert json.loads(Path(got).read_text()) == {"robust_acc_worst": 0.25}  # the bucket kept it
    # A store that exists is newer than any snapshot of it: left alone unless --force.
    again = _store("restore", "--from", str(bucket / "mlflow" / "mlflow.db"), uri=f"sqlite:///{fresh}")
    assert again.returncode == 0 and "nothing restored" in again.stdout and "exists" in again.stdout


def test_a_snapshot_is_checked_and_repeated_only_when_the_store_changed(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x integer)")
    con.commit()
    dest = str(tmp_path / "bucket" / "mlflow.db")
    stop = threading.Event()
    said: list[str] = []
    loop = threading.Thread(target=lambda: said.append(str(snap.snapshot_every(
        Path(db), dest, every_s=0.05, stop=stop, log=said.append))))
    loop.start()
    try:
        for _ in range(200):  # the first snapshot
            if Path(dest).is_file():
                break
            threading.Event().wait(0.05)
        first = len([m for m in said if m.startswith("snapshot")])
        threading.Event().wait(0.3)  # unchanged: nothing more is copied
        assert len([m for m in said if m.startswith("snapshot")]) == first == 1
        con.execute("insert into t values (1)")
        con.commit()
        for _ in range(200):
            if len([m for m in said if m.startswith("snapshot")]) == 2:
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        loop.join(timeout=10)
    con.close()
    assert said[-1] == "2"
    restored = tmp_path / "restored.db"
    assert snap.restore(dest, restored) is not None
    assert sqlite3.connect(restored).execute("select x from t").fetchall() == [(1,)]
    # A snapshot that does not match its manifest (cut short, or another file) is refused.
    Path(dest).write_bytes(Path(dest).read_bytes()[:-100])
    with pytest.raises(snap.SnapshotError, match="checksum"):
        snap.restore(dest, tmp_path / "other.db")
    assert not (tmp_path / "other.db").exists()
    assert snap.restore(str(tmp_path / "nothing.db"), tmp_path / "new.db") is None  # no snapshot yet


@pytest.mark.slow  # 30-45 s (two MLflow servers, a head killed): ANCRA_RUN_SLOW=1; CI runs the snapshot test above
def test_the_heads_mlflow_script_restores_the_store_on_a_new_head(tmp_path: Path) -> None:
    """scripts/mlflow_head.sh, as cluster.yaml runs it at `ray up`: sqlite store, snapshots to the
    bucket; the head is lost with its disk; a new head's `ray up` restores the store before its
    server starts, and the run logged on the old head is there."""
    bucket = tmp_path / "bucket"
    (bucket / "artifacts").mkdir(parents=True)
    port = _port()

    def head(home: Path, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HOME": str(home), "ANCRA_MLFLOW_HOST": "127.0.0.1", "ANCRA_MLFLOW_PORT": str(port),
               "ANCRA_MLFLOW_ARTIFACTS": (bucket / "artifacts").as_uri(),
               "ANCRA_MLFLOW_SNAPSHOT": str(bucket / "store" / "mlflow.db"), "ANCRA_MLFLOW_SNAPSHOT_EVERY_S": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.run(["bash", str(ROOT / "scripts" / "mlflow_head.sh"), *args], env=env, cwd=home,
                              capture_output=True, text=True, timeout=180)

    old, new = tmp_path / "old_head", tmp_path / "new_head"
    old.mkdir()
    new.mkdir()
    url = f"http://127.0.0.1:{port}"
    try:
        up = head(old)
        assert up.returncode == 0 and "snapshots to" in up.stdout, up.stdout + up.stderr
        tr.wait_for_server(url, timeout=120)
        mc = tr.client(url)
        exp = tr.ensure_experiment(mc, "kept", url)
        rid = mc.create_run(exp, tags={tr.ROLE: "study"}).info.run_id
        tr.log_metrics(mc, rid, {"robust_acc_worst": 0.42}, step=0)
        logged = time.time()
        manifest = bucket / "store" / "mlflow.db.json"
        for _ in range(120):  # a snapshot taken after the run was logged
            if manifest.exists() and json.loads(manifest.read_text())["taken_at"] > logged:
                break
            threading.Event().wait(0.5)
        else:
            pytest.fail("no snapshot after the run was logged")
        # The head dies (SIGKILL: no last snapshot) and its disk with it.
        for name in ("server", "snapshot"):
            pid = int((old / ".ancra-mlflow" / f"{name}.pid").read_text())
            os.killpg(pid, 9)  # each runs in a session (process group) of its own
        import shutil

        shutil.rmtree(old)
        for _ in range(60):  # nothing of the old head answers any more
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            threading.Event().wait(0.5)
        else:
            pytest.fail("the old head's server still answers")
        up = head(new)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "restored" in up.stdout, up.stdout
        tr.wait_for_server(url, timeout=120)
        assert (new / "mlflow.db").is_file()
        run = tr.client(url).get_run(rid)
        assert run.data.metrics["robust_acc_worst"] == 0.42 and run.data.tags[tr.ROLE] == "study"
        head(new, "stop")  # stops the whole server (and takes a last snapshot)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "stop left the server running"
    finally:
        for home in (old, new):
            if home.exists():
                head(home, "stop")
