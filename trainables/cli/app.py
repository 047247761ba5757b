"""The ``ancra-tune`` command line: its parser, ``main`` and the program's quick exit.

The command line sits in the outer layer: it may import the PyTorch core (``ancra_tune``) and the
Ray/MLflow layer (``trainables``); the core imports neither it nor anything of ``trainables``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ancra_tune.config import (
    PRESETS,
    ConfigError,
)
from ancra_tune.data import DatasetUnavailableError

from .core_commands import _eval, _train
from .study_commands import _export, _plan, _status, _study
from .tracking_commands import _best, _report, _store, _ui


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ancra-tune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ancra-tune", description="ANCRA adversarial training: train, evaluate "
                                     "robustness honestly, sweep and ablate over Ray, track in MLflow.")
    parser.add_argument("--version", action="version", version=f"ancra-tune {_version()}")
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
    e.add_argument("--check-examples", metavar="N|all",
                   help="every attack runs on the first N examples (the checks and each attack's accuracy are "
                        "measured there; default: 200 full, 64 quick); beyond them only on the examples still "
                        "standing (the worst case's cascade). all: every attack on every example (per-attack "
                        "accuracies on all n, for papers' tables; costs n x attacks)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--seed", type=int)
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--data-root")
    e.add_argument("--out", help="output folder (default: eval_<split> beside the checkpoint)")
    e.add_argument("--workers", type=int, help="spread the evaluation's batches (AutoAttack included) over N Ray "
                                               "workers; the merged report equals a single-process run, and a "
                                               "stopped one goes on from its kept batches as one here does")
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
        if kind == "sweep":
            p.add_argument("--more", type=int, metavar="N",
                           help="add N trials to a finished sweep: placed by the sampler with every earlier trial "
                                "in view (the study's optuna.journal), under the same MLflow study run; the summary "
                                "and report cover all of them")
        if kind == "ablation":
            p.add_argument("--from-record", type=Path, metavar="FOLDER",
                           help="the study's folder was lost: start it again from its record (ancra-tune export), "
                                "bringing in its evaluated trials and sessions; only the pairs it lacks run")
            p.add_argument("--carry", type=Path, metavar="FOLDER",
                           help="with --from-record: the unfinished trials' state exported beside the record "
                                "(export --carry): they go on from their last checkpoint and kept batches")
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
        p.add_argument("--verbose", action="store_true", help="Ray's own log lines and status tables too")
        p.set_defaults(func=lambda a, k=kind: _study(a, k))

    pl = sub.add_parser("plan", help="what a study must evaluate (examples x seeds) to resolve a difference, and "
                                     "what that costs, before running it")
    pl.add_argument("file", help="a study file, e.g. search_spaces/table8_cifar10_cpu.yaml")
    pl.add_argument("--detect", type=float, default=0.03,
                    help="the difference of accuracy to resolve, as a fraction (default 0.03: 3 points)")
    pl.add_argument("--seeds", type=int, help="plan for this many seeds only (default: the study's, 3 and 5)")
    pl.add_argument("--storage", help="where an earlier run of the study left its records; default: "
                                      "$ANCRA_STORAGE, else runs/studies")
    pl.add_argument("--no-probe", action="store_true",
                    help="without records, do not measure the cost here (accuracy and power only)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    pl.set_defaults(func=_plan)

    ss = sub.add_parser("status", help="where a study stands, from its folder (also while it runs, or between "
                                       "sessions): its sessions, wall time, and each trial's epoch, step or evaluation")
    ss.add_argument("file", help="the study file, e.g. search_spaces/table8_mnist.yaml")
    ss.add_argument("--storage", help="where the study runs; default: $ANCRA_STORAGE, else runs/studies")
    ss.add_argument("--json", action="store_true", help="print it as JSON on stdout")
    ss.set_defaults(func=_status)

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
    r.add_argument("--beside", type=Path, metavar="FILE",
                   help="an ablation: a published table (YAML: its rows, columns and what each measured) set "
                        "beside the page's rows, e.g. docs/paper/table8.yaml")
    r.add_argument("--no-mlflow", action="store_true", help="do not log the page to the study's MLflow run")
    r.set_defaults(func=_report)

    x = sub.add_parser("export", help="a stopped study's record in a folder of its own: its summary, each evaluated "
                                      "trial's per-example outcomes, its sessions, the study file (no checkpoints)")
    x.add_argument("study", nargs="?", help="the study file (its folder under --storage), or the study folder")
    x.add_argument("--to", type=Path, help="the folder to write (new, or an earlier export of the same study)")
    x.add_argument("--storage", help="default: $ANCRA_STORAGE, else runs/studies")
    x.add_argument("--carry", type=Path, metavar="FOLDER",
                   help="also write the unfinished trials' state (last checkpoint, mid-epoch checkpoint, kept "
                        "evaluation batches: MBs) into FOLDER, beside the record: a study whose machine is lost "
                        "between sessions goes on from it (ablate --from-record RECORD --carry FOLDER)")
    x.add_argument("--check", type=Path, metavar="FOLDER",
                   help="verify an export (or a carry) instead: every file the one exported (exit 1 if not)")
    x.set_defaults(func=_export)

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
    try:
        rc = main()
    except BrokenPipeError:
        # Whoever read its output has gone (`ancra-tune status ... | head`): end quietly, as a program
        # that SIGPIPE ends does (its status), and let nothing more be written to the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 128 + signal.SIGPIPE
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        from ..scratch_dirs import sweep_run_dirs

        sweep_run_dirs()  # Ray ran here: its local workers are gone now, and so is their scratch
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
