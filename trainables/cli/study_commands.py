"""`ancra-tune sweep` and `ancra-tune ablate`: run a study to its end, print its answer, and exit with
a code that says how it ended (README: "Exit codes")."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ancra_tune.config import (
    params_text,
)

from .. import statuses as S
from .. import trial_rows as R
from ..ranking import row_rank_key

if TYPE_CHECKING:
    from ..summary import StudySummary
from .codes import EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE


def _study(args: argparse.Namespace, kind: str) -> int:
    import contextlib
    import json
    import shlex

    from ..disk import StorageError
    from ..ray_session import InfeasibleResourcesError
    from ..study import load_study  # Ray loads only for these commands
    from ..study_lock import StudyLockedError
    from ..study_run import run_study
    from ..tracking import TrackingError

    study = load_study(args.file)
    if study.kind != kind:
        print(f"error: {args.file} is a {study.kind} study; run it with `ancra-tune "
              f"{'sweep' if study.kind == 'sweep' else 'ablate'}`", file=sys.stderr)
        return EXIT_USAGE
    argv = _without_more([a for a in sys.argv[1:] if a != "--resume"]) if sys.argv[1:2] == [args.command] else \
        [args.command, args.file]
    resume_command = shlex.join(["ancra-tune", *argv, "--resume"])
    # --json: stdout holds the JSON alone (it can be piped); every line for people goes to stderr.
    console = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with console:
            summary = run_study(study, address=args.address, storage=args.storage, resume=args.resume,
                                smoke_test=args.smoke_test, num_cpus=args.num_cpus,
                                wait_for_resources=args.wait_for_resources, tracking_uri=args.tracking_uri,
                                track=not args.no_mlflow, resume_command=resume_command, verbose=args.verbose,
                                more=getattr(args, "more", None), from_record=getattr(args, "from_record", None),
                                carry=getattr(args, "carry", None))
    except (InfeasibleResourcesError, TrackingError, StorageError, StudyLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\nstopped at once; the last saved state resumes with: {resume_command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(summary), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    return study_exit_code(summary)

def _without_more(argv: list[str]) -> list[str]:
    """The command line without ``--more N``, ``--from-record FOLDER`` or ``--carry FOLDER`` (an
    interrupted extension, or a study started from its record, resumes with ``--resume`` alone)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--more", "--from-record", "--carry"):
            skip = True
        elif not a.startswith(("--more=", "--from-record=", "--carry=")):
            out.append(a)
    return out


def _plan(args: argparse.Namespace) -> int:
    import json

    from ..plan import format_plan, make_plan
    from ..storage import root as storage_root
    from ..study import load_study

    study = load_study(args.file)
    plan = make_plan(study, args.detect, storage=storage_root(args.storage), seeds=args.seeds,
                     measure=not args.no_probe)
    print(format_plan(plan), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(plan, indent=1, default=str))
    return 0


def _status(args: argparse.Namespace) -> int:
    """0 when the study has begun (running or not), 2 when its folder holds no session of it."""
    import json
    import shlex

    from ..storage import root as storage_root
    from ..study import load_study
    from ..study_status import format_status, study_status

    study = load_study(args.file)
    root = storage_root(args.storage)
    st = study_status(study, root)
    if not st.sessions:
        print(f"error: study {study.name} has not run in {root} (no {st.study_dir}/study_state); run it with "
              f"`ancra-tune {'ablate' if study.kind == 'ablation' else 'sweep'} {args.file}`", file=sys.stderr)
        return EXIT_USAGE
    command = shlex.join(["ancra-tune", "ablate" if study.kind == "ablation" else "sweep", args.file,
                          *(["--storage", args.storage] if args.storage else []), "--resume"])
    print(format_status(st, resume_command=command), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(st.to_dict(), indent=1, default=str))
    return 0


def study_exit_code(summary: StudySummary) -> int:
    """0: the study finished and at least one trial did; 1: it ended without a finished trial, or a full
    disk stopped it; 130: interrupted (``--resume`` continues). Usage and config errors exit 2 earlier."""
    from .. import sessions

    codes = {sessions.FINISHED: EXIT_DONE, sessions.FAILED: EXIT_FAILED, sessions.DISK_FULL: EXIT_FAILED,
             sessions.INTERRUPTED: EXIT_INTERRUPTED}
    # A summary of an older version has no outcome: derived from it the same way.
    return codes[summary.get("outcome") or sessions.outcome_of(summary)]

def _useful_time(summary: StudySummary) -> str:
    """Validation and evaluation time, and the share of the trial slots' time spent on neither
    them nor training (older summaries lack these)."""
    if "trial_eval_time_s" not in summary:
        return ""
    text = f", validation {summary['trial_val_time_s']:.0f} s, evaluation {summary['trial_eval_time_s']:.0f} s"
    if summary.get("overhead_share") is None:
        return text
    sessions = summary.get("sessions", 1)
    over = f" over {sessions} sessions" if sessions > 1 else ""
    return (text + f" ({summary.get('slots', 1)} at a time{over}: {100 * summary['overhead_share']:.0f}% of the "
            "trial slots' time spent on anything else)")

def format_summary(summary: StudySummary) -> str:
    """The study's answer: every trial in one table, best first (trials the checks flag last),
    then the best trial and what to run next."""
    metric, mode = next(iter(summary["objective"].items()))
    lines = [f"study {summary['study']} ({summary['kind']}): {summary['n_trials']} trials, "
             + ", ".join(f"{n} {k}" for k, n in summary["status_counts"].items() if n)
             + f"; wall {summary['wall_time_s']:.0f} s, training {summary['trial_train_time_s']:.0f} s"
             + _useful_time(summary) + "; objective "
             + ", ".join(f"{k} ({v})" for k, v in summary["objective"].items())]

    def num(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    def status(t: dict) -> str:
        if t["status"] == S.STOPPED:
            return f"stopped@{t['epochs_run']}"
        if t["status"] == S.DIVERGED:
            return f"diverged@{t.get('diverged_epoch')}"
        return t["status"]

    # The one ranking (the best trial comes first); trials without an evaluation by their last
    # per-epoch number.
    rows = sorted(summary["trials"], key=lambda t: (*row_rank_key(t, metric, mode), t.get("val_robust_acc") or 0.0),
                  reverse=True)
    short = R.short_ids(t["trial_id"] for t in summary["trials"])
    w = max([10, *map(len, short.values())])
    header = f"  {'trial':<{w}} {'status':<12} {'clean':>7} {metric:>17} {'autoattack':>10} {'val_robust':>10}  params"
    lines.append(header)
    for t in rows:
        params = params_text(t["params"], inactive=t.get("inactive", ()))
        flag = " !" if t.get("flags", {}).get(metric) else "  "
        tid = short[str(t["trial_id"])]
        state = status(t) + ("*" if t.get("imported") else "")
        lines.append(f"  {tid:<{w}} {state:<12} {num(t.get('clean_acc')):>7} {num(t.get(metric)):>15}{flag} "
                     f"{num(t.get('autoattack_acc')):>10} {num(t.get('val_robust_acc')):>10}  {params}")
    if any(t.get("imported") for t in rows):
        lines.append("  * brought in from the study's record (--from-record): evaluated before the study's folder "
                     "was lost; its checkpoint went with the folder")
    flagged = {short.get(str(k), str(k)): v for k, v in summary.get("flagged_trials", {}).items()}
    if flagged:
        lines.append("  ! flagged by the gradient-masking checks (ranked last; see docs/masking_checks.md):")
        for tid, reasons in flagged.items():
            lines.append(f"    {tid}: " + "; ".join(r for rs in reasons.values() for r in rs))
    lines.append("  stopped trials show the last validation numbers they reached (val_robust, the scheduler's "
                 "per-epoch worst case)")
    for b in summary["best"]:
        where = b.get("checkpoint") or "none here (it came from the study's record; its folder was lost)"
        lines.append(f"best: trial {short.get(str(b['trial_id']), b['trial_id'])} ({metric} = {num(b.get(metric))}, "
                     f"clean {num(b.get('clean_acc'))})\n  checkpoint: {where}")
        if b.get("flags"):
            lines.append(f"  warning: every finished trial is flagged; this one's {metric} is not credible: "
                         f"{'; '.join(b['flags'].get(metric, []))}")
    if summary.get("selection"):
        lines.append("  margin: " + summary["selection"]["text"])
    if not summary["best"]:
        lines.append("no trial finished: nothing to choose from")
    errored = [short[str(t["trial_id"])] for t in summary["trials"] if t["status"] == S.ERROR]
    if errored and not summary.get("interrupted"):
        lines.append(f"{len(errored)} trial(s) failed with an error ({', '.join(errored[:8])}"
                     f"{', ...' if len(errored) > 8 else ''}): their logs are in their trial folders; --resume "
                     "runs them again from their last checkpoint")
    lines.append(f"results: {summary['study_dir']}")
    if summary.get("interrupted"):
        cmd = summary.get("resume_command") or "the same command with --resume"
        if summary.get("interrupted_by") == "disk full":
            lines.append(f"stopped by a full disk ({summary.get('interrupted_because', '')}): free some space, then "
                         f"finish the unfinished trials with\n  {cmd}")
        else:
            lines.append(f"interrupted ({summary.get('interrupted_by') or 'stopped'}): finish the unfinished trials "
                         f"with\n  {cmd}")
    elif summary["best"] and summary["best"][0].get("checkpoint"):
        b = summary["best"][0]
        lines.append("next:\n"
                     f"  ancra-tune eval {b['checkpoint']}   # the full evaluation (AutoAttack standard) of the best\n"
                     f"  ancra-tune best {summary['study']}   # register it in MLflow as @champion")
    if summary.get("mlflow"):
        m = summary["mlflow"]
        ui = f"ancra-tune ui {summary['study']}" if m["tracking_uri"].startswith("sqlite:") else m["tracking_uri"]
        lines.append(f"  {ui}   # every trial in MLflow (study run {m['study_run_id']})")
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    """Copy a stopped study's record (summary, per-example outcomes, sessions, study file) into a folder
    of its own; --check: verify such a folder."""
    import shlex
    from pathlib import Path

    from ..storage import join, root
    from ..study import load_study
    from ..study_carry import CARRY_MANIFEST, check_carry, describe_carry
    from ..study_export import ExportError, check, describe, export
    from ..study_lock import StudyLockedError

    try:
        if args.check:
            problems = (check_carry if (Path(args.check) / CARRY_MANIFEST).is_file() else check)(args.check)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            print(f"{args.check}: {'intact' if not problems else f'{len(problems)} problem(s)'}",
                  file=sys.stderr if problems else sys.stdout)
            return EXIT_FAILED if problems else EXIT_DONE
        if not args.study or not args.to:
            print("error: give the study (its file or folder) and --to FOLDER, or --check FOLDER", file=sys.stderr)
            return EXIT_USAGE
        given = Path(args.study)
        study_file = None
        if given.is_dir():
            study_dir = str(given)
        else:
            study = load_study(args.study)
            study_file, study_dir = study.path, join(root(args.storage), study.name)
        manifest = export(study_dir, args.to, command=shlex.join(["ancra-tune", "export", *sys.argv[2:]]),
                          study_file=study_file, carry=args.carry)
    except (ExportError, StudyLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.to}: {describe(manifest)}; {manifest['_written']} file(s) written "
          f"({manifest['_changed']} replaced), {len(manifest['_removed'])} removed")
    if "_carry" in manifest:
        print(f"{args.carry}: {describe_carry(manifest['_carry'])}")
    return EXIT_DONE
