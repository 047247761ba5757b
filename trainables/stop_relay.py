"""The scheduler's decisions, told to the Ray Train workers of multi-worker trials.

A one-worker trial trains inside its Tune trial: ``ray.tune.report`` returns only once Tune has
decided to go on, so a trial ASHA stops after epoch k trains no epoch k+1. Ray Train workers
report through Train's controller and a queue to the Tune trial, and nothing comes back: left
alone they train (and log to MLflow) epoch k+1 while the stop is on its way. Here the driver
records each epoch's decision (a Tune callback, which runs after the scheduler has decided) in a
small actor of the study, and rank 0 waits for it before the next epoch: go on, or end the run at
the epoch it was stopped at, on every worker at once (one all-reduce).

Nothing here can cost a trial: without the actor (a study started by an older version, a worker
outside a study) or without an answer in ``ANCRA_DECISION_TIMEOUT_S`` (default 120 s) the
workers go on as before, and say so in their log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Any

from ray.tune import Callback

from . import trial_rows as R

NAMESPACE = "ancra-tune"
TIMEOUT_ENV = "ANCRA_DECISION_TIMEOUT_S"
log = logging.getLogger(__name__)


def board_name(study_path: str) -> str:
    """The study's decision actor, one per study folder (two studies of one name on one cluster,
    in two folders, keep apart)."""
    return "decisions-" + hashlib.sha1(study_path.encode()).hexdigest()[:16]


class Board:
    """The decisions of a study's trials, by (trial, epoch): True = stopped there. An async actor:
    any number of workers wait at once, each woken by its decision."""

    def __init__(self) -> None:
        self._stopped: dict[tuple[str, int], bool] = {}
        self._waiting: dict[tuple[str, int], asyncio.Event] = {}

    async def decide(self, trial_id: str, epoch: int, stop: bool) -> None:
        key = (trial_id, int(epoch))
        self._stopped[key] = bool(stop)
        event = self._waiting.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, trial_id: str, epoch: int, timeout_s: float) -> bool | None:
        """Whether the trial was stopped at ``epoch``; None when no decision came in ``timeout_s``."""
        key = (trial_id, int(epoch))
        if key not in self._stopped:
            event = self._waiting.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                return None
        return self._stopped.get(key)


def start_board(name: str) -> Any:
    """The study's board (started on the driver's node, found again if it runs already)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(Board).options(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                     max_concurrency=1000, scheduling_strategy=here).remote()


class Decisions(Callback):
    """Driver side: after the scheduler has decided on an epoch's result (``done`` is set on a
    stop), record the decision on the study's board."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._board: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the study
        return {"name": self.name, "_board": None}

    def setup(self, **info: Any) -> None:
        self._board = start_board(self.name)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not (R.is_epoch(result) and R.EPOCH in result):
            return
        if self._board is None:
            self._board = start_board(self.name)
        self._board.decide.remote(trial.trial_id, int(result[R.EPOCH]), bool(result.get("done")))


class Waiter:
    """Worker side (rank 0): the decision on an epoch this trial has just reported."""

    def __init__(self, name: str, trial_id: str) -> None:
        self.name, self.trial_id = name, trial_id
        self.timeout_s = float(os.environ.get(TIMEOUT_ENV, "120"))
        self.waited_s = 0.0
        self._board: Any = None
        self._off = False

    def stopped_at(self, epoch: int) -> bool:
        """True when the scheduler stopped the trial at ``epoch``; False to go on (also when no
        decision can be had)."""
        if self._off:
            return False
        import ray

        t = time.perf_counter()
        try:
            if self._board is None:
                self._board = ray.get_actor(self.name, namespace=NAMESPACE)
            stop = ray.get(self._board.wait.remote(self.trial_id, epoch, self.timeout_s),
                           timeout=self.timeout_s + 30)
        except ValueError:  # no board: the driver does not record decisions (an older study)
            log.warning("no scheduler decisions for trial %s (%s not found): epochs go on without them",
                        self.trial_id, self.name)
            self._off = True
            return False
        except Exception as e:  # noqa: BLE001 (the board is gone or slow: train as without it)
            log.warning("the scheduler's decision on epoch %d of trial %s is out of reach (%s): going on",
                        epoch, self.trial_id, e)
            self._board = None
            return False
        finally:
            self.waited_s += time.perf_counter() - t
        if stop is None:
            log.warning("no scheduler decision on epoch %d of trial %s in %.0f s: going on", epoch,
                        self.trial_id, self.timeout_s)
            return False
        return stop
