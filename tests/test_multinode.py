"""A real two-node Ray cluster on one machine: `ray start --head` and `ray start --address`.

Token authentication stays on: the head, the second node and the driver share one token
through ``RAY_AUTH_TOKEN``. Marked ``multinode`` (CI runs it); both nodes are stopped with
`ray stop` even when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    """Ports a node opens on fixed defaults: two nodes on one machine need their own."""
    a, b, c, d, e = _free_ports(5)
    return [f"--dashboard-agent-listen-port={a}", f"--dashboard-agent-grpc-port={b}", f"--metrics-export-port={c}",
            f"--runtime-env-agent-port={d}", f"--node-manager-port={e}"]


@pytest.fixture
def two_node_cluster() -> Iterator[dict]:
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths are length-limited
    port, dashboard = _free_ports(2)
    address = f"127.0.0.1:{port}"
    head = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--num-gpus=0", '--resources={"head_node": 1}', f"--temp-dir={temp}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", "--disable-usage-stats", *_node_ports()]
    worker = [ray_bin, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              "--num-gpus=0", '--resources={"worker_node": 1}', *_node_ports()]
    try:
        for cmd in (head, worker):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        yield {"address": address, "env": env}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _nodes(address: str, env: dict[str, str]) -> dict[str, dict]:
    """The alive nodes' resources, asked by a separate driver (Ray reads its auth mode at import)."""
    code = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_study_spreads_over_two_nodes_with_shared_storage_and_mlflow(two_node_cluster: dict, tmp_path: Path,
                                                                      mlflow_server: str) -> None:
    address, env = two_node_cluster["address"], two_node_cluster["env"]
    nodes = _nodes(address, env)
    assert len(nodes) == 2
    head_id = next(i for i, r in nodes.items() if "head_node" in r)
    worker_id = next(i for i, r in nodes.items() if "worker_node" in r)
    shared = tmp_path / "shared"  # both nodes see it: the stand-in for the cluster's bucket
    # Two trials of 1.5 CPU (2 Train workers of 0.5 + 0.5 for the trial) on nodes of 1 and 2 CPUs:
    # running both at once needs both nodes.
    study = tmp_path / "quickstart.yaml"
    study.write_text((ROOT / "search_spaces" / "quickstart.yaml").read_text().replace(
        "  workers: 1                # one Ray Train worker per trial: two trials fit a 2-core laptop at once",
        "  workers: 2"))
    out = subprocess.run([sys.executable, "-m", "trainables.cli", "sweep", str(study),
                          "--smoke-test", "--address", address, "--storage", str(shared),
                          "--tracking-uri", mlflow_server, "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout)  # --json: the summary alone on stdout
    assert summary["status_counts"]["finished"] == 2
    # Checkpoints went to the shared storage path.
    for t in summary["trials"]:
        assert Path(t["checkpoint"]).is_relative_to(shared)
        assert Path(t["checkpoint"], "checkpoint.pt").is_file() and Path(t["checkpoint"], "final.json").is_file()
    assert len(list((shared / "quickstart" / "train_runs").glob("train-*"))) == 2
    # MLflow received every trial, and the trials' processes ran on both nodes.
    from trainables.tracking import client

    mc = client(mlflow_server)
    exp = mc.get_experiment_by_name("quickstart")
    parent = mc.get_run(summary["mlflow"]["study_run_id"])
    children = mc.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["ancra.trial_id"] for r in children) == sorted(str(t["trial_id"])
                                                                              for t in summary["trials"])
    used: set[str] = set()
    for run in children:
        assert "robust_acc_worst" in run.data.metrics and run.data.tags["ancra.status"] == "finished"
        where = {k: v for k, v in run.data.tags.items() if k.startswith("ray.node.")}
        assert set(where) == {"ray.node.trial", "ray.node.rank0", "ray.node.rank1"}
        used |= set(where.values())
    assert used == {head_id, worker_id}, (where, nodes)
