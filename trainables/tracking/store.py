"""Where MLflow runs go: the tracking URI (a server, or the local sqlite store by default), checked
before anything runs; the client; a study's experiment; batched logging of params and metrics."""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..code_version import git_commit  # noqa: F401 - the study run's tags

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
ROLE, STUDY_PATH, TRIAL_ID = "ancra.role", "ancra.study_path", "ancra.trial_id"
STATUS, MODEL_URI, FINAL_LOGGED = "ancra.status", "ancra.model_uri", "ancra.final_logged"
REPORT_ARTIFACT = "evaluation/report.json"
PARENT = "mlflow.parentRunId"
DEFAULT_METRIC = "robust_acc_worst"
CHAMPION = "champion"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable folder, no such study)."""




def default_tracking_uri(cwd: str | Path | None = None) -> str:
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / DEFAULT_DB}"


def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the local sqlite store in ``cwd``. Relative
    sqlite paths become absolute: Ray workers do not share the driver's working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cwd)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(cwd or os.getcwd()).resolve() / uri[len('sqlite:///'):]}"
    elif "://" not in uri:
        raise TrackingError(f"tracking URI {uri!r} is not supported: use http(s)://HOST:PORT for an MLflow "
                            f"server or sqlite:///PATH for a local store (the default is {default_tracking_uri(cwd)})")
    return uri


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


def sqlite_path(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI."""
    return Path(uri[len("sqlite:///"):])


def local_artifact_root(uri: str) -> str:
    """Artifacts of a local sqlite store: ``mlartifacts`` beside the database file."""
    return (sqlite_path(uri).parent / DEFAULT_ARTIFACTS).resolve().as_uri()


def check_tracking(uri: str, *, timeout: float = 5.0, prepare: bool = True) -> None:
    """Fail fast, before any trial starts, when the store cannot be reached or written; with
    ``prepare``, also open the store (:func:`prepare_store`)."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http(s) only)
                body = r.read(64).decode(errors="replace").strip()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"the MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. `mlflow server "
                f"--host 127.0.0.1 --port 5000`), check --tracking-uri / MLFLOW_TRACKING_URI, or leave both "
                f"unset to track into {DEFAULT_DB} in this folder.") from None
        if body != "OK":
            raise TrackingError(f"{url} answered {body!r}, not an MLflow tracking server's 'OK'")
    elif is_local(uri):
        db = sqlite_path(uri)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            probe = db.parent / f".ancra-write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise TrackingError(f"cannot write the MLflow store {db}: {e}") from None
    if prepare:
        prepare_store(uri)


def prepare_store(uri: str) -> None:
    """Open the store once: a new sqlite store's tables are created here (seconds, the first time)."""
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 (a corrupt file, a server error: say which store)
        raise TrackingError(f"cannot open the MLflow store {uri}: {type(e).__name__}: {str(e)[:300]}") from e


def client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens model-training experiments on their runs table


def ensure_experiment(mc: Any, name: str, uri: str) -> str:
    exp = mc.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or rename the study")
        if EXPERIMENT_KIND not in exp.tags:
            mc.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return exp.experiment_id
    location = f"{local_artifact_root(uri)}/{name}" if is_local(uri) else None
    return mc.create_experiment(name, artifact_location=location,
                                tags={EXPERIMENT_KIND: "custom_model_development",
                                      "mlflow.note.content": f"ancra-tune study {name}: one parent run per study "
                                                             "run, one nested run per trial."})




def log_params(mc: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    # MlflowClient.log_batch splits a large batch into requests within the server's limits itself.
    mc.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])


def log_metrics(mc: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    # Numbers (bools as 0/1); strings and None are not metrics.
    mc.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
                                  if isinstance(v, (int, float))])


def quote(v: str) -> str:
    return v.replace("'", "\\'")
