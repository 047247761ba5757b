"""What Ray Train workers report to Tune, defined in one place.

A trial's rows in Tune are of three shapes: one per epoch (the trainer's metrics and ``epoch``),
one final row (the evaluation's metrics, the credible objective values, ``final`` = 1), or one
``diverged`` row. Every reader (the study summary, the searcher, the tests) uses these helpers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ancra_tune.robustness import EvalReport

EPOCH = "epoch"
FINAL = "final"
DIVERGED = "diverged"
DIVERGED_EPOCH = "diverged_epoch"
DIVERGED_STEP = "diverged_step"
REPORTED_AT = "reported_at"
CHECKPOINT_PATH = "checkpoint_path"  # added by Ray's TuneReportCallback when a checkpoint comes with a row
MLFLOW_PENDING = "mlflow_pending"  # epochs (and an evaluation) rank 0 could not log yet: the driver warns
MLFLOW_ERROR = "mlflow_error"
OBJECTIVE_PREFIX = "objective."
TIMING_PREFIX = "timing."  # where a trial's wall time went (benchmarks/trial_overhead.py reads them)
#: files of a finished Train run's last checkpoint, beside checkpoint.pt: their presence marks it complete
FINAL_NAME = "final.json"
REPORT_NAME = "report.json"
#: bookkeeping keys: never metrics of the trial
BOOKKEEPING = (EPOCH, FINAL, DIVERGED, DIVERGED_EPOCH, DIVERGED_STEP, REPORTED_AT, CHECKPOINT_PATH, MLFLOW_PENDING,
               MLFLOW_ERROR)


def objective_key(metric: str) -> str:
    """The key the searcher reads for ``metric``: its credible value (see :func:`final_row`)."""
    return OBJECTIVE_PREFIX + metric


def epoch_row(metrics: Mapping[str, float], epoch: int) -> dict[str, Any]:
    """One epoch (``epoch`` counted from 1, ASHA's time attribute), stamped with when it was reported
    (the epoch's training and validation end then: benchmarks/trial_overhead.py draws the timeline)."""
    return {**metrics, EPOCH: epoch, DIVERGED: 0, REPORTED_AT: time.time()}


def final_row(report: EvalReport, extra: Mapping[str, float], objective: Sequence[str]) -> dict[str, Any]:
    """The end-of-trial row: the report's metrics, ``extra`` (training time), and for each objective
    metric the value the checks let a selection credit (never a masked one)."""
    row: dict[str, Any] = {**report.metrics(), **extra}
    for m in objective:
        value = report.credible(m) if m in row and report.is_robust_metric(m) else row.get(m)
        row[objective_key(m)] = value
    return {**row, DIVERGED: 0, FINAL: 1, REPORTED_AT: time.time()}


def diverged_row(epoch: int, step: int, metrics: Sequence[str], modes: Sequence[str]) -> dict[str, Any]:
    """A trial whose loss became NaN/inf: the worst objective values, so the searcher avoids the region."""
    worst = {objective_key(m): (0.0 if mode == "max" else float("inf")) for m, mode in zip(metrics, modes, strict=True)}
    return {DIVERGED: 1, DIVERGED_EPOCH: epoch, DIVERGED_STEP: step, **worst}


def is_final(row: Mapping[str, Any]) -> bool:
    return row.get(FINAL) == 1


def is_diverged(row: Mapping[str, Any]) -> bool:
    return row.get(DIVERGED) == 1


def is_epoch(row: Mapping[str, Any]) -> bool:
    v = row.get("epoch_time_s")
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and not is_final(row)


def metrics_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row without its bookkeeping keys."""
    return {k: v for k, v in row.items()
            if k not in BOOKKEEPING and not k.startswith((OBJECTIVE_PREFIX, TIMING_PREFIX))}


def short_ids(ids: Iterable[str]) -> dict[str, str]:
    """Each trial id as people read it: its number within its experiment (``00003`` of
    ``9f600_00003``), unless another trial of the study has that number too (a study that went on from
    its record runs a second experiment): then the whole id."""
    ids = [str(i) for i in ids]
    tails = [i.rsplit("_", 1)[-1] for i in ids]
    return {i: t if tails.count(t) == 1 else i for i, t in zip(ids, tails, strict=True)}
