"""One parent run per study and one nested run per trial: created once (rank 0 alone creates a
trial's run; duplicates left by lost answers are merged when the study ends), epochs logged once
each, every run closed with its outcome."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import statuses as S
from ..code_version import running_code, tag
from .store import (
    PARENT,
    ROLE,
    STATUS,
    STUDY_PATH,
    TRIAL_ID,
    client,
    ensure_experiment,
    git_commit,
    log_metrics,
    log_params,
    quote,
)

log = logging.getLogger(__name__)



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
                               f"tags.`{STUDY_PATH}` = '{quote(study_path)}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            mc.update_run(run_id, status="RUNNING")
            mc.set_tag(run_id, STATUS, "running")
            before = found[0].data.tags.get(CODE_COMMITS, "")
            code = _code_tag()
            if code not in before.split(","):  # this session runs other code than the sessions before
                mc.set_tag(run_id, CODE_COMMITS, f"{before},{code}" if before else code)
            return StudyTracking(uri, exp_id, run_id)
        log.warning("no MLflow run of study %s at %s: starting a new parent run", study.name, study_path)
    tags = {ROLE: "study", STUDY_PATH: study_path, "ancra.study_kind": study.kind, STATUS: "running",
            "mlflow.runName": study.name, "mlflow.source.name": str(study.path), "mlflow.source.type": "LOCAL"}
    code = running_code()
    if code["commit"] is not None:  # the code that runs the study, not the study file's repository
        tags["mlflow.source.git.commit"] = code["commit"]
        tags["ancra.git_dirty"] = str(code["dirty"]).lower()
    tags[CODE_COMMITS] = _code_tag(code)
    in_git = git_commit(study.path)
    if in_git is not None and in_git[0] != code["commit"]:
        tags["ancra.study_file_commit"] = in_git[0] + (" (with uncommitted changes)" if in_git[1] else "")
    run = mc.create_run(exp_id, tags=tags, run_name=study.name)
    run_id = run.info.run_id
    log_params(mc, run_id, {**params, "git_commit": code["commit"] or "unknown"})
    with tempfile.TemporaryDirectory() as d:
        import yaml

        Path(d, "train_config.yaml").write_text(yaml.safe_dump(dict(train_config), sort_keys=False))
        mc.log_artifact(run_id, str(study.path), artifact_path="study")
        mc.log_artifact(run_id, str(Path(d, "train_config.yaml")), artifact_path="study")
    return StudyTracking(uri, exp_id, run_id)


#: tag of a study's run: the code each session ran, in order, once each (short commits, "+dirty" for
#: uncommitted changes; "ancra-tune VERSION" outside Git); a resume at a new commit adds it
CODE_COMMITS = "ancra.code_commits"


def _code_tag(code: Mapping[str, Any] | None = None) -> str:
    return tag(dict(running_code() if code is None else code))


LOST = S.LOST  # ancra.status of a run whose trial Tune never saved (its driver was killed first)


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
            mlflow_status = {S.FINISHED: "FINISHED", S.STOPPED: "KILLED",
                             S.INTERRUPTED: cut_short}.get(result, "FAILED")
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
        mc.set_tag(child.info.run_id, STATUS, outcome or S.STOPPED)
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




def trial_runs(mc: Any, tracking: StudyTracking, trial_id: str) -> list[Any]:
    """Every active run of the trial under the study's parent, the trial's own run first: the oldest
    (then the smallest id), so that every process picks the same one."""
    runs = mc.search_runs([tracking.experiment_id],
                          filter_string=f"tags.`{PARENT}` = '{tracking.parent_run_id}' and "
                                        f"tags.`{TRIAL_ID}` = '{quote(trial_id)}'",
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
        try:
            log_params(mc, run_id, missing)
        except Exception:
            # Another process filled them in at the same moment (params are unique per run): fine when
            # they are now there with these values.
            now = mc.get_run(run_id).data.params
            if any(now.get(k) != str(v)[:6000] for k, v in missing.items()):
                raise
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
