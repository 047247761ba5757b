"""The ``ancra-tune`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import PRESETS, ConfigError, TrainConfig, load_yaml_with_overrides, params_text, resolve_config_path
from .data import DatasetUnavailableError

#: exit codes of every command (README: "Exit codes"): done; failed (a study without a finished
#: trial, a full disk, a diverged training run); usage or configuration error; interrupted
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _train(args: argparse.Namespace) -> int:
    from .trainer import DivergedError, Trainer  # torch loads only for commands that need it

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.quiet:
        overrides.append("progress=false")
    cfg = TrainConfig.from_dict(load_yaml_with_overrides(resolve_config_path(args.config), overrides))
    if args.resume and not (Path(cfg.out_dir) / "checkpoint.pt").is_file():
        print(f"error: nothing to resume in {cfg.out_dir} (no checkpoint.pt there); run without --resume to "
              "start from scratch, or pass the --out of the run to continue", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    print(f"ancra-tune train: {cfg.method.base_loss}{'-ANC' if cfg.method.anc else ''}"
          f"{'-RA' if cfg.model.ra else ''} on {cfg.data.dataset} with {cfg.model.name}, "
          f"{cfg.optim.epochs} epochs, device {trainer.device}; writing to {trainer.out_dir}", flush=True)
    try:
        metrics = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished epoch is in {trainer.out_dir}/checkpoint.pt: "
              "run the same command with --resume to continue", file=sys.stderr)
        return 130
    except DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_")) or k == "loss"}
    ckpt = trainer.out_dir / "checkpoint.pt"
    print(f"done: {shown}\ncheckpoint: {ckpt}")
    if cfg.eval.final_suite != "none":  # e.g. the paper preset: the full suite on the test split
        from .robustness import SuiteConfig, evaluate_checkpoint, format_report

        suite = SuiteConfig.preset_config(cfg.eval.final_suite, eps=cfg.attack.eps)
        out = trainer.out_dir / f"eval_{cfg.eval.split}"
        print(f"evaluating on the {cfg.eval.split} split ({cfg.eval.final_suite} suite)...", flush=True)
        report = evaluate_checkpoint(ckpt, suite, split=cfg.eval.split, out_dir=out, device=str(trainer.device),
                                     progress=cfg.progress)
        print(format_report(report))
        print(f"report: {out / 'report.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .robustness import SuiteConfig, evaluate_checkpoint, evaluate_deployment, format_report

    if args.checkpoint.startswith("models:/"):  # a registered model: evaluate its training checkpoint
        from trainables.tracking import TrackingError, download_checkpoint, resolve_tracking_uri

        try:
            uri = resolve_tracking_uri(args.tracking_uri)
            path, label = download_checkpoint(uri, args.checkpoint, Path(args.out or "eval_registered") / "model")
        except TrackingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"evaluating {label} ({args.checkpoint}) from its checkpoint {path}", flush=True)
        args.checkpoint = str(path)
        args.out = args.out or "eval_registered"
    overrides = {k: v for k, v in (("n_examples", args.n), ("eps", args.eps), ("batch_size", args.batch_size),
                                   ("seed", args.seed)) if v is not None}
    if args.no_autoattack:
        overrides["autoattack"] = None
    if args.eps is None:  # default: the budget the model was trained for
        from .checkpoint import load_checkpoint

        overrides["eps"] = float(load_checkpoint(args.checkpoint)["config"]["attack"]["eps"])
    cfg = SuiteConfig.preset_config("quick" if args.quick else "full", **overrides)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    kwargs = dict(split=args.split, source=args.source, out_dir=out, device=device, data_root=args.data_root,
                  progress=not args.quiet)
    if args.workers:  # shard the batches over Ray workers (a local Ray, or --address)
        from trainables.distributed_eval import ray_evaluator

        kwargs["evaluate"] = ray_evaluator(args.workers, address=args.address, cpus_per_worker=args.cpus_per_worker,
                                           gpus_per_worker=1.0 if device == "cuda" else 0.0)
        kwargs["device"] = "cpu"  # the workers move the model to their own device
    text = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON alone
    if args.deploy_ra:
        reports = evaluate_deployment(args.checkpoint, cfg, **kwargs)
        for name, r in reports.items():
            print(f"== {name} ==\n{format_report(r)}\n", file=text)
        shown = {k: r.to_dict(per_example=False) for k, r in reports.items()}
    else:
        report = evaluate_checkpoint(args.checkpoint, cfg, **kwargs)
        print(format_report(report), file=text)
        shown = report.to_dict(per_example=False)
        print(f"robustness card: {out / 'robustness_card.png'}", file=text)
    print(f"report: {out / 'report.json'}", file=text, flush=True)
    if args.json:
        print(json.dumps(shown, indent=1))
    return EXIT_DONE


def _study(args: argparse.Namespace, kind: str) -> int:
    import contextlib
    import json
    import shlex

    from trainables.guard import StorageError, StudyLockedError
    from trainables.ray_session import InfeasibleResourcesError
    from trainables.study import load_study  # Ray loads only for these commands
    from trainables.study_run import run_study
    from trainables.tracking import TrackingError

    study = load_study(args.file)
    if study.kind != kind:
        print(f"error: {args.file} is a {study.kind} study; run it with `ancra-tune "
              f"{'sweep' if study.kind == 'sweep' else 'ablate'}`", file=sys.stderr)
        return EXIT_USAGE
    argv = [a for a in sys.argv[1:] if a != "--resume"] if sys.argv[1:2] == [args.command] else \
        [args.command, args.file]
    resume_command = shlex.join(["ancra-tune", *argv, "--resume"])
    # --json: stdout holds the JSON alone (it can be piped); every line for people goes to stderr.
    console = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with console:
            summary = run_study(study, address=args.address, storage=args.storage, resume=args.resume,
                                smoke_test=args.smoke_test, num_cpus=args.num_cpus,
                                wait_for_resources=args.wait_for_resources, tracking_uri=args.tracking_uri,
                                track=not args.no_mlflow, resume_command=resume_command, verbose=args.verbose)
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


def study_exit_code(summary: dict) -> int:
    """0: the study finished and at least one trial did; 1: it ended without a finished trial, or a full
    disk stopped it; 130: interrupted (``--resume`` continues). Usage and config errors exit 2 earlier."""
    outcome = summary.get("outcome")
    if outcome is None:  # a summary of an older version
        outcome = ("disk_full" if summary.get("interrupted_by") == "disk full" else
                   "interrupted" if summary.get("interrupted") else
                   "finished" if summary["status_counts"].get("finished") else "failed")
    return {"finished": EXIT_DONE, "failed": EXIT_FAILED, "disk_full": EXIT_FAILED,
            "interrupted": EXIT_INTERRUPTED}[outcome]


def _useful_time(summary: dict) -> str:
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


def format_summary(summary: dict) -> str:
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
        if t["status"] == "stopped":
            return f"stopped@{t['epochs_run']}"
        if t["status"] == "diverged":
            return f"diverged@{t.get('diverged_epoch')}"
        return t["status"]

    def key(t: dict) -> tuple:
        v = t.get(f"objective.{metric}", t.get(metric))
        v = v if isinstance(v, float) else float("-inf")
        return (t["status"] == "finished", not t.get("flags", {}).get(metric), v if mode == "max" else -v,
                t.get("val_robust_acc") or 0.0)

    rows = sorted(summary["trials"], key=key, reverse=True)
    header = f"  {'trial':<10} {'status':<12} {'clean':>7} {metric:>17} {'autoattack':>10} {'val_robust':>10}  params"
    lines.append(header)
    for t in rows:
        params = params_text(t["params"], inactive=t.get("inactive", ()))
        flag = " !" if t.get("flags", {}).get(metric) else "  "
        tid = str(t["trial_id"]).rsplit("_", 1)[-1]
        lines.append(f"  {tid:<10} {status(t):<12} {num(t.get('clean_acc')):>7} {num(t.get(metric)):>15}{flag} "
                     f"{num(t.get('autoattack_acc')):>10} {num(t.get('val_robust_acc')):>10}  {params}")
    flagged = {str(k).rsplit("_", 1)[-1]: v for k, v in summary.get("flagged_trials", {}).items()}
    if flagged:
        lines.append("  ! flagged by the gradient-masking checks (ranked last; see docs/masking_checks.md):")
        for tid, reasons in flagged.items():
            lines.append(f"    {tid}: " + "; ".join(r for rs in reasons.values() for r in rs))
    lines.append("  stopped trials show the last validation numbers they reached (val_robust, the scheduler's "
                 "per-epoch worst case)")
    for b in summary["best"]:
        lines.append(f"best: trial {str(b['trial_id']).rsplit('_', 1)[-1]} ({metric} = {num(b.get(metric))}, "
                     f"clean {num(b.get('clean_acc'))})\n  checkpoint: {b['checkpoint']}")
        if b.get("flags"):
            lines.append(f"  warning: every finished trial is flagged; this one's {metric} is not credible: "
                         f"{'; '.join(b['flags'].get(metric, []))}")
    if not summary["best"]:
        lines.append("no trial finished: nothing to choose from")
    errored = [str(t["trial_id"]).rsplit("_", 1)[-1] for t in summary["trials"] if t["status"] == "error"]
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
    elif summary["best"]:
        b = summary["best"][0]
        lines.append("next:\n"
                     f"  ancra-tune eval {b['checkpoint']}   # the full evaluation (AutoAttack standard) of the best\n"
                     f"  ancra-tune best {summary['study']}   # register it in MLflow as @champion")
    if summary.get("mlflow"):
        m = summary["mlflow"]
        ui = f"ancra-tune ui {summary['study']}" if m["tracking_uri"].startswith("sqlite:") else m["tracking_uri"]
        lines.append(f"  {ui}   # every trial in MLflow (study run {m['study_run_id']})")
    return "\n".join(lines)


def _best(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from trainables.tracking import TrackingError, check_tracking, register_best, resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
        check_tracking(uri)
        out = register_best(uri, args.study, metric=args.metric, mode=args.mode, model_name=args.model_name,
                            force=args.force, on_warning=lambda w: print(f"warning: {w}", file=sys.stderr, flush=True))
    except (TrackingError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"best trial of {args.study} by {out['metric']} ({args.mode}): {out['trial_id']} = {out['value']:.4f}\n"
          f"registered {out['name']} version {out['version']} with alias @{out['alias']} (run {out['run_id']})\n"
          f"load it with mlflow.pytorch.load_model({out['load_uri']!r}) (images in [0, 1] -> logits of P')")
    return 0


def _report(args: argparse.Namespace) -> int:
    from trainables.study_report import build_page, find_summary, log_page

    summary = find_summary(args.study, args.storage)
    page = build_page(summary, args.out)
    print(f"report: {page}")
    if not args.no_mlflow:
        run = log_page(summary, page)
        if run:
            print(f"logged to MLflow study run {run} (artifacts: report/)")
    return 0


def _store(args: argparse.Namespace) -> int:
    """Snapshot a sqlite MLflow store to the study storage, or restore it from there."""
    from trainables.store_snapshot import SnapshotError, restore, snapshot, snapshot_every
    from trainables.tracking import TrackingError, is_local, resolve_tracking_uri, sqlite_path

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not is_local(uri):
        print(f"error: {uri} is a tracking server: snapshot the sqlite file it serves (--tracking-uri "
              "sqlite:///PATH) on its machine; a PostgreSQL store is backed up by the database", file=sys.stderr)
        return EXIT_USAGE
    db = sqlite_path(uri)
    try:
        if args.action == "restore":
            manifest = restore(args.location, db, force=args.force)
            if manifest is None:
                why = f"{db} exists (--force replaces it)" if db.exists() else f"no snapshot at {args.location}"
                print(f"nothing restored: {why}")
            else:
                print(f"restored {db} from {args.location} (taken {manifest.get('taken', '?')}, "
                      f"{manifest.get('bytes', '?')} bytes)")
            return EXIT_DONE
        if args.every:
            n = snapshot_every(db, args.location, every_s=args.every)
            print(f"{n} snapshot(s) of {db} taken")
            return EXIT_DONE
        manifest = snapshot(db, args.location)
        print(f"snapshot of {db} to {args.location}: {manifest['bytes']} bytes, sha256 {manifest['sha256'][:12]}")
        return EXIT_DONE
    except SnapshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _ui(args: argparse.Namespace) -> int:
    from trainables.tracking import TrackingError, is_local, resolve_tracking_uri, serve_ui, sqlite_path, study_url

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_local(uri):
        try:
            print(f"{uri} is a tracking server; the study's trials, best worst case first:\n  "
                  f"{study_url(uri, uri, args.study)}")
        except TrackingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    db = sqlite_path(uri)
    if not db.is_file():
        print(f"error: no MLflow store at {db}; run a study here first (or pass --tracking-uri)", file=sys.stderr)
        return 2
    import signal

    def stop(signum: int, frame: object) -> None:  # kill PID / a closed terminal stop the server too
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        with serve_ui(uri, port=args.port) as (url, proc):
            answer = study_url(uri, url, args.study)
            print(f"MLflow UI for {db} (Ctrl+C stops it). The study's trials, best worst case first:\n  {answer}",
                  flush=True)
            _open_browser(answer)
            return proc.wait()
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _open_browser(url: str) -> None:
    """Open ``url`` where this machine has a browser and a screen; quietly nothing otherwise."""
    import os
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return
    try:
        webbrowser.open(url, new=2)
    except Exception:  # noqa: BLE001 (a missing browser is not an error)
        pass


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ancra-tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one configuration in this process")
    t.add_argument("config", nargs="?", default=None,
                   help=f"YAML file or preset ({', '.join(PRESETS)}); default: the paper's settings")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.alpha=0.5 (repeatable)")
    t.add_argument("--data-root", help="folder with (or for) downloaded datasets")
    t.add_argument("--out", help="output folder (config.yaml, metrics.jsonl, checkpoint.pt)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"))
    t.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="robustness report of a checkpoint: attacks, AutoAttack, masking checks")
    e.add_argument("checkpoint", help="a checkpoint.pt written by `ancra-tune train`, or a registered model "
                                      "(models:/NAME@champion) whose training checkpoint MLflow holds")
    e.add_argument("--tracking-uri", help="for models:/ URIs; default: $MLFLOW_TRACKING_URI, else ./mlflow.db")
    e.add_argument("--quick", action="store_true", help="few hundred examples, fewer steps (for sweeps)")
    e.add_argument("--split", choices=("val", "test"), default="val",
                   help="val: the split held out from training (default); test only when asked")
    e.add_argument("--n", type=int, help="number of examples (a fixed seeded subset)")
    e.add_argument("--eps", type=float, help="L-inf budget (default: the one the model was trained with)")
    e.add_argument("--source", help="checkpoint to craft transfer attacks on (PGD and MIM)")
    e.add_argument("--deploy-ra", action="store_true",
                   help="standard checkpoint: evaluate with RA off and switched on (paper Fig. 7)")
    e.add_argument("--no-autoattack", action="store_true")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--seed", type=int)
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--data-root")
    e.add_argument("--out", help="output folder (default: eval_<split> beside the checkpoint)")
    e.add_argument("--workers", type=int, help="shard the evaluation (AutoAttack included) over N Ray workers; "
                                               "the merged report equals a single-process run")
    e.add_argument("--address", help="with --workers: a running Ray cluster (e.g. auto); default: a local Ray")
    e.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --workers (default 1)")
    e.add_argument("--json", action="store_true", help="print the report (without per-example data) as JSON on "
                                                       "stdout; the table goes to stderr")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval)

    for name, kind, text in (("sweep", "sweep", "search hyperparameters with Ray Tune + Optuna + ASHA"),
                             ("ablate", "ablation", "run a component grid x seeds and write a summary table")):
        p = sub.add_parser(name, help=text)
        p.add_argument("file", help="a study file, e.g. search_spaces/quickstart.yaml")
        p.add_argument("--address", help="join a running Ray cluster (e.g. auto); default: start Ray locally")
        p.add_argument("--storage", help="Tune/Train storage path or URI (shared storage on a cluster); "
                                         "default: $ANCRA_STORAGE, else runs/studies")
        p.add_argument("--resume", action="store_true", help="continue an interrupted study (unfinished trials only)")
        p.add_argument("--smoke-test", action="store_true", help="one epoch on a few batches, at most two trials")
        p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
        p.add_argument("--wait-for-resources", action="store_true",
                       help="on an autoscaling cluster: wait for nodes instead of failing when the "
                            "resources a trial asks for do not exist yet")
        p.add_argument("--tracking-uri", help="MLflow tracking server (http://HOST:PORT) or sqlite:///PATH; default: "
                                              "$MLFLOW_TRACKING_URI, else mlflow.db in this folder")
        p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
        p.add_argument("--json", action="store_true",
                       help="print the summary as JSON on stdout (the table goes to stderr)")
        p.add_argument("--verbose", action="store_true", help="Ray's own log lines and status tables")
        p.set_defaults(func=lambda a, k=kind: _study(a, k))

    b = sub.add_parser("best", help="register a study's best trial model in MLflow with the alias `champion`")
    b.add_argument("study", help="the study's name (its MLflow experiment)")
    b.add_argument("--metric", default="robust_acc_worst",
                   help="trial metric to rank by (default: robust_acc_worst, the worst case over all attacks)")
    b.add_argument("--mode", choices=("max", "min"), default="max")
    b.add_argument("--force", action="store_true", help="accept a metric that the masking checks flag")
    b.add_argument("--model-name", help="registered model name (default: ancra-<study>)")
    b.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else mlflow.db in this folder")
    b.set_defaults(func=_best)

    r = sub.add_parser("report", help="a finished study's answer as one page (Markdown + PNGs), logged to its "
                                      "MLflow study run")
    r.add_argument("study", help="the study's name (under --storage), its folder, or its summary.json")
    r.add_argument("--storage", help="default: $ANCRA_STORAGE, else runs/studies")
    r.add_argument("--out", type=Path, help="folder for the page (default: the study folder's report/)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log the page to the study's MLflow run")
    r.set_defaults(func=_report)

    st = sub.add_parser("store", help="snapshot the local (sqlite) MLflow store to the study storage, or restore it "
                                      "(what cluster.yaml's head does: the store outlives the head)")
    st_sub = st.add_subparsers(dest="action", required=True)
    snap = st_sub.add_parser("snapshot", help="a consistent copy of the store, taken while it is in use")
    snap.add_argument("--to", dest="location", required=True,
                      help="a path or URI for the snapshot, e.g. s3://BUCKET/ancra-tune/mlflow/mlflow.db")
    snap.add_argument("--every", type=float, metavar="SECONDS",
                      help="keep taking one (when the store changed) until SIGTERM/Ctrl+C, then a last one")
    rest = st_sub.add_parser("restore", help="put the newest snapshot in place (only where no store is yet)")
    rest.add_argument("--from", dest="location", required=True, help="the snapshot's path or URI")
    rest.add_argument("--force", action="store_true", help="replace an existing store")
    for q in (snap, rest):
        q.add_argument("--tracking-uri", help="the sqlite store (sqlite:///PATH); default: $MLFLOW_TRACKING_URI, "
                                              "else mlflow.db in this folder")
    st.set_defaults(func=_store)

    u = sub.add_parser("ui", help="the MLflow UI of the local store, on http://127.0.0.1:PORT, opened on a study")
    u.add_argument("study", nargs="?", help="the study to open (default: the one that ran last)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else mlflow.db in this folder")
    u.set_defaults(func=_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, DatasetUnavailableError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``ancra-tune`` program: :func:`main`, then a quick exit. Once the command is done (its
    output printed, its files and MLflow runs written), Ray is shut down and the exit handlers
    run as at any exit, but the interpreter does not tear down its modules one by one: with torch,
    Ray Tune and MLflow loaded that took 2-3 s after a sweep's last line (measured)."""
    import atexit
    import os
    import signal
    import threading

    # A job started in the background by a shell without job control (`cmd &` in a script, nohup,
    # many CI runners and batch systems) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: `kill -INT` would not stop `ancra-tune ui` or `train`. Every command takes
    # SIGINT as Ctrl+C wherever it was started (sweeps install their own handler on top).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    rc = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        guard = sys.modules.get("trainables.guard")
        if guard is not None:  # a study ran here: its local workers are gone now, and so is their scratch
            guard.sweep_run_dirs()
    # What the interpreter does first at exit: tell idle thread pools to end (MLflow and Tune hold
    # some), then wait for the threads that are not daemons.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # not CPython's threading: leave the whole exit to the interpreter
        sys.exit(rc)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
