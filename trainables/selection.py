"""Whether a sweep's winner is separable from its runner-up: the two trials' outcomes on the same
validation examples, compared paired (exact McNemar), with the difference's 95% interval."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ancra_tune.robustness import EvalReport, stats
from ancra_tune.robustness.report import AUTOATTACK, CLEAN, ROBUST_PREFIX, WORST
from ancra_tune.robustness.suite import AttackKind


def outcome_name(report: EvalReport, metric: str) -> str | None:
    """The per-example outcomes behind ``metric`` (None: not an accuracy with outcomes)."""
    if metric == CLEAN:
        return "clean"
    if metric == WORST:
        return "worst"
    if metric == AUTOATTACK:
        return next((a.name for a in report.attacks if a.kind is AttackKind.AUTOATTACK), None)
    if metric.startswith(ROBUST_PREFIX):
        return metric[len(ROBUST_PREFIX):]
    return None


def margin(winner: tuple[str, EvalReport | None], runner_up: tuple[str, EvalReport | None], metric: str,
           mode: str = "max") -> dict[str, Any] | None:
    """The winner against the runner-up on ``metric``: difference (winner - runner-up, in the
    direction of ``mode``), its 95% interval, the exact McNemar p, and whether the winner is separable
    (p < 0.05). None when either has no per-example outcomes on the same examples."""
    (wid, wr), (rid, rr) = winner, runner_up
    if wr is None or rr is None:
        return None
    name_w, name_r = outcome_name(wr, metric), outcome_name(rr, metric)
    if name_w is None or name_r is None or wr.n_of(name_w) != rr.n_of(name_r):
        return None
    ow, orr = wr.outcomes(name_w), rr.outcomes(name_r)
    if ow is None or orr is None:
        return None
    a, b = np.array([orr], dtype=bool), np.array([ow], dtype=bool)
    if mode == "min":
        a, b = ~a, ~b
    c = stats.compare(b, a)
    up, down = c.discordant or (0, 0)
    separable = c.p < stats.ALPHA and c.diff > 0
    n = wr.n_of(name_w)
    text = (f"trial {wid} beats the runner-up {rid} on {metric} by {up - down} of {n} validation examples "
            f"({100 * c.diff:+.1f} points, 95% interval [{100 * c.ci95[0]:+.1f}, {100 * c.ci95[1]:+.1f}], exact "
            f"McNemar p = {c.p:.2g}): ")
    text += "separable." if separable else ("not separable from the runner-up at this size: the ranking of the top "
                                            "two (and importances drawn from such trials) cannot be told from noise.")
    return {"winner": wid, "runner_up": rid, "metric": metric, "diff": c.diff, "ci95": list(c.ci95), "p": c.p,
            "examples_won": up, "examples_lost": down, "n": n, "separable": separable, "text": text}


def sweep_margin(ranked: list[Mapping[str, Any]], reports: Mapping[str, EvalReport | None], metric: str,
                 mode: str) -> dict[str, Any] | None:
    """:func:`margin` for the first two of ``ranked`` (trial rows, best first)."""
    if len(ranked) < 2:
        return None
    w, r = (str(t["trial_id"]) for t in ranked[:2])
    return margin((w, reports.get(w)), (r, reports.get(r)), metric, mode)
