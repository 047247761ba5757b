"""Choosing a study's best trial from MLflow (the one ranking, checks that pass first) and
registering its model with the alias ``champion``; a registered model's training checkpoint."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ancra_tune.robustness.report import EvalReport

from .. import statuses as S
from ..ranking import rank_key
from .store import (
    CHAMPION,
    DEFAULT_METRIC,
    MODEL_URI,
    PARENT,
    REPORT_ARTIFACT,
    ROLE,
    STATUS,
    TRIAL_ID,
    TrackingError,
    client,
)

log = logging.getLogger(__name__)



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
        if r.data.tags.get(STATUS) != S.FINISHED or metric not in r.data.metrics or MODEL_URI not in r.data.tags:
            continue
        report = run_report(mc, r)
        value = r.data.metrics[metric]
        flags = tuple(report.flags(metric)) if report is not None else ("no evaluation report to check",)
        credible = report.credible(metric) if report is not None and report.is_robust_metric(metric) else value
        cands.append(Candidate(r, report, value, value if credible is None else credible, flags))
    return sorted(cands, key=lambda c: rank_key(finished=True, flagged=bool(c.flags), value=c.credible,
                                                clean=c.run.data.metrics.get("clean_acc"),
                                                order=c.run.info.start_time, mode=mode), reverse=True)


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
    else:
        from ..selection import margin

        m = margin((str(tid), best.report), (str(cands[1].run.data.tags.get(TRIAL_ID)), cands[1].report), metric, mode)
        if m is not None and not m["separable"]:
            warnings.append(m["text"])
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
