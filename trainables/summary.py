"""A study's answer from Tune's results: one row per trial (its status, times, evaluation and
flags), the one ranking of trials (best first), the Pareto front of a multi-objective study, and
an ablation's table over seeds."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ancra_tune.config import inactive_keys
from ancra_tune.robustness import EvalReport

from . import sessions
from . import statuses as S
from . import trial_rows as R
from .ranking import row_rank_key
from .study import Study
from .trial import SEED_KEY
from .worker import REPORT_NAME

log = logging.getLogger(__name__)


REPORTED_TIMES = "_reported_at"  # a row's result times, used by summarize and dropped


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
        status = S.ERROR if res.error else (S.DIVERGED if R.is_diverged(metrics) else
                                            S.FINISHED if last_final is not None else
                                            S.STOPPED if trial_id in stopped_by_scheduler or not interrupted
                                            else S.INTERRUPTED)
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
        if status == S.DIVERGED:
            row["diverged_epoch"] = metrics.get(R.DIVERGED_EPOCH)
        if last_final is not None:
            report = read_report(last_final.get(R.CHECKPOINT_PATH) or row["checkpoint"])
            if report is not None:
                row.update(report.metrics())
                row["flags"] = {m: report.flags(m) for m in study.objective.metrics if report.flags(m)}
                row["checks_failed"] = [c.name for c in report.checks if c.failed]
                row["masked_metrics"] = report.masked_metrics
            else:  # no report to read (e.g. storage gone): the reported numbers, unchecked
                row.update({k: v for k, v in R.metrics_of(last_final).items() if k in study.objective_metrics()})
                row["flags"] = {m: ["no evaluation report to check"] for m in study.objective.metrics}
            for m in study.objective.metrics:
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
    metric, mode = study.objective.metric, study.objective.mode
    scored = [r for r in rows if r["status"] == S.FINISHED and r.get(metric) is not None]
    best: list[dict[str, Any]] = []
    if study.objective.multi:
        trusted = [r for r in scored if not r.get("flags")] or scored
        best = pareto_front(trusted, [R.objective_key(m) for m in study.objective.metrics], study.objective.modes)
    elif scored:
        best = [max(scored, key=lambda r: row_rank_key(r, metric, mode))]
    train_total = sum(r["train_time_s"] for r in rows)
    val_total, eval_total = sum(r["val_time_s"] for r in rows), sum(r["eval_time_s"] for r in rows)
    slots = max(1, min(slots, len(rows)))
    study_wall = sessions.wall_time_s(history, reported) if history else wall_s
    useful = train_total + val_total + eval_total
    share = None
    if study_wall > 0 and useful <= study_wall * slots * 1.01:  # 1%: clocks of other processes
        share = min(1.0, max(0.0, 1 - useful / (study_wall * slots)))
    return {"study": study.name, "kind": study.kind, "study_file": str(study.path),
            "study_dir": str(Path(storage) / study.name), "objective": dict(zip(study.objective.metrics,
                                                                       study.objective.modes, strict=True)),
            "wall_time_s": study_wall, "session_wall_time_s": wall_s,
            "sessions": len(history) if history else 1, "trial_train_time_s": train_total,
            "trial_val_time_s": val_total, "trial_eval_time_s": eval_total, "slots": slots,
            "overhead_share": share,
            "n_trials": len(rows), "status_counts": {s: sum(r["status"] == s for r in rows) for s in S.TRIAL_STATUSES},
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
    keys = list(study.ablation.grid)
    table = []
    for point in study.grid_points():
        group = [r for r in rows if all(r["params"].get(k) == v for k, v in point.items())]
        row: dict[str, Any] = dict(point)
        row["seeds"] = len(group)
        row["finished"] = sum(r["status"] == S.FINISHED for r in group)
        for col in TABLE_COLUMNS:
            vals = [r[col] for r in group if isinstance(r.get(col), (int, float)) and not _nan(r.get(col))]
            row[f"{col}_mean"] = statistics.fmean(vals) if vals else None
            row[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        table.append(row)
    assert all(set(keys) <= set(r) for r in table)
    return table


def write_ablation_tables(rows: list[dict[str, Any]], study: Study, out: Path) -> tuple[Path, Path]:
    table = ablation_table(rows, study)
    keys = list(study.ablation.grid)
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
