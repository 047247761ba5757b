"""`ancra-tune best`, `report`, `ui` and `store`: what a study left in MLflow and its folder."""

from __future__ import annotations

import argparse
import sys

from .codes import EXIT_DONE, EXIT_FAILED, EXIT_USAGE


def _best(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from ..tracking import TrackingError, check_tracking, register_best, resolve_tracking_uri

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
    from ..study_page import build_page, find_summary, log_page

    summary = find_summary(args.study, args.storage)
    page = build_page(summary, args.out, beside=args.beside)
    print(f"report: {page}")
    if not args.no_mlflow:
        run = log_page(summary, page)
        if run:
            print(f"logged to MLflow study run {run} (artifacts: report/)")
    return 0

def _store(args: argparse.Namespace) -> int:
    """Snapshot a sqlite MLflow store to the study storage, or restore it from there."""
    from ..store_snapshot import SnapshotError, restore, snapshot, snapshot_every
    from ..tracking import TrackingError, is_local, resolve_tracking_uri, sqlite_path

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
    from ..tracking import TrackingError, is_local, resolve_tracking_uri, serve_ui, sqlite_path, study_url

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
