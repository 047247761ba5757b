"""One Tune trial: the function trainable that trains a configuration in its own process (one
worker) or builds and fits its Ray Train run (several workers), and what it tells MLflow and the
study about itself (its run's name and parameters, where its time went)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from ancra_tune.config import inactive_keys, params_text

from . import trial_rows as R
from .search import decided_by_scheduler
from .stop_relay import board_name
from .storage import join
from .study import Study
from .study_carry import lay_out
from .tracking import (
    StudyTracking,
    TrialSpec,
)
from .worker import DecisionBoard, TrialPlan, TuneSession, run_worker, train_loop_per_worker, trial_folder

log = logging.getLogger(__name__)


SEED_KEY = "seed"


def run_trial(params: dict[str, Any], *, study: Study, storage: str,
              tracking: StudyTracking | None = None) -> None:
    """Tune function trainable: train the trial here (one worker), or build and fit its Ray Train
    run (several workers, or ``resources.in_process: false``)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_start = time.time()
    params = dict(params)
    point = dict(params)  # the (configuration, seed) pair, as a record or a carry names it
    seed = int(params.pop(SEED_KEY, study.seeds[0]))
    cfg = study.train_config(params, seed)
    r = study.resources
    trial_id = ray.tune.get_context().get_trial_id()
    mlflow_run = None
    if tracking is not None:
        # Nothing here waits for MLflow: rank 0 finds or creates the run (the driver at the study's
        # end if it never could), so an outage cannot fail the trial.
        mlflow_run = trial_spec(tracking, trial_id, params, seed, cfg)
    folder = trial_folder()
    # State carried off a lost machine for this pair (--from-record --carry): laid into the trial's
    # folder as it first starts; its last epoch's checkpoint is the one to go on from until Tune has one.
    carried = lay_out(join(storage, study.name), point, folder) if study.kind == "ablation" else None
    plan = TrialPlan(train=cfg, suite=study.suite, objective=study.objective.metrics, modes=study.objective.modes,
                     cpus_per_worker=r.cpus_per_worker, sync_batchnorm=r.sync_batchnorm, mlflow=mlflow_run,
                     # rank 0 tags the trial's run with where each process ran (it alone talks to MLflow)
                     trial_node=ray.get_runtime_context().get_node_id(), folder=folder, carried=carried)
    if r.train_in_trial:  # one worker: this process trains, Tune restarts it from its checkpoints
        started = time.time()
        final = run_worker(plan, TuneSession(use_gpu=r.gpus_per_worker > 0))
        _write_timing(trial_start, started, final)
        return
    if decided_by_scheduler(study):  # the workers wait for ASHA's decision on each epoch
        plan = dataclasses.replace(plan, decisions=DecisionBoard(board_name(join(storage, study.name)), trial_id))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.loop_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker}
                                                                if r.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            # The same name across trial restarts: the Train run resumes from its last checkpoint.
            name=f"train-{trial_id}",
            storage_path=join(storage, study.name, "train_runs"),
            failure_config=ray.train.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    started = time.time()
    result = trainer.fit()
    final = dict(result.metrics or {})
    if R.is_final(final) and final.get(R.REPORTED_AT, started) < started:
        # Train restored a run that had already finished (the study was interrupted between the
        # run's end and the trial's): its evaluation never reached this trial, so forward it.
        ray.tune.report(final)
    _write_timing(trial_start, started, final)


def _write_timing(trial_start: float, fit_start: float, final: dict[str, Any]) -> None:
    """Where the trial's wall time went, beside its results (benchmarks/trial_overhead.py)."""
    import ray.tune

    timing = {k[len(R.TIMING_PREFIX):]: v for k, v in final.items() if k.startswith(R.TIMING_PREFIX)}
    timing.update(trial_start=trial_start, fit_start=fit_start, fit_end=time.time(),
                  train_time_s=final.get("train_time_s"))
    try:
        # Into the trial's folder in the study's storage (local or a bucket), not its working
        # directory: an actor Tune reuses for the next trial keeps the first trial's folder there.
        st = ray.tune.get_context().get_storage()
        with st.storage_filesystem.open_output_stream(f"{st.trial_fs_path}/timing.json") as f:
            f.write(json.dumps(timing).encode())
    except (OSError, AttributeError) as e:  # the numbers are also in the trial's final result
        log.warning("timing.json not written: %s", e)


def trial_spec(tracking: StudyTracking, trial_id: str, params: dict[str, Any], seed: int, cfg: Any) -> TrialSpec:
    """The trial's MLflow run as a worker finds or creates it: one run per trial (found again when
    the trial restarts or the study resumes), its whole configuration as params, settings it does
    not use logged as "inactive"."""
    from ancra_tune.config import flatten

    logged = {**flatten(cfg, resolved=True), **{k: "inactive" for k in inactive_keys(cfg)}, "trial_id": trial_id}
    return TrialSpec(tracking.uri, tracking.experiment_id, tracking.parent_run_id, trial_id,
                     trial_name(trial_id, params, seed), logged)


def trial_name(trial_id: str, params: dict[str, Any], seed: int) -> str:
    """A readable MLflow run name: the trial number and what it searched (short keys)."""
    shown = params_text(dict(sorted(params.items())), sep=" ")
    return f"trial {trial_id.rsplit('_', 1)[-1]} {shown} seed={seed}".strip()


def trial_resources(study: Study) -> dict[str, float]:
    """What Tune reserves for the trial process: all of it when the trial trains itself, else the
    Train driver only (Ray Train reserves its workers)."""
    r = study.resources
    if r.train_in_trial:
        return {"CPU": r.trial_cpus + r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    return {"CPU": r.trial_cpus}
