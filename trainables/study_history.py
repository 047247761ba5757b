"""What a study already holds: the Tune experiments of its sessions (its own and each ``--more``
extension) and their trials, whether its last session ran to its end, where its summary goes, and
the parameters its MLflow study run records (versions included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import sessions
from . import statuses as S
from . import storage as storage_mod
from .storage import join
from .study import Study


def with_other_experiments(study_path: str, current: str | None, results: Any,
                            history: list[sessions.Session]) -> list[Any]:
    """The trials of the study's own Tune experiment and of every extension (``--more``), in order."""
    from ray import tune
    from ray.tune import ExperimentAnalysis, ResultGrid

    out: list[Any] = []
    for name in [None, *sessions.extensions(history)]:
        if name == current:
            out += list(results)
            continue
        path = study_path if name is None else join(study_path, name)
        if tune.Tuner.can_restore(path):
            out += list(ResultGrid(ExperimentAnalysis(path)))
    return out


def finished_before(study_path: str, storage: str, name: str) -> bool:
    """Whether the study's last session ran to its end with no trial left to retry (an errored trial
    runs again on ``--resume``); older versions: their summary says so."""
    old = storage_mod.read_json(join(summary_dir(storage, name), "summary.json"))
    counts = old.get("status_counts", {}) if isinstance(old, dict) else {}
    outcome = sessions.last_outcome(study_path)
    if outcome is None:
        if sessions.load(study_path):  # its last driver was killed
            return False
        outcome = sessions.outcome_of(old) if counts else None
    return outcome == sessions.FINISHED and not counts.get(S.ERROR, 0)


def summary_dir(storage: str, name: str) -> str:
    """Where summary.json and the tables go: the study folder, or ``runs/studies/<name>`` here when the
    study's storage is a URI."""
    return join(storage, name) if "://" not in storage else str(Path("runs/studies") / name)


def study_params(study: Study, storage: str, smoke_test: bool) -> dict[str, Any]:
    r = study.resources
    o = study.objective
    out: dict[str, Any] = {"study.kind": study.kind, "study.objective": ",".join(o.metrics),
                           "study.mode": ",".join(o.modes), "study.seeds": ",".join(map(str, study.seeds)),
                           "study.storage": storage, "study.smoke_test": smoke_test,
                           "resources.workers": r.workers, "resources.cpus_per_worker": r.cpus_per_worker,
                           "resources.gpus_per_worker": r.gpus_per_worker, "resources.trial_cpus": r.trial_cpus}
    if study.kind == "sweep":
        out.update({"study.sampler": study.search.sampler, "study.num_samples": study.search.num_samples,
                    "study.space": ",".join(study.search.names)})
    else:
        out["study.grid"] = json.dumps({k: list(v) for k, v in study.ablation.grid.items()})
    from importlib.metadata import PackageNotFoundError, version

    for package in ("ancra-tune", "ray", "optuna", "mlflow", "torch", "pyautoattack"):
        try:  # what ran the study: its numbers depend on them (samplers' defaults, attacks, kernels)
            out[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            out[f"version.{package}"] = "not installed"
    from ancra_tune.config import flatten

    out.update({f"base.{k}": v for k, v in flatten(study.train_config({}, study.seeds[0]), resolved=True).items()})
    return out
