"""The worker loop: the core Trainer under DDP, with Ray touch points marked.

Each worker builds the same model (same seed), wraps it in DDP (gloo on CPU, NCCL on GPU),
reads its shard of every global batch, and reports per-epoch metrics through its
:class:`Session` (``ray.train.report`` in a Ray Train worker group; ``ray.tune.report`` when a
one-worker trial trains inside the Tune trial itself); rank 0 attaches the epoch's checkpoint.
A restarted worker group (or trial) resumes from the latest reported checkpoint. After the last
epoch rank 0 runs the robustness evaluation on the validation split and reports it as the
trial's final result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ancra_tune.config import TrainConfig
from ancra_tune.distributed import all_true, ddp_wrap
from ancra_tune.robustness import SuiteConfig
from ancra_tune.trainer import CHECKPOINT_NAME, PARTIAL_NAME, Callback, DivergedError, PartialStore, Trainer

from . import storage
from . import trial_rows as R
from .progress import ProgressFile, TrainingProgress
from .scratch_dirs import claim_run_dir, sweep_run_dirs
from .tracking import FAST_FAIL_ENV, TrialRecorder, TrialSpec
from .trial_eval import EVAL_BATCHES, EvalBatches, report_final, track_final

FINAL_NAME, REPORT_NAME = R.FINAL_NAME, R.REPORT_NAME
log = logging.getLogger(__name__)


class MlflowEpochs(Callback):
    """MLflow touch point: rank 0 logs each epoch's metrics to the trial's run (step = epoch);
    what an outage holds back stays in the checkpoint's history and is sent at a later epoch."""

    def __init__(self, recorder: TrialRecorder) -> None:
        self.recorder = recorder

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float],
                     checkpoint: Path | None) -> None:
        if trainer.rank == 0:
            self.recorder.epochs(trainer.history)


class TrialStopped(Exception):
    """The scheduler stopped the trial at ``epoch`` (a multi-worker trial learns it from the study's
    decision board, see :mod:`trainables.stop_relay`)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped by the scheduler at epoch {epoch}")
        self.epoch = epoch


class RayReport(Callback):
    """Ray touch point: every worker reports each epoch; rank 0 attaches its checkpoint and says how
    many epochs MLflow still lacks (the driver warns on the console). Before another epoch starts,
    the scheduler's decision on this one: a stopped trial trains (and logs) nothing more."""

    def __init__(self, session: Session, recorder: TrialRecorder | None = None) -> None:
        self.session = session
        self.recorder = recorder

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float],
                     checkpoint: Path | None) -> None:
        m = R.epoch_row(metrics, epoch + 1)
        if self.recorder is not None and trainer.rank == 0:
            m[R.MLFLOW_PENDING] = self.recorder.pending
            if self.recorder.error:
                m[R.MLFLOW_ERROR] = self.recorder.error
        if checkpoint is None:
            self.session.report(m)
        else:
            with tempfile.TemporaryDirectory() as d:
                shutil.copy2(checkpoint, Path(d) / CHECKPOINT_NAME)
                self.session.report(m, checkpoint=Path(d))
        if epoch + 1 < trainer.cfg.optim.epochs and self.session.stopped_at(epoch + 1):
            raise TrialStopped(epoch + 1)


class Session:
    """What the training loop needs from Ray: its rank, device and run name, reporting a row (with a
    checkpoint folder, persisted before ``report`` returns) and the checkpoint to resume from.

    :class:`TrainSession` is a Ray Train worker (any number of workers under DDP, the Train run
    retried from its checkpoint by Train's FailureConfig); :class:`TuneSession` is the Tune trial
    itself, for one-worker trials: no worker group to start, no second process, no distributed
    init, and Tune's FailureConfig restarts the trial from the same checkpoints.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    name: str = "run"
    decision_wait_s: float = 0.0  # time spent waiting for the scheduler's decisions

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        raise NotImplementedError

    def stopped_at(self, epoch: int) -> bool:
        """Whether the scheduler stopped the trial at ``epoch``, just reported (on every worker
        alike). Tune's own report already waits for it: False."""
        return False

    def checkpoint(self) -> Any:
        """A ``ray.train.Checkpoint`` to resume from, or None."""
        raise NotImplementedError


class TrainSession(Session):
    def __init__(self, decisions: DecisionBoard | None = None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # the worker's GPU, or CPU
        self.name = ctx.get_experiment_name()
        self.decisions = decisions  # the study's decision board, or None
        self._waiter = None
        if decisions is not None and self.rank == 0:
            from .stop_relay import Waiter

            self._waiter = Waiter(decisions.board, decisions.trial_id)

    @property
    def decision_wait_s(self) -> float:  # type: ignore[override]
        return self._waiter.waited_s if self._waiter is not None else 0.0

    def stopped_at(self, epoch: int) -> bool:
        if self.decisions is None:
            return False
        stop = self._waiter.stopped_at(epoch) if self._waiter is not None else False
        # Rank 0 asked; every worker stops, or none does (no DDP hang).
        return not all_true(not stop, self.device)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()  # set when the worker group restarts after a failure


class TuneSession(Session):
    def __init__(self, *, use_gpu: bool) -> None:
        import ray.tune

        self.name = f"trial-{ray.tune.get_context().get_trial_id()}"
        # Tune gives the trial its GPU(s) through CUDA_VISIBLE_DEVICES.
        self.device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    def checkpoint(self) -> Any:
        import ray.tune

        return ray.tune.get_checkpoint()  # set when Tune restarts the trial or the study resumes


class StoragePartial(PartialStore):
    """A trial's mid-epoch checkpoint in its folder of the study's storage (a local or shared path,
    or a bucket: a pyarrow filesystem), where every worker of the trial and a restarted trial find
    it; replaced atomically."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def __str__(self) -> str:
        return self.path

    def write(self, data: bytes) -> None:
        storage.fs_write(self.fs, self.path, data)

    def read(self) -> bytes | None:
        return storage.fs_read(self.fs, self.path)

    def remove(self) -> None:
        storage.fs_remove(self.fs, self.path)


def trial_folder() -> tuple[Any, str]:
    """(filesystem, path) of the running Tune trial's folder in the study's storage, where what a
    stopped trial goes on from is kept (its mid-epoch checkpoint, its evaluation's finished
    batches); not its working directory (an actor Tune reuses keeps another trial's)."""
    import ray.tune

    st = ray.tune.get_context().get_storage()
    return st.storage_filesystem, st.trial_fs_path


def worker_threads(cpus_per_worker: float) -> int:
    # One intra-op thread per CPU the worker was given: several workers share the cores.
    return max(1, int(math.floor(cpus_per_worker)))


@dataclass(frozen=True)
class DecisionBoard:
    """Where a multi-worker trial learns the scheduler's decisions (:mod:`trainables.stop_relay`)."""

    board: str  # the study's board actor
    trial_id: str


@dataclass(frozen=True)
class TrialPlan:
    """Everything one trial's workers run, as typed objects: passed as it is to a trial that trains in
    its own process, and pickled once, whole, into a Ray Train run's ``train_loop_config``."""

    train: TrainConfig
    suite: SuiteConfig | None = None  # the end-of-trial evaluation (None: none)
    objective: tuple[str, ...] = ()  # the study's metrics and modes (a diverged trial reports the worst)
    modes: tuple[str, ...] = ()
    cpus_per_worker: float = 1.0
    sync_batchnorm: bool = True
    mlflow: TrialSpec | None = None  # the trial's MLflow run, found or created by rank 0
    trial_node: str | None = None  # the Ray node of the Tune trial's process (a tag of its run)
    decisions: DecisionBoard | None = None
    # (pyarrow filesystem, path) of the trial's folder in the study's storage: its mid-epoch checkpoint
    # and its evaluation's finished batches are kept there (None: nothing kept between starts)
    folder: tuple[Any, str] | None = None
    # (pyarrow filesystem, folder) of the last epoch's checkpoint carried off a lost machine
    # (:mod:`trainables.study_carry`): resumed from while the session has no checkpoint of its own
    carried: tuple[Any, str] | None = None

    KEY = "plan"

    def loop_config(self, **extra: Any) -> dict[str, Any]:
        """Ray Train's ``train_loop_config`` (a dict): the plan under one key (and ``extra`` keys)."""
        return {self.KEY: self, **extra}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is :meth:`TrialPlan.loop_config`."""
    plan: TrialPlan = config[TrialPlan.KEY]
    run_worker(plan, TrainSession(plan.decisions))


def run_worker(plan: TrialPlan, session: Session) -> dict[str, Any]:
    """One worker's whole run (see :func:`train_loop_per_worker`), reporting through ``session``;
    returns the final row rank 0 reported (empty when none was)."""
    timing = {R.TIMING_PREFIX + "worker_start": time.time()}
    torch.set_num_threads(worker_threads(plan.cpus_per_worker))
    cfg = plan.train
    rank, world, device = session.rank, session.world, session.device

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return model
        return ddp_wrap(model, device, sync_batchnorm=plan.sync_batchnorm)

    # One folder per run and rank, emptied first: a restarted worker group (or trial) reuses, and
    # so cleans up, what a killed one left behind; what killed workers of other runs left on this
    # machine goes too.
    removed = sweep_run_dirs()
    if removed:
        log.info("removed %d scratch folder(s) of workers that are gone: %s", len(removed),
                 ", ".join(d.name for d in removed))
    out_dir = Path(tempfile.gettempdir()) / f"ancra-{session.name}-rank{rank}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    claim_run_dir(out_dir)
    cfg = cfg.replace(progress=False)
    spec = plan.mlflow
    recorder = None
    nodes = _node_ids(world) if spec is not None else {}  # every rank takes part (a collective)
    if spec is not None and rank == 0:  # one process per trial talks to MLflow: one run per trial
        recorder = TrialRecorder(spec, tags={"ray.node.trial": plan.trial_node,
                                             **{f"ray.node.rank{r}": n for r, n in nodes.items()}})
        recorder.run_id()  # the run exists from the start (an outage: created at a later epoch)
    # MLflow first: an epoch is in the run before the report that may let ASHA stop the trial.
    callbacks = ([MlflowEpochs(recorder)] if recorder is not None and rank == 0 else []) + \
        [RayReport(session, recorder)]
    partial = batches = progress = None  # kept in the trial's folder: what a stopped trial goes on from
    if plan.folder is not None:
        fs, folder = plan.folder
        partial, batches = StoragePartial(fs, f"{folder}/{PARTIAL_NAME}"), EvalBatches(fs, f"{folder}/{EVAL_BATCHES}")
        if rank == 0:  # where it is between results, for the console and `ancra-tune status`
            progress = ProgressFile(fs, folder)
            callbacks.append(TrainingProgress(progress))
    trainer = Trainer(cfg, device=device, rank=rank, world_size=world, out_dir=out_dir, wrap_model=wrap,
                      callbacks=callbacks, partial=partial)
    timing[R.TIMING_PREFIX + "setup_s"] = time.time() - timing[R.TIMING_PREFIX + "worker_start"]
    try:
        checkpoint = session.checkpoint()
        from_carry = checkpoint is None and plan.carried is not None
        if from_carry:
            import ray.train

            fs, path = plan.carried
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
            log.info("%s: going on from the checkpoint carried off another machine (%s)", session.name, path)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                if (Path(d) / FINAL_NAME).is_file():
                    # The run had finished before an interruption: never train or evaluate it
                    # again, only repeat its evaluation (Tune may not have recorded it in time)
                    # and make sure MLflow has it.
                    final = json.loads((Path(d) / FINAL_NAME).read_text()) if rank == 0 else {}
                    if rank == 0 and recorder is not None:
                        track_final(recorder, Path(d), epochs=cfg.optim.epochs)
                    final = {**final, R.DIVERGED: 0, R.FINAL: 1, R.REPORTED_AT: time.time()}
                    if from_carry:  # Tune has no checkpoint of it: the carried one goes with the row
                        final.pop(R.CHECKPOINT_PATH, None)
                        session.report(final, checkpoint=Path(d) if rank == 0 else None)
                    else:
                        session.report(final)
                    return final
                trainer.resume(Path(d) / CHECKPOINT_NAME)
                # The last epoch's state is the run's checkpoint until another epoch ends (also when
                # none is left: the run stopped between its last epoch and its evaluation).
                shutil.copy2(Path(d) / CHECKPOINT_NAME, out_dir / CHECKPOINT_NAME)
        if partial is not None:  # killed mid-epoch: go on from the step it reached
            trainer.resume_partial()
        try:
            t = time.time()
            trainer.fit()
            timing[R.TIMING_PREFIX + "fit_s"] = time.time() - t
            timing[R.TIMING_PREFIX + "decision_wait_s"] = session.decision_wait_s
        except TrialStopped as e:
            log.info("%s: %s", session.name, e)  # Tune ends the trial; nothing to evaluate
            return {}
        except DivergedError as e:
            # Every worker raises at the same step (a collective check): report and end cleanly,
            # so the trial ends as `diverged` instead of being retried.
            session.report(R.diverged_row(e.epoch + 1, e.step, plan.objective, plan.modes))
            return {}
        if plan.suite is not None:  # the end-of-trial evaluation, unless none is asked for
            return report_final(trainer, plan.suite, session, recorder, objective=plan.objective, batches=batches,
                                 progress=progress, timing=timing)
        return {}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")


def _node_ids(world: int) -> dict[int, str | None]:
    """The Ray node of each rank, known to every rank (gathered over the process group when there are
    several): where the trial ran, as tags of its MLflow run."""
    from .tracking import node_id

    mine = node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return {0: mine}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return dict(enumerate(gathered))


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: no telemetry; the driver's MLflow credentials, if any."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    for k, v in FAST_FAIL_ENV.items():  # a tracking call in the training loop gives up within seconds
        env[k] = os.environ.get(k, v)
    # Train's default of 60 s to start a worker group is shorter than a busy laptop takes to import
    # torch in two new processes, or an autoscaler to add a GPU node; a timed-out attempt can
    # leave its placement group reserved and starve the retry. Give startup ten minutes.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # Train's controller looks at its worker group every 2 s by default: each trial waits up to that
    # long for its workers to be seen started and again to be seen finished
    # (benchmarks/trial_overhead.py). A poll is one cheap actor call; poll every 0.25 s.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return env
