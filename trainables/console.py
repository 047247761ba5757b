"""What a study says on the driver's console while it runs: one line per trial event instead of
Ray's status tables, and which trials' MLflow records an outage holds back."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ray.tune import Callback

from ancra_tune.config import params_text

from . import trial_rows as R
from .progress import ProgressFile, describe
from .study import Study

log = logging.getLogger(__name__)


class TrialLines(Callback):
    """One compact line per trial event on the console instead of Ray's status tables: the trial,
    what it searched, epoch k/n and the scheduler's metric; its end (finished, stopped, error); and
    between its results, how far its epoch or its evaluation is."""

    def __init__(self, study: Study, epochs: int) -> None:
        self.metric, self.epochs = study.scheduler.metric, epochs
        self.objective = study.objective.metric

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
            taken_up = result.get("resumed_at_step")
            taken_up = f", taken up at step {int(taken_up)}" if taken_up else ""
            print(f"  trial {self._name(trial)}: epoch {int(result[R.EPOCH])}/{self.epochs} {shown} "
                  f"({result['epoch_time_s']:.1f} s{taken_up})", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"  trial {self._name(trial)}: error (its log is in {trial.local_path})", flush=True)

    # Between a trial's results, where it is: its epoch's step at each mid-epoch checkpoint and its
    # evaluation's batches as they finish (each trial's progress file, :mod:`trainables.progress`),
    # one line when it changes. An epoch can take an hour here and an evaluation several: without
    # this the console says nothing for that long. (State set on first use: a resumed study's Tune
    # restores this callback as its first session pickled it.)

    PROGRESS_EVERY_S = 20.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if not hasattr(self, "_progress_shown"):
            self._session_start, self._next_look, self._progress_shown = time.time(), now, {}
        if now < self._next_look:
            return
        for trial in trials:
            if trial.status == "RUNNING":
                self.show_progress(trial)
        # Tune's loop waits while this reads: many trials on a slow store are looked at less often.
        self._next_look = now + max(self.PROGRESS_EVERY_S, 10 * (time.monotonic() - now))

    def show_progress(self, trial: Any) -> None:
        p = ProgressFile(trial.storage.storage_filesystem, trial.storage.trial_fs_path).read()
        shown = self._progress_shown.get(trial.trial_id)
        if p is None or float(p.get("at", 0)) < self._session_start or p["at"] == shown:
            return  # none, from an earlier session, or shown
        self._progress_shown[trial.trial_id] = p["at"]
        print(f"  trial {self._name(trial)}: {describe(p)}", flush=True)


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
