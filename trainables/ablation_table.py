"""The one ablation table: a row per configuration, each cell with n, seeds and its 95% interval,
each row against the baseline with a paired test, and the smallest difference the design resolves.

Built from the trials' evaluation reports (their per-example outcomes: :mod:`ancra_tune.robustness.stats`).
The study writes it at its end (``ablation.md``, ``ablation.csv``) and ``ancra-tune report`` puts
it on the study's page with ``table.json`` beside it::

    {"rows": [{"config": {...}, "<column>": {"mean", "std", "n", "seeds", "per_seed", "ci95", "flagged"}}],
     "comparisons": [{"row", "baseline", "metric", "diff", "ci95", "p", "p_holm", "test", "verdict"}],
     "mde": <fraction>, ...}

all accuracies as fractions. A page says "higher" or "lower" only where the Holm-corrected test
supports it; otherwise "no difference resolvable at this size".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ancra_tune.robustness import EvalReport, stats
from ancra_tune.robustness.report import ROBUST_PREFIX, WORST
from ancra_tune.robustness.suite import SURROGATES, AttackKind, Target

from . import statuses as S
from .trial import SEED_KEY


@dataclass(frozen=True)
class Column:
    key: str  # as table.json names it
    title: Callable[[EvalReport | None], str]  # named by attack and steps, from a report of the row
    what: str
    pick: Callable[[EvalReport], str | None]  # the outcome (attack name, clean, worst) of one report


def _strongest(report: EvalReport, keep: Callable[[Any], bool]) -> str | None:
    attacks = [a for a in report.attacks if a.in_worst_case and keep(a)]
    return min(attacks, key=lambda a: a.accuracy).name if attacks else None


def _pgd_k(report: EvalReport) -> str | None:
    k = report.suite.pgd_steps
    name = f"pgd{k}_final"
    return name if any(a.name == name for a in report.attacks) else None


COLUMNS = (
    Column("clean", lambda r: "clean", "no attack", lambda r: "clean"),
    Column("pgd_final", lambda r: f"PGD-{r.suite.pgd_steps if r else 'k'} on P'",
           "PGD on the final output P' alone, the paper's Table II measure (PGD-40 there)", _pgd_k),
    Column("adaptive_p", lambda r: "adaptive on P (P+P')",
           "the strongest attack on the sum of RA's outputs (the paper's adaptive attack 'with P', its Tables V "
           "and VIII), scored on the model's real prediction",
           lambda r: _strongest(r, lambda a: a.target is Target.SUM)),
    Column("adaptive", lambda r: "strongest through the gate",
           "the strongest attack through RA's gate (surrogates: aux, P+P', label, straight-through and soft "
           "gates), scored on P'", lambda r: _strongest(r, lambda a: a.target in SURROGATES)),
    Column("worst", lambda r: "worst case", "per example, over every attack at the evaluation budget",
           lambda r: "worst"),
    Column("autoattack", lambda r: "AutoAttack on P'", "AutoAttack (standard) on the final output",
           lambda r: _strongest(r, lambda a: a.kind is AttackKind.AUTOATTACK)),
)
TIME = "time_per_epoch_s"


def _flagged(report: EvalReport, name: str) -> bool:
    if name == "clean":
        return False
    return bool(report.flags(WORST if name == "worst" else ROBUST_PREFIX + name))


def _accuracy(report: EvalReport, name: str) -> float:
    if name == "clean":
        return report.clean_acc
    if name == "worst":
        return report.robust_acc_worst
    return report.attack(name).accuracy


@dataclass
class _Cell:
    seeds: list[int]
    outcomes: list[list[bool] | None]
    counts: list[int]
    n: int
    flagged: int

    @property
    def paired(self) -> bool:
        return all(o is not None and len(o) == self.n for o in self.outcomes)

    def matrix(self, seeds: Sequence[int]) -> np.ndarray:
        at = {s: o for s, o in zip(self.seeds, self.outcomes, strict=True)}
        return np.array([at[s] for s in seeds], dtype=bool)

    def counts_of(self, seeds: Sequence[int]) -> list[int]:
        at = dict(zip(self.seeds, self.counts, strict=True))
        return [at[s] for s in seeds]

    def estimate(self) -> stats.Estimate:
        if self.paired:
            return stats.estimate(self.matrix(self.seeds))
        return stats.estimate_from_counts(self.counts, self.n)


def _cells(trials: Sequence[Mapping[str, Any]], reports: Mapping[str, EvalReport | None]
           ) -> dict[str, _Cell]:
    """Each column's outcomes over a configuration's finished seeds (same n only)."""
    cells: dict[str, _Cell] = {}
    for t in sorted(trials, key=lambda t: int(t["params"].get(SEED_KEY, 0))):
        r = reports.get(str(t["trial_id"]))
        if t["status"] != S.FINISHED or r is None:
            continue
        for col in COLUMNS:
            name = col.pick(r)
            if name is None:
                continue
            n = r.n_of(name)  # clean and the worst case: every example; an attack: the check examples
            cell = cells.setdefault(col.key, _Cell([], [], [], n, 0))
            if n != cell.n:
                continue  # a trial evaluated on another number of examples cannot pool with the rest
            cell.seeds.append(int(t["params"].get(SEED_KEY, 0)))
            cell.outcomes.append(r.outcomes(name))
            cell.counts.append(int(round(_accuracy(r, name) * n)))
            cell.flagged += _flagged(r, name)
    return cells


def build(trials: Sequence[Mapping[str, Any]], reports: Mapping[str, EvalReport | None], grid_keys: Sequence[str],
          points: Sequence[Mapping[str, Any]] | None = None, baseline: Mapping[str, Any] | None = None,
          seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """The table as ``table.json`` holds it. ``points``: the grid's configurations in order (default:
    as the trials first show them); ``baseline``: the row the others are compared with (default:
    the first point); ``seeds``: the seeds the study asks of every row (default: the trials')."""
    keys = list(grid_keys)
    if points is None:
        points = []
        for t in trials:
            p = {k: t["params"].get(k) for k in keys}
            if p not in points:
                points.append(p)
    base = dict(baseline) if baseline is not None else (dict(points[0]) if points else {})
    any_report = next((r for r in reports.values() if r is not None), None)
    rows, cells_by_row = [], []
    for point in points:
        group = [t for t in trials if all(t["params"].get(k) == v for k, v in point.items())]
        cells = _cells(group, reports)
        row: dict[str, Any] = {"config": dict(point), "trials": len(group),
                               "finished": sum(t["status"] == S.FINISHED for t in group),
                               "planned_seeds": len(seeds) if seeds is not None else None}
        for col in COLUMNS:
            c = cells.get(col.key)
            row[col.key] = None if c is None else {**c.estimate().to_dict(), "flagged": c.flagged,
                                                    "paired_data": c.paired}
        failed = sorted({c.name for t in group if (r := reports.get(str(t["trial_id"]))) is not None
                         for c in r.checks if c.failed})
        row["checks_failed"] = failed
        times = [t[TIME] for t in group if t.get(TIME)]
        row[TIME] = float(np.mean(times)) if times else None
        rows.append(row)
        cells_by_row.append(cells)

    comparisons: list[dict[str, Any]] = []
    if base in [r["config"] for r in rows]:
        bi = [r["config"] for r in rows].index(base)
        for i, row in enumerate(rows):
            if i == bi:
                continue
            for col in COLUMNS:
                a, b = cells_by_row[bi].get(col.key), cells_by_row[i].get(col.key)
                if a is None or b is None or a.n != b.n:
                    continue
                seeds = [s for s in b.seeds if s in a.seeds]
                if not seeds:
                    continue
                if a.paired and b.paired:
                    cmp = stats.compare(b.matrix(seeds), a.matrix(seeds))
                else:
                    cmp = stats.compare_counts(b.counts_of(seeds), a.counts_of(seeds), a.n)
                comparisons.append({"row": row["config"], "baseline": base, "metric": col.key, "diff": cmp.diff,
                                    "ci95": list(cmp.ci95), "p": cmp.p, "test": cmp.test, "seeds": len(seeds),
                                    "n": a.n, "discordant": cmp.discordant, "_cmp": cmp})
    for c, adj in zip(comparisons, stats.holm([c["p"] for c in comparisons]), strict=True):
        c["p_holm"] = adj
        cmp = c.pop("_cmp")
        c["verdict"] = stats.verdict(stats.Comparison(cmp.diff, cmp.ci95, cmp.p, cmp.test, p_holm=adj))
    return {"rows": rows, "comparisons": comparisons, **_power(rows), "baseline": base,
            "columns": {c.key: {"title": c.title(any_report), "what": c.what} for c in COLUMNS},
            "family": "Holm over every comparison of the page"}


def _power(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The smallest difference on the worst case two rows of this design resolve (two-sided 5%,
    80% power), from its examples per seed, its seeds and the seeds' own spread."""
    cells = [r["worst"] for r in rows if r.get("worst")]
    if not cells:
        return {"mde": None}
    n = min(c["n"] for c in cells)
    seeds = min(c["seeds"] for c in cells)
    p = float(np.mean([c["mean"] for c in cells]))
    spreads = [stats.seed_spread(c["per_seed"], c["n"]) for c in cells if c["seeds"] > 1]
    sd = float(np.sqrt(np.mean(np.square(spreads)))) if spreads else 0.0
    return {"mde": stats.mde(p, n, seeds, seed_sd=sd), "mde_inputs": {"metric": "worst", "accuracy": p, "n": n,
                                                                      "seeds": seeds, "seed_sd": sd}}


# --------------------------------------------------------------------------- text


def _cell(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return "–"
    lo, hi = c["ci95"]
    flag = f" ⚠{c['flagged']}" if c.get("flagged") else ""
    return f"{100 * c['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]{flag}"


def _conf(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "(base)"


def markdown(table: Mapping[str, Any]) -> list[str]:
    """The table, its comparisons and its power, as the page prints them."""
    cols = [c for c in COLUMNS if any(r.get(c.key) for r in table["rows"])]
    titles = table["columns"]
    head = ["configuration", "seeds", "n/seed"] + [f"{titles[c.key]['title']} (%)" for c in cols] + \
        ["checks failed", "time/epoch (s)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        w = r.get("worst") or r.get("clean") or {}
        cells = [_conf(r["config"]), f"{w.get('seeds', 0)}/{r.get('planned_seeds') or r['trials']}",
                 str(w.get("n", "–"))]
        cells += [_cell(r.get(c.key)) for c in cols]
        cells += [", ".join(r["checks_failed"]) or "none",
                  "n/a" if r.get(TIME) is None else f"{r[TIME]:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Each cell: mean over seeds and examples, in % (fractions in table.json), and its 95% interval "
            "(two-way bootstrap over seeds and examples, never narrower than the Wilson interval of the pooled "
            "examples). ⚠n: in n seeds a masking check says this attack was fooled (read the worst case).", ""]
    out += [f"- **{titles[c.key]['title']}**: {c.what}." for c in cols]
    comps = table["comparisons"]
    if comps:
        out += ["", f"### Against the baseline ({_conf(table['baseline'])})", "",
                "| configuration | column | n x seeds | difference (points) | 95% interval | p | p (Holm) | "
                "what it supports |",
                "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            lo, hi = c["ci95"]
            out.append(f"| {_conf(c['row'])} | {titles[c['metric']]['title']} | {c['n']:,} x {c['seeds']} | "
                       f"{100 * c['diff']:+.1f} | "
                       f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {c['p']:.2g} | {c['p_holm']:.2g} | {c['verdict']} |")
        tests = sorted({c["test"] for c in comps})
        out += ["", f"Tests: {'; '.join(tests)}; p corrected for the {len(comps)} comparisons of this page "
                "(Holm). A difference is called higher or lower only where the corrected p is below 0.05, and "
                "said to be one of these seeds' models where its interval over seeds and examples still holds 0 "
                "(the test pools the seeds' examples; the interval resamples the seeds too)."]
    if table.get("mde") is not None:
        i = table["mde_inputs"]
        out += ["", f"**Power.** With {i['n']} examples per seed and {i['seeds']} seed(s) per row, near "
                f"{100 * i['accuracy']:.0f}% worst-case accuracy (seeds' own spread {100 * i['seed_sd']:.1f} points), "
                f"the smallest difference between two rows this design resolves (two-sided 5%, 80% power) is "
                f"**{100 * table['mde']:.1f} points**; `ancra-tune plan STUDY --detect 0.03` sizes a study for 3."]
    return out


def to_csv(table: Mapping[str, Any]) -> str:
    """One line per configuration: each column's mean, interval, n and seeds (fractions)."""
    keys = list(table["rows"][0]["config"]) if table["rows"] else []
    header = keys + [f"{c.key}_{s}" for c in COLUMNS for s in ("mean", "ci95_lo", "ci95_hi", "n", "seeds")] + [TIME]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in table["rows"]:
        line = [r["config"][k] for k in keys]
        for c in COLUMNS:
            cell = r.get(c.key)
            line += ["", "", "", "", ""] if cell is None else [cell["mean"], cell["ci95"][0], cell["ci95"][1],
                                                               cell["n"], cell["seeds"]]
        line.append("" if r.get(TIME) is None else r[TIME])
        w.writerow(line)
    return buf.getvalue()
