"""Does the search find a good configuration for less compute than a grid? Measured, not assumed.

One search space on real data (MNIST from ../shared/data, the small CNN, a training subset and a
few epochs): the learning rate x ANC on/off x RA on/off, 16 configurations. The benchmark

1. runs the platform's own ablation over the whole grid (seed 0): every configuration trained
   for every epoch and scored by the quick robustness evaluation on held-out images (the worst
   case over its attacks, adaptive ones on RA's gate included, the credible value the searcher
   sees). That is the space's true best, and a table of what every trial reports, epoch by epoch,
   with the time each took;
2. replays searches of the same space with the same per-trial budget over the recorded trials (a
   tabular benchmark: training is deterministic for a configuration and seed, so a replayed trial
   is the trial), two trials at a time as on this 2-core machine, each searcher a Tune searcher
   told what Tune tells it (every epoch's row, a stopped trial's last row, a finished trial's
   objective): the grid in its order; random search; TPE as the platform set it up before its
   sampler was pinned (``tpe_before``: commit 8b4b6e3, Optuna's installed defaults but the startup
   trials, only final values, points repeated) and the platform's searcher now (``tpe_after``:
   ``trainables.search.build_searcher``: multivariate TPE over the conditional space, a constant
   liar for the concurrent trials, every epoch an intermediate value, no point twice); both alone
   and under the platform's ASHA (stopping on the per-epoch validation robust accuracy); then
   ``tpe_after`` + ASHA with other grace periods, reduction factors and numbers of trials (--asha),
   to choose the shipped studies' settings from measurements. Each searcher is repeated with
   --reps sampler seeds;
3. tells the configurations apart (the grid's best with its 95% interval, every other one against
   it by exact McNemar on the same held-out images, Holm-corrected): the target of a search is the
   best or a configuration not separable from it. For each searcher it reports the best value
   found, how often it reached the target (Fisher's exact test of tpe_after against tpe_before), the
   epochs (every epoch of every trial, stopped ones included) and wall time (the recorded trials'
   own times, two at a time) spent until it did; and plots the median best-so-far against epochs.

    python benchmarks/search_efficiency.py --out runs/search_efficiency     # ~45 min on 2 cores
    python benchmarks/search_efficiency.py --out runs/search_efficiency --reps 100  # replay only

Writes grid.json (the recorded trials), table.md, results.json and best_so_far.png to --out; a
second call reuses grid.json (delete it to train again).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist" / "train60000.npz"
SPACE = {"optim.lr": [0.01, 0.03, 0.1, 0.2], "method.anc": [False, True], "model.ra": [False, True]}
METRIC, SCHED_METRIC = "robust_acc_worst", "val_robust_acc"

STUDY = """
name: {name}
kind: {kind}
base: mnist_small_cnn
train:
  data.dataset: npz
  data.train_file: {data}
  data.val_size: 1000
  data.train_limit: {train_limit}
  data.batch_size: 64
  attack.eps: {eps}
  attack.step_size: {step}
  attack.steps: 3
  optim.epochs: {epochs}
  eval.pgd_steps: 5
  eval.pgd_step_size: {step}
  eval.max_examples: 200
  eval.final_suite: none
resources: {{workers: 1, cpus_per_worker: 0.5, trial_cpus: 0.5}}
objective: {{metric: {metric}, mode: max}}
eval: {{preset: quick, n_examples: {n_eval}, autoattack: null, square_queries: 100, features: false}}
seeds: [0]
"""


def study_text(kind: str, a: argparse.Namespace) -> str:
    """The grid as an ablation, or the same space as a sweep (sampler and scheduler filled in)."""
    text = STUDY.format(name=f"search_{kind}", kind=kind, data=a.data, train_limit=a.train_limit, eps=a.eps,
                        step=round(a.eps * 0.4, 4), epochs=a.epochs, n_eval=a.n_eval, metric=METRIC)
    space = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in SPACE.items())
    if kind == "ablation":
        return text + "ablation:\n  grid:\n" + space
    return text + (f"search:\n  sampler: tpe\n  num_samples: {a.trials}\n  defaults_first: false\n  space:\n{space}"
                   f"scheduler: {{type: asha, metric: {SCHED_METRIC}, grace_period: {a.grace}, "
                   f"reduction_factor: {a.reduction}}}\n")


def key(point: dict[str, Any]) -> str:
    return json.dumps({k: point[k] for k in SPACE}, sort_keys=True)


def record_grid(a: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate every configuration once (the platform's ablation); keep what each reported."""
    from trainables.ray_session import init_ray
    from trainables.study import load_study
    from trainables.study_run import run_study

    f = a.out / "search_grid.yaml"
    f.write_text(study_text("ablation", a))
    init_ray(None, num_cpus=2, verbose=False)
    t0 = time.perf_counter()
    summary = run_study(load_study(f), storage=str((a.out / "studies").resolve()),
                        tracking_uri=f"sqlite:///{(a.out / 'mlflow.db').resolve()}")
    wall = time.perf_counter() - t0
    from ancra_tune.robustness import stats
    from trainables.summary import load_reports

    reports = load_reports(summary)
    trials = {}
    for t in summary["trials"]:
        rows = [json.loads(x) for x in Path(t["trial_dir"], "result.json").read_text().splitlines() if x.strip()]
        epochs = sorted((r for r in rows if "epoch_time_s" in r and r.get("final") != 1), key=lambda r: r["epoch"])
        final = next((r for r in rows if r.get("final") == 1), None)
        trials[key(t["params"])] = {
            "params": {k: t["params"][k] for k in SPACE}, "status": t["status"],
            "curve": [r[SCHED_METRIC] for r in epochs],  # what ASHA sees, epoch by epoch
            "epoch_end_s": [r["time_total_s"] for r in epochs],  # since the trial's start
            "end_s": final["time_total_s"] if final else (epochs[-1]["time_total_s"] if epochs else 0.0),
            "value": final.get(f"objective.{METRIC}") if final else None,  # the credible value
            "raw_value": final.get(METRIC) if final else None}
        report = reports.get(str(t["trial_id"]))
        if report is not None and report.outcomes("worst") is not None:  # which examples survived (packed)
            trials[key(t["params"])]["worst_outcomes"] = stats.pack(report.outcomes("worst"))
            trials[key(t["params"])]["n"] = report.n_examples
    return {"wall_s": wall, "epochs": a.epochs, "trials": trials, "study": study_text("ablation", a)}


#: the searchers replayed: the grid in its order; random search; TPE as the platform set it up at
#: 8b4b6e3, before the sampler was pinned (``tpe_before``: Optuna's installed defaults but the startup
#: trials, told only final values, a stopped trial pruned with no epochs, points repeated); and the
#: platform's own searcher now (``tpe_after``: ``trainables.search.build_searcher``, driven as Tune
#: drives it: pinned TPE with a constant liar for the concurrent trials, every epoch an intermediate
#: value, no point twice)
METHODS = ("grid", "random", "tpe_before", "tpe_after")


def make_searcher(method: str, study: Any, seed: int, concurrency: int) -> Any:
    """A Tune searcher for ``method`` over the study's define-by-run space."""
    import functools

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from trainables import trial_rows as R
    from trainables.search import _define_by_run, build_searcher

    if method == "tpe_after":
        return build_searcher(study, concurrent=concurrency, seed=seed)

    class FinalOnly(OptunaSearch):  # the platform's searcher at 8b4b6e3: the final value only
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    sampler = (optuna.samplers.RandomSampler(seed=seed) if method == "random" else
               optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.search.tpe_startup))
    return FinalOnly(space=functools.partial(_define_by_run, study), metric=R.objective_key(METRIC), mode="max",
                     sampler=sampler)


def simulate(grid: dict[str, Any], method: str, *, trials: int, seed: int, concurrency: int,
             study: Any = None, scheduler: Any = None) -> list[dict[str, Any]]:
    """One search over the recorded trials, ``concurrency`` at a time, the searcher told what Tune
    tells it (each epoch's row, a stopped trial's last row, a finished trial's objective). Returns
    an event per trial end: the time, the epochs spent by then (all trials), the trial and the best
    credible value so far."""
    import optuna

    from trainables import trial_rows as R

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = grid["trials"]
    searcher = None
    if method == "grid":
        order = list(table)
        trials = len(order)
    else:
        searcher = make_searcher(method, study, seed, concurrency)
    clock, spent, started, best = 0.0, 0, 0, None
    events: list[tuple[float, int, int, str, Any]] = []  # (time, order, epoch, trial key, (trial id, start))
    seq = 0
    out: list[dict[str, Any]] = []

    def start(now: float) -> None:
        nonlocal started, seq
        tid = f"{seed}-{started}"
        if searcher is None:
            k = order[started]
        else:
            searcher.suggest(tid)
            k = key(searcher._ot_trials[tid].params)  # the point the searcher placed (flat names)
        started += 1
        rec = table[k]
        if scheduler is not None:
            scheduler.on_trial_add(None, _Trial(tid))
        seq += 1
        heapq.heappush(events, (now + rec["epoch_end_s"][0], seq, 1, k, (tid, now)))

    for _ in range(min(concurrency, trials)):
        start(0.0)
    while events:
        clock, _, epoch, k, (tid, t_start) = heapq.heappop(events)
        rec = table[k]
        done = False
        if epoch <= len(rec["curve"]):  # an epoch ended
            spent += 1
            row = {R.EPOCH: epoch, "epoch_time_s": 1.0, "training_iteration": epoch,
                   SCHED_METRIC: rec["curve"][epoch - 1]}
            if searcher is not None:
                searcher.on_trial_result(tid, row)
            action = scheduler.on_trial_result(None, _Trial(tid), row) if scheduler is not None else "CONTINUE"
            if action == "STOP":
                if searcher is not None:
                    searcher.on_trial_complete(tid, row)  # no objective: pruned, as Tune reports it
                done = True
                out.append({"t": clock, "epochs": spent, "best": best, "trial": k, "status": "stopped"})
            else:
                seq += 1
                nxt = t_start + (rec["epoch_end_s"][epoch] if epoch < len(rec["curve"]) else rec["end_s"])
                heapq.heappush(events, (nxt, seq, epoch + 1, k, (tid, t_start)))
        else:  # the evaluation ended
            value = rec["value"]
            if searcher is not None:
                searcher.on_trial_complete(tid, {R.objective_key(METRIC): value if value is not None else 0.0})
            if value is not None and (best is None or value > best):
                best = value
            done = True
            out.append({"t": clock, "epochs": spent, "best": best, "trial": k, "status": "finished"})
        if done and started < trials:
            start(clock)
    return out


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def first_hit(events: list[dict[str, Any]], target: set[str]) -> dict[str, Any] | None:
    """The first trial end at which a configuration of ``target`` (the best and those tied with it)
    had finished its evaluation."""
    return next((e for e in events if e["status"] == "finished" and e["trial"] in target), None)


def grid_statistics(grid: dict[str, Any], n_eval: int) -> tuple[dict[str, Any], list[str]]:
    """How well n_eval examples tell the grid's configurations apart: the best with its 95% interval,
    every other configuration against it (paired exact McNemar on the same examples where the
    outcomes were recorded, else Fisher's exact test on counts), Holm-corrected, and the smallest
    difference one seed of n_eval examples resolves."""
    import numpy as np

    from ancra_tune.robustness import stats

    done = {k: t for k, t in grid["trials"].items() if t["value"] is not None}
    best_key = max(done, key=lambda k: done[k]["value"])
    best = done[best_key]
    n = int(best.get("n", n_eval))
    k_best = int(round(best["value"] * n))

    def outcomes(t: dict[str, Any]) -> Any:
        return stats.unpack(t["worst_outcomes"], n)[None, :] if "worst_outcomes" in t else None

    comps = {}
    for k, t in done.items():
        if k == best_key:
            continue
        a, b = outcomes(best), outcomes(t)
        if a is not None and b is not None:
            comps[k] = stats.compare(b, a)
        else:
            comps[k] = stats.compare_counts([int(round(t["value"] * n))], [k_best], n)
    adjusted = stats.holm([c.p for c in comps.values()])
    tied = [k for k, adj in zip(comps, adjusted, strict=True) if adj >= stats.ALPHA]
    lo, hi = stats.proportion_ci(k_best, n)
    mde = stats.mde(float(np.mean([t["value"] for t in done.values()])), n, 1)
    test = next(iter(comps.values())).test if comps else ""
    out = {"best": best_key, "best_correct": k_best, "n": n, "best_ci95": [lo, hi], "mde": mde,
           "not_separable_from_best": tied, "test": test,
           "comparisons": {k: {"diff": c.diff, "p": c.p, "p_holm": adj, "ci95": list(c.ci95)}
                           for (k, c), adj in zip(comps.items(), adjusted, strict=True)}}
    lines = [f"Statistics of the grid (one seed, {n} held-out examples per configuration): the grid's best "
             f"({best_key}) is {k_best}/{n} = {100 * k_best / n:.1f}% (95% interval {100 * lo:.1f}-{100 * hi:.1f}); "
             f"{len(tied)} of the other {len(comps)} configurations cannot be told apart from it ({test}, Holm over "
             f"the {len(comps)} comparisons). The smallest difference two configurations of this design resolve "
             f"(two-sided 5%, 80% power) is {100 * mde:.1f} points. A search reaches the target when it finds the "
             "best or one of the configurations tied with it: a finer target than the evaluation resolves would "
             "rank searches by noise."]
    return out, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/search_efficiency"))
    p.add_argument("--trials", type=int, default=8, help="trials of random, TPE and TPE + ASHA (the grid has 16)")
    p.add_argument("--reps", type=int, default=50, help="searches per method (sampler seeds 0..reps-1)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n-eval", type=int, default=500, help="held-out images each trial is evaluated on")
    p.add_argument("--grace", type=int, default=1, help="ASHA's grace period (epochs)")
    p.add_argument("--reduction", type=int, default=2, help="ASHA's reduction factor")
    p.add_argument("--asha", nargs="*", default=["1:3:8", "2:2:8", "1:2:12", "2:2:12", "1:2:16"],
                   help="more TPE + ASHA runs to replay, as grace:reduction:trials")
    p.add_argument("--data", type=Path, default=MNIST)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    grid_file = a.out / "grid.json"
    if grid_file.is_file():
        grid = json.loads(grid_file.read_text())
    else:
        grid = record_grid(a)
        grid_file.write_text(json.dumps(grid, indent=1))
    # a recorded grid defines its space (an older grid.json replays with the values it was recorded at)
    SPACE.update({k: sorted({t["params"][k] for t in grid["trials"].values()}) for k in SPACE})

    from trainables.search import build_scheduler
    from trainables.study import load_study

    def sweep(grace: int, reduction: int, trials: int) -> Any:
        f = a.out / f"search_sweep_g{grace}_r{reduction}_n{trials}.yaml"
        f.write_text(study_text("sweep", argparse.Namespace(**{**vars(a), "grace": grace, "reduction": reduction,
                                                               "trials": trials})))
        return load_study(f)

    study = sweep(a.grace, a.reduction, a.trials)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}
    results["grid_statistics"], stat_lines = grid_statistics(grid, a.n_eval)
    gs = results["grid_statistics"]
    target = {gs["best"], *gs["not_separable_from_best"]}  # the best and every configuration tied with it
    results["target"] = sorted(target)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for method in METHODS:
        reps = 1 if method == "grid" else a.reps
        runs[method] = [simulate(grid, method, trials=a.trials, seed=r, concurrency=a.concurrency, study=study)
                        for r in range(reps)]
    for method in ("tpe_before", "tpe_after"):
        runs[f"{method} + asha"] = [simulate(grid, method, trials=a.trials, seed=r, concurrency=a.concurrency,
                                             study=study, scheduler=build_scheduler(study)) for r in range(a.reps)]
    # ASHA's settings and the number of trials, replayed over the same table: what to ship.
    for variant in a.asha:
        grace, reduction, trials = (int(x) for x in variant.split(":"))
        if (grace, reduction, trials) == (a.grace, a.reduction, a.trials):
            continue
        st = sweep(grace, reduction, trials)
        runs[f"tpe_after + asha g{grace} r{reduction} n{trials}"] = [
            simulate(grid, "tpe_after", trials=trials, seed=r, concurrency=a.concurrency, study=st,
                     scheduler=build_scheduler(st)) for r in range(a.reps)]
    best_value = grid["trials"][gs["best"]]["value"]
    lines = [f"Space: {', '.join(f'{k} {v}' for k, v in SPACE.items())} ({len(grid['trials'])} configurations, "
             f"{grid['epochs']} epochs each). Grid's best {METRIC} = {best_value:.3f}; the target is the best or "
             f"a configuration not separable from it ({len(target)} of {len(grid['trials'])}). Searches: "
             f"{a.trials} trials unless named, {a.concurrency} at a time, ASHA grace {a.grace} reduction "
             f"{a.reduction} unless named, {a.reps} sampler seeds each (the grid: once, in its order); 'vs before': "
             "Fisher's exact test of the reached counts against the same search with tpe_before.", "",
             "| method | trials | epochs spent (all): median | best found: median (min–max) | reached target | "
             "vs before: p | epochs to target: median (max) | wall to target (s): median |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    reached: dict[str, int] = {}
    for method, reps in runs.items():
        bests = [r[-1]["best"] or 0.0 for r in reps]
        n_trials = sum(e["status"] in ("finished", "stopped") for e in reps[0])
        hits = [first_hit(r, target) for r in reps]
        got = [h for h in hits if h is not None]
        reached[method] = len(got)
        ep = [h["epochs"] for h in got]
        wall = [h["t"] for h in got]
        results[method] = {"bests": bests, "epochs_to_target": [h["epochs"] if h else None for h in hits],
                           "wall_to_target_s": [h["t"] if h else None for h in hits],
                           "epochs_spent": [r[-1]["epochs"] for r in reps], "events": reps}
        before = method.replace("tpe_after", "tpe_before")
        vs = ""
        if before != method and before in reached:
            from scipy.stats import fisher_exact

            nb = len(runs[before])
            p_value = fisher_exact([[len(got), len(reps) - len(got)], [reached[before], nb - reached[before]]]).pvalue
            vs = f"{p_value:.3g}"
            results[method]["vs_before_p"] = p_value
        spent = statistics.median(r[-1]["epochs"] for r in reps)
        lines.append(f"| {method} | {n_trials} | {spent:g} | "
                     f"{statistics.median(bests):.3f} ({min(bests):.3f}–{max(bests):.3f}) | {len(got)}/{len(reps)} | "
                     f"{vs} | "
                     + (f"{statistics.median(ep):g} ({max(ep)}) | {statistics.median(wall):.0f} |"
                        if got else "– | – |"))
    lines += ["", stat_lines[0]]
    table = "\n".join(lines)
    (a.out / "table.md").write_text(table + "\n")
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table)
    _plot(runs, best_value, grid["epochs"] * len(grid["trials"]), a.out / "best_so_far.png")


def _plot(runs: dict[str, list[list[dict[str, Any]]]], target: float, max_epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = list(range(0, max_epochs + 1))
    for method, reps in runs.items():
        ys = []
        for x in xs:
            at = [max((e["best"] or 0.0 for e in r if e["epochs"] <= x), default=0.0) for r in reps]
            ys.append(statistics.median(at))
        ax.step(xs, ys, where="post", label=method, ls=":" if " " in method else "-")
    ax.axhline(target, color="grey", ls="--", lw=1, label="grid's best")
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel(f"best {METRIC} so far (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
