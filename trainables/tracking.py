"""MLflow tracking on the client API: one parent run per study, one nested run per trial.

Ray's ``MLflowLoggerCallback`` does not nest runs and can duplicate them, so the platform
tracks on its own:

- the study driver creates (or, on ``--resume``, finds again) the parent run, with the study
  file, the resolved configuration and the Git commit;
- each Tune trial looks its child run up by ``ancra.trial_id`` under the parent before creating
  it, so a restarted trial or a resumed study never adds a second run;
- rank 0 of the Ray Train worker group logs each epoch's metrics with the epoch as the step,
  only for epochs the run does not have yet, and at the end the evaluation (metrics, check
  tags, report and plots) and the model, each at most once;
- the driver closes every child run with the trial's outcome (finished, stopped by ASHA,
  diverged, error) and logs the study summary to the parent.

With no settings, tracking goes to ``sqlite:///<cwd>/mlflow.db`` with artifacts in
``<cwd>/mlartifacts``; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` selects a real server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ancra_tune.robustness.report import EvalReport

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
ROLE, STUDY_PATH, TRIAL_ID = "ancra.role", "ancra.study_path", "ancra.trial_id"
STATUS, MODEL_URI, FINAL_LOGGED = "ancra.status", "ancra.model_uri", "ancra.final_logged"
REPORT_ARTIFACT = "evaluation/report.json"
PARENT = "mlflow.parentRunId"
DEFAULT_METRIC = "robust_acc_worst"
CHAMPION = "champion"
_MAX_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable folder, no such study)."""


# --------------------------------------------------------------------------- where runs go


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


# --------------------------------------------------------------------------- small helpers


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_params(mc: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for chunk in _chunks(items, _MAX_BATCH):
        mc.log_batch(run_id, params=chunk)


def log_metrics(mc: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    # Numbers (bools as 0/1); strings and None are not metrics.
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    for chunk in _chunks(items, 1000):
        mc.log_batch(run_id, metrics=chunk)


def git_commit(path: str | Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the repository holding ``path``, or None outside Git."""
    d = Path(path).resolve()
    d = d if d.is_dir() else d.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=d,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def _quote(v: str) -> str:
    return v.replace("'", "\\'")


# --------------------------------------------------------------------------- the study run


@dataclass(frozen=True)
class StudyTracking:
    """What a trial needs to find its parent: travels to Tune trials with the trainable."""

    uri: str
    experiment_id: str
    parent_run_id: str


def start_study_run(uri: str, study: Any, *, study_path: str, resume: bool,
                    params: Mapping[str, Any], train_config: Mapping[str, Any]) -> StudyTracking:
    """Create the study's parent run, or on resume find the one this study path used before."""
    mc = client(uri)
    exp_id = ensure_experiment(mc, study.name, uri)
    if resume:
        found = mc.search_runs([exp_id], filter_string=f"tags.`{ROLE}` = 'study' and "
                               f"tags.`{STUDY_PATH}` = '{_quote(study_path)}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            mc.update_run(run_id, status="RUNNING")
            mc.set_tag(run_id, STATUS, "running")
            return StudyTracking(uri, exp_id, run_id)
        log.warning("no MLflow run of study %s at %s: starting a new parent run", study.name, study_path)
    tags = {ROLE: "study", STUDY_PATH: study_path, "ancra.study_kind": study.kind, STATUS: "running",
            "mlflow.runName": study.name, "mlflow.source.name": str(study.path), "mlflow.source.type": "LOCAL"}
    commit = git_commit(study.path)
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["ancra.git_dirty"] = str(commit[1]).lower()
    run = mc.create_run(exp_id, tags=tags, run_name=study.name)
    run_id = run.info.run_id
    log_params(mc, run_id, {**params, "git_commit": commit[0] if commit else "unknown"})
    with tempfile.TemporaryDirectory() as d:
        import yaml

        Path(d, "train_config.yaml").write_text(yaml.safe_dump(dict(train_config), sort_keys=False))
        mc.log_artifact(run_id, str(study.path), artifact_path="study")
        mc.log_artifact(run_id, str(Path(d, "train_config.yaml")), artifact_path="study")
    return StudyTracking(uri, exp_id, run_id)


LOST = "lost"  # ancra.status of a run whose trial Tune never saved (its driver was killed first)


def end_study_run(tracking: StudyTracking, summary: Mapping[str, Any] | None, *, status: str,
                  outcome: str | None = None, files: Iterable[Path] = ()) -> int:
    """Close the parent run: each child's outcome, the summary's counts and best values, and
    ``files`` (summary.json, ablation tables) as artifacts. An interrupted study (``outcome`` =
    "interrupted") logs no summary metrics, so that after ``--resume`` each has one value, and
    leaves no child run RUNNING; a study stopped by a full disk (``outcome`` = "disk_full",
    ``status`` = FAILED) is resumed the same way, and the runs it cut short end FAILED.

    A child whose trial is not in the summary belongs to a trial that Tune never saved: a killed
    driver started it after its last save, and ``--resume`` started a new trial in its place. Such
    runs are tagged ``lost`` and moved to MLflow's trash (``mlflow gc`` purges it; the UI restores
    a run): every trial of the study keeps exactly one run. Returns how many."""
    mc = client(tracking.uri)
    rid = tracking.parent_run_id
    interrupted = outcome in ("interrupted", "disk_full")
    cut_short = "FAILED" if status == "FAILED" else "KILLED"
    if summary is not None:
        for row in summary["trials"]:
            child = merge_trial_runs(mc, tracking, str(row["trial_id"]))
            if child is None:
                continue
            result = row["status"]
            mc.set_tag(child.info.run_id, STATUS, result)
            if row.get("diverged_epoch") is not None:
                mc.set_tag(child.info.run_id, "ancra.diverged_epoch", str(row["diverged_epoch"]))
            if row.get("flags"):
                mc.set_tag(child.info.run_id, "ancra.selection", "ranked last: " + "; ".join(
                    f"{m}: {', '.join(r)}" for m, r in row["flags"].items())[:4000])
            mlflow_status = {"finished": "FINISHED", "stopped": "KILLED",
                             "interrupted": cut_short}.get(result, "FAILED")
            mc.set_terminated(child.info.run_id, status=mlflow_status)
        if not interrupted:
            counts = summary["status_counts"]
            metrics = {f"trials_{k}": v for k, v in counts.items()}
            metrics["wall_time_s"] = summary["wall_time_s"]
            if summary["best"]:
                best = summary["best"][0]
                for m in summary["objective"]:
                    if best.get(m) is not None:
                        metrics[f"best_{m}"] = best[m]
                mc.set_tag(rid, "ancra.best_trial_id", str(best["trial_id"]))
            # Once each: --resume of a finished study (or one whose records an outage held back) ends
            # the same run again with the same answer.
            have = mc.get_run(rid).data.metrics
            log_metrics(mc, rid, {k: v for k, v in metrics.items() if have.get(k) != v}, step=0)
    lost = 0
    if summary is not None:
        known = {str(row["trial_id"]) for row in summary["trials"]}
        for child in mc.search_runs([tracking.experiment_id], filter_string=f"tags.`{PARENT}` = '{rid}'",
                                    max_results=5000):
            if child.data.tags.get(TRIAL_ID) not in known:
                mc.set_tag(child.info.run_id, STATUS, LOST)
                mc.set_terminated(child.info.run_id, status="KILLED")
                mc.delete_run(child.info.run_id)
                lost += 1
    # Whatever is still RUNNING under this study (a trial that never reported) ends with the study.
    for child in mc.search_runs([tracking.experiment_id], filter_string=f"tags.`{PARENT}` = '{rid}' and "
                                "attributes.status = 'RUNNING'", max_results=5000):
        mc.set_tag(child.info.run_id, STATUS, outcome or "stopped")
        mc.set_terminated(child.info.run_id, status="KILLED" if status != "FAILED" else "FAILED")
    for f in files:
        mc.log_artifact(rid, str(f))
    mc.set_tag(rid, STATUS, outcome or status.lower())
    if interrupted:
        why = "stopped by a full disk: free some space, then" if outcome == "disk_full" else "interrupted:"
        mc.set_tag(rid, "ancra.resume", f"{why} run the same command with --resume to finish it")
    elif "ancra.resume" in mc.get_run(rid).data.tags:
        mc.delete_tag(rid, "ancra.resume")
    mc.set_terminated(rid, status=status)
    return lost


# --------------------------------------------------------------------------- trial runs


def trial_runs(mc: Any, tracking: StudyTracking, trial_id: str) -> list[Any]:
    """Every active run of the trial under the study's parent, the trial's own run first: the oldest
    (then the smallest id), so that every process picks the same one."""
    runs = mc.search_runs([tracking.experiment_id],
                          filter_string=f"tags.`{PARENT}` = '{tracking.parent_run_id}' and "
                                        f"tags.`{TRIAL_ID}` = '{_quote(trial_id)}'",
                          max_results=100)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_trial_run(mc: Any, tracking: StudyTracking, trial_id: str) -> Any:
    runs = trial_runs(mc, tracking, trial_id)
    return runs[0] if runs else None


def trial_run(tracking: StudyTracking, trial_id: str, *, name: str, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None) -> str:
    """The trial's child run: found again when the trial restarts, created once otherwise.

    One process creates it (rank 0 of the trial, or the driver at the study's end for a trial that
    could not). A create that MLflow carried out but whose answer was lost (a timeout, a retried
    request) can still leave a second run: after creating, the oldest run of the trial wins and a
    newer one this call made is deleted; :func:`merge_trial_runs` cleans up what is left at the end."""
    mc = client(tracking.uri)
    found = find_trial_run(mc, tracking, trial_id)
    if found is None:
        mine = mc.create_run(tracking.experiment_id, run_name=name,
                             tags={PARENT: tracking.parent_run_id, TRIAL_ID: trial_id, ROLE: "trial",
                                   STATUS: "running", "mlflow.runName": name, **(tags or {})})
        found = find_trial_run(mc, tracking, trial_id) or mine
        if found.info.run_id != mine.info.run_id:  # another create of this trial came first
            mc.delete_run(mine.info.run_id)
    elif found.info.status != "RUNNING":
        mc.update_run(found.info.run_id, status="RUNNING")
    run_id = found.info.run_id
    have = found.data.params
    missing = {k: v for k, v in params.items() if k not in have}
    if missing:  # a run created by a request whose answer was lost has none yet
        log_params(mc, run_id, missing)
    if tags and any(found.data.tags.get(k) != v for k, v in tags.items()):
        from mlflow.entities import RunTag

        mc.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run_id


def merge_trial_runs(mc: Any, tracking: StudyTracking, trial_id: str) -> Any:
    """The trial's one run at the study's end: of several (see :func:`trial_run`), the one with the
    most logged epochs (then the oldest) is kept and the others, which hold no metrics, are deleted;
    returns it (None when the trial has none)."""
    runs = trial_runs(mc, tracking, trial_id)
    if len(runs) <= 1:
        return runs[0] if runs else None
    epochs = {r.info.run_id: len(mc.get_metric_history(r.info.run_id, EpochLogger.KEY)) for r in runs}
    keep = max(runs, key=lambda r: (epochs[r.info.run_id], -(r.info.start_time or 0)))
    for r in runs:
        if r.info.run_id == keep.info.run_id:
            continue
        if r.data.metrics:
            log.warning("trial %s has a second MLflow run with metrics (%s); kept beside %s", trial_id,
                        r.info.run_id, keep.info.run_id)
            continue
        mc.delete_run(r.info.run_id)
    return keep


def node_id() -> str | None:
    """The Ray node the calling process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return None


class EpochLogger:
    """Rank 0's per-epoch metrics: every history entry the run lacks, with the epoch as step.

    Backfills epochs a crash or an outage left unlogged and never logs an epoch twice (a
    restarted worker group re-runs only epochs after its checkpoint, but its history holds the
    earlier ones). A failure is retried at the next call; training goes on.
    """

    KEY = "epoch_time_s"  # every epoch has it: its steps say which epochs the run has

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._logged: set[int] | None = None

    def sync(self, history: list[Mapping[str, Any]]) -> int:
        """Log what the run lacks; return how many epochs of ``history`` are still not in MLflow."""
        try:
            mc = client(self.uri)
            if self._logged is None:
                self._logged = {int(m.step) for m in mc.get_metric_history(self.run_id, self.KEY)}
            for entry in history:
                step = int(entry["epoch"]) + 1
                if step in self._logged:
                    continue
                log_metrics(mc, self.run_id, {k: v for k, v in entry.items() if k != "epoch"}, step=step)
                self._logged.add(step)
        except Exception as e:  # noqa: BLE001 (tracking must never stop training)
            log.warning("MLflow logging failed (%s); retrying at the next epoch", e)
        logged = self._logged or set()
        return sum(int(entry["epoch"]) + 1 not in logged for entry in history)


#: MLflow's client retries a failing request for minutes by default; in the training loop a call
#: must give up within seconds (what it could not log is kept and delivered later).
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to find or create its trial's run, without the driver having
    contacted MLflow (so an outage cannot fail the trial before it trains)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    trial_id: str
    name: str
    params: Mapping[str, Any]

    @property
    def study(self) -> StudyTracking:
        return StudyTracking(self.uri, self.experiment_id, self.parent_run_id)


class TrialRecorder:
    """Rank 0's MLflow for one trial (no other process of the trial creates its run). Nothing here
    blocks training for more than a few seconds or raises: whatever cannot be logged stays in the
    trial's checkpoint (its epoch history, its evaluation) and is delivered at a later epoch, at the
    trial's end, or by the driver at the study's end or on ``--resume`` (:func:`deliver_backlog`).
    ``tags``: set on the run when it is created or found (where the trial's processes run)."""

    def __init__(self, spec: TrialSpec, tags: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.tags = {k: v for k, v in (tags or {}).items() if v}
        self._run_id: str | None = None
        self._epochs: EpochLogger | None = None
        self.pending = 0  # epochs not yet in MLflow
        self.error: str | None = None

    def run_id(self) -> str | None:
        if self._run_id is None:
            try:
                self._run_id = trial_run(self.spec.study, self.spec.trial_id, name=self.spec.name,
                                         params=self.spec.params, tags=self.tags)
                self.error = None
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"[:300]
                log.warning("MLflow unreachable for trial %s (%s); training goes on", self.spec.trial_id, e)
        return self._run_id

    def epochs(self, history: list[Mapping[str, Any]]) -> int:
        rid = self.run_id()
        if rid is None:
            self.pending = len(history)
            return self.pending
        if self._epochs is None:
            self._epochs = EpochLogger(self.spec.uri, rid)
        self.pending = self._epochs.sync(history)
        return self.pending


def log_trial_result(uri: str, run_id: str, *, metrics: Mapping[str, Any], report: EvalReport,
                     files: Iterable[Path], model: Any, input_shape: tuple[int, ...], checkpoint: Path,
                     step: int) -> None:
    """The trial's evaluation and model, once: metrics, check tags, report and plots, the
    checkpoint and an MLflow PyTorch (pt2) model of the final prediction P'.

    Every part is idempotent, so a run interrupted in the middle of it completes on restart
    without a second value or a second model."""
    mc = client(uri)
    run = mc.get_run(run_id)
    if run.data.tags.get(FINAL_LOGGED) == "true":
        return
    have = set(run.data.metrics)
    log_metrics(mc, run_id, {k: v for k, v in metrics.items() if k not in have}, step=step)
    from mlflow.entities import RunTag

    mc.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in report.tags().items()])
    with tempfile.TemporaryDirectory() as d:  # artifacts overwrite themselves: idempotent
        saved = report.save(Path(d, REPORT_ARTIFACT.rsplit("/", 1)[1]))
        mc.log_artifact(run_id, str(saved), artifact_path="evaluation")
    for f in files:
        mc.log_artifact(run_id, str(f), artifact_path="evaluation")
    mc.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
    if MODEL_URI not in run.data.tags:
        ready = [m for m in mc.search_logged_models([run.info.experiment_id],
                                                    filter_string=f"source_run_id = '{run_id}'")
                 if str(m.status) == "READY"]
        model_uri = ready[0].model_uri if ready else log_model(uri, run_id, model, input_shape)
        mc.set_tag(run_id, MODEL_URI, model_uri)
    mc.set_tag(run_id, FINAL_LOGGED, "true")


def log_trial_folder(uri: str, run_id: str, folder: Path, *, epochs: int) -> None:
    """Log a finished Train run's evaluation and model from its last checkpoint folder
    (checkpoint.pt, final.json, report.json, PNGs): used by rank 0 at the trial's end and by the
    driver to deliver what an MLflow outage held back."""
    from ancra_tune.checkpoint import load_model

    from .results import FINAL_NAME, REPORT_NAME, metrics_of

    model, _, info = load_model(folder / "checkpoint.pt")  # plain BatchNorm, on CPU
    final = json.loads((folder / FINAL_NAME).read_text())
    log_trial_result(uri, run_id, metrics=metrics_of(final), report=EvalReport.load(folder / REPORT_NAME),
                     files=sorted(folder.glob("*.png")), model=model,
                     input_shape=(info.in_channels, info.image_size, info.image_size),
                     checkpoint=folder / "checkpoint.pt", step=epochs)


def run_is_complete(mc: Any, run_id: str, *, epochs: int, finished: bool) -> bool:
    """Whether the run already holds ``epochs`` epochs and, for a finished trial, its evaluation."""
    run = mc.get_run(run_id)
    if finished and run.data.tags.get(FINAL_LOGGED) != "true":
        return False
    return len(mc.get_metric_history(run_id, EpochLogger.KEY)) >= epochs


def log_model(uri: str, run_id: str, model: Any, input_shape: tuple[int, ...]) -> str:
    """Log P' as a torch.export (pt2) program with a dynamic batch dimension; returns its URI."""
    import copy

    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ancra_tune.robustness import LogitsOnly

    core = copy.deepcopy(model).cpu().eval()
    wrapped = LogitsOnly(core).eval()  # ModelOutput is a dataclass: export the logits only
    example = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)  # batch > 1: dynamic
    with torch.no_grad():
        n_classes = int(wrapped(torch.from_numpy(example)).shape[1])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "images")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes), "logits")]))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
        # No serving-input check: MLflow would load the model again and feed it the example as JSON
        # lists, which the PyTorch flavor refuses (a warning in every trial's log, 0.1-0.5 s each).
        # The test of this function loads the logged model and compares its predictions instead.
        info = mlflow.pytorch.log_model(wrapped, name="model", signature=signature, input_example=example,
                                        serialization_format="pt2", pip_requirements=_requirements(),
                                        validate_serving_input=False)
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"mlflow=={version('mlflow')}"]


# --------------------------------------------------------------------------- choosing the best


def study_runs(uri: str, study: str) -> tuple[Any, Any, list[Any]]:
    """(experiment, the latest parent run of ``study``, its child runs)."""
    mc = client(uri)
    exp = mc.get_experiment_by_name(study)
    if exp is None:
        raise TrackingError(f"no MLflow experiment {study!r} in {uri}; run the study first (or pass --tracking-uri)")
    parents = mc.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE}` = 'study'",
                             order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise TrackingError(f"experiment {study!r} has no study run")
    children = mc.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{PARENT}` = '{parents[0].info.run_id}'", max_results=5000)
    return exp, parents[0], children


def run_report(mc: Any, run: Any) -> EvalReport | None:
    """The evaluation report a trial run holds (``evaluation/report.json``), or None."""
    try:
        with tempfile.TemporaryDirectory() as d:
            return EvalReport.load(mc.download_artifacts(run.info.run_id, REPORT_ARTIFACT, d))
    except Exception as e:  # noqa: BLE001 (a run without its report cannot be checked)
        log.warning("run %s has no readable evaluation report: %s", run.info.run_id, e)
        return None


@dataclass(frozen=True)
class Candidate:
    run: Any
    report: EvalReport | None
    value: float  # the metric as measured
    credible: float  # what a selection may credit it with (the worst case where the metric is flagged)
    flags: tuple[str, ...]  # why the metric is not trusted; empty when the checks pass on it


def rank_candidates(mc: Any, children: list[Any], metric: str, *, mode: str = "max") -> list[Candidate]:
    """Finished trials with a model and ``metric``, best first: trials whose checks pass on the
    metric before flagged ones, then the credible value, then clean accuracy, then the earlier."""
    cands = []
    for r in children:
        if r.data.tags.get(STATUS) != "finished" or metric not in r.data.metrics or MODEL_URI not in r.data.tags:
            continue
        report = run_report(mc, r)
        value = r.data.metrics[metric]
        flags = tuple(report.flags(metric)) if report is not None else ("no evaluation report to check",)
        credible = report.credible(metric) if report is not None and report.is_robust_metric(metric) else value
        cands.append(Candidate(r, report, value, value if credible is None else credible, flags))
    sign = 1 if mode == "max" else -1
    return sorted(cands, key=lambda c: (not c.flags, sign * c.credible, c.run.data.metrics.get("clean_acc", 0.0),
                                        -c.run.info.start_time), reverse=True)


def pick_best(mc: Any, children: list[Any], metric: str, *, mode: str = "max",
              force: bool = False) -> tuple[Candidate, list[str]]:
    """The best finished trial by ``metric`` and plain warnings about it. Refuses a winner whose
    checks flag the metric unless ``force`` (then warns)."""
    cands = rank_candidates(mc, children, metric, mode=mode)
    if not cands:
        known = sorted({k for r in children for k in r.data.metrics})
        raise TrackingError(f"no finished trial with a model has metric {metric!r}; metrics: {', '.join(known)}")
    best = cands[0]
    warnings: list[str] = []
    tid = best.run.data.tags.get(TRIAL_ID)
    if best.flags:
        text = (f"the best trial by {metric} ({tid}, {best.value:.4f}) is flagged by its gradient-masking checks: "
                f"{'; '.join(best.flags)}. Its {metric} overestimates robustness")
        if not force:
            others = "; every finished trial is flagged" if all(c.flags for c in cands) else ""
            raise TrackingError(f"{text}{others}. Choose --metric {DEFAULT_METRIC} (the worst case) or pass --force.")
        warnings.append(f"--force: {text}.")
    flagged = [c.run.data.tags.get(TRIAL_ID) for c in cands if c.flags]
    if flagged and not best.flags:
        warnings.append(f"{len(flagged)} trial(s) flagged by their checks were ranked below the others: "
                        f"{', '.join(map(str, flagged))}")
    if len(cands) == 1:
        warnings.append("only one trial finished: there was nothing to compare it with")
    if best.report is not None and best.report.is_robust_metric(metric):
        chance = 1.0 / best.report.n_classes
        if best.value <= 0.0:
            warnings.append(f"{metric} = 0: no example survives the evaluation's attacks; this model is not robust "
                            "at this budget")
        elif best.value <= chance + best.report.suite.tol:
            warnings.append(f"{metric} = {best.value:.4f} is at chance ({chance:.2f} for "
                            f"{best.report.n_classes} classes): no better than guessing under attack")
    return best, warnings


def register_best(uri: str, study: str, *, metric: str = DEFAULT_METRIC, mode: str = "max",
                  model_name: str | None = None, force: bool = False, alias: str = CHAMPION,
                  on_warning: Any = None) -> dict[str, Any]:
    """Register the best trial's model and point ``alias`` at the new version. Warnings (a flagged
    winner under --force, a value at chance, a single trial) go to ``on_warning`` before registering."""
    mc = client(uri)
    _, parent, children = study_runs(uri, study)
    cand, warnings = pick_best(mc, children, metric, mode=mode, force=force)
    for w in warnings:
        (on_warning or log.warning)(w)
    best = cand.run
    name = model_name or f"ancra-{study}"
    model_uri = best.data.tags[MODEL_URI]
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # mlflow.register_model resolves a LoggedModel URI (models:/m-...) for every kind of store.
    version = mlflow.register_model(model_uri, name, await_registration_for=300,
                                    tags={"study": study, "trial_id": best.data.tags.get(TRIAL_ID, ""),
                                          "metric": metric, metric: str(best.data.metrics[metric]),
                                          "flagged": "; ".join(cand.flags) or "none"})
    _wait_ready(mc, name, version.version)
    if not mc.get_registered_model(name).description:
        mc.update_registered_model(name, description=f"ANCRA models chosen from study {study} (P' logits)")
    mc.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias, "run_id": best.info.run_id,
            "trial_id": best.data.tags.get(TRIAL_ID), "metric": metric, "value": best.data.metrics[metric],
            "model_uri": model_uri, "study_run_id": parent.info.run_id, "warnings": warnings,
            "flags": list(cand.flags), "load_uri": f"models:/{name}@{alias}"}


def _wait_ready(mc: Any, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = mc.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise TrackingError(f"registering {name} version {version} failed")
        time.sleep(0.5)
    raise TrackingError(f"{name} version {version} was not ready after {timeout:.0f} s")


def download_checkpoint(uri: str, model_uri: str, dst: str | Path) -> tuple[Path, str]:
    """The training checkpoint behind a registered model (``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``), for the full evaluation; returns (path, "NAME vVERSION")."""
    mc = client(uri)
    ref = model_uri[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = mc.get_model_version_by_alias(name, alias)
        else:
            name, number = ref.rsplit("/", 1)
            version = mc.get_model_version(name, number)
    except Exception as e:  # noqa: BLE001 (MLflow's own error names the problem)
        raise TrackingError(f"cannot resolve {model_uri} in {uri}: {e}") from None
    if not version.run_id:
        raise TrackingError(f"{model_uri} has no source run: its training checkpoint is unknown")
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = mc.download_artifacts(version.run_id, "checkpoint/checkpoint.pt", str(dst))
    return Path(local), f"{name} v{version.version}"


# --------------------------------------------------------------------------- the UI


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
