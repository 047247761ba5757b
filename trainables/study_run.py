"""Running a study to its end: its lock, Ray, MLflow's parent run, Tune (a new study, a resumed one,
or one that finished and only answers again), the summary and the records an outage held back.

Each Tune trial is a function trainable (:mod:`trainables.trial`). A one-worker trial trains in that
process and reports to Tune itself; a trial of several workers builds and fits a ``TorchTrainer``
(the pattern Ray 2.60 supports) and forwards its reports with ``TuneReportCallback``. Sweeps search
with Optuna and stop bad trials with ASHA (:mod:`trainables.search`); ablations run a full grid x
seeds and write a summary table (:mod:`trainables.summary`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from . import sessions
from . import statuses as S
from . import storage as storage_mod
from . import trial_rows as R
from .console import TrackingWatch, TrialLines
from .disk import DiskGuard, StorageError, below_reserve, check_storage
from .interruption import Interruption
from .ray_session import InfeasibleResourcesError, alive_nodes, check_resources, init_ray
from .scheduler import read_state
from .scratch_dirs import sweep_run_dirs
from .search import build_scheduler, build_searcher, decided_by_scheduler, smoke_study
from .stop_relay import Decisions, board_name
from .storage import join
from .study import Study
from .study_carry import carried
from .study_export import import_record, imported_rows, points_left, was_imported
from .study_history import finished_before, study_params, summary_dir, with_other_experiments
from .study_lock import study_lock
from .summary import summarize, write_ablation_tables
from .tracking import (
    StudyTracking,
    TrackingError,
    check_tracking,
    end_study_run,
    prepare_store,
    resolve_tracking_uri,
    start_study_run,
)
from .trial import SEED_KEY, run_trial, trial_resources, trial_spec

log = logging.getLogger(__name__)



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


def answers(uri: str, *, tries: int = 3, wait_s: float = 5.0) -> None:
    """Raise :class:`TrackingError` unless the store answers within a few probes (seconds each): a
    server down at the study's end is not waited for through MLflow's retries of every call (minutes,
    measured: 4), and a blip of a few seconds is."""
    for k in range(tries):
        try:
            check_tracking(uri, prepare=False)
            return
        except TrackingError as e:
            if k == tries - 1:
                raise TrackingError(f"no answer to {tries} probes {wait_s:g} s apart") from e
            time.sleep(wait_s)


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
        finished = row["status"] == S.FINISHED
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


def build_tuner(study: Study, *, storage: str, smoke_test: bool = False, resume: bool = False,
                max_concurrent: int, tracking: StudyTracking | None = None, verbose: bool = False,
                extension: str | None = None, added: int | None = None) -> Any:
    """The study's Tune experiment (``<storage>/<name>``), or one of its extensions (``--more N``: the
    experiment ``<storage>/<name>/more-<k>`` of ``added`` trials, searched with every earlier trial in
    the Optuna journal's view and stopped by the same ASHA records)."""
    from ray import tune

    if smoke_test:
        study = smoke_study(study)
    trainable = tune.with_resources(tune.with_parameters(run_trial, study=study, storage=storage, tracking=tracking),
                                    trial_resources(study))
    study_dir = join(storage, study.name)
    name, root = (extension, study_dir) if extension else (study.name, storage)
    path = join(root, name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"no study to resume at {path}; run it first without --resume")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  restart_errored=False)  # the scheduler's state: PersistentASHA
    callbacks: list[Any] = [TrialLines(study, study.train.optim.epochs)]  # --verbose: Ray's tables too
    if tracking is not None:
        callbacks.append(TrackingWatch(tracking.uri))
    if "://" not in storage:
        callbacks.append(DiskWatch(storage))
    if decided_by_scheduler(study):
        callbacks.append(Decisions(board_name(path)))
    # Ray's per-trial status tables only with --verbose, beside the compact lines above.
    run_config = tune.RunConfig(name=name, storage_path=root, verbose=1 if verbose else 0,
                                failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                # trials that train in the trial keep their last two epochs' checkpoints
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                callbacks=callbacks)
    # A trial that trains in its own process leaves it warm (torch, the data's imports) for the next.
    reuse = study.resources.train_in_trial
    half_done = set(carried(study_dir)) if study.kind == "ablation" else set()
    left = points_left(study, imported_rows(study_dir), first=half_done) if study.kind == "ablation" else []
    if study.kind == "ablation" and (half_done or len(left) < len(study.grid_points()) * len(study.seeds)):
        # Started from its record (--from-record): only the pairs the record does not hold, each once,
        # those whose state was carried (--carry) first.
        from ray.tune.search.basic_variant import BasicVariantGenerator

        param_space = {**{k: tune.choice(list(v)) for k, v in study.ablation.grid.items()},
                       SEED_KEY: tune.choice(list(study.seeds))}
        tune_config = tune.TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=left,
                                                                       max_concurrent=max_concurrent),
                                      num_samples=len(left), reuse_actors=reuse)
    elif study.kind == "ablation":
        param_space = {**{k: tune.grid_search(list(v)) for k, v in study.ablation.grid.items()},
                       SEED_KEY: tune.grid_search(list(study.seeds))}
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent, reuse_actors=reuse)
    else:
        param_space = {SEED_KEY: study.seeds[0]}
        searcher = build_searcher(study, concurrent=max_concurrent, study_dir=study_dir)
        tune_config = tune.TuneConfig(search_alg=searcher,
                                      scheduler=build_scheduler(study, storage=storage, resume=extension is not None),
                                      num_samples=added or study.search.num_samples,
                                      max_concurrent_trials=max_concurrent,
                                      reuse_actors=reuse)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def run_study(study: Study, *, address: str | None = None, storage: str | None = None, resume: bool = False,
              smoke_test: bool = False, num_cpus: int | None = None, wait_for_resources: bool = False,
              tracking_uri: str | None = None, track: bool = True,
              resume_command: str | None = None, verbose: bool = False, more: int | None = None,
              from_record: Path | None = None, carry: Path | None = None) -> dict[str, Any]:
    """Run a sweep or an ablation to the end, or until Ctrl+C / SIGTERM; return its summary (also
    written as JSON). An interrupted study says so (summary, MLflow) and is continued by ``--resume``;
    ``--resume`` of a study that finished trains nothing, delivers what an MLflow outage held back and
    gives the same answer again. ``summary["outcome"]`` says how it ended (:mod:`trainables.sessions`).

    ``tracking_uri``: the MLflow store (default: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in
    the working directory); ``track=False`` logs nothing to MLflow. ``more``: add that many trials to
    a finished sweep (an extension experiment in its folder, the sampler seeing every earlier trial
    through the study's Optuna journal, under the same MLflow study run); the summary covers all.
    ``from_record``: an ablation's export (``ancra-tune export``) to go on from where its folder was
    lost: its evaluated trials are brought in, and only the pairs it does not hold run. ``carry``: the
    unfinished trials' state exported beside that record (``export --carry``): they go on from it.
    """
    from ray import tune

    # On a cluster, cluster.yaml exports ANCRA_STORAGE (shared storage every node reaches).
    storage = storage_mod.root(storage)
    if not storage_mod.is_uri(storage):
        storage = str(Path(storage).resolve())
    space = check_storage(storage)  # before Ray starts: a bad folder fails in a second
    if not storage_mod.is_uri(storage):
        storage = space["storage"]
    if space.get("warning"):
        log.warning(space["warning"])
    study_path = join(storage, study.name)
    if resume and not tune.Tuner.can_restore(study_path):
        raise FileNotFoundError(f"no study to resume at {study_path}; run it first without --resume")
    if more is not None:
        if resume:
            raise ValueError("--more adds trials to a finished study and --resume finishes an interrupted one: "
                             "pass one of them")
        if study.kind != "sweep" or more < 1:
            raise ValueError(f"--more {more}: adds N >= 1 trials to a sweep (an ablation's grid is fixed)")
        if not tune.Tuner.can_restore(study_path):
            raise FileNotFoundError(f"no study to add trials to at {study_path}; run it first")
    if carry is not None and from_record is None:
        raise ValueError("--carry brings the unfinished trials' state in with --from-record RECORD (a folder that is "
                         "there goes on with --resume)")
    if from_record is not None and (resume or more is not None):
        raise ValueError("--from-record starts a lost study's folder from its record; --resume and --more go on "
                         "with a folder that is there: pass one of them")
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
        if from_record is not None:
            imported = import_record(from_record, study, study_path, carry=carry)
            half = (f", {len(imported['carried'])} of them going on from the state carried in {carry}"
                    if carry is not None else "")
            print(f"study {study.name}: {len(imported['rows'])} trial(s) and {imported['sessions']} session(s) "
                  f"from its record {from_record} (exported {imported['exported_at']}); "
                  f"{len(points_left(study, imported['rows']))} to run{half}", file=sys.stderr, flush=True)
        finished = resume and finished_before(study_path, storage, study.name)
        if more is not None and not finished_before(study_path, storage, study.name):
            raise ValueError(f"study {study.name}'s last session did not finish: finish it with --resume, then add "
                             "trials with --more")
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
                                   finished=finished, more=more)
            finally:
                _ACTIVE.pop("interruption", None)


def _run_locked(study: Study, interruption: Interruption, *, address: str | None, storage: str, resume: bool,
                smoke_test: bool, wait_for_resources: bool, uri: str | None, study_path: str,
                resume_command: str | None, verbose: bool = False, finished: bool = False,
                more: int | None = None) -> dict[str, Any]:
    """The study once its lock is held and Ray runs: resources, MLflow, Tune, the summary.
    ``finished``: the study ran to its end before (``--resume`` trains nothing)."""
    history = sessions.load(study_path)
    extension, added = None, None
    if more is not None:
        extension, added = f"more-{len(sessions.extensions(history)) + 1}", more
    elif resume and history and history[-1].experiment and not finished:  # an interrupted extension
        extension, added = history[-1].experiment, history[-1].added
    if finished:
        max_concurrent = study.search.max_concurrent or 1
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
        max_concurrent = min(fits, study.search.max_concurrent) if study.search.max_concurrent else fits
    tracked = smoke_study(study) if smoke_test else study
    tracking = None
    if uri is not None:
        tracking = start_study_run(uri, tracked, study_path=study_path, resume=resume or more is not None,
                                   params=study_params(tracked, storage, smoke_test),
                                   train_config=tracked.train_config({}, tracked.seeds[0]).to_dict())
        log.info("MLflow: study run %s in %s", tracking.parent_run_id, uri)
    if finished:
        print(f"study {study.name} is finished (its last session ran to its end): nothing to train; its "
              "answer again below", file=sys.stderr, flush=True)
    else:
        if resume and history and history[-1].ended is None:  # its driver was killed: when did it stop?
            from .study_status import last_activity

            sessions.close_killed(study_path, history, last_activity(study_path, since=history[-1].started))
        # A folder started from its record goes on with the record's sessions (their wall time counts),
        # also when none of its trials had finished.
        history = sessions.begin(study_path, resume=resume or was_imported(study_path),
                                 command=shlex.join(sys.argv), slots=max_concurrent,
                                 experiment=extension, added=added)
    slots = max([s.slots for s in history] or [max_concurrent])  # trials at once, in any session
    t0 = time.perf_counter()
    try:
        tuner = build_tuner(study, storage=storage, smoke_test=smoke_test, resume=resume,
                            max_concurrent=max_concurrent, tracking=tracking, verbose=verbose, extension=extension,
                            added=added)
        results = tuner.get_results() if finished else tuner.fit()
        results = with_other_experiments(study_path, extension, results, history)
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
    out = Path(summary_dir(storage, study.name))
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "summary.json"]
    files[0].write_text(json.dumps(summary, indent=1, default=str))
    if study.kind == "ablation":
        files += list(write_ablation_tables(study, summary, out))
    if tracking is not None:
        try:
            answers(tracking.uri)
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
