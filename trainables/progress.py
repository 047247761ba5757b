"""Where a running trial is between the results Tune records: a trial's epoch can take an hour and
its evaluation several, and neither says anything until it ends.

Rank 0 keeps one small file in the trial's folder of the study's storage (``trial_progress.json``,
replaced whole): the step its epoch had reached at its last mid-epoch checkpoint, or the batches its
evaluation has finished. The driver's console prints it when it changes
(:class:`trainables.console.ProgressLines`) and ``ancra-tune status`` reads it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ancra_tune.trainer import Callback, Trainer

from . import storage

log = logging.getLogger(__name__)

PROGRESS_NAME = "trial_progress.json"
TRAINING, EVALUATING = "training", "evaluating"


class ProgressFile:
    """A trial's progress file (through the pyarrow filesystem Tune gives the trial: a local or shared
    path, or a bucket). Writing it is never fatal: it only informs."""

    def __init__(self, fs: Any, folder: str) -> None:
        self.fs, self.path = fs, f"{folder}/{PROGRESS_NAME}"

    def write(self, **fields: Any) -> None:
        try:
            storage.fs_write(self.fs, self.path, json.dumps({**fields, "at": time.time()}).encode())
        except Exception as e:  # noqa: BLE001 - the run goes on; only its progress line is missing
            log.warning("cannot write %s: %s", self.path, e)

    def read(self) -> dict[str, Any] | None:
        try:
            raw = storage.fs_read(self.fs, self.path)
            data = json.loads(raw) if raw is not None else None
        except Exception:  # noqa: BLE001 - unreadable (or half-written on a store without moves): none
            return None
        return data if isinstance(data, dict) and data.get("phase") in (TRAINING, EVALUATING) else None

    def remove(self) -> None:
        try:
            storage.fs_remove(self.fs, self.path)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot remove %s: %s", self.path, e)

    # what the worker writes

    def training(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        """``epoch`` is 1-based: ``step`` of its ``steps`` are done."""
        self.write(phase=TRAINING, epoch=epoch, epochs=epochs, step=step, steps=steps)

    def evaluating(self, batches: int, n_batches: int, examples: int, n_examples: int, seconds: float,
                   resumed: int = 0, timed: int | None = None) -> None:
        """``batches`` of ``n_batches`` finished (``resumed`` of them by an earlier start), holding
        ``examples`` of ``n_examples``, in ``seconds`` over every start, which timed ``timed`` of the
        examples (default: all; batches kept by d923040 have no time)."""
        self.write(phase=EVALUATING, batches=batches, n_batches=n_batches, examples=examples,
                   n_examples=n_examples, seconds=seconds, resumed=resumed,
                   timed=examples if timed is None else timed)


class TrainingProgress(Callback):
    """Trainer hook (rank 0): each mid-epoch checkpoint's step goes to the progress file."""

    def __init__(self, progress: ProgressFile) -> None:
        self.progress = progress

    def on_mid_epoch_checkpoint(self, trainer: Trainer, epoch: int, step: int, steps: int) -> None:
        self.progress.training(epoch + 1, trainer.cfg.optim.epochs, step, steps)


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(p: dict[str, Any], running_since: float | None = None, now: float | None = None) -> str:
    """One line for people: ``epoch 4/5: step 120 of 453 (26%)`` or ``evaluation: 3 of 7 batches
    (750 of 1,667 examples) in 62 min, about 83 min left``.

    An evaluation's file is written only when a batch is kept, so between two its "left" is the one
    of the last kept batch. ``running_since`` (when its next batch began: that batch's time, or the
    driver's start if later; given only while a driver runs it) says how long that batch has run by
    ``now`` and takes it off, or says the batch has run longer than its rate predicts."""
    when = time.strftime("%H:%M", time.localtime(float(p.get("at", 0))))
    if p["phase"] == TRAINING:
        step, steps = int(p["step"]), max(1, int(p["steps"]))
        return (f"epoch {int(p['epoch'])}/{int(p['epochs'])}: step {step} of {steps} ({100 * step / steps:.0f}%) "
                f"at its checkpoint of {when}")
    done, total, seconds = int(p["batches"]), max(1, int(p["n_batches"])), float(p["seconds"])
    examples, n = int(p["examples"]), int(p["n_examples"])
    timed = int(p.get("timed", examples))
    if not done:
        return f"evaluation begun: {total} batches, {n:,} examples (at {when})"
    text = f"evaluation: {done} of {total} batches ({examples:,} of {n:,} examples)"
    if timed == examples:
        text += f" in {_minutes(seconds)}"
    elif timed:
        text += f", {_minutes(seconds)} for the {timed:,} timed"
    if 0 < examples < n and timed and seconds > 0:
        left = seconds / timed * (n - examples)
        ran = max(0.0, (time.time() if now is None else now) - running_since) if running_since is not None else 0.0
        if ran < 60:
            return text + f", about {_minutes(left)} left (at {when})"
        since = time.strftime("%H:%M", time.localtime(running_since))
        if ran < left:
            return (text + f", about {_minutes(left - ran)} left ({_minutes(left)} at {when}, less the "
                    f"{_minutes(ran)} it has run since {since})")
        return (text + f", longer than its rate says: {_minutes(left)} left at {when}, and it has run "
                f"{_minutes(ran)} since {since}")
    return text + f" (at {when})"
