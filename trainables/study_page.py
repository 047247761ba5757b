"""A finished study's answer as one page: ``ancra-tune report STUDY``.

Built from the study's own records (its ``summary.json`` and each finished trial's evaluation
report with its per-example outcomes, kept in the study folder's ``reports/``; beside the
checkpoint for older studies; from the summary's own numbers when neither is left), so it needs
neither Ray nor MLflow; when the summary names an MLflow study run that answers, the page is
logged to it (``report/``).

Ablation: the one ablation table (:mod:`trainables.ablation_table`): every cell with n, seeds and
its 95% interval, every row against the baseline with a paired test (Holm-corrected), the
smallest difference the design resolves, and ``table.json``. Sweep: the best trials (each cell with
its interval), whether the winner is separable from the runner-up, Optuna's parameter importance
(said to be noise when the top trials are not separable), the best-so-far curve, the clean/robust
Pareto front, and each searched parameter against the objective. Every page ends with how it was
made.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

from ancra_tune.config import params_text
from ancra_tune.robustness import EvalReport

from . import statuses as S
from . import storage as storage_mod
from .ranking import creation_order, row_rank_key
from .selection import sweep_margin
from .summary import StudySummary, load_reports
from .trial import SEED_KEY

WORST = "robust_acc_worst"


class StudyNotFoundError(FileNotFoundError):
    pass


def find_summary(study: str, storage: str | None = None) -> Path:
    """``study``: a summary.json, a study folder, or a study name under the storage folder
    (``--storage``, ``$ANCRA_STORAGE``, else ``runs/studies``)."""
    p = Path(study)
    candidates = [p, p / "summary.json"]
    root = Path(storage_mod.root(storage))
    if not storage_mod.is_uri(str(root)):
        candidates.append(root / study / "summary.json")
    for c in candidates:
        if c.is_file() and c.name == "summary.json":
            return c
    raise StudyNotFoundError(f"no finished study {study!r}: looked for {', '.join(map(str, candidates[1:]))} "
                             "(run the study first, or give its folder or summary.json)")


# --------------------------------------------------------------------------- numbers


def trial_cells(trial: dict[str, Any], report: EvalReport | None) -> dict[str, Any]:
    """One trial's cells as the ablation table builds them (one seed: the Wilson interval)."""
    from . import ablation_table

    table = ablation_table.build([{**trial, "params": {**trial["params"], "seed": 0}}],
                                 {str(trial["trial_id"]): report}, [])
    return table["rows"][0] if table["rows"] else {}


# --------------------------------------------------------------------------- sweeps


def best_so_far(summary: StudySummary, metric: str, mode: str) -> list[dict[str, float]]:
    """One point per trial in creation order: epochs spent so far and the best objective so far."""
    sign = 1 if mode == "max" else -1
    best, epochs, out = None, 0, []
    for i, t in enumerate(sorted(summary["trials"], key=creation_order), 1):
        epochs += int(t.get("epochs_run") or 0)
        v = t.get(metric) if t["status"] == S.FINISHED and not t.get("flags", {}).get(metric) else None
        if v is not None and (best is None or sign * v > sign * best):
            best = v
        out.append({"trial": i, "epochs": epochs, "best": best})
    return out


def importance(summary: StudySummary, metric: str, mode: str, space: dict[str, Any]) -> dict[str, float]:
    """Optuna's parameter importance (fANOVA) over the finished trials; {} when too few."""
    import optuna

    finished = [t for t in summary["trials"] if t["status"] == S.FINISHED and t.get(metric) is not None]
    if len(finished) < 3 or not space:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for t in finished:
        params = {k: v for k, v in t["params"].items() if k in space and k not in t.get("inactive", ())}
        dists = {k: space[k] for k in params}
        st.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(t[metric])))
    try:
        return dict(optuna.importance.get_param_importances(st))
    except (RuntimeError, ValueError, ZeroDivisionError):  # e.g. every value equal
        return {}


def distributions(study: Any) -> dict[str, Any]:
    import optuna

    out: dict[str, Any] = {}
    for p in getattr(study, "space", ()):
        if p.choices is not None:
            out[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.integer:
            out[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    return out


def sweep_plots(summary: StudySummary, metric: str, mode: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    curve = best_so_far(summary, metric, mode)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, x, label in ((axes[0], "trial", "trials started"), (axes[1], "epochs", "epochs trained")):
        ax.step([c[x] for c in curve], [c["best"] if c["best"] is not None else math.nan for c in curve],
                where="post")
        ax.set_xlabel(label)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "best_so_far.png", dpi=110)
    plt.close(fig)
    files.append("best_so_far.png")

    done = [t for t in summary["trials"] if t["status"] == S.FINISHED and t.get(metric) is not None]
    if done:
        from .summary import pareto_front

        front = pareto_front(done, ["clean_acc", metric], ["max", mode])
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        ax.scatter([t["clean_acc"] for t in done], [t[metric] for t in done], c="tab:blue", label="trials")
        fr = sorted(front, key=lambda t: t["clean_acc"])
        ax.plot([t["clean_acc"] for t in fr], [t[metric] for t in fr], "o-", c="tab:red", label="Pareto front")
        flagged = [t for t in done if t.get("flags", {}).get(metric)]
        if flagged:
            ax.scatter([t["clean_acc"] for t in flagged], [t[metric] for t in flagged], marker="x", c="k",
                       label="flagged by the checks")
        ax.set_xlabel("clean accuracy")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)
        files.append("pareto.png")
        names = sorted({k for t in done for k in t["params"] if k != "seed"})
        if names:
            fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.8), squeeze=False)
            for ax, name in zip(axes[0], names, strict=True):
                pts = [(t["params"][name], t[metric]) for t in done
                       if name in t["params"] and name not in t.get("inactive", ())]
                xs = [str(x) if isinstance(x, (bool, str)) else x for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], s=18)
                ax.set_xlabel(name.rsplit(".", 1)[-1])
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel(metric)
            fig.tight_layout()
            fig.savefig(out / "params.png", dpi=110)
            plt.close(fig)
            files.append("params.png")
    return files


# --------------------------------------------------------------------------- the page


def runs_line(summary: StudySummary, points: list[dict[str, Any]] | None, seeds: list[int] | None) -> list[str]:
    """How many of the runs the study file asks for are in the table, and which are not (a study
    published before its end, or runs that failed: no cell counts them)."""
    if points is None or seeds is None:
        return []
    missing = []
    for point in points:
        for seed in seeds:
            t = next((t for t in summary["trials"] if t["params"].get(SEED_KEY) == seed
                      and all(t["params"].get(k) == v for k, v in point.items())), None)
            if t is None or t["status"] != S.FINISHED:
                missing.append(f"{params_text(point)} seed {seed} ({'not started' if t is None else t['status']})")
    total = len(points) * len(seeds)
    text = (f"**Runs.** The study file asks for {len(points)} configurations x {len(seeds)} seeds = {total} runs; "
            f"{total - len(missing)} finished, and only they are in the cells below.")
    if missing:
        text += f" Not finished, so in no cell: {'; '.join(missing)}."
    return [text, ""]


def by_session(history: list[Any], describe: Any) -> str:
    """``describe`` of each session, consecutive sessions that say the same grouped: "sessions 1-9:
    not recorded; sessions 10-12: `d8ffc69`" (one kind of session: only what it says)."""
    groups: list[list[Any]] = []
    for i, s in enumerate(history, 1):
        text = describe(s)
        if groups and groups[-1][2] == text:
            groups[-1][1] = i
        else:
            groups.append([i, i, text])
    if len(groups) == 1:
        return groups[0][2]
    return "; ".join(f"session{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {t}" for a, b, t in groups)


def study_file_of(summary: StudySummary, summary_path: Path | None = None) -> Path:
    """The study file the summary names, or the copy shipped beside ``summary_path`` when that path is gone."""
    study_file = Path(summary.get("study_file", ""))
    if summary_path is not None and not study_file.is_file() and (summary_path.parent / study_file.name).is_file():
        return summary_path.parent / study_file.name
    return study_file


def provenance(summary: StudySummary, summary_path: Path | None = None) -> list[str]:
    import torch

    from . import sessions
    from .code_version import describe, describe_machine, git_commit, running_code, this_machine

    study_file = study_file_of(summary, summary_path)
    history = sessions.load(summary["study_dir"]) if summary.get("study_dir") else []
    shipped = summary_path.parent / "sessions.json" if summary_path is not None else None
    if not history and shipped is not None and shipped.is_file():  # an export, the study folder gone
        history = sessions.parse(json.loads(shipped.read_text()))
    here = running_code()
    built = describe(here)
    if study_file.is_file() and (mine := git_commit(study_file)) and mine[0] != here["commit"]:
        built += f"; the study file's repository at `{mine[0][:7]}`" + (" with uncommitted changes" if mine[1] else "")
    lines = ["## How this page was made", "",
             f"- study file: `{study_file}`; storage: `{summary.get('study_dir')}`"]
    if history:
        code = by_session(history, lambda s: describe(s.code))
        lines += [f"- code each of its {len(history)} session(s) ran: {code}",
                  f"- machine (each session's driver): {by_session(history, lambda s: describe_machine(s.machine))}"]
    lines += [f"- page built by code at {built}, on {describe_machine(this_machine())}; Python "
              f"{platform.python_version()}, torch {torch.__version__}",
              f"- study wall time: {summary.get('wall_time_s', 0):.0f} s (trials' training "
              f"{summary.get('trial_train_time_s', 0):.0f} s); trials: " +
              ", ".join(f"{n} {k}" for k, n in summary.get("status_counts", {}).items() if n),
              f"- built by: `ancra-tune report {summary.get('study')}`"]
    if study_file.is_file():
        lines += ["", "<details><summary>study file</summary>", "", "```yaml", study_file.read_text().rstrip(),
                  "```", "", "</details>"]
    return lines


def build_page(summary_path: Path, out: Path | None = None, beside: Path | None = None) -> Path:
    """Write report.md (and its PNGs) for the study of ``summary_path``; return the page's path.
    ``beside``: a published table to set beside an ablation's (:mod:`trainables.reference_table`)."""
    summary = json.loads(summary_path.read_text())
    ref = None
    if beside is not None:
        from . import reference_table

        if summary["kind"] != "ablation":
            raise reference_table.ReferenceError("--beside sets a published table beside an ablation's rows; "
                                                 f"{summary['study']} is a {summary['kind']}")
        ref = reference_table.load(beside)
    out = out or summary_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    reports = load_reports(summary, beside=summary_path.parent)
    metric, mode = next(iter(summary["objective"].items()))
    study_file = study_file_of(summary, summary_path)
    lines = [f"# Study `{summary['study']}` ({summary['kind']})", ""]
    if summary["kind"] == "ablation":
        from . import ablation_table

        keys = sorted({k for t in summary["trials"] for k in t["params"] if k != SEED_KEY})
        points = baseline = seeds = None
        try:  # the grid's order, its seeds and the study's baseline, when the study file is still there
            from .study import load_study

            study = load_study(study_file)
            keys, points, baseline = list(study.ablation.grid), study.grid_points(), study.ablation.baseline
            seeds = list(study.seeds)
        except Exception:  # noqa: BLE001 (the trials' own order, the first point as the baseline)
            pass
        table = ablation_table.build(summary["trials"], reports, keys, points=points, baseline=baseline, seeds=seeds)
        lines += ["## Accuracy by configuration", ""] + runs_line(summary, points, seeds) + \
            ablation_table.markdown(table)
        if ref is not None:
            from . import reference_table

            lines += [""] + reference_table.markdown(table, ref)
        (out / "table.json").write_text(json.dumps(table, indent=1, default=str))
    else:
        from .study import load_study

        space: dict[str, Any] = {}
        try:
            space = distributions(load_study(study_file))
        except Exception:  # noqa: BLE001 (the study file moved: no importance, the rest stands)
            space = {}
        done = sorted((t for t in summary["trials"] if t["status"] == S.FINISHED and t.get(metric) is not None),
                      key=lambda t: row_rank_key(t, metric, mode),
                      reverse=True)
        lines += [f"Objective: `{metric}` ({mode}), validation split. {len(done)} of {summary['n_trials']} "
                  "trials finished; the others were stopped early (ASHA) or did not finish.", "",
                  "## Best trials", ""]
        from .ablation_table import COLUMNS, _cell

        any_report = next((r for r in reports.values() if r is not None), None)
        lines += ["| trial | n | " + " | ".join(f"{c.title(any_report)} (%)" for c in COLUMNS) + " | parameters |",
                  "|" + "---|" * (len(COLUMNS) + 3)]
        for t in done[:5]:
            cells = trial_cells(t, reports.get(str(t["trial_id"])))
            n = (cells.get("clean") or {}).get("n", "–")
            params = params_text(t["params"], inactive=t.get("inactive", ()))
            lines.append(f"| {t['trial_id']} | {n} | " + " | ".join(_cell(cells.get(c.key)) for c in COLUMNS)
                         + f" | {params} |")
        lines += ["", "Each cell: accuracy in % and its 95% interval (Wilson, one model on n validation examples); "
                  "⚠n: a masking check says this attack was fooled."]
        sel = summary.get("selection") or sweep_margin(done, reports, metric, mode)
        separable = bool(sel and sel["separable"])
        if sel:
            lines += ["", f"**Selection.** {sel['text']}"]
        imp = importance(summary, metric, mode, space)
        lines += ["", "## Parameter importance (Optuna, fANOVA over finished trials)", ""]
        lines += ([f"- `{k}`: {v:.2f}" for k, v in imp.items()] if imp else
                  ["Too few finished trials (or no spread in the objective) to say."])
        if imp and not separable:
            lines += ["", f"These importances are drawn from {len(done)} trials whose best two cannot be told apart "
                      "on the validation examples: read them as noise until a larger evaluation separates the trials."]
        files = sweep_plots(summary, metric, mode, out)
        lines += ["", "## Search", ""] + [f"![{f}]({f})" for f in files]
        curve = best_so_far(summary, metric, mode)
        (out / "best_so_far.json").write_text(json.dumps(curve))
    lines += [""] + provenance(summary, summary_path)
    page = out / "report.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def log_page(summary_path: Path, page: Path) -> str | None:
    """Log the page's folder to the study's MLflow run; the run id, or None if there is none."""
    summary = json.loads(summary_path.read_text())
    info = summary.get("mlflow") or {}
    if not info.get("study_run_id"):
        return None
    from .tracking import check_tracking, client

    try:
        check_tracking(info["tracking_uri"])
        client(info["tracking_uri"]).log_artifacts(info["study_run_id"], str(page.parent), artifact_path="report")
    except Exception as e:  # noqa: BLE001 (the page is on disk either way)
        print(f"warning: the page was not logged to MLflow ({e})", file=sys.stderr)
        return None
    return str(info["study_run_id"])
