"""cluster.yaml passes Ray's own cluster-launcher validation."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER.read_text())
    config = prepare_config(raw)
    validate_config(config)  # raises on a schema error
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) >= 2  # single- and multi-GPU workers
    assert config["max_workers"] >= max(types[n]["max_workers"] for n in gpu_types)
    # The token travels to every node and Ray starts with token auth; MLflow is not public.
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands",
                                                                       "worker_start_ray_commands"))
    start = " ".join(config["head_start_ray_commands"])
    assert "scripts/mlflow_head.sh" in start and "0.0.0.0" not in start
    # The head's MLflow store outlives the head: artifacts in the bucket, and the sqlite store restored
    # from and snapshotted to it (or a PostgreSQL backend); the script it runs exists and parses.
    setup = " ".join(config["head_setup_commands"])
    assert "ANCRA_MLFLOW_ARTIFACTS=s3://" in setup and "ANCRA_MLFLOW_SNAPSHOT=s3://" in setup
    assert "psycopg2" in setup and "ANCRA_MLFLOW_BACKEND_SSM" in CLUSTER.read_text()
    script = CLUSTER.parent / "scripts" / "mlflow_head.sh"
    text = script.read_text()
    assert "mlflow server" in text and "store restore" in text and "store snapshot --every" in text
    import subprocess

    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "ray[default,tune,train]==" in " ".join(config["setup_commands"])
    # Studies on the cluster use shared storage (an S3 placeholder) and the head's MLflow server.
    assert "export ANCRA_STORAGE=s3://" in start and "export MLFLOW_TRACKING_URI=http://" in start
    assert "--dashboard-host=127.0.0.1" in start
