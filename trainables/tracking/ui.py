"""The MLflow UI: a local server for the sqlite store on loopback, opened on a study's runs in a
saved view (best worst case first, robust metrics and flags as columns)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store import DEFAULT_METRIC, ROLE, STATUS, TrackingError, client, is_local, local_artifact_root

log = logging.getLogger(__name__)



VIEW_KEY = "ancra"  # the experiment's shared view: MLflow keeps it as tag mlflow.sharedViewState.<key>
VIEW_COLUMNS = (*(f"metrics.`{m}`" for m in (DEFAULT_METRIC, "clean_acc", "autoattack_acc", "val_robust_acc")),
                *(f"params.`{p}`" for p in ("method.base_loss", "method.anc", "model.ra", "method.alpha", "method.zeta",
                                            "method.gamma", "seed")),
                *(f"tags.`{t}`" for t in (STATUS, "ancra.flagged", "check.final_output_not_masked")))


def share_view(mc: Any, experiment_id: str, *, expand: list[str] = ()) -> str:
    """Save the view a study is read in as the experiment's shared view (MLflow's own mechanism:
    the tag ``mlflow.sharedViewState.<key>``, opened by ``?viewStateShareKey=<key>``): its trials
    sorted by the worst-case robust accuracy, best first, with the robust metrics, the searched
    parameters, each trial's outcome and flags as columns, the study runs expanded."""
    state = {"orderByKey": f"metrics.`{DEFAULT_METRIC}`", "orderByAsc": False, "selectedColumns": list(VIEW_COLUMNS),
             "runsExpanded": dict.fromkeys(expand, True)}
    mc.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(state))
    return VIEW_KEY


def study_url(uri: str, ui: str, study: str | None = None) -> str:
    """The UI address of a study's runs list (the experiment ``study``, else the one whose study run
    started last) in its shared view (:func:`share_view`). Experiments are model-training
    experiments, so the UI opens on their runs table, not on MLflow's GenAI home."""
    mc = client(uri)
    exps = [mc.get_experiment_by_name(study)] if study is not None else mc.search_experiments(max_results=1000)
    if study is not None and exps[0] is None:
        raise TrackingError(f"no study {study!r} in {uri}")
    ids = [e.experiment_id for e in exps if e is not None]
    runs = mc.search_runs(ids, filter_string=f"tags.`{ROLE}` = 'study'", order_by=["attributes.start_time DESC"],
                          max_results=1) if ids else []
    if not runs and study is None:
        return ui.rstrip("/")
    exp_id = runs[0].info.experiment_id if runs else ids[0]
    key = share_view(mc, exp_id, expand=[r.info.run_id for r in runs])
    return f"{ui.rstrip('/')}/#/experiments/{exp_id}/runs?viewStateShareKey={key}"


@contextlib.contextmanager
def serve_ui(uri: str, *, port: int = 5000, host: str = "127.0.0.1", timeout: float = 60.0,
             log_file: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``mlflow server`` on ``uri`` (one worker, no job runner) until the block ends; yields
    its URL once it answers, and the process. The server and its children are stopped as a group."""
    import signal
    import sys

    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if is_local(uri):
        cmd += ["--artifacts-destination", local_artifact_root(uri)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log_file, "w")) if log_file is not None else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{host}:{port}"
        try:
            wait_for_server(url, timeout=timeout, proc=proc)
            yield url, proc
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_server(url: str, timeout: float = 60.0, proc: Any = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TrackingError(f"the MLflow server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:  # noqa: S310
                if r.read(8).decode().strip() == "OK":
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TrackingError(f"the MLflow server at {url} did not answer within {timeout:.0f} s")
