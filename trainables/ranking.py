"""The one ranking of a study's trials, best first. The console's table, the summary's best trial,
``ancra-tune best`` (from MLflow) and the study's report page all sort with it, so they cannot
disagree: finished trials first, then those whose gradient-masking checks pass on the metric, then
the metric's credible value (never a masked one), then clean accuracy, then the earlier trial."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .statuses import FINISHED
from .trial_rows import objective_key


def rank_key(*, finished: bool, flagged: bool, value: float | None, clean: float | None, order: float,
             mode: str) -> tuple[bool, bool, float, float, float]:
    """Sort key: ``sorted(..., key=..., reverse=True)`` puts the best first. ``order``: when the trial
    was created (earlier ranks higher on a tie)."""
    v = -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else \
        (value if mode == "max" else -value)
    return (finished, not flagged, v, clean or 0.0, -order)


def creation_order(row: dict[str, Any]) -> int:
    """A summary row's creation order: Tune names trial folders run_trial_<id>_<counter>_..."""
    try:
        return int(Path(row["trial_dir"]).name.split("_")[3])
    except (KeyError, IndexError, ValueError, TypeError):
        return 0


def row_rank_key(row: dict[str, Any], metric: str, mode: str) -> tuple[bool, bool, float, float, float]:
    """:func:`rank_key` of a summary row (its credible value of ``metric``, its flags)."""
    return rank_key(finished=row.get("status") == FINISHED, flagged=bool(row.get("flags", {}).get(metric)),
                    value=row.get(objective_key(metric), row.get(metric)), clean=row.get("clean_acc"),
                    order=creation_order(row), mode=mode)
