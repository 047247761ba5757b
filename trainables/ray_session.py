"""The Ray instance a study runs on: a local one started on loopback with its own API server, or a
running cluster joined; and whether the cluster can ever give a trial what the study asks for."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence

from .study import Study
from .tracking import (
    FAST_FAIL_ENV,
)
from .worker import worker_env

log = logging.getLogger(__name__)


class InfeasibleResourcesError(RuntimeError):
    """The cluster can never give a trial what the study asks for."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

DASHBOARD_TRIES = 3

_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local node's address is 127.0.0.1


def init_ray(address: str | None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             verbose: bool = True) -> None:
    """Join ``address`` (e.g. "auto" or "ray://..."), or start a local Ray (never a stale one).

    A local instance lives on the loopback address: Ray's Prometheus endpoints (the dashboard's,
    the autoscaler's, each node's metrics export) listen on 127.0.0.1 only, not on every interface.
    It gets its own API server (the dashboard on a free loopback port), and every
    process of the instance, driver and workers, is told its address (``RAY_API_SERVER_ADDRESS``).
    Without that, Ray's State API finds "the" cluster by scanning the machine; beside another Ray
    instance (a second sweep, a test) that fails with "Found multiple active Ray instances", Ray
    Train's placement-group cleaner cannot see that a stopped trial's controller is gone, its
    workers' reservation is never released and the next trial waits forever.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Per-epoch results carry the scheduler's metric; the searcher's objective arrives with the
    # trial's final evaluation, so Tune must not insist on it in every result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Trials checkpoint every epoch and keep two: Tune then snapshots the experiment often (measured:
    # no cost worth the name here) and says so on the console each time, which a user cannot act on.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for k, v in worker_env().items():  # the trial actors read Train's settings from their environment
        if k not in FAST_FAIL_ENV:  # the driver's own MLflow calls keep MLflow's patient retries
            os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    env = worker_env()
    level = logging.INFO if verbose else logging.WARNING
    if address:
        ctx = ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level=level)
        if ctx.dashboard_url:  # the joined cluster's own API server, never one inherited from elsewhere
            url = ctx.dashboard_url
            os.environ[API_SERVER_ENV] = url if "://" in url else f"http://{url}"
        else:
            os.environ.pop(API_SERVER_ENV, None)
        return
    with _loopback_node():
        _init_local(env, num_cpus=num_cpus, num_gpus=num_gpus, level=level)


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Start a local instance on 127.0.0.1, as Ray does on macOS and Windows: ``ray.init`` turns
    "127.0.0.1" into the machine's routable address on Linux, and Ray's Prometheus endpoints
    listen on every interface unless the node's address is loopback. The processes started
    meanwhile (GCS, raylet, dashboard, autoscaler) inherit the setting; later ones are not touched."""
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = old_env


def _init_local(env: dict[str, str], *, num_cpus: int | None, num_gpus: int | None, level: int) -> None:
    import ray

    error: Exception | None = None
    for _ in range(DASHBOARD_TRIES):
        port = _free_port()
        env[API_SERVER_ENV] = os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        try:
            # "local" always starts a fresh instance: a stale ray_current_cluster file cannot stall it.
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env},
                     include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False,
                     logging_level=level)
            return
        except Exception as e:  # noqa: BLE001 (the port was taken meanwhile, or the dashboard died)
            error = e
            ray.shutdown()
            log.warning("Ray's dashboard did not start on 127.0.0.1:%d (%s); trying again", port, e)
    # A local sweep runs without the dashboard; only the isolation from other local Ray instances
    # on this machine (the API server address) is lost, so say so.
    env.pop(API_SERVER_ENV, None)
    os.environ.pop(API_SERVER_ENV, None)
    print(f"warning: Ray's dashboard did not start ({error}); the sweep runs without it. Do not run another "
          "Ray instance on this machine meanwhile (Ray Train may not release a stopped trial's workers).",
          file=sys.stderr, flush=True)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env},
             include_dashboard=False, log_to_driver=False, logging_level=level)


def check_resources(study: Study, nodes: Sequence[dict[str, float]]) -> int:
    """Fail fast when no placement can ever satisfy a trial; return how many trials fit at once.

    ``nodes``: the resources of each alive node (``{"CPU": 16, "GPU": 1}``).
    """
    r = study.resources
    asked = (f"{r.workers} worker(s) x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU) "
             f"+ {r.trial_cpus:g} CPU for the trial")
    have = ", ".join(f"node {i}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for i, n in enumerate(nodes))
    need = r.trial_total
    # A trial that trains in its own process needs all of it on one node; workers may spread.
    one = need if r.train_in_trial else {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    fits_one = [n for n in nodes if n.get("CPU", 0) >= one["CPU"] - 1e-9 and n.get("GPU", 0) >= one["GPU"] - 1e-9]
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    if not fits_one or need["CPU"] > total_cpu + 1e-9 or need["GPU"] > total_gpu + 1e-9 or \
            not any(n.get("CPU", 0) >= r.trial_cpus for n in nodes):
        raise InfeasibleResourcesError(
            f"study {study.name!r} asks per trial for {asked} = {need['CPU']:g} CPU and {need['GPU']:g} GPU, "
            f"but the cluster has {total_cpu:g} CPU and {total_gpu:g} GPU ({have}). "
            f"Lower resources.* in {study.path} or add nodes.")
    # Workers may spread over nodes; count how many whole trials fit by total resources.
    by_cpu = math.floor(total_cpu / need["CPU"] + 1e-9) if need["CPU"] > 0 else 10**6
    by_gpu = math.floor(total_gpu / need["GPU"] + 1e-9) if need["GPU"] > 0 else 10**6
    return max(1, min(by_cpu, by_gpu))


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
