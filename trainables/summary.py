"""A study's answer from Tune's results: one row per trial (its status, times, evaluation and
flags), the one ranking of trials (best first), the Pareto front of a multi-objective study, and
an ablation's table over seeds."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from ancra_tune.config import inactive_keys
from ancra_tune.robustness import EvalReport

from . import ablation_table, sessions
from . import statuses as S
from . import storage as storage_mod
from . import trial_rows as R
from .ranking import row_rank_key
from .selection import sweep_margin
from .study import Study
from .study_export import imported_rows
from .trial import SEED_KEY
from .worker import REPORT_NAME

log = logging.getLogger(__name__)


class TrialRow(TypedDict, total=False):
    """One trial in a study's summary (``summary.json``'s ``trials``), as the CLI's table, the report
    page, the ablation table and tracking read it. Besides these keys a finished trial's row holds its
    evaluation's metrics (``clean_acc``, ``robust_acc_worst``, ``acc_<attack>``, ...: see
    ``EvalReport.metrics``) and ``objective.<metric>`` (the credible value the searcher was told)."""

    trial_id: str
    status: str  # statuses.TRIAL_STATUSES
    params: dict[str, Any]  # the searched or grid values and the seed
    checkpoint: str | None  # the last checkpoint (a path or a URI)
    report: str  # the evaluation report inside the study folder (reports/<trial>.json)
    epochs_run: int
    train_time_s: float
    val_time_s: float
    eval_time_s: float
    time_per_epoch_s: float | None
    trial_dir: str
    inactive: list[str]  # parameters this configuration does not use
    diverged_epoch: int | None
    flags: dict[str, list[str]]  # objective metric -> why the checks do not trust it
    checks_failed: list[str]
    masked_metrics: list[str]


class StudySummary(TypedDict, total=False):
    """A study's answer (``summary.json``): what ``summarize`` returns and the study adds."""

    study: str
    kind: str
    study_file: str
    study_dir: str
    objective: dict[str, str]  # metric -> mode
    wall_time_s: float
    session_wall_time_s: float
    sessions: int
    trial_train_time_s: float
    trial_val_time_s: float
    trial_eval_time_s: float
    slots: int
    overhead_share: float | None
    n_trials: int
    status_counts: dict[str, int]
    flagged_trials: dict[str, dict[str, list[str]]]
    best: list[TrialRow]
    selection: dict[str, Any] | None  # the winner against the runner-up (selection.margin)
    trials: list[TrialRow]
    outcome: str  # sessions.OUTCOMES
    interrupted: bool
    mlflow: dict[str, Any]


REPORTED_TIMES = "_reported_at"  # a row's result times, used by summarize and dropped
REPORT_OBJ = "_report"  # a row's evaluation report, kept in the study folder by summarize and dropped
#: each finished trial's evaluation report (per-example outcomes included) inside the study folder,
#: so the study's tables can be recomputed from the folder alone (checkpoints may be deleted)
REPORTS_DIR = "reports"


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
                interrupted: bool = False) -> list[TrialRow]:
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
        row: TrialRow = {"trial_id": trial_id, "status": status,
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
        mark = carried_mark(res)
        if mark is not None:  # went on from state carried off a lost machine: its epochs there count too
            row["carried_from"] = mark
            row["train_time_s"] += float(mark.get("train_time_s") or 0.0)
        if status == S.DIVERGED:
            row["diverged_epoch"] = metrics.get(R.DIVERGED_EPOCH)
        if last_final is not None:
            report = read_report(last_final.get(R.CHECKPOINT_PATH) or row["checkpoint"])
            if report is not None:
                row[REPORT_OBJ] = report
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


def carried_mark(res: Any) -> dict[str, Any] | None:
    """What a trial went on from when its state was carried off a lost machine
    (:mod:`trainables.study_carry`): the earlier trial, its epochs and training time; None if not."""
    from . import storage as storage_mod
    from .study_carry import read_mark

    try:
        fs = getattr(res, "filesystem", None)
        fs, path = (fs, res.path) if fs is not None else storage_mod.filesystem(res.path)
        return read_mark(fs, path)
    except (OSError, ValueError, TypeError):
        return None


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
              history: list[sessions.Session] | None = None, interrupted: bool = False) -> StudySummary:
    """The study's answer. ``wall_s``: this session's wall time; ``history``: every session of the
    study (``wall_time_s`` is their sum, a killed one's estimated from its trials' results).
    ``slots``: trials run at once; ``overhead_share`` is the part of the trial slots' time (wall time
    x slots) not spent training, validating or evaluating: start-up, tracking, Tune's bookkeeping, and
    slots left idle; between 0 and 1, or None when the study's wall time is not known."""
    rows = _trial_rows(results, study, set(stopped_by_scheduler), interrupted=interrupted)
    reported = [t for r in rows for t in r.pop(REPORTED_TIMES)]
    reports = {str(r["trial_id"]): r.get(REPORT_OBJ) for r in rows}
    keep_reports(storage_mod.join(storage, study.name), rows)
    # A study started from its record (--from-record): the rows it brought in come first.
    here = {str(r["trial_id"]) for r in rows}
    brought = [dict(r, imported=True) for r in imported_rows(storage_mod.join(storage, study.name))
               if str(r["trial_id"]) not in here]
    rows = brought + rows
    metric, mode = study.objective.metric, study.objective.mode
    scored = [r for r in rows if r["status"] == S.FINISHED and r.get(metric) is not None]
    best: list[dict[str, Any]] = []
    if study.objective.multi:
        trusted = [r for r in scored if not r.get("flags")] or scored
        best = pareto_front(trusted, [R.objective_key(m) for m in study.objective.metrics], study.objective.modes)
    selection = None
    if not study.objective.multi and scored:
        ranked = sorted(scored, key=lambda r: row_rank_key(r, metric, mode), reverse=True)
        best = ranked[:1]
        if study.kind == "sweep":
            selection = sweep_margin(ranked, reports, metric, mode)
    train_total = sum(r["train_time_s"] for r in rows)
    val_total, eval_total = sum(r["val_time_s"] for r in rows), sum(r["eval_time_s"] for r in rows)
    slots = max(1, min(slots, len(rows)))
    study_wall = sessions.wall_time_s(history, reported) if history else wall_s
    useful = train_total + val_total + eval_total
    share = None
    if study_wall > 0 and useful <= study_wall * slots * 1.01:  # 1%: clocks of other processes
        share = min(1.0, max(0.0, 1 - useful / (study_wall * slots)))
    return {"study": study.name, "kind": study.kind, "study_file": str(study.path),
            "study_dir": storage_mod.join(storage, study.name), "objective": dict(zip(study.objective.metrics,
                                                                       study.objective.modes, strict=True)),
            "wall_time_s": study_wall, "session_wall_time_s": wall_s,
            "sessions": len(history) if history else 1, "trial_train_time_s": train_total,
            "trial_val_time_s": val_total, "trial_eval_time_s": eval_total, "slots": slots,
            "overhead_share": share,
            "n_trials": len(rows), "status_counts": {s: sum(r["status"] == s for r in rows) for s in S.TRIAL_STATUSES},
            "flagged_trials": {str(r["trial_id"]): r["flags"] for r in rows if r.get("flags")},
            "best": best, "selection": selection, "trials": rows}


def keep_reports(study_dir: str, rows: list[dict[str, Any]]) -> None:
    """Write each row's evaluation report into ``<study_dir>/reports/<trial>.json`` (the row names it)."""
    for row in rows:
        report = row.pop(REPORT_OBJ, None)
        if report is None:
            continue
        rel = f"{REPORTS_DIR}/{row['trial_id']}.json"
        try:
            storage_mod.write_text(storage_mod.join(study_dir, *rel.split("/")), json.dumps(report.to_dict()))
            row["report"] = rel
        except OSError as e:  # the summary still stands; the page falls back to the checkpoint's copy
            log.warning("cannot keep the evaluation report of trial %s in the study folder: %s", row["trial_id"], e)


def load_reports(summary: StudySummary, beside: Path | None = None) -> dict[str, EvalReport | None]:
    """Every finished trial's report: from the folder ``beside`` (where a copy of the summary was
    shipped with its ``reports/``: anyone reruns the tests from them), else the study folder, else
    beside its checkpoint."""
    out: dict[str, EvalReport | None] = {}
    for t in summary["trials"]:
        report = None
        if t.get("status") == S.FINISHED:
            text = None
            if t.get("report") and beside is not None and (beside / t["report"]).is_file():
                text = (beside / t["report"]).read_text()
            elif t.get("report"):
                text = storage_mod.read_text(storage_mod.join(summary["study_dir"], *t["report"].split("/")))
            if text is not None:
                report = EvalReport.from_dict(json.loads(text))
            else:
                report = read_report(t.get("checkpoint")) or report_from_row(t)
        out[str(t["trial_id"])] = report
    return out


_ATTACK = re.compile(r"^(?P<kind>fgsm|cw|mim|pgd|apgd-ce|apgd-t)(?P<steps>\d*)_(?P<target>[a-z]+)$")


def report_from_row(row: dict[str, Any]) -> EvalReport | None:
    """What a summary row still tells of its evaluation when the report itself is gone (a study of an
    older version whose checkpoints were deleted): each attack's accuracy, the example count and the
    checks that failed; no per-example outcomes, so tables built from it compare unpaired."""
    from dataclasses import replace

    from ancra_tune.robustness.checks import Check, CheckName, tolerance_examples
    from ancra_tune.robustness.report import AttackResult
    from ancra_tune.robustness.suite import SuiteConfig

    n = row.get("eval_n_examples")
    if not n or row.get("clean_acc") is None or row.get("robust_acc_worst") is None:
        return None
    n_check = int(row.get("eval_check_examples") or n)  # what each attack's accuracy was measured on
    attacks = []
    for key, acc in row.items():
        if not key.startswith("acc_") or acc is None:
            continue
        name = key[4:]
        m = _ATTACK.match(name)
        if m:
            kind, target, steps = m["kind"], m["target"], int(m["steps"] or 1)
            spec: tuple[Any, ...] = (kind, target, steps, 0.0, True)
        elif name.startswith("square"):
            spec = ("square", "black-box", int(name[6:] or 0), 0.0, True)
        elif name.startswith("transfer_"):
            kind = "transfer_mim" if name.startswith("transfer_mim") else "transfer_pgd"
            spec = (kind, "source", int(name[len(kind):] or 0), 0.0, True)
        elif name.startswith("autoattack"):
            spec = ("autoattack", "final", 0, 0.0, True)
        elif name.startswith("sweep_"):
            spec = ("sweep", "final", 0, float(name.rsplit("_eps", 1)[-1]), False)
        else:
            continue
        attacks.append(AttackResult(name, *spec, accuracy=float(acc), n=n_check))
    ks = [a.steps for a in attacks if a.kind == "pgd" and a.target == "final"]
    suite = replace(SuiteConfig(), pgd_steps=min(ks)) if ks else SuiteConfig()
    failed = list(row.get("checks_failed") or ())
    k = suite.pgd_steps
    a1, a2 = row.get(f"acc_pgd{k}_final"), row.get(f"acc_pgd{2 * k}_final")
    if CheckName.MORE_STEPS_NOT_WEAKER in failed and a1 is not None and a2 is not None:
        # decided again on counts (versions before 0.1.2 failed a tie by float rounding: 27% vs 25% + 2)
        if round(a2 * n_check) <= round(a1 * n_check) + tolerance_examples(suite.tol, n_check):
            failed.remove(CheckName.MORE_STEPS_NOT_WEAKER)
    checks = tuple(Check(c, False, "(recorded in the study's summary)",
                         scope="final" if c == CheckName.FINAL_OUTPUT_NOT_MASKED else "all") for c in failed)
    ra = any(a.target not in ("final", "black-box", "source") for a in attacks)
    return EvalReport(suite=suite, n_examples=int(n), ra=ra, n_classes=10, clean_acc=float(row["clean_acc"]),
                      robust_acc_worst=float(row["robust_acc_worst"]), attacks=tuple(attacks), checks=checks,
                      meta={"from_summary_row": True}, check_examples=n_check)


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

def ablation_of(study: Study, summary: StudySummary) -> dict[str, Any]:
    """The study's one ablation table (:mod:`trainables.ablation_table`) from its summary."""
    return ablation_table.build(summary["trials"], load_reports(summary), list(study.ablation.grid),
                                points=study.grid_points(), baseline=study.ablation.baseline)


def write_ablation_tables(study: Study, summary: StudySummary, out: Path) -> tuple[Path, Path, Path]:
    """``ablation.md``, ``ablation.csv`` and ``table.json`` into ``out``."""
    table = ablation_of(study, summary)
    csv_path, md_path, json_path = out / "ablation.csv", out / "ablation.md", out / "table.json"
    csv_path.write_text(ablation_table.to_csv(table))
    json_path.write_text(json.dumps(table, indent=1, default=str))
    md_path.write_text(f"# {study.name}: seeds {list(study.seeds)}\n\n" + "\n".join(ablation_table.markdown(table))
                       + "\n")
    return csv_path, md_path, json_path
