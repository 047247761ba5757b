"""Ray Tune over Ray Train: studies, resources, resume, and their summaries.

Each Tune trial is a function trainable. A one-worker trial trains in that process and reports
to Tune itself (no worker group to start: seconds saved per trial); a trial of several workers
builds and fits a ``TorchTrainer`` (the pattern Ray 2.60 supports) and forwards its reports
with ``TuneReportCallback``. Sweeps search with
Optuna (define-by-run conditional spaces, the paper's defaults first) and stop bad trials
with ASHA; ablations run a full grid x seeds and write a summary table.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from ancra_tune.config import inactive_keys, params_text
from ancra_tune.robustness import EvalReport

from . import results as R
from . import sessions
from . import storage as storage_mod
from .decisions import Decisions, board_name
from .guard import (
    DiskGuard,
    Interruption,
    StorageError,
    below_reserve,
    check_storage,
    study_lock,
    sweep_run_dirs,
)
from .scheduler import PersistentASHA, read_state
from .study import Study
from .tracking import (
    FAST_FAIL_ENV,
    StudyTracking,
    TrialSpec,
    check_tracking,
    end_study_run,
    prepare_store,
    resolve_tracking_uri,
    start_study_run,
)
from .worker import REPORT_NAME, TuneSession, run_worker, train_loop_per_worker, worker_env

log = logging.getLogger(__name__)

SEED_KEY = "seed"
REPORTED_TIMES = "_reported_at"  # a row's result times, used by summarize and dropped


class InfeasibleResourcesError(RuntimeError):
    """The cluster can never give a trial what the study asks for."""


# --------------------------------------------------------------------------- Ray session


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


# --------------------------------------------------------------------------- the trial


def _join(storage: str, *parts: str) -> str:
    """A path under ``storage``, local or a URI (s3://...)."""
    if "://" in storage:
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts))


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
    seed = int(params.pop(SEED_KEY, study.seeds[0]))
    cfg = study.train_config(params, seed)
    r = study.resources
    trial_id = ray.tune.get_context().get_trial_id()
    mlflow_run = None
    if tracking is not None:
        # Nothing here waits for MLflow: rank 0 finds or creates the run (the driver at the study's
        # end if it never could), so an outage cannot fail the trial.
        mlflow_run = trial_spec(tracking, trial_id, params, seed, cfg)
    loop_config = {"train": cfg.to_dict(), "eval": study.suite.to_dict(), "objective": list(study.metrics),
                   "modes": list(study.modes), "cpus_per_worker": r.cpus_per_worker,
                   "sync_batchnorm": r.sync_batchnorm, "mlflow": mlflow_run,
                   # rank 0 tags the trial's run with where each process ran (it alone talks to MLflow)
                   "trial_node": ray.get_runtime_context().get_node_id()}
    if r.train_in_trial:  # one worker: this process trains, Tune restarts it from its checkpoints
        started = time.time()
        final = run_worker(loop_config, TuneSession(use_gpu=r.gpus_per_worker > 0))
        _write_timing(trial_start, started, final)
        return
    if _decided_by_scheduler(study):  # the workers wait for ASHA's decision on each epoch
        loop_config["decisions"] = {"board": board_name(_join(storage, study.name)), "trial_id": trial_id}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker}
                                                                if r.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            # The same name across trial restarts: the Train run resumes from its last checkpoint.
            name=f"train-{trial_id}",
            storage_path=_join(storage, study.name, "train_runs"),
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


def _decided_by_scheduler(study: Study) -> bool:
    """Whether the study's trials are Ray Train runs that a scheduler may stop between epochs: their
    workers learn its decisions from the study's board (:mod:`trainables.decisions`)."""
    return study.kind != "ablation" and study.scheduler.type == "asha" and not study.resources.train_in_trial


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
    from ancra_tune.config import flatten, inactive_keys

    logged = {**flatten(cfg, resolved=True), **{k: "inactive" for k in inactive_keys(cfg)}, "trial_id": trial_id}
    return TrialSpec(tracking.uri, tracking.experiment_id, tracking.parent_run_id, trial_id,
                     trial_name(trial_id, params, seed), logged)


def trial_name(trial_id: str, params: dict[str, Any], seed: int) -> str:
    """A readable MLflow run name: the trial number and what it searched (short keys)."""
    shown = params_text(dict(sorted(params.items())), sep=" ")
    return f"trial {trial_id.rsplit('_', 1)[-1]} {shown} seed={seed}".strip()


# --------------------------------------------------------------------------- studies


class FinalObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the objective once, from the trial's final evaluation (the
    credible values, ``objective.<metric>``); per-epoch results (without it) are for the scheduler."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)


#: the running study's Interruption: Tune pickles its callbacks with the experiment (tuner.pkl), so
#: a resumed study's callbacks find the live one here
_ACTIVE: dict[str, Interruption] = {}


class DiskWatch(Callback):
    """Stops the study before its local storage folder fills up (see :class:`guard.DiskGuard`)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._guard: DiskGuard | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_guard": None}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        interruption = _ACTIVE.get("interruption")
        if interruption is None:
            return
        if self._guard is None or self._guard.interruption is not interruption:
            self._guard = DiskGuard(self.folder, interruption)
        self._guard.check()


def optuna_sampler(study: Study, seed: int | None = None) -> Any:
    """The study's Optuna sampler (seeded with its first seed unless ``seed`` is given)."""
    import optuna

    seed = study.seeds[0] if seed is None else seed
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.tpe_startup),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[study.sampler]()


def _searcher(study: Study) -> Any:
    sampler = optuna_sampler(study)
    keys = [R.objective_key(m) for m in study.metrics]
    metric: Any = keys if study.multi_objective else keys[0]
    mode: Any = list(study.modes) if study.multi_objective else study.modes[0]
    points = [study.default_point()] if study.defaults_first and study.space else None
    # A partial (not a lambda): Tune pickles the searcher with the study state.
    return FinalObjectiveOptunaSearch(space=functools.partial(_define_by_run, study), metric=metric, mode=mode,
                        sampler=sampler, points_to_evaluate=points)


def _define_by_run(study: Study, trial: Any) -> None:  # noqa: D401
    study.sample(trial)  # suggestions are recorded on the Optuna trial; Tune turns them into config


def _scheduler(study: Study, *, storage: str | None = None, resume: bool = False) -> Any:
    if study.scheduler.type != "asha":
        return None
    epochs = study.train_config({}, study.seeds[0]).optim.epochs
    sch = study.scheduler
    # stop_last_trials=False: a trial that reaches the last epoch must still run its final evaluation.
    kw = dict(metric=sch.metric, mode=sch.mode, time_attr=R.EPOCH, max_t=epochs, grace_period=sch.grace_period,
              reduction_factor=sch.reduction_factor, stop_last_trials=False)
    if storage is None:
        from .scheduler import LastEpochASHA

        return LastEpochASHA(**kw)
    # Its rung records and stopped trials are saved beside the study: --resume stops what an
    # uninterrupted study would.
    return PersistentASHA(study_dir=_join(storage, study.name), resume=resume, **kw)


class TrialLines(Callback):
    """One compact line per trial event on the console instead of Ray's status tables: the trial,
    what it searched, epoch k/n and the scheduler's metric; its end (finished, stopped, error)."""

    def __init__(self, study: Study, epochs: int) -> None:
        self.metric, self.epochs = study.scheduler.metric, epochs
        self.objective = study.metrics[0]

    @staticmethod
    def _name(trial: Any) -> str:
        shown = params_text(dict(sorted((trial.config or {}).items())), sep=" ")
        return f"{trial.trial_id.rsplit('_', 1)[-1]} {shown}".strip()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if R.is_final(result):
            value = result.get(self.objective)
            shown = f"{value:.4f}" if isinstance(value, float) else "-"
            print(f"  trial {self._name(trial)}: evaluated, {self.objective} = {shown} "
                  f"(clean {result.get('clean_acc', float('nan')):.4f})", flush=True)
        elif R.EPOCH in result and "epoch_time_s" in result:
            value = result.get(self.metric, result.get("val_robust_acc"))
            shown = f"{self.metric} {value:.4f}" if isinstance(value, float) else ""
            print(f"  trial {self._name(trial)}: epoch {int(result[R.EPOCH])}/{self.epochs} {shown} "
                  f"({result['epoch_time_s']:.1f} s)", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"  trial {self._name(trial)}: error (its log is in {trial.local_path})", flush=True)


class TrackingWatch(Callback):
    """On the driver's console: which trials' MLflow records an outage holds back (rank 0 logs to
    MLflow from Ray workers, whose logs the console does not show), and when it is over."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.pending: dict[str, int] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        n = int(result.get(R.MLFLOW_PENDING) or 0)
        before = self.pending.get(trial.trial_id, 0)
        if n and not before:
            print(f"warning: MLflow ({self.uri}) is unreachable for trial {trial.trial_id} "
                  f"({result.get(R.MLFLOW_ERROR, 'no answer')}); training goes on, and its {n} epoch(s) "
                  "waiting are kept in the trial's checkpoint and delivered when MLflow answers again",
                  file=sys.stderr, flush=True)
        elif before and not n:
            print(f"MLflow is back: trial {trial.trial_id}'s records are delivered", file=sys.stderr, flush=True)
        self.pending[trial.trial_id] = n


def deliver_backlog(tracking: StudyTracking, study: Study, rows: list[dict[str, Any]]) -> int:
    """Give MLflow what outages held back, from each trial's last checkpoint: the run itself if no
    process could create it, every epoch of the checkpoint's history, and a finished trial's
    evaluation and model. Idempotent (each epoch and evaluation lands once); returns how many
    trials needed it. Raises if MLflow is unreachable (the caller warns; ``--resume`` retries)."""
    from ancra_tune.checkpoint import load_checkpoint

    from .tracking import EpochLogger, client, find_trial_run, log_trial_folder, run_is_complete, trial_run

    mc = client(tracking.uri)
    delivered = 0
    for row in rows:
        if not row.get("checkpoint"):
            continue
        finished = row["status"] == "finished"
        run = find_trial_run(mc, tracking, str(row["trial_id"]))
        if run is not None and run_is_complete(mc, run.info.run_id, epochs=row["epochs_run"], finished=finished):
            continue
        with _local_checkpoint(row["checkpoint"]) as folder:
            state = load_checkpoint(folder / "checkpoint.pt")
            if run is None:
                from ancra_tune.config import TrainConfig

                params = {k: v for k, v in row["params"].items() if k != SEED_KEY}
                cfg = TrainConfig.from_dict(state["config"])
                spec = trial_spec(tracking, str(row["trial_id"]), params, cfg.seed, cfg)
                rid = trial_run(tracking, spec.trial_id, name=spec.name, params=spec.params)
                run = None
            else:
                rid = run.info.run_id
            if EpochLogger(tracking.uri, rid).sync(state.get("history", [])):
                raise RuntimeError(f"MLflow did not take the epochs of trial {row['trial_id']}")
            if finished and (folder / R.FINAL_NAME).is_file():
                log_trial_folder(tracking.uri, rid, folder, epochs=study.train.optim.epochs)
        delivered += 1
    return delivered


@contextlib.contextmanager
def _local_checkpoint(path: str) -> Iterator[Path]:
    """A checkpoint folder on this machine (downloaded when the storage is a URI)."""
    if "://" not in path:
        yield Path(path)
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as d:
        yield Path(d)


def trial_resources(study: Study) -> dict[str, float]:
    """What Tune reserves for the trial process: all of it when the trial trains itself, else the
    Train driver only (Ray Train reserves its workers)."""
    r = study.resources
    if r.train_in_trial:
        return {"CPU": r.trial_cpus + r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    return {"CPU": r.trial_cpus}


def build_tuner(study: Study, *, storage: str, smoke_test: bool = False, resume: bool = False,
                max_concurrent: int, tracking: StudyTracking | None = None, verbose: bool = False) -> Any:
    from ray import tune

    if smoke_test:
        study = _smoke(study)
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study, storage=storage, tracking=tracking),
                                    trial_resources(study))
    name = study.name
    path = _join(storage, name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"no study to resume at {path}; run it first without --resume")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  restart_errored=False)  # the scheduler's state: PersistentASHA
    callbacks: list[Any] = [] if verbose else [TrialLines(study, study.train.optim.epochs)]
    if tracking is not None:
        callbacks.append(TrackingWatch(tracking.uri))
    if "://" not in storage:
        callbacks.append(DiskWatch(storage))
    if _decided_by_scheduler(study):
        callbacks.append(Decisions(board_name(path)))
    # Ray's per-trial status tables only with --verbose; the compact lines above otherwise.
    run_config = tune.RunConfig(name=name, storage_path=storage, verbose=1 if verbose else 0,
                                failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                # trials that train in the trial keep their last two epochs' checkpoints
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                callbacks=callbacks)
    # A trial that trains in its own process leaves it warm (torch, the data's imports) for the next.
    reuse = study.resources.train_in_trial
    if study.kind == "ablation":
        param_space = {**{k: tune.grid_search(list(v)) for k, v in study.grid.items()},
                       SEED_KEY: tune.grid_search(list(study.seeds))}
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent, reuse_actors=reuse)
    else:
        param_space = {SEED_KEY: study.seeds[0]}
        tune_config = tune.TuneConfig(search_alg=_searcher(study), scheduler=_scheduler(study, storage=storage),
                                      num_samples=study.num_samples, max_concurrent_trials=max_concurrent,
                                      reuse_actors=reuse)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _smoke(study: Study) -> Study:
    """One epoch on a few batches, two trials: checks a study file end to end in a minute."""
    from dataclasses import replace

    train = study.train.replace(**{"optim.epochs": 1, "data.train_limit": 4 * study.train.data.batch_size,
                                   "eval.max_examples": 64})
    suite = replace(study.suite, n_examples=64, autoattack=None, square_queries=20, apgd_iters=5, apgd_targets=2)
    scheduler = replace(study.scheduler, grace_period=1)  # the one epoch: ASHA decides after it
    return replace(study, train=train, num_samples=min(2, study.num_samples), suite=suite, seeds=study.seeds[:1],
                   scheduler=scheduler)


def run_study(study: Study, *, address: str | None = None, storage: str | None = None, resume: bool = False,
              smoke_test: bool = False, num_cpus: int | None = None, wait_for_resources: bool = False,
              tracking_uri: str | None = None, track: bool = True,
              resume_command: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run a sweep or an ablation to the end, or until Ctrl+C / SIGTERM; return its summary (also
    written as JSON). An interrupted study says so (summary, MLflow) and is continued by ``--resume``;
    ``--resume`` of a study that finished trains nothing, delivers what an MLflow outage held back and
    gives the same answer again. ``summary["outcome"]`` says how it ended (:mod:`trainables.sessions`).

    ``tracking_uri``: the MLflow store (default: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in
    the working directory); ``track=False`` logs nothing to MLflow.
    """
    from ray import tune

    # On a cluster, cluster.yaml exports ANCRA_STORAGE (shared storage every node reaches).
    storage = storage or os.environ.get("ANCRA_STORAGE") or str(Path("runs/studies").resolve())
    space = check_storage(storage)  # before Ray starts: a bad folder fails in a second
    if "://" not in storage:
        storage = space["storage"]
    if space.get("warning"):
        log.warning(space["warning"])
    study_path = _join(storage, study.name)
    if resume and not tune.Tuner.can_restore(study_path):
        raise FileNotFoundError(f"no study to resume at {study_path}; run it first without --resume")
    uri = None
    store: concurrent.futures.Future | None = None
    if track:  # before Ray starts: an unreachable tracking server fails in seconds
        uri = resolve_tracking_uri(tracking_uri)
        check_tracking(uri, prepare=False)
        # A new sqlite store builds its tables (2-3 s) while Ray starts.
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-store")
        store = pool.submit(prepare_store, uri)
        pool.shutdown(wait=False)
    if not verbose:  # no Tune tables or TensorBoard hints on the console; TrialLines speaks instead
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    interruption = Interruption()
    with study_lock(study_path):
        finished = resume and _finished_before(study_path, storage, study.name)
        if not finished:
            init_ray(address, num_cpus=num_cpus, verbose=verbose)
        if store is not None:
            store.result()  # its error, if any, before a trial starts
        # After Ray's start: its core worker installs a SIGTERM handler of its own that kills the driver.
        with interruption.installed():
            _ACTIVE["interruption"] = interruption
            try:
                return _run_locked(study, interruption, address=address, storage=storage, resume=resume,
                                   smoke_test=smoke_test, wait_for_resources=wait_for_resources, uri=uri,
                                   study_path=study_path, resume_command=resume_command, verbose=verbose,
                                   finished=finished)
            finally:
                _ACTIVE.pop("interruption", None)


def _finished_before(study_path: str, storage: str, name: str) -> bool:
    """Whether the study's last session ran to its end (older versions: its summary says so)."""
    outcome = sessions.last_outcome(study_path)
    if outcome is not None:
        return outcome == sessions.FINISHED
    if sessions.load(study_path):  # its last driver was killed
        return False
    old = storage_mod.read_json(_join(_summary_dir(storage, name), "summary.json"))
    return isinstance(old, dict) and not old.get("interrupted") and old.get("status_counts", {}).get("finished", 0) > 0


def _summary_dir(storage: str, name: str) -> str:
    """Where summary.json and the tables go: the study folder, or ``runs/studies/<name>`` here when the
    study's storage is a URI."""
    return _join(storage, name) if "://" not in storage else str(Path("runs/studies") / name)


def _run_locked(study: Study, interruption: Interruption, *, address: str | None, storage: str, resume: bool,
                smoke_test: bool, wait_for_resources: bool, uri: str | None, study_path: str,
                resume_command: str | None, verbose: bool = False, finished: bool = False) -> dict[str, Any]:
    """The study once its lock is held and Ray runs: resources, MLflow, Tune, the summary.
    ``finished``: the study ran to its end before (``--resume`` trains nothing)."""
    if finished:
        max_concurrent = study.max_concurrent or 1
    else:
        try:
            fits = check_resources(study, alive_nodes())
        except InfeasibleResourcesError as e:
            if not wait_for_resources:
                hint = (" If this cluster autoscales (ray up cluster.yaml), pass --wait-for-resources."
                        if address else "")
                raise InfeasibleResourcesError(f"{e}{hint}") from None
            # An autoscaling cluster adds nodes when trials ask for them: let Tune wait.
            log.warning("%s Waiting for the autoscaler to add nodes.", e)
            fits = 1
        max_concurrent = min(fits, study.max_concurrent) if study.max_concurrent else fits
    tracked = _smoke(study) if smoke_test else study
    tracking = None
    if uri is not None:
        tracking = start_study_run(uri, tracked, study_path=study_path, resume=resume,
                                   params=_study_params(tracked, storage, smoke_test),
                                   train_config=tracked.train_config({}, tracked.seeds[0]).to_dict())
        log.info("MLflow: study run %s in %s", tracking.parent_run_id, uri)
    history = sessions.load(study_path)
    if finished:
        print(f"study {study.name} is finished (its last session ran to its end): nothing to train; its "
              "answer again below", file=sys.stderr, flush=True)
    else:
        history = sessions.begin(study_path, resume=resume, command=shlex.join(sys.argv), slots=max_concurrent)
    slots = max([s.slots for s in history] or [max_concurrent])  # trials at once, in any session
    t0 = time.perf_counter()
    try:
        tuner = build_tuner(study, storage=storage, smoke_test=smoke_test, resume=resume,
                            max_concurrent=max_concurrent, tracking=tracking, verbose=verbose)
        results = tuner.get_results() if finished else tuner.fit()
    except KeyboardInterrupt:  # a second signal: stopped at once; the last saved state resumes
        if not finished:
            sessions.end(study_path, history, sessions.INTERRUPTED)
        if tracking is not None:
            end_study_run(tracking, None, status="KILLED", outcome="interrupted")
        raise
    except BaseException as e:
        full = "://" not in storage and below_reserve(storage)
        if not finished:
            sessions.end(study_path, history, sessions.DISK_FULL if full else sessions.FAILED)
        if tracking is not None:
            end_study_run(tracking, None, status="FAILED", outcome="disk_full" if full else None)
        if full:  # what Tune raises on a full disk (often EOFError from a state file cut short) says little
            raise StorageError(f"disk full under {storage}: the study stopped ({type(e).__name__}: {e}). Free some "
                               f"space, then run {resume_command or 'the same command with --resume'}") from e
        raise
    session_wall = time.perf_counter() - t0
    sweep_run_dirs()  # what this study's killed workers left on this machine (the CLI sweeps again once Ray is down)
    stopped = set((read_state(study_path) or {}).get("stopped", []))
    summary = summarize(study, results, wall_s=session_wall, storage=storage, stopped_by_scheduler=stopped,
                        slots=slots, history=history,
                        interrupted=interruption.signal is not None)
    summary["interrupted"] = interruption.signal is not None
    if summary["interrupted"]:
        summary["interrupted_by"] = interruption.signal
        if interruption.message:
            summary["interrupted_because"] = interruption.message
        summary["resume_command"] = resume_command
    summary["outcome"] = sessions.outcome_of(summary)
    if not finished:
        sessions.end(study_path, history, summary["outcome"])
    if tracking is not None:
        summary["mlflow"] = {"tracking_uri": tracking.uri, "experiment_id": tracking.experiment_id,
                             "study_run_id": tracking.parent_run_id}
    out = Path(_summary_dir(storage, study.name))
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "summary.json"]
    files[0].write_text(json.dumps(summary, indent=1, default=str))
    if study.kind == "ablation":
        files += list(write_ablation_tables(summary["trials"], study, out))
    if tracking is not None:
        try:
            n = deliver_backlog(tracking, study, summary["trials"])
            if n:
                print(f"MLflow: delivered the records of {n} trial(s) that an outage had held back",
                      file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 (the study's records stay in its storage)
            print(f"warning: MLflow ({tracking.uri}) is unreachable ({e}); the study's records are kept in "
                  f"{study_path}: run {resume_command or 'the same command with --resume'} once it answers to "
                  "deliver them", file=sys.stderr, flush=True)
            summary["mlflow"]["undelivered"] = True
            files[0].write_text(json.dumps(summary, indent=1, default=str))
            return summary
        status, outcome = {sessions.DISK_FULL: ("FAILED", "disk_full"),  # a fault: the runs it cut short failed
                           sessions.INTERRUPTED: ("KILLED", "interrupted"),
                           sessions.FAILED: ("FAILED", "failed"),  # ran to its end, no trial finished
                           sessions.FINISHED: ("FINISHED", None)}[summary["outcome"]]
        lost = end_study_run(tracking, summary, status=status, outcome=outcome, files=files)
        if lost:
            print(f"MLflow: {lost} run(s) of trials a killed driver started but Tune never saved (--resume ran "
                  "them again as new trials) moved to MLflow's trash, tagged ancra.status = lost",
                  file=sys.stderr, flush=True)
    return summary


def _study_params(study: Study, storage: str, smoke_test: bool) -> dict[str, Any]:
    r = study.resources
    out: dict[str, Any] = {"study.kind": study.kind, "study.objective": ",".join(study.metrics),
                           "study.mode": ",".join(study.modes), "study.seeds": ",".join(map(str, study.seeds)),
                           "study.storage": storage, "study.smoke_test": smoke_test,
                           "resources.workers": r.workers, "resources.cpus_per_worker": r.cpus_per_worker,
                           "resources.gpus_per_worker": r.gpus_per_worker, "resources.trial_cpus": r.trial_cpus}
    if study.kind == "sweep":
        out.update({"study.sampler": study.sampler, "study.num_samples": study.num_samples,
                    "study.space": ",".join(p.name for p in study.space)})
    else:
        out["study.grid"] = json.dumps({k: list(v) for k, v in study.grid.items()})
    from ancra_tune.config import flatten

    out.update({f"base.{k}": v for k, v in flatten(study.train_config({}, study.seeds[0]), resolved=True).items()})
    return out


# --------------------------------------------------------------------------- summaries


def read_report(checkpoint: str | None) -> EvalReport | None:
    """The evaluation report stored with a trial's final checkpoint (a local path or a URI)."""
    if not checkpoint:
        return None
    try:
        if "://" in checkpoint:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(checkpoint.rstrip("/") + "/" + REPORT_NAME)
            with fs.open_input_stream(path) as f:
                return EvalReport.from_dict(json.loads(f.read().decode()))
        p = Path(checkpoint) / REPORT_NAME
        return EvalReport.load(p) if p.is_file() else None
    except Exception as e:  # noqa: BLE001 (a missing report leaves the row without its checks)
        log.warning("cannot read the evaluation report of %s: %s", checkpoint, e)
        return None


def _trial_rows(results: Any, study: Study, stopped_by_scheduler: set[str],
                interrupted: bool = False) -> list[dict[str, Any]]:
    """One row per trial. A trial without a final evaluation was stopped by ASHA when the scheduler
    says so; otherwise, when the study was stopped (``interrupted``), it was cut short while it ran
    (``--resume`` finishes it), and when the study ran to its end, Tune ended it early: stopped."""
    rows = []
    for res in results:
        metrics = dict(res.metrics or {})
        cfg = dict(res.config or {})
        records = res.metrics_dataframe.to_dict("records") if res.metrics_dataframe is not None else []
        epochs = [m for m in records if R.is_epoch(m)]
        last_final = next((m for m in reversed(records) if R.is_final(m)), None)
        trial_id = str(metrics.get("trial_id") or Path(res.path).name)
        status = "error" if res.error else ("diverged" if R.is_diverged(metrics) else
                                             "finished" if last_final is not None else
                                             "stopped" if trial_id in stopped_by_scheduler or not interrupted
                                             else "interrupted")
        row = {"trial_id": trial_id, "status": status,
               "params": cfg,
               "checkpoint": (metrics.get(R.CHECKPOINT_PATH) or _last(records, R.CHECKPOINT_PATH)
                              or _tune_checkpoint(res)),
               # The last epoch number, not the count of rows: after a worker-group restart or a
               # resumed study, Tune's fresh result file holds only the epochs trained since.
               "epochs_run": max((int(m[R.EPOCH]) for m in epochs if not _nan(m.get(R.EPOCH))), default=0),
               "train_time_s": sum(m["epoch_time_s"] for m in epochs),
               # Per-epoch validation and the end-of-trial evaluation: the rest of a trial's useful time.
               "val_time_s": sum(m.get("val_time_s") or 0.0 for m in epochs),
               "eval_time_s": (last_final or {}).get(R.TIMING_PREFIX + "eval_s") or 0.0,
               "time_per_epoch_s": (sum(m["epoch_time_s"] for m in epochs) / len(epochs)) if epochs else None,
               "trial_dir": res.path,
               # when each of its results arrived: the study's wall time over killed sessions
               REPORTED_TIMES: [m[R.REPORTED_AT] for m in records if not _nan(m.get(R.REPORTED_AT, math.nan))]}
        try:  # parameters this configuration does not use (alpha with ANC off, ...): shown as such
            point = {k: v for k, v in cfg.items() if k != SEED_KEY}
            unused = inactive_keys(study.train_config(point, int(cfg.get(SEED_KEY, study.seeds[0]))))
            row["inactive"] = sorted(k for k in point if k in unused)
        except Exception:  # noqa: BLE001 (a row is still worth showing)
            row["inactive"] = []
        if status == "diverged":
            row["diverged_epoch"] = metrics.get(R.DIVERGED_EPOCH)
        if last_final is not None:
            report = read_report(last_final.get(R.CHECKPOINT_PATH) or row["checkpoint"])
            if report is not None:
                row.update(report.metrics())
                row["flags"] = {m: report.flags(m) for m in study.metrics if report.flags(m)}
                row["checks_failed"] = [c.name for c in report.checks if c.failed]
                row["masked_metrics"] = report.masked_metrics
            else:  # no report to read (e.g. storage gone): the reported numbers, unchecked
                row.update({k: v for k, v in R.metrics_of(last_final).items() if k in study.objective_metrics()})
                row["flags"] = {m: ["no evaluation report to check"] for m in study.metrics}
            for m in study.metrics:
                row[R.objective_key(m)] = last_final.get(R.objective_key(m), row.get(m))
        last_epoch = epochs[-1] if epochs else {}
        for k in ("val_clean_acc", "val_robust_acc", "val_pgd_acc_final"):
            if k in last_epoch:
                row[k] = last_epoch[k]
        rows.append(row)
    return rows


def _tune_checkpoint(res: Any) -> str | None:
    """The last checkpoint of a trial that trained in its own process (Tune's, not Train's), as a
    path or a URI."""
    ckpt = getattr(res, "checkpoint", None)
    if ckpt is None:
        return None
    kind = getattr(ckpt.filesystem, "type_name", "local")
    if kind == "local":
        return ckpt.path
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{ckpt.path.lstrip('/')}"


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _last(records: list[dict[str, Any]], key: str) -> Any:
    for m in reversed(records):
        v = m.get(key)
        if v is not None and not _nan(v):
            return v
    return None


def rank_key(row: dict[str, Any], metric: str, mode: str) -> tuple[int, float, float]:
    """Sort key, best first: trials whose checks pass on ``metric`` before flagged ones, then the
    credible value, then clean accuracy."""
    value = row.get(R.objective_key(metric), row.get(metric))
    v = -math.inf if value is None or _nan(value) else (value if mode == "max" else -value)
    return (0 if row.get("flags", {}).get(metric) else 1, v, row.get("clean_acc") or 0.0)


def summarize(study: Study, results: Any, *, wall_s: float, storage: str,
              stopped_by_scheduler: set[str] = frozenset(), slots: int = 1,  # type: ignore[assignment]
              history: list[sessions.Session] | None = None, interrupted: bool = False) -> dict[str, Any]:
    """The study's answer. ``wall_s``: this session's wall time; ``history``: every session of the
    study (``wall_time_s`` is their sum, a killed one's estimated from its trials' results).
    ``slots``: trials run at once; ``overhead_share`` is the part of the trial slots' time (wall time
    x slots) not spent training, validating or evaluating: start-up, tracking, Tune's bookkeeping, and
    slots left idle; between 0 and 1, or None when the study's wall time is not known."""
    rows = _trial_rows(results, study, set(stopped_by_scheduler), interrupted=interrupted)
    reported = [t for r in rows for t in r.pop(REPORTED_TIMES)]
    metric, mode = study.metrics[0], study.modes[0]
    scored = [r for r in rows if r["status"] == "finished" and r.get(metric) is not None]
    best: list[dict[str, Any]] = []
    if study.multi_objective:
        trusted = [r for r in scored if not r.get("flags")] or scored
        best = pareto_front(trusted, [R.objective_key(m) for m in study.metrics], study.modes)
    elif scored:
        best = [max(scored, key=lambda r: rank_key(r, metric, mode))]
    train_total = sum(r["train_time_s"] for r in rows)
    val_total, eval_total = sum(r["val_time_s"] for r in rows), sum(r["eval_time_s"] for r in rows)
    slots = max(1, min(slots, len(rows)))
    study_wall = sessions.wall_time_s(history, reported) if history else wall_s
    useful = train_total + val_total + eval_total
    share = None
    if study_wall > 0 and useful <= study_wall * slots * 1.01:  # 1%: clocks of other processes
        share = min(1.0, max(0.0, 1 - useful / (study_wall * slots)))
    return {"study": study.name, "kind": study.kind, "study_file": str(study.path),
            "study_dir": str(Path(storage) / study.name), "objective": dict(zip(study.metrics, study.modes,
                                                                                 strict=True)),
            "wall_time_s": study_wall, "session_wall_time_s": wall_s,
            "sessions": len(history) if history else 1, "trial_train_time_s": train_total,
            "trial_val_time_s": val_total, "trial_eval_time_s": eval_total, "slots": slots,
            "overhead_share": share,
            "n_trials": len(rows), "status_counts": {s: sum(r["status"] == s for r in rows)
                                                      for s in ("finished", "stopped", "interrupted", "diverged",
                                                                "error")},
            "flagged_trials": {str(r["trial_id"]): r["flags"] for r in rows if r.get("flags")},
            "best": best, "trials": rows}


def pareto_front(rows: list[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str]) -> list[dict[str, Any]]:
    """Rows that no other row dominates (at least as good everywhere, better somewhere)."""
    def key(r: dict[str, Any]) -> list[float]:
        return [r[m] if mode == "max" else -r[m] for m, mode in zip(metrics, modes, strict=True)]

    front = []
    for r in rows:
        kr = key(r)
        dominated = any(all(a >= b for a, b in zip(key(o), kr, strict=True)) and key(o) != kr for o in rows)
        if not dominated:
            front.append(r)
    return front


TABLE_COLUMNS = ("clean_acc", "robust_acc_worst", "autoattack_acc", "time_per_epoch_s")


def ablation_table(rows: list[dict[str, Any]], study: Study) -> list[dict[str, Any]]:
    """One row per configuration: mean and std over seeds of clean, robust, AutoAttack accuracy and
    time per epoch (paper Tables VIII and IX)."""
    keys = list(study.grid)
    table = []
    for point in study.grid_points():
        group = [r for r in rows if all(r["params"].get(k) == v for k, v in point.items())]
        row: dict[str, Any] = dict(point)
        row["seeds"] = len(group)
        row["finished"] = sum(r["status"] == "finished" for r in group)
        for col in TABLE_COLUMNS:
            vals = [r[col] for r in group if isinstance(r.get(col), (int, float)) and not _nan(r.get(col))]
            row[f"{col}_mean"] = statistics.fmean(vals) if vals else None
            row[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        table.append(row)
    assert all(set(keys) <= set(r) for r in table)
    return table


def write_ablation_tables(rows: list[dict[str, Any]], study: Study, out: Path) -> tuple[Path, Path]:
    table = ablation_table(rows, study)
    keys = list(study.grid)
    header = keys + ["seeds"] + [f"{c}_{s}" for c in TABLE_COLUMNS for s in ("mean", "std")]
    csv_path, md_path = out / "ablation.csv", out / "ablation.md"
    with open(csv_path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in table:
            f.write(",".join("" if r.get(h) is None else str(r[h]) for h in header) + "\n")

    def fmt(r: dict[str, Any], col: str) -> str:
        m, s = r.get(f"{col}_mean"), r.get(f"{col}_std")
        if m is None:
            return "n/a"
        if col.endswith("acc"):
            return f"{100 * m:.2f} ± {100 * (s or 0):.2f}"
        return f"{m:.2f} ± {s or 0:.2f}"

    names = {"clean_acc": "Clean (%)", "robust_acc_worst": "Robust, worst case (%)",
             "autoattack_acc": "AutoAttack (%)", "time_per_epoch_s": "Time/epoch (s)"}
    lines = ["| " + " | ".join(keys + ["seeds"] + [names[c] for c in TABLE_COLUMNS]) + " |",
             "|" + "---|" * (len(keys) + 1 + len(TABLE_COLUMNS))]
    for r in table:
        lines.append("| " + " | ".join([str(r[k]) for k in keys] + [str(r["seeds"])] +
                                       [fmt(r, c) for c in TABLE_COLUMNS]) + " |")
    md_path.write_text(f"# {study.name}: mean ± std over seeds {list(study.seeds)}\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path
