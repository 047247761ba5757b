"""Where a study's wall time goes, per trial: Ray's start, the Train worker group's start and
distributed init, data and model setup, training, per-epoch validation and reporting, the
end-of-trial evaluation, MLflow logging and model export, Train's shutdown, Tune's bookkeeping.

Runs a study of N short trials of the quickstart's kind (digits, small CNN) one at a time, so
that each trial's phases add up to the wall time, with a real MLflow store (sqlite in the output
folder), and prints one row per trial and the mean:

    python benchmarks/trial_overhead.py --trials 4 --out runs/trial_overhead
    python benchmarks/trial_overhead.py --trials 4 --worker-group --out runs/trial_overhead_wg   # as before
    python benchmarks/trial_overhead.py --study search_spaces/quickstart.yaml   # a shipped study as is
    python benchmarks/trial_overhead.py --floor   # what no study can go below here (no study run)

Phases come from each trial's timing.json (written by the trial) and Tune's wall time. The fixed
cost per trial is everything but training, validation and evaluation. Two shares of the time
outside training, validation and evaluation are printed: of the trial slots' time (wall x trials
at once: an idle slot counts), and of the wall time during which no trial trained, validated or
evaluated (the timeline of every trial, stopped ones included, from the reported epochs).

``--floor`` measures what every local study pays before its first epoch can begin, whatever the
platform does: the program's imports, Ray's start, and a new trial process (what Tune starts for
each concurrent trial) importing what a trial needs and building its first optimizer, two at once
as the quickstart runs them; and Ray's shutdown after the last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

STUDY = """
name: trial_overhead
kind: sweep
base: quickstart
train: {{optim.epochs: {epochs}, data.train_limit: 640, attack.eps: 0.2, attack.step_size: 0.05, attack.steps: 5,
        eval.pgd_steps: 5, eval.pgd_step_size: 0.05, eval.max_examples: 128, eval.final_suite: none}}
resources: {{workers: {workers}, cpus_per_worker: {cpw}, trial_cpus: {tcpu}, in_process: {in_process}}}
objective: {{metric: robust_acc_worst, mode: max}}
eval: {{preset: quick, n_examples: 128, autoattack: null, square_queries: 50}}
search:
  sampler: random
  num_samples: {trials}
  max_concurrent: 1
  space:
    method.base_loss: [trades, pgd_at]
    model.ra: [true, false]
scheduler: {scheduler}
seeds: [0]
"""

PHASES = ("worker_group_start", "setup", "training", "validation_and_reports", "asha_decisions", "evaluation",
          "plots", "mlflow_and_export", "train_shutdown", "trial_bookkeeping")


def phases(t: dict) -> dict[str, float]:
    """One trial's phases in seconds, from its timing.json."""
    fit_s, train_s = t.get("fit_s", 0.0), t.get("train_time_s") or 0.0
    wait_s = t.get("decision_wait_s", 0.0)  # a multi-worker trial's wait for ASHA's decision on each epoch
    return {
        "worker_group_start": t["worker_start"] - t["fit_start"],
        "setup": t.get("setup_s", 0.0),
        "training": train_s,
        "validation_and_reports": fit_s - train_s - wait_s,
        "asha_decisions": wait_s,
        "evaluation": t.get("eval_s", 0.0),  # the attacks
        "plots": t.get("plots_s", 0.0),  # the evaluation's plots, drawn for MLflow
        "mlflow_and_export": t.get("track_s", 0.0),
        "train_shutdown": t["fit_end"] - t.get("worker_end", t["fit_end"]),
        "trial_bookkeeping": t["fit_start"] - t["trial_start"],
    }


def busy_intervals(trial_dirs: list[str]) -> list[tuple[float, float]]:
    """When each trial trained, validated or evaluated (wall-clock seconds), from its reported rows:
    an epoch ends when it is reported, after ``epoch_time_s + val_time_s``; an evaluation ends when
    its final row is made, after ``timing.eval_s`` (the attacks) and ``timing.plots_s``."""
    out = []
    for d in trial_dirs:
        p = Path(d) / "result.json"
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
        for r in rows:
            end = r.get("reported_at")
            if end is None:
                continue
            if r.get("final") == 1:
                end -= r.get("timing.plots_s") or 0.0
                length = r.get("timing.eval_s") or 0.0
            else:
                length = (r.get("epoch_time_s") or 0.0) + (r.get("val_time_s") or 0.0)
            if length > 0:
                out.append((end - length, end))
    return out


def idle_parts(intervals: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """Seconds of [start, end] that no interval covers: before the first, between them, after the last."""
    parts = {"before": 0.0, "between": 0.0, "after": 0.0}
    reach, first = start, True
    for a, b in sorted(intervals):
        a, b = max(a, start), min(b, end)
        if b <= a:
            continue
        if a > reach:
            parts["before" if first else "between"] += a - reach
        first = False
        reach = max(reach, b)
    parts["before" if first else "after"] += max(0.0, end - reach)
    return parts


def _trial_process_ready() -> float:
    """In a new Ray worker process: what a trial imports before its first epoch, and its first
    optimizer (torch imports torch._dynamo there). Returns when it was done (wall clock)."""
    import mlflow  # noqa: F401
    import torch

    import trainables.study_run  # noqa: F401

    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    return time.time()


def floor(slots: int = 2) -> dict[str, float]:
    """Seconds every local study of ``slots`` concurrent trials spends before its first epoch and
    after its last, measured here (see the module's docstring)."""
    import subprocess
    import sys

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import trainables.cli, trainables.study_run, mlflow, optuna"], check=True)
    imports = time.perf_counter() - t
    import ray

    from trainables.ray_session import init_ray

    t = time.perf_counter()
    init_ray(None, num_cpus=2, verbose=False)
    ray_start = time.perf_counter() - t
    # As Tune starts a trial: an actor in a new process with an environment of its own.
    actor = ray.remote(num_cpus=0.5, runtime_env={"env_vars": {"PL_DISABLE_FORK": "1"}})(
        type("TrialProcess", (), {"ready": lambda self: _trial_process_ready()}))
    t0 = time.time()
    done = ray.get([actor.remote().ready.remote() for _ in range(slots)])
    process = max(done) - t0
    t = time.perf_counter()
    ray.shutdown()
    shutdown = time.perf_counter() - t
    return {"imports_s": imports, "ray_start_s": ray_start, "trial_process_s": process, "ray_shutdown_s": shutdown}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/trial_overhead"))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker-group", action="store_true",
                   help="one-worker trials start a Ray Train worker group (resources.in_process: false), "
                        "as every trial did before trials trained in their own process")
    p.add_argument("--asha", action="store_true",
                   help="ASHA (grace 1, factor 2) stops trials; multi-worker trials wait for its decisions")
    p.add_argument("--study", type=Path, help="run this study file instead (its own concurrency)")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--floor", action="store_true", help="measure what no local study can go below here, and stop")
    a = p.parse_args()
    if a.floor:
        f = floor()
        before = f["ray_start_s"] + f["trial_process_s"]
        print(f"the program's imports {f['imports_s']:.1f} s; Ray's start {f['ray_start_s']:.1f} s; two new trial "
              f"processes ready (imports, first optimizer) {f['trial_process_s']:.1f} s after Tune would start them; "
              f"Ray's shutdown {f['ray_shutdown_s']:.1f} s")
        print(f"no local study's first epoch begins before {before:.1f} s after Ray's start is called "
              f"({before + f['imports_s']:.1f} s after the program starts); with the shutdown, "
              f"{before + f['imports_s'] + f['ray_shutdown_s']:.1f} s of every run of the program is outside "
              "training and evaluation")
        if a.json:
            a.json.write_text(json.dumps(f, indent=1))
        return

    from trainables.ray_session import init_ray
    from trainables.study import load_study
    from trainables.study_run import run_study

    a.out.mkdir(parents=True, exist_ok=True)
    if a.study is None:
        cpw = 0.5 if a.workers > 1 else 1.0
        f = a.out / "study.yaml"
        f.write_text(STUDY.format(epochs=a.epochs, workers=a.workers, cpw=cpw, tcpu=0.5, trials=a.trials,
                                  in_process=str(not a.worker_group).lower(),
                                  scheduler="{type: asha, metric: val_robust_acc, grace_period: 1, reduction_factor: 2}"
                                  if a.asha else "{type: none}"))
        study = load_study(f)
    else:
        study = load_study(a.study)
    t0, wall0 = time.perf_counter(), time.time()
    init_ray(None, num_cpus=2, verbose=False)
    ray_start = time.perf_counter() - t0
    summary = run_study(study, storage=str((a.out / "studies").resolve()),
                        tracking_uri=f"sqlite:///{(a.out / 'mlflow.db').resolve()}")
    total, wall1 = time.perf_counter() - t0, time.time()
    rows = []
    for tr in sorted(summary["trials"], key=lambda t: t["trial_id"]):
        f = Path(tr["trial_dir"]) / "timing.json"
        if f.is_file():
            t = json.loads(f.read_text())
            rows.append({"trial": tr["trial_id"].rsplit("_", 1)[-1], "status": tr["status"], **phases(t),
                         "trial_s": t["fit_end"] - t["trial_start"]})
    tune_s = summary["wall_time_s"]
    concurrent = summary.get("slots") or 1  # trials at once
    # Tune's own time: the study's Tune wall time not spent inside a trial function (one at a time).
    inside = sum(r["trial_s"] for r in rows) / max(1, concurrent)
    head = f"{'trial':<10}{'status':<10}" + "".join(f"{k[:14]:>15}" for k in PHASES) + f"{'trial total':>13}"
    print(head)
    for r in rows:
        print(f"{r['trial']:<10}{r['status']:<10}" + "".join(f"{r[k]:>15.2f}" for k in PHASES) +
              f"{r['trial_s']:>13.2f}")
    mean = {k: statistics.mean(r[k] for r in rows) for k in (*PHASES, "trial_s")} if rows else {}
    if rows:
        print(f"{'mean':<20}" + "".join(f"{mean[k]:>15.2f}" for k in PHASES) + f"{mean['trial_s']:>13.2f}")
    fixed = [r["trial_s"] - r["training"] - r["validation_and_reports"] - r["evaluation"] for r in rows]
    # Every trial, stopped ones included (a trial stopped by ASHA may leave no timing.json): the
    # summary's training, per-epoch validation and evaluation times.
    all_useful = summary["trial_train_time_s"] + summary["trial_val_time_s"] + summary["trial_eval_time_s"]
    print(f"\nRay start {ray_start:.1f} s; Tune wall {tune_s:.1f} s, of which outside trial functions "
          f"{max(0.0, tune_s - inside):.1f} s; whole run {total:.1f} s")
    if rows:
        print(f"fixed cost per trial (trial total - training - validation - evaluation): mean "
              f"{statistics.mean(fixed):.1f} s (the {len(rows)} trials with a timing.json)")
    print(f"all {summary['n_trials']} trials, {concurrent} at a time: training {summary['trial_train_time_s']:.1f} s "
          f"+ validation {summary['trial_val_time_s']:.1f} s + evaluation {summary['trial_eval_time_s']:.1f} s = "
          f"{all_useful:.1f} s of {total:.1f} s wall x {concurrent} slots: "
          f"{100 * (1 - all_useful / (total * concurrent)):.0f}% outside training and evaluation (whole run); "
          f"{100 * summary['overhead_share']:.0f}% of Tune's wall")
    parts = idle_parts(busy_intervals([t["trial_dir"] for t in summary["trials"]]), wall0, wall1)
    idle = sum(parts.values())
    print(f"no trial training, validating or evaluating: {idle:.1f} s of the whole run's {total:.1f} s "
          f"({100 * idle / total:.0f}%), Ray's start included: {parts['before']:.1f} s before the first epoch "
          f"began, {parts['between']:.1f} s between, {parts['after']:.1f} s after the last evaluation ended")
    if a.json:
        a.json.write_text(json.dumps({"ray_start_s": ray_start, "tune_wall_s": tune_s, "total_s": total,
                                      "slots": concurrent, "useful_s": all_useful, "idle_s": idle, "idle_parts": parts,
                                      "rows": rows},
                                     indent=1))


if __name__ == "__main__":
    main()
