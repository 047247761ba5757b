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
    assert "mlflow server" in start and "0.0.0.0" not in start
    assert "ray[default,tune,train]==" in " ".join(config["setup_commands"])
    # Studies on the cluster use shared storage (an S3 placeholder) and the head's MLflow server.
    assert "export ANCRA_STORAGE=s3://" in start and "export MLFLOW_TRACKING_URI=http://" in start
    assert "--dashboard-host=127.0.0.1" in start
