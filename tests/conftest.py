from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The real CIFAR-10 / MNIST files live beside the repository (never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get("ANCRA_RUN_SLOW") == "1"
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    has_cuda = torch.cuda.is_available()
    has_browser = bool(shutil.which("chromedriver")) and any(shutil.which(n) for n in ("chromium", "chromium-browser",
                                                                                      "google-chrome"))
    for item in items:
        if "browser" in item.keywords and not has_browser:
            item.add_marker(pytest.mark.skip(reason="needs chromium and chromedriver (apt-get install chromium "
                                                    "chromium-driver)"))
        if "slow" in item.keywords and not run_slow and not (in_ci and "ci" in item.keywords):
            item.add_marker(pytest.mark.skip(reason="slow: set ANCRA_RUN_SLOW=1 to run"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Studies track into a per-test sqlite store unless a test says otherwise: never the repo."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact folder), stopped after."""
    import socket

    from trainables.tracking import serve_ui

    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve_ui(f"sqlite:///{root / 'mlflow.db'}", port=port, timeout=120, log_file=root / "server.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for one test module."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from trainables.ray_session import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()
