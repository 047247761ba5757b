"""What MLflow tracking costs a study: the same study with and without tracking, in one run.

    python benchmarks/tracking_overhead.py [--study search_spaces/quickstart.yaml] [--tracking-uri URI]

Runs the study twice through the command line (``--no-mlflow``, then tracked into a fresh
sqlite store or ``--tracking-uri``), each with its own storage, and prints the wall times,
their ratio, the number of runs and metric values that landed in MLflow, and the time the
trials' rank 0 spent in the final logging (evaluation artifacts and the pt2 model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(study: str, storage: Path, extra: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "trainables.cli", "sweep", study, "--storage", str(storage),
                          "--json", *extra], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return wall, json.loads(out.stdout)  # --json: the summary alone on stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="search_spaces/quickstart.yaml")
    p.add_argument("--tracking-uri", help="default: a fresh sqlite store in a temporary folder")
    args = p.parse_args()
    from trainables.tracking import client

    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        uri = args.tracking_uri or f"sqlite:///{d}/mlflow.db"
        plain_wall, plain = run(args.study, Path(d, "plain"), ["--no-mlflow"], env)
        tracked_wall, tracked = run(args.study, Path(d, "tracked"), ["--tracking-uri", uri], env)
        mc = client(uri)
        exp = mc.get_experiment_by_name(tracked["study"])
        runs = mc.search_runs([exp.experiment_id], filter_string="tags.`mlflow.parentRunId` = "
                              f"'{tracked['mlflow']['study_run_id']}'")
        values = sum(len(mc.get_metric_history(r.info.run_id, k)) for r in runs for k in r.data.metrics)
        models = sum("ancra.model_uri" in r.data.tags for r in runs)
    print(f"study {args.study}: {plain['n_trials']} trials {plain['status_counts']} untracked, "
          f"{tracked['n_trials']} trials {tracked['status_counts']} tracked")
    print(f"wall untracked {plain_wall:6.1f} s   tracked {tracked_wall:6.1f} s   ratio {tracked_wall / plain_wall:.3f}")
    print(f"training time  {plain['trial_train_time_s']:6.1f} s   {tracked['trial_train_time_s']:6.1f} s")
    print(f"MLflow: 1 study run, {len(runs)} trial runs, {values} metric values, {models} pt2 models")


if __name__ == "__main__":
    main()
